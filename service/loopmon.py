"""How long the event loop goes without running a ready callback.

Everything the service does for every client happens on one loop, so its
longest stall is the latency floor of every stream, of /healthz and of the
next accept(). A timer asks to run every INTERVAL seconds; how late it runs
is the stall it saw. The histogram and the longest stall so far are
exported, and a stall over WARN_AFTER seconds is logged with its length,
since a liveness probe may already have failed over it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("ringstream.loop")

INTERVAL = 0.05
WARN_AFTER = 1.0
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopMonitor(Collector):
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0
        self.max = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        assert self._loop is not None
        self._due = time.monotonic() + INTERVAL
        self._timer = self._loop.call_at(self._loop.time() + INTERVAL, self._tick)

    def _tick(self) -> None:
        self.observe(max(0.0, time.monotonic() - self._due))
        self._arm()

    def observe(self, lag: float) -> None:
        self.counts[bisect_left(BUCKETS, lag)] += 1
        self.sum += lag
        self.count += 1
        if lag > self.max:
            self.max = lag
        if lag > WARN_AFTER:
            log.warning(
                "event loop stalled",
                extra={"event": "loop_stall", "seconds": round(lag, 3)},
            )

    def collect(self) -> Iterator[Metric]:
        buckets = []
        cumulative = 0
        for bound, c in zip(BUCKETS, self.counts, strict=False):
            cumulative += c
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", self.count))
        yield HistogramMetricFamily(
            "ringstream_event_loop_lag_seconds",
            f"How late a timer due every {INTERVAL} s ran: the event loop's stalls.",
            buckets=buckets,
            sum_value=self.sum,
        )
        yield GaugeMetricFamily(
            "ringstream_event_loop_lag_max_seconds",
            "The event loop's longest stall since start.",
            value=self.max,
        )
