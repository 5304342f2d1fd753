"""End to end: the real service, a plugin worker writing 2,000 known records,
and real clients: curl for NDJSON, aiohttp for SSE and WebSocket, promtool
for the metrics."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from servicectl import BASE_CONFIG, Service, plugin_source

N = 2000


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("svc")
    with Service(tmp, BASE_CONFIG + plugin_source(N)) as s:
        # the history keeps all N records: every test can start from=0
        yield s
        assert s.terminate() == 0
        assert s.errors() == []


def curl_lines(url: str, n: int) -> list[dict[str, object]]:
    """The first n NDJSON lines `curl -N` prints for url."""
    proc = subprocess.Popen(["curl", "-N", "-s", "--max-time", "60", url], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = []
    try:
        for line in proc.stdout:
            out.append(orjson.loads(line))
            if len(out) == n:
                break
    finally:
        proc.kill()
        proc.wait()
    return out


def seqs(records: list[dict[str, object]]) -> list[object]:
    return [r["seq"] for r in records]


def test_ndjson_with_curl_streams_every_record_once_in_order(svc: Service) -> None:
    records = curl_lines(svc.url("/events?from=0"), N)
    assert seqs(records) == list(range(N))
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == N
    first = records[0]
    assert first["type"] == "synthetic" and first["level"] == "debug"
    assert first["label"] == "test" and first["token"] == "0000000000000000"
    assert isinstance(first["ts_ns"], int) and first["ts_ns"] > 0


def test_ndjson_from_a_position_starts_there(svc: Service) -> None:
    all_ = curl_lines(svc.url("/events?from=0"), N)
    mid = all_[1234]["id"]
    assert seqs(curl_lines(svc.url(f"/events?from={mid}"), 10)) == list(range(1234, 1244))


def test_filters_type_field_prefix_and_sample(svc: Service) -> None:
    warn = curl_lines(svc.url("/events?from=0&type=synthetic&field.level=warn"), N // 4)
    assert seqs(warn) == list(range(2, N, 4))
    sampled = curl_lines(svc.url("/events?from=0&sample=10"), N // 10)
    assert seqs(sampled) == list(range(0, N, 10))
    prefix = curl_lines(svc.url("/events?from=0&field.label=te*&field.seq=7"), 1)
    assert seqs(prefix) == [7]


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("type=bad!name", "type"),
        ("field.a..b=1", "field.a..b"),
        ("sample=0", "sample"),
        ("from=-3", "from"),
        ("format=xml", "format"),
        ("bogus=1", "bogus"),
    ],
)
def test_bad_stream_parameters_get_400_naming_them(svc: Service, query: str, names: str) -> None:
    r = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", svc.url(f"/events?{query}")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "400"
    assert names in orjson.loads(body)["error"]


async def read_sse(resp: aiohttp.ClientResponse, n: int) -> list[tuple[str | None, str, dict]]:
    """n events as (id, event type, data) from an SSE response."""
    events: list[tuple[str | None, str, dict]] = []
    ev_id, ev_type, data = None, "message", []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line == "":
            if data:
                events.append((ev_id, ev_type, orjson.loads("\n".join(data))))
                if len(events) == n:
                    return events
            ev_id, ev_type, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(": ")
            if field == "id":
                ev_id = value
            elif field == "event":
                ev_type = value
            elif field == "data":
                data.append(value)
    raise AssertionError(f"stream ended after {len(events)} events")


async def test_sse_resumes_after_last_event_id(svc: Service) -> None:
    async with aiohttp.ClientSession() as http:
        headers = {"Accept": "text/event-stream"}
        async with http.get(svc.url("/events?from=0"), headers=headers) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await read_sse(resp, 500)
        assert [d["seq"] for _, _, d in first] == list(range(500))
        # SSE ids carry this run's epoch: EPOCH-ID
        epoch = resp.headers["Ringstream-Epoch"]
        assert all(i == f"{epoch}-{d['id']}" for i, _, d in first)
        last_id = first[-1][0]
        assert last_id is not None
        headers["Last-Event-ID"] = last_id
        async with http.get(svc.url("/events"), headers=headers) as resp:
            rest = await read_sse(resp, N - 500)
        assert [d["seq"] for _, _, d in rest] == list(range(500, N))
        # the query-string form, for clients that cannot set headers
        async with http.get(svc.url(f"/events?format=sse&last_event_id={last_id}")) as resp:
            again = await read_sse(resp, 1)
        assert again[0][2]["seq"] == 500


async def test_websocket_batches_and_filter_messages(svc: Service) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(svc.ws_url("/ws?from=0&batch=300")) as ws:
            got: list[dict] = []
            while len(got) < N:
                frame = await ws.receive_json(timeout=30)
                assert isinstance(frame, list) and 1 <= len(frame) <= 300
                got.extend(frame)
            assert seqs(got) == list(range(N))
            await ws.send_str("not json")
            err = await ws.receive_json(timeout=30)
            assert err["type"] == "error" and "not JSON" in err["error"]
            await ws.send_json({"filter": {"type": ["no pe"]}})
            err = await ws.receive_json(timeout=30)
            assert err["type"] == "error" and "no pe" in err["error"]
            await ws.send_json({"filter": {"type": ["synthetic"], "field.level": "info"}})
            ack = await ws.receive_json(timeout=30)
            assert ack == {
                "type": "filter",
                "filter": {"type": ["synthetic"], "field.level": "info"},
            }
        async with http.ws_connect(svc.ws_url("/ws?from=0&field.level=error")) as ws:
            one = await ws.receive_json(timeout=30)
            assert isinstance(one, dict) and one["seq"] == 3  # one object per frame


async def test_websocket_bad_batch_is_refused_before_upgrade(svc: Service) -> None:
    async with aiohttp.ClientSession() as http, http.get(svc.url("/ws?batch=0")) as resp:
        assert resp.status == 400
        assert "batch" in (await resp.json())["error"]


async def test_query_health_ready_and_landing(svc: Service) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(svc.url("/query")) as resp:
            q = await resp.json()
        for key in ("avail_data", "ring_size", "consumer_pos", "producer_pos"):
            assert isinstance(q[key], int)
        assert q["ring_size"] == 1 << 20 and q["submitted"] == N
        assert q["producer_pos"] >= q["consumer_pos"]
        async with http.get(svc.url("/healthz")) as resp:
            assert resp.status == 200
        async with http.get(svc.url("/readyz")) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ready"
        async with http.get(svc.url("/")) as resp:
            text = await resp.text()
        for path in ("/events", "/ws", "/query", "/healthz", "/readyz", "/metrics"):
            assert path in text


METRICS = [
    "ringstream_ring_size_bytes",
    "ringstream_ring_available_bytes",
    "ringstream_ring_consumer_position_bytes_total",
    "ringstream_ring_producer_position_bytes_total",
    'ringstream_records_total{outcome="submitted"}',
    'ringstream_records_total{outcome="discarded"}',
    'ringstream_records_total{outcome="abandoned"}',
    'ringstream_reserve_failures_total{source="plugin"}',
    'ringstream_reserve_failures_total{source="external"}',
    "ringstream_wakeups_total",
    'ringstream_subscribers{transport="ndjson"}',
    'ringstream_subscriber_dropped_records_total{transport="ws"}',
    'ringstream_subscriber_disconnects_total{reason="slow"}',
    'ringstream_worker_restarts_total{source="plugin"}',
    "ringstream_delivery_latency_seconds_bucket",
    "ringstream_build_info",
]


def test_metrics_pass_promtool_and_read_the_ring_live(svc: Service, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed: scripts/setup --test"
    curl_lines(svc.url("/events?from=0"), N)  # some deliveries, for the latency histogram
    text = subprocess.run(
        ["curl", "-s", svc.url("/metrics")], capture_output=True, check=True, timeout=30
    ).stdout
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    body = text.decode()
    for name in METRICS:
        assert name in body, name
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    assert values['ringstream_records_total{outcome="submitted"}'] == N
    assert values["ringstream_ring_size_bytes"] == 1 << 20
    assert values["ringstream_delivery_latency_seconds_count"] > 0


def test_an_idle_ndjson_client_that_leaves_is_noticed(svc: Service) -> None:
    # its filter matches nothing, so no write ever fails; the heartbeat
    # (1 s here) finds the closed connection
    proc = subprocess.Popen(["curl", "-N", "-s", svc.url("/events?type=raw&sample=7")])
    connect = svc.wait_log("subscriber_connect", filter={"type": ["raw"], "sample": 7})
    proc.kill()
    proc.wait()
    gone = svc.wait_log("subscriber_disconnect", subscriber=connect["subscriber"])
    assert gone["reason"] == "client"
