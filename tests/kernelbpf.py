"""A real kernel BPF ring buffer driven from Python, for tests/test_kernel.py.

tests/bpf/ringops.bpf.c is compiled with clang and loaded with libbpf
(libbpf.so.1 through ctypes). It interprets a list of ring operations; one
BPF_PROG_TEST_RUN applies one list to the BPF_MAP_TYPE_RINGBUF in its map of
maps, so every test example can start over on a fresh ring buffer without
loading the program again. The ring buffer is read back through its mmap()ed
pages by an independent pure-Python consumer (KernelView, as libbpf's
ringbuf_process_ring()), and ``apply_to_ring`` applies the same operations to
a ringcore.Ring.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

import ringcore

SRC = Path(__file__).resolve().parent / "bpf" / "ringops.bpf.c"

# keep in step with tests/bpf/ringops.bpf.c
MAX_OPS = 64
NSLOTS = 3
POOL_MASK = 8191
POOL_SIZE = 2 * (POOL_MASK + 1)
OP_NOP, OP_OUTPUT, OP_RESERVE, OP_WRITE, OP_SUBMIT, OP_DISCARD = range(6)
OP_NAMES = {OP_OUTPUT: "output", OP_RESERVE: "reserve", OP_WRITE: "write"}
OP_NAMES |= {OP_SUBMIT: "submit", OP_DISCARD: "discard", OP_NOP: "nop"}

OP = struct.Struct("<BBBxIII")  # kind, slot, flags, pad, size, src, off
RUN_HEAD = struct.Struct("<II")  # nops, pad
RET = struct.Struct(f"<{MAX_OPS}q")
CLEANUP = struct.Struct(f"<{NSLOTS}q")
RUN_SIZE = RUN_HEAD.size + MAX_OPS * OP.size + RET.size + CLEANUP.size + POOL_SIZE
RET_OFF = RUN_HEAD.size + MAX_OPS * OP.size
CLEANUP_OFF = RET_OFF + RET.size

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_ARRAY = 2
PAGE = mmap.PAGESIZE

# for the probe of bpf() below, before libbpf is known to be there
NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


def record_len(size: int) -> int:
    return (size + HDR + 7) // 8 * 8


@dataclass(frozen=True)
class Op:
    """One operation of a run; see tests/bpf/ringops.bpf.c."""

    kind: int
    slot: int = 0
    size: int = 0  # record size (output, reserve) or bytes to write (write)
    src: int = 0  # offset in the run's pool of the bytes to output or write
    off: int = 0  # write: offset in the reserved record
    flags: int = 0

    def __repr__(self) -> str:
        name = OP_NAMES[self.kind]
        if self.kind == OP_OUTPUT:
            return f"output(size={self.size}, src={self.src}, flags={self.flags})"
        if self.kind == OP_RESERVE:
            return f"reserve(slot={self.slot}, size={self.size})"
        if self.kind == OP_WRITE:
            return f"write(slot={self.slot}, off={self.off}, size={self.size}, src={self.src})"
        return f"{name}(slot={self.slot}, flags={self.flags})"


# --- prerequisites ---------------------------------------------------------------


def bpf_denied() -> str | None:
    """Why bpf() cannot be used here (EPERM and the like), or None.

    Creates and closes one small ring buffer map with the raw system call.
    """
    nr = NR_BPF.get(platform.machine())
    if nr is None:
        return None  # unknown here: loading the program will tell
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)(BPF_MAP_TYPE_RINGBUF, 0, 0, max(4096, PAGE))
    fd = libc.syscall(nr, 0, attr, ctypes.sizeof(attr))  # BPF_MAP_CREATE
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.EACCES, errno.ENOSYS):
        return f"bpf() is denied here: BPF_MAP_CREATE failed with {errno.errorcode[err]}"
    return None


def multiarch_include() -> list[str]:
    """-I for <asm/types.h>, which <linux/bpf.h> needs: clang -target bpf
    does not look in the multiarch directory of the host."""
    arch = sysconfig.get_config_var("MULTIARCH")
    if not arch and shutil.which("gcc"):
        arch = subprocess.run(
            ["gcc", "-print-multiarch"], capture_output=True, text=True
        ).stdout.strip()
    d = Path("/usr/include") / (arch or "")
    return [f"-I{d}"] if arch and d.is_dir() else []


def missing_tools() -> list[str]:
    """The Debian packages the kernel tests need and do not find."""
    missing = []
    if shutil.which("clang") is None:
        missing.append("clang")
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        missing.append("libbpf-dev")
    if find_libbpf() is None:
        missing.append("libbpf1")
    return missing


def find_libbpf() -> str | None:
    name = ctypes.util.find_library("bpf")
    if name:
        return name
    for d in ("/usr/lib64", "/usr/lib", f"/usr/lib/{sysconfig.get_config_var('MULTIARCH')}"):
        if (Path(d) / "libbpf.so.1").exists():
            return str(Path(d) / "libbpf.so.1")
    return None


def compile_ringops(out_dir: Path, ring_size: int) -> Path:
    obj = out_dir / "ringops.bpf.o"
    cmd = ["clang", "-O2", "-g", "-target", "bpf", f"-DRING_SIZE={ring_size}", *multiarch_include()]
    cmd += ["-c", str(SRC), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return obj


# --- libbpf through ctypes ---------------------------------------------------------


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf bpf.h)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def load_libbpf() -> ctypes.CDLL:
    name = find_libbpf()
    if name is None:
        raise RuntimeError("libbpf.so.1 not found (Debian package libbpf1)")
    lib = ctypes.CDLL(name, use_errno=True)
    p, i, u32, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    for fname, res, args in [
        ("bpf_object__open_file", p, [s, p]),
        ("bpf_object__load", i, [p]),
        ("bpf_object__close", None, [p]),
        ("bpf_object__find_map_by_name", p, [p, s]),
        ("bpf_object__find_program_by_name", p, [p, s]),
        ("bpf_program__fd", i, [p]),
        ("bpf_map__fd", i, [p]),
        ("bpf_map__inner_map", p, [p]),
        ("bpf_map__max_entries", u32, [p]),
        ("bpf_map__value_size", u32, [p]),
        ("bpf_map_create", i, [i, s, u32, u32, u32, p]),
        ("bpf_map_update_elem", i, [i, p, p, ctypes.c_uint64]),
        ("bpf_map_lookup_elem", i, [i, p, p]),
        ("bpf_prog_test_run_opts", i, [i, ctypes.POINTER(TestRunOpts)]),
        ("bpf_obj_pin", i, [i, s]),
    ]:
        f = getattr(lib, fname)
        f.restype = res
        f.argtypes = args
    return lib


def check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno (and sets errno)."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


@dataclass
class RunResult:
    ret: list[int]  # per op, the helper's return value (0: success)
    cleanup: list[int]  # per slot, 1 if it was still open and got discarded


class RingOps:
    """The loaded ringops program, its `runs` array and its `rings` map of maps."""

    def __init__(self, obj_path: Path, ring_size: int) -> None:
        self.lib = load_libbpf()
        self.ring_size = ring_size
        self.obj = self.lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not self.obj:
            err = ctypes.get_errno()
            raise OSError(err, f"bpf_object__open_file({obj_path}): {os.strerror(err)}")
        try:
            rings = self._map("rings")
            inner = self.lib.bpf_map__inner_map(rings)
            assert inner, "rings has no inner map template"
            # (bpf_map__set_max_entries() on it crashes libbpf 1.1: compiled in)
            size = self.lib.bpf_map__max_entries(inner)
            assert size == ring_size, f"ringops.bpf.o was compiled for rings of {size} bytes"
            runs = self._map("runs")
            vsize = self.lib.bpf_map__value_size(runs)
            assert vsize == RUN_SIZE, f"struct run is {vsize} bytes in BPF, {RUN_SIZE} here"
            check(self.lib.bpf_object__load(self.obj), "bpf_object__load (verifier log above)")
            prog = self.lib.bpf_object__find_program_by_name(self.obj, b"ringops")
            self.prog_fd = check(self.lib.bpf_program__fd(prog), "bpf_program__fd")
            self.runs_fd = check(self.lib.bpf_map__fd(runs), "bpf_map__fd(runs)")
            self.rings_fd = check(self.lib.bpf_map__fd(rings), "bpf_map__fd(rings)")
        except BaseException:
            self.close()
            raise
        self.buf = ctypes.create_string_buffer(RUN_SIZE)

    def _map(self, name: str) -> int:
        m = self.lib.bpf_object__find_map_by_name(self.obj, name.encode())
        assert m, f"map {name} not found in the BPF object"
        return m

    def close(self) -> None:
        if self.obj:
            self.lib.bpf_object__close(self.obj)
            self.obj = None

    def new_ring(self) -> int:
        """A fresh BPF_MAP_TYPE_RINGBUF, now the one the program drives; the
        caller owns (and closes) the returned fd."""
        fd = check(
            self.lib.bpf_map_create(
                BPF_MAP_TYPE_RINGBUF, b"ringops_rb", 0, 0, self.ring_size, None
            ),
            "bpf_map_create(RINGBUF)",
        )
        key = ctypes.c_uint32(0)
        val = ctypes.c_uint32(fd)
        try:
            check(
                self.lib.bpf_map_update_elem(
                    self.rings_fd, ctypes.byref(key), ctypes.byref(val), 0
                ),
                "bpf_map_update_elem(rings)",
            )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def run(self, ops: list[Op] | tuple[Op, ...], pool: bytes) -> RunResult:
        """Apply ops to the current ring in one BPF_PROG_TEST_RUN."""
        assert len(ops) <= MAX_OPS and len(pool) == POOL_SIZE
        buf = self.buf
        ctypes.memset(buf, 0, RUN_SIZE)
        RUN_HEAD.pack_into(buf, 0, len(ops), 0)
        for i, op in enumerate(ops):
            OP.pack_into(
                buf,
                RUN_HEAD.size + i * OP.size,
                op.kind,
                op.slot,
                op.flags,
                op.size,
                op.src,
                op.off,
            )
        buf[CLEANUP_OFF + CLEANUP.size :] = pool
        key = ctypes.c_uint32(0)
        check(self.lib.bpf_map_update_elem(self.runs_fd, ctypes.byref(key), buf, 0), "update runs")
        opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts))
        check(
            self.lib.bpf_prog_test_run_opts(self.prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN"
        )
        assert opts.retval == 0, f"ringops returned {opts.retval} (1: no run, 2: no ring)"
        check(self.lib.bpf_map_lookup_elem(self.runs_fd, ctypes.byref(key), buf), "lookup runs")
        ret = list(RET.unpack_from(buf, RET_OFF))[: len(ops)]
        return RunResult(ret, list(CLEANUP.unpack_from(buf, CLEANUP_OFF)))

    def pin(self, fd: int, path: str) -> None:
        check(self.lib.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


# --- the kernel's ring, read through its pages ---------------------------------------


class KernelView:
    """The mmap()ed pages of a kernel ring buffer, read in pure Python.

    Maps them as libbpf does: the consumer page read-write at offset 0, the
    producer page and the data area (twice) read-only at offset PAGE. The
    consumer follows libbpf's ringbuf_process_ring(): it stores consumer_pos
    after every record.
    """

    def __init__(self, map_fd: int, size: int) -> None:
        self.size = size
        self.mask = size - 1
        self.cons_page = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.prod_pages = mmap.mmap(
            map_fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE
        )

    def close(self) -> None:
        self.cons_page.close()
        self.prod_pages.close()

    @property
    def consumer_pos(self) -> int:
        return struct.unpack_from("<Q", self.cons_page, 0)[0]

    @property
    def producer_pos(self) -> int:
        return struct.unpack_from("<Q", self.prod_pages, 0)[0]

    def data(self) -> bytes:
        return self.prod_pages[PAGE : PAGE + self.size]

    def snapshot(self) -> tuple[int, int, bytes]:
        return self.consumer_pos, self.producer_pos, self.data()

    def consume(self, max_records: int | None = None) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        cons, prod = self.consumer_pos, self.producer_pos
        while cons < prod:
            off = PAGE + (cons & self.mask)
            (length,) = struct.unpack_from("<I", self.prod_pages, off)
            if length & BUSY:
                break
            size = length & ~DISCARD
            pos = cons
            cons += record_len(size)
            if not length & DISCARD:
                out.append((pos, self.prod_pages[off + HDR : off + HDR + size]))
            struct.pack_into("<Q", self.cons_page, 0, cons)
            if max_records is not None and len(out) >= max_records:
                break
        return out


def walk_headers(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """(position, len field) of each record header in [start, end)."""
    mask = len(data) - 1
    out = []
    pos = start
    while pos < end:
        (length,) = struct.unpack_from("<I", data, pos & mask)
        out.append((pos, length))
        if length & BUSY:
            break
        pos += record_len(length & ~(BUSY | DISCARD))
    return out


# --- the same operations on a ringcore.Ring --------------------------------------------


def apply_to_ring(ring: ringcore.Ring, ops: list[Op] | tuple[Op, ...], pool: bytes) -> RunResult:
    """Apply ops to ring with the Python API, as ringops.bpf.c applies them to
    the kernel's ring; the result says for each op whether it succeeded (0)
    or not (-1), and which slots the end-of-run cleanup discarded."""
    slots: dict[int, ringcore.Reservation | None] = {}
    ret = []
    for op in ops:
        r = -1
        data = pool[op.src & POOL_MASK : (op.src & POOL_MASK) + (op.size & POOL_MASK)]
        if op.kind == OP_OUTPUT:
            try:
                r = 0 if ring.output(data, op.flags) else -1
            except ValueError:  # can never fit; the kernel says -E2BIG/-EAGAIN
                r = -1
        elif op.kind == OP_RESERVE:
            assert op.slot not in slots, f"{op}: slot already open"
            try:
                res = ring.reserve(op.size)
            except ValueError:
                res = None
            slots[op.slot] = res
            r = 0 if res is not None else -1
        elif op.kind == OP_WRITE:
            res = slots[op.slot]
            if res is not None and op.off + len(data) <= len(res):
                with memoryview(res) as mv:
                    mv[op.off : op.off + len(data)] = data
                r = 0
        elif op.kind in (OP_SUBMIT, OP_DISCARD):
            res = slots.pop(op.slot)
            if res is not None:
                if op.kind == OP_SUBMIT:
                    res.submit(op.flags)
                else:
                    res.discard(op.flags)
            r = 0
        else:
            r = 0
        ret.append(r)
    cleanup = [0] * NSLOTS
    for slot in sorted(slots):
        res = slots[slot]
        if res is not None:
            res.discard()
        cleanup[slot] = 1
    return RunResult(ret, cleanup)


@contextlib.contextmanager
def bpffs(path: str = "/sys/fs/bpf"):
    """bpffs mounted at path for the duration (mounted here if it was not)."""
    mounted = False
    with open("/proc/self/mounts") as f:
        if not any(line.split()[1:3] == [path, "bpf"] for line in f):
            os.makedirs(path, exist_ok=True)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
                err = ctypes.get_errno()
                if err in (errno.EPERM, errno.EACCES):
                    pytest.skip(f"bpffs is not mounted at {path} and mounting it is denied")
                raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")
            mounted = True
    try:
        yield path
    finally:
        if mounted:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.umount(path.encode())
