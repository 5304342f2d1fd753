"""A small pure-Python reference model of the BPF ring buffer.

With overwrite=True it models BPF_F_RB_OVERWRITE (Linux 6.19) for a consumer
that runs between producer operations.

It follows kernel/bpf/ringbuf.c step by step (including the 2024
pending_pos rule) and keeps the data area as bytes, so tests can compare
ringcore's snapshot() with it byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8


def record_len(size: int) -> int:
    return (size + HDR + 7) // 8 * 8


@dataclass
class Rec:
    pos: int
    size: int


class RingModel:
    def __init__(self, size: int, pg_off: int, overwrite: bool = False) -> None:
        self.size = size
        self.mask = size - 1
        self.data = bytearray(size)
        self.cons = 0
        self.prod = 0
        self.pend = 0
        self.pg_off = pg_off
        self.submitted = 0
        self.discarded = 0
        self.failures = 0
        # overwrite mode (BPF_F_RB_OVERWRITE)
        self.overwrite = overwrite
        self.over = 0
        self.lost = 0

    def _write(self, pos: int, blob: bytes) -> None:
        for i, b in enumerate(blob):
            self.data[(pos + i) & self.mask] = b

    def _read(self, pos: int, n: int) -> bytes:
        return bytes(self.data[(pos + i) & self.mask] for i in range(n))

    def _len_at(self, pos: int) -> int:
        return struct.unpack("<I", self._read(pos, 4))[0]

    def fits_ever(self, size: int) -> bool:
        return record_len(size) <= self.mask

    def reserve(self, size: int) -> Rec | None:
        length = record_len(size)
        pend = self.pend
        while pend < self.prod:
            hdr_len = self._len_at(pend)
            if hdr_len & BUSY:
                break
            pend += record_len(hdr_len & ~DISCARD)
        self.pend = pend
        new_prod = self.prod + length
        if self.overwrite:
            if new_prod - pend > self.mask:
                self.failures += 1
                return None
            while new_prod - self.over > self.mask:
                self.over += record_len(self._len_at(self.over) & ~(BUSY | DISCARD))
        elif new_prod - self.cons > self.mask or new_prod - pend > self.mask:
            self.failures += 1
            return None
        self._write(self.prod, struct.pack("<II", size | BUSY, self.pg_off))
        rec = Rec(self.prod, size)
        self.prod = new_prod
        return rec

    def fill(self, rec: Rec, payload: bytes, offset: int = 0) -> None:
        self._write(rec.pos + HDR + offset, payload)

    def commit(self, rec: Rec, discard: bool) -> None:
        new_len = rec.size | (DISCARD if discard else 0)
        self._write(rec.pos, struct.pack("<I", new_len))
        if discard:
            self.discarded += 1
        else:
            self.submitted += 1

    def output(self, payload: bytes) -> bool:
        rec = self.reserve(len(payload))
        if rec is None:
            return False
        self.fill(rec, payload)
        self.commit(rec, discard=False)
        return True

    def consume(self, max_records: int | None = None) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        if self.overwrite and self.cons < self.over:
            self.lost += self.over - self.cons
            self.cons = self.over
        while self.cons < self.prod:
            hdr_len = self._len_at(self.cons)
            if hdr_len & BUSY:
                break
            size = hdr_len & ~DISCARD
            pos = self.cons
            self.cons += record_len(size)
            if not hdr_len & DISCARD:
                out.append((pos, self._read(pos + HDR, size)))
                if max_records is not None and len(out) >= max_records:
                    break
        return out
