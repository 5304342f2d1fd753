"""`ringstream tail` and `ringstream top` (issue 14) against the real service:
in a real terminal (tmux: send-keys, capture-pane), and tail through a pipe
across a restart of the service."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from authkeys import new_token
from servicectl import BASE_CONFIG, ROOT, Service, free_port, get_json

TWO_WORKERS = (
    BASE_CONFIG.replace("count = 1", "count = 2")
    + """
[[sources]]
kind = "synthetic"
rate = 200
size = 64
instances = 2
"""
)
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
_sessions = itertools.count()


class Pane:
    """A tmux session on a private server, running one command."""

    def __init__(self, server: str, command: list[str], width: int = 160, height: int = 50) -> None:
        self.server = server
        self.name = f"t{next(_sessions)}"
        line = " ".join(shlex.quote(c) for c in command)
        # the status stays on screen after the command exits
        script = f"{line}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), script)

    def tmux(self, *args: str) -> str:
        r = subprocess.run(
            ["tmux", "-L", self.server, *args], capture_output=True, text=True, env=ENV, timeout=30
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def wait(self, what: str, ok: Callable[[str], bool], timeout: float = 60) -> str:
        """Poll the screen until `ok` holds (the deadline only guards a hang)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if ok(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.1)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)


@pytest.fixture
def tmux() -> Iterator[str]:
    server = f"ringstream-test-{os.getpid()}"
    yield server
    subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True, env=ENV)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "service", *args]


def test_tail_on_a_terminal_follows_filters_and_quits_on_ctrl_c(tmp_path: Path, tmux: str) -> None:
    with Service(tmp_path, TWO_WORKERS) as svc:
        url = svc.url("")
        pane = Pane(
            tmux, cli("tail", url, "--type", "synthetic", "--field", "worker=1", "-o", "seq,worker")
        )

        def seqs(text: str) -> list[int]:
            return [int(m) for m in re.findall(r"synthetic seq=(\d+) worker=1", text)]

        first = pane.wait("three records", lambda t: len(seqs(t)) >= 3)
        assert "worker=0" not in first
        # one line per record, in order, with only the fields asked for
        assert seqs(first) == sorted(seqs(first))
        assert "level=" not in first
        newest = max(seqs(first))
        pane.wait("it to follow", lambda t: max(seqs(t), default=-1) > newest)
        pane.keys("C-c")
        pane.wait("exit 0", lambda t: "EXIT=0" in t)


def test_tail_pipes_json_and_resumes_across_a_restart(tmp_path: Path) -> None:
    port = str(free_port())
    first = Service(tmp_path, TWO_WORKERS, "--port", port)
    proc = subprocess.Popen(
        cli("tail", f"127.0.0.1:{port}", "--type", "synthetic"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None
    try:
        epoch = get_json(first.url("/query"))["epoch"]
        before = [orjson.loads(proc.stdout.readline()) for _ in range(5)]
        assert all(r["type"] == "synthetic" for r in before)
        first.proc.kill()  # no drain, no clean end: a crash
        first.proc.wait()
        first.close()
        (tmp_path / "again").mkdir()
        with Service(tmp_path / "again", TWO_WORKERS, "--port", port) as second:
            # what tail printed until the crash, then the restart's marker
            lines = []
            while not lines or lines[-1].get("type") != "gap":
                lines.append(orjson.loads(proc.stdout.readline()))
            gap = lines[-1]
            got = before + lines[:-1]
            assert gap["reason"] == "restart" and gap["after_epoch"] == epoch
            assert gap["after_id"] == got[-1]["id"]
            after = orjson.loads(proc.stdout.readline())
            assert after["type"] == "synthetic"
            assert second.terminate() == 0  # the server ends the stream: tail exits 0
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "reconnecting in" in err and "connected again" in err
        assert "the server ended the stream" in err
    finally:
        if proc.poll() is None:
            proc.kill()
        first.close()


def test_tail_exits_2_on_a_bad_filter_and_4_without_its_token(tmp_path: Path) -> None:
    token, entry = new_token(tmp_path, "reader")
    (tmp_path / "tokens.toml").write_text(entry)
    (tmp_path / "token").write_text(token + "\n")
    config = TWO_WORKERS + f'\n[auth]\nmode = "token"\ntokens_file = "{tmp_path}/tokens.toml"\n'
    with Service(tmp_path, config) as svc:
        url = svc.url("")
        r = subprocess.run(cli("tail", url), capture_output=True, text=True, env=ENV, timeout=60)
        assert r.returncode == 4 and "401" in r.stderr and "bearer token is required" in r.stderr
        r = subprocess.run(
            cli("tail", url, "--token-file", str(tmp_path / "token"), "--sample", "0"),
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert r.returncode == 2 and "sample: must be an integer" in r.stderr
        with subprocess.Popen(
            cli("tail", url, "--type", "synthetic"),
            stdout=subprocess.PIPE,
            env={**ENV, "RINGSTREAM_TOKEN": token},
        ) as proc:
            assert proc.stdout is not None
            assert orjson.loads(proc.stdout.readline())["type"] == "synthetic"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        assert token not in "\n".join(svc.lines)


def test_top_draws_the_service_refreshes_and_quits_on_q(tmp_path: Path, tmux: str) -> None:
    with Service(tmp_path, TWO_WORKERS) as svc:
        reader = subprocess.Popen(["curl", "-sN", svc.url("/events")], stdout=subprocess.DEVNULL)
        try:
            svc.wait_log("subscriber_connect")
            epoch = get_json(svc.url("/query"))["epoch"]
            pane = Pane(tmux, cli("top", svc.url("")))
            text = pane.wait("the first frame", lambda t: "user ring" in t and "ndjson" in t)
            assert f"epoch {epoch}" in text and "ready" in text
            assert "1.0 MiB" in text  # ring.size of the test config, as /query has it
            assert re.search(r"ndjson\s*│\s*1\s*│", text), text  # the curl subscriber
            assert re.search(r"synthetic\s*│\s*0\s*│", text), text  # its workers, no restart
            clock = re.search(r"\d\d:\d\d:\d\d", text)
            assert clock
            pane.wait("a refresh", lambda t: clock.group() not in t.splitlines()[0])
            pane.keys("q")
            pane.wait("exit 0", lambda t: "EXIT=0" in t)
        finally:
            reader.kill()
            reader.wait()


def test_tail_takes_a_record_typed_end_huge_records_and_escapes_controls(tmp_path: Path) -> None:
    """A record is data whatever its type: an ingested {"type": "end"} does
    not end tail. A record past aiohttp's line limit (here 700 KB) comes
    whole. The coloured view shows a value's control characters escaped."""
    import io

    from rich.console import Console

    from service.term.tail import PrettyOut

    config = BASE_CONFIG + '\n[ingest]\nenabled = true\nmax_body = "2MiB"\n'
    config = config.replace('size = "1MiB"', 'size = "4MiB"')
    with Service(tmp_path, config) as svc:
        proc = subprocess.Popen(
            cli("tail", f"127.0.0.1:{svc.port}", "--type", "end,big,after"),
            stdout=subprocess.PIPE,
            env=ENV,
        )
        assert proc.stdout is not None
        try:

            def ingest(rec: dict[str, object]) -> None:
                r = subprocess.run(
                    [
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--data-binary",
                        "@-",
                        svc.url("/ingest"),
                    ],
                    input=orjson.dumps(rec),
                    capture_output=True,
                    timeout=30,
                )
                assert r.stdout == b"200", r.stdout

            wait_for_tail = time.monotonic() + 30
            while not [e for e in svc.logs if e.get("event") == "subscriber_connect"]:
                assert time.monotonic() < wait_for_tail, svc.tail()
                time.sleep(0.05)
            ingest({"type": "end", "reason": "not really"})
            ingest({"type": "big", "blob": "x" * 700_000})
            ingest({"type": "after", "n": 1})
            got = [orjson.loads(proc.stdout.readline()) for _ in range(3)]
            assert [r["type"] for r in got] == ["end", "big", "after"]
            assert len(got[1]["blob"]) == 700_000
            assert proc.poll() is None  # still following
        finally:
            proc.kill()
            proc.wait()
    buf = io.StringIO()
    out = PrettyOut(Console(file=buf, force_terminal=True, width=200), ["comm"])
    out.record(b"", {"id": 1, "type": "exec", "comm": "\x1b]0;PWNED\x07\x1b[31m"})
    text = buf.getvalue()
    assert "\x1b]0;" not in text and "\\x1b]0;PWNED\\x07\\x1b[31m" in text
