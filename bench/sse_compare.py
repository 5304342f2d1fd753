"""SSE by hand (service.streams.SseWriter) against aiohttp-sse, by measurement.

One command, every figure measured in the same run (about 30 s):

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/sse_compare.py

An aiohttp server (uvloop, in its own process, as the service runs) streams N
pre-encoded JSON records (~175 bytes each, the service's JSON for the 64-byte
synthetic record) to one client over SSE, each record an event with
`id: <position>`:

  hand      the service's writer as shipped: SseWriter.records() on batches of
            --batch records (the consumer's batch), one resp.write per batch
  lib       aiohttp-sse: EventSourceResponse (sep="\\n", so the bytes on the
            wire are the same as hand's), one `await resp.send(data, id=...)`
            per record, the only way its API takes records
  lib/nt    the same with send_timeout=None (no asyncio.timeout per send):
            the library at its fastest
  hand/rec  hand-written formatting, but one resp.write per record: separates
            what batching buys from what the library costs

The client is the same for all: a separate process reading the socket with
recv_into and counting `data: ` lines, until N records have arrived.
Figures: records/s at the client (median of --repeat runs) and the server
process's CPU per record (from /proc, the cost that matters on a loaded box).
Before timing, a small run checks that hand and lib put the same events on
the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from machine import describe as describe_machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAT = b"data: "


def make_records(n: int) -> tuple[list[bytes], list[int]]:
    """n distinct JSON lines shaped like the service's synthetic records."""
    import orjson

    now = time.time_ns()
    lines, positions = [], []
    for i in range(n):
        pos = 1_000_000 + 72 * i
        lines.append(
            orjson.dumps(
                {
                    "id": pos,
                    "ts_ns": now + i,
                    "type": "synthetic",
                    "seq": i,
                    "worker": 0,
                    "level": ("debug", "info", "warn", "error")[i % 4],
                    "value": i / 1000,
                    "label": "synthetic-0",
                    "token": f"{(i * 0x9E3779B97F4A7C15) & (2**64 - 1):016x}",
                }
            )
        )
        positions.append(pos)
    return lines, positions


# --- the server --------------------------------------------------------------------


def server_main(lsock: socket.socket, records: int, batch: int) -> None:
    import uvloop
    from aiohttp import web
    from aiohttp_sse import EventSourceResponse

    from service.batch import Batch
    from service.streams import SseWriter

    lines, positions = make_records(records)
    ts = [0] * records
    types = [10] * records
    # the consumer's batches, built once: the writer, not the batching, is measured
    batches = [
        Batch.of(
            lines[i : i + batch], positions[i : i + batch], ts[i : i + batch], types[i : i + batch]
        )
        for i in range(0, records, batch)
    ]
    str_lines = [line.decode() for line in lines]  # aiohttp-sse takes str
    str_ids = [str(p) for p in positions]

    def count(request: web.Request) -> int:
        return min(int(request.query.get("n", records)), records)

    async def hand(request: web.Request) -> web.StreamResponse:
        n = count(request)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        w = SseWriter(resp)
        sent = 0
        for b in batches:
            if sent >= n:
                break
            part = b if sent + len(b) <= n else b.slice(0, n - sent)
            await w.records([part])
            sent += len(part)
        await resp.write_eof()
        return resp

    async def hand_rec(request: web.Request) -> web.StreamResponse:
        n = count(request)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        write = resp.write
        for i in range(n):
            await write(b"id: %d\ndata: %b\n\n" % (positions[i], lines[i]))
        await resp.write_eof()
        return resp

    async def lib(request: web.Request) -> web.StreamResponse:
        n = count(request)
        if request.query.get("timeout") == "none":  # its fastest setting
            resp = EventSourceResponse(sep="\n", send_timeout=None)
        else:
            resp = EventSourceResponse(sep="\n")
        await resp.prepare(request)
        send = resp.send
        for i in range(n):
            # the bytes are pre-encoded; aiohttp-sse takes str, so pass the
            # decoded copies (decoding per record would be charged to it too)
            await send(str_lines[i], id=str_ids[i])
        resp.stop_streaming()
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/hand", hand)
    app.router.add_get("/hand_rec", hand_rec)
    app.router.add_get("/lib", lib)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.SockSite(runner, lsock)
        await site.start()
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(run())


# --- the client ---------------------------------------------------------------------


def client_main(port: int, path: str, n: int, conn: Any) -> None:
    """GET path; read until n `data: ` lines have arrived (or EOF)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    sep = "&" if "?" in path else "?"
    head = f"GET {path}{sep}n={n} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    sock.sendall(head.encode())
    got = 0
    prev = b""
    nbytes = 0
    while got < n:
        k = sock.recv_into(buf)
        if not k:
            break
        nbytes += k
        got += buf.count(PAT, 0, k) + (prev + bytes(view[: min(k, 5)])).count(PAT)
        prev = bytes(view[max(0, k - 5) : k])
    t1 = time.perf_counter()
    view.release()
    sock.close()
    conn.send({"records": got, "seconds": t1 - t0, "bytes": nbytes})


# --- orchestration --------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def check_same_bytes(port: int) -> str:
    """hand and lib must send the same events: compare the de-chunked bodies."""
    bodies = {}
    for path in ("/hand", "/lib", "/hand_rec"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}?n=5000", timeout=30) as r:
            bodies[path] = r.read()
    if bodies["/hand"] != bodies["/lib"] or bodies["/hand"] != bodies["/hand_rec"]:
        raise SystemExit("hand and lib send different bytes: the comparison would be unfair")
    return f"same {len(bodies['/hand']):,} bytes for 5,000 records from all three"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=400_000, help="records per run (N)")
    ap.add_argument("--batch", type=int, default=4096, help="records per write for hand")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from importlib.metadata import version

    print(f"machine: {describe_machine()}")
    print(
        f"aiohttp {version('aiohttp')}, aiohttp-sse {version('aiohttp-sse')}"
        f", uvloop; N = {args.records:,} records per run, median of {args.repeat}"
    )
    ctx = mp.get_context("spawn")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    server = ctx.Process(target=server_main, args=(lsock, args.records, args.batch))
    server.start()
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/hand?n=1", timeout=5).read()
                break
            time.sleep(0.1)
        print(f"check: {check_same_bytes(port)}\n")
        results: dict[str, list[tuple[float, float, float]]] = {}
        methods = (
            ("hand", "/hand", f"hand-written SseWriter, 1 write per {args.batch} records"),
            ("lib", "/lib", "aiohttp-sse EventSourceResponse.send per record"),
            ("lib/nt", "/lib?timeout=none", "the same, send_timeout=None"),
            ("hand/rec", "/hand_rec", "hand-written, 1 write per record"),
        )
        for _ in range(args.repeat):
            for name, path, _desc in methods:  # interleaved, so drift hits all alike
                parent, child = ctx.Pipe()
                c = ctx.Process(target=client_main, args=(port, path, args.records, child))
                cpu0 = proc_cpu(server.pid)  # type: ignore[arg-type]
                c.start()
                r = parent.recv()
                c.join()
                cpu1 = proc_cpu(server.pid)  # type: ignore[arg-type]
                if r["records"] != args.records:
                    raise SystemExit(f"{name}: got {r['records']} of {args.records} records")
                results.setdefault(name, []).append(
                    (r["records"] / r["seconds"], (cpu1 - cpu0) / r["records"], r["bytes"])
                )
    finally:
        server.kill()
        server.join()
    med = {
        name: (
            statistics.median(x[0] for x in runs),
            statistics.median(x[1] for x in runs),
            [x[0] for x in runs],
        )
        for name, runs in results.items()
    }
    for name, _path, desc in methods:
        rps, cpu, all_rps = med[name]
        spread = ", ".join(f"{x / 1e3:.0f}k" for x in all_rps)
        print(
            f"  {name:<9} {rps / 1e3:8.0f} k records/s  server CPU {cpu * 1e9:6.0f} ns/record"
            f"   ({desc}; runs: {spread})"
        )
    hand, lib = med["hand"], med["lib"]
    if hand[0] >= lib[0]:
        print(
            f"\nwinner: hand-written, {hand[0] / lib[0]:.1f}x the records/s of aiohttp-sse and "
            f"{lib[1] / hand[1]:.1f}x less server CPU per record "
            f"({hand[0] / med['lib/nt'][0]:.1f}x / {med['lib/nt'][1] / hand[1]:.1f}x against "
            f"aiohttp-sse at its fastest, send_timeout=None)"
        )
    else:
        print(f"\nwinner: aiohttp-sse, {lib[0] / hand[0]:.1f}x the records/s of the hand-written")
    print(
        f"batching alone (hand vs hand/rec): {hand[0] / med['hand/rec'][0]:.1f}x; "
        f"the library's per-event overhead (hand/rec vs lib): "
        f"{med['hand/rec'][0] / lib[0]:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
