"""Bad input to the real service (issue 12): every bad value is a 400 (or a
WebSocket error frame) naming the parameter, never a broken stream, a 500 or
a traceback in the log; HEAD /events is headers only."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from servicectl import BASE_CONFIG, Service, plugin_source

N = 50
U64_MAX = (1 << 64) - 1
HUGE = "99999999999999999999999"
RAW_TRICKLE = """
[[sources]]
kind = "synthetic"
rate = 100
mix = { raw = 1.0 }
"""


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("svc")
    # the plugin's N known records, then a steady trickle of raw ones
    with Service(
        tmp, BASE_CONFIG.replace("count = 1", "count = 2") + plugin_source(N) + RAW_TRICKLE
    ) as s:
        yield s
        assert s.terminate() == 0
        assert s.errors() == []


@pytest.fixture(autouse=True)
def no_new_errors(svc: Service) -> Iterator[None]:
    """Each test leaves no error or traceback in the service's log."""
    before = len(svc.lines)
    yield
    time.sleep(0.2)  # a failing stream logs right after the response
    new = svc.lines[before:]
    bad = [li for li in svc.errors() if li in new]
    assert bad == [], "\n".join(bad)


async def get_400(svc: Service, path: str, headers: dict[str, str] | None = None) -> str:
    """The error message of a GET that must be a 400 with a JSON body."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(svc.url(path), headers=headers) as resp,
    ):
        assert resp.status == 400, (resp.status, await resp.content.read(200))
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert set(body) == {"error"}
        return body["error"]


@pytest.mark.parametrize(
    ("path", "header", "name"),
    [
        (f"/events?from={HUGE}", None, "from"),
        (f"/events?from={U64_MAX + 1}", None, "from"),
        (f"/events?last_event_id={HUGE}", None, "last_event_id"),
        ("/events", HUGE, "Last-Event-ID"),
        (f"/events?format=sse&from={HUGE}", None, "from"),
        (f"/ws?from={HUGE}", None, "from"),
        (f"/ws?last_event_id={HUGE}", None, "last_event_id"),
    ],
)
async def test_resume_id_beyond_64_bits_is_a_400(
    svc: Service, path: str, header: str | None, name: str
) -> None:
    headers = {"Last-Event-ID": header} if header else None
    err = await get_400(svc, path, headers)
    assert err.startswith(f"{name}: must be an integer from 0 to {U64_MAX}, got '"), err


async def test_websocket_with_a_huge_resume_id_is_refused_before_upgrade(svc: Service) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(svc.ws_url(f"/ws?from={HUGE}"))
        assert e.value.status == 400


async def test_the_largest_ids_still_resume(svc: Service) -> None:
    # past the end of the history: a gap marker, then every record there is
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for q in (f"from={U64_MAX}", f"last_event_id={U64_MAX}"):
            async with http.get(svc.url(f"/events?type=synthetic&{q}")) as resp:
                assert resp.status == 200
                first = orjson.loads(await resp.content.readline())
                assert first["type"] == "gap" and first["reason"] == "unknown_id"
                assert orjson.loads(await resp.content.readline())["seq"] == 0


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/ws?batch=%C2%B2", "batch"),  # superscript two: str.isdigit() says yes
        ("/ws?batch=%D9%A3", "batch"),  # Arabic-Indic three: int() reads 3
        ("/ws?batch=1_0", "batch"),
        ("/events?from=%D9%A3", "from"),
        ("/events?from=1_0", "from"),
        ("/events?from=%C2%B2", "from"),
        ("/events?from=+5", "from"),
        ("/events?from=%205", "from"),
        ("/events?last_event_id=1_0", "last_event_id"),
        ("/ws?from=%D9%A3", "from"),
        ("/events?sample=%D9%A3", "sample"),
        ("/events?sample=1_0", "sample"),
        ("/events?sample=%C2%B2", "sample"),
        (f"/events?sample={HUGE}", "sample"),
        ("/ws?sample=1_0", "sample"),
    ],
)
async def test_integers_are_ascii_digits_only(svc: Service, path: str, name: str) -> None:
    err = await get_400(svc, path)
    assert err.startswith(f"{name}: must be an integer"), err


async def test_last_event_id_header_is_ascii_digits_only(svc: Service) -> None:
    err = await get_400(svc, "/events", {"Last-Event-ID": "1_0"})
    assert err.startswith("Last-Event-ID: must be an integer"), err


@pytest.mark.parametrize(
    "bad",
    [
        {"sample": 1e300},
        {"sample": 1234567890123456789012345678901},  # 31 digits: a float to JSON parsers
        {"sample": U64_MAX + 1},
        {"sample": 2.5},
        {"sample": "1_0"},
        {"field.seq": 10**30},
    ],
)
async def test_websocket_bad_filter_value_keeps_the_filter_and_the_connection(
    svc: Service, bad: dict[str, object]
) -> None:
    name = next(iter(bad))
    async with (
        aiohttp.ClientSession() as http,
        # the raw trickle is live: without a filter from the start, a raw
        # record could arrive ahead of the ack
        http.ws_connect(svc.ws_url("/ws?type=synthetic")) as ws,
    ):
        # the plugin's records are all in the past: this filter passes nothing live
        await ws.send_json({"filter": {"type": ["synthetic"]}})
        ack = await ws.receive_json(timeout=10)
        assert ack == {"type": "filter", "filter": {"type": ["synthetic"]}}
        # had this been applied, the raw records would come through
        # stdlib json: orjson refuses the very integers this sends
        await ws.send_str(json.dumps({"filter": {"type": ["raw"], **bad}}))
        err = await ws.receive_json(timeout=10)
        assert err["type"] == "error" and err["error"].startswith(f"{name}: "), err
        with pytest.raises(TimeoutError):
            frame = await ws.receive_json(timeout=0.5)
            pytest.fail(f"the previous filter was replaced: got {frame}")
        # the connection goes on, and takes a good filter
        await ws.send_json({"filter": {"type": ["raw"]}})
        assert await ws.receive_json(timeout=10) == {"type": "filter", "filter": {"type": ["raw"]}}
        assert (await ws.receive_json(timeout=10))["type"] == "raw"


async def test_websocket_sample_in_range_is_echoed(svc: Service) -> None:
    async with (
        aiohttp.ClientSession() as http,
        # connected to a type the raw trickle has none of: no record can come
        # ahead of the ack
        http.ws_connect(svc.ws_url("/ws?type=synthetic")) as ws,
    ):
        await ws.send_json({"filter": {"type": ["raw"], "sample": U64_MAX}})
        ack = await ws.receive_json(timeout=10)
        assert ack == {"type": "filter", "filter": {"type": ["raw"], "sample": U64_MAX}}


def raw_http(port: int, request: bytes, until: bytes, timeout: float = 5) -> bytes:
    """What the server sends for `request` until `until` is seen (or EOF, or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        got = b""
        deadline = time.monotonic() + timeout
        while until not in got and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
        # a moment more: anything streamed after it would show
        s.settimeout(0.5)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        return got


@pytest.mark.parametrize(
    ("query", "headers", "content_type"),
    [
        ("from=0", "", "application/x-ndjson"),
        ("from=0&format=sse", "", "text/event-stream"),
        ("", "Accept: text/event-stream\r\n", "text/event-stream"),
    ],
)
def test_head_events_is_headers_only_and_ends(
    svc: Service, query: str, headers: str, content_type: str
) -> None:
    # HEAD, then GET /healthz on the same connection: the second response
    # comes right after the first's headers only if HEAD sent no body and ended
    req = (
        f"HEAD /events?{query} HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    got = raw_http(svc.port, req, b'{"status": "ok"}')
    head, sep, rest = got.partition(b"\r\n\r\n")
    assert sep, got
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK", got
    fields = {k.lower(): v for k, _, v in (li.partition(": ") for li in lines[1:])}
    assert fields["content-type"].startswith(content_type)
    assert fields["cache-control"] == "no-cache"
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), got  # no body between the two
    assert rest.endswith(b'{"status": "ok"}'), got


def test_head_events_subscribes_nobody(svc: Service) -> None:
    before = len(svc.logs)
    got = raw_http(svc.port, b"HEAD /events?from=0 HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n"), got
    time.sleep(0.3)
    events = [e.get("event") for e in svc.logs[before:]]
    assert "subscriber_connect" not in events, events


async def test_head_events_with_a_bad_parameter_is_a_400(svc: Service) -> None:
    async with aiohttp.ClientSession() as http, http.head(svc.url("/events?from=1_0")) as resp:
        assert resp.status == 400


async def test_get_still_streams_after_the_head(svc: Service) -> None:
    async with aiohttp.ClientSession() as http, http.get(svc.url("/events?from=0")) as resp:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert orjson.loads(line)["id"] == 0  # the oldest record, whichever source wrote it


def test_log_line_with_an_integer_beyond_64_bits_is_written() -> None:
    import logging

    from service.logs import JsonFormatter

    record = logging.makeLogRecord({"msg": "resume", "levelname": "INFO", "id": 10**30})
    assert json.loads(JsonFormatter().format(record))["id"] == 10**30
