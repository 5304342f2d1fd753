"""The edge forwarding to NATS JetStream (issue 13), with real nats-server
processes on loopback: every record in the stream exactly once across a
server's SIGKILL and restart and across a cluster node's death; a full
buffer's drops counted and said in the stream; the bad configs refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from natsctl import Cluster, NatsServer, make_stream, read_stream
from servicectl import BASE_CONFIG, Service, get_json, http_get, run_cli
from test_deploy import wait_for


def config(urls: list[str], rate: int = 2000, extra: str = "") -> str:
    return (
        BASE_CONFIG
        + f"""
[forward]
urls = {orjson.dumps(urls).decode()}
host = "edge1"
{extra}

[[sources]]
kind = "synthetic"
rate = {rate}
size = 64
"""
    )


def forward(svc: Service) -> dict[str, Any]:
    return get_json(svc.url("/query"))["forward"]


def local_stream(svc: Service, path: Path) -> subprocess.Popen[bytes]:
    """curl -N on /events from the first record, into a file, until the
    service ends the stream."""
    out = open(path, "wb")  # noqa: SIM115 - curl writes it until it exits
    return subprocess.Popen(["curl", "-sN", svc.url("/events?from=0")], stdout=out)


def stop_edge(svc: Service, curl: subprocess.Popen[bytes]) -> tuple[str, dict[str, Any]]:
    """SIGTERM: the run's epoch, and the forward_stopped log line once the
    buffer is flushed and the local stream has ended."""
    epoch = get_json(svc.url("/query"))["epoch"]
    assert svc.terminate() == 0
    curl.wait(30)
    return epoch, svc.wait_log("forward_stopped")


def records_in(path: Path) -> dict[int, bytes]:
    got: dict[int, bytes] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            rec = orjson.loads(line)
            assert rec["type"] != "gap", rec
            if rec["type"] == "synthetic":
                got[rec["id"]] = line
    return got


def check_exactly_once(messages: list[Any], local: dict[int, bytes], epochs: set[str]) -> None:
    """The stream holds every local record once, byte for byte, and no other."""
    ids = [h["Nats-Msg-Id"] for _, _, h, _ in messages]
    assert len(ids) == len(set(ids)), "a record is in the stream twice"
    by_id = {}
    for _, subject, h, data in messages:
        host, epoch, rid = h["Nats-Msg-Id"].split("-")
        assert host == "edge1" and epoch in epochs
        assert subject == "ringstream.edge1.synthetic"
        by_id[int(rid)] = data
    assert sorted(by_id) == sorted(local)
    assert by_id == local


def test_every_record_is_in_the_stream_once_across_a_nats_kill_and_restart(
    tmp_path: Path,
) -> None:
    nats = NatsServer(tmp_path)
    try:
        with Service(tmp_path, config([nats.url])) as svc:
            curl = local_stream(svc, tmp_path / "local.ndjson")
            svc.wait_log("forward_connected")
            assert forward(svc)["acks"] == "batch"  # the stream it made takes batches
            wait_for("records forwarded", lambda: forward(svc)["forwarded"] > 2000)
            nats.kill()
            svc.wait_log("forward_disconnected")
            # records keep streaming locally and wait in the buffer
            before = forward(svc)["lag_records"]
            wait_for("records buffered", lambda: forward(svc)["lag_records"] > before + 2000)
            wait_for("the state", lambda: forward(svc)["state"] == "disconnected")
            assert http_get(svc.url("/readyz"))[0] == 200
            m = http_get(svc.url("/metrics"))[1].decode()
            assert "ringstream_forward_connected 0.0" in m
            # the dashboard's forwarding panels and the alerts name live series
            from test_deploy import DASHBOARD, alert_rules

            exprs = DASHBOARD.read_text() + " ".join(r["expr"] for r in alert_rules())
            for name in set(re.findall(r"\bringstream_forward_\w+", exprs)):
                assert re.search(rf"^{name}[{{ ]", m, re.MULTILINE), name
            nats.start()
            svc.wait_log("forward_reconnected")
            wait_for("the backlog forwarded", lambda: forward(svc)["forwarded"] > before + 4000)
            epoch, stopped = stop_edge(svc, curl)
        assert stopped["unforwarded"] == 0 and stopped["dropped"] == 0
        local = records_in(tmp_path / "local.ndjson")
        assert stopped["forwarded"] == len(local)
        check_exactly_once(
            read_stream(nats.url, "RINGSTREAM", stopped["forwarded"]), local, {epoch}
        )
        assert svc.errors() == []
    finally:
        nats.close()


@pytest.mark.parametrize("batched", [True, False], ids=["batches", "a-pubAck-a-record"])
def test_a_record_the_stream_refuses_for_good_is_dropped_counted_and_said(
    tmp_path: Path, batched: bool
) -> None:
    """A stream made beforehand, with a max_msg_size, and with or without
    allow_batched (the edge then acks by batch or by record): an ingested
    record past the size is refused by JetStream; it is dropped, counted and
    said by the next message's Ringstream-Lost, not sent again forever, and
    every other record is in the stream once."""
    nats = NatsServer(tmp_path)
    try:
        make_stream(
            nats.url,
            "RINGSTREAM",
            ["ringstream.>"],
            duplicate_window=600.0,
            max_msg_size=4096,
            allow_batched=batched,
        )
        extra = "\n[ingest]\nenabled = true\n"
        with Service(tmp_path, config([nats.url]) + extra) as svc:
            curl = local_stream(svc, tmp_path / "local.ndjson")
            svc.wait_log("forward_connected")
            assert forward(svc)["acks"] == ("batch" if batched else "record")
            wait_for("records forwarded", lambda: forward(svc)["forwarded"] > 500)
            r = subprocess.run(
                ["curl", "-s", "-w", "%{http_code}", "--data-binary", "@-", svc.url("/ingest")],
                input=orjson.dumps({"type": "big", "blob": "x" * 10_000}),
                capture_output=True,
                timeout=30,
            )
            assert r.stdout.endswith(b"200"), r.stdout
            wait_for("the refusal counted", lambda: forward(svc)["dropped"] == 1)
            after = forward(svc)["forwarded"]
            wait_for("records after it", lambda: forward(svc)["forwarded"] > after + 500)
            epoch, stopped = stop_edge(svc, curl)
        assert stopped["dropped"] == 1 and stopped["unforwarded"] == 0
        local = records_in(tmp_path / "local.ndjson")
        messages = read_stream(nats.url, "RINGSTREAM", stopped["forwarded"])
        check_exactly_once(messages, local, {epoch})
        lost = [h["Ringstream-Lost"] for _, _, h, _ in messages if "Ringstream-Lost" in h]
        assert lost == ["1"]
    finally:
        nats.close()


def test_a_cluster_node_dies_and_the_edge_goes_on_through_another(tmp_path: Path) -> None:
    """3 JetStream servers routed on loopback, the stream with 3 replicas;
    the node the edge is connected to is SIGKILLed mid-stream."""
    cluster = Cluster(tmp_path)
    try:
        cfg = config(cluster.urls[:1], extra="replicas = 3")
        with Service(tmp_path, cfg) as svc:
            curl = local_stream(svc, tmp_path / "local.ndjson")
            svc.wait_log("forward_connected")
            wait_for("records forwarded", lambda: forward(svc)["forwarded"] > 2000)
            server = forward(svc)["server"]
            node = cluster.by_port(int(server.rsplit(":", 1)[1]))
            node.kill()
            svc.wait_log("forward_reconnected")
            # another node (the status is the forwarding process's, 4 a second)
            wait_for("another node", lambda: forward(svc)["server"] not in (server, None))
            done = forward(svc)["forwarded"]
            wait_for("records forwarded again", lambda: forward(svc)["forwarded"] > done + 2000)
            epoch, stopped = stop_edge(svc, curl)
        assert stopped["unforwarded"] == 0 and stopped["dropped"] == 0
        alive = [n.url for n in cluster.nodes if n is not node]
        local = records_in(tmp_path / "local.ndjson")
        check_exactly_once(read_stream(alive, "RINGSTREAM", stopped["forwarded"]), local, {epoch})
        assert svc.errors() == []
    finally:
        cluster.close()


def test_nats_unreachable_at_start_then_a_full_buffer_drops_and_says_so(tmp_path: Path) -> None:
    """No server at start: a clear log, retries, local streaming goes on. The
    buffer fills and drops its oldest, counted; when the server comes, the
    first message after the drops says how many in Ringstream-Lost."""
    nats = NatsServer(tmp_path)
    nats.close()  # its port, with nothing listening
    try:
        with Service(tmp_path, config([nats.url], extra='buffer_bytes = "64KiB"')) as svc:
            curl = local_stream(svc, tmp_path / "local.ndjson")
            warned = svc.wait_log("forward_unreachable")
            assert warned["level"] == "warning" and warned["urls"] == [nats.url]
            assert http_get(svc.url("/readyz"))[0] == 200
            wait_for("drops", lambda: forward(svc)["dropped"] > 3000)
            fw = forward(svc)
            assert fw["state"] == "connecting" and fw["buffer_bytes"] <= 64 * 1024
            m = http_get(svc.url("/metrics"))[1].decode()
            assert 'ringstream_forward_records_total{outcome="dropped"}' in m
            nats.start()
            svc.wait_log("forward_connected", timeout=60)
            done = forward(svc)["forwarded"]
            wait_for("records forwarded", lambda: forward(svc)["forwarded"] > done + 1000)
            assert svc.terminate() == 0
            curl.wait(30)
            stopped = svc.wait_log("forward_stopped")
        local = records_in(tmp_path / "local.ndjson")
        messages = read_stream(nats.url, "RINGSTREAM", stopped["forwarded"])
        lost = [int(h["Ringstream-Lost"]) for _, _, h, _ in messages if "Ringstream-Lost" in h]
        assert lost and sum(lost) == stopped["dropped"]
        # the local subscriber got every record; the stream all but the dropped
        assert len(messages) + stopped["dropped"] + stopped["unforwarded"] == len(local)
        first = messages[0][2]
        assert "Ringstream-Lost" in first  # the drops came before the server did
        assert svc.errors() == []
    finally:
        nats.close()


def test_a_malformed_url_exits_2_naming_the_key(tmp_path: Path) -> None:
    r = run_cli("serve", "--port", "0", env={"RINGSTREAM_FORWARD_URLS": '["nats//nohost:4222"]'})
    assert r.returncode == 2
    assert "forward.urls[0]: must be a NATS URL" in r.stderr


def start_error(tmp: Path, stream: str, subjects: list[str]) -> str:
    """An edge started beside a stream made first: its exit 2 and its log."""
    nats = NatsServer(tmp)
    try:
        make_stream(nats.url, stream, subjects)
        svc = Service(tmp, config([nats.url]), wait_ready=False)
        assert svc.proc.wait(60) == 2
        svc.close()
        return "\n".join(svc.lines)
    finally:
        nats.close()


def test_a_stream_that_does_not_match_is_a_start_error(tmp_path: Path) -> None:
    text = start_error(tmp_path, "RINGSTREAM", ["elsewhere.>"])
    assert "forward.stream: the stream 'RINGSTREAM' exists with subjects ['elsewhere.>']" in text


def test_the_nats_py_internals_the_edge_writes_through_exist() -> None:
    """service/forward/wire.py hands whole chunks of frames to nats-py's own
    outgoing buffer: a nats-py that renames it fails here, not in the field."""
    import inspect

    from nats.aio.client import Client

    from service.forward import wire

    for name in (wire.SEND, wire.FLUSH):
        assert inspect.iscoroutinefunction(getattr(Client, name)), name
    frame = wire.frames([b"ringstream.h.t"], [b"_INBOX.x.7"], b"h-e-", [42], [b'{"id":42}'], {0: 3})
    hdr = b"NATS/1.0\r\nNats-Msg-Id: h-e-42\r\nRingstream-Lost: 3\r\n\r\n"
    assert frame == b'HPUB ringstream.h.t _INBOX.x.7 %d %d\r\n%s{"id":42}\r\n' % (
        len(hdr),
        len(hdr) + 9,
        hdr,
    )


def test_a_stream_the_server_refuses_to_make_is_a_start_error(tmp_path: Path) -> None:
    """Another stream already takes ringstream.>: the server says no, and
    that is a config error naming the key, not an outage to retry."""
    text = start_error(tmp_path, "OTHER", ["ringstream.>"])
    assert "forward.stream: cannot create the stream 'RINGSTREAM'" in text
    assert "subjects overlap with an existing stream" in text


def test_a_dead_forwarding_process_is_replaced_and_its_loss_counted(tmp_path: Path) -> None:
    """SIGKILL to the forwarding process: the service starts another, what the
    dead one held is counted as dropped and said in the stream, and every
    record after is forwarded."""
    nats = NatsServer(tmp_path)
    try:
        with Service(tmp_path, config([nats.url])) as svc:
            svc.wait_log("forward_connected")
            wait_for("records forwarded", lambda: forward(svc)["forwarded"] > 1000)
            child = [
                int(p.name)
                for p in Path("/proc").iterdir()
                if p.name.isdigit()
                and (p / "cmdline").exists()
                and b"ringstream: forward" in (p / "cmdline").read_bytes()
                and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == svc.proc.pid
            ]
            assert len(child) == 1, child
            os.kill(child[0], signal.SIGKILL)
            exited = svc.wait_log("forward_process_exited")
            assert exited["level"] == "error"
            wait_for("a new forwarder", lambda: forward(svc)["state"] == "connected")
            done = forward(svc)["forwarded"]
            wait_for("records forwarded again", lambda: forward(svc)["forwarded"] > done + 1000)
            assert forward(svc)["dropped"] >= exited["lost"]
            assert svc.terminate() == 0
            stopped = svc.wait_log("forward_stopped")
        assert stopped["unforwarded"] == 0
        assert [e for e in svc.errors() if "forwarding process exited" not in e] == []
    finally:
        nats.close()


def test_a_subject_without_host_second_is_refused() -> None:
    r = run_cli("config", env={"RINGSTREAM_FORWARD_SUBJECT": "ringstream.{type}"})
    assert r.returncode == 2
    assert "forward.subject: must be a subject" in r.stderr
