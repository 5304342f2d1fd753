"""The hub (issue 13): `ringstream serve --from-nats` serving the merged
stream of two edges from a real nats-server. A subscriber gets both edges'
records, each edge's in its own order, none lost, across a restart of the
hub resumed with Last-Event-ID (past what the restarted hub's history
holds: read from the stream); a resume older than the stream keeps gets a
gap marker."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
from natsctl import NatsServer, make_stream
from servicectl import BASE_CONFIG, Service, get_json
from test_deploy import wait_for
from test_forward import config as edge_config
from test_forward import local_stream, records_in


def hub_config(url: str, history: int) -> str:
    return (
        BASE_CONFIG
        + f'\n[hub]\nurls = ["{url}"]\n'
        + f"\n[subscribers]\nhistory_records = {history}\n"
    ).replace("[subscribers]\nheartbeat = 1.0\n", "")


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def curl_to(path: Path, url: str, *args: str) -> subprocess.Popen[bytes]:
    out = open(path, "wb")  # noqa: SIM115 - curl writes it until it exits
    return subprocess.Popen(["curl", "-sN", *args, url], stdout=out)


def test_a_hub_serves_two_edges_and_resumes_across_its_restart(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path)
    edges: list[Service] = []
    try:
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = edge_config([nats.url], rate=500).replace('host = "edge1"', f'host = "{name}"')
            edges.append(Service(d, cfg))
        locals_ = [
            local_stream(e, tmp_path / f"{n}.ndjson") for e, n in zip(edges, "ab", strict=True)
        ]
        for e in edges:
            e.wait_log("forward_connected")
        (tmp_path / "hub1").mkdir()
        hub = Service(tmp_path / "hub1", hub_config(nats.url, 200))
        epoch = get_json(hub.url("/query"))["epoch"]
        first = curl_to(tmp_path / "hub-1.ndjson", hub.url("/events?from=1"))
        wait_for("records at the hub", lambda: get_json(hub.url("/query"))["received"] > 600)
        first.terminate()
        first.wait(30)
        got = [r for r in read_ndjson(tmp_path / "hub-1.ndjson") if "id" in r]
        assert got and got[0]["id"] == 1
        last = got[-1]["id"]
        assert hub.terminate() == 0
        hub.close()
        # the edges go on meanwhile: more than the restarted hub's history holds
        wait_for(
            "records forwarded while the hub is down",
            lambda: (
                sum(get_json(e.url("/query"))["forward"]["forwarded"] for e in edges) > last + 600
            ),
        )
        (tmp_path / "hub2").mkdir()
        hub = Service(tmp_path / "hub2", hub_config(nats.url, 200))
        assert get_json(hub.url("/query"))["epoch"] == epoch  # the stream's, not the run's
        second = curl_to(
            tmp_path / "hub-2.ndjson", hub.url("/events"), "-H", f"Last-Event-ID: {epoch}-{last}"
        )
        # the edges stop (flushing what they buffered); the hub then has all
        done = []
        for e in edges:
            assert e.terminate() == 0
            done.append(e.wait_log("forward_stopped"))
        for c in locals_:
            c.wait(30)
        total = sum(d["forwarded"] for d in done)
        wait_for(
            "the hub has every record", lambda: get_json(hub.url("/query"))["last_seq"] >= total
        )
        assert hub.terminate() == 0
        second.wait(30)
        more = read_ndjson(tmp_path / "hub-2.ndjson")
        assert [r for r in more if r.get("type") == "gap"] == []
        assert get_json_lines_ok(more)
        records = got + more
        ids = [r["id"] for r in records]
        assert ids == list(range(1, total + 1))  # none lost, none twice, in stream order
        for name in "ab":
            local = records_in(tmp_path / f"{name}.ndjson")
            mine = [r for r in records if r["host"] == name]
            assert [r["edge_id"] for r in mine] == sorted(local)  # its own order
            for r in mine:
                rec = orjson.loads(local[r["edge_id"]])
                assert {**rec, "id": r["id"], "host": name, "edge_id": rec["id"]} == r
        assert any(e.get("event") == "subscriber_connect" for e in hub.logs)
        assert hub.errors() == []
    finally:
        for e in edges:
            e.close()
        nats.close()


def get_json_lines_ok(records: list[dict[str, Any]]) -> bool:
    return all("id" in r and "host" in r for r in records)


def test_a_resume_older_than_the_stream_keeps_gets_a_gap(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path)
    try:
        make_stream(nats.url, "RINGSTREAM", ["ringstream.>"], max_msgs=100)
        (tmp_path / "edge").mkdir()
        with Service(tmp_path / "edge", edge_config([nats.url], rate=1000)) as edge:
            wait_for(
                "the stream past its limit",
                lambda: get_json(edge.url("/query"))["forward"]["forwarded"] > 300,
            )
            with Service(tmp_path, hub_config(nats.url, 50)) as hub:
                out = subprocess.run(
                    ["curl", "-sN", "-m", "3", hub.url("/events?from=1")],
                    capture_output=True,
                    timeout=30,
                ).stdout
                recs = [orjson.loads(x) for x in out.splitlines() if x.strip()]
                gap = recs[0]
                assert gap["type"] == "gap" and gap["reason"] == "history"
                assert gap["after_id"] == 0 and gap["next_id"] > 200
                ids = [r["id"] for r in recs[1:]]
                assert ids[0] == gap["next_id"]
                assert ids == list(range(ids[0], ids[0] + len(ids)))
                assert hub.errors() == []
    finally:
        nats.close()


def test_a_hub_without_its_stream_exits_naming_it(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path)
    try:
        svc = Service(tmp_path, hub_config(nats.url, 50), wait_ready=False)
        code = svc.proc.wait(60)
        svc.close()
        assert code != 0
        assert "hub.stream: no stream 'RINGSTREAM'" in "\n".join(svc.lines)
    finally:
        nats.close()


def test_the_hub_goes_on_across_a_nats_restart_and_past_a_foreign_message(
    tmp_path: Path,
) -> None:
    """nats-server SIGKILLed and restarted under the hub: what was on its way
    in the dead connection is read again (ids 1..N, none missed). A message
    under ringstream.> that is no ringstream record is delivered as raw,
    counted, and the stream goes on after it."""
    import asyncio

    import nats as natspy

    nats = NatsServer(tmp_path)
    try:
        (tmp_path / "edge").mkdir()
        edge = Service(tmp_path / "edge", edge_config([nats.url], rate=2000))
        try:
            edge.wait_log("forward_connected")
            (tmp_path / "hub").mkdir()
            hub = Service(tmp_path / "hub", hub_config(nats.url, 100_000))
            reader = curl_to(tmp_path / "hub.ndjson", hub.url("/events?from=1"))
            wait_for("records at the hub", lambda: get_json(hub.url("/query"))["received"] > 2000)

            async def foreign() -> None:
                nc = await natspy.connect(nats.url)
                await nc.jetstream().publish("ringstream.intruder.x", b"not json")
                await nc.close()

            asyncio.run(foreign())
            nats.kill()
            hub.wait_log("hub_disconnected")
            nats.start()
            hub.wait_log("hub_reconnected", timeout=60)
            done = get_json(hub.url("/query"))["received"]
            wait_for("records again", lambda: get_json(hub.url("/query"))["received"] > done + 2000)
            assert edge.terminate() == 0
            total = edge.wait_log("forward_stopped")["forwarded"] + 1  # and the foreign one
            wait_for("all of them", lambda: get_json(hub.url("/query"))["last_seq"] >= total)
            metrics = subprocess.run(
                ["curl", "-s", hub.url("/metrics")], capture_output=True, text=True
            ).stdout
            assert "ringstream_hub_invalid_total 1.0" in metrics
            assert hub.terminate() == 0
            reader.wait(30)
            recs = read_ndjson(tmp_path / "hub.ndjson")
            assert [r["id"] for r in recs] == list(range(1, total + 1))
            raw = [r for r in recs if r["type"] == "raw"]
            assert len(raw) == 1 and raw[0]["host"] == "intruder"
            assert hub.errors() == []
        finally:
            edge.close()
    finally:
        nats.close()
