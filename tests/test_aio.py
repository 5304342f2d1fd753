"""ringcore.aio.batches: the consumer on asyncio, fed by real producer
processes (spawned, each with its own handle on the ring's shared memory)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import struct

import ringcore
import ringcore.aio

N = 20_000


def produce(ring: ringcore.Ring, who: int, n: int) -> None:
    for seq in range(n):
        data = struct.pack("<II", who, seq)
        while not ring.output(data):
            pass  # full: the consumer drains it


async def test_batches_deliver_every_record_of_every_producer_in_order() -> None:
    ring = ringcore.Ring(1 << 16)  # small: the producers find it full, often
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=produce, args=(ring, who, N)) for who in range(3)]
    for p in procs:
        p.start()
    last = [-1, -1, -1]
    batches = 0
    async for batch in ringcore.aio.batches(ring, max_records=512):
        assert 1 <= len(batch) <= 512
        batches += 1
        for data in batch:
            who, seq = struct.unpack("<II", data)
            assert seq == last[who] + 1, (who, seq, last[who])
            last[who] = seq
        if last == [N - 1] * 3:
            break
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert batches > 1
    ring.close()


async def test_a_waiting_consumer_wakes_for_the_next_record() -> None:
    ring = ringcore.Ring(1 << 16)
    got: list[bytes] = []

    async def consume() -> None:
        async for batch in ringcore.aio.batches(ring):
            got.extend(batch)
            if len(got) == 2:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # the generator drained nothing and now waits on the eventfd
    assert ring.output(b"one")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=produce, args=(ring, 9, 1))
    p.start()
    await asyncio.wait_for(task, 60)
    p.join(timeout=60)
    assert got[0] == b"one" and struct.unpack("<II", got[1]) == (9, 0)
    ring.close()
