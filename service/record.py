"""The record envelope every ringstream source writes into the ring.

A framed record is a 16-byte header followed by the fields of the schema its
type names, packed in declaration order, little-endian, no implicit padding::

    0       2       4               8                              16
    +-------+-------+---------------+-------------------------------+------------
    | "RS"  | type  |  reserved = 0 |  ts_ns (u64, CLOCK_REALTIME)  | fields ...
    +-------+-------+---------------+-------------------------------+------------

`type` selects the schema (config: schemas). `ts_ns` is the wall-clock time
the producer wrote the record; the service reports submit-to-write latency
from it. Anything else in the ring (shorter than 16 bytes, another magic, a
non-zero reserved word: a record from an external producer that knows nothing
of this header) is delivered raw, base64-encoded, stamped with the time the
consumer took it; a framed record of an unknown type is delivered raw too.
"""

from __future__ import annotations

import time

from ringcore.frames import HEADER, MAGIC

HEADER_SIZE = HEADER.size  # 16
RAW_TYPE = 0  # type id reported for records delivered raw; never a schema's


def pack_header(type_id: int, ts_ns: int | None = None) -> bytes:
    """The 16 header bytes for a record of `type_id` stamped `ts_ns` (now by default)."""
    return HEADER.pack(MAGIC, type_id, 0, time.time_ns() if ts_ns is None else ts_ns)


def write_header(buf: memoryview | bytearray, type_id: int, ts_ns: int | None = None) -> None:
    """Write the header into the first 16 bytes of `buf` (a reservation, say)."""
    HEADER.pack_into(buf, 0, MAGIC, type_id, 0, time.time_ns() if ts_ns is None else ts_ns)


def parse_header(data: bytes | memoryview) -> tuple[int, int] | None:
    """(type_id, ts_ns) of a framed record, or None for a record to deliver raw."""
    if len(data) < HEADER_SIZE:
        return None
    magic, type_id, reserved, ts_ns = HEADER.unpack_from(data, 0)
    if magic != MAGIC or reserved != 0 or type_id == RAW_TYPE:
        return None
    return type_id, ts_ns
