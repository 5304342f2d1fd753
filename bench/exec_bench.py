"""The exec source, method "bpf" against method "proc", under a process-spawning load.

One command, every figure measured in the same run (about 40 s):

    .venv/bin/python bench/exec_bench.py           # --help: counts, spawners, rates

It starts the real service (`python -m service serve --port 0`, the port read
from its JSON "start" log line, as tests/servicectl.py does) with one exec
source and workers.count = 1, everything else the built-in defaults, and:

  load      --spawners processes (2) run `sh -c 'exit 0' MARK-<run>-<i>`
            back to back (os.posix_spawn, then waitpid), --count in all
            (20000), while one NDJSON subscriber (GET /events?type=exec,exit,
            a raw-socket client in its own process) collects what arrives:
            the exec records whose cmdline holds a mark, the exit records of
            the spawned pids (comm "sh", told apart by exec_id), and gap
            records. Once with method = "bpf", once with method = "proc"
            (interval 0.1 s, the default), the same load.
  latency   method "bpf" at a low, paced rate (--rate, 200 processes/s, one
            spawner): per marked exec record and its exit record, the client's
            time.time_ns() when the line is read minus the record's ts_ns (the
            kernel's event time, CLOCK_BOOTTIME moved to the wall clock): the
            kernel ring, the exec worker, the service's ring, the consumer
            (consumer.coalesce = 1 ms is in it), encoding, the socket.
  lossless  the highest spawn rate with no event lost (no gap record, no
            ringstream_bpf_events lost): the load's own rate when it lost
            nothing (the most this machine spawns), else paced runs below it.

The spawners are the load: on a 2-vCPU machine they share two cores with the
service, its exec worker and the client, so the spawn rate is the machine's
rate with the whole pipeline running (each case's CPU line shows the split).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import multiprocessing as mp
import os
import re
import select
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from e2e_bench import ServiceProc, _machine_cpu, _ms, _pct
from machine import describe as describe_machine

SH = "/bin/sh"
SPAWN_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
PROBE_SCRIPT = "sleep 0.3"  # outlives a /proc scan interval, so either method sees it
SETTLE = 1.5  # seconds without a new record, after the last spawn, that end a case
RECV = 1 << 20

CONFIG = """
[workers]
count = 1

[log]
format = "json"

[[sources]]
kind = "exec"
method = "{method}"
"""


# --- the subscriber (its own process) ----------------------------------------------


class Dechunker:
    """HTTP/1.1 chunked transfer coding, undone incrementally."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0  # data bytes left in the current chunk
        self.crlf = 0  # bytes of the CRLF after a chunk's data still to skip
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf, i, out = self.buf + data, 0, []
        while i < len(buf) and not self.done:
            if self.left:
                take = min(self.left, len(buf) - i)
                out.append(buf[i : i + take])
                i += take
                self.left -= take
                if not self.left:
                    self.crlf = 2
                continue
            if self.crlf:
                take = min(self.crlf, len(buf) - i)
                i += take
                self.crlf -= take
                continue
            j = buf.find(b"\r\n", i)
            if j < 0:
                break
            size = int(buf[i:j].split(b";")[0], 16)
            i = j + 2
            if size == 0:
                self.done = True
            self.left = size
        self.buf = buf[i:]
        return b"".join(out)


def _connect(port: int, target: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: application/x-ndjson\r\n\r\n".encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"closed before the response head: {buf[:200]!r}")
        buf += more
    end = buf.index(b"\r\n\r\n") + 4
    head = buf[:end].lower()
    if b" 200 " not in buf.split(b"\r\n", 1)[0] + b" ":
        raise ConnectionError(f"unexpected response: {buf[:end]!r}")
    if b"transfer-encoding: chunked" not in head:
        raise ConnectionError(f"expected a chunked response: {buf[:end]!r}")
    return sock, buf[end:]


def subscriber_main(port: int, tag: str, conn: Any) -> None:
    """Read /events?type=exec,exit until told the load is over and the stream went quiet.

    Sends "ready" once streaming, "probe" when the probe's exec record arrived,
    then, after ("done", settle) from the parent and `settle` seconds without a
    new exec record of a mark or exit record of an "sh", a dict of what came.
    """
    try:
        sock, first = _connect(port, "/events?type=exec,exit")
    except Exception as e:
        conn.send({"error": repr(e)})
        return
    conn.send("ready")
    mark = f"MARK-{tag}-".encode()
    probe = mark + b"probe"
    dechunk = Dechunker()
    tail = b""
    execs: list[tuple[int, bytes, int, int]] = []  # (index, exec_id, recv_ns, ts_ns)
    exits: list[tuple[int, bytes, int, int, int]] = []  # (pid, exec_id, code, recv_ns, ts_ns)
    lost = lost_exec = lost_exit = kernel_gaps = 0
    dropped = other_gaps = 0
    others = 0  # exec/exit records of other processes
    probed = False
    settle: float | None = None
    last_new = time.monotonic()
    pending = first
    closed = False
    while True:
        if pending:
            data, pending = pending, b""
        else:
            ready, _, _ = select.select([sock, conn], [], [], 0.05)
            if conn in ready:
                msg = conn.recv()
                if isinstance(msg, tuple) and msg[0] == "done":
                    settle = float(msg[1])
                    last_new = max(last_new, time.monotonic())
            if sock not in ready:
                if settle is not None and time.monotonic() - last_new >= settle:
                    break
                continue
            data = sock.recv(RECV)
            if not data:
                closed = True
                break
        recv_ns = time.time_ns()
        body = tail + dechunk.feed(data)
        cut = body.rfind(b"\n") + 1
        lines, tail = body[:cut], body[cut:]
        got = False
        for line in lines.split(b"\n"):
            if not line:
                continue
            if b'"type":"gap"' in line:
                g = orjson.loads(line)
                if g.get("reason") == "kernel_ring_full":
                    kernel_gaps += 1
                    lost += int(g.get("lost", 0))
                    lost_exec += int(g.get("lost_exec", 0))
                    lost_exit += int(g.get("lost_exit", 0))
                elif g.get("reason") == "slow_subscriber":
                    dropped += int(g.get("dropped") or 0)
                else:
                    other_gaps += 1
                continue
            if mark in line:
                r = orjson.loads(line)
                cmd = r.get("cmdline", "").encode()
                if r.get("type") == "exec" and mark in cmd:
                    word = cmd[cmd.index(mark) :].split(b" ", 1)[0]
                    if word == probe:
                        if not probed:
                            probed = True
                            conn.send("probe")
                        continue
                    execs.append(
                        (
                            int(word[len(mark) :]),
                            r["exec_id"].encode(),
                            recv_ns,
                            int(r["ts_ns"]),
                        )
                    )
                    got = True
                    continue
            if b'"type":"exit"' in line and b'"comm":"sh"' in line:
                r = orjson.loads(line)
                exits.append(
                    (r["pid"], r["exec_id"].encode(), r["exit_code"], recv_ns, int(r["ts_ns"]))
                )
                got = True
                continue
            others += 1
        if got:
            last_new = time.monotonic()
        if dechunk.done:
            closed = True
            break
    sock.close()
    conn.send(
        {
            "execs": execs,
            "exits": exits,
            "lost": lost,
            "lost_exec": lost_exec,
            "lost_exit": lost_exit,
            "kernel_gaps": kernel_gaps,
            "dropped": dropped,
            "other_gaps": other_gaps,
            "others": others,
            "closed_early": closed,
        }
    )


# --- the spawners (each its own process) -----------------------------------------------


def spawner_main(
    tag: str, first: int, n: int, rate: float, phase: float, go: Any, conn: Any
) -> None:
    """Spawn `sh -c 'exit 0' MARK-<tag>-<i>` for i in [first, first + n), one after the
    other (posix_spawn, waitpid), at `rate` per second from `phase` s after go (0: at once)."""
    pids = array.array("i")
    bad = 0
    conn.send("ready")
    go.wait()
    t0 = time.time_ns()
    m0 = time.monotonic() + phase
    for k in range(n):
        if rate:
            delay = m0 + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        pid = os.posix_spawn(SH, ["sh", "-c", "exit 0", f"MARK-{tag}-{first + k}"], SPAWN_ENV)
        _, status = os.waitpid(pid, 0)
        if status:
            bad += 1
        pids.append(pid)
    conn.send({"t0": t0, "t1": time.time_ns(), "pids": pids.tobytes(), "bad": bad})


def spawn_probe(tag: str) -> int:
    return os.posix_spawn(SH, ["sh", "-c", PROBE_SCRIPT, f"MARK-{tag}-probe"], SPAWN_ENV)


# --- one case ------------------------------------------------------------------------------


@dataclass
class Case:
    method: str
    spawned: int = 0
    bad: int = 0  # spawned processes that did not exit 0
    t0: int = 0  # wall ns: the first spawn
    t1: int = 0  # wall ns: the last spawner done
    pids: set[int] = field(default_factory=set)
    sub: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0  # % of all CPUs
    other: float = 0.0  # % of one core: busy time outside the processes above
    metrics_lost: float = 0.0  # ringstream_bpf_events lost, over the case
    metrics_sent: float = 0.0
    svc_dropped: float = 0.0  # ringstream_subscriber_dropped_records_total, ndjson

    # derived
    @property
    def seconds(self) -> float:
        return (self.t1 - self.t0) / 1e9

    @property
    def spawn_rate(self) -> float:
        return self.spawned / max(self.seconds, 1e-9)

    def marked_execs(self) -> dict[int, tuple[bytes, int, int]]:
        """index -> (exec_id, recv_ns, ts_ns), the first of each index."""
        out: dict[int, tuple[bytes, int, int]] = {}
        for idx, xid, recv, ts in self.sub["execs"]:
            out.setdefault(idx, (xid, recv, ts))
        return out

    def marked_exits(self) -> dict[bytes, tuple[int, int, int]]:
        """exec_id -> (exit_code, recv_ns, ts_ns), for exits of spawned pids."""
        out: dict[bytes, tuple[int, int, int]] = {}
        for pid, xid, code, recv, ts in self.sub["exits"]:
            if pid in self.pids:
                out.setdefault(xid, (code, recv, ts))
        return out


def _series_sum(text: str, name: str, *labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(x in line for x in labels):
            total += float(line.rpartition(" ")[2])
    return total


def _spawner_cpu(pids: list[int]) -> float:
    """The spawners' CPU and that of their reaped children (cutime, cstime), seconds."""
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def run_case(
    svc: ServiceProc,
    method: str,
    tag: str,
    count: int,
    spawners: int,
    rate: float,
    settle: float,
) -> Case:
    """`count` marked processes from `spawners` spawners (at `rate` in all, 0 = at once),
    one subscriber collecting; returns when the stream went quiet after the last spawn."""
    ctx = mp.get_context("spawn")
    case = Case(method)
    sub_end, sub_pipe = ctx.Pipe()
    sub = ctx.Process(target=subscriber_main, args=(svc.port, tag, sub_pipe), daemon=True)
    sub.start()
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        msg = sub_end.recv()
        if msg != "ready":
            raise RuntimeError(f"{method}: the subscriber failed: {msg}")
        # the probe: the pipeline is live (program attached, or first /proc scan done)
        deadline = time.monotonic() + 20
        probed = False
        while not probed:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method}: the probe process never showed in the stream")
            pid = spawn_probe(tag)
            probed = sub_end.poll(1.0)
            os.waitpid(pid, 0)
        if sub_end.recv() != "probe":
            raise RuntimeError(f"{method}: unexpected message from the subscriber")
        go = ctx.Event()
        share = [count // spawners + (1 if k < count % spawners else 0) for k in range(spawners)]
        first = 0
        for k, n in enumerate(share):
            a, b = ctx.Pipe()
            each = rate / spawners if rate else 0.0
            phase = k / rate if rate else 0.0
            p = ctx.Process(
                target=spawner_main, args=(tag, first, n, each, phase, go, b), daemon=True
            )
            p.start()
            procs.append(p)
            pipes.append(a)
            first += n
        for a in pipes:
            if a.recv() != "ready":
                raise RuntimeError("a spawner failed to start")
        m0 = svc.metrics()
        spawner_pids = [p.pid for p in procs]
        c0 = svc.cpu([sub.pid])
        s0 = _spawner_cpu(spawner_pids)
        go.set()
        results = [a.recv() for a in pipes]
        # read before the spawners exit (their /proc entries go with them)
        s1 = _spawner_cpu(spawner_pids)
        c1 = svc.cpu([sub.pid])  # CPU over the spawning window
        sub_end.send(("done", settle))
        case.sub = sub_end.recv()
        if "error" in case.sub:
            raise RuntimeError(f"{method}: the subscriber failed: {case.sub['error']}")
        m1 = svc.metrics()
    finally:
        for p in [*procs, sub]:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    case.spawned = sum(share)
    case.bad = sum(r["bad"] for r in results)
    case.t0 = min(r["t0"] for r in results)
    case.t1 = max(r["t1"] for r in results)
    for r in results:
        case.pids.update(array.array("i", r["pids"]))
    dt = c1.t - c0.t
    workers = set(svc.workers())
    for pid, t in c1.procs.items():
        t0 = c0.procs.get(pid)
        if t0 is None:
            continue
        who = "service" if pid == svc.pid else "exec worker" if pid in workers else "client"
        case.cpu[who] = case.cpu.get(who, 0.0) + 100 * (t - t0) / dt
    case.cpu["spawners+children"] = 100 * (s1 - s0) / max(case.seconds, 1e-9)
    if c1.total > c0.total:
        case.machine_busy = 100 * (c1.busy - c0.busy) / (c1.total - c0.total)
        ncpu = (c1.total - c0.total) / dt
        case.other = max(0.0, case.machine_busy * ncpu - sum(case.cpu.values()))
    name = "ringstream_bpf_events"
    case.metrics_lost = _series_sum(m1, name, 'outcome="lost"') - _series_sum(
        m0, name, 'outcome="lost"'
    )
    case.metrics_sent = _series_sum(m1, name, 'outcome="sent"') - _series_sum(
        m0, name, 'outcome="sent"'
    )
    drop = "ringstream_subscriber_dropped_records_total"
    case.svc_dropped = _series_sum(m1, drop, "ndjson") - _series_sum(m0, drop, "ndjson")
    return case


def start_service(method: str) -> ServiceProc:
    svc = ServiceProc(CONFIG.format(method=method))
    got = svc.start_entry.get("exec_method")
    if got is None:
        # the start line may not say: the metric does
        text = svc.metrics()
        got = next(
            (
                m.group(1)
                for m in re.finditer(r'^ringstream_exec_method\{method="(\w+)"\} 1', text, re.M)
            ),
            None,
        )
    if got is None and method == "proc":
        got = "proc"  # a service without the kernel side runs /proc whatever it is asked
    if got != method:
        svc.stop()
        svc.close()
        raise RuntimeError(
            f'method = "{method}" asked, the service runs {got!r} (is the kernel side wired, '
            "and are we root?)\n" + "\n".join(svc.lines[-10:])
        )
    return svc


# --- reporting -----------------------------------------------------------------------------


def _ratio(a: int, b: int) -> str:
    return f"{100 * a / b:.2f} %" if b else "n/a"


def summarize(case: Case) -> dict[str, Any]:
    execs = case.marked_execs()
    exits = case.marked_exits()
    s = case.sub
    last_exec = max((v[1] for v in execs.values()), default=case.t0)
    last_exit = max((v[1] for v in exits.values()), default=case.t0)
    codes0 = sum(1 for v in exits.values() if v[0] == 0)
    unknown = sum(1 for v in exits.values() if v[0] == -1)
    exec_ids = {v[0] for v in execs.values()}
    return {
        "execs": len(execs),
        "exits": len(exits),
        "dup_execs": len(s["execs"]) - len(execs),
        "paired": sum(1 for x in exits if x in exec_ids),
        "exec_rate": len(execs) / max((last_exec - case.t0) / 1e9, 1e-9),
        "exit_rate": len(exits) / max((last_exit - case.t0) / 1e9, 1e-9),
        "drain": max(0, max(last_exec, last_exit) - case.t1) / 1e9,
        "codes0": codes0,
        "unknown": unknown,
        "other_codes": len(exits) - codes0 - unknown,
    }


def fmt_cpu(case: Case) -> str:
    parts = ", ".join(f"{k} {v:.0f}%" for k, v in case.cpu.items())
    return (
        f"CPU (% of one core): {parts}, other {case.other:.0f}% (kernel threads, interrupts, "
        f"other tenants); machine {case.machine_busy:.0f}% busy"
    )


def table(rows: list[tuple[str, Case, dict[str, Any]]]) -> list[str]:
    head = (
        f"    {'method':<7}{'spawned':>9}{'spawn/s':>9}{'exec/s':>9}{'exit/s':>9}"
        f"{'execs seen':>13}{'exits seen':>13}{'exit 0':>8}{'exit -1':>8}{'lost':>7}"
        f"{'dropped':>9}"
    )
    out = [head, "    " + "-" * (len(head) - 4)]
    for name, c, s in rows:
        out.append(
            f"    {name:<7}{c.spawned:>9,}{c.spawn_rate:>9,.0f}{s['exec_rate']:>9,.0f}"
            f"{s['exit_rate']:>9,.0f}{_ratio(s['execs'], c.spawned):>13}"
            f"{_ratio(s['exits'], c.spawned):>13}{s['codes0']:>8,}{s['unknown']:>8,}"
            f"{c.sub['lost']:>7,}{max(c.sub['dropped'], int(c.svc_dropped)):>9,}"
        )
    return out


def details(name: str, c: Case, s: dict[str, Any]) -> list[str]:
    sub = c.sub
    out = [
        f"    {name}: {c.spawned:,} spawned in {c.seconds:.2f} s ({c.bad} exited non-zero); "
        f"{s['execs']:,} marked execs, {s['exits']:,} of their exits "
        f"({s['paired']:,} paired with an exec by exec_id, {s['other_codes']} other exit "
        f"codes, {s['dup_execs']} repeated execs); last record {s['drain']:.2f} s after the "
        f"last spawn; {sub['others']:,} records of other processes",
    ]
    if c.method == "bpf":
        out.append(
            f"    {'':<{len(name)}}  kernel: {c.metrics_sent:,.0f} events sent, "
            f"{c.metrics_lost:,.0f} lost (ringstream_bpf_events); {sub['kernel_gaps']} gap "
            f"records, lost {sub['lost']:,} (exec {sub['lost_exec']:,}, exit "
            f"{sub['lost_exit']:,})"
        )
    if sub["dropped"] or c.svc_dropped or sub["other_gaps"] or sub["closed_early"]:
        out.append(
            f"    {'':<{len(name)}}  SUBSCRIBER LOSSES: {sub['dropped']:,} in slow_subscriber "
            f"markers, {c.svc_dropped:,.0f} dropped (metrics), {sub['other_gaps']} other gap "
            f"markers{', stream closed early' if sub['closed_early'] else ''}"
        )
    out.append(f"    {'':<{len(name)}}  {fmt_cpu(c)}")
    return out


def lossless(c: Case) -> bool:
    return not c.sub["lost"] and not c.metrics_lost


# --- the run -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=20_000, help="processes spawned per load case")
    ap.add_argument("--spawners", type=int, default=2, help="parallel spawner processes")
    ap.add_argument(
        "--rate", type=float, default=200.0, help="processes/s of the latency case (paced)"
    )
    ap.add_argument(
        "--latency-seconds", type=float, default=10.0, help="length of the latency case"
    )
    ap.add_argument(
        "--load-rate",
        type=float,
        default=0.0,
        help="processes/s of the load cases in all (0: back to back, as fast as they go)",
    )
    ap.add_argument(
        "--ladder",
        default="0.75,0.5,0.25",
        help="if the bpf load lost events: the fractions of its spawn rate tried, paced, "
        "for the highest lossless one",
    )
    ap.add_argument("--only", default="", help="comma list of: bpf,proc,latency")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(","))) or {"bpf", "proc", "latency"}
    run = uuid.uuid4().hex[:8]
    t_begin = time.monotonic()

    print(f"machine: {describe_machine()}")
    b0 = _machine_cpu()
    time.sleep(0.5)
    b1 = _machine_cpu()
    idle_busy = 100 * (b1[0] - b0[0]) / max(b1[1] - b0[1], 1e-9)
    print(
        f"machine busy before the run: {idle_busy:.0f}%"
        + (" (other load: spawn rates will be low)" if idle_busy > 10 else "")
    )
    print(
        'config: [workers] count = 1; [[sources]] kind = "exec", method = "bpf" | "proc" '
        "(interval 0.1 s, bpf_ring_size 4 MiB: defaults); everything else built-in "
        "(ring 16 MiB, consumer.coalesce 1 ms, batch 4096; subscriber queue 50000 records / "
        "16 MiB, drop-oldest)"
    )
    load = "back to back" if not args.load_rate else f"paced at {args.load_rate:g}/s in all"
    print(
        f"load: {args.spawners} spawner processes, {args.count:,} `sh -c 'exit 0' MARK-{run}-<i>` "
        f"in all ({load}; posix_spawn + waitpid); one NDJSON subscriber "
        "(/events?type=exec,exit, own process); run "
        f"{run}\n"
    )
    rows: list[tuple[str, Case, dict[str, Any]]] = []
    bpf_case: Case | None = None
    proc_case: Case | None = None
    lat_case: Case | None = None
    ladder: list[tuple[float, Case]] = []

    if "bpf" in only or "latency" in only:
        svc = start_service("bpf")
        try:
            if "bpf" in only:
                bpf_case = run_case(
                    svc, "bpf", run + "b", args.count, args.spawners, args.load_rate, SETTLE
                )
                rows.append(("bpf", bpf_case, summarize(bpf_case)))
                if not lossless(bpf_case):
                    for frac in (float(x) for x in args.ladder.split(",") if x):
                        rate = frac * bpf_case.spawn_rate
                        c = run_case(
                            svc,
                            "bpf",
                            f"{run}l{len(ladder)}",
                            args.count,
                            args.spawners,
                            rate,
                            SETTLE,
                        )
                        ladder.append((rate, c))
                        if lossless(c):
                            break
            if "latency" in only:
                n = max(1, int(args.rate * args.latency_seconds))
                lat_case = run_case(svc, "bpf", run + "t", n, 1, args.rate, SETTLE)
        finally:
            svc.stop()
            svc.close()

    if "proc" in only:
        svc = start_service("proc")
        try:
            proc_case = run_case(
                svc, "proc", run + "p", args.count, args.spawners, args.load_rate, SETTLE
            )
            rows.append(("proc", proc_case, summarize(proc_case)))
        finally:
            svc.stop()
            svc.close()

    if rows:
        print(
            "load (exec/s, exit/s: marked records received / seconds from the first spawn to "
            "the last such record; seen: of the spawned; exit 0 / -1: exit codes of the exits "
            "seen; lost: gap records' lost; dropped: by the service for this subscriber):"
        )
        for line in table(rows):
            print(line)
        for name, c, s in rows:
            for line in details(name, c, s):
                print(line)
        print()

    if bpf_case is not None:
        if lossless(bpf_case):
            print(
                f"highest spawn rate with none lost (bpf): {bpf_case.spawn_rate:,.0f} processes/s "
                "- none lost at the max spawn rate this machine reaches "
                f"({args.spawners} spawners)"
            )
        else:
            for rate, c in ladder:
                s = summarize(c)
                print(
                    f"    bpf paced at {rate:,.0f}/s: achieved {c.spawn_rate:,.0f}/s, execs seen "
                    f"{_ratio(s['execs'], c.spawned)}, lost {c.sub['lost']:,}"
                )
            ok = [c.spawn_rate for _, c in ladder if lossless(c)]
            print(
                "highest spawn rate with none lost (bpf): "
                + (
                    f"{max(ok):,.0f} processes/s (paced); at the max rate, "
                    f"{bpf_case.spawn_rate:,.0f}/s, {bpf_case.sub['lost']:,} lost"
                    if ok
                    else f"not found: every rate tried lost events (max {bpf_case.spawn_rate:,.0f}"
                    "/s)"
                )
            )
    if bpf_case is not None and proc_case is not None:
        b, p = summarize(bpf_case), summarize(proc_case)

        def vs(a: int, b_: int) -> str:
            return f"x{a / b_:,.0f}" if b_ else "proc saw none"

        print(
            f"bpf vs proc capture, same load: marked execs {_ratio(b['execs'], bpf_case.spawned)}"
            f" vs {_ratio(p['execs'], proc_case.spawned)} ({vs(b['execs'], p['execs'])}); "
            f"exits {_ratio(b['exits'], bpf_case.spawned)} vs "
            f"{_ratio(p['exits'], proc_case.spawned)} ({vs(b['exits'], p['exits'])}); exits "
            f"with the real exit code {b['codes0']:,} vs {p['codes0']:,}"
        )
    if bpf_case is not None or proc_case is not None:
        print()

    if lat_case is not None:
        s = summarize(lat_case)
        execs = lat_case.marked_execs()
        exits = lat_case.marked_exits()
        le = [recv - ts for _, recv, ts in execs.values()]
        lx = [recv - ts for _, recv, ts in exits.values()]
        print(
            f"latency, bpf, paced at {args.rate:g} processes/s (1 spawner, {lat_case.spawned:,} "
            f"processes, achieved {lat_case.spawn_rate:,.0f}/s): client receive time "
            "(time.time_ns() when the line is read) - the record's ts_ns (kernel event time); "
            "consumer.coalesce 1 ms included:"
        )
        for label, lat in (("exec", le), ("exit", lx), ("both", le + lx)):
            print(
                f"    {label:<5} p50 {_ms(_pct(lat, 0.5))}, p99 {_ms(_pct(lat, 0.99))}, "
                f"max {_ms(max(lat) if lat else float('nan'))} over {len(lat):,} records"
            )
        print(
            f"    seen: execs {_ratio(s['execs'], lat_case.spawned)}, exits "
            f"{_ratio(s['exits'], lat_case.spawned)}, lost {lat_case.sub['lost']:,}; "
            f"{fmt_cpu(lat_case)}"
        )
        print()

    print(f"(total {time.monotonic() - t_begin:.0f} s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
