"""The hub: the merged stream of every edge, read from the JetStream stream
and served by the same /events, /ws, filters and /metrics as a local ring.

    edges --(forward)--> JetStream stream --(pull consumer)--> Hub.publish
                          seq 1 .. N                             |
                                                  in-memory history: the last
                                                  history_records, loaded at start
    a resume older than the history: read from the stream itself (catch_up)

A record's id here is its stream sequence: global across edges, durable,
the same after the hub restarts. The epoch is the stream's own (a hash of
its name and creation time), so a Last-Event-ID from before a hub restart
resumes without a restart gap; a stream deleted and made again is a new
epoch. Each record is the edge's JSON with `id` the stream sequence, the
edge's own id as `edge_id`, and `host` the originating host (the subject's
second token). A message that says records were lost before it
(Ringstream-Lost) carries `lost_before` in its JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ringcore.frames import JSON_TYPE
from service.batch import Batch
from service.fanout import Gap, Hub
from service.forward.edge import _connect_options, redact

log = logging.getLogger("ringstream.hub")


def _int_after(data: bytes, key: bytes, start: int) -> int | None:
    i = data.find(key, start, start + 64)
    if i < 0:
        return None
    i += len(key)
    j = data.find(b",", i)
    try:
        return int(data[i:j])
    except ValueError:
        return None


def _str_after(data: bytes, key: bytes, start: int) -> str | None:
    i = data.find(key, start, start + 96)
    if i < 0:
        return None
    i += len(key)
    j = data.find(b'"', i)
    return data[i:j].decode() if j > 0 else None


class HubStartError(Exception):
    """NATS or the stream cannot be reached at start; the message says which."""


class _Reader:
    """A pull consumer from a stream sequence on, its messages handed over
    in lists: bounded (at most REQUESTS batches of BATCH asked for at a
    time, the next asked for as one is taken) and prompt (a waiting pull
    request is answered as soon as a message lands).

    The pull requests are made by hand on an inbox of ours: nats-py's
    `fetch` costs about 5 loop turns a message (9 k messages/s here), an
    inbox callback one; a push consumer has no bound but its pending limit,
    past which nats-py drops messages and the consumer starts over."""

    BATCH = 1000
    REQUESTS = 2
    EXPIRES = 5.0  # a request's life on the server, seconds

    def __init__(self, js: Any, nc: Any, stream: str, start: int) -> None:
        self.js, self.nc, self.stream, self.start = js, nc, stream, start
        self.msgs: list[Any] = []
        self.ready = asyncio.Event()
        self.sub: Any = None
        self.name = ""
        self.asked = 0  # messages asked for and not yet come (or expired)
        self.cseq = 0  # the consumer's delivery sequence of the last message
        self.failed: str | None = None

    async def open(self) -> None:
        info = await self.js.add_consumer(
            self.stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.start,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
                max_waiting=4 * self.REQUESTS,
                mem_storage=True,
            ),
        )
        self.name = info.name
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(
            self.inbox,
            cb=self._cb,
            pending_msgs_limit=4 * self.REQUESTS * self.BATCH,
            pending_bytes_limit=-1,
        )
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.name}"
        for _ in range(self.REQUESTS):
            await self._ask()

    async def _ask(self) -> None:
        body = orjson.dumps({"batch": self.BATCH, "expires": int(self.EXPIRES * 1e9)})
        self.asked += self.BATCH
        await self.nc.publish(self.next_subject, body, reply=self.inbox)

    async def _cb(self, msg: Any) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            if self.failed:
                return  # made again from the last one taken
            meta = msg.metadata
            cseq = meta.sequence.consumer
            if self.cseq and cseq != self.cseq + 1:
                # no acks (AckPolicy none): what a dead connection swallowed
                # is never sent again; a consumer made anew from the last
                # sequence had gets it
                self.failed = f"delivery {self.cseq + 1} to {cseq - 1} missed"
                self.ready.set()
                return
            self.cseq = cseq
            self.msgs.append((msg, meta))
            self.asked -= 1
        elif status == "408":  # a request expired, answering what it could
            left = msg.headers.get("Nats-Pending-Messages")
            self.asked -= int(left) if left and left.isdigit() else self.BATCH
        elif status in ("404", "100"):
            return
        else:  # 409: the consumer deleted, a leader changed, ...
            self.failed = f"{status} {msg.headers.get('Description', '')}".strip()
        self.ready.set()

    async def batches(self, timeout: float | None = None) -> AsyncIterator[list[Any]]:
        while True:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout or self.EXPIRES + 2)
            except TimeoutError:
                if timeout is not None:
                    return
                # nothing, not even an expiry: a request lost with a connection
                self.asked = 0
            msgs, self.msgs = self.msgs, []
            self.ready.clear()
            if msgs:
                yield msgs
            if self.failed:
                raise RuntimeError(f"pull consumer {self.name}: {self.failed}")
            while self.asked <= (self.REQUESTS - 1) * self.BATCH:
                await self._ask()

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None
        if self.name:
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.stream, self.name)


class NatsFeed:
    def __init__(
        self,
        cfg: Mapping[str, Any],
        hub: Hub,
        type_ids: Mapping[str, int],
        history_records: int,
    ) -> None:
        self.cfg = cfg
        self.hub = hub
        self.stream = cfg["stream"]
        self.type_ids = type_ids
        self.history_records = history_records
        self.options = _connect_options(cfg)
        self.nc: Any = None
        self.js: Any = None
        self.epoch = ""
        self.last = 0  # the newest sequence published
        self.received = 0
        self.lost_reported = 0
        self.catchups = 0
        self.connected = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._reader: _Reader | None = None
        self._loaded = asyncio.Event()
        self._load_until = 0
        self.invalid = 0

    # --- lifecycle -----------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        try:
            self.nc = await asyncio.wait_for(
                nats.connect(
                    servers=list(self.cfg["urls"]),
                    name="ringstream-hub",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                    error_cb=self._on_error,
                    **self.options,
                ),
                timeout,
            )
        except Exception as e:
            why = str(e) or type(e).__name__
            where = ", ".join(redact(self.cfg["urls"]))
            raise HubStartError(f"hub.urls: cannot reach NATS at {where}: {why}") from None
        self.connected = True
        self.js = self.nc.jetstream()
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            self.connected = False  # the close below is no news
            await self.nc.close()
            raise HubStartError(
                f"hub.stream: no stream {self.stream!r} (an edge with forward.urls makes it)"
            ) from None
        created = info.created or ""
        self.epoch = hashlib.sha256(f"{self.stream}/{created}".encode()).hexdigest()[:8]
        last = info.state.last_seq
        start = max(info.state.first_seq, last - self.history_records + 1, 1)
        # what the history will not hold: a resume before it reads the stream
        self.hub.history.evicted_last = start - 1
        self.last = start - 1
        self._load_until = last
        if last < start:
            self._loaded.set()
        self._task = asyncio.create_task(self._follow(start), name="hub-follow")
        # ready only with the history in: a resume up to last_seq must find it
        try:
            await asyncio.wait_for(self._loaded.wait(), 600)
        except TimeoutError:
            log.warning("the history is still loading", extra={"event": "hub_loading"})
        log.info(
            "reading the stream",
            extra={
                "event": "hub_connected",
                "stream": self.stream,
                "first_seq": info.state.first_seq,
                "last_seq": last,
                "history_from": start,
                "epoch": self.epoch,
            },
        )

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # nats-py's fetch can swallow a cancel mid-request: the flag ends
            # the loop, and the wait is bounded either way
            await asyncio.wait({self._task}, timeout=3)
        self.connected = False
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 2)
        log.info(
            "hub stopped",
            extra={"event": "hub_stopped", "received": self.received, "last_seq": self.last},
        )

    async def _on_disconnect(self) -> None:
        if self.connected:
            self.connected = False
            log.warning("NATS disconnected", extra={"event": "hub_disconnected"})

    async def _on_error(self, e: Exception) -> None:
        # nats-py logs these at error level unless told where they go: a
        # lost connection is an outage it recovers from, logged as such
        log.info("NATS connection error", extra={"event": "hub_error", "error": str(e)})

    async def _on_reconnect(self) -> None:
        self.connected = True
        if self._reader is not None:  # what was on its way is lost: again from last+1
            self._reader.failed = "reconnected"
            self._reader.ready.set()
        log.info("NATS reconnected", extra={"event": "hub_reconnected"})

    # --- reading ----------------------------------------------------------------

    async def _follow(self, start: int) -> None:
        """Live: every message from `start` on, published in order. A reader
        that fails (the consumer gone for good) is made again from the next
        sequence."""
        while not self._stopping:
            reader = self._reader = _Reader(self.js, self.nc, self.stream, self.last + 1)
            try:
                await reader.open()
                async for msgs in reader.batches():
                    batch = self._batch(msgs, self.last)
                    if batch is not None:
                        self.last = batch.last
                        self.received += len(batch)
                        self.hub.publish(batch)
                    if self.last >= self._load_until:
                        self._loaded.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("hub consumer again", extra={"event": "hub_retry", "error": str(e)})
                await asyncio.sleep(0.5)
            finally:
                await reader.close()

    def _batch(self, msgs: list[Any], after: int) -> Batch | None:
        lines, seqs, ts, types = [], [], [], []
        for m, meta in msgs:
            seq = meta.sequence.stream
            if seq <= after:
                continue  # a consumer made again may begin with one already had
            after = seq
            tokens = m.subject.split(".", 2)  # ringstream.{host}.{type}
            host = tokens[1] if len(tokens) == 3 else ""
            lost = m.headers.get("Ringstream-Lost") if m.headers else None
            if lost is not None and not lost.isdigit():
                self.invalid += 1
                lost = None
            if lost is not None:
                self.lost_reported += int(lost)
            line, t, tid = self._record(m.data, seq, host, lost)
            lines.append(line)
            seqs.append(seq)
            ts.append(t)
            types.append(tid)
        return Batch.of(lines, seqs, ts, types) if lines else None

    def _record(self, data: bytes, seq: int, host: str, lost: str | None) -> tuple[bytes, int, int]:
        """The edge's JSON with this stream's id, its host and its edge_id,
        and the record's timestamp and type id. The edge's records begin
        `{"id":N,"ts_ns":T,"type":"NAME"` (the encoder writes the envelope
        first): spliced as bytes, a JSON round trip for anything else."""
        extra = b',"lost_before":%s' % lost.encode() if lost is not None else b""
        if data.startswith(b'{"id":') and (comma := data.find(b",", 6)) > 0:
            edge_id = data[6:comma]
            if edge_id.isdigit():
                # a subject may hold any character: the host goes in escaped
                head = b'{"id":%d,"host":%s,"edge_id":%s%s,' % (
                    seq,
                    orjson.dumps(host),
                    edge_id,
                    extra,
                )
                line = head + data[comma + 1 :]
                t = _int_after(data, b'"ts_ns":', comma)
                name = _str_after(data, b'"type":"', comma)
                return line, t or time.time_ns(), self.type_ids.get(name, JSON_TYPE)
        try:
            rec = orjson.loads(data)
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            # not a ringstream record (something else published under
            # ringstream.>): delivered whole, as raw, and counted
            self.invalid += 1
            out = {
                "id": seq,
                "host": host,
                "type": "raw",
                "error": "not a JSON record",
                "raw": base64.b64encode(data).decode(),
            }
            return orjson.dumps(out), time.time_ns(), 0
        out = {"id": seq, "host": host, "edge_id": rec.pop("id", None)}
        if lost is not None:
            out["lost_before"] = int(lost)
        out.update(rec)
        t = rec.get("ts_ns")
        return (
            orjson.dumps(out),
            t if isinstance(t, int) else time.time_ns(),
            self.type_ids.get(rec.get("type"), JSON_TYPE),
        )

    async def catch_up(self, after: int, until: int) -> AsyncIterator[Batch | dict[str, Any]]:
        """The records after `after` up to `until` from the stream itself (a
        resume older than the history); first a gap marker when the stream
        no longer has some of them."""
        self.catchups += 1
        info = await self.js.stream_info(self.stream)
        start = max(after + 1, info.state.first_seq)
        if start > until:
            # all of it is gone: the history's own first record says where next
            yield Gap("history", after).marker(until + 1)
            return
        reader = _Reader(self.js, self.nc, self.stream, start)
        await reader.open()
        try:
            got = after
            async for msgs in reader.batches(timeout=5.0):
                batch = self._batch(msgs, got)
                if batch is None:
                    continue
                if batch.last > until:
                    batch = batch.slice(0, sum(1 for p in batch.positions if p <= until))
                    if not batch.lines:
                        return  # all past `until` (the record at it deleted)
                if got == after and batch.first > after + 1:
                    # the stream no longer has the first of them (its limits
                    # discard the oldest, even while this reads)
                    yield Gap("history", after).marker(batch.first)
                got = batch.last
                yield batch
                if got >= until:
                    return
        finally:
            await reader.close()

    # --- what it reports --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "mode": "hub",
            "stream": self.stream,
            "epoch": self.epoch,
            "connected": self.connected,
            "last_seq": self.last,
            "received": self.received,
            "lost_reported": self.lost_reported,
            "history_from": self.hub.history.evicted_last + 1,
        }

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "ringstream_hub_records", "Records read from the stream, live", value=self.received
        )
        yield CounterMetricFamily(
            "ringstream_hub_lost_reported",
            "Records edges reported lost before forwarding them (Ringstream-Lost)",
            value=self.lost_reported,
        )
        yield CounterMetricFamily(
            "ringstream_hub_catchups",
            "Resumes older than the history, read from the stream",
            value=self.catchups,
        )
        yield CounterMetricFamily(
            "ringstream_hub_invalid",
            "Messages in the stream that were no ringstream record (delivered as raw)",
            value=self.invalid,
        )
        yield GaugeMetricFamily(
            "ringstream_hub_connected", "1 while connected to NATS", value=int(self.connected)
        )
        yield GaugeMetricFamily(
            "ringstream_hub_last_seq", "The newest stream sequence published", value=self.last
        )
