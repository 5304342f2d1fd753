"""ringcore: the Linux BPF ring buffer, for processes.

A multi-producer, single-consumer ring in shared memory. The process that
creates a :class:`Ring` is its consumer; a ``Ring`` handed to a
``multiprocessing.Process`` (fork or spawn) arrives in the child as a producer
on the same ring.
"""

from __future__ import annotations

import os
import weakref
from multiprocessing.reduction import DupFd

from ringcore._ringcore import (
    BUSY_BIT,
    DISCARD_BIT,
    FORCE_WAKEUP,
    HEADER_SIZE,
    MAX_SIZE,
    NO_WAKEUP,
    PAGE_SIZE,
    ConsumerBusyError,
    Encoder,
    IncompatibleRingError,
    KernelRing,
    KernelRingQuery,
    NotConsumerError,
    Reservation,
    ReservationError,
    RingClosedError,
    RingCorruptedError,
    RingError,
    RingQuery,
)
from ringcore._ringcore import Ring as _CRing
from ringcore.attach import (
    AttachError,
    AttachProtocolError,
    AttachRefusedError,
    AttachServer,
    AttachTimeoutError,
    RingNotFoundError,
    attach,
    serve,
)

__all__ = [
    "BUSY_BIT",
    "DISCARD_BIT",
    "FORCE_WAKEUP",
    "HEADER_SIZE",
    "MAX_SIZE",
    "NO_WAKEUP",
    "PAGE_SIZE",
    "AttachError",
    "AttachProtocolError",
    "AttachRefusedError",
    "AttachServer",
    "AttachTimeoutError",
    "ConsumerBusyError",
    "Encoder",
    "IncompatibleRingError",
    "KernelRing",
    "KernelRingQuery",
    "NotConsumerError",
    "Reservation",
    "ReservationError",
    "Ring",
    "RingClosedError",
    "RingCorruptedError",
    "RingError",
    "RingNotFoundError",
    "RingQuery",
    "attach",
    "serve",
]

# Every open Ring of this process, so a forked child can turn them into
# producers before any of its code runs.
_live_rings: weakref.WeakSet[Ring] = weakref.WeakSet()


class Ring(_CRing):
    """A BPF-style MPSC ring buffer in shared memory.

    ``Ring(size)`` creates a ring with a data area of ``size`` bytes (a power
    of 2 and a multiple of the page size) and makes this handle its consumer
    (``consumer=False``: a producer handle only, the consumer attaches
    later). ``abandon_timeout`` is how long a busy record of a dead producer
    may block the consumer before it is stepped over. ``overwrite=True``
    makes a flight recorder (BPF_F_RB_OVERWRITE): reservations never fail
    for lack of room, the newest records overwrite the oldest. ``shm_dir``
    puts the ring's memory in an unnamed file in that directory (a tmpfs such
    as /dev/shm, whose size limit then applies: OSError ENOSPC naming the
    directory when the ring does not fit) instead of an anonymous memfd.
    """

    def __init__(
        self,
        size: int,
        *,
        consumer: bool = True,
        abandon_timeout: float = 1.0,
        overwrite: bool = False,
        shm_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        _live_rings.add(self)

    @classmethod
    def _attach_fds(
        cls, mem_fd: int, event_fd: int, *, consumer: bool = False, abandon_timeout: float = 1.0
    ) -> Ring:
        ring = super()._attach_fds(
            mem_fd, event_fd, consumer=consumer, abandon_timeout=abandon_timeout
        )
        _live_rings.add(ring)
        return ring

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # DupFd passes the descriptors to a spawned child (or through the
        # resource sharer otherwise); the child maps the same memory.
        return (_rebuild, (DupFd(self._mem_fd), DupFd(self.fileno())))


def _rebuild(mem_df: object, event_df: object) -> Ring:
    mem_fd = mem_df.detach()  # type: ignore[attr-defined]
    event_fd = event_df.detach()  # type: ignore[attr-defined]
    try:
        return Ring._attach_fds(mem_fd, event_fd)
    finally:
        # _attach_fds keeps duplicates of its own
        os.close(mem_fd)
        os.close(event_fd)


def __getattr__(name: str) -> object:
    # ringcore.aio and ringcore.logging load on first use: most processes
    # that import ringcore (workers, producers) need neither asyncio nor logging
    if name in ("aio", "frames", "logging"):
        import importlib

        return importlib.import_module(f"ringcore.{name}")
    raise AttributeError(f"module 'ringcore' has no attribute {name!r}")


def _after_fork_in_child() -> None:
    for ring in list(_live_rings):
        ring._after_fork_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
