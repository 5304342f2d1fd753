"""Plugin sources for the end-to-end tests: known records, then a known ending.

Records are the built-in `synthetic` schema (type 10) with seq 0..count-1,
so a test can check every one of them arrived, once, in order.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any

from service.record import pack_header

BODY = struct.Struct("<QHB5xd16s8s")  # the synthetic schema, 48 bytes


def record(seq: int, worker: int = 0, label: bytes = b"test") -> bytes:
    return pack_header(10) + BODY.pack(seq, worker, seq % 4, seq / 2, label, seq.to_bytes(8, "big"))


def emit(ring: Any, options: dict[str, Any]) -> None:
    """Write options["count"] records (waiting while the ring is full), then
    crash if options["then"] == "crash", else idle until stopped."""
    worker = int(options.get("worker", 0))
    label = str(options.get("label", "test")).encode()
    for seq in range(int(options["count"])):
        data = record(seq, worker, label)
        while not ring.output(data):
            time.sleep(0.001)
    if options.get("then") == "crash":
        os._exit(3)
    while True:
        time.sleep(3600)
