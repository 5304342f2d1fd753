"""Misuse gets a specific exception whose message names the problem."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
from sleeping import POLL, wait_until_sleeping

import ringcore


def test_second_live_consumer_is_refused():
    with ringcore.Ring(4096) as ring:
        with pytest.raises(ringcore.ConsumerBusyError, match=f"pid {os.getpid()}"):
            ringcore.Ring._attach_fds(ring._mem_fd, ring.fileno(), consumer=True)
        assert isinstance(ringcore.ConsumerBusyError(), ringcore.NotConsumerError)


def test_consumer_role_passes_on_after_close_and_resumes():
    """The consumer position lives in the ring: a new consumer resumes there."""
    with ringcore.Ring(4096, consumer=False) as keeper:
        assert not keeper.is_consumer
        for i in range(5):
            keeper.output(b"%d" % i)
        first = ringcore.Ring._attach_fds(keeper._mem_fd, keeper.fileno(), consumer=True)
        assert first.is_consumer
        assert first.consume(max_records=2) == [b"0", b"1"]
        first.close()
        second = ringcore.Ring._attach_fds(keeper._mem_fd, keeper.fileno(), consumer=True)
        assert second.consume() == [b"2", b"3", b"4"]
        second.close()


def _attach_consumer_and_die(mem_fd: int, event_fd: int) -> None:
    ring = ringcore.Ring._attach_fds(mem_fd, event_fd, consumer=True)
    ring.consume(max_records=1)
    os._exit(0)  # dies holding the role: no close()


def test_consumer_role_is_taken_over_from_a_dead_consumer():
    with ringcore.Ring(4096, consumer=False) as keeper:
        keeper.output_many([b"a", b"b"])
        p = mp.get_context("fork").Process(
            target=_attach_consumer_and_die, args=(keeper._mem_fd, keeper.fileno())
        )
        p.start()
        p.join(30)
        assert p.exitcode == 0
        with ringcore.Ring._attach_fds(keeper._mem_fd, keeper.fileno(), consumer=True) as c:
            assert c.consume() == [b"b"]


def test_producer_handle_cannot_consume():
    with (
        ringcore.Ring(4096, consumer=False) as keeper,
        pytest.raises(ringcore.NotConsumerError, match="needs the consumer"),
    ):
        keeper.consume()


def test_writing_past_a_reservation_is_refused():
    with ringcore.Ring(4096) as ring:
        res = ring.reserve(4)
        with memoryview(res) as mv:
            assert len(mv) == 4
            with pytest.raises(IndexError):
                mv[4] = 1
            with pytest.raises(ValueError):
                mv[:] = b"12345"
        res.discard()


def test_attach_to_something_that_is_not_a_ring():
    fd = os.memfd_create("not-a-ring")
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(ringcore.IncompatibleRingError, match="bad magic"):
            ringcore.Ring._attach_fds(fd, fd)
    finally:
        os.close(fd)


def test_unknown_creation_flags_are_not_accepted_on_attach():
    """A ring of a newer layout (unknown ctrl flags) is refused, not misread."""
    with ringcore.Ring(4096) as ring:
        fd = os.dup(ring._mem_fd)
        try:
            flags_offset = 36  # struct rc_ctrl: ..., u32 creator_pid, u32 flags
            os.pwrite(fd, (1 << 7).to_bytes(4, "little"), flags_offset)
            with pytest.raises(ringcore.IncompatibleRingError, match="does not match"):
                ringcore.Ring._attach_fds(fd, ring.fileno())
        finally:
            os.close(fd)


def test_zombie_consumer_does_not_hold_the_role():
    """A consumer that died but is not reaped yet (a zombie) is dead."""
    with ringcore.Ring(4096, consumer=False) as keeper:
        keeper.output(b"x")
        pid = os.fork()
        if pid == 0:
            ringcore.Ring._attach_fds(keeper._mem_fd, keeper.fileno(), consumer=True)
            os._exit(0)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, still a zombie
        try:
            with ringcore.Ring._attach_fds(keeper._mem_fd, keeper.fileno(), consumer=True) as c:
                assert c.consume() == [b"x"]
        finally:
            os.waitpid(pid, 0)


def test_consume_each_with_positions():
    with ringcore.Ring(4096) as ring:
        positions: list[int] = []
        for data in (b"a", b"bb", b"ccc"):
            res = ring.reserve(len(data))
            positions.append(res.position)
            with memoryview(res) as mv:
                mv[:] = data
            res.submit()
        seen: list[tuple[int, bytes]] = []
        assert ring.consume_each(lambda pos, mv: seen.append((pos, bytes(mv))), with_pos=True) == 3
        assert seen == list(zip(positions, [b"a", b"bb", b"ccc"], strict=True))


def test_records_before_a_corrupt_header_are_handed_out():
    """Nothing already accepted is lost to a corruption that follows it."""
    with ringcore.Ring(4096) as ring:
        ring.output_many([b"good", b"next"])
        fd = os.dup(ring._mem_fd)
        try:
            meta_pages = int.from_bytes(os.pread(fd, 4, 24), "little")  # struct rc_ctrl
            data = meta_pages * ringcore.PAGE_SIZE
            os.pwrite(fd, (0x3FFFFFF0).to_bytes(4, "little"), data + 16)  # 2nd header
        finally:
            os.close(fd)
        assert ring.consume() == [b"good"]
        with pytest.raises(ringcore.RingCorruptedError, match="position 16"):
            ring.consume()


def test_close_inside_a_consume_each_callback_is_refused():
    ring = ringcore.Ring(ringcore.PAGE_SIZE)
    for rec in (b"a", b"b"):
        assert ring.output(rec)
    seen = []

    def close_then_copy(view: memoryview) -> None:
        view.release()  # no export left to stop close() on its own
        with pytest.raises(ringcore.RingError, match="inside a consume_each"):
            ring.close()
        seen.append(ring.snapshot()[0])  # still mapped

    assert ring.consume_each(close_then_copy) == 2
    assert len(seen) == 2
    ring.close()  # after the drain it is fine


def test_close_while_poll_waits_in_another_thread_is_refused():
    """close() used to unmap the ring under a poll() that had released the GIL."""
    import threading

    ring = ringcore.Ring(ringcore.PAGE_SIZE)
    got: list[list[bytes]] = []
    t = threading.Thread(target=lambda: got.append(ring.poll(timeout=None, coalesce=0)))
    t.start()
    try:
        wait_until_sleeping(t, POLL)
        with pytest.raises(ringcore.RingError, match="while poll"):
            ring.close()
        assert ring.output(b"wake", ringcore.FORCE_WAKEUP)
    finally:
        t.join()
    assert got == [[b"wake"]]
    ring.close()


@pytest.mark.parametrize("how", ["os.fork", "libc fork"])
def test_fork_inside_a_consume_each_callback_leaves_the_drain_to_the_parent(how):
    """The child used to go on draining as a second consumer: every record
    delivered twice, and consumer_pos moved under the parent."""
    import ctypes

    fork = os.fork if how == "os.fork" else ctypes.CDLL(None, use_errno=True).fork
    ring = ringcore.Ring(ringcore.PAGE_SIZE)
    records = [b"r%d" % i for i in range(5)]
    for rec in records:
        assert ring.output(rec)
    seen: list[bytes] = []
    child: list[int] = []

    def fork_on_first(view: memoryview) -> None:
        seen.append(bytes(view))
        if not child:
            child.append(fork())
            if child[0] == 0:
                return  # the child: the drain must stop here
            # the parent goes on only once the child is done with the ring
            _, status = os.waitpid(child[0], 0)
            assert os.waitstatus_to_exitcode(status) == 0

    try:
        n = ring.consume_each(fork_on_first)
    except ringcore.NotConsumerError:
        if child[0] == 0:
            os._exit(0 if seen == records[:1] else 1)
        raise
    if child[0] == 0:
        os._exit(2)  # the child drained on
    assert n == 5 and seen == records
    q = ring.query()
    assert q.consumer_pos == q.producer_pos
    assert ring.output(b"after")
    assert ring.consume() == [b"after"]
