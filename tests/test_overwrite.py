"""Overwrite mode (BPF_F_RB_OVERWRITE, Linux 6.19): a flight recorder.

Reservations never fail for lack of room; the newest records overwrite the
oldest ones that are not busy; the consumer skips to the oldest intact record
and query() reports the overwrite position and the bytes lost. Records that a
producer overwrites while the consumer copies them are never delivered torn.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import struct

import ringcore

HEAD = struct.Struct("<IQ")  # producer, seq


def make(tag: int, seq: int, size: int) -> bytes:
    body = HEAD.pack(tag, seq) + bytes([seq & 0xFF]) * (size - HEAD.size - 8)
    return body + hashlib.blake2b(body, digest_size=8).digest()


def intact(rec: bytes) -> bool:
    return hashlib.blake2b(rec[:-8], digest_size=8).digest() == rec[-8:]


def test_never_refuses_and_keeps_the_newest():
    with ringcore.Ring(4096, overwrite=True) as ring:
        assert ring.overwrite
        records = [bytes([i]) * 104 for i in range(100)]  # 112 bytes each in the ring
        assert all(ring.output(r) for r in records)
        q = ring.query()
        assert q.reserve_failures == 0
        assert q.producer_pos == 100 * 112
        # oldest record boundary that leaves room: prod - over <= size - 1
        assert q.overwrite_pos == 64 * 112
        assert q.overwritten_bytes == 64 * 112
        assert q.avail_data == 36 * 112
        got = ring.consume_with_pos()
        assert [pos for pos, _ in got] == [i * 112 for i in range(64, 100)]
        assert [rec for _, rec in got] == records[64:]
        q = ring.query()
        assert q.overwritten_bytes == 64 * 112, "counted once, when skipped"
        assert q.consumer_pos == q.producer_pos


def test_busy_records_are_never_overwritten():
    """The pending rule still holds: a reservation in progress blocks overwriting."""
    with ringcore.Ring(4096, overwrite=True) as ring:
        held = ring.reserve(100)
        sent = 0
        while ring.output(b"x" * 100):
            sent += 1
        assert sent > 0
        assert ring.query().reserve_failures == 1
        with memoryview(held) as mv:
            mv[:] = b"h" * 100
        held.submit()
        assert ring.output(b"after")  # room again once it is committed
        recs = ring.consume()
        assert recs[-1] == b"after"


def test_normal_ring_still_refuses():
    with ringcore.Ring(4096) as ring:
        assert not ring.overwrite
        while ring.output(b"x" * 100):
            pass
        q = ring.query()
        assert q.reserve_failures == 1 and q.overwrite_pos == 0 and q.overwritten_bytes == 0


def _flood(ring: ringcore.Ring, tag: int, count: int) -> None:
    for seq in range(count):
        size = 24 + (seq * 37) % 400
        # Refused only when the new record would lap another producer's
        # record that is still being written (busy): never for lack of room.
        while not ring.output(make(tag, seq, size)):
            os.sched_yield()


def test_concurrent_flood_delivers_only_intact_records():
    """Two producers overwrite a small ring while the consumer reads it: every
    delivered record is intact, in order per producer, and every byte
    produced is either delivered or counted as overwritten."""
    ctx = mp.get_context("fork")
    count = 20_000
    with ringcore.Ring(4096, overwrite=True) as ring:
        procs = [ctx.Process(target=_flood, args=(ring, t, count)) for t in range(2)]
        for p in procs:
            p.start()
        last = {0: -1, 1: -1}
        delivered = 0
        last_pos = -1
        while True:
            alive = any(p.is_alive() for p in procs)
            for pos, rec in ring.consume_with_pos():
                assert intact(rec), f"torn record delivered at {pos}"
                tag, seq = HEAD.unpack_from(rec)
                assert seq > last[tag], "per-producer order broken"
                assert pos > last_pos
                last[tag], last_pos = seq, pos
                delivered += (len(rec) + 8 + 7) // 8 * 8
            if not alive:
                break
            os.sched_yield()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        delivered += sum((len(r) + 15) // 8 * 8 for r in ring.consume())
        q = ring.query()
        assert q.submitted == 2 * count
        assert q.overwritten_bytes > 0, "the ring should have been lapped"
        assert delivered + q.overwritten_bytes == q.producer_pos


def test_producers_lapping_the_drain_are_not_corruption():
    """A drain reads producer_pos once; producers may lap it several times
    while the callback runs (a slow consumer, a preempted one). Regression:
    the overwrite position then ran ahead of that stale producer position and
    the drain reported the ring corrupt (seen in CI under load)."""
    with ringcore.Ring(4096, overwrite=True) as ring:
        for i in range(10):
            assert ring.output(bytes([i]) * 100)
        seen: list[int] = []

        def lap_twice(rec: memoryview) -> None:
            seen.append(rec[0])
            if len(seen) == 1:
                for j in range(100):  # 11,200 bytes: more than two rings
                    assert ring.output(bytes([100 + j]) * 100)

        ring.consume_each(lap_twice)
        seen += [rec[0] for rec in ring.consume()]
        q = ring.query()
        # the first record, then the newest ones that fit, in order
        assert seen[0] == 0
        assert seen[1:] == sorted(seen[1:]) and seen[-1] == 199
        assert len(seen) - 1 == 4096 // 112
        assert q.consumer_pos == q.producer_pos == 110 * 112
        assert q.overwritten_bytes == (110 - len(seen)) * 112
