"""The browser's way in (issue 15): a real headless Chromium, driven by
Playwright, is refused without a token, logs in with POST /login, and then
streams with EventSource and a browser WebSocket over the HttpOnly cookie,
which its own scripts cannot read."""

from __future__ import annotations

import shutil
from pathlib import Path

from authkeys import new_token
from servicectl import BASE_CONFIG, Service

CHROMIUM = shutil.which("chromium")

SOURCES = """
[[sources]]
kind = "synthetic"
rate = 2000
size = 64
"""

REFUSED = """() => new Promise(resolve => {
    const es = new EventSource('/events');
    es.onmessage = () => { es.close(); resolve('open'); };
    es.onerror = () => { es.close(); resolve('refused'); };
})"""

LOGGED_IN = """async (token) => {
    const login = await fetch('/login', {method: 'POST', body: new URLSearchParams({token})});
    const sse = await new Promise((resolve, reject) => {
        const es = new EventSource('/events');
        const got = [];
        es.onmessage = e => {
            got.push(JSON.parse(e.data));
            if (got.length === 5) { es.close(); resolve({got, id: e.lastEventId}); }
        };
        es.onerror = () => { es.close(); reject(new Error('EventSource failed')); };
    });
    const ws = await new Promise((resolve, reject) => {
        const s = new WebSocket(location.origin.replace('http', 'ws') + '/ws');
        s.onmessage = e => { s.close(); resolve(JSON.parse(e.data)); };
        s.onerror = () => reject(new Error('WebSocket failed'));
    });
    return {login: login.status, cookie: document.cookie, sse, ws};
}"""


def test_a_browser_logs_in_and_streams_over_the_cookie(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium (Debian package chromium) is needed: scripts/setup --test"
    token, entry = new_token(tmp_path, "browser", "--type", "synthetic")
    (tmp_path / "tokens.toml").write_text(entry)
    config = BASE_CONFIG + f'\n[auth]\nmode = "token"\ntokens_file = "{tmp_path}/tokens.toml"\n'
    with Service(tmp_path, config + SOURCES) as svc, sync_playwright() as pw:
        # root in CI: Chromium's sandbox needs user namespaces it may not get
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(svc.url("/"))
            assert page.evaluate(REFUSED) == "refused"
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            got = page.evaluate(LOGGED_IN, token)
            page.screenshot(path=str(tmp_path / "browser.png"))
        finally:
            browser.close()
        assert got["login"] == 200
        assert got["cookie"] == ""  # HttpOnly: the page's scripts never see the token
        assert [r["type"] for r in got["sse"]["got"]] == ["synthetic"] * 5
        assert got["sse"]["id"].endswith(f"-{got['sse']['got'][-1]['id']}")
        assert got["ws"]["type"] == "synthetic"
        assert errors == []
        svc.wait_log("auth_login", token="browser")
        assert token not in "\n".join(svc.lines)


def test_the_page_logs_in_and_charts_metrics_behind_their_own_token(tmp_path: Path) -> None:
    """The page with auth on and a metrics token: its login form takes the
    reader's token, then a second form the metrics token, each into an
    HttpOnly cookie; the charts then fill from /metrics."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium (Debian package chromium) is needed: scripts/setup --test"
    token, entry = new_token(tmp_path, "reader", "--type", "synthetic")
    mtoken, mentry = new_token(tmp_path, "metrics")
    (tmp_path / "tokens.toml").write_text(entry)
    mhash = mentry.split('sha256 = "')[1].split('"')[0]
    config = BASE_CONFIG + (
        f'\n[auth]\nmode = "token"\ntokens_file = "{tmp_path}/tokens.toml"\n'
        f'metrics_token = "sha256:{mhash}"\n'
    )
    with Service(tmp_path, config + SOURCES) as svc, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(svc.url("/"))
            page.locator("#login").wait_for(state="visible", timeout=30_000)
            page.fill("#token", token)
            page.press("#token", "Enter")
            page.wait_for_function("() => window.ringstream.ids().length >= 5", timeout=60_000)
            page.locator("#metrics-login").wait_for(state="visible", timeout=30_000)
            assert page.evaluate("() => window.ringstream.state.prev") is None  # no charts yet
            page.fill("#metrics-token", "rs_not_it")
            page.press("#metrics-token", "Enter")
            page.wait_for_function(
                "() => document.querySelector('#error').textContent === 'metrics token refused'",
                timeout=30_000,
            )
            page.fill("#metrics-token", mtoken)
            page.press("#metrics-token", "Enter")
            page.wait_for_function(
                "() => window.ringstream.state.prev !== null"
                " && window.ringstream.state.series.rates.data[0].length >= 2",
                timeout=60_000,
            )
            assert page.locator("#metrics-login").is_hidden()
            assert "synthetic" in page.inner_text("#sources")
            assert page.evaluate("() => document.cookie") == ""
        finally:
            browser.close()
        svc.wait_log("auth_login", token="metrics")
        assert mtoken not in "\n".join(svc.lines) and token not in "\n".join(svc.lines)
        assert svc.errors() == []
