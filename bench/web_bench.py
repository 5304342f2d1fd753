"""The live page under load (issue 14): headless Chromium on the real
service at a given rate, for --seconds, measured by the browser itself.

    .venv/bin/python bench/web_bench.py                 # 1,000 and 100,000 records/s, 30 s each
    .venv/bin/python bench/web_bench.py --rates 100000 --seconds 10

Per rate: records the page received, frames drawn (requestAnimationFrame
callbacks) per second, and the Long Tasks API's count, total and longest
main-thread task (> 50 ms blocks input: what "responsive" means to a
browser). The lower rate is the peer measured in the same run. Nothing here
is a threshold.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402
from servicectl import Service  # noqa: E402

OBSERVE = """
window.__long = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__long.push(e.duration);
}).observe({type: "longtask", buffered: true});
window.__frames = 0;
(function count() { window.__frames++; requestAnimationFrame(count); })();
"""

CONFIG = """
[ring]
shm_dir = "memfd"

[workers]
count = 2

[[sources]]
kind = "synthetic"
rate = {rate}
size = 64
instances = 2
"""


def run(rate: int, seconds: float, chromium: str) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        config = CONFIG.replace("{rate}", str(rate))  # the source's, all instances
        with Service(Path(tmp), config) as svc, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.add_init_script(OBSERVE)
            page.goto(svc.url("/"))
            page.wait_for_function(
                "() => window.ringstream && window.ringstream.state.received > 0"
            )
            start = page.evaluate(
                "() => [window.ringstream.state.received, window.__frames, window.__long.length]"
            )
            t0 = time.monotonic()
            time.sleep(seconds)  # a benchmark's measuring window, not a synchronisation
            end = page.evaluate(
                "() => [window.ringstream.state.received, window.__frames, window.__long.slice()]"
            )
            dt = time.monotonic() - t0
            browser.close()
    longs = end[2][start[2] :]
    return {
        "received/s": (end[0] - start[0]) / dt,
        "frames/s": (end[1] - start[1]) / dt,
        "long tasks": len(longs),
        "long ms total": sum(longs),
        "longest ms": max(longs, default=0.0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", type=int, nargs="+", default=[1_000, 100_000])
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if not chromium:
        print("chromium (Debian package chromium) is needed", file=sys.stderr)
        return 2
    print(describe())
    print(
        "config: synthetic source, 2 workers, 64-byte records; page over WebSocket; "
        f"{args.seconds:g} s each"
    )
    results = {rate: run(rate, args.seconds, chromium) for rate in args.rates}
    base = results[args.rates[0]]
    for rate, r in results.items():
        ratio = r["received/s"] / base["received/s"] if base["received/s"] else 0
        print(
            f"{rate:>8,} records/s: page received {r['received/s']:>9,.0f}/s ({ratio:.1f}x the "
            f"first), {r['frames/s']:.0f} frames/s, {r['long tasks']:.0f} long tasks "
            f"({r['long ms total']:.0f} ms in all, longest {r['longest ms']:.0f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
