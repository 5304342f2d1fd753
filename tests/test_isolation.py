"""The operating system enforces each role's view of the ring (kernel fix 04ea3086).

The consumer's mapping of the producer page, the slots and the data is
read-only; a producer's mapping of the consumer page is read-only; nobody
writes the control page. A stray write faults in the writer (SIGSEGV) instead
of corrupting the ring. Each probe runs in a forked child that writes one
byte (the byte already there, so an allowed write changes nothing).
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing as mp
import signal

import pytest

import ringcore

CONSUMER_VIEW = {
    "ctrl": False,
    "consumer": True,
    "producer": False,
    "slots": False,
    "data": False,
    "data_again": False,
}
PRODUCER_VIEW = {
    "ctrl": False,
    "consumer": False,
    "producer": True,
    "slots": True,
    "data": True,
    "data_again": True,
}


def _poke(address: int) -> None:
    faulthandler.disable()  # the fault is the expected outcome, not news
    byte = ctypes.c_ubyte.from_address(address).value
    ctypes.c_ubyte.from_address(address).value = byte


def write_probe(address: int) -> int:
    """Exit code of a child that writes one byte at address (-SIGSEGV if it faulted)."""
    p = mp.get_context("fork").Process(target=_poke, args=(address,))
    p.start()
    p.join(30)
    return p.exitcode


def check_view(handle: ringcore.Ring, expected: dict[str, bool]) -> None:
    regions = {name: (addr, length, writable) for name, addr, length, writable in handle._regions()}
    assert set(regions) == set(expected)
    for name, (addr, length, writable) in regions.items():
        assert bool(writable) == expected[name], name
        for offset in (0, length - 1):
            code = write_probe(addr + offset)
            if expected[name]:
                assert code == 0, f"{name}+{offset}: writable region faulted ({code})"
            else:
                assert code == -signal.SIGSEGV, (
                    f"{name}+{offset}: a stray write into a read-only region "
                    f"did not fault (exit code {code})"
                )


def test_consumer_view_is_read_only_except_its_page():
    with ringcore.Ring(4096) as ring:
        ring.output(b"x")  # the producer view of the same process is separate
        check_view(ring, CONSUMER_VIEW)
        assert ring.consume() == [b"x"]


def test_producer_view_cannot_write_consumer_or_control_page():
    with ringcore.Ring(4096) as ring:
        producer = ringcore.Ring._attach_fds(ring._mem_fd, ring.fileno())
        try:
            assert not producer.is_consumer
            check_view(producer, PRODUCER_VIEW)
            assert producer.output(b"still works")
            assert ring.consume() == [b"still works"]
        finally:
            producer.close()


@pytest.mark.parametrize("consumer", [True, False])
def test_consumer_write_attempt_does_not_corrupt(consumer):
    """After a faulting write, the ring is intact for everyone else."""
    with ringcore.Ring(4096) as ring:
        ring.output(b"before")
        handle = ring if consumer else ringcore.Ring._attach_fds(ring._mem_fd, ring.fileno())
        target = "data" if consumer else "consumer"
        addr = next(a for name, a, _, _ in handle._regions() if name == target)
        assert write_probe(addr) == -signal.SIGSEGV
        ring.output(b"after")
        assert ring.consume() == [b"before", b"after"]
        if handle is not ring:
            handle.close()
