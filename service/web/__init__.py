"""The live web page: GET / for a browser (Accept: text/html), its assets
under /static/, every one from the package (no CDN, no build step).

Assets are read and gzipped once at start; each URL carries its content's
hash (?v=), so they are cached for a year as immutable, while the page
itself is revalidated (no-cache, ETag). static/vendor/ holds uPlot, as
vendor.sh fetched it from npm.
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gz: bytes
    content_type: str
    etag: str


def _asset(body: bytes, name: str) -> Asset:
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    return Asset(
        body, gzip.compress(body, 9, mtime=0), ctype, hashlib.sha256(body).hexdigest()[:16]
    )


def load() -> tuple[Asset, dict[str, Asset]]:
    assets = {
        str(p.relative_to(STATIC)): _asset(p.read_bytes(), p.name)
        for p in STATIC.rglob("*")
        if p.is_file() and p.name != "index.html"
    }
    html = (STATIC / "index.html").read_text()
    html = re.sub(r"\{\{v:([^}]+)\}\}", lambda m: assets[m.group(1)].etag, html)
    return _asset(html.encode(), "index.html"), assets


def _send(
    request: web.Request, a: Asset, cache: str, extra: dict[str, str], vary: str = "Accept-Encoding"
) -> web.Response:
    # each encoding its own tag: a cache must not answer one with the other
    gz = "gzip" in request.headers.get("Accept-Encoding", "")
    etag = f'"{a.etag}-gz"' if gz else f'"{a.etag}"'
    headers = {"ETag": etag, "Cache-Control": cache, "Vary": vary, **extra}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    if gz:
        headers["Content-Encoding"] = "gzip"
        return web.Response(
            body=a.gz, content_type=None, headers={**headers, "Content-Type": a.content_type}
        )
    return web.Response(body=a.body, headers={**headers, "Content-Type": a.content_type})


class Page:
    def __init__(self) -> None:
        self.index, self.assets = load()

    def wants(self, request: web.Request) -> bool:
        return "text/html" in request.headers.get("Accept", "")

    def page(self, request: web.Request) -> web.Response:
        # / is the page or the text index by Accept: caches must keep both
        return _send(request, self.index, "no-cache", PAGE_HEADERS, "Accept, Accept-Encoding")

    async def static(self, request: web.Request) -> web.Response:
        a = self.assets.get(request.match_info["name"])
        if a is None:
            raise web.HTTPNotFound(text="no such asset\n")
        return _send(request, a, "public, max-age=31536000, immutable", HEADERS)
