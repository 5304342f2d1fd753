"""End to end, the service under pressure: slow subscribers, crashing workers,
SIGTERM, bad configuration, a ring that does not fit, the exec source."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import rs_testplugin
from servicectl import (
    BASE_CONFIG,
    Service,
    http_get,
    plugin_source,
    rss_bytes,
    run_cli,
    stalled_socket,
)

import ringcore


def metric(svc: Service, name: str) -> float:
    body = subprocess.run(
        ["curl", "-s", svc.url("/metrics")], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


class StalledClient:
    """A client that asks for the stream and then reads nothing: its socket
    buffers fill and the service's writes to it block."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = stalled_socket(port, path)

    def read_all(self) -> bytes:
        chunks = []
        self.sock.settimeout(30)
        while chunk := self.sock.recv(1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)


def ndjson_records(response: bytes) -> list[dict]:
    """The JSON lines of a raw HTTP/1.1 response with a chunked body."""
    head, _, rest = response.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    body = bytearray()
    while True:
        assert rest, "the chunked body did not end with its last chunk: cut off"
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return [orjson.loads(line) for line in body.splitlines() if line]


def curl_all(url: str, n: int) -> list[dict]:
    proc = subprocess.Popen(["curl", "-N", "-s", "--max-time", "120", url], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out: list[dict] = []
    try:
        for line in proc.stdout:
            rec = orjson.loads(line)
            out.append(rec)
            if rec.get("seq") == n - 1:
                break
    finally:
        proc.kill()
        proc.wait()
    return out


# no worker sources: the records come from an external producer
NO_SOURCES = "sources = []\n"

SLOW = """
[consumer]
batch = 256

[subscribers]
queue_records = 1000
queue_bytes = "1MiB"
history_records = 0
heartbeat = 1.0
policy = "{policy}"
"""


def _attached_producer(svc: Service) -> ringcore.Ring:
    """A producer handle in this process, attached by name (no worker sources)."""
    return ringcore.attach(str(svc.config_path.parent / "attach.sock"))


def _write(ring: ringcore.Ring, first: int, n: int) -> None:
    for seq in range(first, first + n):
        r = rs_testplugin.record(seq)
        while not ring.output(r):
            time.sleep(0.0005)


def test_slow_subscriber_drops_oldest_with_gap_markers_and_never_slows_others(
    tmp_path: Path,
) -> None:
    n, step = 60_000, 500
    config = NO_SOURCES + BASE_CONFIG.replace("[subscribers]\nheartbeat = 1.0\n", "")
    with Service(tmp_path, config + SLOW.format(policy="drop-oldest")) as svc:
        stalled = StalledClient(svc.port, "/events")
        svc.wait_log("subscriber_connect", transport="ndjson")
        fast = subprocess.Popen(["curl", "-N", "-s", svc.url("/events")], stdout=subprocess.PIPE)
        svc.wait_log("subscriber_connect", subscriber=2)
        assert fast.stdout is not None
        ring = _attached_producer(svc)
        got = []
        # lockstep with the fast client, so only the stalled one can fall
        # behind: its queue overflows, the fast one's never does
        for first in range(0, n, step):
            _write(ring, first, step)
            for line in fast.stdout:
                got.append(orjson.loads(line))
                if len(got) == first + step:
                    break
        fast.kill()
        fast.wait()
        assert [r["seq"] for r in got] == list(range(n))  # the fast one lost nothing
        dropped = metric(svc, 'ringstream_subscriber_dropped_records_total{transport="ndjson"}')
        assert dropped > 0
        # the stalled client reads at last, while the service drains and stops
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            response = pool.submit(stalled.read_all)
            assert svc.terminate() == 0
            lines = ndjson_records(response.result())
        assert svc.errors() == []
        gaps = [r for r in lines if r["type"] == "gap"]
        records = [r for r in lines if r["type"] != "gap"]
        assert gaps and all(g["reason"] == "slow_subscriber" for g in gaps)
        # everything is accounted for: received, or dropped and said so
        assert len(records) + sum(g["dropped"] for g in gaps) == n
        assert sum(g["dropped"] for g in gaps) == dropped
        seq = [r["seq"] for r in records]
        assert seq == sorted(seq) and seq[-1] == n - 1
        for g in gaps:  # each marker sits between the ids it names
            i = lines.index(g)
            assert lines[i + 1]["id"] == g["next_id"]
            if i > 0:
                assert lines[i - 1]["id"] == g["after_id"]


def test_slow_subscriber_policy_disconnect(tmp_path: Path) -> None:
    config = NO_SOURCES + BASE_CONFIG.replace("[subscribers]\nheartbeat = 1.0\n", "")
    with Service(tmp_path, config + SLOW.format(policy="disconnect")) as svc:
        stalled = StalledClient(svc.port, "/events")
        svc.wait_log("subscriber_connect")
        ring = _attached_producer(svc)
        seq = 0
        while not any(e.get("event") == "subscriber_disconnect" for e in svc.logs):
            _write(ring, seq, 1000)
            seq += 1000
            assert seq < 10_000_000, "the stalled subscriber was never disconnected"
        gone = svc.wait_log("subscriber_disconnect")
        assert gone["reason"] == "slow" and gone["transport"] == "ndjson"
        assert metric(svc, 'ringstream_subscriber_disconnects_total{reason="slow"}') == 1
        # and the connection is gone: reading reaches its end (or a reset)
        # instead of waiting for records that will not come
        with contextlib.suppress(ConnectionResetError):
            stalled.read_all()
        stalled.sock.close()
        assert svc.terminate() == 0
        assert svc.errors() == []


@pytest.fixture(autouse=True)
def _attach_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # every service in this module listens for external producers
    monkeypatch.setenv("RINGSTREAM_RING_ATTACH_SOCKET", str(tmp_path / "attach.sock"))


def test_crashing_worker_is_restarted_logged_and_counted(tmp_path: Path) -> None:
    with Service(tmp_path, BASE_CONFIG + plugin_source(5, then="crash")) as svc:
        first = svc.wait_log("worker_restart")
        assert first["source"] == "plugin" and first["exitcode"] == 3
        svc.wait_log("worker_restart", restarts=2)
        assert metric(svc, 'ringstream_worker_restarts_total{source="plugin"}') >= 2
        # the restarted worker's records arrive too
        assert metric(svc, 'ringstream_records_total{outcome="submitted"}') >= 10
        assert svc.terminate() == 0


async def test_sigterm_drains_to_subscribers_and_exits_cleanly(tmp_path: Path) -> None:
    config = (
        BASE_CONFIG
        + """
[[sources]]
kind = "synthetic"
rate = 20000
size = 64
"""
    )
    with Service(tmp_path, config) as svc:
        curl = subprocess.Popen(
            ["curl", "-N", "-s", svc.url("/events?type=synthetic")], stdout=subprocess.PIPE
        )
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(svc.ws_url("/ws?batch=1000")) as ws,
        ):
            # records are flowing: the first batch counts too, since the
            # workers may stop before writing another
            ws_ids = [r["id"] for r in await ws.receive_json(timeout=30)]
            svc.proc.send_signal(signal.SIGTERM)
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                ws_ids += [r["id"] for r in orjson.loads(msg.data)]
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1001  # going away
        out, _ = curl.communicate(timeout=30)
        assert curl.returncode == 0  # the chunked stream ended properly
        assert svc.proc.wait(timeout=30) == 0
        stop = svc.wait_log("stop")
        records = [orjson.loads(line) for line in out.splitlines()]
        assert stop["left_in_ring_bytes"] == 0
        assert all(r["type"] == "synthetic" for r in records)  # no gap markers
        # the stream ends with the last record taken from the ring: the
        # drain reached the subscriber before the stream was closed
        assert records[-1]["id"] == stop["last_id"]
        seqs_by_worker: dict[int, list[int]] = {}
        for r in records:
            seqs_by_worker.setdefault(r["worker"], []).append(r["seq"])
        for s in seqs_by_worker.values():
            assert s == list(range(s[0], s[0] + len(s)))
        # the WebSocket subscriber, too, got every record up to the last one
        assert ws_ids == sorted(set(ws_ids))
        assert ws_ids[-1] == stop["last_id"]
        assert any(e.get("event") == "stopping" for e in svc.logs)
        assert svc.errors() == []


def test_readyz_is_503_while_draining(tmp_path: Path) -> None:
    # a subscriber that cannot take its records holds the drain open, long
    # enough to see /readyz answer 503 while the service is still up
    with Service(tmp_path, BASE_CONFIG + plugin_source(20_000)) as svc:
        stalled = StalledClient(svc.port, "/events?from=0")
        svc.wait_log("subscriber_connect")
        svc.proc.send_signal(signal.SIGTERM)
        svc.wait_log("stopping")
        r = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", svc.url("/readyz")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.stdout in ("503", "000")  # 000: it finished stopping first
        stalled.sock.close()
        assert svc.proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[server]\nshutdown_timeout = 'soon'\n", "server.shutdown_timeout: must be a number"),
        ("[server]\nbacklog = 0\n", "server.backlog: must be between 1 and 65535"),
        ("[ring]\nsize = 1000\n", "ring.size"),
        ("[subscribers]\npolicy = 'yolo'\n", "subscribers.policy: must be one of"),
        ("[servr]\nport = 1\n", "servr: unknown section"),
        ("[[sources]]\nkind = 'nope'\n", "sources[0].kind"),
        ("[[sources]]\nkind = 'synthetic'\nrate = -5\n", "sources[0].rate"),
        (
            "[[sources]]\nkind = 'plugin'\ntarget = 'no_such_module:f'\n",
            "sources[0].target: plugin target 'no_such_module:f': cannot import",
        ),
        ("[schemas]\nfiles = ['/nonexistent.toml']\n", "schemas.files"),
        ("this is not toml", "not valid TOML"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "config"])
def test_invalid_config_fails_at_start_naming_the_key(
    tmp_path: Path, config: str, message: str, command: str
) -> None:
    """`ringstream config` refuses what `serve` refuses: one validation."""
    path = tmp_path / "bad.toml"
    path.write_text(config)
    r = run_cli(command, "--config", str(path), "--port", "0")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


@pytest.mark.parametrize("command", ["serve", "config"])
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"RINGSTREAM_SUBSCRIBERS_QUEUE_RECORDS": "lots"}, "subscribers.queue_records:"),
        ((), {"RINGSTREAM_SOURCES_1_RATE": "fast"}, "sources[1].rate"),
        (("--ring-size", "1000"), {}, "ring.size"),
    ],
)  # fmt: skip
def test_invalid_overrides_name_the_key(
    command: str, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    r = run_cli(command, "--port", "0", *args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr


def test_a_bad_host_is_blamed_on_server_host(tmp_path: Path) -> None:
    r = run_cli("serve", "--host", "999.1.1.1", "--port", "0", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "server.host" in r.stderr and "999.1.1.1" in r.stderr, r.stderr
    assert "server.port" not in r.stderr


def test_an_attach_socket_in_a_missing_directory_names_the_path(tmp_path: Path) -> None:
    where = tmp_path / "no" / "such" / "dir" / "attach.sock"
    r = run_cli(
        "serve", "--port", "0", env={"RINGSTREAM_RING_ATTACH_SOCKET": str(where)}, cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert "ring.attach_socket" in r.stderr and str(where) in r.stderr, r.stderr
    assert "directory" in r.stderr, r.stderr


def test_env_and_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 1234\n[ring]\nsize = '2MiB'\n")
    r = run_cli(
        "config",
        "--config",
        str(path),
        "--workers",
        "3",
        env={"RINGSTREAM_SERVER_PORT": "4321", "RINGSTREAM_SOURCES_1_RATE": "7"},
    )
    assert r.returncode == 0, r.stderr
    cfg = orjson.loads(r.stdout)
    assert cfg["server"]["port"] == 4321 and cfg["ring"]["size"] == 2 << 20
    assert cfg["workers"]["count"] == 3 and cfg["sources"][1]["rate"] == 7


def test_it_listens_on_loopback_only_unless_told(tmp_path: Path) -> None:
    """Safe by default: the exec stream carries every command line of the machine."""
    with Service(tmp_path, NO_SOURCES + BASE_CONFIG) as svc:
        assert svc.wait_log("start")["host"] == "127.0.0.1"
        r = subprocess.run(
            ["ss", "-ltnH", f"sport = :{svc.port}"], capture_output=True, text=True, check=True
        )
        (line,) = r.stdout.splitlines()
        assert line.split()[3] == f"127.0.0.1:{svc.port}", line


def test_listen_backlog_is_the_configured_one(tmp_path: Path) -> None:
    """Read back from the kernel: for a listening socket, ss shows the
    accept queue's limit as Send-Q."""
    with Service(
        tmp_path, NO_SOURCES + BASE_CONFIG, env={"RINGSTREAM_SERVER_BACKLOG": "777"}
    ) as svc:
        r = subprocess.run(
            ["ss", "-ltnH", f"sport = :{svc.port}"], capture_output=True, text=True, check=True
        )
        (line,) = r.stdout.splitlines()
        state, _, send_q = line.split()[:3]
        assert state == "LISTEN" and int(send_q) == 777, line


def test_ring_larger_than_shm_fails_at_start_naming_shm_size(tmpfs) -> None:
    small_shm = tmpfs("4m")
    r = run_cli(
        "serve",
        "--port",
        "0",
        "--ring-size",
        "16MiB",
        env={"RINGSTREAM_RING_SHM_DIR": str(small_shm)},
    )
    assert r.returncode == 2
    assert "--shm-size" in r.stderr and str(small_shm) in r.stderr


async def test_default_config_streams_exec_events_of_real_processes(tmp_path: Path) -> None:
    # the built-in configuration, as `ringstream serve` runs it
    with Service(tmp_path, "", env={"RINGSTREAM_RING_SHM_DIR": "memfd"}) as svc:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            url = svc.url("/events?type=exec,exit&field.comm=sleep")
            async with http.get(url) as resp:
                # the exec source's first scan of /proc is its baseline (no
                # events): children started before it are never "new". So
                # start one after another until one is seen start and end.
                seen: dict[str, dict] = {}
                while "exec" not in seen:
                    seen = {}
                    # lives a few scans of /proc (exec.interval = 0.1 s)
                    child = await asyncio.create_subprocess_exec("sleep", "0.7")
                    async for line in resp.content:
                        rec = orjson.loads(line)
                        if rec["pid"] == child.pid:
                            seen[rec["type"]] = rec
                        if "exit" in seen:
                            break
                    await child.wait()
        assert seen["exec"]["cmdline"] == "sleep 0.7"
        assert seen["exec"]["filename"].endswith("/sleep")
        assert seen["exec"]["uid"] == os.getuid()
        assert seen["exit"]["comm"] == "sleep" and seen["exit"]["lifetime_ns"] > 0
        assert svc.terminate() == 0


def test_reserve_failures_are_counted_per_source(tmp_path: Path) -> None:
    with Service(tmp_path, NO_SOURCES + BASE_CONFIG) as svc:
        assert metric(svc, 'ringstream_reserve_failures_total{source="external"}') == 0
        ring = _attached_producer(svc)
        held = ring.reserve(1000)  # the consumer cannot pass this record yet
        assert held is not None
        written = 0
        while ring.output(b"x" * 1000):
            written += 1
        assert not ring.output(b"y" * 1000)
        assert metric(svc, 'ringstream_reserve_failures_total{source="external"}') == 2
        held.submit()
        assert svc.terminate() == 0
        assert svc.wait_log("stop")["consumed_records"] == written + 1


def test_memory_stays_bounded_with_1000_idle_subscribers(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.skip(f"needs 2,200 descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    # the default subscriber bounds: 50,000 records / 16 MiB a queue, and
    # subscribers.memory_budget (256 MiB) over all of them
    config = NO_SOURCES + BASE_CONFIG.replace("[subscribers]\nheartbeat = 1.0\n", "")
    with Service(tmp_path, config) as svc:
        clients: list[StalledClient] = []
        for batch in range(1, 11):
            # in hundreds, well within the listen backlog: a burst of 1,000
            # overflowed the old one (128), and SYNs the kernel drops are
            # retried only after 1 s
            clients += [StalledClient(svc.port, "/events") for _ in range(100)]
            svc.wait_log("subscriber_connect", subscriber=100 * batch)
        fast = subprocess.Popen(
            ["curl", "-N", "-sS", svc.url("/events")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            svc.wait_log("subscriber_connect", subscriber=1001)
        except AssertionError as e:
            # seen once in CI, not reproduced: say whether curl got through
            fast.kill()
            _, err = fast.communicate()
            try:
                probe: object = http_get(svc.url("/healthz"))
            except OSError as oe:
                probe = oe
            raise AssertionError(
                f"curl exit {fast.returncode}: {err!r}; /healthz: {probe!r}"
            ) from e
        ring = _attached_producer(svc)
        before = rss_bytes(svc.proc.pid)
        # 200,000 records, ~36 MB of JSON, to each of 1,000 clients that read
        # nothing: unbounded queues would need ~36 GB
        for first in range(0, 200_000, 10_000):
            _write(ring, first, 10_000)
        _write(ring, 200_000, 1)
        assert fast.stdout is not None
        # the newest record is never dropped, even by the budget's cut of a
        # publish bigger than its level (it hung here when it was); the
        # timer only turns a hang into a failure
        guard = threading.Timer(120, fast.kill)
        guard.start()
        newest = False
        for line in fast.stdout:
            if orjson.loads(line).get("seq") == 200_000:
                newest = True
                break
        guard.cancel()
        fast.kill()
        assert newest, "the reading client never got the newest record"
        grown = rss_bytes(svc.proc.pid) - before
        dropped = metric(svc, 'ringstream_subscriber_dropped_records_total{transport="ndjson"}')
        assert dropped > 0
        assert metric(svc, 'ringstream_subscribers{transport="ndjson"}') == 1001
        # the budget bounds the queues (each counted in full, though they
        # share the records), the history its 64 MiB, and each connection
        # holds at most one write (256 KiB) and its transport's 64 KiB
        queued = metric(svc, "ringstream_subscriber_queued_bytes")
        assert queued <= 256 << 20
        assert metric(svc, "ringstream_subscriber_budget_dropped_records_total") > 0
        print(f"RSS grew {grown / 1e6:.0f} MB with 1,000 stalled subscribers")
        bound = (256 << 20) + (64 << 20) + 1000 * (320 << 10)
        assert grown < bound, f"RSS grew {grown / 1e6:.0f} MB"
        for c in clients:
            c.sock.close()
