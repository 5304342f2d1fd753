"""Feeding the stream (issue 16): JSON and text records from a shell
pipeline, POST /ingest, the logging handler, worker process titles.

The real service, its attach socket, real producer processes (a shell
pipeline through `python -m ringcore.produce`, Python processes logging
through ringcore.logging.RingHandler) and real clients (curl, aiohttp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from servicectl import BASE_CONFIG, ROOT, Service, parse_metrics

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
NO_SOURCES = "sources = []\n"
INGEST_ON = "\n[ingest]\nenabled = true\n"


async def read_records(svc: Service, query: str, n: int) -> list[dict[str, Any]]:
    """The first n NDJSON lines of /events?query (the time limit only guards a hang)."""
    out: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(svc.url(f"/events?{query}")) as resp,
    ):
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            out.append(json.loads(line))  # orjson refuses integers past 64 bits
            if len(out) == n:
                break
    assert len(out) == n
    return out


def metrics(svc: Service) -> dict[str, float]:
    r = subprocess.run(["curl", "-s", svc.url("/metrics")], capture_output=True, timeout=30)
    return parse_metrics(r.stdout.decode())


def produce(sock: str, text: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ringcore.produce", sock, *args],
        input=text,
        capture_output=True,
        env=ENV,
        timeout=60,
    )


def _svc(tmp_path: Path, extra: str = "") -> Service:
    text = NO_SOURCES + BASE_CONFIG.replace(
        "[ring]\n", f'[ring]\nattach_socket = "{tmp_path}/ring.sock"\n', 1
    )
    return Service(tmp_path, text + extra)


# --- JSON and text records through ringcore.produce --------------------------


async def test_json_lines_from_a_shell_pipeline_arrive_as_objects(tmp_path: Path) -> None:
    lines = (
        b'{"type": "login", "user": {"id": 7, "name": "ann"}}\n'
        b"not json at all\n"
        b"\n"  # blank: skipped, as JSON Lines readers do
        b'  {"user": {"id": 8}, "id": "mine", "level": "warn"}  \r\n'
        b"[1, 2]\n"
        b'{"big": 123456789012345678901234567890}\n'
    )
    with _svc(tmp_path) as svc:
        sock = f"{tmp_path}/ring.sock"
        pipeline = subprocess.run(
            [
                "bash",
                "-c",
                f'printf %s "$LINES" | {sys.executable} -m ringcore.produce {sock} '
                "--format json --type app",
            ],
            env={**ENV, "LINES": lines.decode()},
            capture_output=True,
            timeout=60,
        )
        assert pipeline.returncode == 0, pipeline.stderr
        got = await read_records(svc, "from=0", 5)
        login, bad, mine, arr, big = got
        assert {k: login[k] for k in ("type", "user")} == {
            "type": "login",
            "user": {"id": 7, "name": "ann"},
        }
        assert login["id"] == 0 and login["ts_ns"] > 0
        # the envelope owns id; the object's own arrives as _id; no "type" of
        # its own: the --type name
        assert mine["type"] == "app" and mine["_id"] == "mine" and mine["user"] == {"id": 8}
        for raw, why in ((bad, "invalid JSON at byte 0"), (arr, "invalid JSON at byte 0: not")):
            assert raw["type"] == "raw" and raw["error"].startswith(why), raw
        assert big["big"] == 123456789012345678901234567890  # every digit kept
        # filters on JSON fields, nested with dots, and on the records' own types
        assert [r["id"] for r in await read_records(svc, "from=0&field.user.id=8", 1)] == [
            mine["id"]
        ]
        assert [r["id"] for r in await read_records(svc, "from=0&type=login", 1)] == [0]
        # a field past 64 bits compares by its text too
        want = "field.big=123456789012345678901234567890"
        assert [r["id"] for r in await read_records(svc, f"from=0&{want}", 1)] == [big["id"]]
        m = metrics(svc)
        assert m['ringstream_decoded_records_total{result="json"}'] == 3
        assert m['ringstream_decoded_records_total{result="raw_invalid_json"}'] == 2
        assert svc.terminate() == 0


async def test_text_lines_arrive_as_text_records(tmp_path: Path) -> None:
    with _svc(tmp_path) as svc:
        sock = f"{tmp_path}/ring.sock"
        r = produce(sock, 'disk "sda" full\r\n\tünïcode \xff\nlast'.encode("latin-1"))
        assert r.returncode == 0, r.stderr  # --format lines: opaque, raw
        r = produce(sock, b'one\r\ntwo "quoted"\n\xffbad utf-8\n', "--format", "text")
        assert r.returncode == 0, r.stderr
        r = produce(sock, b"kernel: oops\n", "--format", "text", "--type", "syslog")
        assert r.returncode == 0, r.stderr
        got = await read_records(svc, "from=0&type=text,syslog", 4)
        assert [(g["type"], g["line"]) for g in got] == [
            ("text", "one"),
            ("text", 'two "quoted"'),
            ("text", "\ufffdbad utf-8"),
            ("syslog", "kernel: oops"),
        ]
        bad = produce(sock, b"x\n", "--type", "nope")
        assert bad.returncode == 2 and b"--type applies to --format json and text" in bad.stderr
        assert svc.terminate() == 0


# --- POST /ingest -----------------------------------------------------------


def curl_post(url: str, data: bytes, *headers: str) -> tuple[int, dict[str, Any], str]:
    """(status, JSON body, response headers) of curl --data-binary @file."""
    args = ["curl", "-s", "-D", "-", "-o", "-", "-X", "POST", "--data-binary", "@-", url]
    for h in headers:
        args += ["-H", h]
    r = subprocess.run(args, input=data, capture_output=True, timeout=60)
    head, _, body = r.stdout.decode().partition("\r\n\r\n")
    status = int(head.split()[1])
    return status, orjson.loads(body), head


async def test_ingest_takes_ndjson_arrays_and_objects_in_order(tmp_path: Path) -> None:
    with _svc(tmp_path, INGEST_ON) as svc:
        ndjson = b"".join(orjson.dumps({"n": i}) + b"\n" for i in range(100))
        status, body, _ = curl_post(svc.url("/ingest"), ndjson)
        assert (status, body) == (200, {"accepted": 100})
        arr = orjson.dumps([{"n": 100}, {"n": 101, "type": "own"}])
        status, body, _ = curl_post(
            svc.url("/ingest?type=batch"), arr, "Content-Type: application/json"
        )
        assert (status, body) == (200, {"accepted": 2})
        # valid JSON orjson refuses: an integer past 64 bits, a lone surrogate
        big = b'{"n": 99.5, "big": 123456789012345678901234567890, "s": "\\ud800"}\n'
        status, body, _ = curl_post(svc.url("/ingest"), big)
        assert (status, body) == (200, {"accepted": 1})
        one = b'{\n  "n": 102\n}'  # one pretty-printed object
        status, body, _ = curl_post(svc.url("/ingest"), one, "Content-Type: application/json")
        assert (status, body) == (200, {"accepted": 1})
        got = await read_records(svc, "from=0", 104)
        assert [g["n"] for g in got] == [*range(102), 99.5, 102]
        assert got[102]["big"] == 123456789012345678901234567890 and got[102]["s"] == "\ud800"
        assert [g["type"] for g in got[99:]] == ["json", "batch", "own", "json", "json"]
        assert metrics(svc)['ringstream_ingest_records_total{result="accepted"}'] == 104
        assert svc.terminate() == 0


async def test_ingest_refuses_bad_bodies_whole_and_names_the_problem(tmp_path: Path) -> None:
    with _svc(tmp_path, INGEST_ON + 'max_body = "4KiB"\n') as svc:
        url = svc.url("/ingest")
        cases = [
            (b'{"n": 1}\n{"n": 2\n', 400, "line 2: not JSON"),
            (b'{"n": 1}\n[1]\n', 400, "line 2: a record is a JSON object, got an array"),
            (b'[{"n": 1}, 3]', 400, "[1]: a record is a JSON object, got a number"),
            (b'{"n": 1}\n' * 1000, 413, "ingest.max_body"),
        ]
        for data, want, text in cases:
            status, body, _ = curl_post(url, data)
            assert status == want and text in body["error"] and body["accepted"] == 0, body
        status, body, _ = curl_post(svc.url("/ingest?type=no%20spaces"), b'{"a":1}')
        assert status == 400 and "type:" in body["error"]
        # a web page elsewhere cannot write into the stream (a form post carries Origin)
        status, body, _ = curl_post(url, b'{"n": "csrf"}', "Origin: http://evil.example")
        assert status == 403 and "server.allowed_origins" in body["error"]
        # nothing of the refused bodies went in: the first record is this one
        status, _, _ = curl_post(url, b'{"n": "after"}')
        assert status == 200
        assert (await read_records(svc, "from=0", 1))[0]["n"] == "after"
        m = metrics(svc)
        assert m['ringstream_ingest_records_total{result="refused_invalid"}'] == 4
        assert m['ringstream_ingest_records_total{result="refused_too_large"}'] == 1
        assert svc.errors() == []
        assert svc.terminate() == 0


async def test_ingest_is_off_by_default(tmp_path: Path) -> None:
    with _svc(tmp_path) as svc:
        status, body, _ = curl_post(svc.url("/ingest"), b'{"a": 1}')
        assert status == 404 and "ingest.enabled" in body["error"]
        m = metrics(svc)
        assert m['ringstream_ingest_records_total{result="refused_disabled"}'] == 1
        assert svc.terminate() == 0


async def test_a_full_ring_gets_429_with_the_exact_count_and_nothing_torn(tmp_path: Path) -> None:
    # a 64 KiB ring and a body of 256 KiB: the POST writes on the event loop,
    # so the consumer cannot drain meanwhile; what fits goes in, the rest not
    extra = INGEST_ON + 'max_body = "4MiB"\n'
    with Service(
        tmp_path,
        NO_SOURCES + BASE_CONFIG.replace('size = "1MiB"', 'size = "64KiB"') + extra,
    ) as svc:
        n = 2000
        data = b"".join(orjson.dumps({"n": i, "pad": "x" * 100}) + b"\n" for i in range(n))
        status, body, head = curl_post(svc.url("/ingest"), data)
        assert status == 429, body
        accepted = body["accepted"]
        assert 0 < accepted < n and body["refused"] == n - accepted
        assert "retry-after: 1" in head.lower()
        # the client sends the rest again, from where it was cut, until all went in
        rest = data.split(b"\n")[accepted:-1]
        for _ in range(10_000):
            if not rest:
                break
            status, body, _ = curl_post(svc.url("/ingest"), b"\n".join(rest))
            assert status in (200, 429), body
            rest = rest[body["accepted"] :]
        assert not rest
        # the history holds them all: a subscriber from 0 gets each once, in order
        got = await read_records(svc, "from=0", n)
        assert [g["n"] for g in got] == list(range(n))  # in order, none torn, none twice
        assert all(g["type"] == "json" and g["pad"] == "x" * 100 for g in got)
        m = metrics(svc)
        assert m['ringstream_ingest_records_total{result="accepted"}'] == n
        assert m['ringstream_ingest_records_total{result="refused_ring_full"}'] >= n - accepted
        assert m['ringstream_reserve_failures_total{source="ingest"}'] >= 1
        assert svc.terminate() == 0


# --- ringcore.logging.RingHandler -------------------------------------------

LOGGER = textwrap.dedent(
    """
    import logging, sys
    from ringcore.logging import RingHandler
    handler = RingHandler(sys.argv[1])
    log = logging.getLogger("app")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    for seq in range(int(sys.argv[2])):
        log.info("step %d", seq, extra={"seq": seq})
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("failed")
    assert handler.dropped == 0, handler.dropped
    """
)


async def test_four_processes_logging_through_ringhandler_arrive_with_pids(
    tmp_path: Path,
) -> None:
    per = 2000
    with _svc(tmp_path) as svc:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", LOGGER, f"{tmp_path}/ring.sock", str(per)], env=ENV
            )
            for _ in range(4)
        ]
        got = await read_records(svc, "from=0&type=log", 4 * (per + 1))
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
        by_pid: dict[int, list[dict[str, Any]]] = {}
        for g in got:
            by_pid.setdefault(g["pid"], []).append(g)
        assert set(by_pid) == {p.pid for p in procs}
        for recs in by_pid.values():
            assert [r["seq"] for r in recs[:-1]] == list(range(per))  # in order, none lost
            assert recs[0]["message"] == "step 0" and recs[0]["level"] == "INFO"
            assert recs[0]["logger"] == "app"
            assert recs[-1]["level"] == "ERROR" and "ZeroDivisionError" in recs[-1]["exception"]
        assert svc.terminate() == 0


# --- worker process titles ----------------------------------------------------


async def test_workers_show_their_source_in_ps(tmp_path: Path) -> None:
    source = '\n[[sources]]\nkind = "synthetic"\nrate = 50\ninstances = 2\n'
    with Service(tmp_path, BASE_CONFIG.replace("count = 1", "count = 2") + source) as svc:
        for worker in (0, 1):
            # a record of its own: the worker runs its source (and has its title)
            await read_records(svc, f"from=0&field.worker={worker}", 1)
        pids = {
            f"{e['source']}-{e['instance']}": e["pid"]
            for e in svc.logs
            if e.get("event") == "worker_start"
        }
        assert sorted(pids) == ["synthetic-0", "synthetic-1"]
        for name, pid in pids.items():
            args = subprocess.run(
                ["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True
            ).stdout.strip()
            assert args == f"ringstream: worker {name}", args
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            assert comm.startswith("ringstream"), comm  # what top shows by default
        assert svc.terminate() == 0


FORKING = textwrap.dedent(
    """
    import logging, os, sys
    from ringcore.logging import RingHandler
    # made before the fork, as in a pre-forking server (gunicorn --preload):
    # the ring's handle turns into each child's own producer
    logging.getLogger().addHandler(RingHandler(sys.argv[1], type_name="applog"))
    logging.getLogger().setLevel(logging.INFO)
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            for seq in range(int(sys.argv[2])):
                logging.info("child step", extra={"seq": seq})
            os._exit(0)
        children.append(pid)
    print(" ".join(map(str, children)), flush=True)
    assert all(os.waitpid(c, 0)[1] == 0 for c in children)
    """
)


async def test_forked_workers_share_a_handler_made_before_the_fork(tmp_path: Path) -> None:
    per = 1000
    with _svc(tmp_path) as svc:
        proc = subprocess.Popen(
            [sys.executable, "-c", FORKING, f"{tmp_path}/ring.sock", str(per)],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        children = {int(p) for p in proc.stdout.readline().split()}
        got = await read_records(svc, "from=0&type=applog", 4 * per)
        assert proc.wait(timeout=60) == 0
        assert {g["pid"] for g in got} == children
        for child in children:
            assert [g["seq"] for g in got if g["pid"] == child] == list(range(per))
        assert svc.terminate() == 0
