"""Run the real service as a subprocess for end-to-end tests.

`ringstream serve` is started with --port 0; the port is read from its
"started" log line (JSON on stderr), so tests never race for a free port.
Every stderr line is kept, parsed, for assertions on the structured logs.
"""

from __future__ import annotations

import base64
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"

# a small, quiet base: tests add the sources they need
BASE_CONFIG = """
[ring]
size = "1MiB"
shm_dir = "memfd"
abandon_timeout = 0.5

[workers]
count = 1
backoff_initial = 0.05
backoff_max = 0.2

[subscribers]
heartbeat = 1.0
"""


def plugin_source(count: int, *, then: str = "idle", worker: int = 0, label: str = "test") -> str:
    return f"""
[[sources]]
kind = "plugin"
target = "rs_testplugin:emit"
options = {{ count = {count}, then = "{then}", worker = {worker}, label = "{label}" }}
"""


class Service:
    def __init__(
        self,
        tmp_path: Path,
        config: str,
        *args: str,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        wrap: tuple[str, ...] = (),
    ) -> None:
        """`wrap` runs the service under a command, e.g. ("setpriv", ...)."""
        self.config_path = tmp_path / "ringstream.toml"
        self.config_path.write_text(config)
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(ROOT)]),
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [
                *wrap,
                sys.executable,
                "-m",
                "service",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=tmp_path,
        )
        self.lines: list[str] = []
        self.logs: list[dict[str, Any]] = []
        self._new: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        if wait_ready:
            start = self.wait_log("start", timeout=60)
            self.port = int(start["port"])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                self.logs.append(entry)
                self._new.put(entry)
        self._new.put(None)

    def wait_log(self, event: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        """The first log entry with this event (and these keys), waiting for it."""
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.logs[seen:]:
                if entry.get("event") == event and all(entry.get(k) == v for k, v in match.items()):
                    return entry
            seen = len(self.logs)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {event!r} log line; stderr ends:\n" + self.tail())
            try:
                if self._new.get(timeout=left) is None:
                    self._reader.join()
                    for entry in self.logs[seen:]:
                        if entry.get("event") == event:
                            return entry
                    raise AssertionError(
                        f"service exited ({self.proc.wait()}) before {event!r}; stderr ends:\n"
                        + self.tail()
                    )
            except queue.Empty:
                pass

    def tail(self, lines: int = 60) -> str:
        """The last lines of stderr: enough for the cause, short enough to read."""
        return "\n".join(self.lines[-lines:])

    def errors(self) -> list[str]:
        """Log lines at error level or above, and anything not JSON (tracebacks)."""
        bad = []
        for line in self.lines:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                bad.append(line)
                continue
            if not isinstance(entry, dict) or entry.get("level") in ("error", "critical"):
                bad.append(line)
        return bad

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the service and wait for it (the timeout only guards against a hang)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reader.join(timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {series: value}, the series with its labels."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    wrap: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`ringstream ARGS` to completion (for commands that exit by themselves)."""
    return subprocess.run(
        [*wrap, sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd,
        timeout=120,
    )


def stalled_socket(port: int, path: str, *, ws: bool = False) -> socket.socket:
    """A client that sends its GET (a WebSocket upgrade with `ws`) and then
    reads nothing: a 4 KiB receive buffer, set before connect so that the
    window it offers stays small; the service's writes to it soon block."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if ws:
        key = base64.b64encode(os.urandom(16)).decode()
        head += (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
    s.sendall((head + "\r\n").encode())
    return s


def free_port() -> int:
    """A port free now (a test that needs the same port twice: a restart)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    status, body = http_get(url)
    assert status == 200, (url, status, body[:200])
    return orjson.loads(body)
