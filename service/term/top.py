"""`ringstream top [URL]`: a live full-screen view of one service, as bpftop
or `vector top` are for theirs.

Every second (--interval) it reads /metrics and /query and shows, as rates
over the last interval: the ring's fill (and each kernel BPF ring's beside
it), records in and out, reservation failures by source, abandoned records,
subscribers by transport and what they drop, delivery latency p50/p99, the
sources and their workers' restarts, the exec source's kernel events and
losses, connections and refusals. `q` quits (exit 0). A textual app; the
frames are rich tables. `--once` prints one frame (two samples an interval
apart) and exits, for a terminal that is not one.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from service.term.connect import Target, UsageError, add_target_options, target

Labels = tuple[tuple[str, str], ...]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("top", help="a live view of a running service", description=__doc__)
    add_target_options(p)
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh, seconds")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument(
        "--metrics-token",
        metavar="TOKEN",
        help="the token /metrics wants when auth.metrics_token is set "
        "(default: $RINGSTREAM_METRICS_TOKEN, else --token)",
    )
    p.add_argument("--metrics-token-file", metavar="FILE", help="read that token from FILE")


@dataclass
class Sample:
    at: float
    series: dict[str, dict[Labels, float]] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        want = tuple(sorted(labels.items()))
        for got, value in self.series.get(name, {}).items():
            if all(item in got for item in want):
                return value
        return 0.0

    def total(self, name: str) -> float:
        return sum(self.series.get(name, {}).values())

    def by(self, name: str, label: str, **only: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.series.get(name, {}).items():
            d = dict(labels)
            if all(d.get(k) == v for k, v in only.items()):
                out[d.get(label, "")] += value
        return dict(out)


def parse(text: str, at: float, query: dict[str, Any]) -> Sample:
    s = Sample(at, query=query)
    for family in text_string_to_metric_families(text):
        for m in family.samples:
            s.series.setdefault(m.name, {})[tuple(sorted(m.labels.items()))] = m.value
    return s


def quantile(q: float, before: Sample | None, now: Sample, name: str) -> float | None:
    """histogram_quantile over the interval, as PromQL computes it."""
    buckets: list[tuple[float, float]] = []
    for labels, value in now.series.get(name + "_bucket", {}).items():
        le = dict(labels)["le"]
        prev = before.series.get(name + "_bucket", {}).get(labels, 0.0) if before else 0.0
        buckets.append((math.inf if le == "+Inf" else float(le), value - prev))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * (
                (rank - lower_count) / width if width else 0
            )
        lower_bound, lower_count = bound, count
    return None


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def rate(n: float) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M/s"
    if n >= 10_000:
        return f"{n / 1e3:.1f} k/s"
    return f"{n:,.0f}/s"


def bar(fill: float, width: int = 16) -> Text:
    fill = min(1.0, max(0.0, fill))
    n = round(fill * width)
    style = "green" if fill < 0.5 else "yellow" if fill < 0.8 else "bold red"
    t = Text("█" * n, style=style)
    t.append("░" * (width - n), style="dim")
    t.append(f" {fill * 100:5.1f}%")
    return t


def render(url: str, before: Sample | None, now: Sample | None, problem: str | None) -> Group:
    head = Text(f"ringstream top  {url}", style="bold")
    parts: list[RenderableType] = [head]
    if now is None:
        parts.append(Text(problem or "connecting ...", style="bold red"))
        return Group(*parts)
    dt = (now.at - before.at) if before else 0.0

    def per_s(name: str, **labels: str) -> float:
        if before is None or dt <= 0:
            return 0.0
        return max(0.0, now.get(name, **labels) - before.get(name, **labels)) / dt

    def per_s_by(name: str, label: str, **only: str) -> dict[str, float]:
        if before is None or dt <= 0:
            return {k: 0.0 for k in now.by(name, label, **only)}
        b = before.by(name, label, **only)
        return {k: max(0.0, v - b.get(k, 0.0)) / dt for k, v in now.by(name, label, **only).items()}

    ready = "ready" if now.get("ringstream_ready") else "NOT READY"
    head.append(
        f"   epoch {now.query.get('epoch', '?')}   {ready}   "
        f"{time.strftime('%H:%M:%S', time.localtime(now.at))}",
        style="bold" if ready == "ready" else "bold red",
    )
    if problem:
        parts.append(Text(problem, style="bold red"))

    rings = Table(title="rings", title_justify="left", expand=True)
    for col in ("ring", "size", "fill", "used", "in", "out"):
        rings.add_column(col, justify="left" if col in ("ring", "fill") else "right", no_wrap=True)
    ring_size = now.get("ringstream_ring_size_bytes")
    used = now.get("ringstream_ring_available_bytes")
    rings.add_row(
        "user ring",
        size(ring_size),
        bar(used / ring_size if ring_size else 0),
        size(used),
        size(per_s("ringstream_ring_producer_position_bytes_total")) + "/s",
        size(per_s("ringstream_ring_consumer_position_bytes_total")) + "/s",
    )
    for src, ksize in now.by("ringstream_kernel_ring_size_bytes", "source").items():
        kused = now.get("ringstream_kernel_ring_available_bytes", source=src)
        rings.add_row(
            f"kernel: {src}",
            size(ksize),
            bar(kused / ksize if ksize else 0),
            size(kused),
            size(per_s("ringstream_kernel_ring_producer_position_bytes_total", source=src)) + "/s",
            size(per_s("ringstream_kernel_ring_consumer_position_bytes_total", source=src)) + "/s",
        )
    parts.append(rings)

    records = Table(title="records", title_justify="left", expand=True)
    for col in ("in (submitted)", "out (decoded)", "discarded", "abandoned", "reserve failures"):
        records.add_column(col, justify="right")
    failures = per_s_by("ringstream_reserve_failures_total", "source")
    failed = ", ".join(f"{k} {rate(v)}" for k, v in sorted(failures.items()) if v) or "0/s"
    decoded = sum(per_s_by("ringstream_decoded_records_total", "result").values())
    records.add_row(
        rate(per_s("ringstream_records_total", outcome="submitted")),
        rate(decoded),
        rate(per_s("ringstream_records_total", outcome="discarded")),
        rate(per_s("ringstream_records_total", outcome="abandoned")),
        Text(failed, style="bold red" if failed != "0/s" else ""),
    )
    parts.append(records)

    subs = Table(title="subscribers", title_justify="left", expand=True)
    for col in ("transport", "connected", "dropping"):
        subs.add_column(col, justify="left" if col == "transport" else "right")
    drops = per_s_by("ringstream_subscriber_dropped_records_total", "transport")
    for transport, n in sorted(now.by("ringstream_subscribers", "transport").items()):
        d = drops.get(transport, 0.0)
        subs.add_row(transport, f"{n:.0f}", Text(rate(d), style="yellow" if d else ""))
    p50 = quantile(0.5, before, now, "ringstream_delivery_latency_seconds")
    p99 = quantile(0.99, before, now, "ringstream_delivery_latency_seconds")
    lat = "-" if p50 is None or p99 is None else f"p50 {p50 * 1e3:.2f} ms   p99 {p99 * 1e3:.2f} ms"
    budget = per_s("ringstream_subscriber_budget_dropped_records_total")
    disconnects = now.by("ringstream_subscriber_disconnects_total", "reason")
    subs.caption = (
        f"delivery latency {lat}   budget cuts {rate(budget)}   queued "
        f"{size(now.get('ringstream_subscriber_queued_bytes'))}   disconnects "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(disconnects.items()))
    )
    parts.append(subs)

    sources = Table(title="sources", title_justify="left", expand=True)
    for col in ("source", "restarts", "reserve failures", "kernel events", "kernel lost"):
        sources.add_column(col, justify="left" if col == "source" else "right")
    restarts = now.by("ringstream_worker_restarts_total", "source")
    sent = per_s_by("ringstream_bpf_events_total", "source", outcome="sent")
    lost: dict[str, float] = defaultdict(float)
    for labels, value in now.series.get("ringstream_bpf_events_total", {}).items():
        d = dict(labels)
        if d.get("outcome") == "lost":
            lost[d.get("source", "")] += value
    for src in sorted(set(restarts) | set(sent)):
        sources.add_row(
            src,
            f"{restarts.get(src, 0):.0f}",
            f"{now.get('ringstream_reserve_failures_total', source=src):.0f}",
            rate(sent.get(src, 0.0)) if src in sent else "",
            Text(f"{lost[src]:.0f}", style="bold red" if lost.get(src) else "")
            if src in sent
            else "",
        )
    sources.caption = (
        f"{now.get('ringstream_workers'):.0f} workers   http connections "
        f"{now.get('ringstream_http_connections'):.0f}   refused "
        f"{now.total('ringstream_http_rejected_requests_total'):.0f}   auth failures "
        f"{now.total('ringstream_auth_failures_total'):.0f}"
    )
    parts.append(sources)
    return Group(*parts)


class Poller:
    def __init__(self, t: Target, metrics_headers: dict[str, str] | None = None) -> None:
        self.t = t
        # /metrics may want a token of its own; /query wants the subscriber's
        self.metrics_headers = t.headers if metrics_headers is None else metrics_headers
        self.before: Sample | None = None
        self.now: Sample | None = None
        self.problem: str | None = None

    async def poll(self, http: aiohttp.ClientSession) -> None:
        try:
            async with http.get(
                self.t.url("/metrics"), headers=self.metrics_headers, ssl=self.t.ssl
            ) as r:
                text = await r.text()
                if r.status != 200:
                    hint = " (the metrics token: --metrics-token)" if r.status == 401 else ""
                    raise RuntimeError(f"/metrics: HTTP {r.status}{hint}")
            async with http.get(self.t.url("/query"), headers=self.t.headers, ssl=self.t.ssl) as r:
                if r.status != 200:
                    hint = " (a subscriber's token: --token)" if r.status in (401, 403) else ""
                    raise RuntimeError(f"/query: HTTP {r.status}{hint}")
                q = await r.json()
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
            self.problem = f"unreachable: {e}"
            return
        self.problem = None
        self.before, self.now = self.now, parse(text, time.time(), q)

    def frame(self) -> Group:
        return render(self.t.base, self.before, self.now, self.problem)


def _app(poller: Poller, interval: float) -> Any:
    from textual.app import App, ComposeResult
    from textual.widgets import Footer, Static

    class Top(App[int]):
        BINDINGS: ClassVar[list[tuple[str, str, str]]] = [("q", "quit_top", "quit")]
        CSS: ClassVar[str] = "Static { height: auto; }"

        def compose(self) -> ComposeResult:
            yield Static(id="view")
            yield Footer()

        async def on_mount(self) -> None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(2, interval)))
            await self.tick()
            self.set_interval(interval, self.tick)

        async def tick(self) -> None:
            await poller.poll(self.http)
            self.query_one("#view", Static).update(poller.frame())

        async def action_quit_top(self) -> None:
            await self.http.close()
            self.exit(0)

    return Top()


async def _once(poller: Poller, interval: float) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        await poller.poll(http)
        await asyncio.sleep(interval)
        await poller.poll(http)
    Console().print(poller.frame())
    return 1 if poller.problem else 0


def _metrics_headers(args: argparse.Namespace) -> dict[str, str] | None:
    token = args.metrics_token
    if args.metrics_token_file:
        try:
            with open(args.metrics_token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise UsageError(
                f"--metrics-token-file {args.metrics_token_file}: {e.strerror}"
            ) from None
    token = token or os.environ.get("RINGSTREAM_METRICS_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else None


def main(args: argparse.Namespace) -> int:
    try:
        t = target(args.url, args.token, args.token_file, args.cacert)
        metrics_headers = _metrics_headers(args)
        if args.interval <= 0:
            raise UsageError(f"--interval: must be > 0 seconds, got {args.interval}")
    except UsageError as e:
        print(f"ringstream top: {e}", file=sys.stderr)
        return 2
    poller = Poller(t, metrics_headers)
    if args.once:
        return asyncio.run(_once(poller, args.interval))
    try:
        return _app(poller, args.interval).run() or 0
    except KeyboardInterrupt:
        return 0
