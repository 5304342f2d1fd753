"""Gap records: a source's own marker, in the stream, where it lost events.

A kernel BPF program that cannot reserve room in its ring buffer loses the
event; the source counts it and writes one of these where the loss happened,
so a subscriber sees how many events of which type are missing and where,
as it sees the fan-out's gap markers ("type": "gap", with a `reason`). Unlike
those, a gap record is a record of the ring: it has an id, is kept in the
history, and passes every filter (a subscriber of ?type=exec must learn that
exec events were lost). The schema is config/schemas.toml's "gap".
"""

from __future__ import annotations

import struct

from service.record import MAGIC

GAP_TYPE = 3
KERNEL_RING_FULL = 1  # enum values of `reason`
RECORD_TOO_LARGE = 2  # a kernel record that cannot fit the service's ring
SOURCE_SIZE = 32
# header, then reason u8, pad 3, cpu u32, source char[32], lost, lost_exec, lost_exit u64
GAP = struct.Struct(f"<2sHIQB3xI{SOURCE_SIZE}sQQQ")


def gap_record(
    ts_ns: int,
    *,
    reason: int,
    source: str,
    cpu: int,
    lost_exec: int = 0,
    lost_exit: int = 0,
    lost: int | None = None,
) -> bytes:
    """`lost` defaults to lost_exec + lost_exit (records of a source without types)."""
    return GAP.pack(
        MAGIC,
        GAP_TYPE,
        0,
        ts_ns,
        reason,
        cpu,
        source.encode()[:SOURCE_SIZE],
        lost_exec + lost_exit if lost is None else lost,
        lost_exec,
        lost_exit,
    )
