"""Keys, tokens and certificates for the auth tests, made with cryptography
and PyJWT (what a real issuer would use), written to a test's tmp dir."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from servicectl import run_cli


def new_token(tmp: Path, name: str, *args: str) -> tuple[str, str]:
    """(token, its [[token]] entry), from `ringstream token new` itself."""
    r = run_cli("token", "new", name, *args)
    assert r.returncode == 0, r.stderr
    return r.stderr.strip(), r.stdout


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwks(keys: dict[str, Any]) -> str:
    """A JWKS document of the public halves, by kid."""
    out = []
    for kid, key in keys.items():
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        algo = jwt.get_algorithm_by_name(alg)
        jwk = json.loads(algo.to_jwk(key.public_key()))
        out.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    return json.dumps({"keys": out})


def claims(
    scope: dict[str, Any] | None = None, *, ttl: float = 3600, **extra: Any
) -> dict[str, Any]:
    c: dict[str, Any] = {"sub": "tester", "exp": int(time.time() + ttl)}
    if scope is not None:
        c["ringstream"] = scope
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


def unsigned(payload: dict[str, Any], header: dict[str, Any]) -> str:
    """A JWT with `alg: none` and no signature, as an attacker writes one."""

    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


def write_cert(dir: Path, name: str, *, client: bool = False) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem): a fresh CA and a certificate it signed,
    for 127.0.0.1 and localhost (a server's), or a client's."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    paths = (dir / f"{name}-ca.pem", dir / f"{name}.pem", dir / f"{name}.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths
