"""Which web pages may talk to the service: the Origin check.

A browser sends Origin on every WebSocket handshake and every cross-origin
request, and a page cannot forge it. Without the check any page a local
user opens could read ws://localhost:8080/ws, every command line on the
machine. Allowed, in order:

- no Origin header: not a browser (curl, a WebSocket library, Prometheus);
- the same origin as the request (scheme and Host), except that on a
  loopback listener the Host must be a loopback name too (localhost, 127.x,
  [::1]): a page on evil.example that re-binds its DNS name to 127.0.0.1 is
  "same origin" by Host, but not by name;
- an entry of server.allowed_origins ("https://dash.example:8443", "null",
  or "*" for any): these pages also get the CORS headers that let them read
  /events, /query and /metrics.

Anything else is refused with a 403 naming the origin and the setting.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import hdrs, web

from service.guard import Rejections

DEFAULT_PORTS = {"http": 80, "https": 443}
# what a cross-origin EventSource or fetch sends that is not CORS-safelisted
# (Authorization: a page that sends its bearer token, with auth on)
ALLOW_HEADERS = "Last-Event-ID, Accept, Authorization"
ALLOWED_KEY = "ringstream.cross_origin"
# an origin listed by name (not by "*") may send credentials (the cookie)
CREDENTIALS_KEY = "ringstream.cross_origin_credentials"


def normalize(origin: str) -> str | None:
    """scheme://host[:port], lower case, the default port dropped; None if not one."""
    if origin == "null":
        return origin
    try:
        u = urlsplit(origin)
        port = u.port
    except ValueError:
        return None
    if u.scheme not in DEFAULT_PORTS or not u.hostname or u.path not in ("", "/"):
        return None
    if u.query or u.fragment or u.username or u.password:
        return None
    host = u.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[u.scheme]:
        return f"{u.scheme}://{host}"
    return f"{u.scheme}://{host}:{port}"


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OriginPolicy:
    def __init__(self, rejections: Rejections, server: Mapping[str, Any]) -> None:
        self.rejections = rejections
        self.configure(server)

    def configure(self, server: Mapping[str, Any]) -> None:
        """At start and on reload."""
        self.allowed: Sequence[str] = server["allowed_origins"]
        self.any = "*" in self.allowed
        self.loopback = is_loopback_host(server["host"])

    def _same_origin(self, origin: str, request: web.Request) -> bool:
        host = request.host
        if self.loopback:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback_host(name):
                return False
        return origin == normalize(f"{request.scheme}://{host}")

    def cross_origin(self, origin: str, request: web.Request) -> bool | None:
        """False: same origin; True: allowed from elsewhere; None: refused."""
        n = normalize(origin)
        if n is not None and self._same_origin(n, request):
            return False
        if self.any or (n is not None and n in self.allowed):
            return True
        return None

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return await handler(request)
        cross = self.cross_origin(origin, request)
        if cross is None:
            self.rejections.add(
                "origin", "origin not allowed", origin=origin[:200], path=request.path
            )
            body = {
                "error": f"origin {origin!r} is not allowed: pages on it need an entry "
                "in server.allowed_origins"
            }
            raise web.HTTPForbidden(
                text=orjson.dumps(body).decode() + "\n", content_type="application/json"
            )
        if cross:
            request[ALLOWED_KEY] = origin
            request[CREDENTIALS_KEY] = normalize(origin) in self.allowed
            if request.method == "OPTIONS":
                # a CORS preflight (Last-Event-ID on an EventSource reconnect)
                return web.Response(
                    status=204,
                    headers={
                        "Access-Control-Allow-Methods": "GET, HEAD, POST",
                        "Access-Control-Allow-Headers": ALLOW_HEADERS,
                        "Access-Control-Max-Age": "600",
                    },
                )
        return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streams get their headers here, before the first byte."""
    origin = request.get(ALLOWED_KEY)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        if request.get(CREDENTIALS_KEY):
            response.headers["Access-Control-Allow-Credentials"] = "true"
