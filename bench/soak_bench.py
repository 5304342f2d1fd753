"""The soak (issue 12): the real service for 30 minutes at 50,000 records/s
with 50 subscribers (fast, reconnecting with resume, filtered, slow,
stalled), a worker SIGKILLed every minute and a SIGHUP reload every five.

    .venv/bin/python bench/soak_bench.py                   # 30 minutes
    .venv/bin/python bench/soak_bench.py --minutes 2 --kill-every 10 --reload-every 30

tests/soak.py has the workload and the checks (tests/test_soak.py runs them
for 60 s in CI); this prints what every subscriber got, whether every check
held, and the service's RSS and open descriptors after warm-up (the first
two minutes). Nothing here is a threshold on speed or size: the figures are
printed with the machine they come from.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import soak  # noqa: E402
from machine import describe as describe_machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=50_000, help="records/s, both workers together")
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between SIGKILLs")
    ap.add_argument("--reload-every", type=float, default=300.0, help="seconds between SIGHUPs")
    args = ap.parse_args()
    print(describe_machine())
    print(
        f"config: the built-in defaults, sources: 2 synthetic workers at {args.rate:,} "
        f"records/s together; {args.minutes:g} min, a worker SIGKILLed every "
        f"{args.kill_every:g} s, SIGHUP every {args.reload_every:g} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        r = asyncio.run(
            soak.run(
                Path(tmp),
                seconds=args.minutes * 60,
                rate=args.rate,
                kill_every=args.kill_every,
                reload_every=args.reload_every,
            )
        )
    print(soak.report(r))
    fds, rss = soak.fd_and_rss_drift(r)
    print(f"  drift after warm-up: {fds:+d} fds, RSS {rss / 2**20:+.0f} MiB")
    bad = soak.check(r)
    print("checks: all held" if not bad else "checks FAILED:\n  " + "\n  ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
