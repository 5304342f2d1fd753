"""Property test: ringcore against the reference model, byte for byte.

Random sequences of reserve/write/submit/discard/output/output_many/consume
with random sizes run through wraparound and a full ring; after every step
the data area (snapshot), positions and counters must equal the model's.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from ringmodel import RingModel

import ringcore

RING = 4096
# small and mid-size records to wrap often; a few that can never fit
sizes = st.one_of(st.integers(0, 64), st.integers(65, 1500), st.integers(RING - 24, RING + 64))


class RingMachine(RuleBasedStateMachine):
    overwrite = False

    def __init__(self) -> None:
        super().__init__()
        self.ring = ringcore.Ring(RING, overwrite=self.overwrite)
        # a fresh ring: this process takes producer slot 1, generation 1,
        # on first use; pg_off holds slot | generation << 8
        self.model = RingModel(RING, pg_off=1 | 1 << 8, overwrite=self.overwrite)
        self.open: list[tuple[ringcore.Reservation, object]] = []

    def teardown(self) -> None:
        self.ring.close()

    @rule(size=sizes)
    def reserve(self, size):
        if not self.model.fits_ever(size):
            with pytest.raises(ValueError, match="can never fit"):
                self.ring.reserve(size)
            return
        res = self.ring.reserve(size)
        rec = self.model.reserve(size)
        assert (res is None) == (rec is None)
        if res is None:
            return
        assert res.position == rec.pos
        assert len(res) == size
        self.open.append((res, rec))

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def write(self, data):
        res, rec = data.draw(st.sampled_from(self.open))
        if rec.size == 0:
            return
        offset = data.draw(st.integers(0, rec.size - 1))
        payload = data.draw(st.binary(min_size=1, max_size=rec.size - offset))
        with memoryview(res) as mv:
            mv[offset : offset + len(payload)] = payload
        self.model.fill(rec, payload, offset)

    def _commit(self, index, discard):
        res, rec = self.open.pop(index)
        if discard:
            res.discard()
        else:
            res.submit()
        self.model.commit(rec, discard)
        with pytest.raises(ringcore.ReservationError, match="already"):
            res.submit()

    @precondition(lambda self: self.open)
    @rule(data=st.data(), discard=st.booleans())
    def commit_any(self, data, discard):
        """Out of order: a later record committed before earlier ones."""
        self._commit(data.draw(st.integers(0, len(self.open) - 1)), discard)

    @precondition(lambda self: self.open)
    @rule(discard=st.booleans())
    def commit_oldest(self, discard):
        self._commit(0, discard)

    @rule(payload=st.binary(max_size=300))
    def output(self, payload):
        assert self.ring.output(payload) == self.model.output(payload)

    @rule(payloads=st.lists(st.binary(max_size=200), max_size=12))
    def output_many(self, payloads):
        n = self.ring.output_many(payloads)
        expected = 0
        for p in payloads:
            if not self.model.output(p):
                # the model tried one; the rest of the batch count as failures too
                self.model.failures += len(payloads) - expected - 1
                break
            expected += 1
        assert n == expected

    @rule(max_records=st.one_of(st.none(), st.integers(1, 5)))
    def consume(self, max_records):
        assert self.ring.consume_with_pos(max_records) == self.model.consume(max_records)

    # drawn as often as the producing rules together, so the ring both fills
    # up and drains, and positions run through many wraparounds
    @rule(max_records=st.one_of(st.none(), st.integers(1, 5)))
    def consume_more(self, max_records):
        self.consume(max_records)

    @rule()
    def drain(self):
        self.consume(None)

    @invariant()
    def same_state(self):
        cons, prod, data = self.ring.snapshot()
        assert (cons, prod) == (self.model.cons, self.model.prod)
        assert data == bytes(self.model.data)
        q = self.ring.query()
        m = self.model
        assert q.avail_data == prod - max(cons, m.over if m.overwrite else 0)
        assert q.ring_size == RING
        assert q.overwrite_pos == m.over
        assert q.overwritten_bytes == m.lost + max(0, m.over - m.cons)
        assert (q.submitted, q.discarded, q.reserve_failures) == (
            self.model.submitted,
            self.model.discarded,
            self.model.failures,
        )


RingMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingAgainstModel = RingMachine.TestCase


class OverwriteRingMachine(RingMachine):
    overwrite = True


OverwriteRingMachine.TestCase.settings = RingMachine.TestCase.settings
TestOverwriteRingAgainstModel = OverwriteRingMachine.TestCase
