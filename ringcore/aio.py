"""The consumer's side on asyncio, for ringcore used as a library::

    ring = ringcore.Ring(1 << 20)
    ...  # hand `ring` to producer processes
    async for batch in ringcore.aio.batches(ring):
        for record in batch:
            ...

No thread and no polling: the loop watches the ring's eventfd. Before each
wait the generator announces it (Ring.prepare_wait), which re-checks the
ring, so a record committed in between is never left waiting for a wake-up
that will not come. A record left busy by a producer that died mid-record
is looked at again when Ring.stall_recheck says to (and stepped over once
its owner is known dead, as Ring.consume does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from ringcore import Ring


async def batches(ring: Ring, max_records: int | None = None) -> AsyncIterator[list[bytes]]:
    """Every record of the ring, in order, in batches of at most
    `max_records` (all there are, by default), as they come, for as long as
    the caller iterates (break, or cancel the task). The caller must be the
    ring's consumer, and close the ring only after it stopped iterating."""
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    fd = ring.fileno()

    def wake() -> None:
        # level-triggered: read the eventfd, or the loop calls back at once
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 8)
        woken.set()

    loop.add_reader(fd, wake)
    try:
        while True:
            batch = ring.consume(max_records)
            if batch:
                yield batch
                continue
            if not ring.prepare_wait():
                continue  # a record came in between
            woken.clear()
            stall = ring.stall_recheck()
            try:
                await asyncio.wait_for(woken.wait(), stall if stall > 0 else None)
            except TimeoutError:
                pass
            finally:
                ring.finish_wait()
    finally:
        loop.remove_reader(fd)


__all__ = ["batches"]
