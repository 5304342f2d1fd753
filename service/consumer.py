"""The ring's consumer on the event loop: wake on the eventfd, drain, publish.

No thread and no polling. The loop watches the ring's eventfd with a reader
callback; each wake-up drains committed records in batches (decoded and
JSON-encoded by ringcore.Encoder in one C pass) and publishes them to the
fan-out. Before going back to sleep the consumer announces it
(Ring.prepare_wait), which re-checks the ring, so a record committed in
between is never left waiting for a wake-up that will not come.

Two things can leave records in the ring with no wake-up to come: a draining
pass that stops after `max_batches` so HTTP writers get the loop (it
reschedules itself at once), and a record stuck busy because its producer
died mid-record (a timer fires when Ring.stall_recheck says to look again,
and the consume steps over the record once its owner is known dead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import ringcore
from service.batch import Batch
from service.fanout import Hub

log = logging.getLogger("ringstream.consumer")

# longest a draining pass goes on before it lets the loop run others
PASS_SECONDS = 0.005


class RingConsumer:
    def __init__(
        self,
        ring: ringcore.Ring,
        encoder: ringcore.Encoder,
        hub: Hub,
        *,
        batch: int,
        max_batches: int = 8,
        stall_recheck: float = 0.25,
        coalesce: float = 0.0,
    ) -> None:
        self.ring = ring
        self.encoder = encoder
        self.hub = hub
        self.batch = batch
        self.max_batches = max_batches
        self.stall_recheck = stall_recheck
        self.coalesce = coalesce
        self.records = 0
        self.corrupt: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleeping = False
        self._timer: asyncio.TimerHandle | None = None
        self._pending: asyncio.Handle | None = None
        self._stopped = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.ring.fileno(), self._wake)
        self._run()

    def stop(self) -> None:
        """Stop watching the ring (records still in it stay for drain())."""
        self._stopped = True
        if self._loop is not None:
            self._loop.remove_reader(self.ring.fileno())
        for h in (self._timer, self._pending):
            if h is not None:
                h.cancel()
        if self._sleeping:
            self.ring.finish_wait()
            self._sleeping = False

    def drain(self) -> int:
        """Take everything committed now (at shutdown, after the producers stopped)."""
        total = 0
        while n := self._drain_once():
            total += n
        return total

    def _wake(self) -> None:
        if self._pending is not None:
            # woken again before the pass already due (FORCE_WAKEUP): that
            # pass takes the records; just clear the eventfd
            self._clear_eventfd()
            return
        if self._sleeping:
            self.ring.finish_wait()
            self._sleeping = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.coalesce > 0:
            # A wake-up means one record is there. Waiting a little lets the
            # next ones join it: at 10k records/s, one pass per record costs
            # a context switch and a publish each; a pass per millisecond
            # takes several at once for the price of one (measured: a third
            # of the CPU at 10k records/s).
            self._clear_eventfd()
            assert self._loop is not None
            self._pending = self._loop.call_later(self.coalesce, self._run)
            return
        self._run()

    def _clear_eventfd(self) -> None:
        # the loop's reader would fire again at once while it stays readable;
        # prepare_wait() clears it too, before the next sleep
        with contextlib.suppress(BlockingIOError):
            os.read(self.ring.fileno(), 8)

    def _run(self) -> None:
        self._pending = None
        if self._stopped:
            return
        # bounded in batches and in time: with many subscribers one publish
        # costs a pass over all of them, and the writers, /healthz and
        # accept() wait for the loop meanwhile
        until = time.monotonic() + PASS_SECONDS
        for _ in range(self.max_batches):
            if self._drain_once() < self.batch:
                break
            if time.monotonic() > until:
                self._again()
                return
        else:
            self._again()
            return
        self._sleep()

    def _again(self) -> None:
        # more to do: let the writers run first, then come back
        assert self._loop is not None
        self._pending = self._loop.call_soon(self._run)

    def _sleep(self) -> None:
        assert self._loop is not None
        # prepare_wait() re-checks after announcing: False means a record
        # came in meanwhile, and no wake-up was asked for it
        while not self.ring.prepare_wait():
            if self._drain_once():
                self._pending = self._loop.call_soon(self._run)
                return
            if self.corrupt is not None:
                return  # nothing can be consumed any more; /healthz fails
            # else only discarded records were ready: consumed, look again
        self._sleeping = True
        stall = self.ring.stall_recheck()
        if stall > 0:
            self._timer = self._loop.call_later(min(stall, self.stall_recheck), self._wake)

    def _drain_once(self) -> int:
        try:
            lines, positions, ts, types = self.encoder.consume(self.ring, self.batch)
        except ringcore.RingCorruptedError as e:
            # nothing more can be read past a corrupt header; say so once,
            # loudly, and keep serving what was read (health reports it)
            if self.corrupt is None:
                log.error("ring corrupted", extra={"event": "ring_corrupt", "error": str(e)})
            self.corrupt = str(e)
            return 0
        if not lines:
            return 0
        self.records += len(lines)
        self.hub.publish(Batch.of(lines, positions, ts, types))
        return len(lines)
