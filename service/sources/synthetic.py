"""The synthetic source: a load generator.

Options (checked by service.workers.plan_workers): `rate` records/s for this
instance (0 = as fast as the ring takes them), `size` bytes per record (>= 64)
and `mix`, weights over the record kinds:

* "synthetic": the 64-byte type 10 record when size is 64; a larger size
  makes it a type 11 synthetic_blob record (the fixed schema cannot grow);
* "synthetic_blob": type 11, the 48-byte fixed part then `size - 48` payload
  bytes, whose BLAKE2b-128 is the `digest` field;
* "raw": an unframed record (see RAW) that the service delivers raw.

Every record of an instance, whatever its kind, carries the next `seq` of
that instance (from 0 in each worker process, so a restarted worker starts
over) and `worker` = the instance index: a consumer can check per worker
that nothing was lost or reordered. A full ring is retried, never skipped.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import ringcore
from service.record import HEADER_SIZE, MAGIC
from service.workers import SourceConfigError, StopFlag, deliver

SYNTHETIC_TYPE = 10
BLOB_TYPE = 11
# header + the fields of config/schemas.toml, in order (tests check them)
SYNTHETIC = struct.Struct("<2sHIQ" + "QHB5xd16s8s")  # 64 bytes
BLOB = struct.Struct("<2sHIQ" + "QH6x16s")  # 48 bytes, then the payload
# raw records: "raw!", worker u16, 0 u16, seq u64, ts_ns u64, filler to size;
# not "RS", so the service delivers them as raw records
RAW_MAGIC = b"raw!"
RAW = struct.Struct("<4sHHQQ")

BATCH = 64  # records per output_many: the ring's sweet spot (README)
LEVELS = 4  # the synthetic schema's level enum: debug info warn error

assert SYNTHETIC.size == 64 and BLOB.size == 48 and HEADER_SIZE == 16


class Generator:
    """Builds the records of one instance, numbering them."""

    def __init__(self, worker: int, size: int, mix: Mapping[str, float]) -> None:
        self.worker = worker
        self.size = size
        self.seq = 0
        self._rng = random.Random(worker)
        self._kinds = list(mix)
        self._weights = [mix[k] for k in self._kinds]
        self._label = f"synthetic-{worker}".encode()[:16]
        # one payload per instance: building a fresh one per record would cost
        # more than the ring; its digest lets a consumer check the bytes
        self._payload = self._rng.randbytes(size - BLOB.size)
        self._digest = hashlib.blake2b(self._payload, digest_size=16).digest()
        self._filler = bytes(size - RAW.size)
        builders: dict[str, Callable[[int, int], bytes]] = {
            "synthetic": self._synthetic if size == SYNTHETIC.size else self._blob,
            "synthetic_blob": self._blob,
            "raw": self._raw,
        }
        self._builders = [builders[k] for k in self._kinds]

    def batch(self, n: int) -> list[bytes]:
        """The next `n` records."""
        if len(self._builders) == 1:
            build = self._builders[0]
            picks = [build] * n
        else:
            picks = self._rng.choices(self._builders, self._weights, k=n)
        seq = self.seq
        self.seq += n
        now = time.time_ns
        return [build(seq + i, now()) for i, build in enumerate(picks)]

    def _synthetic(self, seq: int, ts: int) -> bytes:
        token = (seq * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        return SYNTHETIC.pack(
            MAGIC,
            SYNTHETIC_TYPE,
            0,
            ts,
            seq,
            self.worker,
            seq % LEVELS,
            seq / 1000,
            self._label,
            token,
        )

    def _blob(self, seq: int, ts: int) -> bytes:
        return BLOB.pack(MAGIC, BLOB_TYPE, 0, ts, seq, self.worker, self._digest) + self._payload

    def _raw(self, seq: int, ts: int) -> bytes:
        return RAW.pack(RAW_MAGIC, self.worker, 0, seq, ts) + self._filler


def run(ring: ringcore.Ring, options: Mapping[str, Any], *, instance: int, stop: StopFlag) -> None:
    size = options["size"]
    if size > ring.max_record_size:
        raise SourceConfigError(
            f"size: {size} bytes does not fit the ring (max_record_size {ring.max_record_size})"
        )
    gen = Generator(instance, size, options["mix"])
    rate = float(options["rate"])
    if rate > 0:
        run_paced(ring, gen, rate, stop)
    else:
        run_unthrottled(ring, gen, stop)


def run_unthrottled(ring: ringcore.Ring, gen: Generator, stop: StopFlag) -> None:
    """As fast as the ring takes them: batches of BATCH, backing off while it is full."""
    while not stop.is_set():
        deliver(ring, gen.batch(BATCH), stop)


def run_paced(ring: ringcore.Ring, gen: Generator, rate: float, stop: StopFlag) -> None:
    """`rate` records/s: record i is due at start + i/rate; due records go out in batches.

    The process sleeps until the next record is due (no busy loop). When it
    falls behind (a full ring, a descheduled process) it catches up at most
    one second's worth (and at least one batch): older slots are skipped, not
    queued, so a long stall neither builds unbounded debt nor bursts after.
    Skipped slots never get a record or a seq: nothing is lost.
    """
    base = time.monotonic()
    scheduled = 0  # slots whose time has come: sent or skipped
    max_debt = max(BATCH, int(rate))
    while not stop.is_set():
        now = time.monotonic()
        due = int((now - base) * rate) + 1 - scheduled
        if due <= 0:
            stop.wait(base + scheduled / rate - now)
            continue
        if due > max_debt:
            scheduled += due - max_debt
            due = max_debt
        n = min(due, BATCH)
        deliver(ring, gen.batch(n), stop)
        scheduled += n
