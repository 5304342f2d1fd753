"""Feed records from stdin into a ring served by name.

    python -m ringcore.produce PATH [--format json|text|lines|length-prefixed]
                                    [--type NAME] [--drop]

``PATH`` is the socket a keeper serves the ring at (:func:`ringcore.serve`).
``--format json``: one JSON object per line (JSON Lines; blank lines are
skipped), delivered as the object itself with its own "type", else NAME,
else "json"; a line that is not a JSON object arrives raw with the reason
(ringcore/frames.py). ``--format text``: each line one
``{"type": NAME or "text", "line": ...}`` record (a CR before the newline is
dropped). ``--format lines`` (the default): one opaque record per line, the
newline stripped (a last line without a newline is a record too; an empty
line is an empty record), delivered raw, base64. ``--format
length-prefixed``: opaque records, each a 4-byte little-endian length, then
that many payload bytes.

When the ring is full the record is retried after a short backoff (50 us,
doubling up to 5 ms) until it goes in: nothing is dropped unless ``--drop``
is given, which drops the record that found the ring full instead (and counts
it). At exit one line on stderr sums up records and bytes delivered, how
often the ring was full, retries and drops.

Exit status: 0 when all input was delivered (or counted as dropped); 2 when
the input holds a record the ring can never hold (larger than its
``max_record_size``) or ends inside a record: the message names the record's
index (0-based), the records before it are delivered; 1 when the ring cannot
be attached; 130 on SIGINT/SIGTERM (the summary is printed all the same).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import ringcore
from ringcore import frames
from ringcore.attach import attach

PROG = "ringcore.produce"
CHUNK = 1 << 16
BACKOFF_MIN = 50e-6
BACKOFF_MAX = 5e-3
LENGTH_PREFIX = 4


class InputError(Exception):
    """The input cannot be delivered as records (exit status 2)."""


class _Stop(Exception):
    """SIGTERM: stop reading and print the summary."""


class Producer:
    """Delivers batches of records, retrying (or dropping) when the ring is full."""

    def __init__(self, ring: ringcore.Ring, *, drop: bool = False) -> None:
        self.ring = ring
        self.drop = drop
        self.max_size = ring.max_record_size
        self.index = 0  # records taken from the input so far
        self.records = 0
        self.bytes = 0
        self.full = 0  # attempts that found no room
        self.retries = 0  # attempts repeated after a backoff
        self.waited = 0.0
        self.dropped = 0
        self.dropped_bytes = 0

    def put(self, records: list[bytes], what: str = "record") -> None:
        """Deliver records in order; an oversize one raises InputError after
        the records before it are delivered."""
        for j, rec in enumerate(records):
            if len(rec) > self.max_size:
                self._deliver(records[:j])
                raise InputError(
                    f"{what} {self.index} (0-based) is {len(rec)} bytes: larger than "
                    f"the ring can ever hold (max_record_size {self.max_size} bytes, "
                    f"ring of {self.ring.size} bytes); the {self.index} records before "
                    "it were delivered"
                )
        self._deliver(records)

    def _deliver(self, records: list[bytes]) -> None:
        ring = self.ring
        i, n = 0, len(records)
        delay = BACKOFF_MIN
        while i < n:
            if n - i == 1:
                k = 1 if ring.output(records[i]) else 0
            else:
                k = ring.output_many(records[i:] if i else records)
            if k:
                self.records += k
                self.bytes += sum(map(len, records[i : i + k]))
                self.index += k
                i += k
                delay = BACKOFF_MIN
                continue
            self.full += 1
            if self.drop:
                self.dropped += 1
                self.dropped_bytes += len(records[i])
                self.index += 1
                i += 1
                continue
            time.sleep(delay)
            self.waited += delay
            self.retries += 1
            delay = min(delay * 2, BACKOFF_MAX)

    def summary(self) -> str:
        line = (
            f"{PROG}: {self.records} records, {self.bytes} bytes delivered; "
            f"{self.full} writes found the ring full (a write is one record or a "
            f"batch; ringstream_reserve_failures_total counts records), {self.retries} retries"
        )
        if self.retries:
            line += f" (waited {self.waited * 1e3:.1f} ms)"
        if self.drop or self.dropped:
            line += f", {self.dropped} dropped ({self.dropped_bytes} bytes)"
        else:
            line += ", nothing dropped"
        return line


def read_lines(stream: BinaryIO, max_size: int) -> Iterator[list[bytes]]:
    """Batches of newline-delimited records (newline stripped)."""
    pending: list[bytes] = []
    pending_len = 0
    index = 0
    while chunk := stream.read1(CHUNK):  # type: ignore[attr-defined]
        if b"\n" not in chunk:
            pending.append(chunk)
            pending_len += len(chunk)
            if pending_len > max_size:
                raise InputError(
                    f"line {index} (0-based) is longer than the ring can ever hold "
                    f"(already {pending_len} bytes, max_record_size {max_size}); the "
                    f"{index} records before it were delivered"
                )
            continue
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending, pending_len = [], 0
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if tail:
            pending, pending_len = [tail], len(tail)
        index += len(lines)
        yield lines
    if pending:
        yield [b"".join(pending)]


def read_length_prefixed(stream: BinaryIO, max_size: int) -> Iterator[list[bytes]]:
    """Batches of records, each a 4-byte little-endian length and its payload."""
    buf = bytearray()
    index = 0
    offset = 0  # of buf[0] in the input
    while chunk := stream.read1(CHUNK):  # type: ignore[attr-defined]
        buf += chunk
        records: list[bytes] = []
        pos = 0
        while len(buf) - pos >= LENGTH_PREFIX:
            size = int.from_bytes(buf[pos : pos + LENGTH_PREFIX], "little")
            if size > max_size:
                if records:
                    yield records
                raise InputError(
                    f"record {index + len(records)} (0-based, length prefix at byte "
                    f"{offset + pos}) is {size} bytes: larger than the ring can ever "
                    f"hold (max_record_size {max_size} bytes); the "
                    f"{index + len(records)} records before it were delivered"
                )
            end = pos + LENGTH_PREFIX + size
            if end > len(buf):
                break
            records.append(bytes(buf[pos + LENGTH_PREFIX : end]))
            pos = end
        del buf[:pos]
        offset += pos
        if records:
            index += len(records)
            yield records
    if buf:
        if len(buf) < LENGTH_PREFIX:
            where = f"inside the length prefix ({len(buf)} of {LENGTH_PREFIX} bytes)"
        else:
            size = int.from_bytes(buf[:LENGTH_PREFIX], "little")
            where = f"after {len(buf) - LENGTH_PREFIX} of its {size} payload bytes"
        raise InputError(
            f"input ends inside record {index} (0-based, at byte {offset}): {where}; "
            f"the {index} records before it were delivered"
        )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Read records from stdin and output them into the ring served at PATH.",
    )
    p.add_argument("path", metavar="PATH", help="socket the ring is served at (ringcore.serve)")
    p.add_argument(
        "--format",
        choices=("json", "text", "lines", "length-prefixed"),
        default="lines",
        help="json: one JSON object per line, delivered as the object; text: each line a "
        '{"type":"text","line":...} record; lines: one opaque record per line, newline '
        "stripped (default); length-prefixed: 4-byte little-endian length, then the payload",
    )
    p.add_argument(
        "--type",
        metavar="NAME",
        default="",
        help='the records\' type with --format json (when an object has no "type" string '
        'of its own; default "json") or text (default "text")',
    )
    p.add_argument(
        "--drop",
        action="store_true",
        help="drop (and count) a record that finds the ring full instead of retrying",
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the attach server"
    )
    args = p.parse_args(argv)
    if args.type and args.format not in ("json", "text"):
        p.error(f"--type applies to --format json and text, not {args.format}")
    if len(args.type.encode()) > frames.MAX_NAME:
        p.error(f"--type: longer than {frames.MAX_NAME} bytes")
    return args


def framed(batches: Iterator[list[bytes]], fmt: str, type_name: str) -> Iterator[list[bytes]]:
    """JSON or text records of the lines (ringcore/frames.py), stamped when read."""
    type_id = frames.JSON_TYPE if fmt == "json" else frames.TEXT_TYPE
    for lines in batches:
        pre = frames.prefix(type_id, type_name)
        if fmt == "json":
            yield [pre + line for line in lines if line.strip()]
        else:
            yield [pre + (line[:-1] if line.endswith(b"\r") else line) for line in lines]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        ring = attach(args.path, timeout=args.timeout)
    except (OSError, ringcore.RingError) as e:
        print(f"{PROG}: cannot attach to {args.path}: {e}", file=sys.stderr)
        return 1

    def on_term(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    producer = Producer(ring, drop=args.drop)
    reader = read_length_prefixed if args.format == "length-prefixed" else read_lines
    what = "record" if args.format == "length-prefixed" else "line"
    batches = reader(sys.stdin.buffer, producer.max_size)
    if args.format in ("json", "text"):
        batches = framed(batches, args.format, args.type)
    status = 0
    try:
        for batch in batches:
            producer.put(batch, what)
    except InputError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        status = 2
    except (KeyboardInterrupt, _Stop):
        print(f"{PROG}: interrupted", file=sys.stderr)
        status = 130
    finally:
        ring.close()
        print(producer.summary(), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
