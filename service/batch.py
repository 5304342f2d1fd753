"""A batch of encoded records, as the consumer hands them to the fan-out.

Records are encoded to JSON once; every subscriber gets the same bytes
objects. Positions are the records' ring positions (their resumable ids),
ascending; ts_ns the producers' wall-clock stamps; types the schema type ids
(0 for records delivered raw).

The fields are tuples: the history holds 100,000 records by default, and
tuples of bytes and ints drop out of the garbage collector's sight, where
lists would be scanned on every full collection (measured: 40-110 ms pauses
at 10k records/s, the whole of the p99 latency).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Batch:
    lines: tuple[bytes, ...]
    positions: tuple[int, ...]
    ts_ns: tuple[int, ...]
    types: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(
        cls,
        lines: Sequence[bytes],
        positions: Sequence[int],
        ts_ns: Sequence[int],
        types: Sequence[int],
    ) -> Batch:
        return cls(tuple(lines), tuple(positions), tuple(ts_ns), tuple(types), sum(map(len, lines)))

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def first(self) -> int:
        return self.positions[0]

    @property
    def last(self) -> int:
        return self.positions[-1]

    def slice(self, start: int, stop: int | None = None) -> Batch:
        return Batch.of(
            self.lines[start:stop],
            self.positions[start:stop],
            self.ts_ns[start:stop],
            self.types[start:stop],
        )

    def after(self, pos: int) -> Batch:
        """The records whose position is greater than `pos`."""
        i = bisect_right(self.positions, pos)
        return self if i == 0 else self.slice(i)

    def select(self, keep: list[int]) -> Batch:
        """The records at indexes `keep` (ascending)."""
        if len(keep) == len(self.lines):
            return self
        lines = self.lines
        return Batch.of(
            [lines[i] for i in keep],
            [self.positions[i] for i in keep],
            [self.ts_ns[i] for i in keep],
            [self.types[i] for i in keep],
        )
