"""Many real producer processes into one ring, through >= 1,000 wraparounds."""

from __future__ import annotations

import pytest
import stress

PRODUCERS = 4
COUNT = 10_000  # ~120 B a record: 4 x 10,000 records wrap a 4 KiB ring ~1,150 times


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("sleep", [False, True], ids=["drain", "sleep-each-batch"])
def test_many_producers_one_consumer(start_method, sleep):
    q = stress.run(start_method, PRODUCERS, COUNT, sleep_between_batches=sleep)
    wraps = q.producer_pos // q.ring_size
    assert wraps >= 1000, f"only {wraps} wraparounds"
    assert q.consumer_pos == q.producer_pos
    assert q.submitted == PRODUCERS * COUNT
    assert q.discarded == 0
