"""The edge: every record the hub publishes, forwarded to a JetStream stream
and counted as forwarded only when its PubAck has come back.

    consumer -> Hub.publish -> offer()            (a deque append: never waits)
                                 |
           queue: not sent yet, oldest first      in flight: sent, not acked yet
           [r9 r10 r11 ...]   -- sender task -->  batch: [r5 r6 r7 r8] (batch seqs)
                   ^                               single: {n: record}
                   |                               together <= max_inflight and
                   |                               <= half of buffer_bytes
                   '-- back to the front after a disconnect, a failed batch
                       or a late ack, to go "single" this time --'
                                 |
           batch: a flow ack "stored up to S" every few hundred records, and
                  the batch's PubAck at its end: those records are forwarded
           single: PubAck on <inbox>.<n>: record n leaves, forwarded

On a stream made with allow_batched (nats-server 2.14+), records never sent
before go out in one open JetStream fast-ingest batch (fastbatch.py), which
is committed when the edge has had nothing to send for a moment. Otherwise,
and for every record sent again, a record is a message with its own PubAck:
its reply subject ends in its forward number n, so the ack names it, in
whatever order acks come.

After a disconnect, a batch the server ended early, or an ack later than
ack_timeout, what was in flight goes back to the front of the queue and is
sent again with the same Nats-Msg-Id: JetStream drops the copy within its
duplicate_window and says so ("duplicate": true). A record leaves the
in-flight set at its first ack, so each counts once.

Nats-Msg-Id is "<host>-<epoch>-<id>": the epoch is new on every start, so
a run never reuses an id of an earlier one while ids start again at 0.

When the queue and the in-flight records together pass buffer_bytes, the
oldest unsent records are dropped and counted (never one in flight, which
may land: the count would lie). The next record sent carries
`Ringstream-Lost: <n>`, and keeps it when sent again; if it is dropped too,
its count passes on to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from service.batch import Batch
from service.forward import fastbatch, wire

log = logging.getLogger("ringstream.forward")

STREAM_SUBJECTS = "ringstream.>"
DUPLICATE_WINDOW = 600.0  # seconds
CHUNK = 1000  # records per write


class ForwardConfigError(Exception):
    """The stream exists with a config that forward.* does not match."""


@dataclass(slots=True)
class _Rec:
    n: int
    subject: bytes
    id: int
    line: bytes
    ts_ns: int
    lost: int = 0  # records dropped before this one (its Ringstream-Lost)
    sent_at: float = 0.0  # monotonic
    bseq: int = 0  # its sequence in the open batch
    resent: bool = False  # sent before: may be in the stream already


def redact(urls: Any) -> list[str]:
    """URLs as logs may show them: no user:password@."""
    return [re.sub(r"//[^/@]*@", "//***@", u) for u in urls]


def _connect_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if cfg["creds_file"]:
        opts["user_credentials"] = cfg["creds_file"]
    if cfg["user"]:
        opts["user"] = cfg["user"]
    password = cfg["password"]
    if cfg["password_file"]:
        password = _read_secret(cfg["password_file"], "forward.password_file")
    if password:
        opts["password"] = password
    token = cfg["token"]
    if cfg["token_file"]:
        token = _read_secret(cfg["token_file"], "forward.token_file")
    if token:
        opts["token"] = token
    if cfg["tls_ca"] or cfg["tls_cert"] or any(u.startswith(("tls:", "wss:")) for u in cfg["urls"]):
        ctx = ssl.create_default_context(cafile=cfg["tls_ca"] or None)
        if cfg["tls_cert"]:
            ctx.load_cert_chain(cfg["tls_cert"], cfg["tls_key"] or None)
        opts["tls"] = ctx
    return opts


def _read_secret(path: str, key: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise ForwardConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


class Forwarder:
    """Start with `start()` (connects in the background, retrying), offer
    every published batch with `offer()`, stop with `stop(deadline)`."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        host: str,
        epoch: str,
        type_names: Mapping[int, str],
    ) -> None:
        self.cfg = cfg
        self.host = wire.subject_token(host)
        self.epoch = epoch
        self.stream = cfg["stream"]
        self.options = _connect_options(cfg)
        base = cfg["subject"].replace("{host}", self.host)
        self._subjects = {
            tid: base.replace("{type}", wire.subject_token(name)).encode()
            for tid, name in type_names.items()
        }
        self._raw_subject = base.replace("{type}", "raw").encode()
        self.msgid_prefix = f"{self.host}-{epoch}-".encode()
        self.buffer_limit = cfg["buffer_bytes"]
        self.max_inflight = cfg["max_inflight"]
        self.ack_timeout = cfg["ack_timeout"]
        self.queue: deque[_Rec] = deque()
        self.inflight: dict[int, _Rec] = {}  # single: in the order sent
        self.batch: deque[_Rec] = deque()  # in the open batch, by batch seq
        self.batched = False  # the stream takes fast-ingest batches
        self._batch_id: bytes | None = None  # the open batch
        self._batches = 0
        self._bseq = 0  # the open batch's last sequence sent
        self._committing = False  # its commit sent, its PubAck not back
        self._refused = 0  # the batch seq the server refused for good
        self._hold_until = 0.0  # no new batch before (monotonic)
        self._batch_sent_at = 0.0
        self.queued_bytes = 0
        self.inflight_bytes = 0
        self.inflight_limit = max(1, self.buffer_limit // 2)
        self._n = 0
        self.lost_unreported = 0
        # counters
        self.offered = 0
        self.forwarded = 0
        self.duplicates = 0
        self.dropped = 0
        self.retries = 0
        self.errors = 0
        self.reconnects = 0
        self.too_big = 0  # of `dropped`: records past the server's max_payload
        self.nc: Any = None
        self.connected = False
        self.state = "connecting"  # connecting | connected | disconnected | stopped | failed
        self.failure: str | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._reply_prefix = b""
        self._nak_logged = 0.0

    # --- the consumer's side: never waits ------------------------------------

    def offer(self, batch: Batch) -> None:
        subjects, raw = self._subjects, self._raw_subject
        q = self.queue
        n = self._n
        for line, rid, ts, tid in zip(
            batch.lines, batch.positions, batch.ts_ns, batch.types, strict=True
        ):
            q.append(_Rec(n, subjects.get(tid, raw), rid, line, ts))
            n += 1
        self._n = n
        self.offered += len(batch)
        self.queued_bytes += batch.nbytes
        if self.queued_bytes + self.inflight_bytes > self.buffer_limit:
            self._drop_oldest()
        self._wake.set()

    def _drop_oldest(self) -> None:
        q, dropped = self.queue, 0
        while q and self.queued_bytes + self.inflight_bytes > self.buffer_limit:
            rec = q.popleft()
            self.queued_bytes -= len(rec.line)
            self.lost_unreported += 1 + rec.lost
            dropped += 1
        self.dropped += dropped

    @property
    def unacked(self) -> int:
        return len(self.queue) + len(self.inflight) + len(self.batch)

    @property
    def in_flight(self) -> int:
        return len(self.inflight) + len(self.batch)

    @property
    def buffer_bytes(self) -> int:
        return self.queued_bytes + self.inflight_bytes

    # --- lifecycle -------------------------------------------------------------

    async def start(self, connect_timeout: float = 2.0) -> None:
        """Connects, making or checking the stream. Unreachable: logged, and
        retried in the background (the service serves locally meanwhile). A
        stream that does not match forward.*: ForwardConfigError."""
        try:
            await asyncio.wait_for(self._connect(), connect_timeout)
        except ForwardConfigError:
            raise
        except Exception as e:  # any failure to reach NATS is retried
            self._unreachable(e)
            self._tasks.append(asyncio.create_task(self._retry_connect(), name="forward-connect"))
        self._tasks.append(asyncio.create_task(self._send_loop(), name="forward-send"))
        self._tasks.append(asyncio.create_task(self._ack_timer(), name="forward-timer"))

    def _unreachable(self, e: BaseException) -> None:
        why = str(e) or type(e).__name__
        log.warning(
            "NATS unreachable; forwarding retries, local streaming goes on",
            extra={"event": "forward_unreachable", "urls": redact(self.cfg["urls"]), "error": why},
        )

    async def _retry_connect(self) -> None:
        delay = 0.5
        while self.nc is None:
            await asyncio.sleep(delay)
            delay = min(10.0, delay * 2)
            try:
                await asyncio.wait_for(self._connect(), 10)
            except ForwardConfigError as e:
                self.state, self.failure = "failed", str(e)
                log.error(str(e), extra={"event": "forward_failed"})
                return
            except Exception as e:
                if delay >= 10.0:
                    self._unreachable(e)
                continue

    async def _connect(self) -> None:
        nc = await nats.connect(
            servers=list(self.cfg["urls"]),
            name=f"ringstream-edge {self.host}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            pending_size=64 * 1024 * 1024,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            closed_cb=self._on_closed,
            **self.options,
        )
        try:
            await self._check_stream(nc)
            prefix = nc.new_inbox()
            await nc.subscribe(
                prefix + ".>",
                cb=self._on_ack,
                pending_msgs_limit=4 * self.max_inflight + 1000,
                pending_bytes_limit=-1,
            )
        except BaseException:
            await nc.close()
            raise
        self._reply_prefix = prefix.encode() + b"."
        self.nc = nc
        self.connected = True
        self.state = "connected"
        log.info(
            "forwarding to NATS",
            extra={
                "event": "forward_connected",
                "server": nc.connected_url.netloc if nc.connected_url else None,
                "stream": self.stream,
                "acks": self.acks,
            },
        )
        self._wake.set()

    @property
    def acks(self) -> str:
        """How records are acknowledged: "batch" (fast ingest) or "record"."""
        return "batch" if self.batched else "record"

    async def _check_stream(self, nc: Any) -> None:
        js = nc.jetstream()
        replicas = self.cfg["replicas"]
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            try:
                made = await js.add_stream(
                    StreamConfig(
                        name=self.stream,
                        subjects=[STREAM_SUBJECTS],
                        num_replicas=replicas,
                        # a resend after an outage is dropped by its Msg-Id
                        # only within this window (JetStream's default is 2 min)
                        duplicate_window=DUPLICATE_WINDOW,
                        # fast-ingest batches; a server before 2.14 ignores it
                        # and says so by leaving it out of the config it returns
                        allow_batched=True,
                    )
                )
            except BadRequestError as e:
                # the server's no: another stream has the subjects, too few
                # servers for the replicas, ...: a config error, not an outage
                raise ForwardConfigError(
                    f"forward.stream: cannot create the stream {self.stream!r} "
                    f"(subjects {STREAM_SUBJECTS!r}, {replicas} replicas): {e.description}"
                ) from None
            self.batched = bool(made.config.allow_batched)
            log.info(
                "stream created",
                extra={
                    "event": "forward_stream_created",
                    "stream": self.stream,
                    "replicas": replicas,
                    "acks": self.acks,
                },
            )
            return
        c = info.config
        # a stream made without allow_batched is used as it is: a PubAck a record
        self.batched = bool(c.allow_batched)
        problems = []
        if STREAM_SUBJECTS not in (c.subjects or []):
            problems.append(f"subjects {c.subjects} (forward wants {STREAM_SUBJECTS!r} among them)")
        if (c.num_replicas or 1) != replicas:
            problems.append(f"{c.num_replicas} replicas (forward.replicas = {replicas})")
        if problems:
            raise ForwardConfigError(
                f"forward.stream: the stream {self.stream!r} exists with " + " and ".join(problems)
            )

    async def stop(self, deadline: float) -> None:
        """Forward what is buffered until `deadline` (monotonic), then stop."""
        while self.unacked and self.connected and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        left = self.unacked
        self.state = "stopped"
        self.connected = False  # the disconnect that closing brings is no news
        log.info(
            "forwarding stopped",
            extra={
                "event": "forward_stopped",
                "forwarded": self.forwarded,
                "duplicates": self.duplicates,
                "dropped": self.dropped,
                "unforwarded": left,
            },
        )
        if self.nc is not None:
            nc, self.nc = self.nc, None
            with contextlib.suppress(Exception):  # closing: nothing left to save
                await asyncio.wait_for(nc.close(), 2)

    # --- nats-py's callbacks --------------------------------------------------

    async def _on_error(self, e: Exception) -> None:
        log.info("NATS connection error", extra={"event": "forward_error", "error": str(e)})

    async def _on_disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.state = "disconnected"
            # no ack comes on a dead connection: the oldest go first again,
            # and are the first dropped if the outage fills the buffer
            self._resend()
            log.warning("NATS disconnected", extra={"event": "forward_disconnected"})

    async def _on_closed(self) -> None:
        """nats-py gives a connection up for good on a server's -ERR
        (credentials expired, an authorization violation): connect anew."""
        if self.state == "stopped" or self.nc is None:
            return
        self.nc = None
        if self.connected:
            self.connected = False
            self._resend()
        self.state = "connecting"
        log.warning("NATS connection closed; connecting again", extra={"event": "forward_closed"})
        self._tasks.append(asyncio.create_task(self._retry_connect(), name="forward-connect"))

    async def _on_reconnect(self) -> None:
        self.connected = True
        self.state = "connected"
        self.reconnects += 1
        # whatever was in flight may or may not have landed: all of it again
        self._resend()
        url = self.nc.connected_url if self.nc is not None else None
        log.info(
            "NATS reconnected",
            extra={"event": "forward_reconnected", "server": url.netloc if url else None},
        )
        self._wake.set()

    async def _on_ack(self, msg: Any) -> None:
        subject = msg.subject
        if subject.endswith(".$FI"):
            self._on_batch_answer(msg)
            return
        n = int(subject[subject.rfind(".") + 1 :])
        rec = self.inflight.get(n)
        if rec is None:
            return  # acked already (a record sent twice), or sent again since
        data = msg.data
        if data.startswith(b'{"error"') or b'"seq"' not in data:
            # not a PubAck: an error, or a status such as 503 "no responders"
            # (no stream leader, mid-election), which is empty but for a header
            self.errors += 1
            self._nak(msg)
            if b'"err_code":%d' % fastbatch.TOO_BIG in data:
                # refused for good (the stream's max_msg_size): sending it
                # again would not change that
                del self.inflight[n]
                self._refused_for_good(rec)
            return  # else the ack timer sends it again
        del self.inflight[n]
        self.inflight_bytes -= len(rec.line)
        self.forwarded += 1
        if b'"duplicate":true' in data:
            self.duplicates += 1
        if self.queue and self.in_flight < self.max_inflight:
            self._wake.set()

    def _on_batch_answer(self, msg: Any) -> None:
        if self._batch_id is None or fastbatch.batch_of(msg.subject) != self._batch_id.decode():
            return  # of a batch given up already: its records are sent again
        kind, seq, error = fastbatch.parse(msg.data)
        if kind == fastbatch.ACK:
            self._stored_upto(seq)
        elif kind == fastbatch.END:
            self._stored_upto(seq)
            self._end_batch()
        elif kind == fastbatch.ERR:
            # the batch ends with the message before it; its PubAck follows
            self.errors += 1
            self._nak(msg, error)
            if error and error.get("err_code") == fastbatch.TOO_BIG:
                self._refused = seq
        elif kind == fastbatch.GAP:
            self.errors += 1  # cannot be, on one TCP connection; the PubAck follows
            self._nak(msg, {"description": f"gap in the batch after {seq}"})
        else:  # never started (or a 503 mid-election): all of it again, later
            self.errors += 1
            self._nak(msg, error)
            if error and error.get("err_code") == fastbatch.DISABLED:
                self.batched = False
                log.info(
                    "the stream no longer takes batches; a PubAck a record",
                    extra={"event": "forward_batches_off", "stream": self.stream},
                )
            self._end_batch(hold=True)

    def _stored_upto(self, bseq: int) -> None:
        b, n, nbytes = self.batch, 0, 0
        while b and b[0].bseq <= bseq:
            nbytes += len(b.popleft().line)
            n += 1
        self.inflight_bytes -= nbytes
        self.forwarded += n
        if n and self.queue and self.in_flight < self.max_inflight:
            self._wake.set()

    def _end_batch(self, hold: bool = False) -> None:
        """The batch is over; what it left unstored is sent again, singly,
        but a record refused for good, which is dropped and counted."""
        self._batch_id = None
        self._committing = False
        b = self.batch
        if b and self._refused and b[0].bseq == self._refused:
            self._refused_for_good(b.popleft())
        self._refused = 0
        if b:
            self._resend()
        if hold:
            self._hold_until = time.monotonic() + fastbatch.HOLD
        self._wake.set()

    def _refused_for_good(self, rec: _Rec) -> None:
        """An in-flight record JetStream will never take."""
        self.inflight_bytes -= len(rec.line)
        self._drop_too_big(rec)

    def _drop_too_big(self, rec: _Rec) -> None:
        """A record too big to forward: dropped, counted, and said by the
        next message's Ringstream-Lost."""
        self.dropped += 1
        self.too_big += 1
        self.lost_unreported += 1 + rec.lost

    def _nak(self, msg: Any, error: Mapping[str, Any] | None = None) -> None:
        now = time.monotonic()
        if now - self._nak_logged < 1.0:
            return  # an election answers thousands of records at once: once a second
        self._nak_logged = now
        if error is not None:
            why = error.get("description")
        else:
            try:
                why = orjson.loads(msg.data)["error"].get("description")
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                status = (msg.headers or {}).get("Status")
                why = f"status {status}" if status else msg.data[:200].decode(errors="replace")
        log.info("not acknowledged; sent again", extra={"event": "forward_nak", "error": why})

    # --- sending -----------------------------------------------------------------

    def _resend(self) -> None:
        recs = list(self.inflight.values()) + list(self.batch)
        self._batch_id = None
        self._committing = False
        if not recs:
            return
        recs.sort(key=lambda r: r.n)
        for r in recs:
            r.resent = True
        self.inflight.clear()
        self.batch.clear()
        self.queue.extendleft(reversed(recs))
        moved = sum(len(r.line) for r in recs)
        self.inflight_bytes -= moved
        self.queued_bytes += moved
        self.retries += len(recs)

    def _sendable(self) -> bool:
        if not (self.connected and self.nc is not None and self.queue):
            return False
        if self.in_flight >= self.max_inflight or self.inflight_bytes >= self.inflight_limit:
            return False
        return not self._batch_waits(self.queue[0])

    def _batch_waits(self, rec: _Rec) -> bool:
        """A record for a batch waits while the last one commits or after one failed."""
        if not self.batched or rec.resent:
            return False
        if self._committing:
            return True  # what is sent after the commit the server would skip
        return self._batch_id is None and time.monotonic() < self._hold_until

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            timeout = self._timeout()
            if timeout is None:
                await self._wake.wait()
            else:
                # a timer, not wait_for(): that makes a task a wake-up, which
                # at 150 k records/s was a seventh of this process's CPU
                timer = loop.call_later(timeout, self._wake.set)
                await self._wake.wait()
                timer.cancel()
            self._wake.clear()
            while self._sendable():
                await self._send(min(CHUNK, self.max_inflight - self.in_flight))
                await asyncio.sleep(0)  # the consumer and the subscribers first
            if (
                self._batch_id is not None
                and not self._committing
                and self.connected
                and time.monotonic() - self._batch_sent_at >= fastbatch.LINGER
                # with records waiting and FLOW unacked, a flow ack is due anyway
                and (not self.queue or len(self.batch) < fastbatch.FLOW)
            ):
                await self._commit()

    def _timeout(self) -> float | None:
        """When the loop must look again by itself: to commit an open batch
        once idle, or to start one when a hold ends."""
        now = time.monotonic()
        if self._batch_id is not None and not self._committing:
            return max(0.0, self._batch_sent_at + fastbatch.LINGER - now)
        if self.queue and self._hold_until > now:
            return self._hold_until - now
        return None

    async def _commit(self) -> None:
        assert self._batch_id is not None
        self._committing = True
        self._batch_sent_at = time.monotonic()
        self._bseq += 1
        data = fastbatch.commit(self._raw_subject, self._reply_prefix, self._batch_id, self._bseq)
        await self._write(data)

    async def _send(self, most: int) -> None:
        q, inflight, batch = self.queue, self.inflight, self.batch
        subjects, replies, ids, lines = [], [], [], []
        lost: dict[int, int] = {}
        now = time.monotonic()
        nbytes = 0
        limit = self.inflight_limit
        biggest = getattr(self.nc, "max_payload", 0) or 1 << 62
        prefix = self._reply_prefix
        while (
            q
            and len(lines) < most
            and (self.inflight_bytes + nbytes < limit or not (inflight or batch))
        ):
            rec = q[0]
            if len(rec.line) + 128 > biggest:
                # past the server's max_payload: it would close the connection
                q.popleft()
                self.queued_bytes -= len(rec.line)
                self._drop_too_big(rec)
                continue
            if self.batched and not rec.resent:
                if self._batch_waits(rec):
                    break
                if self._batch_id is None:
                    self._batches += 1
                    self._batch_id = b"%s-%d" % (self.epoch.encode(), self._batches)
                    self._bseq = 0
                self._bseq += 1
                rec.bseq = self._bseq
                batch.append(rec)
                replies.append(fastbatch.reply(prefix, self._batch_id, self._bseq))
                self._batch_sent_at = now
            else:
                inflight[rec.n] = rec
                replies.append(b"%s%d" % (prefix, rec.n))
            q.popleft()
            if self.lost_unreported:
                rec.lost += self.lost_unreported
                self.lost_unreported = 0
            if rec.lost:
                lost[len(lines)] = rec.lost
            rec.sent_at = now
            nbytes += len(rec.line)
            subjects.append(rec.subject)
            ids.append(rec.id)
            lines.append(rec.line)
        self.queued_bytes -= nbytes
        self.inflight_bytes += nbytes
        if not lines:
            return
        data = wire.frames(subjects, replies, self.msgid_prefix, ids, lines, lost)
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        try:
            await wire.write(self.nc, data)
        except Exception as e:  # a dead connection: the disconnect sends it again
            log.info("NATS write failed", extra={"event": "forward_error", "error": str(e)})

    def _oldest(self) -> _Rec | None:
        single = next(iter(self.inflight.values()), None)
        batched = self.batch[0] if self.batch else None
        if single is None or batched is None:
            return single or batched
        return single if single.n < batched.n else batched

    async def _ack_timer(self) -> None:
        """Records whose ack is later than ack_timeout are sent again."""
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout / 4))
            oldest = self._oldest()
            if (
                self._committing
                and oldest is None
                and time.monotonic() - self._batch_sent_at > self.ack_timeout
            ):
                self._end_batch()  # the commit's PubAck lost: every record was acked
            elif (
                self.connected
                and oldest is not None
                and time.monotonic() - oldest.sent_at > self.ack_timeout
            ):
                log.info(
                    "acks late; sending again",
                    extra={"event": "forward_retry", "records": self.in_flight},
                )
                self._resend()
                self._wake.set()

    # --- what it reports ----------------------------------------------------------

    def lag_seconds(self) -> float:
        oldest = self._oldest() or (self.queue[0] if self.queue else None)
        if oldest is None:
            return 0.0
        return max(0.0, time.time() - oldest.ts_ns / 1e9)

    def status(self) -> dict[str, Any]:
        """Everything /query and the metrics show (also what the forwarding
        process sends the service, service/forward/process.py)."""
        return {
            "state": self.state,
            "failure": self.failure,
            "server": self.nc.connected_url.netloc
            if self.nc is not None and self.nc.connected_url
            else None,
            "stream": self.stream,
            "connected": self.connected,
            "forwarded": self.forwarded,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "retries": self.retries,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "buffer_bytes": self.buffer_bytes,
            "buffer_limit": self.buffer_limit,
            "in_flight": self.in_flight,
            "acks": self.acks,
            "lag_records": self.unacked,
            "lag_seconds": round(self.lag_seconds(), 3),
        }

    def collect(self) -> Iterator[Metric]:
        return metrics(self.status())


def metrics(st: Mapping[str, Any]) -> Iterator[Metric]:
    c = CounterMetricFamily(
        "ringstream_forward_records",
        "Records offered to JetStream, by outcome: forwarded (acknowledged: in the "
        "stream), dropped (the buffer full, never acknowledged)",
        labels=["outcome"],
    )
    c.add_metric(["forwarded"], st["forwarded"])
    c.add_metric(["dropped"], st["dropped"])
    yield c
    for name, doc in (
        (
            "duplicates",
            "PubAcks saying a record was in the stream already (sent again, dropped by Msg-Id)",
        ),
        ("retries", "Records sent again (after a reconnect or a late ack)"),
        ("errors", "Answers that were no PubAck (errors, 503 no responders)"),
        ("reconnects", "Reconnects to NATS"),
    ):
        yield CounterMetricFamily(f"ringstream_forward_{name}", doc, value=st[name])
    for name, key, doc in (
        ("buffer_bytes", "buffer_bytes", "Bytes of records not yet acknowledged"),
        ("buffer_limit_bytes", "buffer_limit", "forward.buffer_bytes"),
        ("inflight_records", "in_flight", "Records sent and awaiting their PubAck"),
        ("connected", "connected", "1 while connected to NATS"),
        ("lag_records", "lag_records", "Records offered and not yet acknowledged"),
        ("lag_seconds", "lag_seconds", "Age of the oldest unacknowledged record"),
    ):
        yield GaugeMetricFamily(f"ringstream_forward_{name}", doc, value=float(st[key]))
