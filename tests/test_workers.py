"""Worker processes and their supervisor: real (spawned) processes, a real ring.

Waits are on conditions (records arrived, a process exited) with generous
upper bounds; no assertion depends on how fast anything ran.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
import tomllib
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

import ringcore
from service.record import HEADER, MAGIC, parse_header
from service.sources import exec as exec_source
from service.sources import gap, plugin, synthetic
from service.workers import (
    EX_CONFIG,
    SourceConfigError,
    Supervisor,
    WorkerSpec,
    plan_workers,
    worker_main,
)

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # upper bound on any wait: only reached when something is broken
SPAWN = multiprocessing.get_context("spawn")


# --- helpers ----------------------------------------------------------------


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


async def async_until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def start_worker(ring: ringcore.Ring, spec: WorkerSpec) -> multiprocessing.process.BaseProcess:
    p = SPAWN.Process(target=worker_main, args=(ring, spec), daemon=True)
    p.start()
    return p


def stop_worker(p: multiprocessing.process.BaseProcess) -> int | None:
    p.terminate()
    p.join(WAIT)
    return p.exitcode


@pytest.fixture
def workers() -> Iterator[list[multiprocessing.process.BaseProcess]]:
    """Worker processes a test starts; any still running at the end are killed."""
    procs: list[multiprocessing.process.BaseProcess] = []
    yield procs
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(WAIT)


def spec(kind: str, **options: Any) -> WorkerSpec:
    """The spec of a single-instance source, through plan_workers."""
    (s,) = plan_workers([{"kind": kind, **options}], 1)
    return s


def decode_synthetic(rec: bytes) -> tuple[str, int, int]:
    """(kind, worker, seq) of a synthetic source record, checking what it can."""
    if rec[:4] == synthetic.RAW_MAGIC:
        _, worker, zero, seq, _ = synthetic.RAW.unpack_from(rec)
        assert zero == 0 and parse_header(rec) is None
        return "raw", worker, seq
    head = parse_header(rec)
    assert head is not None, rec[:16]
    type_id, _ = head
    if type_id == synthetic.SYNTHETIC_TYPE:
        assert len(rec) == synthetic.SYNTHETIC.size
        _, _, _, _, seq, worker, level, value, label, _token = synthetic.SYNTHETIC.unpack(rec)
        assert level == seq % 4 and value == seq / 1000
        assert label.rstrip(b"\0") == f"synthetic-{worker}".encode()
        return "synthetic", worker, seq
    assert type_id == synthetic.BLOB_TYPE, type_id
    _, _, _, _, seq, worker, digest = synthetic.BLOB.unpack_from(rec)
    assert hashlib.blake2b(rec[synthetic.BLOB.size :], digest_size=16).digest() == digest
    return "synthetic_blob", worker, seq


def assert_contiguous(seqs: dict[int, list[int]], workers: int) -> None:
    assert sorted(seqs) == list(range(workers))
    for worker, got in seqs.items():
        assert got == list(range(len(got))), f"worker {worker}: seqs not 0, 1, 2, ..."


# --- record layouts against config/schemas.toml ----------------------------

_CODES = {
    "u8": "B",
    "u16": "H",
    "u32": "I",
    "u64": "Q",
    "i8": "b",
    "i16": "h",
    "i32": "i",
    "i64": "q",
    "f32": "f",
    "f64": "d",
}


def schema_format(fields: list[dict[str, Any]]) -> str:
    out = HEADER.format  # "<2sHIQ"
    for f in fields:
        if f["kind"] in _CODES:
            out += _CODES[f["kind"]]
        else:
            out += f"{f['size']}{'x' if f['kind'] == 'pad' else 's'}"
    return out


def test_struct_formats_match_schemas_toml() -> None:
    schemas = tomllib.loads((ROOT / "config" / "schemas.toml").read_text())["schemas"]
    by_type = {s["type"]: s for s in schemas}
    ours = {
        exec_source.EXEC_TYPE: exec_source.EXEC,
        exec_source.EXIT_TYPE: exec_source.EXIT,
        synthetic.SYNTHETIC_TYPE: synthetic.SYNTHETIC,
        synthetic.BLOB_TYPE: synthetic.BLOB,
        gap.GAP_TYPE: gap.GAP,
    }
    for type_id, layout in ours.items():
        expected = struct.Struct(schema_format(by_type[type_id]["fields"]))
        assert layout.format == expected.format, by_type[type_id]["name"]
    assert synthetic.SYNTHETIC.size == 64


# --- plan_workers -------------------------------------------------------------


def test_plan_default_config() -> None:
    sources = tomllib.loads((ROOT / "config" / "default.toml").read_text())["sources"]
    specs = plan_workers(sources, 4)
    # exec in one worker, synthetic ("auto") in the other three, the rate split
    assert [(s.kind, s.instance, s.instances, s.index) for s in specs] == [
        ("exec", 0, 1, 0),
        ("synthetic", 0, 3, 1),
        ("synthetic", 1, 3, 1),
        ("synthetic", 2, 3, 1),
    ]
    assert specs[0].options == {
        "method": "auto",
        "interval": 0.1,
        "existing": False,
        "bpf_ring_size": 4 << 20,
    }
    assert sum(s.options["rate"] for s in specs[1:]) == pytest.approx(5.0)
    assert all(s.options["size"] == 64 for s in specs[1:])


def test_plan_auto_takes_the_spare_workers_and_splits_the_rate() -> None:
    specs = plan_workers(
        [{"kind": "exec"}, {"kind": "synthetic", "instances": "auto", "rate": 9}], 4
    )
    syn = [s for s in specs if s.kind == "synthetic"]
    assert [s.instance for s in syn] == [0, 1, 2]
    assert all(s.instances == 3 and s.options["rate"] == 3.0 for s in syn)
    assert sum(1 for s in specs if s.kind == "exec") == 1


def test_plan_auto_sources_share_and_get_at_least_one() -> None:
    two_autos = [
        {"kind": "exec"},
        {"kind": "synthetic", "instances": "auto"},
        {"kind": "plugin", "target": "m:f", "instances": "auto"},
    ]
    counts = [s.instances for s in plan_workers(two_autos, 6)]
    assert counts == [1, 3, 3, 3, 2, 2]  # 5 spare: the first auto takes the remainder
    # no spare worker left: an auto source still runs once
    specs = plan_workers([{"kind": "exec"}, {"kind": "synthetic", "instances": "auto"}], 1)
    assert [s.kind for s in specs] == ["exec", "synthetic"]


def test_plan_count_zero_is_one_per_cpu() -> None:
    specs = plan_workers([{"kind": "synthetic", "instances": "auto"}], 0)
    assert len(specs) == (os.cpu_count() or 1)


def test_plan_plugin_options() -> None:
    s = spec("plugin", target="pkg.mod:fn", options={"a": 1})
    assert s.options == {"target": "pkg.mod:fn", "options": {"a": 1}}
    assert s.name == "plugin[0]"


@pytest.mark.parametrize(
    ("sources", "count", "message"),
    [
        (
            [{"kind": "exec"}, {"kind": "synthetic", "rate": -5}],
            4,
            "sources[1].rate: must be >= 0, got -5",
        ),
        (
            [{"kind": "exec"}, {"kind": "synthetic", "instances": 1}],
            1,
            "workers.count: 1 worker cannot run 2 fixed source instances (exec: 1, synthetic: 1)",
        ),
        (
            [{"kind": "synthetic", "instances": 3}],
            2,
            "workers.count: 2 workers cannot run 3 fixed source instances (synthetic: 3)",
        ),
        (
            [{"kind": "kafka"}],
            1,
            "sources[0].kind: unknown source kind (known: bpf-ringbuf, exec, plugin, synthetic)",
        ),
        ([{"rate": 1}], 1, "sources[0].kind: missing"),
        (
            [{"kind": "synthetic", "speed": 3}],
            1,
            "sources[0].speed: unknown key for kind 'synthetic' "
            "(known: instances, rate, size, mix)",
        ),
        ([{"kind": "exec", "rate": 3}], 1, "sources[0].rate: unknown key for kind 'exec'"),
        ([{"kind": "synthetic", "size": 32}], 1, "sources[0].size: must be >= 64, got 32"),
        ([{"kind": "synthetic", "size": 64.5}], 1, "sources[0].size: must be an integer, got 64.5"),
        ([{"kind": "synthetic", "rate": True}], 1, "sources[0].rate: must be a number, got True"),
        ([{"kind": "synthetic", "rate": "fast"}], 1, "sources[0].rate: must be a number"),
        (
            [{"kind": "synthetic", "mix": {"json": 1}}],
            1,
            "sources[0].mix.json: unknown record kind",
        ),
        (
            [{"kind": "synthetic", "mix": {"raw": -1}}],
            1,
            "sources[0].mix.raw: must be >= 0, got -1",
        ),
        (
            [{"kind": "synthetic", "mix": {"raw": 0}}],
            1,
            "sources[0].mix: needs at least one weight > 0",
        ),
        ([{"kind": "synthetic", "instances": 0}], 1, "sources[0].instances: must be >= 1, got 0"),
        (
            [{"kind": "synthetic", "instances": "all"}],
            1,
            "sources[0].instances: must be an integer",
        ),
        (
            [{"kind": "exec", "instances": 2}],
            2,
            "sources[0].instances: an exec source runs exactly 1",
        ),
        ([{"kind": "exec", "interval": 0}], 1, "sources[0].interval: must be > 0, got 0"),
        ([{"kind": "exec", "existing": "yes"}], 1, "sources[0].existing: must be true or false"),
        ([{"kind": "exec"}, {"kind": "exec"}], 2, "sources[1].kind: only one exec source may run"),
        ([{"kind": "plugin"}], 1, "sources[0].target: missing"),
        (
            [{"kind": "plugin", "target": "nocolon"}],
            1,
            'sources[0].target: must be "module:function"',
        ),
        (
            [{"kind": "plugin", "target": "m:f", "options": 3}],
            1,
            "sources[0].options: must be a table",
        ),
        ([{"kind": "exec"}], -1, "workers.count: must be an integer >= 0, got -1"),
        (["exec"], 1, "sources[0]: must be a table, got 'exec'"),
    ],
)
def test_plan_errors_name_the_key(sources: list[Any], count: int, message: str) -> None:
    with pytest.raises(SourceConfigError) as e:
        plan_workers(sources, count)
    assert str(e.value).startswith(message)
    assert isinstance(e.value, ValueError)


# --- the synthetic source -------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "mix", "kinds"),
    [
        (
            64,
            {"synthetic": 2, "synthetic_blob": 1, "raw": 1},
            {"synthetic", "synthetic_blob", "raw"},
        ),
        # larger than the fixed schema: "synthetic" records become synthetic_blob
        (200, {"synthetic": 1, "raw": 1}, {"synthetic_blob", "raw"}),
    ],
)
def test_synthetic_at_a_rate_delivers_decodable_records(
    workers: list[multiprocessing.process.BaseProcess],
    size: int,
    mix: dict[str, float],
    kinds: set[str],
) -> None:
    ring = ringcore.Ring(1 << 16)
    specs = plan_workers(
        [{"kind": "synthetic", "instances": 2, "rate": 400, "size": size, "mix": mix}], 2
    )
    assert [s.options["rate"] for s in specs] == [200.0, 200.0]
    t0 = time.time_ns()
    workers.extend(start_worker(ring, s) for s in specs)
    records: list[bytes] = []
    per_worker: dict[int, int] = defaultdict(int)

    def enough() -> bool:
        for rec in ring.consume():
            records.append(rec)
            per_worker[decode_synthetic(rec)[1]] += 1
        return len(per_worker) == 2 and min(per_worker.values()) >= 60

    wait_until(enough, "60 records from each worker")
    assert [stop_worker(p) for p in workers] == [0, 0]  # SIGTERM stops them cleanly
    records += ring.consume()
    t1 = time.time_ns()

    seqs: dict[int, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for rec in records:
        assert len(rec) == size
        kind, worker, seq = decode_synthetic(rec)
        seen.add(kind)
        seqs[worker].append(seq)
        ts = synthetic.RAW.unpack_from(rec)[4] if kind == "raw" else HEADER.unpack_from(rec)[3]
        assert t0 <= ts <= t1
    assert seen == kinds
    assert_contiguous(seqs, 2)
    assert ring.query().reserve_failures == 0


def test_synthetic_unthrottled_fills_the_ring_and_loses_nothing(
    workers: list[multiprocessing.process.BaseProcess],
) -> None:
    ring = ringcore.Ring(8192)  # about 110 records
    specs = plan_workers(
        [{"kind": "synthetic", "instances": 2, "rate": 0, "mix": {"synthetic": 1}}], 2
    )
    workers.extend(start_worker(ring, s) for s in specs)
    # nobody consumes: the ring fills and the workers are refused
    wait_until(lambda: ring.query().reserve_failures > 0, "a full ring")
    filled = ring.query()
    assert filled.avail_data > 8192 - 2 * (64 + 8)

    seqs: dict[int, list[int]] = defaultdict(list)

    def drain() -> None:
        for rec in ring.consume():
            _, worker, seq = decode_synthetic(rec)
            seqs[worker].append(seq)

    def enough() -> bool:
        drain()
        return len(seqs) == 2 and min(map(len, seqs.values())) > 5000

    # the workers keep going once the consumer drains
    wait_until(enough, "5000 records from each worker")
    assert [stop_worker(p) for p in workers] == [0, 0]
    drain()
    assert_contiguous(seqs, 2)
    assert ring.query().reserve_failures >= filled.reserve_failures > 0


# --- the exec source ------------------------------------------------------------


def probe_script(tmp_path: Path) -> tuple[Path, str]:
    """A uniquely named script: reads a line, then execs `sh` that reads a line and exits 5."""
    marker = f"rs_probe_{uuid.uuid4().hex[:12]}"
    path = tmp_path / f"{marker}.py"
    path.write_text(
        "import os, sys\n"
        "sys.stdin.readline()\n"
        "if sys.argv[1:] == ['exec']:\n"
        f"    os.execv('/bin/sh', ['sh', '-c', 'read x; exit 5', '{marker}-sh'])\n"
        "sys.exit(7)\n"
    )
    return path, marker


def decode_exec(rec: bytes) -> dict[str, Any]:
    head = parse_header(rec)
    assert head is not None
    if head[0] == exec_source.EXEC_TYPE:
        _, _, _, _, pid, ppid, uid, comm, filename, cmdline, xid, cut = exec_source.EXEC.unpack(rec)
        return {
            "type": "exec",
            "pid": pid,
            "ppid": ppid,
            "uid": uid,
            "comm": comm.rstrip(b"\0").decode(),
            "filename": filename.rstrip(b"\0").decode(),
            "cmdline": cmdline.rstrip(b"\0").decode(),
            "exec_id": xid.rstrip(b"\0").decode(),
            "truncated": cut,
        }
    assert head[0] == exec_source.EXIT_TYPE
    _, _, _, _, pid, ppid, uid, code, comm, lifetime, xid = exec_source.EXIT.unpack(rec)
    return {
        "type": "exit",
        "pid": pid,
        "ppid": ppid,
        "uid": uid,
        "exit_code": code,
        "comm": comm.rstrip(b"\0").decode(),
        "lifetime_ns": lifetime,
        "exec_id": xid.rstrip(b"\0").decode(),
    }


def test_fit_keeps_utf8_whole() -> None:
    assert exec_source.fit(b"abc", 16) == b"abc"
    assert exec_source.fit("aé".encode(), 2) == b"a"  # é is 2 bytes: not cut in half
    assert exec_source.fit("a€b".encode(), 4) == "a€".encode()
    assert exec_source.fit(b"x" * 300, 256) == b"x" * 256


def test_exec_scanner_in_process(tmp_path: Path) -> None:
    """Baseline, a new process, an exec in the same pid, exits: our child's real code, and -1."""
    scanner = exec_source.Scanner()
    assert scanner.scan() == []  # the baseline emits nothing
    script, marker = probe_script(tmp_path)
    events: list[dict[str, Any]] = []

    def scan_for(cond: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def look() -> bool:
            for rec in scanner.scan():
                ev = decode_exec(rec)
                events.append(ev)
                if cond(ev):
                    found.append(ev)
            return bool(found)

        wait_until(look, "an exec source record")
        return found[0]

    child = subprocess.Popen([sys.executable, str(script), "exec"], stdin=subprocess.PIPE)
    assert child.stdin is not None
    try:
        ev = scan_for(
            lambda e: e["type"] == "exec" and e["pid"] == child.pid and marker in e["cmdline"]
        )
        assert ev["ppid"] == os.getpid() and ev["uid"] == os.getuid()
        assert ev["cmdline"] == f"{sys.executable} {script} exec"
        assert ev["filename"] == os.path.realpath(sys.executable)
        # the same pid execs sh: a new exec record
        child.stdin.write(b"\n")
        child.stdin.flush()
        ev = scan_for(
            lambda e: (
                e["type"] == "exec" and e["pid"] == child.pid and f"{marker}-sh" in e["cmdline"]
            )
        )
        assert ev["cmdline"] == f"sh -c read x; exit 5 {marker}-sh" and ev["comm"] == "sh"
        assert os.path.basename(ev["filename"]) in ("sh", "dash", "bash", "busybox")
        # it exits; not reaped yet, so the scanner sees our zombie child
        child.stdin.write(b"\n")
        child.stdin.close()
        ev = scan_for(lambda e: e["type"] == "exit" and e["pid"] == child.pid)
        assert ev["exit_code"] == 5 and ev["comm"] == "sh" and ev["lifetime_ns"] > 0
    finally:
        child.kill()
    assert child.wait() == 5  # WNOWAIT: the status was left for us
    assert sum(1 for e in events if e["type"] == "exit" and e["pid"] == child.pid) == 1

    # a child reaped before the scanner sees it exit: gone from /proc, code unknown
    other = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE)
    scan_for(lambda e: e["type"] == "exec" and e["pid"] == other.pid and marker in e["cmdline"])
    other.communicate(b"\n")
    assert other.returncode == 7
    ev = scan_for(lambda e: e["type"] == "exit" and e["pid"] == other.pid)
    assert ev["exit_code"] == -1 and ev["lifetime_ns"] > 0


def test_exec_source_in_a_worker(
    tmp_path: Path, workers: list[multiprocessing.process.BaseProcess]
) -> None:
    ring = ringcore.Ring(1 << 20)
    # existing: the first scan reports what already runs, so the probe shows
    # up whether it started before or after the worker's first scan
    workers.append(start_worker(ring, spec("exec", interval=0.02, existing=True)))
    script, marker = probe_script(tmp_path)
    child = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE)
    events: list[dict[str, Any]] = []

    def has(cond: Callable[[dict[str, Any]], bool]) -> Callable[[], bool]:
        def look() -> bool:
            events.extend(decode_exec(rec) for rec in ring.consume())
            return any(cond(e) for e in events)

        return look

    try:
        wait_until(
            has(lambda e: e["type"] == "exec" and e["pid"] == child.pid and marker in e["cmdline"]),
            "the probe's exec record",
        )
        assert child.stdin is not None
        child.stdin.write(b"\n")
        child.stdin.close()
        # the probe is our child, not the worker's: it stays a zombie until we
        # reap it, and /proc/pid/stat shows its status to the same user
        wait_until(
            has(lambda e: e["type"] == "exit" and e["pid"] == child.pid), "the probe's exit record"
        )
    finally:
        child.kill()
        child.wait()
    (ex,) = [e for e in events if e["type"] == "exit" and e["pid"] == child.pid]
    execs = [e for e in events if e["type"] == "exec" and e["pid"] == child.pid]
    assert ex["exit_code"] == 7
    assert ex["comm"] == execs[-1]["comm"] and ex["ppid"] == os.getpid()
    assert ex["lifetime_ns"] > 0
    assert stop_worker(workers[0]) == 0


# --- the plugin source ------------------------------------------------------------


def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    """A plugin module in tmp_path, importable here and in spawned workers; its name."""
    name = f"rs_test_plugin_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("import os, signal, struct, time\n\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawn hands sys.path to the child
    return name


PLUGINS = """
def produce(ring, options, stop):
    for i in range(options["n"]):
        while not ring.output(b"plugin %d" % i):
            stop.wait(0.001)
    stop.wait()


def produce_unaware(ring, options):
    ring.output(b"unaware")
    while True:
        time.sleep(3600)


def crash(ring, options):
    ring.output(struct.pack("<I", os.getpid()))
    os._exit(3)


def stubborn(ring, options):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while not ring.output(b"stubborn %d" % os.getpid()):
        time.sleep(0.001)
    while True:
        time.sleep(3600)


not_a_function = 42
"""


def test_plugin_resolve_errors_name_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = plugin_module(tmp_path, monkeypatch, PLUGINS)
    assert callable(plugin.resolve(f"{name}:produce"))
    with pytest.raises(
        plugin.PluginError, match=r"'no_such_mod_xyz:f': cannot import module 'no_such_mod_xyz'"
    ):
        plugin.resolve("no_such_mod_xyz:f")
    with pytest.raises(
        plugin.PluginError, match=rf"'{name}:nope': module '{name}' has no attribute 'nope'"
    ):
        plugin.resolve(f"{name}:nope")
    with pytest.raises(plugin.PluginError, match="'not_a_function' is a int, not a function"):
        plugin.resolve(f"{name}:not_a_function")
    with pytest.raises(plugin.PluginError, match='must be "module:function"'):
        plugin.resolve("just_a_module")
    assert issubclass(plugin.PluginError, SourceConfigError)


def test_plugin_in_a_worker(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: list[multiprocessing.process.BaseProcess],
) -> None:
    name = plugin_module(tmp_path, monkeypatch, PLUGINS)
    ring = ringcore.Ring(1 << 16)
    aware = start_worker(ring, spec("plugin", target=f"{name}:produce", options={"n": 50}))
    unaware = start_worker(ring, spec("plugin", target=f"{name}:produce_unaware"))
    bad = start_worker(ring, spec("plugin", target=f"{name}:nope"))
    workers.extend([aware, unaware, bad])
    got: list[bytes] = []

    def arrived() -> bool:
        got.extend(ring.consume())
        return len(got) == 51

    wait_until(arrived, "the plugins' records")
    assert sorted(got) == sorted([b"plugin %d" % i for i in range(50)] + [b"unaware"])
    # both stop on SIGTERM: one through its StopFlag, one interrupted
    assert stop_worker(aware) == 0
    assert stop_worker(unaware) == 0
    bad.join(WAIT)
    assert bad.exitcode == EX_CONFIG  # a target that cannot load is a config error


def test_example_plugin(workers: list[multiprocessing.process.BaseProcess]) -> None:
    from service.sources import example_plugin

    ring = ringcore.Ring(1 << 16)
    target = "service.sources.example_plugin:heartbeat"
    workers.append(
        start_worker(ring, spec("plugin", target=target, options={"interval": 0.01, "name": "hb"}))
    )
    got: list[bytes] = []

    def three() -> bool:
        got.extend(ring.consume())
        return len(got) >= 3

    wait_until(three, "three heartbeats")
    assert stop_worker(workers[0]) == 0
    for count, rec in enumerate(got[:3]):
        head = parse_header(rec)
        assert head is not None and head[0] == example_plugin.HEARTBEAT_TYPE
        assert example_plugin.FIELDS.unpack_from(rec, HEADER.size) == (
            count,
            b"hb".ljust(16, b"\0"),
        )
        assert rec[:2] == MAGIC


# --- the supervisor -------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == event]


@pytest.fixture
def supervisor_log() -> Iterator[tuple[logging.Logger, Collect]]:
    logger = logging.getLogger(f"test.supervisor.{uuid.uuid4().hex}")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield logger, handler
    logger.removeHandler(handler)


async def crash_and_restart(target: str, logger: logging.Logger, logs: Collect) -> None:
    ring = ringcore.Ring(1 << 16)
    specs = plan_workers([{"kind": "plugin", "target": target}], 1)
    sup = Supervisor(
        ring, specs, backoff_initial=0.01, backoff_max=0.02, backoff_reset=60, log=logger
    )
    assert sup.restarts == {"plugin": 0}
    await sup.start()
    try:
        await async_until(lambda: sup.restarts["plugin"] >= 3, "three restarts")
    finally:
        await sup.stop(5.0)
    assert sup.alive() == 0
    restarts = logs.events("worker_restart")
    assert len(restarts) == sup.restarts["plugin"] >= 3  # one line per restart, none during stop
    for n, rec in enumerate(restarts, 1):
        assert rec.levelno == logging.WARNING and rec.getMessage() == "worker restarted"
        assert (rec.source, rec.instance, rec.exitcode, rec.restarts) == ("plugin", 0, 3, n)  # type: ignore[attr-defined]
    # initial, then doubling up to the max
    assert [r.backoff for r in restarts[:3]] == [0.01, 0.02, 0.02]  # type: ignore[attr-defined]
    # every run of the plugin wrote its pid before crashing: they really ran again
    pids = {struct.unpack("<I", rec)[0] for rec in ring.consume()}
    assert len(pids) >= 3


async def test_supervisor_restarts_a_crashing_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supervisor_log: tuple[logging.Logger, Collect]
) -> None:
    name = plugin_module(tmp_path, monkeypatch, PLUGINS)
    await crash_and_restart(f"{name}:crash", *supervisor_log)


def test_supervisor_under_uvloop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supervisor_log: tuple[logging.Logger, Collect]
) -> None:
    # the service runs uvloop: the same, on its add_reader
    name = plugin_module(tmp_path, monkeypatch, PLUGINS)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(crash_and_restart(f"{name}:crash", *supervisor_log))


async def test_supervisor_stop_terminates_all_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supervisor_log: tuple[logging.Logger, Collect]
) -> None:
    logger, logs = supervisor_log
    name = plugin_module(tmp_path, monkeypatch, PLUGINS)
    ring = ringcore.Ring(1 << 16)
    sources = [
        {"kind": "exec", "interval": 0.05},
        {"kind": "synthetic", "instances": 2, "rate": 0},  # blocked on a full ring, backing off
        {"kind": "plugin", "target": f"{name}:stubborn"},  # ignores SIGTERM
    ]
    specs = plan_workers(sources, 4)
    sup = Supervisor(
        ring, specs, backoff_initial=0.01, backoff_max=0.1, backoff_reset=60, log=logger
    )
    await sup.start()
    assert sup.alive() == 4
    stubborn: list[int] = []

    def stubborn_ready() -> bool:
        for rec in ring.consume():
            if rec.startswith(b"stubborn "):
                stubborn.append(int(rec.split()[1]))
        return bool(stubborn)

    try:
        # it ignores SIGTERM once it has written this
        await async_until(stubborn_ready, "the stubborn plugin")
    finally:
        # the bound only guards against a hang; stop() itself must keep to 1 s
        await asyncio.wait_for(sup.stop(1.0), WAIT)
    assert sup.alive() == 0
    kills = logs.events("worker_kill")
    assert [(r.source, r.instance) for r in kills] == [("plugin", 0)]  # type: ignore[attr-defined]
    with pytest.raises(ProcessLookupError):
        os.kill(stubborn[0], 0)  # killed and reaped
    assert logs.events("worker_restart") == []
    assert sup.restarts == {"exec": 0, "synthetic": 0, "plugin": 0}


async def test_supervisor_does_not_restart_a_config_failure(
    supervisor_log: tuple[logging.Logger, Collect],
) -> None:
    logger, logs = supervisor_log
    ring = ringcore.Ring(1 << 16)
    specs = plan_workers([{"kind": "plugin", "target": "no_such_module_xyz:run"}], 1)
    sup = Supervisor(
        ring, specs, backoff_initial=0.01, backoff_max=0.02, backoff_reset=60, log=logger
    )
    await sup.start()
    try:
        await async_until(lambda: bool(logs.events("worker_failed")), "the failure")
    finally:
        await sup.stop(5.0)
    (failed,) = logs.events("worker_failed")
    assert failed.exitcode == EX_CONFIG  # type: ignore[attr-defined]
    assert sup.restarts == {"plugin": 0} and sup.alive() == 0


def test_supervisor_checks_record_size_against_the_ring() -> None:
    ring = ringcore.Ring(4096)
    specs = plan_workers([{"kind": "synthetic", "size": 8192}], 1)
    with pytest.raises(SourceConfigError, match=r"sources\[0\]\.size: must fit the ring"):
        Supervisor(
            ring,
            specs,
            backoff_initial=0.1,
            backoff_max=1,
            backoff_reset=1,
            log=logging.getLogger(),
        )


def test_worker_exits_cleanly_on_sigterm_while_sleeping(
    workers: list[multiprocessing.process.BaseProcess],
) -> None:
    # a slow rate: the worker sleeps most of the time, SIGTERM must wake it
    ring = ringcore.Ring(1 << 16)
    p = start_worker(ring, spec("synthetic", rate=0.01))
    workers.append(p)
    wait_until(lambda: len(ring.consume()) == 1, "the first record")  # due at once
    os.kill(p.pid, signal.SIGTERM)  # type: ignore[arg-type]
    p.join(WAIT)
    assert p.exitcode == 0
