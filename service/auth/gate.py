"""The auth middleware: who a request comes from, and whether it may.

Open always: /, /healthz, /readyz, /login, /logout, and the page's assets
(/static/). /metrics wants
auth.metrics_token (or _file) when one is set, as a bearer token or the
cookie /login sets for it. Everything else wants a token (an
`Authorization: Bearer` header, or the cookie /login sets) whose `allow`
holds the route's action: subscribe (/events, /ws, /query), ingest
(/ingest), reload (/-/reload).

Browsers cannot put a header on an EventSource or a WebSocket handshake, so
a page logs in once: POST /login with the token sets it in an HttpOnly,
SameSite=Strict cookie, which EventSource sends again on every reconnect
(a one-time ticket in the URL would not survive the first reconnect, and
would land in proxies' access logs). No token is ever logged: a refusal
logs its reason, the peer, the path and the token's name when it has one.

401 (with WWW-Authenticate, RFC 6750) when there is no valid token, 403
when the token may not do this; neither says which of several tokens came
close. Every refusal is counted by reason in ringstream_auth_failures_total.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import orjson
from aiohttp import hdrs, web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.auth.jwtauth import JwtVerifier, KeyFileError, Refused
from service.auth.scope import Principal
from service.auth.tokens import TokenFile, TokenFileError

log = logging.getLogger("ringstream.auth")

COOKIE = "ringstream_token"
# the metrics token's own cookie, so the page can chart /metrics when it has
# a token of its own without handing that token to script
METRICS_COOKIE = "ringstream_metrics_token"
# RFC 6750's b64token, which every token here is (rs_... and JWTs): anything
# else is refused before it is hashed or parsed
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/-]+=*")
PRINCIPAL = "ringstream.principal"
OPEN = frozenset({"/", "/healthz", "/readyz", "/login", "/logout"})
ACTIONS = {
    "/events": "subscribe",
    "/ws": "subscribe",
    "/query": "subscribe",
    "/ingest": "ingest",
    "/-/reload": "reload",
}
REASONS = (
    "missing",
    "malformed",
    "invalid",
    "expired",
    "not_yet_valid",
    "audience",
    "issuer",
    "signature",
    "algorithm",
    "unknown_key",
    "claim",
    "forbidden",
    "scope",
    "metrics",
)


class AuthConfigError(ValueError):
    """The [auth] files cannot be used; the message names the key."""


class Keys:
    """What [auth] names, read from its files: at start and on every reload,
    so a rotated key or an edited tokens file needs no restart."""

    def __init__(self, auth: Mapping[str, Any]) -> None:
        self.mode: str = auth["mode"]
        self.tokens: TokenFile | None = None
        self.jwt: JwtVerifier | None = None
        try:
            if self.mode == "token":
                self.tokens = TokenFile(auth["tokens_file"])
            elif self.mode == "jwt":
                self.jwt = JwtVerifier(auth)
        except (TokenFileError, KeyFileError) as e:
            raise AuthConfigError(str(e)) from None
        h = auth["metrics_token"]
        self.metrics_hash = bytes.fromhex(h.removeprefix("sha256:")) if h else None
        if auth["metrics_token_file"]:
            self.metrics_hash = _token_file_hash(auth["metrics_token_file"])

    def verify(self, token: str) -> Principal:
        if self.jwt is not None:
            return self.jwt.verify(token)
        assert self.tokens is not None
        p = self.tokens.principal(token)
        if p is None:
            raise Refused("invalid", "invalid token")
        if p.expires is not None and p.expires <= time.time():
            raise Refused("expired", "token expired")
        return p

    def holds(self, p: Principal | None) -> bool:
        """Whether a subscriber accepted before a reload may go on under these keys."""
        if self.mode == "none":
            return True
        if p is None or p.kind != self.mode:
            return False
        if self.tokens is not None:
            return self.tokens.holds(p)
        try:
            q = self.verify(p.key)
        except Refused:
            return False
        return q.scope == p.scope


def _token_file_hash(path: str) -> bytes:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise AuthConfigError(
            f"auth.metrics_token_file: cannot read {path}: {e.strerror}"
        ) from None
    if len(token) < 16:
        raise AuthConfigError(
            f"auth.metrics_token_file: {path}: a token of {len(token)} characters; it needs "
            "at least 16 (ringstream token new makes one)"
        )
    return hashlib.sha256(token.encode()).digest()


def _error(
    cls: type[web.HTTPException], message: str, challenge: str | None = None
) -> web.HTTPException:
    headers = {hdrs.WWW_AUTHENTICATE: challenge} if challenge else None
    return cls(
        text=orjson.dumps({"error": message}).decode() + "\n",
        content_type="application/json",
        headers=headers,
    )


def _cookie(
    resp: web.StreamResponse,
    name: str,
    value: str,
    request: web.Request,
    max_age: int | None,
    path: str,
) -> None:
    resp.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def bearer(request: web.Request) -> str | None:
    """The token a request carries: its Authorization header, else the cookie.
    An Authorization header of another scheme, or a token of characters no
    token has, raises Refused."""
    value = request.headers.get(hdrs.AUTHORIZATION)
    if value is not None:
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Refused("malformed", 'expected "Authorization: Bearer TOKEN"')
    else:
        token = request.cookies.get(COOKIE, "")
        if not token:
            return None
    if len(token) > 16384 or not TOKEN_CHARS.fullmatch(token):
        raise Refused("malformed", "invalid token: not a bearer token's characters")
    return token


class Authenticator(Collector):
    def __init__(self, keys: Keys, base_path: str = "") -> None:
        self.keys = keys
        self.base = base_path  # server.base_path: the paths below are under it
        # the cookies go only to this service's paths, not to the host's others
        self.cookie_path = base_path + "/"
        self.failures: Counter[str] = Counter({r: 0 for r in REASONS})
        self.accepted: Counter[str] = Counter()

    def configure(self, keys: Keys) -> None:
        """On reload: requests from now on are checked against `keys`."""
        self.keys = keys

    @property
    def on(self) -> bool:
        return self.keys.mode != "none"

    def refuse(
        self, reason: str, message: str, peer: str | None, path: str, who: str | None = None
    ) -> None:
        """Count and log a refusal (info: the client's doing); never the token."""
        self.failures[reason] += 1
        log.info(
            message,
            extra={
                "event": "auth_refused",
                "reason": reason,
                "peer": peer,
                "path": path,
                **({"token": who} if who else {}),
            },
        )

    def _unauthorized(self, r: Refused, request: web.Request, presented: bool) -> web.HTTPException:
        self.refuse(r.reason, r.message, request.remote, request.path)
        challenge = 'Bearer realm="ringstream"'
        if presented:
            challenge += ', error="invalid_token"'
        return _error(web.HTTPUnauthorized, r.message, challenge)

    def forbidden(self, reason: str, message: str, request: web.Request) -> web.HTTPException:
        p = request.get(PRINCIPAL)
        self.refuse(reason, message, request.remote, request.path, p.name if p else None)
        challenge = 'Bearer realm="ringstream", error="insufficient_scope"'
        return _error(web.HTTPForbidden, message, challenge)

    def authenticate(self, request: web.Request) -> Principal:
        """The request's principal; raises the 401 to send."""
        try:
            token = bearer(request)
        except Refused as r:
            raise self._unauthorized(r, request, True) from None
        if token is None:
            raise self._unauthorized(
                Refused("missing", "a bearer token is required"), request, False
            )
        try:
            p = self.keys.verify(token)
        except Refused as r:
            raise self._unauthorized(r, request, True) from None
        self.accepted[p.name if p.kind == "token" else "jwt"] += 1
        return p

    def _metrics(self, request: web.Request) -> None:
        want = self.keys.metrics_hash
        if want is None:
            return
        try:
            if hdrs.AUTHORIZATION in request.headers:
                token = bearer(request)
            else:
                token = request.cookies.get(METRICS_COOKIE) or None
        except Refused:
            token = None
        got = hashlib.sha256((token or "").encode()).digest()
        if token is None or not hmac.compare_digest(got, want):
            r = Refused("metrics", "/metrics wants the metrics token (auth.metrics_token)")
            raise self._unauthorized(r, request, token is not None)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if self.base and path.startswith(self.base):
            path = path[len(self.base) :] or "/"
        if path == "/metrics":
            self._metrics(request)
        elif self.on and path not in OPEN and not path.startswith("/static/"):
            # everything not open wants a token, routes added later included
            p = self.authenticate(request)
            request[PRINCIPAL] = p
            action = ACTIONS.get(path, "subscribe")
            if action not in p.scope.allow:
                raise self.forbidden(
                    "forbidden",
                    f"this token may not {action} (its allow: "
                    f"{', '.join(sorted(p.scope.allow)) or 'nothing'})",
                    request,
                )
        return await handler(request)

    # --- the cookie, for browsers ----------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        """POST /login: the token (Authorization: Bearer, a form's `token` or a
        JSON {"token": ...}) checked, then set as an HttpOnly cookie. A
        `metrics_token` field, checked against auth.metrics_token, gets a
        cookie of its own that only /metrics reads."""
        token: str | None = None
        fields: Mapping[str, Any] = {}
        if hdrs.AUTHORIZATION in request.headers:
            try:
                token = bearer(request)
            except Refused as r:
                raise self._unauthorized(r, request, True) from None
        elif request.content_type == "application/json":
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                body = None
            fields = body if isinstance(body, dict) else {}
        else:
            fields = await request.post()
        token = token or fields.get("token")
        mtoken = fields.get("metrics_token")
        if mtoken and not token:
            return self._metrics_login(request, mtoken)
        if not self.on:
            raise _error(web.HTTPNotFound, 'no login: auth.mode is "none"')
        if not isinstance(token, str) or not token:
            raise self._unauthorized(
                Refused("missing", "no token: send it as a bearer token or a `token` field"),
                request,
                False,
            )
        try:
            p = self.keys.verify(token)
        except Refused as r:
            raise self._unauthorized(r, request, True) from None
        self.accepted[p.name if p.kind == "token" else "jwt"] += 1
        resp = web.json_response({"name": p.name, "expires": p.expires, **p.scope.describe()})
        max_age = None if p.expires is None else max(0, int(p.expires - time.time()))
        _cookie(resp, COOKIE, token, request, max_age, self.cookie_path)
        log.info(
            "logged in",
            extra={"event": "auth_login", "token": p.name, "peer": request.remote},
        )
        return resp

    def _metrics_login(self, request: web.Request, token: Any) -> web.Response:
        want = self.keys.metrics_hash
        if want is None:
            raise _error(web.HTTPNotFound, "no metrics login: auth.metrics_token is not set")
        ok = isinstance(token, str) and len(token) <= 16384 and TOKEN_CHARS.fullmatch(token)
        got = hashlib.sha256(token.encode() if ok else b"").digest()
        if not ok or not hmac.compare_digest(got, want):
            r = Refused("metrics", "metrics_token: not the metrics token (auth.metrics_token)")
            raise self._unauthorized(r, request, True)
        resp = web.json_response({"name": "metrics"})
        _cookie(resp, METRICS_COOKIE, token, request, None, self.cookie_path)
        log.info(
            "logged in", extra={"event": "auth_login", "token": "metrics", "peer": request.remote}
        )
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        resp = web.Response(status=204)
        for name in (COOKIE, METRICS_COOKIE):
            if name in request.cookies:
                resp.del_cookie(name, path=self.cookie_path)
        return resp

    def collect(self) -> Iterator[Metric]:
        on = GaugeMetricFamily(
            "ringstream_auth_enabled", "1 when subscribers need a token (auth.mode), else 0."
        )
        on.add_metric([], 1 if self.on else 0)
        yield on
        f = CounterMetricFamily(
            "ringstream_auth_failures",
            "Requests refused by authentication (401) or authorization (403), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self.failures.items()):
            f.add_metric([reason], n)
        yield f
        a = CounterMetricFamily(
            "ringstream_auth_accepted",
            'Requests a token was accepted for, by token name ("jwt" for JSON Web Tokens).',
            labels=["token"],
        )
        for name, n in sorted(self.accepted.items()):
            a.add_metric([name], n)
        yield a
