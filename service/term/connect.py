"""What tail and top share: the service's address, the token, TLS."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

DEFAULT_URL = "http://localhost:8080"
TOKEN_ENV = "RINGSTREAM_TOKEN"


class UsageError(Exception):
    """A bad option: the message says which (exit status 2)."""


@dataclass(frozen=True)
class Target:
    base: str  # scheme://host:port[/prefix], no trailing slash
    headers: dict[str, str]
    ssl: ssl.SSLContext | bool

    def url(self, path: str) -> str:
        return self.base + path


def target(
    url: str | None, token: str | None, token_file: str | None, cacert: str | None
) -> Target:
    """The service at `url` (default localhost:8080; a bare host:port is
    http://), with the token from --token, --token-file or $RINGSTREAM_TOKEN."""
    base = (url or DEFAULT_URL).rstrip("/")
    if "://" not in base:
        base = "http://" + base
    scheme = base.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise UsageError(f"URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise UsageError(f"--token-file {token_file}: {e.strerror}") from None
    token = token or os.environ.get(TOKEN_ENV) or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ctx: ssl.SSLContext | bool = True
    if cacert:
        try:
            ctx = ssl.create_default_context(cafile=cacert)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--cacert {cacert}: {e}") from None
    return Target(base, headers, ctx)


def add_target_options(p: object) -> None:
    add = p.add_argument  # type: ignore[attr-defined]
    add("url", nargs="?", metavar="URL", help=f"the service (default {DEFAULT_URL})")
    add("--token", help=f"bearer token (default: ${TOKEN_ENV}); never logged")
    add("--token-file", metavar="FILE", help="read the token from FILE")
    add("--cacert", metavar="FILE", help="CA bundle to trust for https:// (as curl's)")
