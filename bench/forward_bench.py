"""The edge forwarding to NATS JetStream (issue 13), against a real local
nats-server, beside the service streaming to one local subscriber.

    .venv/bin/python bench/forward_bench.py                 # 20 s at each rate
    .venv/bin/python bench/forward_bench.py --rates 150000 --seconds 10

Printed, all measured in this run on this machine:
  - the peers: nats-py's own `js.publish_async` (acks, Nats-Msg-Id), and a
    core publish without acks, from one process into the same server;
  - per source rate: records/s the service consumed, records/s forwarded
    (acknowledged), drops, the local subscriber's records/s, and lossless
    (every record in the stream once: the stream's count against the
    forwarded count, its Msg-Ids unique).
  - the hub (`serve --from-nats`): its delivery rate to one subscriber
    reading the whole stream from its first record, and the latency a
    record's trip edge -> JetStream -> hub adds, p50/p99 (each record's
    producer timestamp against its arrival, at the edge's own subscriber
    and at the hub's, at --latency-rate).
Nothing here is a threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402
from natsctl import NatsServer, read_stream  # noqa: E402
from servicectl import Service, parse_metrics  # noqa: E402

PAYLOAD = (
    b'{"id":123456,"ts_ns":1796644614432187239,"type":"synthetic","seq":3417,"worker":0,'
    b'"level":"info","value":3.417,"label":"synthetic-0","token":"4d343209f4bc77d2"}'
)

CONFIG = """
[ring]
shm_dir = "memfd"
size = "64MiB"

[workers]
count = 2

[forward]
urls = ["{url}"]
host = "bench"

[[sources]]
kind = "synthetic"
rate = {rate}
size = 64
instances = 2
"""


async def peers(url: str, n: int) -> dict[str, float]:
    import nats

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_stream(name="PEER", subjects=["peer.>"])
    t = time.perf_counter()
    futs = []
    for i in range(n):
        futs.append(await js.publish_async("peer.a", PAYLOAD, headers={"Nats-Msg-Id": f"p-{i}"}))
    await asyncio.gather(*futs)
    acked = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n):
        await nc.publish("core.a", PAYLOAD)
    await nc.flush()
    core = n / (time.perf_counter() - t)
    await js.delete_stream("PEER")
    await nc.close()
    return {"publish_async": acked, "core": core}


def metrics(svc: Service) -> dict[str, float]:
    with urllib.request.urlopen(svc.url("/metrics"), timeout=30) as r:
        return parse_metrics(r.read().decode())


def _count_records(svc: Service) -> list[int]:
    """The local subscriber: `curl -N` on /events, its lines counted into
    got[0] by a thread reading big chunks (a Python reader a line at a time
    would take a third of a core at 150 k/s, from the same 2 CPUs)."""
    got = [0]
    curl = subprocess.Popen(["curl", "-sN", svc.url("/events")], stdout=subprocess.PIPE)
    assert curl.stdout is not None
    fd = curl.stdout.fileno()

    def read() -> None:
        while chunk := os.read(fd, 1 << 20):
            got[0] += chunk.count(b"\n")

    threading.Thread(target=read, daemon=True).start()
    return got


def local_only(tmp: Path, rate: int, seconds: float) -> float:
    """The peer: the local subscriber's rate at this source rate, no forwarding."""
    config = CONFIG.replace('urls = ["{url}"]', "urls = []").replace("{rate}", str(rate))
    with Service(tmp, config) as svc:
        got = _count_records(svc)
        time.sleep(3)
        g0, t0 = got[0], time.monotonic()
        time.sleep(seconds)
        rate_got = (got[0] - g0) / (time.monotonic() - t0)
        assert svc.terminate() == 0
    return rate_got


def run(tmp: Path, nats: NatsServer, rate: int, seconds: float) -> dict[str, float]:
    config = CONFIG.replace("{url}", nats.url).replace("{rate}", str(rate))
    with Service(tmp, config) as svc:
        svc.wait_log("forward_connected")
        got = _count_records(svc)
        time.sleep(3)  # warm-up
        m0, g0, t0 = metrics(svc), got[0], time.monotonic()
        time.sleep(seconds)
        m1, g1, t1 = metrics(svc), got[0], time.monotonic()
        dt = t1 - t0
        assert svc.terminate() == 0
        stopped = svc.wait_log("forward_stopped")

    def rate_of(name: str) -> float:
        # a family's series summed (labels or not)
        def total(m: dict[str, float]) -> float:
            return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))

        return (total(m1) - total(m0)) / dt

    messages = read_stream(nats.url, "RINGSTREAM", stopped["forwarded"], timeout=600)
    ids = {h["Nats-Msg-Id"] for _, _, h, _ in messages}
    return {
        "consumed": rate_of("ringstream_decoded_records_total"),
        "forwarded": (
            m1['ringstream_forward_records_total{outcome="forwarded"}']
            - m0['ringstream_forward_records_total{outcome="forwarded"}']
        )
        / dt,
        "local": (g1 - g0) / dt,
        "dropped": stopped["dropped"],
        "unforwarded": stopped["unforwarded"],
        "in_stream": len(messages),
        "unique": len(ids),
        "forwarded_total": stopped["forwarded"],
        "duplicates": stopped["duplicates"],
    }


HUB = """
[hub]
urls = ["{url}"]
"""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _latencies(url: str, out: list[float], stop: threading.Event) -> None:
    with urllib.request.urlopen(url, timeout=600) as r:
        for line in r:
            if stop.is_set():
                return
            now = time.time_ns()
            i = line.find(b'"ts_ns":')
            if i >= 0:
                ts = int(line[i + 8 : line.index(b",", i)])
                out.append((now - ts) / 1e6)


def hub_run(tmp: Path, nats: NatsServer, rate: int, seconds: float) -> dict[str, float]:
    """The latency edge -> hub at `rate`, then the hub's delivery of the
    whole stream to one subscriber."""
    (tmp / "edge").mkdir(parents=True)
    (tmp / "hub").mkdir()
    config = CONFIG.replace("{url}", nats.url).replace("{rate}", str(rate))
    with Service(tmp / "edge", config) as edge:
        edge.wait_log("forward_connected")
        with Service(tmp / "hub", HUB.replace("{url}", nats.url)) as hub:
            # live first: the hub loads its history from the stream at start
            while True:
                with urllib.request.urlopen(hub.url("/query"), timeout=30) as r:
                    h = orjson.loads(r.read())
                last = asyncio.run(_stream_last(nats.url))
                if h["received"] > 0 and h["last_seq"] >= last - rate // 100:
                    break
                time.sleep(0.2)
            at_edge: list[float] = []
            at_hub: list[float] = []
            stop = threading.Event()
            for url, out in ((edge.url("/events"), at_edge), (hub.url("/events"), at_hub)):
                threading.Thread(target=_latencies, args=(url, out, stop), daemon=True).start()
            time.sleep(2)
            at_edge.clear()
            at_hub.clear()
            time.sleep(seconds)
            stop.set()
            lat = {
                "edge_p50": _pct(at_edge, 0.5),
                "edge_p99": _pct(at_edge, 0.99),
                "hub_p50": _pct(at_hub, 0.5),
                "hub_p99": _pct(at_hub, 0.99),
            }
        assert edge.terminate() == 0
    with Service(tmp / "hub", HUB.replace("{url}", nats.url)) as hub:
        with urllib.request.urlopen(hub.url("/query"), timeout=30) as r:
            want = orjson.loads(r.read())["last_seq"]
        n, t = 0, time.monotonic()
        with urllib.request.urlopen(hub.url("/events?from=1"), timeout=600) as r:
            for _line in r:
                n += 1
                if n >= want:
                    break
        lat["delivery"] = n / (time.monotonic() - t)
        lat["records"] = n
    return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="50000,150000,0", help="source rates; 0 = flat out")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--peer-records", type=int, default=200_000)
    ap.add_argument("--latency-rate", type=int, default=10_000)
    args = ap.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp))
        try:
            p = asyncio.run(peers(nats.url, args.peer_records))
            print(
                f"peers, one process into the same server: js.publish_async (acked, Msg-Id) "
                f"{p['publish_async']:,.0f}/s; core publish (no acks) {p['core']:,.0f}/s"
            )
            for i, rate in enumerate(int(r) for r in args.rates.split(",")):
                d = Path(tmp) / f"run{i}"
                d.mkdir()
                r = run(d, nats, rate, args.seconds)
                (d / "local").mkdir()
                peer = local_only(d / "local", rate, args.seconds)
                lossless = (
                    r["dropped"] == 0 and r["unforwarded"] == 0 and r["unique"] == r["in_stream"]
                )
                print(
                    f"source {'flat out' if rate == 0 else f'{rate:,}/s'}: consumed "
                    f"{r['consumed']:,.0f}/s, forwarded (acked) {r['forwarded']:,.0f}/s "
                    f"= {r['forwarded'] / p['publish_async']:.1f}x publish_async; local "
                    f"subscriber {r['local']:,.0f}/s (without forwarding {peer:,.0f}/s); "
                    f"dropped {r['dropped']}, duplicates "
                    f"{r['duplicates']}, stream {r['in_stream']:,} messages, "
                    f"{'lossless' if lossless else 'NOT lossless'}"
                )
                if i < len(args.rates.split(",")) - 1:
                    asyncio.run(_drop_stream(nats.url))  # each run its own stream
            h = hub_run(Path(tmp) / "hub", nats, args.latency_rate, args.seconds)
            print(
                f"hub: delivered the stream ({h['records']:,} records, from its first) to one "
                f"subscriber at {h['delivery']:,.0f}/s"
            )
            print(
                f"latency at {args.latency_rate:,} records/s, producer to subscriber: at the edge "
                f"p50 {h['edge_p50']:.1f} ms, p99 {h['edge_p99']:.1f} ms; at the hub p50 "
                f"{h['hub_p50']:.1f} ms, p99 {h['hub_p99']:.1f} ms; added edge -> hub p50 "
                f"{h['hub_p50'] - h['edge_p50']:.1f} ms, p99 {h['hub_p99'] - h['edge_p99']:.1f} ms"
            )
        finally:
            nats.close()
    return 0


async def _stream_last(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info("RINGSTREAM")).state.last_seq
    finally:
        await nc.close()


async def _drop_stream(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    await nc.jetstream().delete_stream("RINGSTREAM")
    await nc.close()


if __name__ == "__main__":
    sys.exit(main())
