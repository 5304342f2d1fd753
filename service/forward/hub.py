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
from service.forward.edge import _connect_options

log = logging.getLogger("ringstream.hub")

FETCH = 1000


class HubStartError(Exception):
    """NATS or the stream cannot be reached at start; the message says which."""


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
                    **self.options,
                ),
                timeout,
            )
        except Exception as e:
            why = str(e) or type(e).__name__
            where = ", ".join(self.cfg["urls"])
            raise HubStartError(f"hub.urls: cannot reach NATS at {where}: {why}") from None
        self.connected = True
        self.js = self.nc.jetstream()
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
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
        self._task = asyncio.create_task(self._follow(start), name="hub-follow")
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

    async def _on_reconnect(self) -> None:
        self.connected = True
        log.info("NATS reconnected", extra={"event": "hub_reconnected"})

    # --- reading ----------------------------------------------------------------

    async def _consumer(self, start: int) -> Any:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            max_waiting=4,
        )
        return await self.js.pull_subscribe(
            "ringstream.>", durable=None, stream=self.stream, config=config
        )

    async def _follow(self, start: int) -> None:
        """Live: every message from `start` on, published in order. Any
        failure (a reconnect, the consumer gone) makes a new consumer from
        the next sequence."""
        while not self._stopping:
            try:
                sub = await self._consumer(self.last + 1)
                while not self._stopping:
                    try:
                        msgs = await sub.fetch(FETCH, timeout=1.0)
                    except nats.errors.TimeoutError:
                        continue
                    batch = self._batch(msgs, self.last)
                    if batch is not None:
                        self.last = batch.last
                        self.received += len(batch)
                        self.hub.publish(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("hub consumer again", extra={"event": "hub_retry", "error": str(e)})
                await asyncio.sleep(0.5)

    def _batch(self, msgs: list[Any], after: int) -> Batch | None:
        lines, seqs, ts, types = [], [], [], []
        type_ids = self.type_ids
        for m in msgs:
            seq = m.metadata.sequence.stream
            if seq <= after:
                continue  # a consumer made again may begin with one already had
            after = seq
            rec = orjson.loads(m.data)
            subject = m.subject.split(".")
            out: dict[str, Any] = {
                "id": seq,
                "host": subject[1] if len(subject) > 2 else "",
                "edge_id": rec.pop("id", None),
            }
            lost = (m.headers or {}).get("Ringstream-Lost")
            if lost is not None:
                out["lost_before"] = int(lost)
                self.lost_reported += int(lost)
            out.update(rec)
            lines.append(orjson.dumps(out))
            seqs.append(seq)
            t = rec.get("ts_ns")
            ts.append(t if isinstance(t, int) else time.time_ns())
            types.append(type_ids.get(rec.get("type"), JSON_TYPE))
        return Batch.of(lines, seqs, ts, types) if lines else None

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
        sub = await self._consumer(start)
        try:
            got = after
            while got < until:
                try:
                    msgs = await sub.fetch(min(FETCH, until - got), timeout=5.0)
                except nats.errors.TimeoutError:
                    return
                batch = self._batch(msgs, got)
                if batch is None:
                    continue
                if batch.last > until:
                    batch = batch.slice(0, sum(1 for p in batch.positions if p <= until))
                if got == after and batch.first > after + 1:
                    # the stream no longer has the first of them (its limits
                    # discard the oldest, even while this reads)
                    yield Gap("history", after).marker(batch.first)
                got = batch.last
                yield batch
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

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
        yield GaugeMetricFamily(
            "ringstream_hub_connected", "1 while connected to NATS", value=int(self.connected)
        )
        yield GaugeMetricFamily(
            "ringstream_hub_last_seq", "The newest stream sequence published", value=self.last
        )
