"""Stalled clients against the real service: what they cost the loop and memory.

    .venv/bin/python bench/stall_bench.py              # about 2 minutes
    .venv/bin/python bench/stall_bench.py --rates 5 --seconds 10

Starts `python -m service serve` on the built-in default configuration (its
synthetic source's rate set per case; the exec source as the defaults have
it), then for each case:

  stall     200 WebSocket + 200 NDJSON clients that send their request and
            never read (4 KiB receive buffers), one healthy WebSocket client
            that reads everything, and a probe that GETs /healthz every 20 ms
            on a keep-alive connection. Printed: the loop's longest stall over
            the window (ringstream_event_loop_lag_seconds, a 50 ms timer's
            lateness, and ..._max_seconds), /healthz latency p50/p99/max, what
            the healthy client got (records/s, gap markers: 0 means every
            record), the records dropped from the stalled ones, how many
            WebSockets were dropped as slow (missed pongs), the service's RSS
            and the kernel's TCP memory (/proc/net/sockstat).
  sigterm   SIGTERM with the stall case's clients connected: how long the
            whole exit took, against server.shutdown_timeout and the stop log.
  memory    1,000 stalled NDJSON clients on the defaults while 10,000
            records/s flow: RSS growth and the kernel's TCP memory growth,
            against what subscribers.memory_budget allows.

Nothing here is a pass/fail threshold: the figures are printed, with the
machine they come from (other tenants' load shows in them: rerun when a
figure is off).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from machine import describe as describe_machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servicectl import parse_metrics

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


class ServiceProc:
    def __init__(self, rate: float) -> None:
        self.dir = tempfile.mkdtemp(prefix="stall-bench-")
        builtin = (ROOT / "config" / "default.toml").read_text()
        config = builtin.replace("rate = 5\n", f"rate = {rate}\n", 1)
        path = Path(self.dir) / "ringstream.toml"
        path.write_text(config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--config", str(path), "--port", "0"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        self.port = 0
        for line in self.proc.stderr:
            entry = json.loads(line)
            if entry.get("event") == "start":
                self.port = int(entry["port"])
                break
        if not self.port:
            raise SystemExit("the service did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.stop_log: dict[str, object] | None = None
        for line in self.proc.stderr:
            if b'"event": "stop"' in line or b'"event":"stop"' in line:
                self.stop_log = json.loads(line)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=60) as r:
            text = r.read().decode()
        return parse_metrics(text)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def tcp_mem() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * PAGE
    return 0


def stalled(port: int, path: str, ws: bool) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if ws:
        key = base64.b64encode(os.urandom(16)).decode()
        head += (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
    s.sendall((head + "\r\n").encode())
    return s


class Healthy(threading.Thread):
    """A WebSocket client that reads every frame: records and gap markers counted."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = stalled(port, "/ws", ws=True)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.records = 0
        self.gaps = 0
        self.stop = False

    def run(self) -> None:
        f = self.sock.makefile("rb", buffering=1 << 20)
        while f.readline() not in (b"\r\n", b""):
            pass  # the 101 head
        while not self.stop:
            h = f.read(2)
            if len(h) < 2:
                return
            n = h[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", f.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", f.read(8))[0]
            payload = f.read(n)
            if h[0] & 0x0F == 0x9:  # ping: answer, masked as a client must
                mask = os.urandom(4)
                body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self.sock.sendall(bytes((0x8A, 0x80 | len(payload))) + mask + body)
            elif h[0] & 0x0F == 0x1:
                if payload.startswith(b'{"type":"gap'):
                    self.gaps += 1
                else:
                    self.records += 1


def lag_window(before: dict[str, float], after: dict[str, float]) -> tuple[int, str]:
    """Timer ticks over the window and the bucket the slowest fell in."""
    name = "ringstream_event_loop_lag_seconds_bucket"
    buckets = sorted(
        (float(k.split('le="')[1].split('"')[0]), after[k] - before.get(k, 0))
        for k in after
        if k.startswith(name)
    )
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= total:
            return int(total), f"<= {le * 1000:g} ms"
    return int(total), "?"


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def stall_case(rate: float, n_ws: int, n_nd: int, seconds: float) -> None:
    svc = ServiceProc(rate)
    socks: list[socket.socket] = []
    try:
        for _ in range(n_ws):
            socks.append(stalled(svc.port, "/ws", ws=True))
        for _ in range(n_nd):
            socks.append(stalled(svc.port, "/events", ws=False))
        healthy = Healthy(svc.port)
        healthy.start()
        time.sleep(1.0)  # let every stalled socket fill its buffers
        before = svc.metrics()
        rec0 = healthy.records
        probe = socket.create_connection(("127.0.0.1", svc.port))
        probe.settimeout(30)
        lat: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"}" not in got:
                got += probe.recv(4096)
            lat.append(time.monotonic() - t)
            time.sleep(0.02)
        after = svc.metrics()
        got_records = healthy.records - rec0
        ticks, worst = lag_window(before, after)
        dropped = sum(
            after.get(f'ringstream_subscriber_dropped_records_total{{transport="{t}"}}', 0)
            for t in ("ndjson", "ws")
        )
        slow = after.get('ringstream_subscriber_disconnects_total{reason="slow"}', 0)
        print(
            f"  rate {rate:>6g}/s  {n_ws} WS + {n_nd} NDJSON stalled, {seconds:g} s window\n"
            f"    loop stalls: {ticks} ticks, the longest {worst}; longest since start "
            f"{after['ringstream_event_loop_lag_max_seconds'] * 1000:.1f} ms\n"
            f"    /healthz: p50 {pct(lat, 0.5) * 1000:.1f} ms, p99 {pct(lat, 0.99) * 1000:.1f} ms, "
            f"max {max(lat) * 1000:.1f} ms over {len(lat)} requests\n"
            f"    healthy WS client: {got_records / seconds:,.0f} records/s, "
            f"{healthy.gaps} gap markers\n"
            f"    stalled: {dropped:,.0f} records dropped (counted), {slow:.0f} WebSockets "
            f"dropped as slow; queued {after['ringstream_subscriber_queued_bytes'] / 2**20:.0f} "
            f"MiB counted\n"
            f"    service RSS {svc.rss() / 2**20:.0f} MiB; kernel TCP memory "
            f"{tcp_mem() / 2**20:.0f} MiB"
        )
        healthy.stop = True
    finally:
        for s in socks:
            s.close()
        svc.stop()


def memory_case(n: int, rate: float, seconds: float) -> None:
    svc = ServiceProc(rate)
    socks: list[socket.socket] = []
    try:
        time.sleep(1.0)
        rss0, tcp0 = svc.rss(), tcp_mem()
        for i in range(n):
            socks.append(stalled(svc.port, "/events", ws=False))
            if i % 100 == 99:
                time.sleep(0.05)  # within the listen backlog
        time.sleep(seconds)
        m = svc.metrics()
        grown, tcp = svc.rss() - rss0, tcp_mem() - tcp0
        print(
            f"  {n} stalled NDJSON clients, {rate:g} records/s for {seconds:g} s: "
            f"RSS +{grown / 2**20:.0f} MiB ({grown / n / 1024:.0f} KiB each), kernel TCP "
            f"memory +{tcp / 2**20:.0f} MiB ({tcp / n / 1024:.0f} KiB each); queues "
            f"{m['ringstream_subscriber_queued_bytes'] / 2**20:.0f} MiB counted "
            f"(budget 256 MiB), "
            f"{m['ringstream_subscriber_budget_dropped_records_total']:,.0f} records "
            f"dropped by the budget"
        )
    finally:
        for s in socks:
            s.close()
        svc.stop()


def sigterm_case(rate: float, n_ws: int, n_nd: int) -> None:
    """SIGTERM with every stalled client still connected: the whole exit
    (streams ended, workers joined, the interpreter gone) against
    server.shutdown_timeout and what the stop log says it took."""
    svc = ServiceProc(rate)
    socks = [stalled(svc.port, "/ws", ws=True) for _ in range(n_ws)]
    socks += [stalled(svc.port, "/events", ws=False) for _ in range(n_nd)]
    try:
        time.sleep(2.0)  # every stalled socket's buffers full, queues cut
        t = time.monotonic()
        svc.proc.terminate()
        code = svc.proc.wait(timeout=60)
        took = time.monotonic() - t
        time.sleep(0.2)  # the stderr reader's last line
        logged = svc.stop_log.get("seconds") if svc.stop_log else None
        print(
            f"  rate {rate:g}/s, {n_ws} WS + {n_nd} NDJSON stalled: exit {code} "
            f"{took:.2f} s after SIGTERM (server.shutdown_timeout 7.0 s); the stop log "
            f"says {logged} s"
        )
    finally:
        for s in socks:
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="5,10000,0", help="synthetic rates, records/s (0: max)")
    ap.add_argument("--seconds", type=float, default=20.0, help="window per stall case")
    ap.add_argument("--ws", type=int, default=200, help="stalled WebSocket clients")
    ap.add_argument("--ndjson", type=int, default=200, help="stalled NDJSON clients")
    ap.add_argument("--memory-clients", type=int, default=1000, help="0: skip the memory case")
    args = ap.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(describe_machine())
    print("config: the built-in defaults, the synthetic source's rate per case")
    print("stall:")
    for rate in (float(r) for r in args.rates.split(",")):
        stall_case(rate, args.ws, args.ndjson, args.seconds)
    print("sigterm:")
    sigterm_case(10_000, args.ws, args.ndjson)
    if args.memory_clients:
        print("memory:")
        memory_case(args.memory_clients, 10_000, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
