"""Prometheus metrics, read live at scrape time.

The ring's counters live in shared memory, where every producer process
updates them; the collector reads them (Ring.query, Ring.slot_stats) when
Prometheus scrapes, so no multiprocess mode and no per-record bookkeeping in
Python. Service-side counters (subscribers, drops, restarts) are plain
attributes of the objects that own them, read the same way. Only the
delivery latency is a histogram kept here, observed by the writers.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Protocol

from prometheus_client import disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import ringcore
from service import __version__
from service.batch import Batch
from service.fanout import TRANSPORTS, Hub

# *_created series double what a scrape carries and nothing here reads them
disable_created_metrics()

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# per write, at most this many records' latencies are observed (evenly
# spaced), so a 4,096-record write costs 64 observations, not 4,096
LATENCY_SAMPLES = 64


class Workers(Protocol):
    restarts: dict[str, int]

    def alive(self) -> int: ...


class SlotAttribution:
    """Per-source reservation failures from the ring's per-slot counters.

    A slot's counters only grow, across owners; what grew since the last
    scrape is charged to the slot's owner (by pid: a worker's source, or
    "external" for processes attached by name). Between two scrapes a slot
    can change owner; its growth then goes to the newer one.
    """

    def __init__(self, source_of: Callable[[int], str]) -> None:
        self.source_of = source_of
        self.last: dict[int, tuple[int, int]] = {}  # slot -> (owner pid, failures)
        self.failures: Counter[str] = Counter()

    def update(self, stats: Iterable[tuple[int, int, int, int, int, int]]) -> Counter[str]:
        for slot, pid, _sub, _dis, fail, _wake in stats:
            owner, seen = self.last.get(slot, (pid, 0))
            owner = pid or owner
            if fail > seen:
                self.failures[self.source_of(owner)] += fail - seen
            self.last[slot] = (owner, fail)
        return self.failures


class Latency(Collector):
    """Submit-to-write latency of every record written to a subscriber.

    Every record counts once in the histogram, but its latency is estimated:
    a write of n records takes at most LATENCY_SAMPLES evenly spaced samples,
    each standing for its share of the n (per-record observation cost a
    fifth of a core at 1 M records/s). A backlog written at once after a
    stall therefore weighs what it holds, not one sample.
    """

    def __init__(self) -> None:
        self.bounds = LATENCY_BUCKETS
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, batches: list[Batch]) -> None:
        n = sum(len(b) for b in batches)
        if not n:
            return
        now = time.time_ns()
        ts = list(chain.from_iterable(b.ts_ns for b in batches))
        samples = ts[:: max(1, n // LATENCY_SAMPLES)]
        base, extra = divmod(n, len(samples))
        counts, bounds = self.counts, self.bounds
        total = 0.0
        for i, t in enumerate(samples):
            seconds = max(0, now - t) / 1e9
            weight = base + (i < extra)
            counts[bisect_left(bounds, seconds)] += weight
            total += seconds * weight
        self.sum += total
        self.count += n

    def collect(self) -> Iterator[Metric]:
        buckets = []
        cumulative = 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            cumulative += c
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", self.count))
        yield HistogramMetricFamily(
            "ringstream_delivery_latency_seconds",
            "Time from a record's submit (its producer's timestamp) to its write to a "
            f"subscriber, every record counted, estimated from up to {LATENCY_SAMPLES} "
            "samples per write.",
            buckets=buckets,
            sum_value=self.sum,
        )


class ServiceCollector(Collector):
    def __init__(
        self,
        ring: ringcore.Ring,
        hub: Hub,
        workers: Workers,
        encoder: ringcore.Encoder,
        source_of: Callable[[int], str],
        ready: Callable[[], bool],
    ) -> None:
        self.ring = ring
        self.hub = hub
        self.workers = workers
        self.encoder = encoder
        self._retired_stats: Counter[str] = Counter()
        self.slots = SlotAttribution(source_of)
        self.ready = ready

    def swap_encoder(self, encoder: ringcore.Encoder) -> None:
        """A reload's new encoder: the old one's counts stay in the totals, so
        the counters do not fall back to 0."""
        self._retired_stats.update(self.encoder.stats())
        self.encoder = encoder

    def collect(self) -> Iterator[Metric]:
        q = self.ring.query()
        yield _gauge("ringstream_ring_size_bytes", "Size of the ring's data area.", q.ring_size)
        yield _gauge(
            "ringstream_ring_available_bytes",
            "Bytes committed or reserved but not yet consumed (BPF_RB_AVAIL_DATA).",
            q.avail_data,
        )
        yield _counter(
            "ringstream_ring_consumer_position_bytes_total",
            "The ring's consumer position: bytes consumed since start (BPF_RB_CONS_POS).",
            q.consumer_pos,
        )
        yield _counter(
            "ringstream_ring_producer_position_bytes_total",
            "The ring's producer position: bytes reserved since start (BPF_RB_PROD_POS).",
            q.producer_pos,
        )
        records = CounterMetricFamily(
            "ringstream_records_total",
            "Records that left the producers' hands, by outcome (abandoned: stepped "
            "over after their producer died mid-record).",
            labels=["outcome"],
        )
        records.add_metric(["submitted"], q.submitted)
        records.add_metric(["discarded"], q.discarded)
        records.add_metric(["abandoned"], q.abandoned_records)
        yield records
        yield _counter(
            "ringstream_ring_abandoned_bytes_total",
            "Bytes of records stepped over because their producer died mid-record.",
            q.abandoned_bytes,
        )
        failures = CounterMetricFamily(
            "ringstream_reserve_failures_total",
            "Reservations refused because the ring was full, by producing source.",
            labels=["source"],
        )
        for source, n in sorted(self.slots.update(self.ring.slot_stats()).items()):
            failures.add_metric([source], n)
        yield failures
        yield _counter(
            "ringstream_wakeups_total",
            "Consumer wake-ups signalled by producers through the eventfd.",
            q.wakeups,
        )
        stats = self._retired_stats + Counter(self.encoder.stats())
        decoded = CounterMetricFamily(
            "ringstream_decoded_records_total",
            "Records consumed and encoded, by how (schema, or raw and why).",
            labels=["result"],
        )
        decoded.add_metric(["schema"], stats["decoded"])
        decoded.add_metric(["json"], stats["json"])
        decoded.add_metric(["text"], stats["text"])
        for reason in ("short", "unframed", "unknown_type", "invalid_json"):
            decoded.add_metric([f"raw_{reason}"], stats[reason])
        yield decoded
        subs = GaugeMetricFamily(
            "ringstream_subscribers", "Connected subscribers.", labels=["transport"]
        )
        for transport, n in sorted(self.hub.counts().items()):
            subs.add_metric([transport], n)
        yield subs
        dropped = CounterMetricFamily(
            "ringstream_subscriber_dropped_records_total",
            "Records dropped from slow subscribers' queues (policy drop-oldest).",
            labels=["transport"],
        )
        for transport in TRANSPORTS:
            dropped.add_metric([transport], self.hub.dropped[transport])
        yield dropped
        yield _counter(
            "ringstream_subscriber_budget_dropped_records_total",
            "Of the dropped records, those dropped to keep subscribers.memory_budget.",
            self.hub.budget_dropped,
        )
        yield _gauge(
            "ringstream_subscriber_queued_bytes",
            "All subscribers' queues together, each counted in full (what "
            "subscribers.memory_budget bounds), as of the last publish.",
            self.hub.queued_bytes,
        )
        disconnects = CounterMetricFamily(
            "ringstream_subscriber_disconnects_total",
            "Subscribers disconnected, by reason (client, slow, shutdown, error).",
            labels=["reason"],
        )
        for reason in sorted({"client", "slow", "shutdown", *self.hub.disconnects}):
            disconnects.add_metric([reason], self.hub.disconnects[reason])
        yield disconnects
        restarts = CounterMetricFamily(
            "ringstream_worker_restarts_total",
            "Worker processes restarted after they died, by source.",
            labels=["source"],
        )
        for source, n in sorted(self.workers.restarts.items()):
            restarts.add_metric([source], n)
        yield restarts
        yield _gauge("ringstream_workers", "Worker processes alive.", self.workers.alive())
        yield _gauge(
            "ringstream_ready", "1 when serving, 0 while starting or draining.", self.ready()
        )
        info = GaugeMetricFamily(
            "ringstream_build_info",
            "Build information; the value is always 1.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
