"""Multi-process stress workload shared by the stress and sanitizer tests.

Each producer process writes records tagged (producer, seq, position) with a
payload derived from them; some hold several reservations and commit them
out of order. The consumer checks: no loss, no duplicate, per-producer
order, intact payloads, and that every record is consumed at the position
it was reserved at (consumption order == reservation order).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import select
import struct
import time

import ringcore

HEAD = struct.Struct("<IIQ")  # producer tag, seq, reserved position
UNKNOWN_POS = 2**64 - 1  # output()/output_many() do not return a position


def payload(tag: int, seq: int, pos: int, size: int) -> bytes:
    head = HEAD.pack(tag, seq, pos)
    fill = bytes([(tag * 31 + seq) & 0xFF]) * (size - HEAD.size)
    return head + fill


def produce(ring: ringcore.Ring, tag: int, count: int, seed: int) -> None:
    assert not ring.is_consumer
    rnd = random.Random(seed)
    held: list[ringcore.Reservation] = []
    mode = tag % 3  # 0: reserve, out of order; 1: output; 2: output_many
    seq = 0

    def flush() -> None:
        rnd.shuffle(held)
        for res in held:
            res.submit()
        held.clear()

    while seq < count:
        size = rnd.randint(HEAD.size, 200)
        if mode == 0:
            res = ring.reserve(size)
            if res is None:
                flush()
                os.sched_yield()
                continue
            with memoryview(res) as mv:
                mv[:] = payload(tag, seq, res.position, size)
            held.append(res)
            seq += 1
            if len(held) >= rnd.randint(1, 4):
                flush()
        elif mode == 1:
            if ring.output(payload(tag, seq, UNKNOWN_POS, size)):
                seq += 1
            else:
                os.sched_yield()
        else:
            n = min(rnd.randint(1, 16), count - seq)
            batch = [payload(tag, seq + i, UNKNOWN_POS, size) for i in range(n)]
            sent = ring.output_many(batch)
            seq += sent
            if sent < n:
                os.sched_yield()
    flush()


class Checker:
    def __init__(self, producers: int, count: int) -> None:
        self.next_seq = [0] * producers
        self.count = count
        self.last_pos = -1
        self.records = 0

    def check(self, pos: int, rec: bytes) -> None:
        tag, seq, reserved_at = HEAD.unpack_from(rec)
        assert pos > self.last_pos, f"positions went backwards: {pos} after {self.last_pos}"
        self.last_pos = pos
        assert reserved_at in (pos, UNKNOWN_POS), (
            f"record reserved at {reserved_at} consumed at {pos}: order broken"
        )
        assert seq == self.next_seq[tag], (
            f"producer {tag}: got seq {seq}, expected {self.next_seq[tag]} (loss, dup or reorder)"
        )
        assert rec == payload(tag, seq, reserved_at, len(rec)), f"corrupt payload {tag}/{seq}"
        self.next_seq[tag] += 1
        self.records += 1

    def done(self) -> bool:
        return all(n == self.count for n in self.next_seq)


def run(
    start_method: str,
    producers: int = 4,
    count: int = 10_000,
    ring_size: int = 4096,
    sleep_between_batches: bool = False,
    deadline_s: float = 300.0,
) -> ringcore.RingQuery:
    """Run the workload; returns the final query(). Raises AssertionError."""
    ctx = mp.get_context(start_method)
    ring = ringcore.Ring(ring_size)
    procs = [
        ctx.Process(target=produce, args=(ring, tag, count, 1000 + tag)) for tag in range(producers)
    ]
    for p in procs:
        p.start()
    checker = Checker(producers, count)
    deadline = time.monotonic() + deadline_s
    try:
        while not checker.done():
            assert time.monotonic() < deadline, f"stalled: {checker.next_seq} of {count} each"
            batch = ring.consume_with_pos()
            for pos, rec in batch:
                checker.check(pos, rec)
            if batch and not sleep_between_batches:
                continue
            if checker.done():
                break
            # sleep on the eventfd as an event loop would
            if ring.prepare_wait():
                readable, _, _ = select.select([ring], [], [], 10.0)
                ring.finish_wait()
                if not readable:
                    assert not ring.ready(), "lost wakeup: a record is ready but no signal came"
        for p in procs:
            p.join(60)
            assert p.exitcode == 0, f"producer exited with {p.exitcode}"
        assert ring.consume() == [], "records beyond the expected ones"
        return ring.query()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        ring.close()
