"""The bpf-ringbuf source: any pinned BPF_MAP_TYPE_RINGBUF, streamed as records of a schema.

Someone else's BPF program writes raw structs into a ring buffer pinned at
`path` (bpftool map pin, or libbpf's pin_maps); its records carry no
ringstream header, so `schema` names the schema (from the schema files) that
decodes them. The service process opens the pinned map (service/kernel.py:
a wrong path or a map of another type fails the start) and hands its
descriptor to this worker, which consumes the kernel ring with
ringcore.KernelRing and writes each record, behind a header of the schema's
type stamped with the time it was read, into the service's ring. From there
on they are records like any other: ids, filters, resume, metrics.

A record shorter than its schema is delivered raw with the reason, longer
ones carry the rest as "_extra" (the schema rules). Nothing is dropped here:
when the service's ring is full this worker waits, and it is the BPF
program's reservations that then fail, which only it can count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import ringcore
from service.bpf.fds import MapFd
from service.record import HEADER, MAGIC
from service.sources.gap import RECORD_TOO_LARGE, gap_record
from service.workers import Grace, StopFlag, deliver

log = logging.getLogger(__name__)

POLL_TIMEOUT = 0.1
BATCH = 4096


def frame(type_id: int, records: list[bytes], *, max_size: int, source: str) -> list[bytes]:
    """Each record behind its header; one too large for the ring becomes a gap record."""
    ts = time.time_ns()
    head = HEADER.pack(MAGIC, type_id, 0, ts)
    out = []
    for r in records:
        if len(r) + len(head) <= max_size:
            out.append(head + r)
        else:
            log.warning(
                "a %d-byte record from %s does not fit the ring (max_record_size %d): "
                "a gap record stands in for it",
                len(r),
                source,
                max_size,
            )
            out.append(gap_record(ts, reason=RECORD_TOO_LARGE, source=source, cpu=0, lost=1))
    return out


def run(ring: ringcore.Ring, options: Mapping[str, Any], *, instance: int, stop: StopFlag) -> None:
    fd: MapFd = options["map"]
    type_id = int(options["type_id"])
    kring = ringcore.KernelRing(fd.fd)
    fd.close()
    grace = Grace(stop)
    max_size, source = ring.max_record_size, str(options.get("path"))
    try:
        # what is still in the pinned ring at stop stays there for the next start
        while not stop.is_set():
            batch = kring.poll(timeout=POLL_TIMEOUT, max_records=BATCH)
            if batch:
                records = frame(type_id, batch, max_size=max_size, source=source)
                done = deliver(ring, records, grace)
                if done < len(records):
                    log.warning(
                        "stopped with %d records taken from %s not delivered: the ring was full",
                        len(records) - done,
                        options.get("path"),
                    )
    finally:
        kring.close()
