"""Who may subscribe (issue 15): tokens, JWTs, scopes, expiry, cookies,
the metrics token, TLS.

The real service with auth on, real clients: curl (with and without tokens,
--cacert over TLS, a cookie jar), aiohttp (NDJSON, SSE, WebSocket), a real
Prometheus scraping with its token, tokens made by `ringstream token new`
and JWTs signed by PyJWT with fresh keys (tests/authkeys.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from authkeys import (
    claims,
    ec_key,
    jwks,
    new_token,
    public_pem,
    rsa_key,
    unsigned,
    write_cert,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servicectl import BASE_CONFIG, ROOT, Service, parse_metrics, run_cli

SYNTHETIC = """
[[sources]]
kind = "synthetic"
rate = 2000
size = 64
"""


def auth_config(tmp: Path, section: str, sources: str = SYNTHETIC, extra: str = "") -> str:
    return BASE_CONFIG + extra + f"\n[auth]\n{section}\n" + sources


def token_config(tmp: Path, entries: list[str], **kw: Any) -> str:
    path = tmp / "tokens.toml"
    path.write_text("\n".join(entries))
    path.chmod(0o600)
    return auth_config(tmp, f'mode = "token"\ntokens_file = "{path}"', **kw)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", *args], capture_output=True, text=True, timeout=60)


def status(url: str, *args: str) -> int:
    """The HTTP status curl gets (HEAD for the streams, which do not end)."""
    r = curl("-o", "/dev/null", "-w", "%{http_code}", *args, url)
    return int(r.stdout)


def bearer(token: str) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {token}")


def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain urllib GET (for the many-token loops, where curl per token is slow)."""
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read(200)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_with_cookie(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Cookie": f"ringstream_token={token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def metrics(svc: Service, token: str | None = None) -> dict[str, float]:
    args = bearer(token) if token else ()
    return parse_metrics(curl(*args, svc.url("/metrics")).stdout)


async def read_ndjson(url: str, token: str, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
        http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


# --- static tokens ------------------------------------------------------------


def test_tokens_guard_every_route_but_the_probes(tmp_path: Path) -> None:
    reader, reader_entry = new_token(tmp_path, "reader")
    feeder, feeder_entry = new_token(tmp_path, "feeder", "--allow", "ingest")
    admin, admin_entry = new_token(tmp_path, "admin", "--allow", "subscribe", "--allow", "reload")
    old, old_entry = new_token(tmp_path, "old", "--expires", "2020-01-01T00:00:00+00:00")
    assert reader.startswith("rs_") and len(reader) > 40
    assert hashlib.sha256(reader.encode()).hexdigest() in reader_entry
    assert reader not in reader_entry  # the file keeps only the hash
    config = token_config(
        tmp_path,
        [reader_entry, feeder_entry, admin_entry, old_entry],
        extra="\n[ingest]\nenabled = true\n",
    )
    with Service(tmp_path, config) as svc:
        # open: the probes, the index, and /metrics (no metrics token set)
        for path in ("/healthz", "/readyz", "/", "/metrics"):
            assert status(svc.url(path)) == 200, path
        # everything else wants a token
        refused = curl("-i", "-I", svc.url("/events"))
        assert refused.stdout.startswith("HTTP/1.1 401")
        assert 'www-authenticate: bearer realm="ringstream"' in refused.stdout.lower()
        for path in ("/query", "/ws"):
            assert status(svc.url(path)) == 401, path
        for path in ("/ingest", "/-/reload"):
            assert status(svc.url(path), "-X", "POST") == 401, path
        body = curl(svc.url("/query")).stdout
        assert json.loads(body) == {"error": "a bearer token is required"}
        # a wrong token, another scheme, an expired token
        wrong = curl("-i", *bearer("rs_" + "x" * 43), svc.url("/query")).stdout
        assert 'error="invalid_token"' in wrong and '{"error":"invalid token"}' in wrong
        assert status(svc.url("/query"), "-H", "Authorization: Basic dTpw") == 401
        assert status(svc.url("/query"), *bearer(old)) == 401
        # the right token, for what it allows
        assert status(svc.url("/events"), "-I", *bearer(reader)) == 200
        assert status(svc.url("/query"), *bearer(reader)) == 200
        assert status(svc.url("/ingest"), "-X", "POST", "-d", "{}", *bearer(reader)) == 403
        assert status(svc.url("/-/reload"), "-X", "POST", *bearer(reader)) == 403
        assert status(svc.url("/events"), "-I", *bearer(feeder)) == 403
        posted = curl(
            "-X", "POST", "--data-binary", '{"a":1}\n', *bearer(feeder), svc.url("/ingest")
        )
        assert json.loads(posted.stdout)["accepted"] == 1
        assert status(svc.url("/-/reload"), "-X", "POST", *bearer(admin)) == 200
        forbidden = curl(*bearer(reader), "-X", "POST", svc.url("/-/reload")).stdout
        assert "may not reload" in forbidden and admin not in forbidden
        records = asyncio.run(read_ndjson(svc.url("/events?type=synthetic"), reader, 5))
        assert [r["type"] for r in records] == ["synthetic"] * 5
        m = metrics(svc)
        failures = {
            k.split('"')[1]: v for k, v in m.items() if k.startswith("ringstream_auth_failures")
        }
        assert failures["missing"] == 6
        assert failures["invalid"] == 1
        assert failures["malformed"] == 1
        assert failures["expired"] == 1
        assert failures["forbidden"] == 4
        assert m['ringstream_auth_accepted_total{token="reader"}'] >= 4
        assert m["ringstream_auth_enabled"] == 1
        svc.wait_log("subscriber_connect", token="reader")
        logged = "\n".join(svc.lines)
        for token in (reader, feeder, admin, old):
            assert token not in logged  # never logged, even refused
        refusal = svc.wait_log("auth_refused", reason="forbidden")
        assert refusal["level"] == "info" and refusal["token"] == "reader"
        assert svc.errors() == []


def test_token_cli_refuses_bad_input(tmp_path: Path) -> None:
    r = run_cli("token", "new", "x", "--field", "comm")
    assert r.returncode == 2 and "--field 'comm': expected K=V" in r.stderr
    r = run_cli("token", "new", "x", "--type", "no spaces")
    assert r.returncode == 2 and "not a type name" in r.stderr
    r = run_cli("token", "new", "two words")
    assert r.returncode == 2 and "name 'two words'" in r.stderr
    r = run_cli("token", "new", "x", "--expires", "tomorrow")
    assert r.returncode == 2 and "ISO 8601" in r.stderr
    out = tmp_path / "t"
    r = run_cli("token", "new", "x", "--out", str(out))
    assert r.returncode == 0 and r.stderr == ""
    assert (out.stat().st_mode & 0o777) == 0o600
    token = out.read_text().strip()
    assert hashlib.sha256(token.encode()).hexdigest() in r.stdout
    hashed = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {token} | {sys.executable} -m service token hash"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert hashed.stdout.strip() == "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.parametrize(
    ("section", "files", "message"),
    [
        ('mode = "token"', {}, 'auth.tokens_file: auth.mode = "token" needs a tokens file'),
        ('mode = "jwt"', {}, "auth.jwt_key, auth.jwt_jwks: "),
        ('mode = "bearer"', {}, "auth.mode: must be one of 'none', 'token', 'jwt'"),
        ('metrics_token = "abc"', {}, 'auth.metrics_token: must be "sha256:"'),
        (
            'mode = "token"\ntokens_file = "{t}"',
            {"t": "[[token]]\nname = 'a'\nsha256 = 'beef'\n"},
            "token 'a'.sha256: 64 lower-case hex digits",
        ),
        (
            'mode = "token"\ntokens_file = "{t}"',
            {"t": f"[[token]]\nname = 'a'\nsha256 = '{'0' * 64}'\ntypes = 'exec'\n"},
            "token 'a'.types: must be a non-empty list",
        ),
        ('mode = "jwt"\njwt_key = "{t}"', {"t": "short secret"}, "it needs at least 32"),
        (
            'mode = "jwt"\njwt_jwks = "{t}"',
            {"t": '{"keys": [{"kty": "nope"}]}'},
            "auth.jwt_jwks: ",
        ),
        ('mode = "jwt"\njwt_key = "{t}"', {"t": "-----BEGIN nonsense"}, "not a PEM public key"),
    ],
)
def test_bad_auth_config_is_a_clear_start_error(
    tmp_path: Path, section: str, files: dict[str, str], message: str
) -> None:
    paths = {}
    for name, text in files.items():
        p = tmp_path / f"{name}.file"
        p.write_text(text)
        paths[name] = str(p)
    config = tmp_path / "c.toml"
    config.write_text(f"[auth]\n{section.format(**paths)}\n")
    r = run_cli("serve", "--config", str(config), "--port", "0")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr


# --- scopes -------------------------------------------------------------------

MIXED = """
[[sources]]
kind = "synthetic"
rate = 50000
size = 64
instances = 2
mix = { synthetic = 1.0, synthetic_blob = 1.0, raw = 1.0 }
"""


async def _scoped_streams(svc: Service, scoped: str, everything: str) -> None:
    want = 20_000
    ws_records: list[dict[str, Any]] = []
    errors: list[str] = []

    async def ws_reader() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                svc.ws_url("/ws?batch=500"), headers={"Authorization": f"Bearer {scoped}"}
            ) as ws,
        ):
            # asking for more over the socket: an error frame, the scope stays
            await ws.send_json({"filter": {"type": ["raw"]}})
            while len(ws_records) < want:
                msg = await ws.receive_json(timeout=60)
                if isinstance(msg, dict):
                    if msg.get("type") == "error":
                        errors.append(msg["error"])
                    else:
                        ws_records.append(msg)
                else:
                    ws_records.extend(msg)

    scoped_ndjson, everything_ndjson, _ = await asyncio.gather(
        read_ndjson(svc.url("/events"), scoped, want),
        read_ndjson(svc.url("/events"), everything, want),
        ws_reader(),
    )
    for r in scoped_ndjson + ws_records:
        if r["type"] == "gap":  # a slow reader's own loss marker: allowed
            continue
        assert r["type"] == "synthetic" and r["worker"] == 0, r
    assert sum(r["type"] == "synthetic" for r in scoped_ndjson) > want // 2
    # the stream was mixed: the scope did the selecting
    types = {r["type"] for r in everything_ndjson}
    assert {"synthetic", "synthetic_blob", "raw"} <= types
    assert {r.get("worker") for r in everything_ndjson if r["type"] == "synthetic"} == {0, 1}
    assert errors and "type raw: out of this token's scope (types: synthetic)" in errors[0]


def test_a_scoped_token_never_gets_an_out_of_scope_record(tmp_path: Path) -> None:
    scoped, scoped_entry = new_token(tmp_path, "w0", "--type", "synthetic", "--field", "worker=0")
    everything, everything_entry = new_token(tmp_path, "all")
    config = token_config(tmp_path, [scoped_entry, everything_entry], sources=MIXED)
    config = config.replace("count = 1", "count = 2")
    with Service(tmp_path, config) as svc:
        # asking for what the scope excludes: a 403 that names it
        out = curl(*bearer(scoped), svc.url("/events?type=raw"))
        assert json.loads(out.stdout) == {
            "error": "type raw: out of this token's scope (types: synthetic)"
        }
        out = curl(*bearer(scoped), svc.url("/events?field.worker=1"))
        assert "field.worker=1: out of this token's scope (field.worker=0)" in out.stdout
        assert (
            status(svc.url("/events?type=synthetic&field.worker=0"), "-I", *bearer(scoped)) == 200
        )
        assert status(svc.url("/events?field.seq=1*"), "-I", *bearer(scoped)) == 200
        asyncio.run(_scoped_streams(svc, scoped, everything))
        m = metrics(svc)
        assert m['ringstream_auth_failures_total{reason="scope"}'] == 3
        assert svc.errors() == []


# --- JSON Web Tokens ----------------------------------------------------------

AUDIENCE = "ringstream-test"
ISSUER = "https://issuer.test"


class JwtKeys:
    def __init__(self) -> None:
        self.rsa = rsa_key()
        self.ec = ec_key()
        self.other = rsa_key()  # not in the JWKS

    def rs(self, payload: dict[str, Any], kid: str = "r1", key: Any = None) -> str:
        return jwt.encode(payload, key or self.rsa, algorithm="RS256", headers={"kid": kid})

    def es(self, payload: dict[str, Any]) -> str:
        return jwt.encode(payload, self.ec, algorithm="ES256", headers={"kid": "e1"})


@pytest.fixture(scope="module")
def jwt_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, JwtKeys]]:
    tmp = tmp_path_factory.mktemp("jwt")
    keys = JwtKeys()
    (tmp / "jwks.json").write_text(jwks({"r1": keys.rsa, "e1": keys.ec}))
    section = (
        f'mode = "jwt"\njwt_jwks = "{tmp / "jwks.json"}"\n'
        f'jwt_audience = "{AUDIENCE}"\njwt_issuer = "{ISSUER}"'
    )
    with Service(tmp, auth_config(tmp, section)) as svc:
        yield svc, keys


def _ok(**kw: Any) -> dict[str, Any]:
    return claims({"types": ["synthetic"]}, **{"aud": AUDIENCE, "iss": ISSUER, **kw})


def _confused(keys: JwtKeys) -> str:
    """HS256 with the RSA public key as the HMAC secret: the classic confusion."""
    import base64

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "r1"}).encode())
    body = b64(json.dumps(_ok()).encode())
    sig = hmac.new(public_pem(keys.rsa), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


JWT_CASES: list[tuple[str, Any, int, str | None]] = [
    ("rs256", lambda k: k.rs(_ok()), 200, None),
    ("es256", lambda k: k.es(_ok()), 200, None),
    ("expired", lambda k: k.rs(_ok(exp=int(time.time()) - 60)), 401, "expired"),
    ("not yet valid", lambda k: k.rs(_ok(nbf=int(time.time()) + 3600)), 401, "not_yet_valid"),
    ("wrong audience", lambda k: k.rs(_ok(aud="someone-else")), 401, "audience"),
    ("no audience", lambda k: k.rs(_ok(aud=None)), 401, "claim"),
    ("wrong issuer", lambda k: k.rs(_ok(iss="https://evil.test")), 401, "issuer"),
    ("wrong key", lambda k: k.rs(_ok(), key=k.other), 401, "signature"),
    ("unknown kid", lambda k: k.rs(_ok(), kid="r9"), 401, "unknown_key"),
    ("alg none", lambda k: unsigned(_ok(), {"alg": "none", "kid": "r1"}), 401, "algorithm"),
    ("HS256 with the public key", _confused, 401, "algorithm"),
    ("no exp", lambda k: k.rs(_ok(exp=None)), 401, "claim"),
    ("no ringstream claim", lambda k: k.rs(claims(None, aud=AUDIENCE, iss=ISSUER)), 401, "claim"),
    (
        "bad claim",
        lambda k: k.rs(claims({"types": "synthetic"}, aud=AUDIENCE, iss=ISSUER)),
        401,
        "claim",
    ),
    ("not a JWT", lambda k: "rs_not-a-jwt", 401, "malformed"),
]


@pytest.mark.parametrize(
    ("case", "make", "code", "reason"), JWT_CASES, ids=[c[0] for c in JWT_CASES]
)
def test_jwt_is_checked(
    jwt_service: tuple[Service, JwtKeys], case: str, make: Any, code: int, reason: str | None
) -> None:
    svc, keys = jwt_service
    token = make(keys)
    before = metrics(svc)
    got, headers, body = get(svc.url("/query"), token)
    assert got == code, body
    if reason is not None:
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        after = metrics(svc)
        key = f'ringstream_auth_failures_total{{reason="{reason}"}}'
        assert after[key] == before[key] + 1
        assert token not in "\n".join(svc.lines)


def _b64(b: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
# JWT-shaped: real algorithms and kids, headers and claims of any JSON, any signature
_jwt_shaped = st.tuples(
    st.fixed_dictionaries(
        {"alg": st.sampled_from(["RS256", "ES256", "HS256", "none", "EdDSA"]) | _json},
        optional={"kid": st.sampled_from(["r1", "e1"]) | _json, "crit": _json, "typ": _json},
    ),
    st.dictionaries(
        st.sampled_from(["exp", "nbf", "iat", "aud", "iss", "sub", "ringstream"]), _json, max_size=6
    ),
    st.binary(max_size=64),
).map(
    lambda t: ".".join(
        [_b64(json.dumps(t[0]).encode()), _b64(json.dumps(t[1]).encode()), _b64(t[2])]
    )
)
# what a header can carry: latin-1 bytes (aiohttp reads them as UTF-8 with
# surrogate escapes), no control characters
_text = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)), max_size=80)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(_text, st.lists(_text, min_size=2, max_size=4).map(".".join), _jwt_shaped))
def test_malformed_tokens_are_401_never_500(
    jwt_service: tuple[Service, JwtKeys], token: str
) -> None:
    svc, _ = jwt_service
    token = token.strip(" \t")
    if not token:
        return  # no token at all: the "missing" case, tested above
    code, _, body = get(svc.url("/query"), token)
    assert code == 401, (token, body)
    cookie = get_with_cookie(svc.url("/query"), token)
    assert cookie in (400, 401), token  # a cookie aiohttp cannot read is a 400


def test_the_jwt_service_logged_no_error(jwt_service: tuple[Service, JwtKeys]) -> None:
    svc, _ = jwt_service
    assert svc.errors() == []


def test_jwt_with_a_key_file_takes_its_algorithm_only(tmp_path: Path) -> None:
    secret = os.urandom(32).hex()
    (tmp_path / "secret").write_text(secret + "\n")
    section = f'mode = "jwt"\njwt_key = "{tmp_path / "secret"}"'
    with Service(tmp_path, auth_config(tmp_path, section)) as svc:
        good = jwt.encode(claims({}), secret, algorithm="HS256")
        assert get(svc.url("/query"), good)[0] == 200
        other = jwt.encode(claims({}), rsa_key(), algorithm="RS256")
        assert get(svc.url("/query"), other)[0] == 401
        assert get(svc.url("/query"), unsigned(claims({}), {"alg": "none"}))[0] == 401
        m = metrics(svc)
        assert m['ringstream_auth_failures_total{reason="algorithm"}'] == 2
        assert m['ringstream_auth_accepted_total{token="jwt"}'] == 1


# --- expiry ends the stream ---------------------------------------------------


async def _until_end(svc: Service, token: str, exp: int) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def ndjson() -> dict[str, Any]:
            async with http.get(svc.url("/events"), headers=auth) as resp:
                lines = [json.loads(line) async for line in resp.content]
            assert lines[-1] == {"type": "end", "reason": "token_expired"}
            assert lines[0]["type"] == "synthetic"  # records came first
            return lines[-1]

        async def sse() -> str:
            async with http.get(svc.url("/events?format=sse"), headers=auth) as resp:
                text = await resp.text()
            events = text.strip().split("\n\n")
            assert events[-1] == 'event: end\ndata: {"type":"end","reason":"token_expired"}'
            return events[-1]

        async def ws() -> int | None:
            async with http.ws_connect(svc.ws_url("/ws"), headers=auth) as sock:
                last = None
                async for msg in sock:
                    last = json.loads(msg.data)
                assert last == {"type": "end", "reason": "token_expired"}
                return sock.close_code

        _, _, code = await asyncio.gather(ndjson(), sse(), ws())
        assert code == 4001
        # ended at expiry, not before it (and the next request is refused)
        assert time.time() >= exp
        async with http.get(svc.url("/events"), headers=auth) as resp:
            assert resp.status == 401


def test_an_expiring_token_ends_each_stream_with_a_marker(tmp_path: Path) -> None:
    secret = os.urandom(32).hex()
    (tmp_path / "secret").write_text(secret)
    section = f'mode = "jwt"\njwt_key = "{tmp_path / "secret"}"'
    with Service(tmp_path, auth_config(tmp_path, section)) as svc:
        exp = int(time.time()) + 3
        token = jwt.encode({"exp": exp, "sub": "brief", "ringstream": {}}, secret)
        asyncio.run(_until_end(svc, token, exp))
        for transport in ("ndjson", "sse", "ws"):
            ended = svc.wait_log("subscriber_disconnect", transport=transport)
            assert ended["reason"] == "token_expired", ended
        assert svc.errors() == []


# --- reload: revoked tokens, rotated files ------------------------------------


async def _revocation(svc: Service, keep: str, drop: str, tokens: Path, kept: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        a = await http.get(svc.url("/events"), headers={"Authorization": f"Bearer {keep}"})
        b = await http.get(svc.url("/events"), headers={"Authorization": f"Bearer {drop}"})
        await a.content.readline()
        await b.content.readline()
        tokens.write_text(kept)
        svc.proc.send_signal(signal.SIGHUP)
        lines = [json.loads(line) async for line in b.content]
        assert lines[-1] == {"type": "end", "reason": "token_revoked"}
        # the kept token's stream goes on
        for _ in range(10):
            assert json.loads(await a.content.readline())["type"] == "synthetic"
        a.close()
        b.close()


def test_reload_ends_the_streams_of_removed_tokens(tmp_path: Path) -> None:
    keep, keep_entry = new_token(tmp_path, "keep")
    drop, drop_entry = new_token(tmp_path, "drop")
    config = token_config(tmp_path, [keep_entry, drop_entry])
    with Service(tmp_path, config) as svc:
        tokens = tmp_path / "tokens.toml"
        asyncio.run(_revocation(svc, keep, drop, tokens, keep_entry))
        svc.wait_log("reload")
        assert svc.wait_log("token_revoked")["token"] == "drop"
        assert get(svc.url("/query"), drop)[0] == 401
        # a tokens file that cannot be read: refused, the running keys stay
        tokens.write_text("[[token]]\nname = 'broken'\n")
        svc.proc.send_signal(signal.SIGHUP)
        failed = svc.wait_log("reload_failed")
        assert "auth.tokens_file" in failed["error"]
        assert get(svc.url("/query"), keep)[0] == 200
        assert metrics(svc)["ringstream_config_reload_success"] == 0


# --- the browser's way: a cookie ----------------------------------------------


def test_login_sets_an_httponly_cookie_that_streams_take(tmp_path: Path) -> None:
    token, entry = new_token(tmp_path, "browser")
    with Service(tmp_path, token_config(tmp_path, [entry])) as svc:
        jar = tmp_path / "jar"
        r = curl("-i", "-c", str(jar), "-X", "POST", "-d", f"token={token}", svc.url("/login"))
        head = r.stdout.lower()
        assert head.startswith("http/1.1 200")
        cookie = next(line for line in head.splitlines() if line.startswith("set-cookie:"))
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert status(svc.url("/events"), "-I", "-b", str(jar)) == 200
        assert status(svc.url("/login"), "-X", "POST", "-d", "token=rs_wrong") == 401
        r = curl("-i", "-b", str(jar), "-c", str(jar), "-X", "POST", svc.url("/logout"))
        assert r.stdout.startswith("HTTP/1.1 204")
        assert status(svc.url("/events"), "-I", "-b", str(jar)) == 401
        # a page elsewhere cannot log in: the Origin check comes first
        foreign = ("-H", "Origin: https://evil.example")
        assert status(svc.url("/login"), "-X", "POST", "-d", f"token={token}", *foreign) == 403
        assert token not in "\n".join(svc.lines)


# --- /metrics and its own token -----------------------------------------------


def test_deploy_auth_secrets_with_a_real_prometheus_scrape(tmp_path: Path) -> None:
    """deploy/make-secrets and deploy/docker-compose.auth.yml's environment, as
    compose gives them (secrets under /run/secrets/NAME, here in tmp), and a
    real Prometheus on deploy/prometheus/prometheus-auth.yml."""
    import yaml
    from test_deploy import Prometheus, wait_for

    deploy = ROOT / "deploy"
    secrets = tmp_path / "secrets"
    r = subprocess.run(["bash", str(deploy / "make-secrets"), str(secrets)], capture_output=True)
    assert r.returncode == 0, r.stderr
    compose = yaml.safe_load((deploy / "docker-compose.auth.yml").read_text())
    files = {
        f"/run/secrets/{name}": secrets / Path(s["file"]).name
        for name, s in compose["secrets"].items()
    }
    env = {
        k: str(files.get(v, v)) for k, v in compose["services"]["ringstream"]["environment"].items()
    }
    with Service(tmp_path, BASE_CONFIG + SYNTHETIC, env=env) as svc:
        reader = (secrets / "reader.token").read_text().strip()
        secret = (secrets / "metrics_token").read_text().strip()
        assert status(svc.url("/events"), "-I", *bearer(reader)) == 200
        assert status(svc.url("/metrics")) == 401
        assert status(svc.url("/metrics"), *bearer(reader)) == 401  # a reader's is not it
        assert status(svc.url("/healthz")) == 200
        body = curl(*bearer(secret), svc.url("/metrics")).stdout
        lint = subprocess.run(
            ["promtool", "check", "metrics"], input=body, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        prom = Prometheus(
            tmp_path,
            f"127.0.0.1:{svc.port}",
            config_name="prometheus-auth.yml",
            swap={
                "/run/secrets/ringstream_metrics_token": str(
                    files["/run/secrets/ringstream_metrics_token"]
                )
            },
        )
        try:
            wait_for("an authorized scrape", lambda: prom.query('up{job="ringstream"} == 1'))
            assert prom.value('ringstream_auth_enabled{job="ringstream"}') == 1
        finally:
            prom.close()
        assert metrics(svc, secret)['ringstream_auth_failures_total{reason="metrics"}'] == 2
        assert svc.errors() == []


def test_login_takes_the_metrics_token_into_a_cookie_only_metrics_reads(tmp_path: Path) -> None:
    """For the page's charts: POST /login with metrics_token sets its own
    HttpOnly cookie, which /metrics takes and nothing else does. Works with
    auth.mode none too, where the metrics token is the only one."""
    secret = "rs_" + "m" * 40
    digest = hashlib.sha256(secret.encode()).hexdigest()
    config = BASE_CONFIG + SYNTHETIC + f'\n[auth]\nmetrics_token = "sha256:{digest}"\n'
    with Service(tmp_path, config) as svc:
        jar = tmp_path / "jar"
        assert status(svc.url("/login"), "-X", "POST", "-d", "metrics_token=rs_wrong") == 401
        r = curl(
            "-i", "-c", str(jar), "-X", "POST", "-d", f"metrics_token={secret}", svc.url("/login")
        )
        head = r.stdout.lower()
        assert "set-cookie: ringstream_metrics_token=" in head and "httponly" in head
        assert "samesite=strict" in head
        assert status(svc.url("/metrics")) == 401
        assert status(svc.url("/metrics"), "-b", str(jar)) == 200
        # the metrics cookie is not a subscriber's token (here none is needed)
        cookie = f"Cookie: ringstream_metrics_token={secret}"
        assert status(svc.url("/metrics"), "-H", "Cookie: ringstream_metrics_token=rs_x") == 401
        assert status(svc.url("/metrics"), "-H", cookie) == 200
        r = curl("-i", "-b", str(jar), "-X", "POST", svc.url("/logout"))
        assert "ringstream_metrics_token=;" in r.stdout.replace('=""', "=")
        assert metrics(svc, secret)['ringstream_auth_failures_total{reason="metrics"}'] == 3
        assert svc.errors() == []
    with Service(tmp_path, BASE_CONFIG) as svc:  # no metrics token set: no such login
        assert status(svc.url("/login"), "-X", "POST", "-d", f"metrics_token={secret}") == 404


# --- TLS ----------------------------------------------------------------------


def test_tls_serves_curl_with_its_ca_and_reloads_a_renewed_certificate(tmp_path: Path) -> None:
    ca, cert, key = write_cert(tmp_path, "server")
    token, entry = new_token(tmp_path, "reader")
    tls = f'\n[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    with Service(tmp_path, token_config(tmp_path, [entry], extra=tls)) as svc:
        url = f"https://127.0.0.1:{svc.port}"
        assert status(f"{url}/healthz", "--cacert", str(ca)) == 200
        assert curl(f"{url}/healthz").returncode == 60  # no CA: not trusted
        assert status(f"{url}/query", "--cacert", str(ca)) == 401
        assert status(f"{url}/events", "-I", "--cacert", str(ca), *bearer(token)) == 200
        # the certificate renewed in place (a new CA, as a rotation may be)
        ca2, cert2, key2 = write_cert(tmp_path, "renewed")
        cert.write_bytes(cert2.read_bytes())
        key.write_bytes(key2.read_bytes())
        svc.proc.send_signal(signal.SIGHUP)
        svc.wait_log("reload")
        assert status(f"{url}/healthz", "--cacert", str(ca2)) == 200
        assert curl("--cacert", str(ca), f"{url}/healthz").returncode == 60
        assert svc.errors() == []


def test_mutual_tls_wants_a_client_certificate(tmp_path: Path) -> None:
    ca, cert, key = write_cert(tmp_path, "server")
    client_ca, client_cert, client_key = write_cert(tmp_path, "client", client=True)
    tls = f'\n[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_client_ca = "{client_ca}"\n'
    with Service(tmp_path, BASE_CONFIG + tls + SYNTHETIC) as svc:
        url = f"https://127.0.0.1:{svc.port}/healthz"
        assert curl("--cacert", str(ca), url).returncode != 0
        with_cert = ("--cert", str(client_cert), "--key", str(client_key))
        assert status(url, "--cacert", str(ca), *with_cert) == 200
        # the client CA replaced: a reload stops trusting the old one
        new_ca, new_cert, new_key = write_cert(tmp_path, "client2", client=True)
        client_ca.write_bytes(new_ca.read_bytes())
        svc.proc.send_signal(signal.SIGHUP)
        svc.wait_log("reload")
        assert curl("--cacert", str(ca), *with_cert, url).returncode != 0
        renewed = ("--cert", str(new_cert), "--key", str(new_key))
        assert status(url, "--cacert", str(ca), *renewed) == 200


def test_tokens_over_plain_http_beyond_loopback_warn(tmp_path: Path) -> None:
    _, entry = new_token(tmp_path, "reader")
    config = token_config(tmp_path, [entry])
    with Service(tmp_path, config, "--host", "0.0.0.0") as svc:
        warning = svc.wait_log("auth_warning")
        assert warning["level"] == "warning" and "clear text" in warning["msg"]
