"""JSON Web Tokens (auth.mode = "jwt"), verified with PyJWT.

The key decides the algorithm, never the token: an HS256 secret file takes
only HS256, an RSA public key only RS256, a P-256 key only ES256, and a
JWKS key its own `alg` (or what its kty and crv imply). A token whose
header names another algorithm (`none`, or HS256 against a public key, the
classic confusion) is refused before any signature is looked at.

Required: `exp`, and the `ringstream` claim (service/auth/scope.py: types,
fields, allow). `nbf` and `iat` are checked when present; `aud` and `iss`
when auth.jwt_audience and auth.jwt_issuer are set (a token with an `aud`
is refused when no audience is configured: it was meant for someone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from service.auth.scope import Principal, ScopeError, parse_scope

CLAIM = "ringstream"
MIN_SECRET = 32  # bytes: RFC 7518 3.2 wants a key at least as long as the hash
_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class KeyFileError(ValueError):
    """A key or JWKS file that cannot be used; the message names the key."""


class Refused(Exception):
    """A token refused: `reason` is the metric label, `message` what the client is told."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Key:
    key: Any
    algorithm: str


def _pem_key(data: bytes, path: str) -> Key:
    try:
        if b"CERTIFICATE" in data.split(b"\n", 1)[0]:
            public: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyFileError(
            f"auth.jwt_key: {path}: not a PEM public key or certificate ({e}); "
            "the service needs the public key only, never the signing key"
        ) from None
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise KeyFileError(f"auth.jwt_key: {path}: an RSA key of {public.key_size} bits")
        return Key(public, "RS256")
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _CURVES:
        return Key(public, _CURVES[public.curve.name])
    if isinstance(public, ed25519.Ed25519PublicKey):
        return Key(public, "EdDSA")
    raise KeyFileError(f"auth.jwt_key: {path}: a key type JWTs are not signed with here")


def load_key(path: str) -> Key:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KeyFileError(f"auth.jwt_key: cannot read {path}: {e.strerror}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        return _pem_key(data.strip(), path)
    secret = data.strip()
    if len(secret) < MIN_SECRET:
        raise KeyFileError(
            f"auth.jwt_key: {path}: an HS256 secret of {len(secret)} bytes; it needs at "
            f"least {MIN_SECRET} (head -c 32 /dev/urandom | base64)"
        )
    return Key(secret, "HS256")


def load_jwks(path: str) -> dict[str | None, Key]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise KeyFileError(f"auth.jwt_jwks: cannot read {path}: {e.strerror}") from None
    try:
        keys = jwt.PyJWKSet.from_json(text).keys
    except (jwt.PyJWKSetError, jwt.InvalidKeyError, jwt.PyJWKError, ValueError) as e:
        raise KeyFileError(f"auth.jwt_jwks: {path}: {e}") from None
    out: dict[str | None, Key] = {}
    for k in keys:
        if k.key_id in out:
            raise KeyFileError(f"auth.jwt_jwks: {path}: kid {k.key_id!r} is used twice")
        out[k.key_id] = Key(k.key, k.algorithm_name)
    return out


class JwtVerifier:
    def __init__(self, auth: Mapping[str, Any]) -> None:
        # one key file: a kid means nothing to it; a JWKS: keys by kid
        self.key_file: Key | None = None
        self.keys: dict[str | None, Key] = {}
        if auth["jwt_jwks"]:
            self.keys = load_jwks(auth["jwt_jwks"])
        else:
            self.key_file = load_key(auth["jwt_key"])
        self.audience: str | None = auth["jwt_audience"] or None
        self.issuer: str | None = auth["jwt_issuer"] or None
        self.leeway: float = auth["jwt_leeway"]

    def _key(self, header: Mapping[str, Any]) -> Key:
        if self.key_file is not None:
            return self.key_file
        kid = header.get("kid")
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Refused("unknown_key", "invalid token: signed with a key this service lacks")
        return key

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, ValueError, TypeError):
            # not a JWT, or one whose header is not what RFC 7515 allows
            raise Refused("malformed", "invalid token: not a JWT") from None
        key = self._key(header)
        if header.get("alg") != key.algorithm:
            raise Refused("algorithm", f"invalid token: its key takes {key.algorithm} only")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise Refused("expired", "token expired") from None
        except jwt.ImmatureSignatureError:
            raise Refused("not_yet_valid", "token not valid yet (nbf or iat)") from None
        except jwt.InvalidAudienceError:
            raise Refused("audience", "invalid token: wrong audience") from None
        except jwt.InvalidIssuerError:
            raise Refused("issuer", "invalid token: wrong issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise Refused("claim", f"invalid token: no {e.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Refused("signature", "invalid token: bad signature") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError, ValueError, TypeError):
            raise Refused("malformed", "invalid token") from None
        claim = claims.get(CLAIM)
        if not isinstance(claim, dict):
            raise Refused("claim", f"invalid token: no {CLAIM} claim (an object)")
        try:
            scope = parse_scope(claim, CLAIM)
        except ScopeError as e:
            raise Refused("claim", f"invalid token: {e}") from None
        sub = claims.get("sub")
        name = sub[:64] if isinstance(sub, str) and sub else "jwt"
        return Principal(name, "jwt", scope, float(claims["exp"]) + self.leeway, token)
