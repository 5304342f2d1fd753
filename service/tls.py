"""TLS for a standalone service: server.tls_cert, tls_key, tls_client_ca.

The listener keeps one SSLContext for its life, but every handshake is
moved (in the SNI callback, which OpenSSL calls for every ClientHello, with
or without a server name) onto the context of the files as they were at
the last reload. A reload builds a fresh context rather than loading into
the running one: loading adds to a context's trust store and never takes
out, so a client CA removed from tls_client_ca would stay trusted.
Connections already open keep what they were made with; a context that
cannot be built refuses the reload, and the running one stays.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from service.settings import ConfigError


def build(server: Mapping[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(server["tls_cert"], server["tls_key"])
    except FileNotFoundError as e:
        raise ConfigError(f"server.tls_cert, server.tls_key: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"server.tls_cert, server.tls_key: cannot load {server['tls_cert']} with "
            f"{server['tls_key']}: {e}"
        ) from None
    if server["tls_client_ca"]:
        try:
            ctx.load_verify_locations(server["tls_client_ca"])
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                f"server.tls_client_ca: cannot load {server['tls_client_ca']}: {e}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Tls:
    def __init__(self, server: Mapping[str, Any]) -> None:
        self.current = build(server)
        # what the listener was made with: its verify mode holds for every
        # handshake (OpenSSL keeps it when the context is switched), so
        # tls_client_ca on or off needs a restart, as its path does
        self.listener = build(server)
        self.listener.sni_callback = self._switch

    def _switch(self, conn: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        conn.context = self.current


def context(server: Mapping[str, Any]) -> Tls | None:
    """The listener's TLS from [server], or None when TLS is off."""
    return Tls(server) if server["tls_cert"] else None


def check(server: Mapping[str, Any]) -> ssl.SSLContext | None:
    """A context of the files as they are now (a reload swaps it in as
    Tls.current), or None when TLS is off; ConfigError if they do not load."""
    return build(server) if server["tls_cert"] else None
