"""End to end: synthetic workers -> the ring -> the service -> subscribers, measured.

One command, every figure measured in the same run (about 90 s):

    .venv/bin/python bench/e2e_bench.py            # --help: durations, diagnostics

It starts the real service (`python -m service serve --port 0`, the port read
from its JSON "start" log line, as tests/servicectl.py does) with synthetic
sources of 64-byte records, connects subscribers, and prints:

  client alone  the subscriber clients' own ceiling, against a fake server
                that sends pre-encoded records as fast as loopback takes them
  throughput    records/s and bytes/s delivered to one NDJSON subscriber, one
                WebSocket subscriber (?batch=1000 and one record per frame),
                and NDJSON + WebSocket at once; producers at full speed
                (rate = 0) and rate-limited (the lossless ladder)
  latency       submit-to-write p50/p99/max at rate = 10000: at the client,
                from each record's ts_ns (the producer's CLOCK_REALTIME stamp)
                against time.time_ns() on receipt; and the service's own
                ringstream_delivery_latency_seconds histogram (/metrics)
  losses        gap markers seen by the client, records the service dropped
                for that transport (/metrics), and the ring's
                reserve_failures (/query), all over the same window
  CPU           per process (service, workers, client), % of one core, and
                the machine's total, over the measuring window

Clients are separate processes with blocking sockets: the NDJSON one reads
/events over HTTP/1.1 (chunked, as curl -N does), the WebSocket one does the
handshake itself and reads frames. Both count records with bytes.count over
each recv: every record object, and every gap marker, holds exactly one "{"
(the synthetic records' strings hold no brace; a WebSocket frame header can
add one only when a length byte is 0x7b: never for one-record frames, at most
1 in 1000 records for ?batch=1000 frames), and gap markers are found by their
`{"type":"gap` prefix, across recv boundaries too. That keeps the client at
~150 ns/record ("client alone" shows its ceiling, and each case its CPU);
curl -N > /dev/null cross-checks the NDJSON figure. In latency runs the clients
extract every record's ts_ns.

On this kind of machine (2 vCPUs, shared) every figure is a share of two
cores between producer, service and client, and other tenants' load shows as
OTHER LOAD in a case's CPU line: rerun when it does.

Diagnostics (off by default, they perturb what they measure):
  --gc-trace  the service's garbage collections of >= 1 ms, per latency case
              (a sitecustomize.py on the service's PYTHONPATH; service/ is
              untouched)
  --profile   NDJSON at the top ladder rate with the service under cProfile
  --perf      perf record of the service in that same case (if perf exists)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import describe as describe_machine
from machine import proc_cpu as _proc_cpu

ROOT = Path(__file__).resolve().parent.parent

TARGET_RATE = 500_000  # records/s to one NDJSON subscriber
TARGET_P99 = 5e-3  # seconds, submit-to-write, at LATENCY_RATE
LATENCY_RATE = 10_000
HISTORY = 100_000  # subscribers.history_records, the built-in default the bench keeps

PAT_GAP = b'{"type":"gap'
PAT_TS = re.compile(rb'"ts_ns":(\d+)')
RECV = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

BASE_CONFIG = """
[server]
shutdown_timeout = 5.0

[ring]
size = "{ring}"
shm_dir = "memfd"

[workers]
count = {workers}

[consumer]
batch = {batch}

[subscribers]
# the clients do not answer WebSocket pings (aiohttp closes a socket whose pong
# is 7.5 s late); a long heartbeat keeps windows of any length open
heartbeat = 300.0

[log]
format = "json"

[[sources]]
kind = "synthetic"
instances = {instances}
rate = {rate}
size = 64
"""


# --- the machine ----------------------------------------------------------------


# --- the clients (each runs in its own process) -----------------------------------


def _connect(port: int, target: str, ws: bool) -> tuple[socket.socket, bytes]:
    """Connect, send the request, read the response head; returns the socket
    and the bytes already received past the head."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    if ws:
        head = (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
    else:
        head = (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: application/x-ndjson\r\n\r\n"
        )
    sock.sendall(head.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"closed before the response head: {buf[:200]!r}")
        buf += more
    head_end = buf.index(b"\r\n\r\n") + 4
    status = buf.split(b"\r\n", 1)[0]
    want = b" 101 " if ws else b" 200 "
    if want not in status + b" ":
        raise ConnectionError(f"unexpected response: {buf[:head_end]!r}")
    if ws:
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        )
        if accept not in buf[:head_end]:
            raise ConnectionError("bad Sec-WebSocket-Accept")
    return sock, buf[head_end:]


def client_main(
    port: int, target: str, ws: bool, warmup: float, duration: float, latency: bool, conn: Any
) -> None:
    """Read a stream for warmup + duration seconds; report what the window held.

    Throughput mode counts records/gap markers with bytes.count (and samples
    one ts_ns per recv); latency mode extracts every record's ts_ns.
    """
    try:
        sock, first = _connect(port, target, ws)
    except Exception as e:
        conn.send({"error": repr(e)})
        return
    sock.settimeout(0.05)
    recv_into = sock.recv_into
    buf = bytearray(RECV)
    view = memoryview(buf)
    count_id = count_gap = 0
    nbytes = 0
    tail = b""  # latency mode: the stream after the last "}" seen
    prev = b""  # throughput mode: the last bytes of the previous recv
    lat: list[int] = []  # ns
    samples: list[int] = []  # ns, one per recv in throughput mode
    recvs = 0
    t0 = time.monotonic()
    t_start = t0 + warmup
    t_end = t_start + duration
    started = False
    snap = (0, 0, 0, 0, os.times())
    pending = first
    closed = False
    while True:
        now_m = time.monotonic()
        if not started and now_m >= t_start:
            started = True
            conn.send("start")
            snap = (count_id, count_gap, nbytes, recvs, os.times())
            lat.clear()
            samples.clear()
        if now_m >= t_end or closed:
            break
        if pending:
            n = len(pending)
            buf[:n] = pending
            pending = b""
        else:
            try:
                n = recv_into(buf)
            except TimeoutError:
                continue
            if not n:
                closed = True
                continue
        now = time.time_ns()
        recvs += 1
        nbytes += n
        if latency:
            data = tail + bytes(view[:n])
            cut = data.rfind(b"}") + 1
            block, tail = data[:cut], data[cut:]
            count_id += block.count(b"{")
            count_gap += block.count(PAT_GAP)
            lat.extend(now - int(t) for t in PAT_TS.findall(block))
        else:
            # every record object, and every gap marker, has exactly one "{"
            count_id += buf.count(b"{", 0, n)
            head = bytes(view[: min(n, 11)])
            count_gap += (prev + head).count(PAT_GAP)
            i = buf.find(PAT_GAP, 0, n)
            while i >= 0:
                count_gap += 1
                i = buf.find(PAT_GAP, i + 1, n)
            prev = bytes(view[max(0, n - 11) : n])
            i = buf.rfind(b'"ts_ns":', 0, n)
            if i >= 0:
                j = buf.find(b",", i, n)
                if j > 0:
                    samples.append(now - int(buf[i + 8 : j]))
    view.release()
    t_stop = time.monotonic()
    conn.send("end")
    end_times = os.times()
    sock.close()
    c_id, c_gap, c_bytes, c_recvs, times0 = snap
    elapsed = t_stop - t_start if started else 0.0
    conn.send(
        {
            # object starts minus gap markers
            "records": (count_id - c_id) - (count_gap - c_gap),
            "gaps": count_gap - c_gap,
            "bytes": nbytes - c_bytes,
            "recvs": recvs - c_recvs,
            "seconds": elapsed,
            "cpu": (end_times.user - times0.user) + (end_times.system - times0.system),
            "latency_ns": lat,
            "samples_ns": samples,
            "closed_early": closed,
        }
    )


# --- a fake server, for the clients' own ceiling ----------------------------------


def _fake_records(n: int) -> list[bytes]:
    now = time.time_ns()
    return [
        b'{"id":%d,"ts_ns":%d,"type":"synthetic","seq":%d,"worker":0,"level":"info",'
        b'"value":%d.0010000000000001,"label":"synthetic-0","token":"%016x"}'
        % (i * 72, now + i, i, i, (i * 0x9E3779B97F4A7C15) & (2**64 - 1))
        for i in range(n)
    ]


def _ws_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([0x81, n]) + payload
    if n < 1 << 16:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + payload


def fake_server_main(lsock: socket.socket, mode: str) -> None:
    """Serve one client: the response head, then the same pre-encoded block until it goes."""
    conn, _ = lsock.accept()
    req = b""
    while b"\r\n\r\n" not in req:
        req += conn.recv(65536)
    recs = _fake_records(4096)
    if mode == "ndjson":
        body = b"\n".join(recs) + b"\n"
        block = b"%x\r\n%b\r\n" % (len(body), body)
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
    else:
        key = re.search(rb"Sec-WebSocket-Key: (\S+)", req).group(1)  # type: ignore[union-attr]
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        head = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        if mode == "ws_batch":
            block = b"".join(
                _ws_frame(b"[" + b",".join(recs[i : i + 1000]) + b"]") for i in range(0, 4000, 1000)
            )
        else:
            block = b"".join(_ws_frame(r) for r in recs)
    conn.sendall(head)
    with contextlib.suppress(OSError):
        while True:
            conn.sendall(block)


# --- the service under test ---------------------------------------------------------


@dataclass
class Cpu:
    """CPU seconds per process (and the machine's busy time) at one instant."""

    t: float
    wall: float
    procs: dict[int, float]
    busy: float  # machine, seconds of all CPUs together
    total: float


def _machine_cpu() -> tuple[float, float]:
    parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + vals[4]
    total = sum(vals[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# injected with --gc-trace (a sitecustomize.py on the service's PYTHONPATH): every
# garbage collection of 1 ms or more in the service process, as a JSON line on stderr
GC_TRACER = """
import gc, os, sys, time
_t0 = [0.0]
def _ringstream_bench_gc(phase, info):
    if phase == "start":
        _t0[0] = time.perf_counter()
        return
    d = time.perf_counter() - _t0[0]
    if d >= 1e-3:
        sys.stderr.write('{"event":"gc_pause","pid":%d,"t":%.6f,"gen":%d,"seconds":%.6f}\\n'
                         % (os.getpid(), time.time(), info["generation"], d))
gc.callbacks.append(_ringstream_bench_gc)
"""


class ServiceProc:
    def __init__(self, config: str, *, profile: Path | None = None, gc_trace: bool = False) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="ringstream-bench-")
        path = Path(self.dir.name) / "bench.toml"
        path.write_text(config)
        cmd = [sys.executable]
        if profile is not None:
            cmd += ["-m", "cProfile", "-o", str(profile)]
        cmd += ["-m", "service", "serve", "--config", str(path), "--port", "0"]
        pythonpath = str(ROOT)
        if gc_trace:
            (Path(self.dir.name) / "sitecustomize.py").write_text(GC_TRACER)
            pythonpath = os.pathsep.join([self.dir.name, pythonpath])
        env = {**os.environ, "PYTHONPATH": pythonpath}
        self.gc_pauses: list[tuple[float, int, float]] = []
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=self.dir.name
        )
        self.lines: list[str] = []
        self.started = threading.Event()
        self.start_entry: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.started.wait(60):
            self.close()
            raise RuntimeError("the service did not start:\n" + "\n".join(self.lines[-20:]))
        self.port = int(self.start_entry["port"])
        self.pid = int(self.start_entry["pid"])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == "gc_pause":
                    if entry["pid"] == self.proc.pid:
                        self.gc_pauses.append((entry["t"], entry["gen"], entry["seconds"]))
                    continue
                if isinstance(entry, dict) and entry.get("event") == "start":
                    self.start_entry = entry
                    self.started.set()
        self.started.set()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read()

    def query(self) -> dict[str, int]:
        return json.loads(self.get("/query"))

    def metrics(self) -> str:
        return self.get("/metrics").decode()

    def workers(self) -> list[int]:
        return [p for p in _children(self.pid) if "resource_tracker" not in _cmdline(p)]

    def cpu(self, extra: list[int]) -> Cpu:
        procs = {}
        for pid in [self.pid, *self.workers(), *extra]:
            c = _proc_cpu(pid)
            if c is not None:
                procs[pid] = c
        busy, total = _machine_cpu()
        return Cpu(time.monotonic(), time.time(), procs, busy, total)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._reader.join(timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        self.dir.cleanup()


# --- metrics parsing ------------------------------------------------------------------


def _series(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def dropped_by_transport(text: str) -> dict[str, float]:
    s = _series(text, "ringstream_subscriber_dropped_records_total")
    return {k.split('"')[1]: v for k, v in s.items()}


def histogram(text: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the delivery latency histogram."""
    s = _series(text, "ringstream_delivery_latency_seconds_bucket")
    out = []
    for k, v in s.items():
        le = k.split('"')[1]
        out.append((float("inf") if le == "+Inf" else float(le), v))
    return sorted(out)


def hist_quantiles(before: str, after: str) -> dict[str, Any]:
    b = dict(histogram(before))
    buckets = [(le, c - b.get(le, 0.0)) for le, c in histogram(after)]
    total = buckets[-1][1] if buckets else 0.0
    res: dict[str, Any] = {"count": int(total)}
    if not total:
        return res
    for q in (0.5, 0.99):
        rank = q * total
        lo, prev = 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                if le == float("inf"):
                    res[f"p{int(q * 100)}"] = lo
                else:  # linear inside the bucket, as Prometheus' histogram_quantile
                    res[f"p{int(q * 100)}"] = lo + (le - lo) * (rank - prev) / max(c - prev, 1e-9)
                break
            lo, prev = le, c
    at_target = dict(buckets).get(TARGET_P99, total)
    res["over_target"] = 100 * (total - at_target) / total
    last = 0.0
    lower = 0.0
    for le, c in buckets:
        if c > last:
            res["max_bucket"] = (lower, le)
        lower, last = le, c
    return res


# --- one measured case ----------------------------------------------------------------


@dataclass
class Result:
    name: str
    seconds: float = 0.0
    transports: list[str] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    q0: dict[str, int] = field(default_factory=dict)
    q1: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, float] = field(default_factory=dict)
    hist: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0  # % of all CPUs
    other: float = 0.0  # % of one core: busy time not spent in our processes
    gc: list[tuple[float, int, float]] = field(default_factory=list)  # (t, gen, seconds)


def run_case(
    svc: ServiceProc,
    name: str,
    targets: list[tuple[str, bool]],
    warmup: float,
    duration: float,
    latency: bool = False,
    perf_file: Path | None = None,
) -> Result:
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for target, ws in targets:
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=client_main, args=(svc.port, target, ws, warmup, duration, latency, child)
        )
        p.start()
        procs.append(p)
        pipes.append(parent)
    res = Result(name, transports=["ws" if ws else "ndjson" for _, ws in targets])
    try:
        for c in pipes:
            msg = c.recv()
            if isinstance(msg, dict):
                raise RuntimeError(f"{name}: client failed: {msg.get('error')}")
        pids = [p.pid for p in procs if p.pid is not None]
        res.q0 = svc.query()
        m0 = svc.metrics()
        cpu0 = svc.cpu(pids)
        perf = None
        if perf_file is not None:
            perf = subprocess.Popen(
                [
                    "perf",
                    "record",
                    "-q",
                    "-F",
                    "499",
                    "-g",
                    "-p",
                    str(svc.pid),
                    "-o",
                    str(perf_file),
                    "--",
                    "sleep",
                    str(duration),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for c in pipes:
            c.recv()  # "end"
        cpu1 = svc.cpu(pids)
        if perf is not None:
            perf.wait()
        res.q1 = svc.query()
        m1 = svc.metrics()
        res.clients = [c.recv() for c in pipes]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    res.seconds = cpu1.t - cpu0.t
    d0, d1 = dropped_by_transport(m0), dropped_by_transport(m1)
    res.dropped = {k: d1[k] - d0.get(k, 0.0) for k in d1}
    res.hist = hist_quantiles(m0, m1)
    workers = set(svc.workers())
    for pid, c1 in cpu1.procs.items():
        c0 = cpu0.procs.get(pid)
        if c0 is None:
            continue
        who = "service" if pid == svc.pid else "workers" if pid in workers else "clients"
        res.cpu[who] = res.cpu.get(who, 0.0) + 100 * (c1 - c0) / res.seconds
    if cpu1.total > cpu0.total:
        res.machine_busy = 100 * (cpu1.busy - cpu0.busy) / (cpu1.total - cpu0.total)
        ncpu = (cpu1.total - cpu0.total) / res.seconds
        res.other = max(0.0, res.machine_busy * ncpu - sum(res.cpu.values()))
    res.gc = [g for g in svc.gc_pauses if cpu0.wall <= g[0] <= cpu1.wall]
    return res


# --- reporting ---------------------------------------------------------------------------


def _pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms"


def _rate(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def describe(res: Result, labels: list[str]) -> list[str]:
    out = []
    secs = res.seconds
    submitted = res.q1.get("submitted", 0) - res.q0.get("submitted", 0)
    failures = res.q1.get("reserve_failures", 0) - res.q0.get("reserve_failures", 0)
    for label, c, transport in zip(labels, res.clients, res.transports, strict=True):
        rps = c["records"] / c["seconds"]
        bps = c["bytes"] / c["seconds"]
        dropped = int(res.dropped.get(transport, 0))
        loss = (
            "lossless"
            if not dropped and not c["gaps"]
            else f"LOSSY: {dropped:,} dropped by the service ({transport}), {c['gaps']} gap markers"
        )
        if c["closed_early"]:
            loss += " (THE SERVICE CLOSED THE STREAM EARLY)"
        lat = ""
        if c["samples_ns"]:
            lat = f", latency under load (1 sample/recv) p50 {_ms(_pct(c['samples_ns'], 0.5))}"
        out.append(
            f"    {label:<14} {_rate(rps)} records/s, {bps / 1e6:.0f} MB/s"
            f" ({c['bytes'] / max(c['records'], 1):.0f} B/record on the wire,"
            f" {c['recvs'] / c['seconds']:.0f} recv/s); {loss}{lat}"
        )
    out.append(
        f"    {'':<14} producers submitted {_rate(submitted / secs)} records/s, ring "
        f"reserve_failures {failures:,}"
    )
    out.append(f"    {'':<14} {fmt_cpu(res)}")
    return out


def fmt_cpu(res: Result) -> str:
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(res.cpu.items()))
    other = f", OTHER LOAD {res.other:.0f}%" if res.other >= 10 else ""
    return f"CPU (% of one core): {cpu}{other}; machine {res.machine_busy:.0f}% busy"


def fmt_hist(h: dict[str, Any]) -> str:
    if not h.get("count"):
        return "no observations"
    mb = h.get("max_bucket", (0, 0))
    return (
        f"p50 ~{h['p50'] * 1e3:.2f} ms, p99 ~{h['p99'] * 1e3:.2f} ms, max in "
        f"({mb[0] * 1e3:g}, {mb[1] * 1e3:g}] ms, {h['over_target']:.2f} % over "
        f"{TARGET_P99 * 1e3:g} ms ({h['count']:,} observations, bucket-interpolated)"
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- the run -------------------------------------------------------------------------------


def config(rate: float, *, instances: int = 1, batch: int = 4096, ring: str = "16MiB") -> str:
    return BASE_CONFIG.format(
        rate=rate, instances=instances, workers=instances, batch=batch, ring=ring
    )


def client_alone(mode: str, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    server = ctx.Process(target=fake_server_main, args=(lsock, mode))
    server.start()
    parent, child = ctx.Pipe()
    target = {"ndjson": "/events", "ws_batch": "/ws?batch=1000", "ws": "/ws"}[mode]
    client = ctx.Process(
        target=client_main, args=(port, target, mode != "ndjson", 0.5, seconds, False, parent)
    )
    client.start()
    msgs = [child.recv() for _ in range(3)]
    client.join(10)
    server.kill()
    server.join()
    lsock.close()
    return msgs[-1]


def run_curl(svc: ServiceProc, seconds: float) -> str | None:
    """Cross-check with curl -N > /dev/null: bytes/s, converted at the bytes/record seen."""
    curl = shutil.which("curl")
    if curl is None:
        return None
    m0 = svc.metrics()
    p = subprocess.Popen(
        [
            curl,
            "-s",
            "-N",
            "-o",
            "/dev/null",
            "--max-time",
            str(seconds),
            "-w",
            "%{size_download} %{time_total}",
            f"http://127.0.0.1:{svc.port}/events",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.2)
    c0 = svc.cpu([p.pid])
    out, _ = p.communicate()
    c1 = svc.cpu([])
    m1 = svc.metrics()
    size, total = out.split()
    dropped = dropped_by_transport(m1)["ndjson"] - dropped_by_transport(m0)["ndjson"]
    dt = c1.t - c0.t
    svc_cpu = 100 * (c1.procs.get(svc.pid, 0) - c0.procs.get(svc.pid, 0)) / dt
    bps = int(size) / float(total)
    return (
        f"    {'curl -N':<14} {bps / 1e6:.0f} MB/s (~{_rate(bps / 178)} records/s at 178 B each, "
        f"whole {float(total):.1f} s incl. connect); "
        + (f"LOSSY: {int(dropped):,} dropped" if dropped else "lossless")
        + f"; service CPU {svc_cpu:.0f}%"
    )


def perf_report(path: Path) -> None:
    for sort in ("dso", "dso,sym"):
        out = subprocess.run(
            [
                "perf",
                "report",
                "-i",
                str(path),
                "--no-children",
                "--sort",
                sort,
                "--stdio",
                "-g",
                "none",
                "--percent-limit",
                "1.5",
            ],
            capture_output=True,
            text=True,
        ).stdout
        rows = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#")]
        print(f"    perf, by {sort}:")
        for ln in rows[:22]:
            print(f"      {ln.strip()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring window per case")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    ap.add_argument(
        "--latency-seconds", type=float, default=15.0, help="measuring window per latency case"
    )
    ap.add_argument(
        "--ladder",
        default="500000,1000000",
        help="producer rates (records/s) for the rate-limited runs",
    )
    ap.add_argument("--instances", type=int, default=1, help="synthetic instances at rate = 0")
    ap.add_argument("--batch", type=int, default=4096, help="consumer.batch")
    ap.add_argument(
        "--gc-trace",
        action="store_true",
        help="trace the service's garbage collections (a sitecustomize on its PYTHONPATH) "
        "and show the pauses in each latency window",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run NDJSON at the top ladder rate with the service under cProfile",
    )
    ap.add_argument(
        "--perf",
        action="store_true",
        help="perf record the service in the NDJSON window at the top ladder rate",
    )
    ap.add_argument("--only", default="", help="comma list of: alone,full,ladder,latency")
    args = ap.parse_args()
    secs, warm = args.seconds, args.warmup
    only = set(filter(None, args.only.split(","))) or {"alone", "full", "ladder", "latency"}
    ladder = [float(x) for x in args.ladder.split(",") if x]
    t_begin = time.monotonic()

    print(f"machine: {describe_machine()}")
    b0 = _machine_cpu()
    time.sleep(0.5)
    b1 = _machine_cpu()
    idle_busy = 100 * (b1[0] - b0[0]) / max(b1[1] - b0[1], 1e-9)
    print(
        f"machine busy before the run: {idle_busy:.0f}%"
        + (" (other load: figures will be low)" if idle_busy > 10 else "")
    )
    print(
        f"records: synthetic, 64 B in the ring (+8 B header), ~175 B as JSON; "
        f"ring 16 MiB, consumer.batch {args.batch}, subscriber queue 50000 records / 16 MiB "
        f"(drop-oldest); window {secs:g} s after {warm:g} s warm-up; CPU % of one core\n"
    )
    summary: list[str] = []
    best_lossless = 0.0
    full_ndjson = None

    if "alone" in only:
        print("client alone (fake server sending pre-encoded records; the client's ceiling):")
        for mode, label in (("ndjson", "NDJSON"), ("ws_batch", "WS batch=1000"), ("ws", "WS")):
            c = client_alone(mode, min(secs, 2.0))
            rps = c["records"] / c["seconds"]
            print(
                f"    {label:<14} {_rate(rps)} records/s, {c['bytes'] / c['seconds'] / 1e6:.0f}"
                f" MB/s, client CPU {100 * c['cpu'] / c['seconds']:.0f}%"
                f" ({1e9 * c['cpu'] / max(c['records'], 1):.0f} ns/record)"
            )
        print()

    if "full" in only:
        n = args.instances
        print(
            f"full speed: {n} synthetic instance(s) at rate = 0 (as fast as the ring takes "
            f"them), workers.count = {n}:"
        )
        svc = ServiceProc(config(0, instances=n, batch=args.batch))
        try:
            for name, targets, labels in (
                ("ndjson", [("/events", False)], ["NDJSON"]),
                ("ws_batch", [("/ws?batch=1000", True)], ["WS batch=1000"]),
                ("ws", [("/ws", True)], ["WS"]),
                (
                    "both",
                    [("/events", False), ("/ws?batch=1000", True)],
                    ["NDJSON (both)", "WS b=1000 (both)"],
                ),
            ):
                res = run_case(svc, name, targets, warm, secs)
                for line in describe(res, labels):
                    print(line)
                if name == "ndjson":
                    full_ndjson = res
            line = run_curl(svc, secs)
            if line:
                print(line)
        finally:
            svc.stop()
            svc.close()
        print()

    if "ladder" in only:
        print("rate-limited: 1 synthetic instance at a fixed rate, one subscriber at a time:")
        for k, rate in enumerate(ladder):
            top = k == len(ladder) - 1
            perf_file = None
            if top and args.perf and shutil.which("perf"):
                perf_file = Path(tempfile.mkdtemp(prefix="ringstream-perf-")) / "perf.data"
            svc = ServiceProc(config(rate, batch=args.batch))
            try:
                for target, ws, label in (
                    ("/events", False, f"NDJSON @{_rate(rate)}"),
                    ("/ws?batch=1000", True, f"WS b=1000 @{_rate(rate)}"),
                ):
                    res = run_case(
                        svc,
                        label,
                        [(target, ws)],
                        warm,
                        secs,
                        perf_file=None if ws else perf_file,
                    )
                    for line in describe(res, [label]):
                        print(line)
                    c = res.clients[0]
                    lossless = not c["gaps"] and not res.dropped.get("ws" if ws else "ndjson")
                    if not ws and lossless:
                        best_lossless = max(best_lossless, c["records"] / c["seconds"])
            finally:
                svc.stop()
                svc.close()
            if perf_file is not None:
                perf_report(perf_file)
        print()

    if full_ndjson is not None or best_lossless:
        parts = [f"{_rate(best_lossless)}/s lossless (best rate-limited run)"]
        if full_ndjson is not None:
            c = full_ndjson.clients[0]
            d = int(full_ndjson.dropped.get("ndjson", 0))
            lossy = f"LOSSY: {d:,} dropped" if d or c["gaps"] else "lossless"
            parts.append(f"{_rate(c['records'] / c['seconds'])}/s at full speed ({lossy})")
        summary.append(
            f"{verdict(best_lossless >= 0.98 * TARGET_RATE)}  >= {_rate(TARGET_RATE)} records/s "
            f"as JSON to one NDJSON subscriber: " + "; ".join(parts)
        )

    if "latency" in only:
        lsecs = args.latency_seconds
        print(
            f"latency at rate = {LATENCY_RATE} (1 synthetic instance), one subscriber at a time, "
            f"{lsecs:g} s each, after {HISTORY / LATENCY_RATE:g} s for the history to fill:"
        )
        svc = ServiceProc(config(LATENCY_RATE, batch=args.batch), gc_trace=args.gc_trace)
        try:
            for k, (target, ws, label) in enumerate(
                (("/events", False, "NDJSON"), ("/ws", True, "WS"))
            ):
                # the first case waits for the history (subscribers.history_records,
                # 100000 = 10 s at this rate) to fill: the steady state, as in production
                res = run_case(
                    svc,
                    label,
                    [(target, ws)],
                    warm + (HISTORY / LATENCY_RATE if k == 0 else 0),
                    lsecs,
                    latency=True,
                )
                c = res.clients[0]
                lat = c["latency_ns"]
                p50, p99 = _pct(lat, 0.5), _pct(lat, 0.99)
                mx = max(lat) if lat else float("nan")
                late = sum(1 for x in lat if x > TARGET_P99 * 1e9)
                dropped = int(res.dropped.get("ws" if ws else "ndjson", 0))
                print(
                    f"    {label:<14} client: p50 {_ms(p50)}, p99 {_ms(p99)}, max {_ms(mx)} over "
                    f"{len(lat):,} records ({len(lat) / c['seconds']:.0f}/s, {c['gaps']} gaps, "
                    f"{dropped} dropped); {late} records ({100 * late / max(len(lat), 1):.2f} %) "
                    f"over {TARGET_P99 * 1e3:g} ms"
                )
                print(f"    {'':<14} service histogram: {fmt_hist(res.hist)}")
                if args.gc_trace:
                    g2 = [d for _, g, d in res.gc if g == 2]
                    other = [d for _, g, d in res.gc if g != 2]
                    print(
                        f"    {'':<14} service GC pauses >= 1 ms in the window: gen 2: {len(g2)}"
                        + (
                            f" (max {max(g2) * 1e3:.1f} ms, total {sum(g2) * 1e3:.0f} ms)"
                            if g2
                            else ""
                        )
                        + f"; gen 0/1: {len(other)}"
                        + (f" (max {max(other) * 1e3:.1f} ms)" if other else "")
                    )
                print(f"    {'':<14} {fmt_cpu(res)}")
                hint = ""
                if p99 >= TARGET_P99 * 1e9 and not args.gc_trace:
                    hint = " (--gc-trace shows the service's GC pauses)"
                summary.append(
                    f"{verdict(p99 < TARGET_P99 * 1e9)}  p99 submit-to-write < "
                    f"{TARGET_P99 * 1e3:g} ms at {LATENCY_RATE} records/s, {label}: "
                    f"p99 {_ms(p99)} (p50 {_ms(p50)}, max {_ms(mx)}, "
                    f"{100 * late / max(len(lat), 1):.2f} % over {TARGET_P99 * 1e3:g} ms){hint}"
                )
        finally:
            svc.stop()
            svc.close()
        print()

    if args.profile:
        rate = ladder[-1] if ladder else 0
        prof = Path(tempfile.mkdtemp(prefix="ringstream-prof-")) / "service.prof"
        print(f"profile: NDJSON @{_rate(rate)} with the service under cProfile ({prof}):")
        svc = ServiceProc(config(rate, batch=args.batch), profile=prof)
        try:
            res = run_case(svc, "ndjson", [("/events", False)], warm, secs)
            for line in describe(res, ["NDJSON (prof)"]):
                print(line)
        finally:
            svc.stop()
            svc.close()
        st = pstats.Stats(str(prof))
        st.sort_stats("tottime").print_stats(20)

    print("targets (this machine):")
    for line in summary:
        print(f"  {line}")
    print(f"\n(total {time.monotonic() - t_begin:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
