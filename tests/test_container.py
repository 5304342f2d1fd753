"""The container image (Dockerfile), built and run for real with podman.

The image is built on localhost/python-base:3.11, a local Debian base with
Python 3.11 (no Docker Hub here), and run as the README's `docker run` line
runs it: events stream at once over curl, /metrics scrapes, SIGTERM (podman
stop) drains and exits 0 with the streams ended cleanly, and a ring too big
for /dev/shm stops the start with exit status 2 naming --shm-size.

podman and the base image come from ../shared/tools/container-setup.sh
(idempotent; about 2 minutes the first time), which this test runs itself;
it is skipped only where that script does not exist.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from servicectl import http_get

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"
SETUP = TOOLS / "container-setup.sh"
PODMAN = TOOLS / "podman.sh"
BASE_IMAGE = "localhost/python-base:3.11"
TAG = "localhost/ringstream:test"
DEFAULT_RING_SIZE = 16 << 20  # ring.size in config/default.toml

# a line podman itself writes to stderr (logrus format)
PODMAN_MESSAGE = re.compile(r'time="[^"]*" level=\w+ msg=')

# Upper bounds that only turn a hang into a failure; nothing is timed.
SETUP_TIMEOUT = 900
BUILD_TIMEOUT = 900
WAIT = 60


class Lines:
    """The lines of a process's stream, collected by a thread as they come."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait(self, done: Callable[[list[str]], bool], what: str, timeout: float = WAIT) -> None:
        """Block until done(lines) is true; fail if the stream ends first or at the timeout."""
        with self._cond:
            ok = self._cond.wait_for(lambda: done(self.lines) or self.ended, timeout)
            if not ok or not done(self.lines):
                state = "the stream ended" if self.ended else f"{timeout}s passed"
                raise AssertionError(f"{state} before {what}; got:\n" + "\n".join(self.lines))

    def wait_end(self, timeout: float = WAIT) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: self.ended, timeout), "stream did not end"
        self._thread.join()
        return list(self.lines)


def json_lines(lines: list[str]) -> list[Any]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(None)
    return out


def has_event(event: str) -> Callable[[list[str]], bool]:
    return lambda lines: any(
        isinstance(e, dict) and e.get("event") == event for e in json_lines(lines)
    )


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(PODMAN), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
    return r


class Container:
    """`podman run --rm IMAGE` in the foreground: its exit status is the container's."""

    def __init__(self, image: str, *args: str) -> None:
        self.name = f"ringstream-test-{uuid.uuid4().hex[:12]}"
        self.proc = subprocess.Popen(
            [str(PODMAN), "run", "--rm", "--name", self.name, *args, image],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout = Lines(self.proc.stdout)
        self.log = Lines(self.proc.stderr)  # the service logs JSON lines on stderr

    def url(self, path: str) -> str:
        out = podman("port", self.name, "8080/tcp").stdout.split()
        return f"http://{out[0]}{path}"

    def exec(self, *cmd: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *cmd, check=False)

    def exit_status(self) -> int:
        return self.proc.wait(timeout=WAIT)

    def close(self) -> None:
        if self.proc.poll() is None:
            podman("rm", "--force", "--time", "0", self.name, check=False)
            self.proc.kill()
            self.proc.wait()


def wait_healthy(url: str) -> bytes:
    """GET url until it answers 200; the deadline is only an upper bound."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            status, body = http_get(url)
            if status == 200:
                return body
            problem = f"status {status}: {body!r}"
        except (urllib.error.URLError, ConnectionError) as e:
            problem = repr(e)
        assert time.monotonic() < deadline, f"{url} not healthy: {problem}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not SETUP.exists():
        pytest.skip(f"{SETUP} does not exist: no container tooling on this machine")
    t0 = time.monotonic()
    r = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    assert r.returncode == 0, f"{SETUP} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    t1 = time.monotonic()
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    build = podman(
        "build",
        "--format=docker",  # OCI images drop HEALTHCHECK
        f"--build-arg=PYTHON_IMAGE={BASE_IMAGE}",
        f"--iidfile={iidfile}",
        f"--tag={TAG}",
        str(ROOT),
        timeout=BUILD_TIMEOUT,
    )
    image_id = iidfile.read_text().strip()
    assert image_id, build.stdout + build.stderr
    size = int(podman("image", "inspect", "--format={{.Size}}", image_id).stdout)
    base = int(podman("image", "inspect", "--format={{.Size}}", BASE_IMAGE).stdout)
    print(
        f"\ncontainer-setup {t1 - t0:.1f}s, build {time.monotonic() - t1:.1f}s; image {TAG} "
        f"{size / 1e6:.1f} MB ({(size - base) / 1e6:.1f} MB over {BASE_IMAGE}, "
        f"{base / 1e6:.1f} MB)"
    )
    yield image_id


def test_image_config(image: str) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] not in ("", "0", "root", "root:root")
    assert cfg["Entrypoint"][:3] == ["/usr/bin/tini", "-g", "--"]
    assert "8080/tcp" in cfg["ExposedPorts"]
    # podman shows the image's HEALTHCHECK next to Config, not in it
    test = info["Healthcheck"]["Test"]
    assert "/healthz" in " ".join(test) and "curl" not in " ".join(test)


def test_serve_stream_metrics_and_sigterm(image: str) -> None:
    c = Container(image, "--shm-size=256m", "--publish=127.0.0.1::8080")
    curl = None
    try:
        c.log.wait(has_event("start"), "the service's start log line")
        start = next(e for e in json_lines(c.log.lines) if e and e.get("event") == "start")
        assert start["ring_size"] == DEFAULT_RING_SIZE
        assert start["ring_memory"] == "/dev/shm"
        assert start["host"] == "0.0.0.0"  # the image's RINGSTREAM_SERVER_HOST
        # no capabilities given: the exec source says why it is not on BPF
        assert start["exec_method"] == "proc"
        (fallback,) = [
            e for e in json_lines(c.log.lines) if e and e.get("event") == "exec_method_fallback"
        ]
        assert fallback["level"] == "warning" and "CAP_BPF" in fallback["msg"]
        assert json.loads(wait_healthy(c.url("/healthz"))) == {"status": "ok"}
        assert http_get(c.url("/readyz"))[0] == 200

        # runs as a user, and the runtime image has no compiler
        uid = c.exec("id", "-u")
        assert uid.returncode == 0 and uid.stdout.strip() != "0", uid
        cc = c.exec("sh", "-c", "command -v gcc cc || true")
        assert cc.returncode == 0 and cc.stdout.strip() == "", cc
        # the image's HEALTHCHECK command (python, no curl) passes
        hc = podman("healthcheck", "run", c.name, check=False)
        assert hc.returncode == 0, hc

        curl = subprocess.Popen(
            ["curl", "-N", "-sS", c.url("/events")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert curl.stdout is not None
        events = Lines(curl.stdout)
        events.wait(lambda lines: len(lines) >= 3, "3 records over curl -N /events")
        records = json_lines(events.lines[:3])
        for rec in records:
            assert isinstance(rec, dict), events.lines
            assert isinstance(rec["id"], int) and isinstance(rec["ts_ns"], int)
            assert isinstance(rec["type"], str)
        ids = [r["id"] for r in records]
        assert ids == sorted(set(ids))

        status, body = http_get(c.url("/metrics"))
        assert status == 200
        sizes = [
            float(line.split()[1])
            for line in body.decode().splitlines()
            if line.startswith("ringstream_ring_size_bytes ")
        ]
        assert sizes == [DEFAULT_RING_SIZE], body.decode()

        # docker stop: SIGTERM to tini, forwarded to the process group
        podman("stop", "--time=10", c.name, timeout=WAIT)
        assert c.exit_status() == 0, "\n".join(c.log.wait_end())
        assert curl.wait(timeout=WAIT) == 0, curl.stderr.read() if curl.stderr else ""
        streamed = events.wait_end()
        assert all(isinstance(r, dict) for r in json_lines(streamed)), streamed
        # podman's own messages share the stream (here: no systemd for a
        # healthcheck timer); the rest is the container's
        log = [line for line in c.log.wait_end() if not PODMAN_MESSAGE.match(line)]
        entries = json_lines(log)
        stop = [e for e in entries if e and e.get("event") == "stop"]
        assert len(stop) == 1, log
        # nothing but JSON log lines (a worker traceback on SIGTERM would show
        # here), no errors, and no worker restarted while stopping
        assert all(isinstance(e, dict) for e in entries), log
        assert not [e for e in entries if e["level"] in ("error", "critical")], log
        assert not [e for e in entries if e.get("event") == "worker_restart"], log
    finally:
        if curl is not None and curl.poll() is None:
            curl.kill()
            curl.wait()
        c.close()


BPF_CAPS = ("--cap-add=BPF", "--cap-add=PERFMON", "--security-opt=seccomp=unconfined")


def test_exec_events_on_bpf_with_the_capabilities(image: str) -> None:
    """The README's docker run line for the BPF method: processes started inside
    the container show up with their exact exit codes."""
    c = Container(
        image, *BPF_CAPS, "--env=RINGSTREAM_SOURCES_0_METHOD=bpf", "--publish=127.0.0.1::8080"
    )
    curl = None
    try:
        c.log.wait(has_event("start"), "the service's start log line")
        start = next(e for e in json_lines(c.log.lines) if e and e.get("event") == "start")
        assert start["exec_method"] == "bpf", c.log.lines
        wait_healthy(c.url("/healthz"))
        curl = subprocess.Popen(
            ["curl", "-N", "-sS", c.url("/events?type=exec,exit")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert curl.stdout is not None
        events = Lines(curl.stdout)
        marks = {f"INSIDE-{uuid.uuid4().hex[:8]}-{k}": k for k in (0, 3, 42)}
        for mark, k in marks.items():
            assert c.exec("sh", "-c", f"exit {k}", mark).returncode == k

        def exits(lines: list[str]) -> dict[str, int]:
            recs = [r for r in json_lines(lines) if isinstance(r, dict)]
            execs = {
                r["exec_id"]: r["cmdline"].split()[-1]
                for r in recs
                if r["type"] == "exec"
                and r["cmdline"].split()[-1:]
                and r["cmdline"].split()[-1] in marks
            }
            return {
                execs[r["exec_id"]]: r["exit_code"]
                for r in recs
                if r["type"] == "exit" and r["exec_id"] in execs
            }

        events.wait(lambda lines: len(exits(lines)) == len(marks), "the exit records")
        assert exits(events.lines) == marks
        podman("stop", "--time=10", c.name, timeout=WAIT)
        assert c.exit_status() == 0, "\n".join(c.log.wait_end())
    finally:
        if curl is not None and curl.poll() is None:
            curl.kill()
            curl.wait()
        c.close()


def test_bpf_method_under_the_default_seccomp_profile_exits_2_saying_so(image: str) -> None:
    r = podman(
        "run", "--rm", "--cap-add=BPF", "--cap-add=PERFMON",
        "--env=RINGSTREAM_SOURCES_0_METHOD=bpf", image, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "seccomp" in r.stderr and "EPERM" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("shm_size", "ring_size", "ring_bytes"),
    [("8m", "16MiB", 16 << 20), (None, "256MiB", 256 << 20)],  # None: the default 64m
)
def test_ring_too_big_for_shm_exits_2_naming_shm_size(
    image: str, shm_size: str | None, ring_size: str, ring_bytes: int
) -> None:
    shm = [f"--shm-size={shm_size}"] if shm_size else []
    r = podman("run", "--rm", *shm, f"--env=RINGSTREAM_RING_SIZE={ring_size}", image, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "/dev/shm" in r.stderr, r.stderr
    m = re.search(r"--shm-size=(\d+)m\b", r.stderr)
    assert m, r.stderr
    suggested = m.group(1)
    assert int(suggested) << 20 > ring_bytes, r.stderr

    # the size the message names is enough
    c = Container(image, f"--shm-size={suggested}m", f"--env=RINGSTREAM_RING_SIZE={ring_size}")
    try:
        c.log.wait(has_event("start"), f"start with --shm-size={suggested}m")
        podman("stop", "--time=10", c.name, timeout=WAIT)
        assert c.exit_status() == 0, "\n".join(c.log.wait_end())
    finally:
        c.close()
