"""A BPF map descriptor that travels to a spawned worker process.

The service process loads the programs and owns their maps; a worker gets a
duplicate of a map's descriptor in the pickle that starts it (as ringcore.Ring
passes its memory), so a restarted worker reads the same ring, counters and
positions, and the programs stay attached while workers come and go.
"""

from __future__ import annotations

import os
from multiprocessing.reduction import DupFd


class MapFd:
    """A descriptor this process owns; pickled, a duplicate owned by the receiver."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (_rebuild, (DupFd(self.fd), self.name))

    def __repr__(self) -> str:
        return f"MapFd({self.fd}, {self.name!r})"


def _rebuild(df: object, name: str) -> MapFd:
    return MapFd(df.detach(), name)  # type: ignore[attr-defined]
