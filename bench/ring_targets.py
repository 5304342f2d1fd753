"""The ringcore issue's two relative targets, checked over several runs.

    .venv/bin/python bench/ring_targets.py [--runs 10]

One producer process -> one consumer, 64 B records. Each run measures, with
ring_bench.py's own procedure (median of --repeat runs per figure), ringcore
output() per record, pyzmq per record and every batched peer, then prints
output() against pyzmq per record (target: >= 8x) and against the best
batched peer of that run (target: > 1x). A single ring_bench.py run shows a
ratio once; this shows how it spreads on a noisy machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ring_bench as rb
from machine import describe as describe_machine

OURS = "ringcore output()"
ZMQ = "pyzmq PUSH/PULL ipc"


def measure(method: rb.Method, records: int, repeat: int) -> float:
    rate, lost = rb.measure(method, 1, 64, records, repeat)
    if lost:
        print(f"    ({method.name}: {lost} records lost by the peer)")
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--records", type=int, default=2_000_000, help="for ringcore")
    args = ap.parse_args()

    by_name = {m.name: m for m in rb.METHODS}
    batched = [m.name for m in rb.METHODS if m.batched and m.family == "peer"]
    print(f"machine: {describe_machine()}")
    print("1 producer -> 1 consumer, 64 B records")
    vs_zmq: list[float] = []
    vs_best: list[float] = []
    for run in range(1, args.runs + 1):
        rates = {
            name: measure(by_name[name], args.records, args.repeat)
            for name in (OURS, ZMQ, *batched)
        }
        best = max(batched, key=rates.__getitem__)
        vs_zmq.append(rates[OURS] / rates[ZMQ])
        vs_best.append(rates[OURS] / rates[best])
        print(
            f"  run {run:2d}: output() {rates[OURS] / 1e6:5.2f} M/s; "
            f"pyzmq {rates[ZMQ] / 1e6:4.2f} M/s, x{vs_zmq[-1]:4.1f}; "
            f"best batched {best} {rates[best] / 1e6:5.2f} M/s, x{vs_best[-1]:4.2f}"
        )
    print(
        f"x pyzmq per record: {min(vs_zmq):.1f}-{max(vs_zmq):.1f}, "
        f"{sum(r >= 8 for r in vs_zmq)} of {args.runs} runs at 8x or more"
    )
    print(
        f"x best batched peer: {min(vs_best):.2f}-{max(vs_best):.2f}, "
        f"{sum(r > 1 for r in vs_best)} of {args.runs} runs above 1"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
