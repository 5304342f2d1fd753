"""The soak workload (issue 12), shared by tests/test_soak.py (60 s, in CI)
and bench/soak_bench.py (30 minutes, figures printed).

The real service on its defaults, but for its sources: two synthetic
workers at `rate` records/s together, no exec source (its records depend on
the machine). Fifty subscribers, all from id 0 (the history still holds it):

  fast         NDJSON, SSE and WebSocket (?batch=1000) clients that read
               everything: no gap marker, nothing lost, and each gets every
               record the service consumed (the stop log's consumed_records).
  reconnecting SSE clients that leave after a few thousand records and come
               back with Last-Event-ID (EPOCH-ID), as EventSource does.
  filtered     ?field.worker=0|1, ?field.level=error, ?type=synthetic&sample=100.
  slow         NDJSON clients that read about 1 MB/s (the queues overflow: gap
               markers with counts) until the end, where they catch up.
  stalled      sockets that send their GET and never read.

Meanwhile a worker is SIGKILLed every `kill_every` seconds (the supervisor
restarts it) and the config is reloaded with SIGHUP every `reload_every`
seconds, alternately changing the workers' rate (the workers restarted) and
subscribers.heartbeat (applied live). At the end the service is stopped with
SIGTERM, which flushes every stream that reads, and each client is checked:

  * per worker, `seq` goes up by one, or starts again at 0 (a restarted
    worker); any other jump must follow a gap marker (announced);
  * received + the markers' `dropped` == what the service consumed, for
    every unfiltered client whose markers all carry a count;
  * filtered clients: exactly the records of their filter (per worker,
    against the fast client's counts).

RSS and open descriptors are sampled every `sample_every` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from servicectl import Service, parse_metrics, rss_bytes, stalled_socket

CONFIG = """
[ring]
shm_dir = "memfd"

[workers]
backoff_initial = 0.05
backoff_max = 0.5

[subscribers]
heartbeat = {heartbeat}

[[sources]]
kind = "synthetic"
instances = 2
rate = {rate}
"""


RECORD = b'{"id":'
MARKER = b'{"type":"gap"'
WORKER = (b'"worker":0,', b'"worker":1,')
ERROR = b'"level":"error"'


@dataclass
class Client:
    """What one subscriber saw. Counted on the bytes (a Python client that
    parsed every record would be the slowest part, and fall behind at
    50 k records/s on two cores); `parse` clients decode every record and
    check each worker's `seq` too."""

    name: str
    worker: int | None = None  # a ?field.worker=N filter
    parse: bool = False
    records: int = 0
    per_worker: list[int] = field(default_factory=lambda: [0, 0])
    errors: int = 0  # records of level error
    markers: list[dict[str, Any]] = field(default_factory=list)
    marker_at: list[float] = field(default_factory=list)  # seconds into the run
    t0: float = field(default_factory=time.monotonic)
    unannounced: list[tuple[int, int, int]] = field(default_factory=list)  # (worker, prev, seq)
    out_of_order: int = 0
    sessions: int = 0
    done: bool = False
    _last_id: int = -1
    _last_seq: dict[int, int] = field(default_factory=dict)
    _excused: set[int] = field(default_factory=set)

    def feed(self, block: bytes) -> None:
        """Whole records and markers, in any framing (NDJSON lines, SSE events,
        a WebSocket frame)."""
        if self.parse:
            for line in block.split(b"\n"):
                if line.startswith(RECORD):
                    self._record(orjson.loads(line))
                elif line.startswith(MARKER):
                    self._gap(orjson.loads(line))
            return
        self.records += block.count(RECORD)
        self.per_worker[0] += block.count(WORKER[0])
        self.per_worker[1] += block.count(WORKER[1])
        self.errors += block.count(ERROR)
        at = block.find(MARKER)
        while at >= 0:
            close = block.index(b"}", at)  # a marker is flat
            self._gap(orjson.loads(block[at : close + 1]))
            at = block.find(MARKER, close)

    def _record(self, rec: dict[str, Any]) -> None:
        if rec["id"] <= self._last_id:
            self.out_of_order += 1
        self._last_id = rec["id"]
        w, seq = rec["worker"], rec["seq"]
        prev = self._last_seq.get(w)
        # a restarted worker starts again at 0; any other jump needs a marker
        if prev is not None and seq not in (prev + 1, 0) and w not in self._excused:
            self.unannounced.append((w, prev, seq))
        self._excused.discard(w)
        self._last_seq[w] = seq
        self.records += 1
        self.per_worker[w] += 1
        self.errors += rec["level"] == "error"

    def _gap(self, marker: dict[str, Any]) -> None:
        self.markers.append(marker)
        self.marker_at.append(time.monotonic() - self.t0)
        self._excused = {0, 1}

    def dropped(self) -> int | None:
        """The markers' dropped counts summed; None if one has no count."""
        counts = [m.get("dropped") for m in self.markers]
        return None if None in counts else sum(c for c in counts if c is not None)


async def ndjson(
    http: aiohttp.ClientSession, url: str, c: Client, slow: asyncio.Event | None = None
) -> None:
    """Read NDJSON to the end; while `slow` is set, about 512 KB/s (32 KiB
    each 60 ms)."""
    c.sessions += 1
    async with http.get(url) as resp:
        assert resp.status == 200, resp.status
        rest = b""
        size = 32 << 10 if slow is not None else 256 << 10
        async for chunk in resp.content.iter_chunked(size):
            whole, _, rest = (rest + chunk).rpartition(b"\n")
            c.feed(whole)
            if slow is not None and slow.is_set():
                await asyncio.sleep(0.06)
    c.done = True


async def sse(
    http: aiohttp.ClientSession,
    base: str,
    c: Client,
    leave_after: tuple[int, int] | None,
    running: asyncio.Event | None = None,
) -> None:
    """SSE to the end; with `leave_after` (lo, hi), leave after about a random
    number of records in that range and come back with the last id, as
    EventSource does, while `running` is set."""
    last: str | None = None
    rng = random.Random(c.name)
    url = base + ("&" if "?" in base else "?") + "format=sse"
    while True:
        c.sessions += 1
        headers = {"Last-Event-ID": last} if last else {}
        quota = rng.randint(*leave_after) if leave_after else -1
        left = False
        async with http.get(url if last else url + "&from=0", headers=headers) as resp:
            assert resp.status == 200, resp.status
            rest = b""
            async for chunk in resp.content.iter_chunked(256 << 10):
                # up to the last whole event: its id is where a resume goes on
                whole, sep, rest = (rest + chunk).rpartition(b"\n\n")
                if not sep:
                    continue
                before = c.records
                c.feed(whole)
                at = whole.rfind(b"id: ")
                if at >= 0:
                    last = whole[at + 4 : whole.index(b"\n", at)].decode()
                quota -= c.records - before
                if quota <= 0 and leave_after and running is not None and running.is_set():
                    left = True
                    break
        if not left:
            break
    c.done = True


async def websocket(http: aiohttp.ClientSession, url: str, c: Client) -> None:
    c.sessions += 1
    async with http.ws_connect(url, max_msg_size=0, heartbeat=None) as ws:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            c.feed(msg.data.encode() if isinstance(msg.data, str) else msg.data)
    c.done = True


@dataclass
class Result:
    clients: dict[str, Client]
    stop: dict[str, Any]
    exit_code: int
    errors: list[str]
    kills: int
    reloads: int
    samples: list[tuple[float, int, int]]  # (seconds, RSS bytes, open fds)
    stalls: list[float]  # the service's loop_stall warnings (seconds each)
    cpu: tuple[float, float]  # CPU seconds: the service's main process, this client process
    metrics: dict[str, float]
    seconds: float


async def run(
    tmp: Path,
    *,
    seconds: float,
    rate: int = 50_000,
    kill_every: float = 60,
    reload_every: float = 300,
    sample_every: float = 10,
    stalled: int = 30,
    slow: int = 8,
) -> Result:
    config = CONFIG.format(rate=rate, heartbeat=15.0)
    svc = Service(tmp, config)
    socks: list[socket.socket] = []
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
    tasks: list[asyncio.Task[None]] = []
    fast_proc: multiprocessing.process.BaseProcess | None = None
    try:
        base = svc.url("")
        clients: dict[str, Client] = {}
        running = asyncio.Event()
        running.set()

        def add(name: str, coro: Any, worker: int | None = None, parse: bool = False) -> None:
            clients[name] = Client(name, worker, parse)
            tasks.append(asyncio.create_task(coro(clients[name]), name=name))

        # the fast clients in a process of their own: in this one, 40-odd
        # other streams share one core's worth of Python, and a client that
        # stalls for a second is behind by a whole queue (50,000 records)
        spawn = multiprocessing.get_context("spawn")
        fast_results, fast_end = spawn.Pipe(duplex=False)
        fast_proc = spawn.Process(
            target=fast_clients, args=(base, svc.ws_url("/ws?from=0&batch=1000"), fast_end)
        )
        fast_proc.start()
        fast_end.close()
        for i in range(3):
            add(
                f"reconnecting-{i}",
                lambda c: sse(http, base + "/events", c, (2_000, 20_000), running),
            )
        add("worker-0", lambda c: ndjson(http, base + "/events?from=0&field.worker=0", c), 0, True)
        add("worker-1", lambda c: ndjson(http, base + "/events?from=0&field.worker=1", c), 1)
        add("worker-0-ws", lambda c: websocket(http, svc.ws_url("/ws?from=0&field.worker=0"), c), 0)
        add("level-error", lambda c: ndjson(http, base + "/events?from=0&field.level=error", c))
        add("sample-100", lambda c: ndjson(http, base + "/events?from=0&sample=100", c))
        add("type-synthetic", lambda c: sse(http, base + "/events?type=synthetic", c, None))
        for i in range(slow):
            add(f"slow-{i}", lambda c: ndjson(http, base + "/events?from=0", c, running))
        for i in range(stalled):
            socks.append(stalled_socket(svc.port, "/ws" if i % 2 else "/events", ws=bool(i % 2)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for c in clients.values():
            c.t0 = time.monotonic()
        kills = reloads = 0
        samples: list[tuple[float, int, int]] = []
        next_kill, next_reload, next_sample = kill_every, reload_every, 0.0
        while (now := loop.time() - start) < seconds:
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise AssertionError(f"client {t.get_name()} failed") from t.exception()
            if now >= next_sample:
                fds = len(os.listdir(f"/proc/{svc.proc.pid}/fd"))
                samples.append((now, rss_bytes(svc.proc.pid), fds))
                next_sample += sample_every
            if now >= next_kill:
                latest = {
                    e["instance"]: e["pid"] for e in svc.logs if e.get("event") == "worker_start"
                }
                pids = sorted(latest.values())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[kills % len(pids)], signal.SIGKILL)
                kills += 1
                next_kill += kill_every
            if now >= next_reload:
                reloads += 1
                if reloads % 2:  # the workers' config changed: they restart
                    svc.config_path.write_text(CONFIG.format(rate=rate + reloads, heartbeat=15.0))
                else:  # a subscriber setting: applied live
                    svc.config_path.write_text(
                        CONFIG.format(rate=rate + reloads - 1, heartbeat=14.0 + reloads % 3)
                    )
                svc.proc.send_signal(signal.SIGHUP)
                next_reload += reload_every
            await asyncio.sleep(0.2)
        elapsed = loop.time() - start
        running.clear()  # the slow ones catch up before the stop flushes them
        await asyncio.sleep(2)
        async with http.get(base + "/metrics") as resp:
            metrics = parse_metrics(await resp.text())
        cpu = (_cpu_seconds(svc.proc.pid), sum(os.times()[:2]))
        code = await loop.run_in_executor(None, svc.terminate)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        if not await loop.run_in_executor(None, fast_results.poll, 60):
            raise AssertionError(f"the fast clients' process sent nothing ({fast_proc.exitcode})")
        fast = fast_results.recv()
        if isinstance(fast, str):
            raise AssertionError(f"the fast clients failed: {fast}")
        clients = {**fast, **clients}
        fast_proc.join(10)
        for t in tasks:
            if t.exception() is not None:
                raise AssertionError(f"client {t.get_name()} failed") from t.exception()
        stop = next(e for e in svc.logs if e.get("event") == "stop")
        reloaded = sum(1 for e in svc.logs if e.get("event") == "reload")
        return Result(
            clients,
            stop,
            code,
            svc.errors(),
            kills,
            reloaded,
            samples,
            [e["seconds"] for e in svc.logs if e.get("event") == "loop_stall"],
            cpu,
            metrics,
            elapsed,
        )
    finally:
        if fast_proc is not None and fast_proc.is_alive():
            fast_proc.kill()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await http.close()
        for s in socks:
            s.close()
        svc.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def fast_clients(base: str, ws_url: str, results: Connection) -> None:
    """The fast NDJSON, SSE and WebSocket clients, in a process of their own;
    what they saw goes back through `results` when the service ends their
    streams (or a traceback, as text)."""

    async def main() -> dict[str, Client]:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            out = {n: Client(n) for n in ("fast-ndjson", "fast-sse", "fast-ws")}
            await asyncio.gather(
                ndjson(http, base + "/events?from=0", out["fast-ndjson"]),
                sse(http, base + "/events", out["fast-sse"], None),
                websocket(http, ws_url, out["fast-ws"]),
            )
            return out

    try:
        results.send(asyncio.run(main()))
    except BaseException:
        results.send(traceback.format_exc())
        raise


def check(r: Result) -> list[str]:
    """What went wrong, as sentences (empty: all held)."""
    bad: list[str] = []
    total = r.stop["consumed_records"]
    fast = r.clients["fast-ndjson"]
    for c in r.clients.values():
        if not c.done:
            bad.append(f"{c.name}: its stream did not end")
        if c.out_of_order:
            bad.append(f"{c.name}: {c.out_of_order} ids out of order or repeated")
        if c.unannounced:
            bad.append(
                f"{c.name}: {len(c.unannounced)} unannounced jumps, e.g. {c.unannounced[:3]}"
            )
        if c.name.startswith("fast") and (c.markers or c.records != total):
            bad.append(f"{c.name}: {c.records} of {total} records, markers {c.markers[:3]}")
        dropped = c.dropped()
        counted_all = c.name.startswith(("slow", "reconnecting")) and dropped is not None
        if counted_all and c.records + (dropped or 0) != total:
            bad.append(
                f"{c.name}: {c.records} received + {dropped} announced dropped != {total} consumed"
            )
        if c.worker is not None and not c.markers and not fast.markers:
            expected = [0, 0]
            expected[c.worker] = fast.per_worker[c.worker]
            if c.per_worker != expected or not expected[c.worker]:
                bad.append(f"{c.name}: per worker {c.per_worker}, expected {expected}")
    if sum(fast.per_worker) != fast.records:
        bad.append(f"fast-ndjson: per worker {fast.per_worker}, {fast.records} records")
    w0, w1 = r.clients["worker-0"], r.clients["worker-1"]
    if not (w0.markers or w1.markers) and w0.records + w1.records != total:
        bad.append(f"worker-0 + worker-1: {w0.records} + {w1.records} != {total} consumed")
    lv = r.clients["level-error"]
    if not lv.markers and not fast.markers and not (lv.records == lv.errors == fast.errors > 0):
        bad.append(f"level-error: {lv.records} records, {lv.errors} errors; {fast.errors} expected")
    ts = r.clients["type-synthetic"]
    if not ts.markers and ts.records != total:
        bad.append(f"type-synthetic: {ts.records} of {total}")
    sm = r.clients["sample-100"]
    if not sm.markers and abs(sm.records - total // 100) > 1:
        bad.append(f"sample-100: {sm.records}, expected about {total // 100}")
    counted = sum(
        r.metrics.get(f'ringstream_subscriber_dropped_records_total{{transport="{t}"}}', 0)
        for t in ("ndjson", "sse", "ws")
    )
    announced = sum(c.dropped() or 0 for c in r.clients.values())
    if announced > counted:
        bad.append(f"markers announce {announced} dropped, the metrics count {counted}")
    if r.exit_code != 0:
        bad.append(f"the service exited {r.exit_code}")
    if r.errors:
        bad.append(f"error log lines: {r.errors[:3]}")
    return bad


def _reasons(c: Client) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in c.markers:
        out[m["reason"]] = out.get(m["reason"], 0) + 1
    return out


def report(r: Result) -> str:
    lines = [
        f"{r.seconds:.0f} s: {r.stop['consumed_records']:,} records consumed "
        f"({r.stop['consumed_records'] / r.seconds:,.0f}/s), {r.kills} worker SIGKILLs, "
        f"{r.reloads} reloads applied; exit {r.exit_code} in {r.stop['seconds']} s"
    ]
    for c in r.clients.values():
        d = c.dropped()
        lines.append(
            f"  {c.name:15} {c.records:>11,} records, {len(c.markers):>4} markers "
            f"({'?' if d is None else f'{d:,}'} dropped), {c.sessions} sessions, "
            f"{len(c.unannounced)} unannounced jumps"
            + (f"; markers by reason {dict(reasons)}" if (reasons := _reasons(c)) else "")
        )
    for c in r.clients.values():
        if c.markers and not c.name.startswith("slow"):
            by_minute: dict[int, int] = {}
            for t in c.marker_at:
                by_minute[int(t // 60)] = by_minute.get(int(t // 60), 0) + 1
            lines.append(f"  {c.name} markers by minute of the run: {by_minute}")
    budget = r.metrics.get("ringstream_subscriber_budget_dropped_records_total", 0)
    lines.append(f"  dropped to keep subscribers.memory_budget: {budget:,.0f} records")
    lag = r.metrics.get("ringstream_event_loop_lag_max_seconds")
    lines.append(
        f"  service loop: longest stall {lag if lag is None else f'{lag * 1000:.0f} ms'}, "
        f"{len(r.stalls)} stalls over 1 s" + (f" (longest {max(r.stalls)} s)" if r.stalls else "")
    )
    lines.append(
        f"  CPU: the service's main process {r.cpu[0] / r.seconds:.0%} of a core, "
        f"the clients' process {r.cpu[1] / r.seconds:.0%}"
    )
    if r.samples:
        warm = [s for s in r.samples if s[0] >= min(120, r.seconds / 3)] or r.samples
        rss = [s[1] for s in warm]
        fds = [s[2] for s in warm]
        lines.append(
            f"  after warm-up ({warm[0][0]:.0f} s): RSS {min(rss) / 2**20:.0f}-"
            f"{max(rss) / 2**20:.0f} MiB (first {rss[0] / 2**20:.0f}, last {rss[-1] / 2**20:.0f}); "
            f"open fds {min(fds)}-{max(fds)} (first {fds[0]}, last {fds[-1]})"
        )
    return "\n".join(lines)


def fd_and_rss_drift(r: Result) -> tuple[int, int]:
    """(fds, RSS bytes): last sample minus the first after warm-up."""
    warm = [s for s in r.samples if s[0] >= min(120, r.seconds / 3)] or r.samples
    return warm[-1][2] - warm[0][2], warm[-1][1] - warm[0][1]


__all__ = ["Result", "check", "fd_and_rss_drift", "report", "run"]
