"""Subscriber streams: NDJSON and SSE over chunked HTTP, JSON over WebSocket.

Each transport is a Writer (how records, gap markers and heartbeats look on
the wire); `pump` is the one loop that feeds any of them from a Subscriber:
first the history replay of a resuming subscriber, then the live queue.
Awaiting the write is where a slow client's backpressure lands: its queue
grows meanwhile, and the fan-out's policy bounds it.
"""

from __future__ import annotations

import asyncio
from itertools import chain
from typing import Protocol

import orjson
from aiohttp import WSMsgType, web

from service.batch import Batch
from service.fanout import Hub, Subscriber
from service.metrics import Latency


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

    async def heartbeat(self) -> None:
        # Nothing to write (a blank line would break strict NDJSON readers),
        # but a client that left must be noticed: aiohttp does not cancel the
        # handler, and with no records to write nothing else would find out.
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client gone")


class SseWriter:
    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp

    async def records(self, batches: list[Batch]) -> None:
        parts = [
            b"id: %d\ndata: %b\n\n" % (pos, line)
            for b in batches
            for pos, line in zip(b.positions, b.lines, strict=True)
        ]
        if parts:
            await self.resp.write(b"".join(parts))

    async def gap(self, marker: dict[str, object]) -> None:
        # no id: Last-Event-ID stays the last record actually received
        await self.resp.write(b"event: gap\ndata: %b\n\n" % orjson.dumps(marker))

    async def heartbeat(self) -> None:
        await self.resp.write(b": keepalive\n\n")


class WsWriter:
    def __init__(self, ws: web.WebSocketResponse, batch: int | None) -> None:
        self.ws = ws
        self.batch = batch  # None: one object per frame; N: arrays of up to N

    async def records(self, batches: list[Batch]) -> None:
        send = self.ws.send_frame
        if self.batch is None:
            for b in batches:
                for line in b.lines:
                    await send(line, WSMsgType.TEXT)
            return
        lines = list(chain.from_iterable(b.lines for b in batches))
        n = self.batch
        for i in range(0, len(lines), n):
            await send(b"[" + b",".join(lines[i : i + n]) + b"]", WSMsgType.TEXT)

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
        for gap, part in hub.replay(sub, replay_limit):
            if gap is not None:
                await out.gap(gap.marker(part.first if part else None))
            if part is not None and part.lines:
                await out.records([part])  # history: not a delivery latency
        await asyncio.sleep(0)  # let the consumer publish between pieces
    while True:
        if sub.closed is not None and sub.closed != "shutdown":
            return
        if not sub.queue and sub.gap is None:
            if sub.closed is not None:
                return  # shutdown, and all flushed
            try:
                await asyncio.wait_for(sub.wake.wait(), heartbeat)
            except TimeoutError:
                await out.heartbeat()
            continue
        gap, batches = sub.take()
        if gap is not None:
            await out.gap(gap.marker(batches[0].first if batches else None))
        if batches:
            await out.records(batches)
            latency.observe(batches)
