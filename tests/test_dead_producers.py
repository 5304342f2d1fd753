"""Producers killed at any instruction do not stall the ring beyond a bound.

The kernel's verifier guarantees every reservation is committed; processes
guarantee nothing. A test hook (Ring._test_park) stops a real producer
process at a chosen point inside a reservation, the test SIGKILLs it there,
and live producers keep producing:
  stage 1  holding the reservation lock            -> the robust lock recovers
  stage 2  busy header written, not published      -> nothing visible
  stage 3  published, lock still held              -> record abandoned
  stage 4  reserved, between reserve and submit    -> record abandoned
The consumer must get every live record, in per-producer order, and step over
an abandoned record only once its owner is dead; a live but slow producer is
waited for, so its submit can never land in space that was reused.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import struct
import time

import pytest

import ringcore

REC = struct.Struct("<II")  # producer, seq
ABANDON = 0.2
STALL_BOUND = 30.0  # generous: only an unbounded stall fails this


def _live_producer(ring: ringcore.Ring, tag: int, count: int) -> None:
    for seq in range(count):
        while not ring.output(REC.pack(tag, seq) + bytes(40)):
            os.sched_yield()


def _park(ring: ringcore.Ring, stage: int, w: int) -> None:
    ring._test_park(48, stage, w)


def _slow_producer(ring: ringcore.Ring, w: int, r: int) -> None:
    res = ring.reserve(48)
    with memoryview(res) as mv:
        mv[:8] = REC.pack(99, 0)
    os.write(w, b"r")  # reserved
    os.read(r, 1)  # held until the test says so
    res.submit()


def wait_byte(fd: int, what: str) -> None:
    ready, _, _ = select.select([fd], [], [], 30)
    assert ready, f"no notice from the producer: {what}"
    assert os.read(fd, 1)


def drain_until(ring: ringcore.Ring, want: dict[int, int], extra: list) -> float:
    """Consume until every live producer's records arrived; returns seconds taken."""
    start = time.monotonic()
    got = dict.fromkeys(want, 0)
    while got != want:
        assert time.monotonic() - start < STALL_BOUND, f"stalled at {got} of {want}"
        for rec in ring.poll(timeout=1.0):
            tag, seq = REC.unpack_from(rec)
            if tag not in want:
                extra.append((tag, seq))
                continue
            assert seq == got[tag], f"producer {tag}: seq {seq}, expected {got[tag]}"
            got[tag] += 1
    return time.monotonic() - start


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_producer_killed_inside_reservation(stage):
    ctx = mp.get_context("fork")
    with ringcore.Ring(4096, abandon_timeout=ABANDON) as ring:
        r, w = os.pipe()
        victim = ctx.Process(target=_park, args=(ring, stage, w))
        victim.start()
        wait_byte(r, f"parked at stage {stage}")
        # live producers start while the victim holds its spot, and go on
        # through its death: 2 x 2,000 records of 56 bytes wrap the ring ~55 times
        live = [ctx.Process(target=_live_producer, args=(ring, t, 2000)) for t in range(2)]
        for p in live:
            p.start()
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        extra: list = []
        took = drain_until(ring, {0: 2000, 1: 2000}, extra)
        for p in live:
            p.join(30)
            assert p.exitcode == 0
        q = ring.query()
        print(f"stage {stage}: all live records after {took:.3f} s; {q}")
        assert extra == []
        assert q.abandoned_records == (1 if stage >= 3 else 0)
        assert q.abandoned_bytes == (56 if stage >= 3 else 0)
        assert q.submitted == 4000
        assert q.consumer_pos == q.producer_pos, "ring not drained"
        os.close(r)
        os.close(w)


def _one_record(ring: ringcore.Ring) -> None:
    while not ring.output(REC.pack(7, 0)):
        os.sched_yield()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_live_lock_holder_is_waited_for():
    """A producer stopped (as by SIGSTOP or a debugger) inside the critical
    section is alive: nobody may take the lock from it, however long it holds
    it, and its waiters sleep; once it is gone, a waiter takes over."""
    ctx = mp.get_context("fork")
    with ringcore.Ring(4096) as ring:
        r, w = os.pipe()
        holder = ctx.Process(target=_park, args=(ring, 1, w))
        holder.start()
        waiter = None
        try:
            wait_byte(r, "parked holding the lock")
            os.kill(holder.pid, signal.SIGSTOP)
            waiter = ctx.Process(target=_one_record, args=(ring,))
            waiter.start()
            # half a second, during which nothing may be reserved
            cpu = _cpu_seconds(waiter.pid)
            waiter.join(0.5)
            assert waiter.is_alive(), "the waiter took the lock of a live holder"
            assert ring.query().producer_pos == 0
            used = _cpu_seconds(waiter.pid) - cpu
            print(f"waiter CPU while the holder was stopped: {used:.3f} s in 0.5 s")
        finally:
            holder.kill()  # SIGKILL ends a stopped process too
            holder.join()
        waiter.join(30)
        assert waiter.exitcode == 0
        assert [REC.unpack_from(x) for x in ring.poll(timeout=5)] == [(7, 0)]
        os.close(r)
        os.close(w)


def test_live_slow_producer_is_never_abandoned():
    """Busy for many abandon timeouts, but alive: the consumer waits for it,
    and its late submit lands in its own record, in order."""
    ctx = mp.get_context("fork")
    with ringcore.Ring(4096, abandon_timeout=ABANDON) as ring:
        reserved_r, reserved_w = os.pipe()
        go_r, go_w = os.pipe()
        slow = ctx.Process(target=_slow_producer, args=(ring, reserved_w, go_r))
        slow.start()
        wait_byte(reserved_r, "slow producer reserved")
        ring.output(REC.pack(0, 0))  # behind the slow record
        # the consumer looks for five abandon periods: nothing may pass
        deadline = time.monotonic() + 5 * ABANDON
        while time.monotonic() < deadline:
            assert ring.poll(timeout=ABANDON) == []
        assert ring.query().abandoned_records == 0
        os.write(go_w, b"g")
        slow.join(30)
        assert slow.exitcode == 0
        recs = ring.poll(timeout=5)
        assert [REC.unpack_from(x) for x in recs] == [(99, 0), (0, 0)]
        for fd in (reserved_r, reserved_w, go_r, go_w):
            os.close(fd)


def test_abandon_timeout_zero_never_abandons():
    ctx = mp.get_context("fork")
    with ringcore.Ring(4096, abandon_timeout=0) as ring:
        r, w = os.pipe()
        victim = ctx.Process(target=_park, args=(ring, 4, w))
        victim.start()
        wait_byte(r, "parked")
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        ring.output(b"after")
        assert ring.poll(timeout=3 * ABANDON) == []
        assert ring.query().abandoned_records == 0
        assert ring.abandon_timeout == 0
        os.close(r)
        os.close(w)


def test_abandon_timeout_validation():
    with pytest.raises(ValueError, match="abandon_timeout"):
        ringcore.Ring(4096, abandon_timeout=-1)
    with ringcore.Ring(4096) as ring:
        assert ring.abandon_timeout == pytest.approx(1.0)
