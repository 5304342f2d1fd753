"""Clients that read nothing cost their own queue, never the loop or the
others (issue 12): the service, on its default subscriber bounds, with 200
WebSocket and 200 NDJSON clients that never read, still answers /healthz,
accepts a new client, and streams every record to a healthy one; WebSocket
frames are right at every length; a stalled WebSocket is dropped as "slow"."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from servicectl import Service, parse_metrics, stalled_socket

STALLED = 200
# the defaults but a 4 MiB ring in memfd, one worker and a quick heartbeat
# (so that stalled WebSockets miss their pong within the test)
CONFIG = """
[ring]
size = "4MiB"
shm_dir = "memfd"

[workers]
count = 1

[subscribers]
heartbeat = 2.0

[[sources]]
kind = "synthetic"
rate = 2000
size = 256
"""


def metrics(svc: Service) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(svc.url("/metrics"), timeout=30) as r:
        return parse_metrics(r.read().decode())


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with Service(tmp_path_factory.mktemp("slow"), CONFIG) as s:
        yield s
        assert s.terminate() == 0
        assert s.errors() == []


async def test_stalled_clients_cost_their_own_queue_only(svc: Service) -> None:
    socks = []
    try:
        for i in range(STALLED):
            socks.append(stalled_socket(svc.port, "/ws", ws=True))
            socks.append(stalled_socket(svc.port, "/events"))
            if i % 50 == 49:  # within the listen backlog
                svc.wait_log("subscriber_connect", subscriber=2 * (i + 1))
        timeout = aiohttp.ClientTimeout(total=60)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.ws_connect(svc.ws_url("/ws?type=synthetic_blob")) as ws,
        ):
            seqs: list[int] = []
            while len(seqs) < 12_000:  # 6 s at 2,000/s: the budget is reached
                msg = await ws.receive(timeout=30)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                rec = orjson.loads(msg.data)
                assert rec["type"] != "gap", f"the healthy client lost records: {rec}"
                seqs.append(rec["seq"])
                if len(seqs) % 3000 == 0:
                    async with http.get(svc.url("/healthz")) as resp:
                        assert resp.status == 200
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        m = metrics(svc)
        # the stalled ones lost records, counted; the WebSockets among them
        # missed their pongs and were dropped as too slow, not as "client"
        dropped = m['ringstream_subscriber_dropped_records_total{transport="ndjson"}']
        assert dropped > 0
        assert m['ringstream_subscriber_disconnects_total{reason="slow"}'] >= STALLED
        assert m['ringstream_subscribers{transport="ndjson"}'] == STALLED
        assert m["ringstream_subscriber_queued_bytes"] <= 256 << 20
        assert m["ringstream_subscriber_budget_dropped_records_total"] > 0
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("size", [64, 200, 70_000])
@pytest.mark.parametrize("batch", ["", "?batch=7"])
async def test_websocket_frames_at_every_length(tmp_path, size: int, batch: str) -> None:
    """Frame headers of 7, 16 and 64-bit lengths, as a real client parses them."""
    config = CONFIG.replace("rate = 2000\nsize = 256", f"rate = 500\nsize = {size}")
    with Service(tmp_path, config) as svc:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(svc.ws_url(f"/ws{batch}"), max_msg_size=1 << 24) as ws,
        ):
            seqs: list[int] = []
            while len(seqs) < 50:
                data = orjson.loads(await ws.receive_str(timeout=30))
                for rec in data if isinstance(data, list) else [data]:
                    seqs.append(rec["seq"])
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert svc.terminate() == 0
