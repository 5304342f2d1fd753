"""The live web page (issue 14) in a real headless Chromium (Playwright on the
system's Chromium) against the real service: records appear, a filter
typed in the bar shows only its records and lands in the URL, pause then
resume loses nothing, the ring gauge says what /query says, no console
errors, a screenshot that is not blank. And the assets' headers, by curl."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
from servicectl import BASE_CONFIG, Service, free_port, get_json, http_get, parse_metrics

CHROMIUM = shutil.which("chromium")
CONFIG = (
    BASE_CONFIG.replace("count = 1", "count = 2")
    + """
[[sources]]
kind = "synthetic"
rate = 300
size = 64
instances = 2
"""
)


def wait(page: Any, what: str, js: str, arg: Any = None, timeout: float = 60) -> Any:
    """Poll a JS predicate until it holds (the deadline only guards a hang)."""
    page.wait_for_function(js, arg=arg, timeout=timeout * 1000, polling=100)
    return page.evaluate(js, arg)


def test_the_page_streams_filters_pauses_and_shows_the_ring(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium (Debian package chromium) is needed: scripts/setup --test"
    with Service(tmp_path, CONFIG) as svc, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(svc.url("/"))
            wait(page, "records", "() => window.ringstream.ids().length >= 20")
            # a filter typed in the bar: only its records, and the URL says it
            page.fill("#filter", "type=synthetic worker=1")
            page.press("#filter", "Enter")
            assert page.url.endswith("/?type=synthetic&field.worker=1")
            wait(page, "filtered records", "() => window.ringstream.records().length >= 10")
            recs = page.evaluate("() => window.ringstream.records()")
            assert all(r["type"] == "synthetic" and r["worker"] == 1 for r in recs), recs[:3]
            assert page.locator("#thead").inner_text().split() == [
                "id",
                "type",
                "seq",
                "worker",
                "level",
                "value",
                "label",
                "token",
            ]
            # pause: the connection closes; records go on meanwhile; resume
            # picks up after the last id from the service's history
            page.click("#pause")
            paused_at = len(page.evaluate("() => window.ringstream.ids()"))
            submitted = get_json(svc.url("/query"))["submitted"]
            deadline = time.monotonic() + 60
            while get_json(svc.url("/query"))["submitted"] < submitted + 100:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert len(page.evaluate("() => window.ringstream.ids()")) == paused_at
            page.click("#pause")
            wait(
                page,
                "records after the pause",
                f"() => window.ringstream.ids().length >= {paused_at + 40}",
            )
            recs = page.evaluate("() => window.ringstream.records()")
            assert not [r for r in recs if r["type"] == "gap"]
            seqs = [r["seq"] for r in recs]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # none lost, none twice
            # the ring gauge: what /query says
            q = get_json(svc.url("/query"))
            wait(page, "the gauge", "() => document.querySelector('#ring-size') !== null")
            assert page.get_attribute("#ring-size", "data-bytes") == str(q["ring_size"])
            assert page.inner_text("#ring-size") == "1.0 MiB"
            page.click("#pause")  # a table standing still, to click a record in
            page.click("#rows .row")
            assert '"type": "synthetic"' in page.inner_text("#detail-json")
            shot = page.screenshot(path=str(tmp_path / "page.png"))
            page.set_content(
                '<html><head><link rel="icon" href="data:,"></head><body></body></html>'
            )
            blank = page.screenshot()
        finally:
            browser.close()
        assert len(shot) > 5 * len(blank)  # a drawn page, not an empty one
        assert errors == []
        assert svc.errors() == []


def test_the_page_and_its_assets_are_cached_and_gzipped(tmp_path: Path) -> None:
    with Service(tmp_path, BASE_CONFIG) as svc:

        def head(path: str, *args: str) -> str:
            r = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-D", "-", *args, svc.url(path)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return r.stdout.lower()

        text = subprocess.run(["curl", "-s", svc.url("/")], capture_output=True, text=True).stdout
        assert text.startswith("ringstream:")  # curl keeps the text index
        page = head("/", "-H", "Accept: text/html", "-H", "Accept-Encoding: gzip")
        assert "content-type: text/html" in page and "content-encoding: gzip" in page
        assert "cache-control: no-cache" in page and "content-security-policy:" in page
        html = subprocess.run(
            ["curl", "-s", "-H", "Accept: text/html", svc.url("/")], capture_output=True, text=True
        ).stdout
        assert "http" not in html.replace("http-equiv", "")  # no CDN: every asset from here
        js = head("/static/app.js", "-H", "Accept-Encoding: gzip")
        assert "content-encoding: gzip" in js and "immutable" in js
        assert "200" in head("/static/vendor/uPlot.iife.min.js").split("\n")[0]
        assert "404" in head("/static/nope.js").split("\n")[0]


def test_under_a_base_path_the_page_and_every_endpoint_move_with_it(tmp_path: Path) -> None:
    """server.base_path, for a reverse proxy that passes its prefix on."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium (Debian package chromium) is needed: scripts/setup --test"
    config = CONFIG + '\n[server]\nbase_path = "/rs"\n'
    with Service(tmp_path, config) as svc, sync_playwright() as pw:

        def code(path: str, *args: str) -> str:
            r = subprocess.run(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{redirect_url}",
                    *args,
                    svc.url(path),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return r.stdout.strip()

        assert code("/rs/healthz") == "200"
        assert code("/rs/query") == "200"
        assert code("/rs/events", "-I") == "200"
        assert code("/healthz") == "404" and code("/events", "-I") == "404"
        assert code("/rs") == f"308 {svc.url('/rs/')}"
        assert code("/rs/static/app.js") == "200"
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(svc.url("/rs/"))
            wait(page, "records", "() => window.ringstream.ids().length >= 5")
            wait(page, "the gauge", "() => document.querySelector('#ring-size') !== null")
        finally:
            browser.close()
        assert errors == []
        assert svc.errors() == []


def test_over_sse_the_page_resumes_and_marks_what_history_no_longer_has(tmp_path: Path) -> None:
    """?transport=sse: the page streams over EventSource. A short pause
    resumes from history with nothing lost; a pause longer than the history
    holds shows a gap row saying where the records went missing."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium (Debian package chromium) is needed: scripts/setup --test"
    config = CONFIG.replace("[subscribers]", "[subscribers]\nhistory_records = 300")
    assert "history_records = 300" in config
    with Service(tmp_path, config) as svc, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

        def advance(n: int) -> None:
            submitted = get_json(svc.url("/query"))["submitted"]
            deadline = time.monotonic() + 60
            while get_json(svc.url("/query"))["submitted"] < submitted + n:
                assert time.monotonic() < deadline
                time.sleep(0.1)

        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(svc.url("/?type=synthetic&transport=sse"))
            assert page.input_value("#transport") == "sse"
            wait(page, "records", "() => window.ringstream.ids().length >= 20")
            assert page.evaluate("() => window.ringstream.state.conn instanceof EventSource")
            subs = parse_metrics(http_get(svc.url("/metrics"))[1].decode())
            assert subs['ringstream_subscribers{transport="sse"}'] == 1
            assert subs['ringstream_subscribers{transport="ws"}'] == 0
            # a short pause: history has every record missed
            page.click("#pause")
            n = len(page.evaluate("() => window.ringstream.ids()"))
            advance(50)
            page.click("#pause")
            wait(
                page, "records after the pause", f"() => window.ringstream.ids().length >= {n + 40}"
            )
            recs = page.evaluate("() => window.ringstream.records()")
            assert [r for r in recs if r["type"] == "gap"] == []
            seqs = [r["seq"] for r in recs if r["worker"] == 0]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            # a long pause: beyond the 300 records of history, a gap row
            page.click("#pause")
            last = page.evaluate("() => window.ringstream.state.last")
            advance(2000)
            page.click("#pause")
            wait(page, "the gap", "() => window.ringstream.records().some(r => r.type === 'gap')")
            wait(
                page, "records after it", "() => window.ringstream.records().at(-1).type !== 'gap'"
            )
            recs = page.evaluate("() => window.ringstream.records()")
            gaps = [i for i, r in enumerate(recs) if r["type"] == "gap"]
            assert len(gaps) == 1
            gap = recs[gaps[0]]
            assert gap["reason"] == "history" and gap["after_id"] == last
            assert recs[gaps[0] + 1]["id"] == gap["next_id"] > last + 300
            # and the page shows it as a row of its own
            page.click("#pause")
            page.evaluate(
                f"() => {{ document.querySelector('#viewport').scrollTop = {gaps[0]} * 22 - 100; }}"
            )
            row = page.locator("#rows .row.gap")
            row.wait_for(timeout=30_000)
            assert f"after_id={last}" in row.inner_text()
        finally:
            browser.close()
        assert errors == []
        assert svc.errors() == []


def test_the_page_comes_back_after_a_restart_and_never_streams_twice(tmp_path: Path) -> None:
    """Over WebSocket: the service stops and starts again on its port; the
    page reconnects by itself, with the restart's gap row. Two submits at
    once open one stream, not two (no id twice). An ingested record typed
    "end" is a record like any other."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium (Debian package chromium) is needed: scripts/setup --test"
    port = str(free_port())
    config = CONFIG + "\n[ingest]\nenabled = true\n"
    first = Service(tmp_path, config, "--port", port)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(first.url("/"))
            wait(page, "records", "() => window.ringstream.ids().length >= 20")
            # two submits before the first has connected
            page.evaluate(
                "() => { const f = document.querySelector('#filter-form');"
                " f.requestSubmit(); f.requestSubmit(); }"
            )
            wait(page, "records again", "() => window.ringstream.ids().length >= 100")
            ids = page.evaluate("() => window.ringstream.ids()")
            assert len(ids) == len(set(ids)), "a record shown twice"
            subs = parse_metrics(http_get(first.url("/metrics"))[1].decode())
            assert subs['ringstream_subscribers{transport="ws"}'] == 1
            r = subprocess.run(
                ["curl", "-s", "-d", '{"type": "end", "reason": "data"}', first.url("/ingest")],
                capture_output=True,
                timeout=30,
            )
            assert b'"accepted":1' in r.stdout
            wait(
                page,
                "the end record",
                "() => window.ringstream.ids().length > 0 && "
                "window.ringstream.records().some(r => r.type === 'end' && r.reason === 'data')",
            )
            n = len(page.evaluate("() => window.ringstream.ids()"))
            wait(page, "records after it", f"() => window.ringstream.ids().length >= {n + 20}")
            # a restart on the same port: down for a while, then back
            assert first.terminate() == 0
            first.close()
            page.wait_for_function(
                "() => document.querySelector('#status').textContent !== 'live'", timeout=30_000
            )
            (tmp_path / "again").mkdir()
            with Service(tmp_path / "again", config, "--port", port) as second:
                wait(
                    page,
                    "the restart's gap",
                    "() => window.ringstream.records()"
                    ".some(r => r.type === 'gap' && r.reason === 'restart')",
                )
                n = len(page.evaluate("() => window.ringstream.ids()"))
                wait(
                    page,
                    "the new run's records",
                    f"() => window.ringstream.ids().length >= {n + 20}",
                )
                assert page.inner_text("#status") == "live"
                assert second.errors() == []
        finally:
            browser.close()
            first.close()
    assert errors == []


def test_resume_header_wins_redirects_keep_filters_and_caches_vary(tmp_path: Path) -> None:
    """What a reverse proxy, a cache and a reconnecting EventSource need:
    Last-Event-ID wins over the URL's own position (EventSource reconnects
    to its first URL); /base?filter redirects with its filter; / varies by
    Accept, and each encoding has its own ETag; cookies stay under base."""
    token = "rs_" + "c" * 40
    digest = hashlib.sha256(token.encode()).hexdigest()
    (tmp_path / "tokens.toml").write_text(f'[[token]]\nname = "c"\nsha256 = "{digest}"\n')
    config = CONFIG + (
        '\n[server]\nbase_path = "/rs"\n'
        f'[auth]\nmode = "token"\ntokens_file = "{tmp_path}/tokens.toml"\n'
    )
    with Service(tmp_path, config) as svc:
        auth = ("-H", f"Authorization: Bearer {token}")

        def curl(*args: str) -> str:
            r = subprocess.run(["curl", "-s", *args], capture_output=True, text=True, timeout=30)
            return r.stdout

        ids = [
            orjson.loads(x)["id"]
            for x in curl(*auth, "-m", "3", svc.url("/rs/events?from=0")).splitlines()
            if x.startswith("{")
        ]
        assert len(ids) > 10
        got = curl(
            *auth,
            "-m",
            "2",
            "-H",
            f"Last-Event-ID: {ids[5]}",
            svc.url(f"/rs/events?last_event_id={ids[1]}"),
        ).splitlines()
        assert orjson.loads(got[0])["id"] == ids[6]
        head = curl("-o", "/dev/null", "-D", "-", svc.url("/rs?type=synthetic&transport=sse"))
        assert "location: /rs/?type=synthetic&transport=sse" in head.lower()
        text = curl("-D", "-", svc.url("/rs/")).lower()
        assert "vary: accept" in text
        html = curl("-o", "/dev/null", "-D", "-", "-H", "Accept: text/html", svc.url("/rs/"))
        gz = curl(
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-H",
            "Accept: text/html",
            "-H",
            "Accept-Encoding: gzip",
            svc.url("/rs/"),
        )
        tag = [x for x in html.lower().splitlines() if x.startswith("etag:")]
        gztag = [x for x in gz.lower().splitlines() if x.startswith("etag:")]
        assert tag and gztag and tag != gztag
        assert "vary: accept, accept-encoding" in html.lower()
        login = curl("-o", "/dev/null", "-D", "-", "-d", f"token={token}", svc.url("/rs/login"))
        assert "path=/rs/" in login.lower()
        assert svc.errors() == []
