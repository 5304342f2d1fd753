"""The exec source on BPF, end to end: the real kernel, real processes, the real service.

exec.bpf.c is loaded by the service (method "bpf"), short-lived processes
run here, and the records are read back over /events: every process's exec
(with its MARK in cmdline) and its exit (the exact code, or 128 + the
signal), exec before exit. A ring too small for a burst (the worker held
with SIGSTOP) shows the lost count in gap records equal to the program's
own counter, and nothing else lost. Without CAP_BPF/CAP_PERFMON (setpriv),
"auto" falls back to /proc with its log line and "bpf" exits with status 2
naming the capability.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from kernelbpf import bpf_denied
from servicectl import BASE_CONFIG, Service, http_get, run_cli

OBJECT = Path(__file__).resolve().parent.parent / "service" / "sources" / "exec" / "exec.bpf.o"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "loading a tracing BPF program needs root"
    if not OBJECT.exists():
        return f"{OBJECT.name} not built (needs clang and libbpf-dev at install)"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "the kernel has no BTF"
    return bpf_denied()


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

DROP_CAPS = (
    "setpriv",
    "--bounding-set",
    "-bpf,-perfmon,-sys_admin",
    "--inh-caps",
    "-bpf,-perfmon,-sys_admin",
)


def exec_config(**keys: Any) -> str:
    lines = "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in keys.items())
    return BASE_CONFIG + f'\n[[sources]]\nkind = "exec"\n{lines}\n'


class Stream:
    """Every record `curl -N` prints for an NDJSON stream, read by a thread, with waits.

    Open it with ?from=0: the history then holds what happened before curl
    connected, so the test need not wait for the connection."""

    def __init__(self, url: str) -> None:
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._curl = subprocess.Popen(["curl", "-N", "-s", url], stdout=subprocess.PIPE)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._curl.stdout is not None
        for line in self._curl.stdout:
            rec = orjson.loads(line)
            with self._cond:
                self.records.append(rec)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait(self, cond: Callable[[list[dict[str, Any]]], bool], what: str, timeout=60.0) -> None:
        """Until cond(records) holds; the timeout only guards against a hang."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond(self.records):
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    kinds = collections.Counter(r["type"] for r in self.records)
                    raise AssertionError(f"{what}: not seen in the records: {kinds}")
                self._cond.wait(left)

    def close(self) -> None:
        self._curl.kill()
        self._curl.wait()
        self._thread.join(timeout=10)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metric_values(svc: Service, name: str) -> dict[str, float]:
    """{label text: value} of one metric family from /metrics."""
    status, body = http_get(svc.url("/metrics"))
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("execbpf")
    with Service(tmp, exec_config(method="bpf")) as s:
        yield s
        assert s.terminate() == 0
        assert s.errors() == []


SIGNALS = ("TERM", "KILL", "HUP", "USR1", "ALRM")


def test_every_short_lived_process_has_its_exec_and_exit(svc: Service) -> None:
    start = svc.wait_log("start")
    assert start["exec_method"] == "bpf"
    run = uuid.uuid4().hex[:8]
    expected: dict[str, int] = {}  # mark -> exit code
    with Stream(svc.url("/events?type=exec,exit&from=0")) as st:
        for i in range(500):
            mark = f"MARK-{run}-{i}"
            code = i % 120
            p = subprocess.Popen(["sh", "-c", f"exit {code}", mark])
            assert p.wait() == code
            expected[mark] = code
        for i in range(10):
            mark = f"MARK-{run}-sig{i}"
            sig = SIGNALS[i % len(SIGNALS)]
            p = subprocess.Popen(["sh", "-c", f"kill -s {sig} $$", mark])
            assert p.wait() == -getattr(signal, f"SIG{sig}")
            expected[mark] = 128 + getattr(signal, f"SIG{sig}")

        def all_seen(records: list[dict[str, Any]]) -> bool:
            execs = {r["exec_id"] for r in records if r["type"] == "exec" and run in r["cmdline"]}
            exits = {r["exec_id"] for r in records if r["type"] == "exit"}
            return len(execs) == len(expected) and execs <= exits

        st.wait(all_seen, f"exec and exit records of {len(expected)} processes")
        records = list(st.records)
    gaps = [r for r in records if r["type"] == "gap"]
    assert gaps == []
    execs = {}
    for r in records:
        if r["type"] == "exec" and run in r["cmdline"]:
            mark = r["cmdline"].split()[-1]
            assert mark not in execs, f"two exec records for {mark}"
            execs[mark] = r
    assert set(execs) == set(expected)
    exits = {r["exec_id"]: r for r in records if r["type"] == "exit"}
    for mark, code in expected.items():
        ex = execs[mark]
        assert ex["comm"] == "sh" and os.path.basename(ex["filename"]) in ("sh", "dash", "bash")
        assert ex["ppid"] == os.getpid() and ex["uid"] == os.getuid()
        assert ex["exec_id"].startswith(f"{ex['pid']}-") and ex["truncated"] == 0
        assert ex["cmdline"].startswith("sh -c ") and ex["cmdline"].endswith(f" {mark}")
        xt = exits[ex["exec_id"]]
        assert xt["pid"] == ex["pid"] and xt["comm"] == "sh"
        assert xt["exit_code"] == code, mark
        assert xt["id"] > ex["id"], f"{mark}: exit before exec"
        assert 0 < xt["lifetime_ns"] < 60e9


EXEC_FROM_A_THREAD = """
import os, sys, threading
def run():
    os.execv("/bin/sh", ["sh", "-c", "exit 4", sys.argv[1]])
threading.Thread(target=run).start()
threading.Event().wait()
"""


def test_a_thread_that_execs_gives_one_exit_with_the_code(svc: Service) -> None:
    """execve from a non-main thread ends the old leader (de_thread): that is no
    exit of the process, which exits once, with the exec'd program's code."""
    mark = f"THREAD-{uuid.uuid4().hex[:8]}"
    with Stream(svc.url("/events?type=exec,exit&from=0")) as st:
        p = subprocess.Popen([sys.executable, "-c", EXEC_FROM_A_THREAD, mark])
        assert p.wait() == 4

        def ours(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            ids = {
                r["exec_id"]
                for r in rs
                if r["type"] == "exec" and r["cmdline"].split()[-1:] == [mark]
            }
            return [r for r in rs if r["type"] == "exit" and r["exec_id"] in ids]

        st.wait(lambda rs: bool(ours(rs)), "the exit")
        # one more process through the same CPU-ordered stream: anything of
        # ours it would have sent is in by the time this one's exit is
        subprocess.run(["sh", "-c", "exit 0", f"{mark}-after"], check=True)
        st.wait(lambda rs: any(f"{mark}-after" in r.get("cmdline", "") for r in rs), "after")
        exits = ours(st.records)
    assert [(e["pid"], e["exit_code"]) for e in exits] == [(p.pid, 4)]


def test_long_argv_is_cut_and_flagged(svc: Service) -> None:
    mark = f"LONG-{uuid.uuid4().hex[:8]}"
    with Stream(
        svc.url(f"/events?from=0&type=exec&field.cmdline=sh%20-c%20exit%200%20{mark}*")
    ) as st:
        subprocess.run(["sh", "-c", "exit 0", mark, "x" * 400], check=True)
        st.wait(lambda rs: any(mark in r["cmdline"] for r in rs), "the long exec")
        rec = next(r for r in st.records if mark in r["cmdline"])
    assert rec["truncated"] == 1 and len(rec["cmdline"].encode()) == 256


def test_metrics_export_the_kernel_ring_and_the_program_counts(
    svc: Service, tmp_path: Path
) -> None:
    sizes = metric_values(svc, "ringstream_kernel_ring_size_bytes")
    assert sizes == {'{source="exec"}': 4 << 20}
    for name in (
        "ringstream_kernel_ring_available_bytes",
        "ringstream_kernel_ring_consumer_position_bytes_total",
        "ringstream_kernel_ring_producer_position_bytes_total",
    ):
        assert '{source="exec"}' in metric_values(svc, name), name
    events = metric_values(svc, "ringstream_bpf_events_total")
    assert events['{outcome="sent",source="exec",type="exec"}'] > 0
    assert events['{outcome="lost",source="exec",type="exec"}'] == 0
    assert metric_values(svc, "ringstream_exec_method") == {'{method="bpf"}': 1.0}
    if shutil.which("promtool"):
        _, body = http_get(svc.url("/metrics"))
        r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert r.returncode == 0, r.stdout + r.stderr


def _worker_pids(service_pid: int) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{service_pid}/task"):
        with open(f"/proc/{service_pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        # a worker's title (setproctitle), or its spawn command line before it is set
        if cmd.startswith(b"ringstream: worker") or b"spawn_main" in cmd:
            out.append(pid)
    return out


def test_a_ring_too_small_for_a_burst_counts_every_loss_in_the_stream(tmp_path: Path) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    with Service(tmp_path, exec_config(method="bpf", bpf_ring_size=page)) as svc:
        run = uuid.uuid4().hex[:8]
        n = 200
        with Stream(svc.url("/events?from=0")) as st:
            # a record through the worker: it runs (its pid is its own by now)
            subprocess.run(["sh", "-c", "exit 0", f"READY-{run}"], check=True)
            st.wait(
                lambda rs: any(f"READY-{run}" in r.get("cmdline", "") for r in rs), "a first exec"
            )
            (worker,) = _worker_pids(svc.proc.pid)
            # the worker held, the kernel ring (a page: 8 exec records) fills
            os.kill(worker, signal.SIGSTOP)
            try:
                for i in range(n):
                    subprocess.run(["sh", "-c", "exit 0", f"LOSS-{run}-{i}"], check=True)
            finally:
                os.kill(worker, signal.SIGCONT)

            def counted(records: list[dict[str, Any]]) -> bool:
                ev = metric_values(svc, "ringstream_bpf_events_total")
                want = {
                    (t, o): ev[f'{{outcome="{o}",source="exec",type="{t}"}}']
                    for t in ("exec", "exit")
                    for o in ("sent", "lost")
                }
                got = {
                    ("exec", "sent"): sum(1 for r in records if r["type"] == "exec"),
                    ("exit", "sent"): sum(1 for r in records if r["type"] == "exit"),
                    ("exec", "lost"): sum(r["lost_exec"] for r in records if r["type"] == "gap"),
                    ("exit", "lost"): sum(r["lost_exit"] for r in records if r["type"] == "gap"),
                }
                return want[("exec", "lost")] > 0 and got == want

            # the counters and the stream agree once the worker caught up (other
            # processes of this machine may exec meanwhile: wait for agreement)
            st.wait(counted, "gap records summing to the program's loss counters")
            records = list(st.records)
            # a restarted worker goes on from what was reported: no loss twice
            os.kill(worker, signal.SIGKILL)
            svc.wait_log("worker_restart")
            subprocess.run(["sh", "-c", "exit 0", f"AGAIN-{run}"], check=True)
            st.wait(
                lambda rs: any(f"AGAIN-{run}" in r.get("cmdline", "") for r in rs), "after restart"
            )
            st.wait(counted, "the same loss counts after the worker's restart")
            records = list(st.records)
        assert svc.terminate() == 0
    gaps = [r for r in records if r["type"] == "gap"]
    assert all(g["reason"] == "kernel_ring_full" and g["source"] == "exec" for g in gaps)
    assert all(g["lost"] == g["lost_exec"] + g["lost_exit"] > 0 for g in gaps)
    seen = [r for r in records if r["type"] == "exec" and f"LOSS-{run}-" in r["cmdline"]]
    assert 0 < len(seen) < n
    # every LOSS process is either in the stream or among the counted losses
    assert len(seen) + sum(g["lost_exec"] for g in gaps) >= n
    # the losses are reported after the records that made it in before them
    first_gap = min(g["id"] for g in gaps)
    assert first_gap > min(r["id"] for r in seen)


def test_auto_without_capabilities_falls_back_to_proc(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    with Service(
        tmp_path, exec_config(method="auto", interval=0.02, existing=True), wrap=DROP_CAPS
    ) as svc:
        line = svc.wait_log("exec_method_fallback")
        assert line["level"] == "warning" and "CAP_BPF" in line["msg"]
        assert svc.wait_log("start")["exec_method"] == "proc"
        assert metric_values(svc, "ringstream_exec_method") == {'{method="proc"}': 1.0}
        assert sum(1 for e in svc.logs if e.get("event") == "exec_method_fallback") == 1
        mark = f"PROC-{uuid.uuid4().hex[:8]}"
        with Stream(svc.url("/events?type=exec&from=0")) as st:
            p = subprocess.Popen(["sh", "-c", "read x", mark], stdin=subprocess.PIPE)
            try:
                st.wait(lambda rs: any(mark in r["cmdline"] for r in rs), "the /proc exec record")
            finally:
                p.communicate(b"\n")
        assert svc.terminate() == 0


def test_bpf_without_capabilities_fails_the_start_naming_them(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    cfg = tmp_path / "c.toml"
    cfg.write_text(exec_config(method="bpf"))
    env = {"RINGSTREAM_SERVER_PORT": "0"}
    out = run_cli("serve", "--config", str(cfg), env=env, wrap=DROP_CAPS)
    assert out.returncode == 2, out.stderr
    assert 'sources[0].method = "bpf"' in out.stderr
    assert "CAP_BPF and CAP_PERFMON" in out.stderr and "--cap-add BPF" in out.stderr


def test_existing_processes_are_reported_at_start_on_bpf_too(tmp_path: Path) -> None:
    mark = f"EXIST-{uuid.uuid4().hex[:8]}"
    before = subprocess.Popen(["sh", "-c", "read x", mark], stdin=subprocess.PIPE)
    try:
        with Service(tmp_path, exec_config(method="bpf", existing=True)) as svc:
            with Stream(svc.url("/events?type=exec,exit&from=0")) as st:
                st.wait(
                    lambda rs: any(mark in r.get("cmdline", "") for r in rs), "the existing one"
                )
                (rec,) = [r for r in st.records if mark in r.get("cmdline", "")]
                assert rec["pid"] == before.pid
                before.communicate(b"\n")
                # its exit, from the BPF program, carries the same exec_id
                st.wait(
                    lambda rs: any(
                        r["type"] == "exit" and r["exec_id"] == rec["exec_id"] for r in rs
                    ),
                    "its exit",
                )
            assert svc.terminate() == 0
    finally:
        before.kill()
        before.wait()
