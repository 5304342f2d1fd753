"""Fuzzing ringcore against corrupted shared memory: attach, the header walks, producers.

Every other process that maps a ring can write (part of) its pages, so the
bytes there are untrusted input. These tests corrupt them on purpose:

* the attach path (``Ring._attach_fds``) gets memfds holding a ring image with
  a mutated control page, random bytes, a truncated or extended file, or a
  header that claims a huge data area. Attaching must either raise
  ``IncompatibleRingError`` (``OSError`` for a bad descriptor) or succeed, and
  it may succeed only when the header is in fact valid;
* the consumer's header walk (``consume*``, ``poll``) and the producers' walks
  (``output``/``reserve``: advance_pending(), and make_room() in overwrite
  mode) run against record headers (len with BUSY/DISCARD bits, huge lengths,
  pg_off) and positions (consumer_pos, producer_pos, pending_pos, next_pos,
  overwrite_pos) that the test rewrites through its own mapping of the memfd,
  interleaved with normal calls, on normal and overwrite rings. Acceptable
  outcomes: records that lie inside the ring (garbage contents allowed) and
  are read from where the walk says, a walk that stays within
  [consumer_pos, producer_pos], ``RingCorruptedError`` naming the position,
  or ``False``/``None`` from producers that write where next_pos says. Never
  a crash, a hang or a read outside the mapping.

Every example runs in a forked child with a time limit, so a segfault or a
hang is reported as a test failure naming the signal instead of killing
pytest; the child's log of actions and its stderr (a sanitizer report) come
with it. ``test_fuzz_under_asan`` runs both fuzzers once more against the
ASan + UBSan build of tests/test_build.py. ``--hypothesis-show-statistics``
shows how often each outcome occurred. RINGCORE_FUZZ_WALK_EXAMPLES and
RINGCORE_FUZZ_ATTACH_EXAMPLES set longer runs.

The bugs the fuzz found have minimal reproductions (REPROS, at the end),
tested by test_known_bug_stays_fixed and test_misaligned_positions*. Each is
run once per session; while one still reproduces, the fuzz keeps out of the
states that trigger it (the guards name their bugs), so that it finds other
bugs instead of the same one again.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import functools
import mmap
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_build import EXT_NAME, SAN_FLAGS, SOURCES, run, run_watched, show

import ringcore
from ringcore import BUSY_BIT, DISCARD_BIT, PAGE_SIZE, Ring

PAGE = PAGE_SIZE
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
HDR = struct.Struct("=II")  # record header: u32 len (BUSY/DISCARD bits), u32 pg_off
# struct rc_ctrl: magic, version, page_size, data_size, meta_pages, max_slots, creator_pid, flags
CTRL = struct.Struct("=QIIQIIII")
CTRL_FIELDS = {  # name: (offset, struct)
    "magic": (0, U64),
    "version": (8, U32),
    "page_size": (12, U32),
    "data_size": (16, U64),
    "meta_pages": (24, U32),
    "max_slots": (28, U32),
    "creator_pid": (32, U32),
    "flags": (36, U32),
}
MAGIC = int.from_bytes(b"RINGCORE", "little")
MAX_DATA = 1 << 31
MAX_SLOTS = 256
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
CONS_POS = PAGE  # file offset of consumer_pos: first word of the consumer page
PROD_POS = 2 * PAGE  # file offset of producer_pos: first word of the producer page

# RINGCORE_FUZZ_SANITIZED=1: the run under ASan + UBSan started by
# test_header_walk_fuzz_under_asan (fewer examples, more time per example).
SANITIZED = os.environ.get("RINGCORE_FUZZ_SANITIZED") == "1"
ATTACH_EXAMPLES = int(os.environ.get("RINGCORE_FUZZ_ATTACH_EXAMPLES", "200"))
WALK_EXAMPLES = int(os.environ.get("RINGCORE_FUZZ_WALK_EXAMPLES", "100" if SANITIZED else "300"))
# an example takes milliseconds; a hang costs this much (per shrink step too)
CHILD_TIMEOUT = 20.0 if SANITIZED else 3.0
# a producer walk this long is still instant; the known bugs walk 2**40 and more
PENDING_GAP_LIMIT = 1 << 20

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _has_overwrite_mode() -> bool:
    try:
        Ring(PAGE, consumer=False, overwrite=True).close()  # type: ignore[call-arg]
    except TypeError:
        return False
    return True


OVERWRITE = _has_overwrite_mode()  # flight-recorder rings (BPF_F_RB_OVERWRITE)


# --- running an example in a forked child ---------------------------------------


class ChildFailed(AssertionError):
    """The child raised: an oracle assertion, or an unexpected exception."""


class ChildCrashed(AssertionError):
    """The child was killed by a signal (SIGSEGV, SIGBUS, SIGABRT from ASan ...)."""


class ChildHung(AssertionError):
    """The child did not finish in time."""


_to_parent: int | None = None  # in a forked child: the pipe to the parent
EVENT = "@event "


def tell_parent(line: str) -> None:
    """From a forked child: a line of its log for the parent (shown on failure)."""
    if _to_parent is not None:
        os.write(_to_parent, (line + "\n").encode(errors="replace"))


def run_forked(fn: Callable[..., object], *args: object, timeout: float = CHILD_TIMEOUT) -> str:
    """Run fn(*args) in a forked child; raise if it fails, dies of a signal or hangs.

    Returns what the child told the parent. The child's stderr (a sanitizer
    report, a fatal signal's Python traceback) goes to the parent too, and
    into the exception.
    """
    global _to_parent
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(rfd)
            _to_parent = wfd
            os.dup2(wfd, 2)  # sanitizer reports, glibc's aborts, faulthandler: to the parent
            faulthandler.enable(file=wfd)
            fn(*args)
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(wfd, traceback.format_exc().encode(errors="replace"))
        finally:
            os._exit(code)
    os.close(wfd)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ChildHung(f"no result after {timeout:.0f} s: a hang\n{out.decode()}")
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(rfd)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code < 0:
        raise ChildCrashed(f"child killed by {signal.Signals(-code).name}\n{out.decode()}")
    if code != 0:
        raise ChildFailed(out.decode() or f"child exited with {code}")
    return out.decode()


def record_events(out: str) -> None:
    """Pass the child's outcome events on to hypothesis (--hypothesis-show-statistics)."""
    for line in out.splitlines():
        if line.startswith(EVENT):
            event(line[len(EVENT) :])


# --- the layout, learnt from a real ring ----------------------------------------


@dataclass(frozen=True)
class Layout:
    version: int
    meta_pages: int
    next_pos: int  # file offset of the producers' next_pos (after the lock)
    pending_pos: int  # file offset of pending_pos (just before next_pos)
    overwrite_pos: int  # file offset of overwrite_pos; 0: no overwrite mode
    overwrite_flag: int  # the rc_ctrl.flags bit of overwrite mode; 0: none
    templates: dict[int, bytes]  # data size: image of a fresh ring of that size


def find_word(fd: int, candidates: set[int], value: int) -> set[int]:
    return {o for o in candidates if U64.unpack(os.pread(fd, 8, o))[0] == value}


@functools.cache
def layout() -> Layout:
    """Read the control page of a real ring and find next_pos in its producer page.

    The producer page holds producer_pos, the process-shared lock (its size
    depends on the libc), then pending_pos and next_pos. next_pos is the one
    word after the lock that follows producer_pos.
    """
    with Ring(PAGE, consumer=False) as ring:
        fd = ring._mem_fd
        magic, version, page_size, data_size, meta, slots, _pid, _flags = CTRL.unpack(
            os.pread(fd, CTRL.size, 0)
        )
        assert (magic, page_size, data_size, slots) == (MAGIC, PAGE, PAGE, MAX_SLOTS)
        candidates = set(range(PROD_POS + 64, PROD_POS + PAGE, 8))
        for payload in (13, 100):
            assert ring.output(b"x" * payload)
            prod = U64.unpack(os.pread(fd, 8, PROD_POS))[0]
            candidates = find_word(fd, candidates, prod)
        assert len(candidates) == 1, f"next_pos not found in the producer page: {candidates}"
        next_off = candidates.pop()
    over_off = over_flag = 0
    if OVERWRITE:
        # a full flight-recorder ring moves overwrite_pos over its oldest records
        with Ring(PAGE, overwrite=True) as ring:
            fd = ring._mem_fd
            over_flag = CTRL.unpack(os.pread(fd, CTRL.size, 0))[7]
            candidates = set(range(PROD_POS + 64, PROD_POS + PAGE, 8)) - {next_off}
            for payload in (200, 300, 104):
                for _ in range(30):
                    assert ring.output(b"o" * payload)
                over = ring.query().overwrite_pos
                assert over, "overwrite_pos did not move"
                candidates = find_word(fd, candidates, over)
            assert len(candidates) == 1, f"overwrite_pos not found: {candidates}"
            over_off = candidates.pop()
        assert over_flag and not over_flag & (over_flag - 1), f"overwrite flag {over_flag:#x}"
    templates = {}
    for size in (PAGE, 2 * PAGE):
        # consumer=False: consumer_pid stays 0, so a consumer may attach to a copy
        with Ring(size, consumer=False) as ring:
            templates[size] = os.pread(ring._mem_fd, meta * PAGE + size, 0)
    return Layout(version, meta, next_off, next_off - 8, over_off, over_flag, templates)


# --- known bugs, kept out of the fuzz --------------------------------------------
#
# Each known bug has a minimal reproduction (REPROS, at the end of the file),
# run once per session in a forked child. While it still reproduces, the fuzz
# stays out of the states that trigger it (each guard names its bugs), so that
# it finds other bugs instead of that one again; once it is fixed, the fuzz
# goes there too. test_known_bug_stays_fixed and test_misaligned_positions*
# report the same runs.

REPRO_TIMEOUT = 10.0 if SANITIZED else 3.0


@functools.cache
def reproduce(name: str) -> AssertionError | None:
    """Run the reproduction of a known bug once: how it failed, or None (fixed)."""
    if name not in REPROS:  # needs overwrite mode, which this build lacks
        return None
    case, args = REPROS[name]
    try:
        run_forked(case, *args, timeout=REPRO_TIMEOUT)
    except AssertionError as e:
        return e
    return None


def bug(*names: str) -> bool:
    """Whether any of these known bugs still reproduces."""
    return any(reproduce(n) is not None for n in names)


def prefetch_known_bugs() -> None:
    """In the parent: the forked examples inherit the results instead of rerunning them."""
    for name in REPROS:
        reproduce(name)


def lap_bug(overwrite: bool) -> bool:
    if overwrite:
        return bug("record_past_ring[overwrite]")
    return bug("record_past_ring[normal]", "huge_length", "endless_walk")


def consumer_walk_unbounded(cons: int, prod: int, size: int, over: int | None = None) -> bool:
    """Positions more than a lap apart (bugs record_past_ring, huge_length, endless_walk).

    rc_consume() checked a record's length only against prod - cons, so with
    the positions more than a lap apart it read past the double mapping (a
    huge len: SIGSEGV), or overflowed the scratch buffer in overwrite mode, or
    walked the same memory lap after lap. In overwrite mode the walk starts at
    overwrite_pos when that is ahead.
    """
    if over is not None and over > cons:
        cons = over
    return cons < prod and prod - cons > size - 1


def producer_walk_far(pending: int, nxt: int) -> bool:
    """pending_pos far behind next_pos (bug pending_walk): advance_pending() walks it all."""
    return pending < nxt and nxt - pending > PENDING_GAP_LIMIT


def make_room_walk_far(nxt: int, over: int) -> bool:
    """overwrite_pos far behind, or ahead of, next_pos (bug make_room_walk)."""
    return (nxt - over) & U64_MAX > PENDING_GAP_LIMIT


# --- 1. the attach path -----------------------------------------------------------


@dataclass(frozen=True)
class AttachPlan:
    size: int  # data size of the template ring
    mode: str  # "mutate": template, ctrl mutated; "random": random bytes
    mutations: tuple[tuple, ...]  # for "mutate"
    blob: bytes  # for "random"
    plant: str  # for "random": what valid ctrl fields to put in front
    planted_size: int
    length: tuple  # how long the file is, see build_image()
    consumer: bool


u32s = st.one_of(
    st.sampled_from([0, 1, 3, 7, 8, 255, 256, PAGE - 1, PAGE, PAGE + 1, 7, 6, 1 << 31, U32_MAX]),
    st.integers(0, U32_MAX),
)
DATA_SIZE_EDGES = [
    0,
    1,
    8,
    PAGE - 1,
    PAGE,
    PAGE + 1,
    2 * PAGE,
    3 * PAGE,
    PAGE * PAGE,
    MAX_DATA // 2,
    MAX_DATA,
    MAX_DATA + PAGE,
    2 * MAX_DATA,
    1 << 40,
    1 << 63,
    U64_MAX - PAGE + 1,
    U64_MAX,
]
u64s = st.one_of(
    st.sampled_from([*DATA_SIZE_EDGES, MAGIC, MAGIC ^ 1, MAGIC ^ (1 << 63)]),
    st.integers(0, U64_MAX),
)


def field_value(name: str) -> st.SearchStrategy[int]:
    return u64s if CTRL_FIELDS[name][1] is U64 else u32s


ctrl_mutations = st.one_of(
    st.sampled_from(sorted(CTRL_FIELDS)).flatmap(
        lambda name: st.tuples(st.just("field"), st.just(name), field_value(name))
    ),
    st.tuples(st.just("byte"), st.integers(0, 63), st.integers(0, 255)),
    st.tuples(st.just("bitflip"), st.integers(0, CTRL.size * 8 - 1)),
)
file_lengths = st.one_of(
    st.sampled_from(
        [
            ("keep",),
            ("match",),
            ("zero",),
            ("page",),
            ("meta",),
            ("minus_page",),
            ("plus_page",),
            ("minus_one",),
            ("plus_one",),
        ]
    ),
    st.tuples(st.just("short"), st.integers(1, PAGE - 1)),
    st.tuples(st.just("exact"), st.integers(0, 12 * PAGE)),
)


@st.composite
def attach_plans(draw: st.DrawFn) -> AttachPlan:
    size = draw(st.sampled_from([PAGE, 2 * PAGE]))
    mode = draw(st.sampled_from(["mutate", "mutate", "random"]))
    mutations: tuple[tuple, ...] = ()
    blob, plant, planted = b"", "none", PAGE
    if mode == "mutate":
        mutations = tuple(draw(st.lists(ctrl_mutations, min_size=0, max_size=4)))
    else:
        blob = draw(st.binary(max_size=3 * PAGE))
        plant = draw(st.sampled_from(["none", "magic", "magic+version", "ctrl"]))
        planted = draw(st.sampled_from([PAGE, 2 * PAGE, 3 * PAGE]))
    # a planted valid ctrl gets the file length it claims half of the time
    lengths = st.one_of(st.just(("match",)), file_lengths) if plant == "ctrl" else file_lengths
    return AttachPlan(
        size, mode, mutations, blob, plant, planted, draw(lengths), draw(st.booleans())
    )


def valid_ctrl(data_size: int) -> bytes:
    lay = layout()
    return CTRL.pack(MAGIC, lay.version, PAGE, data_size, lay.meta_pages, MAX_SLOTS, 1, 0)


def build_image(plan: AttachPlan) -> tuple[bytes, int]:
    """The file's contents (it may be longer: zeros) and its length."""
    lay = layout()
    if plan.mode == "mutate":
        image = bytearray(lay.templates[plan.size])
        for m in plan.mutations:
            if m[0] == "field":
                off, fmt = CTRL_FIELDS[m[1]]
                fmt.pack_into(image, off, m[2])
            elif m[0] == "byte":
                image[m[1]] = m[2]
            else:
                image[m[1] // 8] ^= 1 << (m[1] % 8)
    else:
        image = bytearray(plan.blob)
        head = {
            "none": b"",
            "magic": U64.pack(MAGIC),
            "magic+version": U64.pack(MAGIC) + U32.pack(lay.version),
            "ctrl": valid_ctrl(plan.planted_size),
        }[plan.plant]
        image[: len(head)] = head
    keep = len(image)
    claimed = U64.unpack(bytes(image[16:24]).ljust(8, b"\0"))[0]
    kind = plan.length[0]
    length = {
        "keep": keep,
        "match": lay.meta_pages * PAGE + claimed if claimed <= 1 << 41 else keep,
        "zero": 0,
        "page": PAGE,
        "meta": lay.meta_pages * PAGE,
        "minus_page": max(keep - PAGE, 0),
        "plus_page": keep + PAGE,
        "minus_one": max(keep - 1, 0),
        "plus_one": keep + 1,
        "short": plan.length[-1],
        "exact": plan.length[-1],
    }[kind]
    return bytes(image[:length]), length


def header_valid(content: bytes, length: int) -> bool:
    """What rc_attach() must accept: the header is consistent with the file."""
    if length < PAGE:
        return False
    magic, version, page_size, data_size, meta, slots, _pid, flags = CTRL.unpack(
        content[: CTRL.size].ljust(CTRL.size, b"\0")
    )
    lay = layout()
    return (
        magic == MAGIC
        and not flags & ~lay.overwrite_flag
        and version == lay.version
        and page_size == PAGE
        and meta == lay.meta_pages
        and slots == MAX_SLOTS
        and PAGE <= data_size <= MAX_DATA
        and data_size & (data_size - 1) == 0
        and data_size % PAGE == 0
        and length == meta * PAGE + data_size
    )


def make_memfd(content: bytes, length: int) -> int:
    fd = os.memfd_create("ringcore-fuzz", os.MFD_CLOEXEC)
    os.ftruncate(fd, length)  # beyond content: a sparse hole of zeros
    if content:
        os.pwrite(fd, content, 0)
    return fd


def attach_case(plan: AttachPlan) -> None:
    content, length = build_image(plan)
    valid = header_valid(content, length)
    fd = make_memfd(content, length)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        ring = Ring._attach_fds(fd, efd, consumer=plan.consumer)
    except ringcore.IncompatibleRingError as e:
        assert not valid, f"a valid header was refused: {e}"
        assert str(e), "IncompatibleRingError without a message"
        tell_parent(f"{EVENT}refused ({plan.mode}): {str(e).split(': ', 1)[-1]}")
        return
    except ringcore.ConsumerBusyError as e:
        # consumer_pid comes from the file: random bytes may name a live process
        assert valid and plan.consumer and plan.mode == "random", repr(e)
        tell_parent(f"{EVENT}attached ({plan.mode}), consumer role busy")
        return
    assert valid, f"attached to an invalid header (file of {length} bytes): {content[:40]!r}"
    tell_parent(f"{EVENT}attached ({plan.mode})")
    data_size = CTRL.unpack(content[: CTRL.size])[3]
    assert ring.size == data_size
    q = ring.query()
    assert q.ring_size == data_size
    ring.ready()
    if plan.mode == "mutate":
        # meta pages of a fresh ring, whatever data size the header claims: it works
        assert ring.output(b"fuzz") is True
        if plan.consumer:
            assert ring.consume() == [b"fuzz"]
        return
    # random meta pages: the positions are garbage (the lock too: do not produce)
    cons = U64.unpack(os.pread(fd, 8, CONS_POS))[0]
    prod = U64.unpack(os.pread(fd, 8, PROD_POS))[0]
    over = None
    if getattr(ring, "overwrite", False):
        over = U64.unpack(os.pread(fd, 8, layout().overwrite_pos))[0]
    start = over if over is not None and over > cons else cons
    overwrite = over is not None
    if (
        plan.consumer
        and not (lap_bug(overwrite) and consumer_walk_unbounded(cons, prod, data_size, over))
        and not (bug("misaligned") and (cons % 8 or start % 8))
    ):
        with contextlib.suppress(ringcore.RingCorruptedError):
            for rec in ring.consume():
                assert len(rec) <= data_size - 16


@settings(
    max_examples=ATTACH_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=attach_plans())
def test_attach_fuzz(plan: AttachPlan) -> None:
    layout()  # learnt once, in the parent
    prefetch_known_bugs()
    record_events(run_forked(attach_case, plan))


def attach_fd_case(kind: str) -> None:
    image = layout().templates[PAGE]
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    unused_fd = 999_999  # never open: closing one would let rc_attach's dup() take it
    with tempfile.TemporaryFile() as f:
        f.write(image)
        f.flush()
        if kind == "regular_file":
            ring = Ring._attach_fds(f.fileno(), efd, consumer=True)
            assert ring.output(b"on disk")
            assert ring.consume() == [b"on disk"]
            return
        if kind in ("closed", "bad_event_fd"):
            with pytest.raises(OSError) as info:
                if kind == "closed":
                    Ring._attach_fds(unused_fd, efd)
                else:
                    Ring._attach_fds(f.fileno(), unused_fd)
            assert info.value.errno == errno.EBADF, info.value
            return
    if kind == "pipe":
        fd, wfd = os.pipe()
        os.write(wfd, image[:PAGE])
    elif kind == "devnull":
        fd = os.open(os.devnull, os.O_RDWR)
    else:
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY)  # a directory
    with pytest.raises(ringcore.IncompatibleRingError) as info:
        Ring._attach_fds(fd, efd)
    assert str(info.value)


@pytest.mark.parametrize(
    "kind", ["closed", "pipe", "devnull", "directory", "regular_file", "bad_event_fd"]
)
def test_attach_odd_descriptors(kind: str) -> None:
    layout()
    run_forked(attach_fd_case, kind)


# --- 2. the header walks -----------------------------------------------------------


@dataclass(frozen=True)
class WalkPlan:
    size: int
    overwrite: bool  # a flight-recorder ring: producers overwrite the oldest records
    abandon: float
    base: int  # all positions start here (as after that much traffic)
    fill: tuple[tuple, ...]  # records put in before the corruption
    actions: tuple[tuple, ...]  # corruptions and calls, interleaved


def mostly_aligned(values: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Positions are 8-aligned, but a quarter of the values are not."""
    aligned = values.map(lambda v: v & ~7)
    return st.one_of(aligned, aligned, aligned, values)


def gaps(size: int) -> st.SearchStrategy[int]:
    """A distance between two positions that stays within one lap (at most a whole one)."""
    return mostly_aligned(
        st.one_of(st.sampled_from([0, 8, size - 8, size, size // 2]), st.integers(0, size - 1))
    )


def far(size: int) -> st.SearchStrategy[int]:
    """A distance that may be anything, for positions moved out of the way."""
    return mostly_aligned(st.one_of(st.integers(8, 4 * size), st.integers(8, U64_MAX)))


def header_lens(size: int) -> st.SearchStrategy[int]:
    plain = st.one_of(
        st.integers(0, 2 * size),
        st.sampled_from([0, 1, size - 17, size - 16, size - 15, size - 8, size, size + 1]),
        st.sampled_from([2 * size, 0x3FFFFFF8, 0x3FFFFFFF]),
        st.integers(0, 0x3FFFFFFF),
    )
    flags = st.sampled_from([0, 0, BUSY_BIT, DISCARD_BIT, BUSY_BIT | DISCARD_BIT])
    return st.one_of(st.builds(lambda v, f: v | f, plain, flags), st.integers(0, U32_MAX))


pg_offs = st.one_of(
    st.sampled_from([0, 1, 1 | 1 << 8, 2 | 1 << 8, 255, U32_MAX]), st.integers(0, U32_MAX)
)


def actions(size: int) -> st.SearchStrategy[tuple]:
    payload = st.integers(0, min(300, size - 16))
    corruptions = st.one_of(
        st.tuples(st.just("hdr_len"), st.integers(0, 63), header_lens(size)),
        st.tuples(st.just("hdr_pg_off"), st.integers(0, 63), pg_offs),
        st.tuples(st.just("raw"), st.integers(0, size - 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("cons_behind"), gaps(size)),  # cons := prod - g
        st.tuples(st.just("cons_ahead"), far(size)),  # cons := prod + g
        st.tuples(st.just("prod_ahead"), gaps(size)),  # prod := cons + g
        st.tuples(st.just("prod_behind"), far(size)),  # prod := cons - g
        st.tuples(st.just("both"), mostly_aligned(u64s), gaps(size)),
        st.tuples(st.just("pending_behind"), gaps(size)),  # pending := next - g
        st.tuples(st.just("pending_ahead"), far(size)),
        st.tuples(st.just("next_ahead"), gaps(size)),  # next := next + g
        st.tuples(st.just("next_behind"), far(size)),
        st.tuples(st.just("over_behind"), gaps(size)),  # overwrite_pos := prod - g
        st.tuples(st.just("over_ahead"), far(size)),  # overwrite_pos := prod + g
    )
    calls = st.one_of(
        st.sampled_from(
            [
                ("consume",),
                ("consume_with_pos",),
                ("consume_each",),
                ("ready",),
                ("query",),
                ("snapshot",),
                ("sleep",),
                ("commit_held", "submit"),
                ("commit_held", "discard"),
                ("poll", 0.0),
                ("poll", 0.001),
            ]
        ),
        st.tuples(st.just("consume_max"), st.integers(1, 3)),
        st.tuples(st.just("p_output"), payload),
        st.tuples(st.just("c_output"), payload),
        st.tuples(st.just("p_reserve"), payload, st.sampled_from(["submit", "discard", "keep"])),
    )
    return st.one_of(corruptions, calls, calls)


@st.composite
def walk_plans(draw: st.DrawFn) -> WalkPlan:
    size = draw(st.sampled_from([PAGE, 2 * PAGE]))
    base = draw(
        st.one_of(
            st.just(0),
            st.integers(0, 1 << 40).map(lambda v: v & ~7),
            # not near 2**64: positions are not wrap-safe there (nor in libbpf),
            # and no ring gets there (16 EiB of records)
            st.sampled_from([(1 << 32) - 64, (1 << 63) - 64]),
        )
    )
    fill_op = st.one_of(
        st.tuples(
            st.sampled_from(["output", "submit", "discard", "busy", "dead_busy"]),
            st.integers(0, min(300, size - 16)),
        ),
        st.tuples(st.just("consume"), st.integers(1, 4)),
    )
    return WalkPlan(
        size=size,
        overwrite=OVERWRITE and draw(st.booleans()),
        abandon=draw(st.sampled_from([0.0, 1e-6, 1e-6, 1.0])),
        base=base,
        fill=tuple(draw(st.lists(fill_op, min_size=1, max_size=24))),
        actions=tuple(draw(st.lists(actions(size), min_size=1, max_size=16))),
    )


class Shm:
    """The test's own read/write mapping of a ring's memfd."""

    def __init__(self, fd: int, size: int) -> None:
        lay = layout()
        self.size, self.mask = size, size - 1
        self.data = lay.meta_pages * PAGE
        self.lay = lay
        self.mem = mmap.mmap(fd, self.data + size)

    def u64(self, off: int, value: int | None = None) -> int:
        if value is not None:
            U64.pack_into(self.mem, off, value & U64_MAX)
        return U64.unpack_from(self.mem, off)[0]

    def cons(self, value: int | None = None) -> int:
        return self.u64(CONS_POS, value)

    def prod(self, value: int | None = None) -> int:
        return self.u64(PROD_POS, value)

    def pending(self, value: int | None = None) -> int:
        return self.u64(self.lay.pending_pos, value)

    def next(self, value: int | None = None) -> int:
        return self.u64(self.lay.next_pos, value)

    def over(self, value: int | None = None) -> int:
        assert self.lay.overwrite_pos
        return self.u64(self.lay.overwrite_pos, value)

    def peek(self, pos: int, n: int) -> bytes:
        """n bytes of the data area from position pos, wrapping around."""
        off = pos & self.mask
        area = self.mem[self.data : self.data + self.size] * 2
        return area[off : off + n]

    def poke(self, pos: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[self.data + ((pos + i) & self.mask)] = b

    def hdr(self, pos: int) -> tuple[int, int]:
        return HDR.unpack(self.peek(pos, 8))

    def len_at(self, pos: int) -> int:
        off = pos & self.mask
        if off + 4 <= self.size:
            return U32.unpack_from(self.mem, self.data + off)[0]
        return U32.unpack(self.peek(pos, 4))[0]

    def rebase(self, base: int) -> None:
        """Move an empty ring's positions to base, as after that much traffic."""
        for f in (self.cons, self.prod, self.pending, self.next):
            f(base)
        if self.lay.overwrite_pos:
            self.over(base)


def span_ok(cons: int, prod: int, size: int) -> bool:
    """Positions a correct ring can have: aligned, the consumer at most a lap behind."""
    return not (cons | prod) & 7 and cons <= prod and prod - cons <= size


# after every example's own actions: each walk once more, over what they left
EPILOGUE = (
    ("ready",),
    ("query",),
    ("consume_with_pos",),
    ("p_output", 24),
    ("sleep",),
    ("poll", 0.0),
    ("c_output", 8),
    ("consume_each",),
    ("commit_held", "submit"),
    ("consume",),
    ("snapshot",),
)


class Walk:
    """One example of the walk fuzz, run in the child."""

    def __init__(self, plan: WalkPlan) -> None:
        self.plan = plan
        self.size = plan.size
        self.max_payload = plan.size - 16
        kwargs = {"overwrite": True} if plan.overwrite else {}
        self.ring = Ring(plan.size, abandon_timeout=plan.abandon, **kwargs)
        self.producer = Ring._attach_fds(self.ring._mem_fd, self.ring.fileno())
        self.shm = Shm(self.ring._mem_fd, plan.size)
        self.ctrl = self.shm.mem[:PAGE]
        self.positions: list[int] = []  # of every record put in
        self.held: list[ringcore.Reservation] = []
        self.events = {"overwrite ring" if plan.overwrite else "normal ring"}

    def note(self, line: str) -> None:
        tell_parent(line)

    def run(self) -> None:
        self.shm.rebase(self.plan.base)
        for op in self.plan.fill:
            self.fill(*op)
        for act in self.plan.actions + EPILOGUE:
            self.note(repr(act))
            getattr(self, "do_" + act[0])(*act[1:])
        assert self.shm.mem[:PAGE] == self.ctrl, "the control page changed"
        q = self.ring.query()
        if q.abandoned_records:
            self.events.add("abandoned busy records")
        for e in sorted(self.events):
            tell_parent(EVENT + e)

    # -- filling, before any corruption: everything must just work
    def fill(self, kind: str, n: int) -> None:
        if kind == "consume":
            for rec in self.ring.consume(max_records=n):
                assert len(rec) <= self.max_payload
            return
        if kind == "output":
            pos = self.shm.next()
            if self.ring.output(bytes([len(self.positions) & 0xFF]) * n):
                self.positions.append(pos)
            return
        res = self.ring.reserve(n)
        if res is None:
            return
        self.positions.append(res.position)
        memoryview(res)[:] = b"\xa5" * n
        if kind == "submit":
            res.submit()
        elif kind == "discard":
            res.discard()
        else:
            self.held.append(res)
            if kind == "dead_busy":
                # owned by slot 200, generation 7: never claimed, so its owner
                # is gone and the consumer steps over it after abandon_timeout
                self.shm.poke(res.position + 4, U32.pack(200 | 7 << 8))

    # -- corruptions
    def target(self, idx: int) -> int:
        known = [*self.positions, self.shm.cons()]
        return known[idx % len(known)]

    def do_hdr_len(self, idx: int, value: int) -> None:
        self.shm.poke(self.target(idx), U32.pack(value))

    def do_hdr_pg_off(self, idx: int, value: int) -> None:
        self.shm.poke(self.target(idx) + 4, U32.pack(value))

    def do_raw(self, off: int, data: bytes) -> None:
        self.shm.poke(off, data)

    def do_cons_behind(self, g: int) -> None:
        self.shm.cons(self.shm.prod() - g)

    def do_cons_ahead(self, g: int) -> None:
        self.shm.cons(min(self.shm.prod() + g, U64_MAX))

    def do_prod_ahead(self, g: int) -> None:
        self.shm.prod(self.shm.cons() + g)

    def do_prod_behind(self, g: int) -> None:
        self.shm.prod(max(self.shm.cons() - g, 0))

    def do_both(self, base: int, g: int) -> None:
        self.shm.cons(base)
        self.shm.prod(base + g)

    def do_pending_behind(self, g: int) -> None:
        self.shm.pending(max(self.shm.next() - g, 0))

    def do_pending_ahead(self, g: int) -> None:
        self.shm.pending(min(self.shm.next() + g, U64_MAX))

    def do_next_ahead(self, g: int) -> None:
        self.shm.next(self.shm.next() + g)

    def do_next_behind(self, g: int) -> None:
        self.shm.next(max(self.shm.next() - g, 0))

    def do_over_behind(self, g: int) -> None:
        if self.plan.overwrite:
            self.shm.over(self.shm.prod() - g)

    def do_over_ahead(self, g: int) -> None:
        if self.plan.overwrite:
            self.shm.over(min(self.shm.prod() + g, U64_MAX))

    def over(self) -> int | None:
        return self.shm.over() if self.plan.overwrite else None

    def walk_start(self) -> int:
        """Where the consumer's walk starts: overwrite_pos if that is ahead."""
        cons, over = self.shm.cons(), self.over()
        return over if over is not None and over > cons else cons

    # -- consumer calls
    def abandon_overshoots(self) -> bool:
        """Bugs abandoned_length[overwrite], abandon_wrap: an abandoned length, unchecked.

        Replays the walk (positions within a lap, so a few hundred steps):
        True if it can reach a busy record longer than what is left before
        producer_pos, which, once abandoned, moves consumer_pos past
        producer_pos (and past 2**64, into a heap overflow).
        """
        pos, prod = self.walk_start(), self.shm.prod()
        if self.shm.cons() >= prod:
            return False
        while pos < prod:
            length = self.shm.len_at(pos)
            rec = ((length & ~(BUSY_BIT | DISCARD_BIT)) + 15) & ~7
            if rec > prod - pos:
                return bool(length & BUSY_BIT)
            pos += rec
        return False

    def consumer_may_walk(self) -> bool:
        cons, prod, overwrite = self.shm.cons(), self.shm.prod(), self.plan.overwrite
        if (
            (lap_bug(overwrite) and consumer_walk_unbounded(cons, prod, self.size, self.over()))
            or (bug("misaligned") and (cons % 8 or self.walk_start() % 8))
            or (
                overwrite
                and bug("abandoned_length[overwrite]", "abandon_wrap")
                and self.abandon_overshoots()
            )
        ):
            self.events.add("consumer call skipped: known bug state")
            self.note("  (skipped: known bug state)")
            return False
        return True

    def consume_call(self, name: str, arg: object = None) -> None:
        if not self.consumer_may_walk():
            return
        cons0, prod0, over0 = self.shm.cons(), self.shm.prod(), self.over()
        # the walk may skip ahead to overwrite_pos, never beyond producer_pos
        end = prod0 if over0 is None or cons0 >= prod0 else max(prod0, over0)
        lens: list[int] = []
        with_pos: list[tuple[int, bytes]] = []
        err = None

        def each(view: memoryview) -> None:
            assert len(view) <= self.max_payload, f"record of {len(view)} bytes"
            lens.append(len(bytes(view)))

        try:
            if name == "consume":
                lens = [len(r) for r in self.ring.consume()]
            elif name == "consume_max":
                recs = self.ring.consume(max_records=arg)
                assert len(recs) <= arg
                lens = [len(r) for r in recs]
            elif name == "consume_with_pos":
                with_pos = self.ring.consume_with_pos()
                lens = [len(r) for _, r in with_pos]
            elif name == "consume_each":
                n = self.ring.consume_each(each)
                assert n == len(lens)
            else:
                lens = [len(r) for r in self.ring.poll(timeout=arg)]
        except ringcore.RingCorruptedError as e:
            err = e
        cons1 = self.shm.cons()
        self.note(f"  -> cons {cons0}->{cons1} prod {prod0} over {over0} lens {lens} err {err}")
        if err is not None:
            self.events.add("corruption reported")
        if lens:
            self.events.add("records consumed after a corruption")
        assert all(n <= self.max_payload for n in lens), f"a record larger than the ring: {lens}"
        if cons0 < prod0:
            assert cons0 <= cons1 <= end, "the walk went outside [consumer_pos, producer_pos]"
        else:  # nothing to walk; consumer_pos ahead of producer_pos may be reported
            assert cons1 == cons0, "consumed with nothing committed"
            assert not lens
        for pos, rec in with_pos:
            assert cons0 <= pos and pos + 8 + len(rec) <= prod0, (pos, len(rec))
            assert rec == self.shm.peek(pos + 8, len(rec)), "record not read from its position"
        if err is not None:
            msg = str(err)
            m = re.search(r"position (\d+)", msg)
            if name == "consume_each" and bug("consume_each_message"):
                assert "position" in msg, msg
            else:
                assert m and int(m.group(1)) == cons1, f"{msg!r}: consumer_pos is {cons1}"

    def do_consume(self) -> None:
        self.consume_call("consume")

    def do_consume_max(self, n: int) -> None:
        self.consume_call("consume_max", n)

    def do_consume_with_pos(self) -> None:
        self.consume_call("consume_with_pos")

    def do_consume_each(self) -> None:
        self.consume_call("consume_each")

    def do_poll(self, timeout: float) -> None:
        self.consume_call("poll", timeout)

    def do_ready(self) -> None:
        cons, prod = self.walk_start(), self.shm.prod()
        overwrite = self.plan.overwrite
        if cons % 8 and (bug("misaligned") or (overwrite and bug("misaligned_over"))):
            self.events.add("consumer call skipped: known bug state")
            return
        ready = self.ring.ready()
        if (self.shm.cons() | prod) % 8 or (overwrite and self.shm.over() % 8):
            assert ready in (True, False)  # corrupt: True lets consume() report it
        elif cons >= prod:
            assert ready is False
        elif self.plan.overwrite or span_ok(cons, prod, self.size):
            assert ready is not bool(self.shm.len_at(cons) & BUSY_BIT)
        else:  # corrupt positions: True lets consume() report them
            assert ready in (True, False)

    def do_query(self) -> None:
        q = self.ring.query()
        cons, prod = self.shm.cons(), self.shm.prod()
        assert (q.consumer_pos, q.producer_pos, q.ring_size) == (cons, prod, self.size)
        if self.plan.overwrite:
            assert q.overwrite_pos == self.shm.over()
        else:
            assert q.avail_data == (prod - cons) & U64_MAX

    def do_snapshot(self) -> None:
        cons, prod, data = self.ring.snapshot()
        assert (cons, prod) == (self.shm.cons(), self.shm.prod())
        assert data == self.shm.mem[self.shm.data : self.shm.data + self.size]

    def do_sleep(self) -> None:
        time.sleep(0.002)  # lets abandon_timeout run out on a busy record

    def do_commit_held(self, how: str) -> None:
        for res in self.held:
            res.submit() if how == "submit" else res.discard()
        self.held.clear()

    # -- producer calls
    def make_room_overshoots(self, n: int) -> bool:
        """Bug make_room_walk: make_room() steps from overwrite_pos by header lengths.

        Replays its walk for a record of n bytes: True if a step would pass
        the new producer position (from there it spins towards 2**64).
        """
        mask = self.size - 1
        new_prod = (self.shm.next() + ((n + 15) & ~7)) & U64_MAX
        over = self.shm.over()
        while (gap := (new_prod - over) & U64_MAX) > mask:
            rec = ((self.shm.len_at(over) & ~(BUSY_BIT | DISCARD_BIT)) + 15) & ~7
            if rec > gap:
                return True
            over += rec
        return False

    def producer_may_walk(self, n: int) -> bool:
        pending, nxt, over = self.shm.pending(), self.shm.next(), self.over()
        if (
            (bug("pending_walk") and producer_walk_far(pending, nxt))
            or (bug("misaligned_next") and (nxt % 8 or pending % 8 or (over or 0) % 8))
            or (
                over is not None
                and bug("make_room_walk")
                and (make_room_walk_far(nxt, over) or self.make_room_overshoots(n))
            )
        ):
            self.events.add("producer call skipped: known bug state")
            self.note("  (skipped: known bug state)")
            return False
        return True

    def start(self) -> int:
        """Where a producer puts its next record: next_pos, or producer_pos when
        next_pos is not a record boundary."""
        pos = self.shm.next()
        return self.shm.prod() if pos % 8 else pos

    def output(self, ring: Ring, n: int) -> None:
        if not self.producer_may_walk(n):
            return
        pos = self.start()
        payload = bytes((pos + i) & 0xFF for i in range(n))
        ok = ring.output(payload)
        assert ok in (True, False)
        self.note(f"  -> {ok} at {pos}")
        self.events.add(f"producer output {ok}")
        if ok:
            self.positions.append(pos)
            assert self.shm.hdr(pos)[0] == n, "the record is not where next_pos said"
            assert self.shm.peek(pos + 8, n) == payload
            assert self.shm.next() == (pos + ((n + 15) & ~7)) & U64_MAX

    def do_p_output(self, n: int) -> None:
        self.output(self.producer, n)

    def do_c_output(self, n: int) -> None:
        self.output(self.ring, n)  # through the consumer handle's producer mapping

    def do_p_reserve(self, n: int, how: str) -> None:
        if not self.producer_may_walk(n):
            return
        pos = self.start()
        res = self.producer.reserve(n)
        self.note(f"  -> {res is not None} at {pos}")
        self.events.add(f"producer reserve {res is not None}")
        if res is None:
            return
        assert (res.position, len(res)) == (pos, n)
        assert self.shm.hdr(pos)[0] == n | BUSY_BIT, "the busy header is not at the position"
        self.positions.append(pos)
        memoryview(res)[:] = b"\x5a" * n
        if how == "submit":
            res.submit()
        elif how == "discard":
            res.discard()
        else:
            self.held.append(res)


def walk_case(plan: WalkPlan) -> None:
    Walk(plan).run()


@settings(
    max_examples=WALK_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=walk_plans())
def test_header_walk_fuzz(plan: WalkPlan) -> None:
    layout()
    prefetch_known_bugs()
    record_events(run_forked(walk_case, plan))


# --- 3. both fuzzers under ASan + UBSan ---------------------------------------------


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that imports the ASan + UBSan build of tests/test_build.py."""
    if not SOURCES:
        pytest.skip("no ringcore/src/*.c")
    libasan = run(["gcc", "-print-file-name=libasan.so"]).stdout.strip()
    if not (os.path.isabs(libasan) and os.path.exists(libasan)):
        pytest.skip(f"gcc has no libasan: {libasan!r}")
    top = tmp_path_factory.mktemp("asan")
    pkg = top / "ringcore"
    pkg.mkdir()
    ext = pkg / EXT_NAME
    r = run(["gcc", *SAN_FLAGS, *map(str, SOURCES), "-o", str(ext)])
    assert r.returncode == 0, show(r)
    for f in [*ROOT.glob("ringcore/*.py"), *ROOT.glob("ringcore/*.pyi")]:
        (pkg / f.name).write_bytes(f.read_bytes())
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(top), str(TESTS)]),
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "RINGCORE_EXPECT_BUILD": str(ext),
        "RINGCORE_FUZZ_SANITIZED": "1",
    }


def run_sanitized(env: dict[str, str], cwd: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run code with the instrumented build; a report in a forked child fails it."""
    script = (
        "import os, ringcore._ringcore as m\n"
        "assert m.__file__ == os.environ['RINGCORE_EXPECT_BUILD'], m.__file__\n"
        "import test_fuzz\n" + code + "\nprint('done')\n"
    )
    r, report = run_watched([sys.executable, "-c", script], cwd, env, timeout=600)
    assert report is None, f"sanitizer report:\n{report}\n\n{show(r)}"
    assert r.returncode == 0 and "done" in r.stdout, show(r)
    return r


@pytest.mark.slow
def test_fuzz_under_asan(sanitized, tmp_path):
    """Both fuzzers against the instrumented build (sanitizer reports go to the child's log)."""
    env = {**sanitized, "RINGCORE_FUZZ_ATTACH_EXAMPLES": "50"}
    run_sanitized(env, tmp_path, "test_fuzz.test_attach_fuzz()\ntest_fuzz.test_header_walk_fuzz()")


# --- known bugs: minimal reproductions -----------------------------------------------
#
# Each case is what a correct ring does: it passes once the bug is fixed.
# RingCorruptedError is always an acceptable answer.


def fresh_ring_shm(size: int = PAGE, **kwargs: object) -> tuple[Ring, Shm]:
    ring = Ring(size, **kwargs)
    return ring, Shm(ring._mem_fd, size)


def consume_checked(ring: Ring) -> None:
    """consume(): RingCorruptedError, or records no longer than a record can be."""
    with contextlib.suppress(ringcore.RingCorruptedError):
        recs = ring.consume()
        assert all(len(r) <= ring.size - 16 for r in recs), [len(r) for r in recs]


def record_past_ring_case(overwrite: bool) -> None:
    """rc_consume() bounded a record only by producer_pos - consumer_pos, not by the ring.

    4 KiB ring, len 8192 at position 0, producer_pos 8200: consume() returned
    an 8192-byte record read up to 8 bytes past the double mapping; in
    overwrite mode the copy overflowed the 4 KiB scratch buffer (ASan:
    heap-buffer-overflow WRITE of size 8192 in consume_overwrite; glibc abort).
    """
    ring, shm = fresh_ring_shm(overwrite=overwrite)
    shm.poke(0, U32.pack(2 * PAGE))  # header at position 0: len = 2 * ring size
    shm.prod(2 * PAGE + 8)  # producer_pos = one such record further
    consume_checked(ring)


def huge_length_case() -> None:
    """len 0x3FFFFFF0 at position 0, producer_pos 0x3FFFFFF8: consume() died of SIGSEGV."""
    ring, shm = fresh_ring_shm()
    shm.poke(0, U32.pack(0x3FFFFFF0))  # len = 1 GiB - 16 at position 0
    shm.prod(0x3FFFFFF8)  # producer_pos: exactly one such record
    consume_checked(ring)


def endless_walk_case() -> None:
    """producer_pos 2**62 ahead: consume() walked the same headers lap after lap (hang)."""
    ring, shm = fresh_ring_shm()
    shm.poke(0, U32.pack(DISCARD_BIT | (PAGE - 8)))  # a discarded record of one whole lap
    shm.prod(1 << 62)
    consume_checked(ring)  # stepped over the same record lap after lap, 2**50 times


def pending_walk_case() -> None:
    """pending_pos far behind next_pos: advance_pending() walked it all (hang, lock held)."""
    ring, shm = fresh_ring_shm()
    shm.rebase(1 << 50)  # an empty ring after 2**50 bytes of traffic: consistent
    shm.pending(0)  # one corrupt word: pending_pos
    ring.output(b"x")  # room_for() -> advance_pending() walked 2**47 headers


def corrupt_pending_case(overwrite: bool, shift: int) -> None:
    """One corrupt pending_pos word after a few laps: producers refused for good.

    Found in review: overwrite mode fell back to a consumer position it had
    never read (0), so the corrupt value stayed; misaligned, it even reached
    overwrite_pos and the consumer reported corruption.
    """
    ring, shm = fresh_ring_shm(overwrite=overwrite)
    laps = 3 * PAGE // 72
    for _ in range(laps):  # 72-byte records: three laps
        assert ring.output(b"x" * 60)
        assert ring.consume() == [b"x" * 60]
    shm.pending(shm.next() + shift)  # ahead of next_pos, or not a record boundary
    for i in range(laps):
        assert ring.output(b"y" * 60), f"output {i} of {laps} refused"
        assert ring.consume() == [b"y" * 60]


def make_room_walk_case() -> None:
    """One corrupt len at overwrite_pos of a full overwrite ring: output() hung, lock held.

    make_room() stepped 1 GiB past the new producer position, from where
    new_prod - over is ~2**64 and the walk goes on towards 2**64.
    """
    ring, shm = fresh_ring_shm(overwrite=True)
    for _ in range(PAGE // 32):  # one lap of 24-byte records: overwrite_pos moves to 32
        assert ring.output(b"r" * 24)
    shm.poke(ring.query().overwrite_pos, U32.pack(0x3FFFFFF0))  # the oldest record's len
    ring.output(b"x" * 24)  # make_room() stepped 1 GiB past new_prod, then on to 2**64


def abandoned_length_case(overwrite: bool) -> None:
    """Overwrite mode stepped over an abandoned busy record by its length, unchecked.

    consumer_pos jumped 1 GiB past producer_pos, silently (the normal mode
    reports it as corruption).
    """
    ring, shm = fresh_ring_shm(overwrite=overwrite, abandon_timeout=1e-6)
    # a busy record of 1 GiB at position 0, of slot 5: never claimed, so its owner is dead
    shm.poke(0, HDR.pack(BUSY_BIT | 0x3FFFFFF0, 5))
    shm.prod(16)
    with contextlib.suppress(ringcore.RingCorruptedError):
        assert ring.consume() == []  # the busy record starts the abandon clock
        time.sleep(0.002)
        ring.consume()  # steps over it: must not leave producer_pos behind
    assert shm.cons() <= shm.prod(), f"consumer_pos {shm.cons()} > producer_pos {shm.prod()}"


def abandon_wrap_case() -> None:
    """Found by the walk fuzz: the unchecked abandoned length wrapped consumer_pos past 2**64.

    Positions one lap apart near 2**64; stepping over the busy record moved
    consumer_pos to 8, producer_pos - consumer_pos became ~2**64 and a 64 KiB
    memcpy() overflowed the 4 KiB scratch buffer (glibc: malloc(): invalid
    size; ASan: heap-buffer-overflow WRITE in consume_overwrite).
    """
    ring, shm = fresh_ring_shm(overwrite=True, abandon_timeout=1e-6)
    shm.cons(2**64 - PAGE)  # positions one lap apart (4088 bytes), near 2**64
    shm.prod(2**64 - 8)
    # a busy record of a dead owner (slot 5) at consumer_pos, 4104 bytes long:
    # stepping over it wraps consumer_pos to 8, where a 64 KiB record "starts"
    shm.poke(0, HDR.pack(BUSY_BIT | PAGE, 5))
    shm.poke(8, HDR.pack(0x10000, 0))
    consume_checked(ring)  # starts the abandon clock
    time.sleep(0.002)
    consume_checked(ring)


def consume_each_message_case() -> None:
    """consume_each()'s RingCorruptedError did not say at which position."""
    ring, shm = fresh_ring_shm()
    assert ring.output(b"abc")
    shm.poke(0, U32.pack(PAGE))  # longer than what was committed
    with pytest.raises(ringcore.RingCorruptedError) as info:
        ring.consume_each(lambda view: None)
    assert re.search(r"position \d+", str(info.value)), str(info.value)


def misaligned_case(what: str) -> None:
    """A misaligned position is dereferenced as a record header.

    Only fails where misaligned accesses are caught: UBSan (misaligned
    address for type 'struct rc_hdr'), or strict-alignment CPUs, which fault
    on misaligned atomics. consumer_pos 3 (consume.c, on HEAD); next_pos + 3
    (write_busy_hdr() in produce.c) and overwrite_pos 3 (rc_ready() in
    consume.c), still.
    """
    ring, shm = fresh_ring_shm()
    assert ring.output(b"abcdefgh" * 3)
    if what == "consumer_pos":
        shm.cons(3)
        ring.ready()
        consume_checked(ring)
    elif what == "overwrite_pos":
        ring.close()
        ring, shm = fresh_ring_shm(overwrite=True)
        assert ring.output(b"abcdefgh" * 3)
        shm.u64(shm.lay.overwrite_pos, 3)
        ring.ready()
        consume_checked(ring)
    else:
        shm.next(shm.next() + 3)  # and producer_pos, as they go together
        shm.prod(shm.next())
        ring.output(b"x")


REPROS: dict[str, tuple[Callable[..., None], tuple]] = {
    "record_past_ring[normal]": (record_past_ring_case, (False,)),
    "record_past_ring[overwrite]": (record_past_ring_case, (True,)),
    "huge_length": (huge_length_case, ()),
    "endless_walk": (endless_walk_case, ()),
    "pending_walk": (pending_walk_case, ()),
    "make_room_walk": (make_room_walk_case, ()),
    "corrupt_pending[normal, ahead]": (corrupt_pending_case, (False, 8)),
    "corrupt_pending[normal, misaligned]": (corrupt_pending_case, (False, -3)),
    "corrupt_pending[overwrite, ahead]": (corrupt_pending_case, (True, 8)),
    "corrupt_pending[overwrite, misaligned]": (corrupt_pending_case, (True, -3)),
    "abandoned_length[normal]": (abandoned_length_case, (False,)),
    "abandoned_length[overwrite]": (abandoned_length_case, (True,)),
    "abandon_wrap": (abandon_wrap_case, ()),
    "consume_each_message": (consume_each_message_case, ()),
    "misaligned": (misaligned_case, ("consumer_pos",)),
    "misaligned_next": (misaligned_case, ("next_pos",)),
    "misaligned_over": (misaligned_case, ("overwrite_pos",)),
}
if not OVERWRITE:
    for _name in [
        n
        for n in REPROS
        if "overwrite" in n or n in ("make_room_walk", "abandon_wrap", "misaligned_over")
    ]:
        del REPROS[_name]


def check_fixed(name: str) -> None:
    if name not in REPROS:
        pytest.skip("no overwrite mode")
    err = reproduce(name)
    if err is not None:
        raise err


@pytest.mark.parametrize("name", [n for n in REPROS if not n.startswith("misaligned")])
def test_known_bug_stays_fixed(name: str) -> None:
    """The bugs found by fuzzing HEAD 92702fe, each by its minimal reproduction."""
    check_fixed(name)


@pytest.mark.parametrize("name", ["misaligned", "misaligned_next", "misaligned_over"])
def test_misaligned_positions(name: str) -> None:
    """Here they can only fail on a strict-alignment CPU; see the sanitizer test below."""
    check_fixed(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    # fixed after fuzzing: a misaligned next_pos falls back to producer_pos
    # (or the reservation is refused); ready() checks overwrite_pos's alignment
    ["misaligned", "misaligned_next", "misaligned_over"],
)
def test_misaligned_positions_under_ubsan(sanitized, tmp_path, name: str) -> None:
    run_sanitized(sanitized, tmp_path, f"test_fuzz.check_fixed({name!r})")
