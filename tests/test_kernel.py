"""Conformance with the real kernel: ringcore.Ring against a BPF_MAP_TYPE_RINGBUF.

A BPF program (tests/bpf/ringops.bpf.c, run with BPF_PROG_TEST_RUN) applies
random runs of output/reserve/write/submit/discard to a kernel ring buffer of
the same size as a ringcore.Ring that gets the same operations through the
Python API; both are consumed at the same points (the kernel's by a
pure-Python reader of its mmap()ed pages, or by ringcore.KernelRing). After
every step the positions, the data area byte for byte (except the pg_off
word of each record header: ringcore keeps its producer slot there, the
kernel a page offset), the consumed records and every op's success must
agree. Then KernelRing, ringcore's consumer code on the kernel's ring, must
yield the same records, from a map fd and from a path pinned in bpffs, and
its poll() must wake up when a BPF program commits a record.

Needs root (bpf()), clang and libbpf (scripts/setup --test installs them),
and Linux 6.4+ (the program uses an open-coded iterator).
"""

from __future__ import annotations

import os
import random
import select
import shutil
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import kernelbpf as kb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernelbpf import OP_DISCARD, OP_OUTPUT, OP_RESERVE, OP_SUBMIT, OP_WRITE, Op
from sleeping import EPOLL_WAIT, wait_until_sleeping

import ringcore

RING = max(4096, ringcore.PAGE_SIZE)
MASK = RING - 1
FLAGS = (0, ringcore.NO_WAKEUP, ringcore.FORCE_WAKEUP)


@pytest.fixture(scope="session")
def ringops(tmp_path_factory):
    reason = kb.bpf_denied()
    if reason:
        pytest.skip(reason)
    missing = kb.missing_tools()
    if missing:
        msg = f"the kernel conformance tests need {', '.join(missing)}"
        if shutil.which("apt-get"):
            pytest.fail(f"{msg}: run scripts/setup --test, which installs them with apt-get")
        pytest.skip(f"{msg}, and there is no apt-get here to install them")
    obj = kb.compile_ringops(tmp_path_factory.mktemp("bpf"), RING)
    try:
        ops = kb.RingOps(obj, RING)
    except PermissionError as e:  # EPERM/EACCES: unprivileged, no CAP_BPF
        pytest.skip(f"bpf() is denied here: {e}")
    yield ops
    ops.close()


# --- generating runs --------------------------------------------------------------

DrawInt = Callable[[int, int], int]


# around the largest payload (RING - 16) and the kernel's own limit (len <= RING)
EDGE_SIZES = (RING - 24, RING - 17, RING - 16, RING - 15, RING - 9, RING - 8, RING, RING + 1)


def draw_size(draw_int: DrawInt) -> int:
    """Mostly small records, some large ones, a few that can never fit."""
    kind = draw_int(0, 11)
    if kind <= 5:
        return draw_int(0, 64)
    if kind <= 8:
        return draw_int(65, 1500)
    if kind <= 10:
        return draw_int(1501, min(RING + 64, kb.POOL_MASK))
    return min(EDGE_SIZES[draw_int(0, len(EDGE_SIZES) - 1)], kb.POOL_MASK)


def gen_run(draw_int: DrawInt) -> tuple[Op, ...]:
    """One program run: at most NSLOTS reservations open at a time, committed
    in any order; the ones left open are discarded by the cleanup."""
    ops: list[Op] = []
    open_slots: dict[int, int] = {}  # slot -> reserved size
    for _ in range(draw_int(1, 16)):
        kinds = [OP_OUTPUT]
        if len(open_slots) < kb.NSLOTS:
            kinds.append(OP_RESERVE)
        if open_slots:
            kinds += [OP_WRITE, OP_WRITE, OP_SUBMIT, OP_DISCARD]
        kind = kinds[draw_int(0, len(kinds) - 1)]
        flags = FLAGS[draw_int(0, len(FLAGS) - 1)]
        if kind == OP_OUTPUT:
            size = draw_size(draw_int)
            ops.append(Op(OP_OUTPUT, size=size, src=draw_int(0, kb.POOL_MASK), flags=flags))
        elif kind == OP_RESERVE:
            free = [s for s in range(kb.NSLOTS) if s not in open_slots]
            slot = free[draw_int(0, len(free) - 1)]
            open_slots[slot] = draw_size(draw_int)
            ops.append(Op(OP_RESERVE, slot=slot, size=open_slots[slot]))
        else:
            slots = sorted(open_slots)
            slot = slots[draw_int(0, len(slots) - 1)]
            if kind == OP_WRITE:
                size = min(open_slots[slot], kb.POOL_MASK)
                off = draw_int(0, size)
                n = draw_int(0, size - off)
                ops.append(Op(OP_WRITE, slot=slot, size=n, src=draw_int(0, kb.POOL_MASK), off=off))
            else:
                del open_slots[slot]
                ops.append(Op(kind, slot=slot, flags=flags))
    return tuple(ops)


@dataclass(frozen=True)
class Consume:
    max_records: int | None
    via: str  # "view" (pure-Python reader of the pages) or "KernelRing"


def gen_consume(draw_int: DrawInt) -> Consume:
    n = draw_int(0, 5)
    return Consume(None if n == 0 else n, ("view", "KernelRing")[draw_int(0, 1)])


# --- the kernel ring and a ringcore.Ring side by side ------------------------------------


class Pair:
    def __init__(self, ringops: kb.RingOps, seed: int) -> None:
        self.ringops = ringops
        self.pool = random.Random(seed).randbytes(kb.POOL_SIZE)
        self.fd = ringops.new_ring()
        self.view = kb.KernelView(self.fd, RING)
        self.kring = ringcore.KernelRing(self.fd)
        self.ring = ringcore.Ring(RING)
        # data-area offsets of every record header either side ever wrote
        self.hdr_offsets: set[int] = set()
        self.log: list[str] = [f"pool seed {seed}"]

    def close(self) -> None:
        self.ring.close()
        self.kring.close()
        self.view.close()
        os.close(self.fd)

    def history(self) -> str:
        return "\n".join(f"  step {i}: {s}" for i, s in enumerate(self.log))

    def run(self, ops: tuple[Op, ...]) -> None:
        self.log.append(f"run {list(ops)}")
        k_prod0, r_prod0 = self.view.producer_pos, self.ring.snapshot()[1]
        k = self.ringops.run(ops, self.pool)
        r = kb.apply_to_ring(self.ring, ops, self.pool)
        k_ok = [0 if x == 0 else -1 for x in k.ret]
        if k_ok != r.ret:
            bad = [
                f"{op}: kernel {x}, ringcore {'ok' if y == 0 else 'failed'}"
                for op, x, y in zip(ops, k.ret, r.ret, strict=True)
                if (x == 0) != (y == 0)
            ]
            pytest.fail("ops succeed differently:\n" + "\n".join(bad) + "\n" + self.history())
        assert k.cleanup == r.cleanup, self.history()
        _, k_prod, k_data = self.view.snapshot()
        _, r_prod, r_data = self.ring.snapshot()
        k_hdrs = kb.walk_headers(k_data, k_prod0, k_prod)
        r_hdrs = kb.walk_headers(r_data, r_prod0, r_prod)
        assert k_hdrs == r_hdrs, f"records (pos, len) differ\n{self.history()}"
        assert not any(length & kb.BUSY for _, length in k_hdrs)
        self.hdr_offsets.update(pos & MASK for pos, _ in k_hdrs)
        self.check()

    def consume(self, c: Consume) -> None:
        self.log.append(str(c))
        if c.via == "view":
            got = self.view.consume(c.max_records)
        else:
            got = self.kring.consume_with_pos(c.max_records)
        want = self.ring.consume_with_pos(c.max_records)
        # payloads never written hold stale bytes, pg_off words among them
        got, want = self.mask_records(got), self.mask_records(want)
        assert got == want, f"consumed records differ\n{self.history()}"
        self.check()

    def mask_records(self, records: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        out = []
        for pos, payload in records:
            start = (pos + kb.HDR) & MASK
            masked = bytearray(payload)
            for i in range(len(masked)):
                if ((start + i) & MASK) - 4 in self.hdr_offsets:
                    masked[i : i + 4] = b"\0" * 4
            out.append((pos, bytes(masked)))
        return out

    def check(self) -> None:
        k_cons, k_prod, k_data = self.view.snapshot()
        r_cons, r_prod, r_data = self.ring.snapshot()
        assert (k_cons, k_prod) == (r_cons, r_prod), (
            f"positions (cons, prod): kernel {(k_cons, k_prod)}, ringcore {(r_cons, r_prod)}\n"
            + self.history()
        )
        assert self.kring.snapshot() == (k_cons, k_prod, k_data)
        q = self.kring.query()
        assert tuple(q) == (k_prod - k_cons, RING, k_cons, k_prod)
        if k_data != r_data:
            k_masked, r_masked = bytearray(k_data), bytearray(r_data)
            for off in self.hdr_offsets:
                k_masked[off + 4 : off + 8] = r_masked[off + 4 : off + 8] = b"\0" * 4
            if k_masked != r_masked:
                pytest.fail(
                    describe_difference(k_masked, r_masked, self.hdr_offsets) + self.history()
                )


def describe_difference(k: bytes, r: bytes, hdr_offsets: set[int]) -> str:
    diff = [i for i in range(len(k)) if k[i] != r[i]]
    first, last = diff[0], diff[-1]
    hdr = max((o for o in hdr_offsets if o <= first), default=None)
    where = f"record header at offset {hdr}" if hdr is not None else "no record header"
    return (
        f"data areas differ at {len(diff)} byte(s), offsets {first}..{last} "
        f"(nearest preceding {where}; pg_off words masked)\n"
        f"  kernel   [{first}:{first + 16}] = {k[first : first + 16].hex(' ')}\n"
        f"  ringcore [{first}:{first + 16}] = {r[first : first + 16].hex(' ')}\n"
    )


# --- ringcore against the kernel ---------------------------------------------------------


@st.composite
def steps(draw):
    def draw_int(lo: int, hi: int) -> int:
        return draw(st.integers(lo, hi))

    if draw(st.integers(0, 2)) == 0:
        return gen_consume(draw_int)
    return gen_run(draw_int)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.integers(0, 2**32 - 1), script=st.lists(steps(), min_size=1, max_size=40))
def test_same_bytes_as_kernel(ringops, seed, script):
    pair = Pair(ringops, seed)
    try:
        for step in script:
            if isinstance(step, Consume):
                pair.consume(step)
            else:
                pair.run(step)
    finally:
        pair.close()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_same_bytes_as_kernel_long(ringops, seed):
    """Long seeded sequences: thousands of records, the ring full and drained
    many times, positions many laps around."""
    rng = random.Random(seed)
    pair = Pair(ringops, seed)
    failures = 0
    try:
        for _ in range(600):
            if rng.random() < 0.3:
                pair.consume(gen_consume(rng.randint))
            else:
                before = pair.ring.query().reserve_failures
                pair.run(gen_run(rng.randint))
                failures += pair.ring.query().reserve_failures - before
        _, prod, _ = pair.view.snapshot()
    finally:
        pair.close()
    assert prod > 30 * RING, "the ring did not go round often enough"
    assert failures > 20, "the ring was not full often enough"


# --- KernelRing ------------------------------------------------------------------------


def fill(pair: Pair, rng: random.Random, runs: int) -> None:
    for _ in range(runs):
        pair.run(gen_run(rng.randint))


def test_kernel_ring_yields_the_same_records(ringops):
    rng = random.Random(7)
    pair = Pair(ringops, 7)
    pin = f"/sys/fs/bpf/ringcore-test-{os.getpid()}"
    try:
        with kb.bpffs():
            ringops.pin(pair.fd, pin)
            try:
                for _ in range(30):
                    fill(pair, rng, rng.randint(1, 6))
                    with ringcore.KernelRing(pair.fd) as kr:
                        assert kr.size == RING
                        got = kr.consume_with_pos(max_records=3)
                        want = pair.ring.consume_with_pos(max_records=3)
                        assert pair.mask_records(got) == pair.mask_records(want)
                        assert kr.query() == pair.kring.query()
                    fill(pair, rng, rng.randint(1, 3))
                    with ringcore.KernelRing(path=pin) as kr:
                        assert kr.snapshot() == pair.view.snapshot()
                        got = kr.consume_with_pos()
                        want = pair.ring.consume_with_pos()
                        assert pair.mask_records(got) == pair.mask_records(want)
                        assert kr.poll(timeout=0) == []
                    pair.check()
                assert pair.view.producer_pos > 10 * RING
            finally:
                os.unlink(pin)
    finally:
        pair.close()


def poll_while(kr: ringcore.KernelRing, action: Callable[[], None], timeout: float) -> list[bytes]:
    """kr.poll(timeout) in a thread; action() once that thread sleeps."""
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(kr.poll(timeout=timeout)))
    t.start()
    try:
        wait_until_sleeping(t, EPOLL_WAIT)
        action()
    finally:
        t.join()
    return result[0]  # type: ignore[return-value]


def test_kernel_ring_poll_wakes_on_commit(ringops):
    pool = random.Random(3).randbytes(kb.POOL_SIZE)
    fd = ringops.new_ring()
    try:
        kr = ringcore.KernelRing(fd)
        out = Op(OP_OUTPUT, size=40, src=100)
        record = pool[100:140]

        # the consumer has caught up: the commit wakes it (else: [] after 60 s)
        got = poll_while(kr, lambda: ringops.run([out], pool), timeout=60)
        assert got == [record]

        # fileno() is readable exactly while there is data, for event loops
        assert select.select([kr.fileno()], [], [], 0)[0] == []
        ringops.run([out], pool)
        assert select.select([kr.fileno()], [], [], 10)[0] == [kr.fileno()]
        assert kr.consume() == [record]

        # No wakeup when the commit is not the record the consumer waits
        # for: B is committed while A (reserved first) is busy, and A with
        # NO_WAKEUP. The kernel's rule, which ringcore keeps.
        a = Op(OP_RESERVE, slot=0, size=8)
        fill_a = Op(OP_WRITE, slot=0, size=8, src=0)
        b = Op(OP_OUTPUT, size=16, src=200)
        quiet = [a, fill_a, b, Op(OP_SUBMIT, slot=0, flags=ringcore.NO_WAKEUP)]
        assert poll_while(kr, lambda: ringops.run(quiet, pool), timeout=0.5) == []
        assert kr.consume() == [pool[0:8], pool[200:216]]

        # ... unless B forces it
        forced = [a, fill_a, Op(OP_OUTPUT, size=16, src=200, flags=ringcore.FORCE_WAKEUP)]
        forced.append(Op(OP_SUBMIT, slot=0, flags=ringcore.NO_WAKEUP))
        got = poll_while(kr, lambda: ringops.run(forced, pool), timeout=60)
        assert got == [pool[0:8], pool[200:216]]
        kr.close()
        assert kr.closed
    finally:
        os.close(fd)


def test_kernel_ring_errors(ringops, tmp_path):
    with pytest.raises(TypeError, match="exactly one"):
        ringcore.KernelRing()
    with pytest.raises(TypeError, match="exactly one"):
        ringcore.KernelRing(ringops.runs_fd, path="/sys/fs/bpf/x")
    with pytest.raises(ValueError, match="BPF_MAP_TYPE_ARRAY map, not a BPF_MAP_TYPE_RINGBUF"):
        ringcore.KernelRing(ringops.runs_fd)
    with pytest.raises(ValueError, match="not a map"):
        ringcore.KernelRing(ringops.prog_fd)
    with pytest.raises(FileNotFoundError):
        ringcore.KernelRing(path=str(tmp_path / "nothing-pinned-here"))
    with open(tmp_path / "f", "w") as f, pytest.raises(OSError, match="fd "):
        ringcore.KernelRing(f.fileno())
    fd = ringops.new_ring()
    try:
        kr = ringcore.KernelRing(fd)
        assert kr.map_fd != fd  # a duplicate of its own
        with pytest.raises(ValueError, match="max_records"):
            kr.consume(max_records=0)
        with pytest.raises(ValueError, match="timeout"):
            kr.poll(timeout=-1)
        assert kr.poll(timeout=0) == []
        kr.close()
        kr.close()
        with pytest.raises(ringcore.RingClosedError):
            kr.consume()
        assert "closed" in repr(kr)
    finally:
        os.close(fd)


def test_pg_off_is_the_only_difference(ringops):
    """The masked words really differ, and only they: the kernel stores the
    header's page offset in struct bpf_ringbuf (its own fields, the consumer
    and the producer page come first: 3), ringcore something else. A record
    whose payload is not fully written hands out stale bytes on both sides,
    old headers among them, so their pg_off words show in consumed payloads."""
    pair = Pair(ringops, 0)
    try:
        pair.run((Op(OP_OUTPUT, size=RING - 24, src=0),))  # [0, RING - 16)
        pair.run((Op(OP_OUTPUT, size=0),))  # [RING - 16, RING - 8)
        pair.consume(Consume(None, "view"))
        # wraps: its payload is data offsets 0..8, the first header, unwritten
        pair.run((Op(OP_RESERVE, slot=0, size=8), Op(OP_SUBMIT, slot=0)))
        k_data, r_data = pair.view.data(), pair.ring.snapshot()[2]
        differ = {i for i in range(RING) if k_data[i] != r_data[i]}
        assert differ and all(i - i % 4 in {4, RING - 12, RING - 4} for i in differ)
        assert struct.unpack_from("<I", k_data, 4) == (3,)
        (k_pos, k_rec), (r_pos, r_rec) = pair.view.consume() + pair.ring.consume_with_pos()
        assert k_pos == r_pos == RING - 8
        assert k_rec[:4] == r_rec[:4] == struct.pack("<I", RING - 24)  # the stale len
        assert k_rec[4:] == struct.pack("<I", 3) != r_rec[4:]  # the stale pg_off
    finally:
        pair.close()
