"""The delivery-latency histogram counts every record written, sampled or not."""

from __future__ import annotations

import time

from service.batch import Batch
from service.metrics import LATENCY_SAMPLES, Latency


def batch(ts: list[int]) -> Batch:
    n = len(ts)
    return Batch.of([b"{}"] * n, list(range(0, 16 * n, 16)), ts, [10] * n)


def buckets(lat: Latency) -> dict[str, float]:
    (family,) = lat.collect()
    return {s.labels.get("le", s.name): s.value for s in family.samples}


def test_every_record_counts_and_old_records_land_high() -> None:
    lat = Latency()
    now = time.time_ns()
    old = [now - 2_000_000_000] * 900  # 2 s ago
    new = [now] * 100
    lat.observe([batch(old + new)])
    b = buckets(lat)
    assert b["+Inf"] == 1000 and lat.count == 1000
    assert b["1.0"] == 100  # only the fresh tenth is under a second
    assert b["2.5"] == 1000
    assert 1700 < b["ringstream_delivery_latency_seconds_sum"] < 1900


def test_a_small_write_is_observed_record_by_record() -> None:
    lat = Latency()
    now = time.time_ns()
    lat.observe([batch([now - 3_000_000]), batch([now - 30_000_000] * (LATENCY_SAMPLES - 1))])
    b = buckets(lat)
    assert b["0.005"] == 1 and b["0.05"] == LATENCY_SAMPLES
