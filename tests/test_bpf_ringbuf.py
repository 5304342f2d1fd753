"""The bpf-ringbuf source end to end: a real BPF program's pinned ring buffer,
streamed by the real service.

tests/bpf/emit.bpf.c plays someone else's BPF program: each BPF_PROG_TEST_RUN
writes numbered 32-byte records into its ring buffer `events`, which the test
pins in bpffs. The service gets a bpf-ringbuf source on that pin and a schema
file for the record, and the records must come out decoded, complete and in
order on /events and /ws, with the filters, resume and /metrics. Wrong
sources must stop the start with exit status 2 naming the key. Last, the
example in examples/bpf-ringbuf runs as its README says: killsnoop loaded by
load.py, the service on the example's config, a signal sent and seen.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from kernelbpf import TestRunOpts as RunOpts  # (as: not a test class for pytest)
from kernelbpf import bpf_denied, bpffs, missing_tools, multiarch_include
from prometheus_client.parser import text_string_to_metric_families
from servicectl import BASE_CONFIG, ROOT, Service, plugin_source, run_cli

import ringcore
from service.bpf.libbpf import BpfObject, lib

EMIT_SRC = Path(__file__).resolve().parent / "bpf" / "emit.bpf.c"
EXAMPLE = ROOT / "examples" / "bpf-ringbuf"

# keep in step with tests/bpf/emit.bpf.c
RING_SIZE = 16 << 10
MAX_PER_RUN = 256
EMIT_MAGIC = 0xE317E317
ARGS = struct.Struct("<IIQ")  # count, pad, first_seq
STATS = struct.Struct("<QQ")  # sent, lost
RECORD_LEN = 8 + 32  # the kernel's 8-byte record header, struct event

# 1,000 records in runs of 250: each run fits the 16 KiB kernel ring (409
# records), and is read before the next is written, so the ring wraps twice
N, RUN = 1000, 250
SYNTHETIC = 50  # plugin records alongside, for ?type= to tell apart

SCHEMA = """
[[schemas]]
type = 200
name = "emit"
fields = [
    { name = "seq", kind = "u64" },
    { name = "pid", kind = "u32" },
    { name = "magic", kind = "u32" },
    { name = "label", kind = "char", size = 16 },
]
"""

_pins = itertools.count()


def pin_path() -> str:
    return f"/sys/fs/bpf/ringstream-test-{os.getpid()}-{next(_pins)}"


def prerequisites() -> None:
    """Skip, saying why, where this machine cannot compile or load BPF."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages) to build and load BPF")
    denied = bpf_denied()
    if denied:
        pytest.skip(denied)


def clang(src: Path, out: Path) -> Path:
    cmd = ["clang", "-O2", "-g", "-target", "bpf", *multiarch_include(), "-c", str(src)]
    cmd += ["-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}"
    return out


def _libbpf() -> ctypes.CDLL:
    """libbpf with the calls these tests make beyond service.bpf.libbpf's."""
    lb = lib().lib
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, res, args in [
        ("bpf_object__find_program_by_name", p, [p, ctypes.c_char_p]),
        ("bpf_program__fd", i, [p]),
        ("bpf_prog_test_run_opts", i, [i, ctypes.POINTER(RunOpts)]),
        ("bpf_obj_pin", i, [i, ctypes.c_char_p]),
        ("bpf_map_create", i, [i, ctypes.c_char_p, *[ctypes.c_uint32] * 3, p]),
    ]:
        f = getattr(lb, name)
        f.restype = res
        f.argtypes = args
    return lb


def check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def pin(fd: int, path: str) -> None:
    check(_libbpf().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


class Emit:
    """emit.bpf.o loaded: run() writes records into its ring buffer `events`."""

    def __init__(self, obj_path: Path) -> None:
        self.lb = _libbpf()
        self.obj = BpfObject(obj_path)
        try:
            self.obj.load()
            prog = self.lb.bpf_object__find_program_by_name(self.obj._obj, b"emit")
            assert prog, "emit.bpf.o has no program emit"
            self.prog_fd = check(self.lb.bpf_program__fd(prog), "bpf_program__fd")
        except BaseException:
            self.obj.close()
            raise
        self.events_fd = self.obj.map_fd("events")
        self.seq = 0

    def run(self, count: int) -> None:
        """Write `count` records, seq numbers going on from the last run's."""
        while count:
            n = min(count, MAX_PER_RUN)
            ctx = ctypes.create_string_buffer(ARGS.pack(n, 0, self.seq), ARGS.size)
            opts = RunOpts(sz=ctypes.sizeof(RunOpts))
            opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
            opts.ctx_size_in = ARGS.size
            check(self.lb.bpf_prog_test_run_opts(self.prog_fd, ctypes.byref(opts)), "test run")
            assert opts.retval == 0, f"emit returned {opts.retval}"
            self.seq += n
            count -= n

    def stats(self) -> tuple[int, int]:
        """(sent, lost): the reservations that succeeded and failed."""
        buf = ctypes.create_string_buffer(STATS.size)
        key = ctypes.c_uint32(0)
        fd = self.obj.map_fd("stats")
        check(self.lb.bpf_map_lookup_elem(fd, ctypes.byref(key), buf), "lookup stats")
        sent, lost = STATS.unpack(buf.raw)
        return sent, lost

    def close(self) -> None:
        self.obj.close()


@pytest.fixture(scope="module")
def emit_obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prerequisites()
    return clang(EMIT_SRC, tmp_path_factory.mktemp("bpf") / "emit.bpf.o")


@dataclass
class Pinned:
    emit: Emit
    path: str


@pytest.fixture(scope="module")
def pinned(emit_obj: Path) -> Iterator[Pinned]:
    """emit.bpf.o loaded, its ring buffer pinned (and unpinned after)."""
    with bpffs():
        emit = Emit(emit_obj)
        path = pin_path()
        try:
            pin(emit.events_fd, path)
            yield Pinned(emit, path)
        finally:
            if os.path.lexists(path):
                os.unlink(path)
            emit.close()


def source(path: str, schema: str) -> str:
    return f"""
[[sources]]
kind = "bpf-ringbuf"
path = {json.dumps(path)}
schema = {json.dumps(schema)}
"""


def schemas_section(*files: Path) -> str:
    return f"\n[schemas]\nfiles = {json.dumps([str(f) for f in files])}\n"


def curl_lines(url: str, n: int) -> list[dict]:
    """The first n NDJSON lines `curl -N` prints for url (the time limit only
    guards against a hang)."""
    out = []
    cmd = ["curl", "-N", "-s", "--max-time", "60", url]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                out.append(orjson.loads(line))
                if len(out) == n:
                    break
        finally:
            proc.kill()
    assert len(out) == n, f"{url}: the stream ended after {len(out)} of {n} records"
    return out


@pytest.fixture(scope="module")
def svc(pinned: Pinned, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service on the pinned ring (and a plugin source), after emit wrote
    its N records: each run is read back on the stream before the next."""
    tmp = tmp_path_factory.mktemp("svc")
    schema = tmp / "emit.toml"
    schema.write_text(SCHEMA)
    config = BASE_CONFIG + schemas_section(schema) + source(pinned.path, "emit")
    config += plugin_source(SYNTHETIC)
    # two workers: the bpf-ringbuf source's and the plugin's
    with Service(tmp, config, "--workers", "2") as s:
        for done in range(RUN, N + 1, RUN):
            pinned.emit.run(RUN)
            last = curl_lines(s.url("/events?from=0&type=emit"), done)[-1]
            assert last["seq"] == done - 1
        yield s
        assert s.terminate() == 0
        assert s.errors() == []


def check_emit_records(records: list[dict], first_seq: int = 0) -> None:
    assert [r["seq"] for r in records] == list(range(first_seq, first_seq + len(records)))
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for r in records:
        assert r["type"] == "emit"
        assert r["pid"] == os.getpid()
        assert r["magic"] == EMIT_MAGIC
        assert r["label"] == "emit-test"
        assert "_extra" not in r and "raw" not in r


def test_ndjson_streams_every_record_decoded_in_order(svc: Service, pinned: Pinned) -> None:
    records = curl_lines(svc.url("/events?from=0"), N + SYNTHETIC)
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    check_emit_records([r for r in records if r["type"] == "emit"])
    assert sum(r["type"] == "synthetic" for r in records) == SYNTHETIC
    assert len(records) == N + SYNTHETIC
    assert isinstance(records[0]["ts_ns"], int) and records[0]["ts_ns"] > 0
    assert pinned.emit.stats() == (N, 0)


def test_type_filter_and_resume_from_an_id(svc: Service) -> None:
    emitted = curl_lines(svc.url("/events?from=0&type=emit"), N)
    check_emit_records(emitted)
    mid = emitted[600]["id"]
    rest = curl_lines(svc.url(f"/events?type=emit&from={mid}"), N - 600)
    check_emit_records(rest, 600)
    assert rest[0]["id"] == mid
    synthetic = curl_lines(svc.url("/events?from=0&type=synthetic"), SYNTHETIC)
    assert {r["type"] for r in synthetic} == {"synthetic"}
    one = curl_lines(svc.url("/events?from=0&type=emit&field.seq=777"), 1)
    check_emit_records(one, 777)


async def test_websocket_streams_them_too(svc: Service) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(svc.ws_url("/ws?from=0&type=emit&batch=300")) as ws:
            got: list[dict] = []
            while len(got) < N:
                frame = await ws.receive_json(timeout=30)
                assert isinstance(frame, list) and 1 <= len(frame) <= 300
                got.extend(frame)
        check_emit_records(got)
        assert len(got) == N
        mid = got[123]["id"]
        async with http.ws_connect(svc.ws_url(f"/ws?from={mid}&type=emit")) as ws:
            first = await ws.receive_json(timeout=30)
        check_emit_records([first], 123)


def test_metrics_show_the_kernel_ring(svc: Service, pinned: Pinned) -> None:
    curl_lines(svc.url("/events?from=0&type=emit"), N)  # all of them consumed
    text = subprocess.run(
        ["curl", "-s", svc.url("/metrics")], capture_output=True, check=True, timeout=30
    ).stdout.decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name.startswith("ringstream_kernel_ring_")
        and sample.labels.get("source") == pinned.path
    }
    end = N * RECORD_LEN
    assert values == {
        "ringstream_kernel_ring_size_bytes": RING_SIZE,
        "ringstream_kernel_ring_available_bytes": 0,
        "ringstream_kernel_ring_consumer_position_bytes_total": end,
        "ringstream_kernel_ring_producer_position_bytes_total": end,
    }


# --- sources that cannot start -------------------------------------------------------


def serve_fails(tmp_path: Path, config: str) -> str:
    """`ringstream serve` with this config: must exit 2; returns its stderr."""
    cfg = tmp_path / "ringstream.toml"
    cfg.write_text(config)
    r = run_cli("serve", "--config", str(cfg), "--port", "0", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    return r.stderr


def test_a_missing_path_or_a_map_that_is_no_ring_buffer_stops_the_start(
    pinned: Pinned, tmp_path: Path
) -> None:
    schema = tmp_path / "emit.toml"
    schema.write_text(SCHEMA)
    base = BASE_CONFIG + schemas_section(schema)
    missing = pin_path()
    err = serve_fails(tmp_path, base + source(missing, "emit"))
    assert f"sources[0].path: cannot open {missing}" in err
    assert "No such file" in err

    lb = _libbpf()
    fd = check(lb.bpf_map_create(2, b"not_a_ring", 4, 8, 1, None), "bpf_map_create(ARRAY)")
    array = pin_path()
    try:
        pin(fd, array)
        err = serve_fails(tmp_path, base + source(array, "emit"))
    finally:
        os.close(fd)
        os.unlink(array)
    assert f"sources[0].path: cannot open {array}" in err
    assert "BPF_MAP_TYPE_ARRAY" in err


def test_an_unknown_schema_stops_the_start(pinned: Pinned, tmp_path: Path) -> None:
    err = serve_fails(tmp_path, BASE_CONFIG + source(pinned.path, "nosuch"))
    assert "sources[0].schema" in err and "nosuch" in err


def test_two_sources_on_one_ring_buffer_stop_the_start(pinned: Pinned, tmp_path: Path) -> None:
    """A ring buffer has one consumer: a second pin of the same map is refused too."""
    schema = tmp_path / "emit.toml"
    schema.write_text(SCHEMA)
    second = pin_path()
    r = ringcore.KernelRing(path=pinned.path)
    try:
        pin(r.map_fd, second)
        config = BASE_CONFIG.replace("count = 1", "count = 2") + schemas_section(schema)
        config += source(pinned.path, "emit")
        err = serve_fails(tmp_path, config + source(second, "emit"))
    finally:
        r.close()
        os.unlink(second)
    assert f"sources[1].path: {second} is the ring buffer sources[0] reads already" in err


# --- the example ----------------------------------------------------------------


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """A line of proc's stdout, waiting at most timeout (a failure guard)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output in {timeout} s"
    return proc.stdout.readline().decode()


def test_the_killsnoop_example_sees_a_signal(tmp_path: Path) -> None:
    prerequisites()
    obj = clang(EXAMPLE / "killsnoop.bpf.c", tmp_path / "killsnoop.bpf.o")
    path = pin_path()
    # the example's config, with the pin and the schema file where this test has them
    config = (EXAMPLE / "ringstream.toml").read_text()
    for old, new in [
        ('"/sys/fs/bpf/killsnoop"', json.dumps(path)),
        ('"examples/bpf-ringbuf/killsnoop.toml"', json.dumps(str(EXAMPLE / "killsnoop.toml"))),
    ]:
        assert old in config
        config = config.replace(old, new)
    with bpffs():
        loader = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "load.py"), path, "--object", str(obj)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert read_line(loader, 30) == f"pinned {path}\n"
            with Service(tmp_path, config) as svc:
                # a cat that echoed a line is past its exec (and its new
                # comm, which the kernel sets after closing the CLOEXEC
                # descriptors Popen waits on), asleep in read()
                with subprocess.Popen(
                    ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
                ) as child:
                    assert child.stdin is not None and child.stdout is not None
                    child.stdin.write(b"up\n")
                    child.stdin.flush()
                    assert child.stdout.readline() == b"up\n"
                    os.kill(child.pid, signal.SIGUSR1)
                    assert child.wait(timeout=30) == -signal.SIGUSR1
                (rec,) = curl_lines(svc.url(f"/events?from=0&type=kill&field.tpid={child.pid}"), 1)
                assert svc.terminate() == 0
                assert svc.errors() == []
            loader.send_signal(signal.SIGINT)
            assert read_line(loader, 30).startswith(f"SIGINT: unpinned {path}; 0 records lost")
            assert loader.wait(timeout=30) == 0
        finally:
            if loader.poll() is None:
                loader.kill()
                loader.wait()
            assert loader.stdout is not None
            loader.stdout.close()
            if os.path.lexists(path):
                os.unlink(path)
    comm = Path("/proc/self/comm").read_text().rstrip("\n")
    assert rec == {
        "id": rec["id"],
        "ts_ns": rec["ts_ns"],
        "type": "kill",
        "pid": os.getpid(),
        "tpid": child.pid,
        "sig": "SIGUSR1",
        "result": "delivered",
        "comm": comm,
        "tcomm": "cat",
    }
    assert not os.path.lexists(path)
