"""End to end, ids across restarts: each run has an epoch, the SSE id carries
it, and a client resuming with an id of an earlier run gets a `restart` gap
marker and everything this run has, never a silent skip."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
from servicectl import BASE_CONFIG, Service, http_get, plugin_source

N = 50
CONFIG = BASE_CONFIG + plugin_source(N)


def sse_events(svc: Service, *args: str) -> Iterator[tuple[str, str | None, dict[str, object]]]:
    """(event, id, data) of each SSE event, from curl -N."""
    proc = subprocess.Popen(
        ["curl", "-N", "-sS", "-H", "Accept: text/event-stream", *args],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        event, eid = "message", None
        for raw in proc.stdout:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                eid = line[4:]
            elif line.startswith("data: "):
                yield event, eid, orjson.loads(line[6:])
            elif line == "":
                event, eid = "message", None
    finally:
        proc.kill()
        proc.wait()


def records(svc: Service, n: int, *args: str) -> list[tuple[str, str | None, dict[str, object]]]:
    out = []
    for ev in sse_events(svc, *args):
        out.append(ev)
        if sum(1 for e in out if e[0] == "message" and e[2].get("type") != "gap") == n:
            return out
    raise AssertionError(f"stream ended after {out!r}")


def test_a_resume_across_a_restart_gets_a_restart_gap_and_all_of_the_new_run(
    tmp_path: Path,
) -> None:
    with Service(tmp_path, CONFIG) as a:
        epoch_a = orjson.loads(http_get(a.url("/query"))[1])["epoch"]
        got = records(a, N, a.url("/events?from=0"))
        assert all(eid is not None and eid.startswith(f"{epoch_a}-") for _, eid, _ in got)
        last_a = got[-1][1]
        assert last_a is not None
        assert a.terminate() == 0

    with Service(tmp_path, CONFIG) as b:
        epoch_b = orjson.loads(http_get(b.url("/query"))[1])["epoch"]
        assert epoch_b != epoch_a
        b_ids = [eid for _, eid, _ in records(b, N, b.url("/events?from=0"))]
        # a plain EventSource reconnect: its Last-Event-ID is run A's
        got = records(b, N, "-H", f"Last-Event-ID: {last_a}", b.url("/events"))
        event, eid, marker = got[0]
        assert event == "gap" and eid is None
        assert marker["reason"] == "restart"
        assert marker["after_epoch"] == epoch_a
        assert marker["after_id"] == int(last_a.rpartition("-")[2])
        assert f"{epoch_b}-{marker['next_id']}" == b_ids[0]
        # then all of run B, from its first record
        assert [e[1] for e in got[1:]] == b_ids
        # the same with a plain id and the epoch it came from
        plain = records(
            b, N, b.url(f"/events?last_event_id={last_a.rpartition('-')[2]}&epoch={epoch_a}")
        )
        assert plain[0][2]["reason"] == "restart" and [e[1] for e in plain[1:]] == b_ids
        # an id of this run resumes where it says, without a gap
        mid = b_ids[N // 2]
        assert mid is not None
        again = records(b, N - N // 2 - 1, "-H", f"Last-Event-ID: {mid}", b.url("/events"))
        assert [e[1] for e in again] == b_ids[N // 2 + 1 :]
        assert b.errors() == []


def test_the_epoch_is_in_the_headers_and_bad_epochs_are_400(tmp_path: Path) -> None:
    with Service(tmp_path, "sources = []\n" + BASE_CONFIG) as svc:
        epoch = orjson.loads(http_get(svc.url("/query"))[1])["epoch"]
        head = subprocess.run(
            ["curl", "-sS", "-I", svc.url("/events")], capture_output=True, text=True, check=True
        ).stdout
        assert f"ringstream-epoch: {epoch}" in head.lower()
        for args in (
            ["-H", "Last-Event-ID: AB!-5"],
            ["-H", "Last-Event-ID: ab-x"],
            [],
        ):
            url = svc.url("/events?epoch=NOT_AN_EPOCH" if not args else "/events")
            r = subprocess.run(
                ["curl", "-sS", "-w", "\n%{http_code}", *args, url],
                capture_output=True,
                text=True,
                check=True,
            )
            body, _, code = r.stdout.rpartition("\n")
            assert code == "400", r.stdout
            assert "epoch" in body.lower() or "Last-Event-ID" in body
