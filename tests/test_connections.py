"""End to end, what a connection may do before and around its requests: the
WebSocket Origin check (and CORS for allowed pages), the header and idle
timeouts, server.max_connections, malformed requests; each refusal counted,
none logged at error level."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import orjson
import pytest
from servicectl import BASE_CONFIG, Service, http_get

NO_SOURCES = "sources = []\n"
WS_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def rejected(svc: Service) -> dict[str, float]:
    status, body = http_get(svc.url("/metrics"))
    assert status == 200
    prefix = 'ringstream_http_rejected_requests_total{reason="'
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            key, _, value = line.rpartition(" ")
            out[key[len(prefix) : -2]] = float(value)
    return out


def raw(port: int, data: bytes, *, timeout: float = 30) -> bytes:
    """Send `data`, read until the service closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


async def ws_status(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """The handshake's status and body, with these headers."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={**WS_UPGRADE, **headers}) as r,
    ):
        body = "" if r.status == 101 else await r.text()
        return r.status, body


def test_websocket_origin_is_checked_against_allowed_origins(tmp_path: Path) -> None:
    with Service(tmp_path, NO_SOURCES + BASE_CONFIG) as svc:
        url = svc.url("/ws")
        own = f"http://127.0.0.1:{svc.port}"
        # non-browser clients (no Origin) and the service's own pages
        assert asyncio.run(ws_status(url, {}))[0] == 101
        assert asyncio.run(ws_status(url, {"Origin": own}))[0] == 101
        status, body = asyncio.run(ws_status(url, {"Origin": "http://evil.example"}))
        assert status == 403
        assert "http://evil.example" in body and "server.allowed_origins" in body
        # DNS rebinding: evil.example resolved to 127.0.0.1 is "same origin"
        # by its Host header, but no loopback name
        rebound = f"evil.example:{svc.port}"
        status, _ = asyncio.run(ws_status(url, {"Origin": f"http://{rebound}", "Host": rebound}))
        assert status == 403
        # a cross-origin read of the stream or a POST: refused as well
        status, _ = http_get_with(svc.url("/query"), {"Origin": "https://evil.example"})
        assert status == 403
        assert rejected(svc)["origin"] == 3

        # allowed by a reload: the page connects, and gets CORS headers
        page = "http://dash.example:3000"
        svc.config_path.write_text(
            NO_SOURCES + BASE_CONFIG + f'\n[server]\nallowed_origins = ["{page}/"]\n'
        )
        status, body = post(svc.url("/-/reload"))
        assert status == 200, body
        assert asyncio.run(ws_status(url, {"Origin": page}))[0] == 101
        status, headers = head_with(svc.url("/events"), {"Origin": page})
        assert status == 200
        assert headers.get("Access-Control-Allow-Origin") == page
        preflight = asyncio.run(
            request(
                "OPTIONS",
                svc.url("/events"),
                {"Origin": page, "Access-Control-Request-Headers": "last-event-id"},
            )
        )
        assert preflight[0] == 204
        assert "Last-Event-ID" in preflight[1]["Access-Control-Allow-Headers"]
        assert asyncio.run(ws_status(url, {"Origin": "http://evil.example"}))[0] == 403
        assert rejected(svc)["origin"] == 4
        assert svc.errors() == []


async def request(
    method: str, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def http_get_with(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    status, _, body = asyncio.run(request("GET", url, headers))
    return status, body


def head_with(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    status, h, _ = asyncio.run(request("HEAD", url, headers))
    return status, h


def post(url: str) -> tuple[int, bytes]:
    status, _, body = asyncio.run(request("POST", url, {}))
    return status, body


def test_allowed_origins_must_be_origins(tmp_path: Path) -> None:
    from servicectl import run_cli

    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nallowed_origins = ["https://dash.example/path"]\n')
    r = run_cli("serve", "--config", str(cfg))
    assert r.returncode != 0
    assert "server.allowed_origins[0]" in r.stderr and "/path" in r.stderr


LIMITS = """
[server]
header_timeout = 0.5
idle_timeout = 0.5
"""


def test_header_and_idle_timeouts_close_silent_connections(tmp_path: Path) -> None:
    with Service(tmp_path, NO_SOURCES + BASE_CONFIG + LIMITS) as svc:
        # a subscriber keeps its stream however long it lasts
        with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sub:
            sub.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            svc.wait_log("subscriber_connect", subscriber=1)
            # nothing at all, then half a request head: 408, closed
            silent = raw(svc.port, b"")
            assert silent.startswith(b"HTTP/1.1 408 ")
            assert b"server.header_timeout" in silent
            half = raw(svc.port, b"GET /events HTTP/1.1\r\nHost: x\r\n")
            assert half.startswith(b"HTTP/1.1 408 ")
            # a keep-alive connection idle after its response: closed, no answer
            idle = raw(svc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.startswith(b"HTTP/1.1 200 ") and idle.count(b"HTTP/1.1") == 1
            assert rejected(svc)["header_timeout"] == 2
            # the subscriber is still connected, well past both timeouts
            assert not [e for e in svc.logs if e.get("event") == "subscriber_disconnect"]
        svc.wait_log("subscriber_disconnect", subscriber=1)
        assert svc.errors() == []


def test_max_connections_refuses_with_503_and_recovers(tmp_path: Path) -> None:
    config = NO_SOURCES + BASE_CONFIG + "\n[server]\nmax_connections = 3\n"
    with Service(tmp_path, config) as svc:
        subs = []
        for i in range(1, 4):
            s = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
            s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            svc.wait_log("subscriber_connect", subscriber=i)
            subs.append(s)
        refused = raw(svc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 1" in head
        assert "server.max_connections (3)" in orjson.loads(body)["error"]
        subs.pop().close()
        svc.wait_log("subscriber_disconnect", subscriber=3)
        # room again: the probe is served (a connection may still be closing)
        status, _ = http_get(svc.url("/healthz"))
        assert status == 200
        for s in subs:
            s.close()
        for i in (1, 2):
            svc.wait_log("subscriber_disconnect", subscriber=i)
        # (the probe's connection may not be closed yet: two are free)
        assert rejected(svc)["max_connections"] == 1
        warned = svc.wait_log("http_rejected", reason="max_connections")
        assert warned["level"] == "warning"
        assert svc.errors() == []


MALFORMED = [
    b"GARBAGE / HTTP/1.1\r\n\r\n",
    b"GET /events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /events HTTP/1.1\r\nBad Header\r\n\r\n",
    b"POST /-/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS on the HTTP port
    b"GET /\x00 HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("rounds", [20])
def test_malformed_requests_and_disconnects_are_counted_not_errors(
    tmp_path: Path, rounds: int
) -> None:
    with Service(tmp_path, NO_SOURCES + BASE_CONFIG) as svc:
        for _ in range(rounds):
            for payload in MALFORMED:
                assert raw(svc.port, payload).startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
            # gone mid-stream and mid-handshake
            s = socket.create_connection(("127.0.0.1", svc.port))
            s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        svc.wait_log("subscriber_disconnect", subscriber=rounds)
        assert rejected(svc)["malformed"] == rounds * len(MALFORMED)
        entry = svc.wait_log("http_rejected", reason="malformed")
        assert entry["level"] == "info" and entry["error"]
        assert svc.errors() == []
