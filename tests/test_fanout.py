"""The fan-out on its own: bounded queues, gap markers, history replay.

A randomized run checks what the end-to-end tests can only sample: whatever
the queue and history bounds, the resume point and the interleaving of
publishes and writes, every subscriber gets records in order, once, and each
record it does not get is inside a gap marker that says so (with the exact
count for records the policy dropped).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from service import streams
from service.batch import Batch
from service.fanout import Hub
from service.filters import FilterSchema
from service.metrics import Latency
from service.streams import pump


class Recorder:
    """A Writer that keeps what it was given: ("r", id) and ("g", marker)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.out: list[tuple[str, object]] = []
        self.writes = 0
        self.rng = rng

    async def records(self, batches: list[Batch]) -> None:
        self.writes += 1
        for b in batches:
            self.out += [("r", p) for p in b.positions]
        for _ in range(self.rng.randint(0, 3) if self.rng else 1):
            await asyncio.sleep(0)  # a client of varying speed

    async def gap(self, marker: dict[str, object]) -> None:
        self.out.append(("g", marker))
        await asyncio.sleep(0)

    async def heartbeat(self) -> None:
        pass

    def ids(self) -> list[object]:
        return [v for k, v in self.out if k == "r"]


def batch(ids: list[int], sizes: list[int] | None = None, types: list[int] | None = None) -> Batch:
    sizes = sizes or [10] * len(ids)
    return Batch.of([b"x" * s for s in sizes], ids, [0] * len(ids), types or [1] * len(ids))


def hub(**bounds: int) -> Hub:
    kw = {
        "queue_records": 1000,
        "queue_bytes": 10**6,
        "history_records": 1000,
        "history_bytes": 10**6,
        **bounds,
    }
    return Hub(policy="drop-oldest", **kw)


async def test_a_record_larger_than_the_queue_is_dropped_with_a_marker() -> None:
    h = hub(queue_records=100, queue_bytes=100)
    a = h.subscribe("ndjson", "p", None, None)
    b = h.subscribe("ndjson", "p", None, None)
    for i, size in enumerate([150, 60, 60]):
        h.publish(batch([8 * i], [size]))
    out = Recorder()
    h.close_all("shutdown")
    await pump(h, a, out, Latency(), heartbeat=5, replay_limit=10)
    # 0 (150 B) never fits; 8 and 16 (60 B each) do not fit together
    assert out.ids() == [16]
    assert out.out[0] == ("g", {"type": "gap", "reason": "slow_subscriber", "after_id": -1,
                                "next_id": 16, "dropped": 2})  # fmt: skip
    assert b.queue and all(len(x) for x in b.queue)  # no empty batch left behind


async def test_shutdown_during_a_replay_finishes_the_replay() -> None:
    h = hub()
    for i in range(10):
        h.publish(batch([8 * i]))
    sub = h.subscribe("ndjson", "p", None, 0)
    out = Recorder()
    task = asyncio.create_task(pump(h, sub, out, Latency(), heartbeat=5, replay_limit=2))
    await asyncio.sleep(0)
    h.publish(batch([80]))
    h.close_all("shutdown")
    await task
    assert out.ids() == list(range(8, 88, 8))


async def test_an_unknown_id_before_any_record_gets_a_marker() -> None:
    h = hub()
    sub = h.subscribe("ndjson", "p", None, 5000)  # from before a restart
    h.publish(batch([0, 8]))
    out = Recorder()
    h.close_all("shutdown")
    await pump(h, sub, out, Latency(), heartbeat=5, replay_limit=2)
    assert out.out[0][0] == "g" and out.out[0][1]["reason"] == "unknown_id"  # type: ignore[index]
    assert out.ids() == [0, 8]


@pytest.mark.parametrize("seed", range(300))
async def test_random_bounds_and_interleavings_lose_nothing_unannounced(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    h = hub(
        queue_records=rng.randint(1, 30),
        queue_bytes=rng.randint(50, 400),
        history_records=rng.randint(0, 40),
        history_bytes=rng.randint(50, 600),
        budget_bytes=rng.choice([0, rng.randint(20, 800)]),
    )
    # writes cut to a few records: takes that split batches
    monkeypatch.setattr(streams, "WRITE_BYTES", rng.randint(1, 120))
    published: list[int] = []

    def publish() -> None:
        n = rng.randint(1, 6)
        ids = [len(published) * 8 + 8 * i for i in range(n)]
        published.extend(ids)
        h.publish(batch(ids, [rng.randint(1, 20) for _ in ids]))

    for _ in range(rng.randint(0, 10)):
        publish()
    runs = []
    for _ in range(3):
        after = rng.choice([None, -1, *published[-30:]])
        sub = h.subscribe("ndjson", "p", None, after)
        out = Recorder(rng)
        limit = rng.randint(1, 5)
        task = asyncio.create_task(pump(h, sub, out, Latency(), heartbeat=5, replay_limit=limit))
        runs.append((after, h.history.last, out, task))
    for _ in range(rng.randint(0, 60)):
        publish()
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
    h.close_all("shutdown")
    for after, live_from, out, task in runs:
        await task
        got = out.ids()
        assert got == sorted(set(got)), "out of order or repeated"
        start = live_from if after is None else after
        expected = [p for p in published if p > start]
        covered: set[int] = set()
        for i, (kind, m) in enumerate(out.out):
            if kind != "g":
                continue
            assert isinstance(m, dict)
            following = [v for k, v in out.out[i + 1 :] if k == "r"]
            hi = m.get("next_id", following[0] if following else 1 << 60)
            lost = {p for p in published if m["after_id"] < p < hi}
            if m["reason"] == "slow_subscriber":
                assert m["dropped"] == len(lost)
            covered |= lost
        assert [p for p in expected if p not in got and p not in covered] == []


async def test_the_memory_budget_cuts_the_furthest_behind_first() -> None:
    h = hub(queue_records=10**6, queue_bytes=10**9, budget_bytes=4000)
    fast = h.subscribe("ws", "p", None, None)
    slow = [h.subscribe("ws", "p", None, None) for _ in range(3)]
    for i in range(100):
        h.publish(batch([8 * i], [100]))
        fast.take()  # keeps up
    # all of it queued would be 3 x 10,000 bytes: cut to 3/4 of the budget
    # whenever it is over, the laggards cut to their newest record in turn
    assert fast.dropped == 0
    assert h.queued_bytes <= 4000
    assert all(s.dropped > 0 for s in slow)
    assert h.budget_dropped == sum(s.dropped for s in slow) == h.dropped["ws"]
    gap, _ = slow[0].take()
    assert gap is not None and gap.dropped == slow[0].dropped


async def test_a_client_that_reads_nothing_is_cut_before_one_that_paused() -> None:
    # the soak's case: stalled clients' queues are cut again and again, so
    # right after a cut they are small; a client that keeps up but paused
    # holds more than they do then, and must not be the one cut
    # each queue bound at 3,000 bytes: a stalled one sits there (drop-oldest)
    h = hub(queue_records=10**6, queue_bytes=3000, budget_bytes=10_000)
    stalled = [h.subscribe("ws", "p", None, None) for _ in range(4)]
    paused = h.subscribe("ws", "p", None, None)
    for i in range(1000):
        h.publish(batch([8 * i], [100]))
        if i % 50 < 30:  # reads, then pauses for 20 publishes (2,000 bytes)
            paused.take()
        assert h.queued_bytes <= 10_000
    assert paused.dropped == 0
    assert all(s.dropped > 0 for s in stalled)
    assert h.budget_dropped > 0


async def test_the_memory_budget_with_policy_disconnect_drops_the_biggest() -> None:
    h = Hub(
        queue_records=10**6,
        queue_bytes=10**9,
        history_records=10,
        history_bytes=10**6,
        policy="disconnect",
        budget_bytes=1000,
    )
    subs = [h.subscribe("ws", "p", None, None) for _ in range(3)]
    for i in range(8):
        h.publish(batch([8 * i], [100]))
        subs[0].take()
        if i % 2:
            subs[1].take()
    # subs[2] took nothing: the biggest, disconnected; subs[1] lags less
    assert [s.closed for s in subs] == [None, None, "slow"]


async def test_a_take_is_cut_at_max_bytes_but_takes_one_record_at_least() -> None:
    h = hub()
    sub = h.subscribe("ws", "p", None, None)
    h.publish(batch([0, 8, 16, 24], [30, 30, 30, 30]))
    h.publish(batch([32], [500]))
    _, got = sub.take(70)
    assert [p for b in got for p in b.positions] == [0, 8, 16]
    assert sub.records == 2 and sub.bytes == 530 and sub.wake.is_set()
    _, got = sub.take(10)
    assert [p for b in got for p in b.positions] == [24]
    _, got = sub.take(10)
    assert [p for b in got for p in b.positions] == [32]
    assert sub.records == sub.bytes == 0 and not sub.wake.is_set()


async def test_a_filtered_replay_marker_says_where_the_stream_goes_on() -> None:
    h = hub(history_records=6)
    # ids 0..72 by 8, type 1 except 56 and 72; the history keeps 32..72
    for i in range(10):
        h.publish(batch([8 * i], types=[2 if i in (7, 9) else 1]))
    only2 = FilterSchema({"one": 1, "two": 2}, []).parse([("type", "two")])
    sub = h.subscribe("ndjson", "p", only2, 0)  # 0 left the history long ago
    out = Recorder()
    h.close_all("shutdown")
    # pieces of one record: the marker's own piece (32) passes nothing
    await pump(h, sub, out, Latency(), heartbeat=5, replay_limit=1)
    assert out.out[0] == ("g", {"type": "gap", "reason": "history", "after_id": 0, "next_id": 56})
    assert out.ids() == [56, 72]


async def test_a_filtered_stream_past_the_history_gets_next_id_from_the_live_queue() -> None:
    h = hub(history_records=2)
    for i in range(4):
        h.publish(batch([8 * i]))
    only2 = FilterSchema({"one": 1, "two": 2}, []).parse([("type", "two")])
    sub = h.subscribe("ndjson", "p", only2, 0)
    out = Recorder()
    task = asyncio.create_task(pump(h, sub, out, Latency(), heartbeat=5, replay_limit=10))
    for _ in range(3):
        await asyncio.sleep(0)
    assert out.out == []  # the marker waits for a record that passes
    h.publish(batch([32, 40], types=[1, 2]))
    for _ in range(3):
        await asyncio.sleep(0)
    h.close_all("shutdown")
    await task
    assert out.out == [
        ("g", {"type": "gap", "reason": "history", "after_id": 0, "next_id": 40}),
        ("r", 40),
    ]


async def test_the_budget_keeps_the_newest_record_of_a_publish_above_its_level() -> None:
    # one publish bigger than the whole budget, to 50 subscribers: all cut,
    # and each keeps the newest record, one shared copy for all
    h = hub(queue_records=10**6, queue_bytes=10**9, budget_bytes=10_000)
    subs = [h.subscribe("ws", "p", None, None) for _ in range(50)]
    h.publish(batch(list(range(0, 8000, 8)), [100] * 1000))
    assert all(len(s.queue) == 1 and s.queue[0].positions == (7992,) for s in subs)
    assert len({id(s.queue[0]) for s in subs}) == 1
    gap, batches = subs[0].take()
    assert gap is not None and gap.dropped == 999
    assert gap.marker(batches[0].first)["next_id"] == 7992


async def test_a_replay_piece_spans_many_small_batches() -> None:
    # at a high rate the consumer's passes are tens of records: a replay one
    # batch per write fell behind the live stream, then off the history
    h = hub()
    for i in range(300):
        h.publish(batch([8 * i]))
    sub = h.subscribe("ndjson", "p", None, 0)
    out = Recorder()
    h.close_all("shutdown")
    await pump(h, sub, out, Latency(), heartbeat=5, replay_limit=100)
    assert out.ids() == list(range(8, 2400, 8))
    assert out.writes == 3  # 299 records, 100 a piece


def test_a_scope_alone_that_passes_nothing_queues_nothing() -> None:
    """A token's scope with no filter of the subscriber's own: a batch with
    nothing in scope leaves the queue as it was (issue 15: it used to queue
    an empty batch, and the next take() failed)."""
    from service.auth.scope import Scope

    h = hub()
    schema = FilterSchema({"a": 1, "b": 2}, ())
    scope = Scope(types=frozenset({"a"})).filter(schema)
    sub = h.subscribe("ndjson", "test", None, None, scope=scope)
    h.publish(batch([0, 1], types=[2, 2]))
    assert not sub.queue and sub.behind is None and sub.closed is None
    h.publish(batch([2, 3], types=[2, 1]))
    _, got = sub.take()
    assert [p for b in got for p in b.positions] == [3]
