"""End to end, reloading the configuration (SIGHUP, POST /-/reload) of a
running service: sources added and changed while subscribers stay connected,
bad configurations refused, the metrics, the log level."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from servicectl import BASE_CONFIG, Service, http_get, parse_metrics, plugin_source

import ringcore
from service.record import pack_header

# room for every record of these tests in the history and in each queue
ROOMY = """
[subscribers]
heartbeat = 1.0
queue_records = 1000000
queue_bytes = "256MiB"
history_records = 1000000
history_bytes = "256MiB"
"""
BASE = BASE_CONFIG.replace("count = 1\n", "count = 2\n").replace(
    "[subscribers]\nheartbeat = 1.0\n", ROOMY
)


def metrics(svc: Service) -> dict[str, float]:
    status, body = http_get(svc.url("/metrics"))
    assert status == 200
    return parse_metrics(body.decode())


def post_reload(svc: Service, method: str = "POST") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(svc.url("/-/reload"), method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, orjson.loads(body) if e.code != 405 else {}


def sighup(svc: Service, attempt: int, event: str = "reload") -> dict[str, Any]:
    """Send SIGHUP and wait for that reload's outcome (`attempt` counts them)."""
    svc.proc.send_signal(signal.SIGHUP)
    return svc.wait_log(event, attempt=attempt)


def worker_starts(svc: Service, index: int) -> list[dict[str, Any]]:
    return [e for e in svc.logs if e.get("event") == "worker_start" and e.get("index") == index]


async def read_until(ws: aiohttp.ClientWebSocketResponse, want: dict[str, int]) -> list[dict]:
    """Records until every label in `want` has sent its last seq (want[label] - 1)."""
    records: list[dict] = []
    left = dict(want)
    while left:
        frame = await ws.receive_json(timeout=60)
        for r in frame if isinstance(frame, list) else [frame]:
            records.append(r)
            label = r.get("label")
            if label in left and r["seq"] == left[label] - 1:
                del left[label]
    return records


def seqs(records: list[dict], label: str) -> list[int]:
    return [r["seq"] for r in records if r.get("label") == label]


async def test_sighup_adds_a_source_keeps_the_unchanged_worker_and_loses_nothing(
    tmp_path: Path,
) -> None:
    n, m = 30_000, 30_000
    first = BASE + plugin_source(n, label="a")
    with Service(tmp_path, first) as svc:
        pid_a = svc.wait_log("worker_start", index=0)["pid"]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(svc.ws_url("/ws?batch=1000&from=0")) as ws,
        ):
            svc.wait_log("subscriber_connect", transport="ws")
            svc.config_path.write_text(first + plugin_source(m, worker=1, label="b"))
            reload = sighup(svc, 1)
            records = await read_until(ws, {"a": n, "b": m})
        assert reload["trigger"] == "SIGHUP"
        assert reload["sources"]["added"] == ["sources[1] (plugin)"]
        assert reload["sources"]["removed"] == reload["sources"]["restarted"] == []
        assert reload["sources"]["workers_kept"] == 1
        # every record of both sources, once, in order: no gap marker either
        assert seqs(records, "a") == list(range(n))
        assert seqs(records, "b") == list(range(m))
        assert all(r["type"] == "synthetic" for r in records)
        # the unchanged source's worker was not touched: one start, same pid, alive
        assert [e["pid"] for e in worker_starts(svc, 0)] == [pid_a]
        os.kill(pid_a, 0)
        assert len(worker_starts(svc, 1)) == 1
        got = metrics(svc)
        assert got["ringstream_workers"] == 2
        assert got["ringstream_config_reload_success"] == 1
        assert got['ringstream_config_reloads_total{result="success"}'] == 1
        assert svc.errors() == []


async def test_a_changed_source_is_restarted_and_a_removed_one_stopped(tmp_path: Path) -> None:
    a, b = plugin_source(100, label="a"), plugin_source(100, worker=1, label="b")
    d = plugin_source(100, worker=3, label="d")
    base = BASE.replace("count = 2\n", "count = 3\n")
    with Service(tmp_path, base + a + b + d) as svc:
        pid_a = svc.wait_log("worker_start", index=0)["pid"]
        pid_b = svc.wait_log("worker_start", index=1)["pid"]
        pid_d = svc.wait_log("worker_start", index=2)["pid"]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(svc.ws_url("/ws?batch=1000&from=0")) as ws,
        ):
            # every worker has written all it will before any is stopped
            await read_until(ws, {"a": 100, "b": 100, "d": 100})
            # sources[1]'s options change, sources[2] goes, sources[0] stays
            svc.config_path.write_text(base + a + plugin_source(200, worker=2, label="c"))
            reload = sighup(svc, 1)
            # the replacement has the new options: its records are there
            records = await read_until(ws, {"c": 200})
        assert reload["sources"]["restarted"] == ["sources[1] (plugin)"]
        assert reload["sources"]["removed"] == ["sources[2] (plugin)"]
        assert reload["sources"]["added"] == []
        assert reload["sources"]["workers_kept"] == 1
        assert reload["sources"]["workers_stopped"] == 2
        assert seqs(records, "c") == list(range(200))
        starts = worker_starts(svc, 1)
        assert len(starts) == 2 and starts[-1]["pid"] != pid_b
        assert [e["pid"] for e in worker_starts(svc, 0)] == [pid_a]
        os.kill(pid_a, 0)  # a's worker runs on
        assert metrics(svc)["ringstream_workers"] == 2
        # the stopped workers were not restarted as crashed ones would be
        assert not [e for e in svc.logs if e.get("event") == "worker_restart"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid_d, 0)  # d's worker is gone (and reaped)
        assert svc.errors() == []


BAD_CONFIGS = (
    # (what the good config turns into, the key the error names)
    (lambda good: good.replace('size = "1MiB"', 'size = "1000"'), "ring.size"),
    (lambda good: good + '[[sources]]\nkind = "synthetic"\nrate = "fast"\n', "sources[1].rate"),
    (
        lambda good: good + '[[sources]]\nkind = "plugin"\ntarget = "no_such_module_x:f"\n',
        "sources[1].target",
    ),
)


async def test_a_bad_config_is_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    good = BASE + plugin_source(50, label="a")
    with Service(tmp_path, good) as svc:
        pid_a = svc.wait_log("worker_start", index=0)["pid"]
        before = metrics(svc)
        assert before["ringstream_config_reload_success"] == 1
        assert before['ringstream_config_reloads_total{result="failure"}'] == 0
        started = before["ringstream_config_last_reload_success_timestamp_seconds"]
        for attempt, (bad, key) in enumerate(BAD_CONFIGS, 1):
            svc.config_path.write_text(bad(good))
            failed = sighup(svc, attempt, "reload_failed")
            assert failed["level"] == "error"
            assert key in failed["error"], failed
            got = metrics(svc)
            assert got["ringstream_config_reload_success"] == 0
            assert got['ringstream_config_reloads_total{result="failure"}'] == attempt
        # the old configuration still runs and serves
        assert [e["pid"] for e in worker_starts(svc, 0)] == [pid_a]
        assert not worker_starts(svc, 1)
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(svc.ws_url("/ws?batch=1000&from=0")) as ws,
        ):
            assert seqs(await read_until(ws, {"a": 50}), "a") == list(range(50))
        # then a good one: success again, and both outcomes counted
        svc.config_path.write_text(good + plugin_source(10, worker=1, label="b"))
        sighup(svc, len(BAD_CONFIGS) + 1)
        got = metrics(svc)
        assert got["ringstream_config_reload_success"] == 1
        assert got['ringstream_config_reloads_total{result="failure"}'] == len(BAD_CONFIGS)
        assert got['ringstream_config_reloads_total{result="success"}'] == 1
        assert got["ringstream_config_last_reload_success_timestamp_seconds"] > started
        assert len(worker_starts(svc, 1)) == 1
        errors = svc.errors()
        assert len(errors) == len(BAD_CONFIGS)
        assert all('"reload_failed"' in line for line in errors)


async def test_post_reload_answers_with_what_changed_or_the_error(tmp_path: Path) -> None:
    good = BASE + plugin_source(10, label="a")
    with Service(tmp_path, good) as svc:
        status, _ = post_reload(svc, "GET")
        assert status == 405
        svc.config_path.write_text(good + '[[sources]]\nkind = "synthetic"\nrate = "fast"\n')
        status, body = post_reload(svc)
        assert status == 400
        assert "sources[1].rate" in body["error"] and "'fast'" in body["error"]
        assert metrics(svc)["ringstream_config_reload_success"] == 0
        # subscriber bounds: new connections get the new ones
        assert (await ws_status(svc, "/ws?batch=50")) == 101
        tuned = good.replace("heartbeat = 1.0\n", "heartbeat = 1.0\nmax_batch = 10\n")
        svc.config_path.write_text(tuned)
        status, body = post_reload(svc)
        assert status == 200, body
        assert body["status"] == "ok"
        assert body["changed"]["keys"] == ["subscribers.max_batch"]
        assert body["changed"]["sources"]["workers_kept"] == 1
        assert body["changed"]["restart_needed"] == []
        assert (await ws_status(svc, "/ws?batch=50")) == 400
        status, body = http_get(svc.url("/ws?batch=50"))
        assert b"from 1 to 10" in body
        assert svc.wait_log("reload", attempt=2)["trigger"] == "http"
        got = metrics(svc)
        assert got["ringstream_config_reload_success"] == 1
        assert got['ringstream_config_reloads_total{result="success"}'] == 1
        assert got['ringstream_config_reloads_total{result="failure"}'] == 1


async def ws_status(svc: Service, path: str) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(svc.ws_url(path)) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as e:
            return e.status


def test_keys_that_need_a_restart_are_named_and_the_rest_applies(tmp_path: Path) -> None:
    good = BASE + plugin_source(10, label="a")
    with Service(tmp_path, good) as svc:
        size = metrics(svc)["ringstream_ring_size_bytes"]
        changed = good.replace('size = "1MiB"', 'size = "2MiB"').replace(
            "heartbeat = 1.0\n", 'heartbeat = 1.0\npolicy = "disconnect"\n'
        )
        svc.config_path.write_text(changed)
        status, body = post_reload(svc)
        assert status == 200, body
        assert body["changed"]["restart_needed"] == ["ring.size"]
        assert body["changed"]["keys"] == ["subscribers.policy"]
        warning = svc.wait_log("reload_restart_needed")
        assert warning["level"] == "warning" and warning["keys"] == ["ring.size"]
        assert metrics(svc)["ringstream_ring_size_bytes"] == size
        # named again by the next reload: it still needs the restart
        status, body = post_reload(svc)
        assert body["changed"]["restart_needed"] == ["ring.size"]
        assert body["changed"]["keys"] == []


def test_log_level_changes_take_effect(tmp_path: Path) -> None:
    good = BASE + plugin_source(10, label="a")
    with Service(tmp_path, good) as svc:
        svc.config_path.write_text(good + '[log]\nlevel = "warning"\n')
        assert post_reload(svc)[0] == 200
        # an info line (subscriber_connect) no longer shows
        curl_one(svc)
        svc.config_path.write_text(good + '[log]\nlevel = "debug"\n')
        assert post_reload(svc)[0] == 200
        # the reload after the switch to debug logs its debug lines
        debug = svc.wait_log("reload_key", key="log.level")
        assert debug["level"] == "debug" and debug["new"] == "debug"
        # all that was logged at "warning" came before that line
        start = next(i for i, e in enumerate(svc.logs) if e.get("event") == "start")
        between = svc.logs[start + 1 : svc.logs.index(debug)]
        assert not [e for e in between if e["level"] == "info"], between
        # at "info" and below again, subscribers are logged
        curl_one(svc)
        svc.wait_log("subscriber_connect")


def curl_one(svc: Service) -> None:
    """A subscriber that gets one record, then goes."""
    with urllib.request.urlopen(svc.url("/events?from=0"), timeout=30) as r:
        assert orjson.loads(r.readline())["type"] == "synthetic"


SCHEMA = """
[[schemas]]
type = 77
name = "reloaded"
fields = [{ name = "n", kind = "u32" }]
"""


async def test_new_schema_files_apply_to_records_and_filters(tmp_path: Path) -> None:
    config = "sources = []\n" + BASE
    attach = {"RINGSTREAM_RING_ATTACH_SOCKET": str(tmp_path / "attach.sock")}
    with Service(tmp_path, config, env=attach) as svc:
        producer = ringcore.attach(str(tmp_path / "attach.sock"))
        record = pack_header(77) + (7).to_bytes(4, "little")
        (tmp_path / "extra.toml").write_text(SCHEMA)
        schemas = f'[schemas]\nfiles = ["{tmp_path / "extra.toml"}"]\n'
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(svc.ws_url("/ws")) as ws,
            # before the reload "reloaded" can only be a JSON record's type;
            # after it, this stream gets the schema's records of that name
            http.get(svc.url("/events?type=reloaded")) as early,
        ):
            assert early.status == 200
            assert producer.output(record)
            before = await ws.receive_json(timeout=30)
            svc.config_path.write_text(config + schemas)
            svc.proc.send_signal(signal.SIGHUP)
            reload = svc.wait_log("reload", attempt=1)
            assert producer.output(record)
            after = await ws.receive_json(timeout=30)
            assert orjson.loads(await early.content.readline())["n"] == 7
        assert before["type"] == "raw"
        assert after["type"] == "reloaded" and after["n"] == 7
        assert reload["keys"] == ["schemas.files", "schemas"]
        async with (
            aiohttp.ClientSession() as http,
            http.get(svc.url("/events?type=reloaded&from=0")) as resp,
        ):
            assert resp.status == 200
            assert orjson.loads(await resp.content.readline())["n"] == 7
        got = metrics(svc)
        # the decoded counts carry on from the old encoder
        assert got['ringstream_decoded_records_total{result="raw_unknown_type"}'] == 1
        assert got['ringstream_decoded_records_total{result="schema"}'] == 1
        producer.close()
