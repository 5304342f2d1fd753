"""Focused tests of the public ringcore API, with real processes and real shared memory.

Producers in other processes are multiprocessing children that are joined
before the parent looks at the ring, so nothing here depends on timing.
Child targets live at module level: "spawn" and "forkserver" pickle them by
name (this module imports as ``test_api``; see conftest.py).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import pickle
import select
import struct

import pytest

import ringcore
from ringcore import FORCE_WAKEUP, NO_WAKEUP, PAGE_SIZE, Ring

SIZE = PAGE_SIZE  # smallest valid ring
HDR = struct.Struct("=II")  # record header: u32 len (BUSY/DISCARD bits), u32 pg_off


def rec_len(payload: int) -> int:
    """Bytes a record of `payload` bytes takes in the ring (header, 8-aligned)."""
    return (payload + ringcore.HEADER_SIZE + 7) & ~7


@pytest.fixture
def ring():
    r = Ring(SIZE)
    yield r
    with contextlib.suppress(BufferError):
        r.close()


# --- helpers run in child processes --------------------------------------------


def run_child(target, *args, method: str = "fork") -> None:
    """Run target(*args) in a child process and wait for it to end cleanly."""
    proc = mp.get_context(method).Process(target=target, args=args)
    proc.start()
    proc.join()
    assert proc.exitcode == 0, f"child {target.__name__} exited with {proc.exitcode}"


def _child_output(ring: Ring, records: list[bytes], flags: int = 0) -> None:
    for rec in records:
        assert ring.output(rec, flags)


def _child_report_role(ring: Ring) -> None:
    """Report what the child sees through the ring itself, then produce."""
    try:
        ring.consume()
    except ringcore.NotConsumerError:
        consume = "NotConsumerError"
    else:
        consume = "no error"
    ring.output(f"is_consumer={ring.is_consumer} consume={consume}".encode())
    assert ring.output_many([b"child-1", b"child-2"]) == 2


def _child_submit_parent_reservation(ring: Ring, res: ringcore.Reservation) -> None:
    try:
        res.submit()
    except ringcore.ReservationError as e:
        report = f"ReservationError: {e}"
    else:
        report = "submitted"
    ring.output(report.encode())


def _child_submit_and_discard(ring: Ring, submit: int, discard: int) -> None:
    for i in range(submit):
        assert ring.output(b"s%d" % i)
    for _ in range(discard):
        ring.reserve(4).discard()


def readable(fd: int) -> bool:
    """Is the eventfd signalled? Looks without waiting (timeout 0)."""
    return bool(select.select([fd], [], [], 0)[0])


# --- 1. Ring(size) ----------------------------------------------------------------


def test_size_not_power_of_two_names_nearest_valid_sizes():
    """A size between two valid sizes names both neighbours."""
    bad = PAGE_SIZE + 904  # 5000 with 4 KiB pages
    with pytest.raises(ValueError, match="power of 2") as ei:
        Ring(bad)
    msg = str(ei.value)
    assert str(PAGE_SIZE) in msg
    assert str(2 * PAGE_SIZE) in msg


def test_size_multiple_of_page_but_not_power_of_two():
    """3 pages is a page multiple but not a power of 2: neighbours are 2 and 4 pages."""
    with pytest.raises(ValueError) as ei:
        Ring(3 * PAGE_SIZE)
    assert f"{2 * PAGE_SIZE} and {4 * PAGE_SIZE}" in str(ei.value)


@pytest.mark.parametrize("size", [0, 100, PAGE_SIZE // 2])
def test_size_too_small_names_page_size(size):
    """Sizes below one page are too small and the page size is suggested."""
    with pytest.raises(ValueError, match="too small") as ei:
        Ring(size)
    assert f"nearest valid size: {PAGE_SIZE}" in str(ei.value)


@pytest.mark.parametrize("size", [ringcore.MAX_SIZE + 1, 2 * ringcore.MAX_SIZE])
def test_size_too_large(size):
    """Sizes above MAX_SIZE are rejected as too large."""
    with pytest.raises(ValueError, match="too large"):
        Ring(size)


@pytest.mark.parametrize("size", [PAGE_SIZE, 2 * PAGE_SIZE, 16 * PAGE_SIZE])
def test_valid_sizes_and_properties(size):
    """Valid sizes create a consumer handle with the documented properties."""
    r = Ring(size)
    try:
        assert r.size == size
        assert r.max_record_size == size - 16
        assert r.is_consumer is True
        assert r.closed is False
        assert r.query().ring_size == size
    finally:
        r.close()
    assert r.closed is True


def test_size_keyword():
    """Ring(size=...) is accepted as a keyword."""
    r = Ring(size=SIZE)
    assert r.size == SIZE
    r.close()


# --- 2. record sizes and full rings --------------------------------------------------


def test_record_that_can_never_fit_raises(ring):
    """output/reserve of more than max_record_size raises ValueError ('never fit')."""
    too_big = ring.max_record_size + 1
    with pytest.raises(ValueError, match="never fit"):
        ring.output(b"x" * too_big)
    with pytest.raises(ValueError, match="never fit"):
        ring.reserve(too_big)
    with pytest.raises(ValueError, match="never fit"):
        ring.reserve(-1)
    q = ring.query()
    assert q.producer_pos == 0
    assert q.reserve_failures == 0  # a size error is not a reserve failure


def test_largest_record_fits_empty_ring(ring):
    """A max_record_size payload fits into an empty ring and round-trips."""
    data = bytes(range(256)) * (ring.max_record_size // 256) + b"z" * (ring.max_record_size % 256)
    assert len(data) == ring.max_record_size
    assert ring.output(data) is True
    assert ring.consume() == [data]
    res = ring.reserve(ring.max_record_size)
    assert res is not None
    res.discard()


def test_full_ring_failures_are_counted(ring):
    """output False, reserve None and output_many's unwritten records all count."""
    assert ring.output(b"\0" * ring.max_record_size)
    q0 = ring.query()
    assert ring.output(b"") is False
    assert ring.output(b"x") is False
    assert ring.reserve(0) is None
    assert ring.output_many([b"a", b"b", b"c"]) == 0
    q = ring.query()
    assert q.reserve_failures == 2 + 1 + 3
    assert q.producer_pos == q0.producer_pos
    assert len(ring.consume()) == 1
    assert ring.output(b"room again")


def test_output_many_writes_prefix_and_counts_the_rest(ring):
    """output_many returns how many fit (a prefix) and counts the rest as failures."""
    rec = b"r" * 1000
    fit = (SIZE - 1) // rec_len(len(rec))
    n = fit + 6
    assert ring.output_many([rec] * n) == fit
    assert ring.query().reserve_failures == n - fit
    assert ring.consume() == [rec] * fit


def test_output_many_prefix_across_batches(ring):
    """With more records than one internal batch (256), failures still total n - written."""
    fit = (SIZE - 1) // rec_len(0)
    n = fit + 89
    assert n > 512
    assert ring.output_many([b""] * n) == fit
    assert ring.query().reserve_failures == n - fit
    assert ring.consume() == [b""] * fit


# --- 3. output_many ------------------------------------------------------------------


def test_output_many_accepts_bytes_like(ring):
    """bytes, bytearray and memoryviews (sliced too) go in, in order."""
    backing = b"0123456789"
    recs = [b"bytes", bytearray(b"bytearray"), memoryview(b"memview"), memoryview(backing)[2:5]]
    assert ring.output_many(recs) == 4
    assert ring.consume() == [b"bytes", b"bytearray", b"memview", b"234"]
    assert ring.query().submitted == 4


def test_output_many_non_bytes_item_writes_nothing(ring):
    """A non-bytes item raises TypeError naming its index; nothing is written."""
    ring.output(b"before")
    pos = ring.query().producer_pos
    with pytest.raises(TypeError, match="record 2"):
        ring.output_many([b"a", b"b", "not bytes", b"d"])
    assert ring.query().producer_pos == pos
    assert ring.consume() == [b"before"]


def test_output_many_oversized_item_writes_nothing(ring):
    """An oversized item raises ValueError naming its index; nothing is written."""
    pos = ring.query().producer_pos
    with pytest.raises(ValueError, match="record 1"):
        ring.output_many([b"a", b"x" * (ring.max_record_size + 1), b"c"])
    q = ring.query()
    assert q.producer_pos == pos
    assert q.reserve_failures == 0
    assert ring.consume() == []


# --- 4. Reservation --------------------------------------------------------------------


def test_reservation_positions_and_len(ring):
    """Positions increase by each record's length; len() is the payload size."""
    a = ring.reserve(3)
    b = ring.reserve(20)
    c = ring.reserve(0)
    assert (len(a), len(b), len(c)) == (3, 20, 0)
    assert a.position == 0
    assert b.position == a.position + rec_len(3)
    assert c.position == b.position + rec_len(20)
    for r in (a, b, c):
        r.submit()
    assert ring.query().producer_pos == c.position + rec_len(0)


def test_reservation_write_through_memoryview(ring):
    """Bytes written through memoryview(r) are what the consumer gets."""
    r = ring.reserve(5)
    assert r.active
    with memoryview(r) as m:
        assert len(m) == 5
        assert not m.readonly
        m[:] = b"hello"
    r.submit()
    assert not r.active
    assert ring.consume() == [b"hello"]


def test_submit_twice_and_discard_after_submit_raise(ring):
    """A reservation is committed once: a second submit/discard raises."""
    r = ring.reserve(1)
    r.submit()
    with pytest.raises(ringcore.ReservationError, match="already submitted"):
        r.submit()
    with pytest.raises(ringcore.ReservationError, match="already submitted"):
        r.discard()
    q = ring.query()
    assert (q.submitted, q.discarded) == (1, 0)


def test_submit_after_discard_raises(ring):
    """Discarded is final too."""
    r = ring.reserve(1)
    r.discard()
    with pytest.raises(ringcore.ReservationError, match="already discarded"):
        r.submit()


def test_submit_with_live_memoryview_raises_buffererror(ring):
    """submit/discard refuse while a view of the reservation is alive."""
    r = ring.reserve(4)
    m = memoryview(r)
    with pytest.raises(BufferError):
        r.submit()
    with pytest.raises(BufferError):
        r.discard()
    assert r.active
    m[:] = b"late"
    m.release()
    r.submit()
    assert ring.consume() == [b"late"]


def test_memoryview_after_submit_raises(ring):
    """No writable view of a committed record can be made."""
    r = ring.reserve(4)
    r.submit()
    with pytest.raises(ringcore.ReservationError):
        memoryview(r)


def test_reservation_context_manager_submits(ring):
    """Leaving the with block normally submits."""
    with ring.reserve(3) as r, memoryview(r) as m:
        m[:] = b"abc"
    assert not r.active
    assert ring.consume() == [b"abc"]
    assert ring.query().submitted == 1


def test_reservation_context_manager_discards_on_error(ring):
    """Leaving the with block by an exception discards: the consumer gets nothing."""
    with pytest.raises(RuntimeError), ring.reserve(3) as r:
        with memoryview(r) as m:
            m[:] = b"abc"
        raise RuntimeError("abort")
    assert not r.active
    assert ring.consume() == []
    q = ring.query()
    assert (q.submitted, q.discarded) == (0, 1)
    assert q.consumer_pos == q.producer_pos  # the discarded record was stepped over


def test_dropped_reservation_is_discarded(ring):
    """An unsubmitted reservation that is garbage collected does not stall the consumer."""
    r = ring.reserve(8)
    del r
    gc.collect()
    assert ring.output(b"later")
    assert ring.consume() == [b"later"]
    assert ring.query().discarded == 1


# --- 5. reservation order ----------------------------------------------------------


def test_records_visible_in_reservation_order(ring):
    """A record submitted early waits for every record reserved before it."""
    a = ring.reserve(1)
    b = ring.reserve(1)
    with memoryview(a) as m:
        m[:] = b"a"
    with memoryview(b) as m:
        m[:] = b"b"
    b.submit()
    assert ring.ready() is False
    assert ring.consume() == []
    a.submit()
    assert ring.ready() is True
    assert ring.consume() == [b"a", b"b"]


def test_discarded_records_are_skipped(ring):
    """Discarded records between submitted ones are not delivered."""
    rs = [ring.reserve(1) for _ in range(4)]
    for i, r in enumerate(rs):
        with memoryview(r) as m:
            m[:] = b"%d" % i
    rs[1].discard()
    rs[3].submit()
    rs[2].discard()
    assert ring.consume() == []
    rs[0].submit()
    assert ring.consume() == [b"0", b"3"]
    q = ring.query()
    assert (q.submitted, q.discarded, q.avail_data) == (2, 2, 0)


# --- 6. consuming ----------------------------------------------------------------------


def test_consume_max_records(ring):
    """max_records limits each call; the rest stays for the next."""
    assert ring.output_many([b"%d" % i for i in range(5)]) == 5
    assert ring.consume(max_records=2) == [b"0", b"1"]
    assert ring.consume(1) == [b"2"]
    assert ring.consume() == [b"3", b"4"]
    assert ring.consume() == []


@pytest.mark.parametrize("bad", [0, -1])
@pytest.mark.parametrize("method", ["consume", "consume_with_pos", "poll"])
def test_max_records_must_be_positive(ring, method, bad):
    """max_records 0 or negative raises ValueError and consumes nothing."""
    ring.output(b"x")
    with pytest.raises(ValueError, match="max_records"):
        getattr(ring, method)(max_records=bad)
    assert ring.consume() == [b"x"]


@pytest.mark.parametrize("bad", [0, -3])
def test_consume_each_max_records_must_be_positive(ring, bad):
    """consume_each validates max_records the same way."""
    ring.output(b"x")
    with pytest.raises(ValueError, match="max_records"):
        ring.consume_each(lambda mv: None, max_records=bad)
    assert ring.consume() == [b"x"]


def test_consume_with_pos_matches_reservation_positions(ring):
    """Each record comes with the position it was reserved at."""
    rs = [ring.reserve(n) for n in (1, 9, 17)]
    for r in rs:
        with memoryview(r) as m:
            m[:] = bytes([len(r)]) * len(r)
    skipped = ring.reserve(2)
    skipped.discard()
    for r in rs:
        r.submit()
    got = ring.consume_with_pos()
    assert got == [(r.position, bytes([len(r)]) * len(r)) for r in rs]


def test_consume_each_read_only_view_released_after_callback(ring):
    """The callback's view is read-only and released once the callback returns."""
    ring.output_many([b"one", b"two"])
    kept: list[memoryview] = []
    seen: list[bytes] = []

    def cb(mv: memoryview) -> None:
        assert mv.readonly
        with pytest.raises(TypeError):
            mv[0] = 0
        seen.append(bytes(mv))
        kept.append(mv)

    assert ring.consume_each(cb) == 2
    assert seen == [b"one", b"two"]
    for mv in kept:
        with pytest.raises(ValueError):
            bytes(mv)
        with pytest.raises(ValueError):
            len(mv)


def test_consume_each_exception_record_consumed(ring):
    """A callback exception stops the drain; that record is consumed, the rest stay."""
    ring.output_many([b"a", b"boom", b"c"])
    seen: list[bytes] = []

    def cb(mv: memoryview) -> None:
        seen.append(bytes(mv))
        if mv == b"boom":
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        ring.consume_each(cb)
    assert seen == [b"a", b"boom"]
    assert ring.consume() == [b"c"]  # b"boom" is not redelivered


def test_consume_each_exception_from_builtin_callback_propagates(ring):
    """An error from a callback that keeps no reference to the view propagates as is."""
    ring.output_many([b"not a number", b"7"])
    with pytest.raises(ValueError, match="invalid literal"):
        ring.consume_each(int)
    assert ring.consume() == [b"7"]


def test_consume_each_exception_propagates_unchanged(ring):
    """The exception a Python callback raises reaches the caller unchanged."""
    ring.output(b"x")

    def cb(mv: memoryview) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        ring.consume_each(cb)


def test_consume_each_callback_must_be_callable(ring):
    """A non-callable callback raises TypeError and consumes nothing."""
    ring.output(b"x")
    with pytest.raises(TypeError):
        ring.consume_each(42)
    assert ring.consume() == [b"x"]


@pytest.mark.parametrize(
    "keep",
    [lambda mv: mv[:], lambda mv: mv.cast("B"), memoryview],
    ids=["slice", "cast", "memoryview"],
)
def test_consume_each_derived_view_kept_past_callback_is_an_error(ring, keep):
    """A view derived from the callback's view and kept past the call is reported,
    and the ring refuses to unmap memory under it (no use after unmap)."""
    ring.output_many([b"hello", b"world"])
    kept: list[memoryview] = []
    with pytest.raises(BufferError, match="kept a view of a record"):
        ring.consume_each(lambda mv: kept.append(keep(mv)))
    assert bytes(kept[0]) == b"hello"
    with pytest.raises(BufferError, match="still alive"):
        ring.close()
    kept.clear()
    assert ring.consume() == [b"world"]
    ring.close()


def test_consume_from_inside_callback_is_refused(ring):
    """A drain inside a consume_each() callback would rewind consumer_pos: refused."""
    ring.output_many([b"0", b"1"])
    errors: list[Exception] = []

    def cb(mv: memoryview) -> None:
        for call in (ring.consume, ring.consume_with_pos, ring.poll, ring.prepare_wait):
            try:
                call()
            except ringcore.RingError as e:
                errors.append(e)

    assert ring.consume_each(cb) == 2
    assert len(errors) == 8
    assert all("inside a consume_each() callback" in str(e) for e in errors)
    assert ring.query().consumer_pos == ring.query().producer_pos


# --- 7. snapshot ---------------------------------------------------------------------


def test_snapshot_header_busy_then_committed(ring):
    """snapshot() shows the 8-byte header at offset 0: BUSY while reserved, then clear."""
    cons, prod, data = ring.snapshot()
    assert (cons, prod, len(data)) == (0, 0, SIZE)

    r = ring.reserve(5)
    with memoryview(r) as m:
        m[:] = b"hello"
    cons, prod, data = ring.snapshot()
    assert (cons, prod, len(data)) == (0, rec_len(5), SIZE)
    length, pg_off = HDR.unpack_from(data, 0)
    assert length == 5 | ringcore.BUSY_BIT
    assert length & ringcore.BUSY_BIT == 1 << 31

    r.submit()
    _, _, data = ring.snapshot()
    length2, pg_off2 = HDR.unpack_from(data, 0)
    assert length2 == 5
    assert pg_off2 == pg_off
    assert data[ringcore.HEADER_SIZE : ringcore.HEADER_SIZE + 5] == b"hello"

    assert ring.consume() == [b"hello"]
    cons, prod, _ = ring.snapshot()
    assert cons == prod == rec_len(5)


def test_snapshot_header_discarded(ring):
    """A discarded record's header has DISCARD set and BUSY clear."""
    ring.reserve(7).discard()
    _, prod, data = ring.snapshot()
    assert prod == rec_len(7)
    length, _ = HDR.unpack_from(data, 0)
    assert length == 7 | ringcore.DISCARD_BIT
    assert ringcore.DISCARD_BIT == 1 << 30


# --- 8. wakeups -------------------------------------------------------------------------


def test_wakeup_signals_sleeping_consumer_once(ring):
    """After prepare_wait(), a child's output signals the eventfd: exactly one wakeup per sleep."""
    fd = ring.fileno()
    assert ring.prepare_wait() is True
    assert not readable(fd)
    run_child(_child_output, ring, [b"first"])
    assert readable(fd)
    assert ring.query().wakeups == 1
    run_child(_child_output, ring, [b"second"])  # the sleep was already answered
    assert ring.query().wakeups == 1
    ring.finish_wait()
    assert ring.consume() == [b"first", b"second"]


def test_no_wakeup_flag_does_not_signal(ring):
    """output(flags=NO_WAKEUP) never signals, even a consumer about to sleep."""
    fd = ring.fileno()
    assert ring.prepare_wait() is True
    run_child(_child_output, ring, [b"quiet"], NO_WAKEUP)
    assert not readable(fd)
    assert ring.query().wakeups == 0
    assert ring.ready()
    ring.finish_wait()
    assert ring.consume() == [b"quiet"]


def test_force_wakeup_signals_without_prepare_wait(ring):
    """FORCE_WAKEUP signals even when the consumer never announced a sleep."""
    fd = ring.fileno()
    run_child(_child_output, ring, [b"loud"], FORCE_WAKEUP)
    assert readable(fd)
    assert ring.query().wakeups == 1
    assert ring.consume() == [b"loud"]


def test_default_output_does_not_signal_running_consumer(ring):
    """Without prepare_wait the consumer is not asleep: a default output sends nothing."""
    fd = ring.fileno()
    run_child(_child_output, ring, [b"a", b"b"])
    assert not readable(fd)
    assert ring.query().wakeups == 0
    assert ring.consume() == [b"a", b"b"]


def test_prepare_wait_false_when_record_ready(ring):
    """prepare_wait() says 'do not sleep' when a record is ready, and the record stays."""
    ring.output(b"ready")
    assert ring.prepare_wait() is False
    assert ring.consume() == [b"ready"]
    assert ring.prepare_wait() is True
    ring.finish_wait()


def test_prepare_wait_false_for_ready_discarded_record(ring):
    """A committed discarded record is also 'ready' (the consumer must step over it)."""
    ring.reserve(1).discard()
    assert ring.prepare_wait() is False
    assert ring.consume() == []
    assert ring.prepare_wait() is True
    ring.finish_wait()


def test_invalid_flags_raise(ring):
    """Flags other than NO_WAKEUP|FORCE_WAKEUP raise ValueError and write nothing."""
    with pytest.raises(ValueError, match="invalid flags"):
        ring.output(b"x", flags=4)
    with pytest.raises(ValueError, match="invalid flags"):
        ring.output_many([b"x"], flags=4)
    assert ring.query().producer_pos == 0
    r = ring.reserve(1)
    with pytest.raises(ValueError, match="invalid flags"):
        r.submit(flags=4)
    with pytest.raises(ValueError, match="invalid flags"):
        r.discard(4)
    assert r.active
    r.submit(NO_WAKEUP | FORCE_WAKEUP)
    assert ring.query().submitted == 1


# --- 9. poll -----------------------------------------------------------------------------


def test_poll_timeout_on_empty_ring(ring):
    """poll with a timeout on an empty ring returns an empty list."""
    assert ring.poll(timeout=0.05) == []
    assert ring.poll(timeout=0) == []


def test_busy_poll_timeout_on_empty_ring(ring):
    """busy_poll with a timeout on an empty ring returns an empty list."""
    assert ring.poll(busy_poll=True, timeout=0.05) == []


def test_poll_returns_records_from_child(ring):
    """poll returns what a child produced, honouring max_records."""
    run_child(_child_output, ring, [b"p1", b"p2", b"p3"])
    assert ring.poll(timeout=5, max_records=2) == [b"p1", b"p2"]
    assert ring.poll(timeout=5) == [b"p3"]


def test_poll_negative_timeout_raises(ring):
    """A negative timeout is rejected."""
    with pytest.raises(ValueError, match="timeout"):
        ring.poll(timeout=-1)


# --- 10. multiprocessing -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_ring_arrives_in_child_as_producer(ring, method):
    """A Ring handed to a child is a producer there; the parent consumes its records."""
    run_child(_child_report_role, ring, method=method)
    assert ring.consume() == [
        b"is_consumer=False consume=NotConsumerError",
        b"child-1",
        b"child-2",
    ]
    assert ring.is_consumer is True
    assert ring.query().submitted == 3


def test_parent_reservation_cannot_be_submitted_in_fork_child(ring):
    """A reservation made before fork belongs to the parent: the child cannot commit it."""
    res = ring.reserve(6)
    with memoryview(res) as m:
        m[:] = b"parent"
    run_child(_child_submit_parent_reservation, ring, res)
    # the child's report is behind the parent's still-busy record
    assert ring.consume() == []
    assert res.active
    res.submit()
    got = ring.consume()
    assert got[0] == b"parent"
    assert got[1].startswith(b"ReservationError:")
    assert b"parent" in got[1]
    assert len(got) == 2


# --- 11. close and pickling --------------------------------------------------------------


def test_methods_after_close_raise(ring):
    """Every operation on a closed ring raises RingClosedError; close is idempotent."""
    ring.close()
    ring.close()
    assert ring.closed is True
    assert ring.is_consumer is False
    calls = [
        lambda: ring.output(b"x"),
        lambda: ring.output_many([b"x"]),
        lambda: ring.reserve(1),
        lambda: ring.consume(),
        lambda: ring.consume_with_pos(),
        lambda: ring.consume_each(print),
        lambda: ring.poll(timeout=0),
        lambda: ring.prepare_wait(),
        lambda: ring.finish_wait(),
        lambda: ring.ready(),
        lambda: ring.query(),
        lambda: ring.snapshot(),
        lambda: ring.fileno(),
        lambda: ring.size,
        lambda: ring.max_record_size,
        lambda: pickle.dumps(ring),
    ]
    for call in calls:
        with pytest.raises(ringcore.RingClosedError):
            call()


def test_close_with_live_reservation_view_raises(ring):
    """close() refuses while a reservation's memoryview is alive, then works."""
    r = ring.reserve(4)
    m = memoryview(r)
    with pytest.raises(BufferError):
        ring.close()
    assert ring.closed is False
    m.release()
    ring.close()
    assert ring.closed is True
    assert not r.active


def test_close_discards_open_reservations(ring):
    """close() of a producer handle discards its open reservations; the consumer goes on."""
    producer = pickle.loads(pickle.dumps(ring))
    res = producer.reserve(8)
    producer.close()
    assert not res.active
    with pytest.raises(ringcore.ReservationError, match="discarded"):
        res.submit()
    q = ring.query()
    assert (q.submitted, q.discarded) == (0, 1)
    assert ring.output(b"after")
    assert ring.consume() == [b"after"]


def test_close_of_consumer_discards_its_reservations(ring):
    """The consumer's own open reservations are discarded by close() too."""
    res = ring.reserve(8)
    ring.close()
    with pytest.raises(ringcore.ReservationError):
        res.submit()
    with pytest.raises(ringcore.ReservationError):
        memoryview(res)


def test_ring_context_manager_closes():
    """with Ring(...) closes the ring on exit."""
    with Ring(SIZE) as r:
        r.output(b"x")
        assert r.consume() == [b"x"]
    assert r.closed


def test_pickle_in_process_gives_producer_handle(ring):
    """pickle.loads(pickle.dumps(ring)) is a producer on the same ring."""
    producer = pickle.loads(pickle.dumps(ring))
    try:
        assert isinstance(producer, Ring)
        assert producer.is_consumer is False
        assert producer.size == ring.size
        with pytest.raises(ringcore.NotConsumerError):
            producer.consume()
        with pytest.raises(ringcore.NotConsumerError):
            producer.prepare_wait()
        assert producer.output(b"via pickle")
        assert ring.consume() == [b"via pickle"]
    finally:
        producer.close()
    assert ring.closed is False


# --- 12. query ---------------------------------------------------------------------------


def test_query_fields(ring):
    """query() is a named 12-tuple; avail_data is producer_pos - consumer_pos."""
    q = ring.query()
    assert len(q) == 12
    assert q == (0, SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    ring.output_many([b"a" * 10, b"b" * 3])
    q = ring.query()
    assert q.ring_size == SIZE
    assert q.producer_pos == rec_len(10) + rec_len(3)
    assert q.avail_data == q.producer_pos - q.consumer_pos == q.producer_pos
    ring.consume(max_records=1)
    q = ring.query()
    assert q.consumer_pos == rec_len(10)
    assert q.avail_data == q.producer_pos - q.consumer_pos == rec_len(3)


def test_query_counts_across_processes(ring):
    """Counters from several producer processes add up in the consumer's query()."""
    ring.output(b"parent")
    run_child(_child_submit_and_discard, ring, 3, 2)
    run_child(_child_submit_and_discard, ring, 1, 1, method="spawn")
    q = ring.query()
    assert q.submitted == 1 + 3 + 1
    assert q.discarded == 2 + 1
    assert q.avail_data == q.producer_pos - q.consumer_pos
    assert ring.consume() == [b"parent", b"s0", b"s1", b"s2", b"s0"]
    q = ring.query()
    assert q.avail_data == 0
    assert q.consumer_pos == q.producer_pos


def test_stall_recheck_says_when_a_busy_record_blocks_the_consumer():
    ring = Ring(PAGE_SIZE, abandon_timeout=0.5)
    assert ring.stall_recheck() == 0.0
    res = ring.reserve(8)
    assert ring.output(b"later")  # committed, but behind the busy record
    assert ring.consume() == []
    assert 0.0 < ring.stall_recheck() <= 0.5
    res.submit()
    assert ring.stall_recheck() == 0.0
    assert ring.consume() == [bytes(8), b"later"]


def test_shm_dir_places_the_ring_in_that_file_system(tmp_path):
    ring = Ring(1 << 16, shm_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing to open by path
    assert ring.output(b"in tmp")
    assert ring.consume() == [b"in tmp"]
    with pytest.raises(FileNotFoundError) as err:
        Ring(1 << 16, shm_dir=tmp_path / "missing")
    assert err.value.filename == str(tmp_path / "missing")


def test_ring_that_does_not_fit_its_shm_dir_fails_at_creation(tmpfs):
    import errno

    small_tmpfs = tmpfs("1m")

    with pytest.raises(OSError) as err:
        Ring(4 << 20, shm_dir=small_tmpfs)
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename == str(small_tmpfs)
    with Ring(1 << 16, shm_dir=small_tmpfs) as ring:  # one that fits is fine
        assert ring.output(b"fits")


def _child_outputs(ring, n):
    for _ in range(n):
        assert ring.output(b"x")


def test_slot_stats_attribute_counters_to_producer_pids():
    ring = Ring(PAGE_SIZE)
    assert ring.slot_stats() == []
    child = mp.get_context("fork").Process(target=_child_outputs, args=(ring, 3))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert ring.output(b"mine") and not ring.output(bytes(PAGE_SIZE - 16))
    stats = {pid: (sub, dis, fail) for _, pid, sub, dis, fail, _ in ring.slot_stats()}
    # the child's slot keeps its counts after it exits (pid 0 once reclaimed)
    assert stats.pop(os.getpid()) == (1, 0, 1)
    assert list(stats.values()) == [(3, 0, 0)]
    assert sum(s[2] for s in ring.slot_stats()) == ring.query().submitted == 4


def test_child_of_a_fork_without_python_hooks_counts_in_its_own_slot():
    """A fork that runs no os.register_at_fork hooks (here libc's fork through
    ctypes, as a C library would) still gives the child a slot of its own:
    slot counters have one writer each, and records name their producer."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ring = Ring(PAGE_SIZE)
    assert ring.output(b"parent, before the fork")
    pid = libc.fork()
    if pid == 0:  # child: no Python after-fork hook has run
        ok = all(ring.output(b"child") for _ in range(3))
        os._exit(0 if ok else 1)
    assert pid > 0, ctypes.get_errno()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ring.output(b"parent, after the fork")
    stats = {spid: sub for _, spid, sub, _, _, _ in ring.slot_stats()}
    assert stats == {os.getpid(): 2, pid: 3}
    assert ring.consume() == [b"parent, before the fork"] + [b"child"] * 3 + [
        b"parent, after the fork"
    ]


def _hookless_child(ring: Ring, res: ringcore.Reservation, close_only: bool) -> int:
    if close_only:  # its first use of the handle: close() must notice the fork
        ring.close()
        return 0
    if ring.is_consumer:
        return 2
    try:
        res.submit()
        return 3
    except ringcore.ReservationError:
        pass
    if not ring.output(b"child"):
        return 4
    ring.close()
    return 0


@pytest.mark.parametrize("close_only", [True, False])
def test_fork_without_python_hooks_leaves_the_parent_its_reservation_and_role(close_only):
    """After a fork that runs no Python hooks, the child's handle still acts
    as a forked child's: a producer, unable to commit or (by closing) discard
    the parent's open reservation."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ring = Ring(PAGE_SIZE)
    res = ring.reserve(8)
    assert res is not None
    memoryview(res)[:] = b"reserved"
    pid = libc.fork()
    if pid == 0:  # child: no Python after-fork hook has run
        os._exit(_hookless_child(ring, res, close_only))
    assert pid > 0, ctypes.get_errno()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ring.is_consumer
    res.submit()
    assert ring.consume() == [b"reserved"] + ([] if close_only else [b"child"])


def test_shm_dir_none_is_a_memfd():
    with Ring(PAGE_SIZE, shm_dir=None) as ring:
        assert ring.output(b"memfd")
