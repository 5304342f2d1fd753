"""Records -> JSON lines: the C encoder (ringcore.Encoder) against the Python reference.

One command, every figure measured in the same run:

    .venv/bin/python bench/encode_bench.py

For the `synthetic` records of config/schemas.toml (type 10, 64 bytes with
the header: u64, u16, an enum u8, a pad, an f64, char[16], bytes[8] as hex)
and for `exec` records (type 1, 428 bytes, mostly NUL-padded text), it
measures records/s turned into JSON lines on one core:

  from a ring   a 16 MiB ring filled with records (the filling is not timed),
                then drained in batches of --batch records (default 4096, the
                service's consumer.batch): Encoder.consume(ring, batch)
                against ring.consume_with_pos(batch) + encode_record() each
  from a list   (position, bytes) pairs: Encoder.encode_many() against
                encode_record() over the list

Each figure is the median of --repeat runs. The Python reference is
struct.unpack + a dict + orjson.dumps per record, the way the service would
do it without the encoder. The C path must reach 2 M records/s for the
64-byte records from the ring.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe as describe_machine  # noqa: E402

import ringcore  # noqa: E402
from service import schema as S  # noqa: E402
from service.record import pack_header  # noqa: E402

RING_SIZE = 16 << 20
DISTINCT = 4096  # distinct records per kind, cycled
TARGET = 2e6  # records/s, C encoder, 64-byte records from the ring

WORDS = ["ok", "retry", "timeout", "cache", "miss", "flush", "tick", "gc"]
PROGRAMS = ["/usr/bin/python3", "/usr/bin/bash", "/usr/sbin/sshd", "/usr/bin/git"]


def synthetic_records(rnd: random.Random) -> list[bytes]:
    now = time.time_ns()
    return [
        pack_header(10, now + i)
        + struct.pack(
            "<QHB5xd16s8s",
            i,
            rnd.randrange(16),
            rnd.randrange(4),
            rnd.uniform(-1000.0, 1000.0),
            f"w{i % 16} {rnd.choice(WORDS)}".encode(),
            rnd.randbytes(8),
        )
        for i in range(DISTINCT)
    ]


def exec_records(rnd: random.Random) -> list[bytes]:
    now = time.time_ns()
    out = []
    for i in range(DISTINCT):
        prog = rnd.choice(PROGRAMS)
        args = " ".join(rnd.choice(WORDS) for _ in range(rnd.randrange(1, 8)))
        out.append(
            pack_header(1, now + i)
            + struct.pack(
                "<III16s128s256s",
                1000 + i,
                1,
                rnd.choice([0, 1000]),
                prog.rsplit("/", 1)[1].encode(),
                prog.encode(),
                f"{prog} --{args}".encode(),
            )
        )
    return out


def fill(ring: ringcore.Ring, recs: list[bytes]) -> int:
    """Fill the ring with recs, cycled, until it is full; returns how many went in."""
    n = 0
    while True:
        got = ring.output_many(recs)
        n += got
        if got < len(recs):
            return n


def ring_rate(ring: ringcore.Ring, recs: list[bytes], drain: Callable[[], int]) -> float:
    """Records/s of drain() called until the filled ring is empty."""
    fill(ring, recs)
    n = 0
    t0 = time.perf_counter()
    while got := drain():
        n += got
    dt = time.perf_counter() - t0
    assert not ring.consume(), "the drain left records behind"
    return n / dt


def list_rate(pairs: list[tuple[int, bytes]], encode: Callable[[], int], reps: int) -> float:
    t0 = time.perf_counter()
    n = sum(encode() for _ in range(reps))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    ap.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    ap.add_argument(
        "--batch", type=int, default=4096, help="records per drain call (0: the whole ring)"
    )
    args = ap.parse_args()
    batch = args.batch or None
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    schemas = S.builtin_schemas()
    table = S.by_type(schemas)
    enc = S.compile_encoder(schemas)
    ref = S.encode_record
    rnd = random.Random(1)
    kinds = [("synthetic, 64 B", synthetic_records(rnd)), ("exec, 428 B", exec_records(rnd))]

    print(f"machine: {describe_machine()}")
    print(
        f"median of {args.repeat} runs; a {RING_SIZE >> 20} MiB ring drained "
        f"{args.batch or 'all'} records a call; records/s into JSON lines"
    )
    print()
    print(f"{'records':<17} {'source':<6} {'Python reference':>17} {'C Encoder':>12} {'ratio':>7}")
    verdicts = []
    for label, recs in kinds:
        # the same JSON from both, before timing anything
        for pos, r in enumerate(recs[:64]):
            assert S.orjson.loads(enc.encode(pos, r, 0)) == S.orjson.loads(ref(table, pos, r, 0))
        with ringcore.Ring(RING_SIZE) as ring:

            def c_drain(ring: ringcore.Ring = ring) -> int:
                return len(enc.consume(ring, batch)[0])

            def py_drain(ring: ringcore.Ring = ring) -> int:
                now = time.time_ns()
                lines = [ref(table, pos, data, now) for pos, data in ring.consume_with_pos(batch)]
                return len(lines)

            c_ring = statistics.median(ring_rate(ring, recs, c_drain) for _ in range(args.repeat))
            py_ring = statistics.median(ring_rate(ring, recs, py_drain) for _ in range(args.repeat))
        pairs = list(enumerate(recs))
        reps = max(1, 200_000 // len(pairs))

        def c_list(pairs: list[tuple[int, bytes]] = pairs) -> int:
            return len(enc.encode_many(pairs, time.time_ns())[0])

        def py_list(pairs: list[tuple[int, bytes]] = pairs) -> int:
            now = time.time_ns()
            return len([ref(table, pos, data, now) for pos, data in pairs])

        c_l = statistics.median(list_rate(pairs, c_list, reps) for _ in range(args.repeat))
        py_l = statistics.median(list_rate(pairs, py_list, reps) for _ in range(args.repeat))
        for source, py, c in (("ring", py_ring, c_ring), ("list", py_l, c_l)):
            print(
                f"{label:<17} {source:<6} {py / 1e6:>13.2f} M/s {c / 1e6:>8.2f} M/s {c / py:>6.1f}x"
            )
        if label.startswith("synthetic"):
            verdicts.append(
                f"target: C Encoder.consume() >= {TARGET / 1e6:.0f} M records/s for 64-byte "
                f"records: {c_ring / 1e6:.2f} M/s, {'met' if c_ring >= TARGET else 'NOT met'}"
            )
    print()
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
