"""Subscriber streams: NDJSON and SSE over chunked HTTP, JSON over WebSocket.

Each transport is a Writer (how records, gap markers and heartbeats look on
the wire); `pump` is the one loop that feeds any of them from a Subscriber:
first the history replay of a resuming subscriber, then the live queue.
Awaiting the write is where a slow client's backpressure lands: its queue
grows meanwhile, and the fan-out's policy bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from itertools import chain
from typing import Any, Protocol

import orjson
from aiohttp import WSMsgType, web

from service.batch import Batch
from service.fanout import Hub, Subscriber
from service.metrics import Latency

# most record bytes one write takes from a subscriber's queue: the copy a
# write makes (joined lines, frames) is the subscriber's own memory, held in
# its transport while the client does not read, so it stays small
WRITE_BYTES = 256 << 10


def cap_send_buffer(transport: asyncio.BaseTransport | None, nbytes: int) -> None:
    """Bound what the kernel holds for a client that does not read (0: autotuning)."""
    if not nbytes or transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)


async def flushed(transport: asyncio.Transport | None, protocol: Any) -> None:
    """Wait until everything written is in the kernel's hands: at shutdown,
    what a slow reader has not taken yet would go with the process."""
    if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
        return
    # high-water 0: paused until the buffer is empty, then resumed
    transport.set_write_buffer_limits(high=0)
    if protocol._paused:
        await protocol._drain_helper()


# what a write takes while the client is behind (the transport still holds
# bytes from the last one): a client that stopped reading keeps this much
BEHIND_WRITE_BYTES = 64 << 10


def _write_size(out: object) -> int:
    transport = getattr(out, "transport", None)
    if transport is not None and transport.get_write_buffer_size():
        return BEHIND_WRITE_BYTES
    return WRITE_BYTES


class Writer(Protocol):
    async def records(self, batches: list[Batch]) -> None: ...
    async def gap(self, marker: dict[str, object]) -> None: ...
    async def heartbeat(self) -> None: ...


class NdjsonWriter:
    def __init__(self, resp: web.StreamResponse, transport: asyncio.BaseTransport | None) -> None:
        self.resp = resp
        self.transport = transport

    async def records(self, batches: list[Batch]) -> None:
        lines = list(chain.from_iterable(b.lines for b in batches))
        if lines:
            lines.append(b"")  # the last newline, without copying the whole write again
            await self.resp.write(b"\n".join(lines))

    async def gap(self, marker: dict[str, object]) -> None:
        await self.resp.write(orjson.dumps(marker) + b"\n")

    async def end(self, marker: dict[str, object]) -> None:
        await self.resp.write(orjson.dumps(marker) + b"\n")

    async def heartbeat(self) -> None:
        # Nothing to write (a blank line would break strict NDJSON readers),
        # but a client that left must be noticed: aiohttp does not cancel the
        # handler, and with no records to write nothing else would find out.
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client gone")


class SseWriter:
    def __init__(self, resp: web.StreamResponse, epoch: str) -> None:
        self.resp = resp
        # "EPOCH-ID": a plain EventSource sends it back as Last-Event-ID, so
        # a reconnect after a restart is told apart from a resume
        self.id_prefix = epoch.encode() + b"-"
        req = resp._req  # set by prepare(); aiohttp keeps the transport there
        self.transport = req.transport if req is not None else None

    async def records(self, batches: list[Batch]) -> None:
        prefix = self.id_prefix
        parts = [
            b"id: %b%d\ndata: %b\n\n" % (prefix, pos, line)
            for b in batches
            for pos, line in zip(b.positions, b.lines, strict=True)
        ]
        if parts:
            await self.resp.write(b"".join(parts))

    async def gap(self, marker: dict[str, object]) -> None:
        # no id: Last-Event-ID stays the last record actually received
        await self.resp.write(b"event: gap\ndata: %b\n\n" % orjson.dumps(marker))

    async def end(self, marker: dict[str, object]) -> None:
        # the stream's last event: EventSource reconnects after it, and its
        # reconnect then gets the 401 that stops it
        await self.resp.write(b"event: end\ndata: %b\n\n" % orjson.dumps(marker))

    async def heartbeat(self) -> None:
        await self.resp.write(b": keepalive\n\n")


def _ws_header(n: int) -> bytes:
    """The header of an unmasked, final TEXT frame of n payload bytes (RFC 6455 5.2)."""
    if n < 126:
        return _SHORT_HEADERS[n]
    if n < 1 << 16:
        return _HEADER_16.pack(0x81, 126, n)
    return _HEADER_64.pack(0x81, 127, n)


_SHORT_HEADERS = tuple(bytes((0x81, n)) for n in range(126))
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


class WsWriter:
    """Records as WebSocket text frames: one record each, or arrays of `batch`.

    Uncompressed frames are built here, all of a write's frames in one
    buffer, and written with one transport write: aiohttp's send_frame costs
    a call and a syscall per frame and never yields while the socket takes
    the bytes, which let 200 clients that read nothing hold the loop for
    seconds. With per-message deflate the compressor's state lives in
    aiohttp, so frames go through send_frame, and the pump yields after each
    write.
    """

    def __init__(self, ws: web.WebSocketResponse, batch: int | None, compress: bool) -> None:
        self.ws = ws
        writer = ws._writer  # see _write
        self.transport = writer.transport if writer is not None else None
        self.batch = batch  # None: one object per frame; N: arrays of up to N
        self.compress = compress

    def _payloads(self, batches: list[Batch]) -> list[bytes]:
        lines = list(chain.from_iterable(b.lines for b in batches))
        if self.batch is None:
            return lines
        n = self.batch
        return [b"[" + b",".join(lines[i : i + n]) + b"]" for i in range(0, len(lines), n)]

    async def records(self, batches: list[Batch]) -> None:
        payloads = self._payloads(batches)
        if self.compress:
            for p in payloads:
                await self.ws.send_frame(p, WSMsgType.TEXT)
            return
        header = _ws_header
        parts = []
        for p in payloads:
            parts.append(header(len(p)))
            parts.append(p)
        await self._write(parts)

    async def _write(self, parts: list[bytes]) -> None:
        # private: aiohttp has no public way to write several frames at once
        writer = self.ws._writer
        if writer is None or writer._closing or writer.transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        # one vectored write: no copy of the payloads to glue on their headers
        writer.transport.writelines(parts)
        # the flow control aiohttp's writers apply: wait while the transport
        # holds more than its high-water mark
        protocol = writer.protocol
        if protocol._paused:
            await protocol._drain_helper()

    async def gap(self, marker: dict[str, object]) -> None:
        await self.ws.send_frame(orjson.dumps(marker), WSMsgType.TEXT)

    async def heartbeat(self) -> None:
        pass  # aiohttp pings (WebSocketResponse(heartbeat=...))


async def pump(
    hub: Hub,
    sub: Subscriber,
    out: Writer,
    latency: Latency,
    *,
    heartbeat: float,
    replay_limit: int,
) -> None:
    """Feed `sub` to `out` until the subscriber is closed; on shutdown, flush first."""
    # a shutdown lets the replay finish: the live queue holds only records
    # after it, and flushing those alone would skip the rest unannounced
    while sub.replay_until >= 0 and sub.closed in (None, "shutdown"):
        for gap, parts in hub.replay(sub, replay_limit, WRITE_BYTES):
            if gap is not None:
                await out.gap(gap.marker(parts[0].first if parts else None))
            if parts:
                await out.records(parts)  # history: not a delivery latency
        await asyncio.sleep(0)  # let the consumer publish between pieces
    while True:
        if sub.closed is not None and sub.closed != "shutdown":
            return
        # a gap waits for the record after it, so that its marker can say
        # where the stream goes on (next_id); only a shutdown flushes it alone
        if not sub.queue and (sub.gap is None or sub.closed is None):
            if sub.closed is not None:
                return  # shutdown, and all flushed
            try:
                await asyncio.wait_for(sub.wake.wait(), heartbeat)
            except TimeoutError:
                await out.heartbeat()
            continue
        gap, batches = sub.take(_write_size(out))
        if gap is not None:
            await out.gap(gap.marker(batches[0].first if batches else None))
        if batches:
            await out.records(batches)
            latency.observe(batches)
        # a write that the socket took whole did not yield: let the other
        # subscribers, the consumer and the HTTP handlers run between writes
        await asyncio.sleep(0)
