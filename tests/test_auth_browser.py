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
