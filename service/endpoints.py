"""HTTP endpoints: /events (NDJSON or SSE), /ws, /query, /healthz, /readyz, /metrics, /."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import ringcore
from service.auth.gate import PRINCIPAL, Authenticator
from service.auth.scope import Principal
from service.consumer import RingConsumer
from service.fanout import Hub, Subscriber
from service.filters import U64_MAX, Filter, FilterError, FilterSchema, ascii_int
from service.metrics import Latency
from service.streams import (
    NdjsonWriter,
    SseWriter,
    WsWriter,
    cap_send_buffer,
    flushed,
    pump,
)
from service.web import Page

log = logging.getLogger("ringstream.http")

LANDING = """ringstream: records from a shared-memory ring, streamed in order.

  GET /events    NDJSON stream (curl -N); SSE with Accept: text/event-stream or ?format=sse
                 resume: Last-Event-ID header, ?last_event_id=ID or ?from=ID
                 filters: ?type=exec,exit  ?field.comm=bash  ?field.filename=/usr/*  ?sample=10
  GET /ws        WebSocket, JSON text frames; ?batch=N for arrays of up to N records;
                 send {"filter": {...}} to change the filter
  GET /query     the ring's positions and counters as JSON
  GET /healthz   liveness      GET /readyz   readiness (503 while starting or draining)
  GET /metrics   Prometheus metrics
  POST /ingest   JSON records into the ring (NDJSON, or a JSON array), if ingest.enabled
  POST /-/reload read the configuration again and apply it (as SIGHUP does)
"""

STREAM_PARAMS = {"format", "from", "last_event_id", "epoch"}
WS_PARAMS = {"from", "last_event_id", "batch", "epoch"}
EPOCH = re.compile(r"[0-9a-z]{1,32}")


@dataclass
class State:
    """What the handlers share; app.py builds it and owns its lifecycle."""

    ring: ringcore.Ring
    hub: Hub
    consumer: RingConsumer
    filters: FilterSchema
    registry: CollectorRegistry
    latency: Latency
    settings: Mapping[str, Any]  # the [subscribers] section
    batch: int  # consumer batch, also the replay piece size
    phase: str = "starting"  # starting | ready | draining
    # service/reload.py's Reloader.reload, once serving: (HTTP status, JSON body)
    reload: Callable[[str], Awaitable[tuple[int, dict[str, Any]]]] | None = None
    streams: set[asyncio.Task[Any]] = field(default_factory=set)
    # this run's name: ids are ring positions, which start again at 0 with
    # every start, so an id means something only with its epoch
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    auth: Authenticator | None = None  # set by app.py with the HTTP server
    forwarder: Any = None  # service.forward.edge.Forwarder, when forward.urls is set
    feed: Any = None  # service.forward.hub.NatsFeed: a hub's stream, when hub.urls is set


# why a stream ended that its client must be told of: the last thing it gets
# is {"type": "end", "reason": ...}; a WebSocket then closes with the code
END_REASONS = {"token_expired": 4001, "token_revoked": 4003}


STATE = web.AppKey("state", State)


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=orjson.dumps({"error": message}).decode() + "\n", content_type="application/json"
    )


def _unavailable(st: State) -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(
        text=orjson.dumps({"status": st.phase}).decode() + "\n", content_type="application/json"
    )


def _epoch(value: str, name: str) -> str:
    if not EPOCH.fullmatch(value):
        raise _bad(f"{name}: an epoch is 1 to 32 lower-case letters and digits, got {value!r}")
    return value


def _id(value: str, name: str, epoch: str | None) -> tuple[str | None, int]:
    """(epoch, id) from "EPOCH-ID" (as SSE sends it) or "ID" (of `epoch`, by
    default this run); the id a ring position, ASCII digits, at most 2^64 - 1."""
    text = value
    if "-" in value and not value.startswith("-"):
        given, _, text = value.rpartition("-")
        epoch = _epoch(given, name)
    n = ascii_int(text, 0, U64_MAX)
    if n is None:
        raise _bad(
            f"{name}: must be an integer from 0 to {U64_MAX}, got {value!r} "
            "(or EPOCH-N, as an SSE id carries it)"
        )
    return epoch, n


def _resume(st: State, request: web.Request) -> tuple[int | None, str | None]:
    """(the id to resume after, the epoch it is from if not this run's), from
    Last-Event-ID, ?last_event_id= or ?from= (inclusive), and ?epoch=.

    The header wins: an EventSource reconnects to its first URL, query and
    all, with Last-Event-ID saying how far it got since; the query's
    position would replay from the start every time."""
    q = request.query
    epoch = _epoch(q["epoch"], "epoch") if "epoch" in q else None
    after: int | None
    if "Last-Event-ID" in request.headers:
        epoch, after = _id(request.headers["Last-Event-ID"], "Last-Event-ID", epoch)
    elif "from" in q:
        epoch, n = _id(q["from"], "from", epoch)
        after = n - 1
    elif "last_event_id" in q:
        epoch, after = _id(q["last_event_id"], "last_event_id", epoch)
    else:
        return None, None
    return after, (epoch if epoch not in (None, st.epoch) else None)


def _filter(st: State, request: web.Request, known: set[str]) -> Filter | None:
    items = [(k, v) for k, v in request.query.items() if k not in known]
    try:
        return st.filters.parse(items)
    except FilterError as e:
        raise _bad(str(e)) from None


def _peer(request: web.Request) -> str:
    return request.remote or "?"


def _scope(
    st: State, request: web.Request, flt: Filter | None
) -> tuple[Principal | None, Filter | None]:
    """The request's principal and its scope as a filter; a 403 naming what
    the subscriber's own filter asks beyond the scope."""
    p: Principal | None = request.get(PRINCIPAL)
    if p is None or p.scope.unrestricted:
        return p, None
    out = p.scope.refuses(flt)
    if out is not None:
        assert st.auth is not None
        raise st.auth.forbidden("scope", out, request)
    return p, p.scope.filter(st.filters)


def _guard(st: State, p: Principal | None, sub: Subscriber) -> asyncio.TimerHandle | None:
    """End `sub` when its token expires (at expiry, not at its next request),
    or now if a reload revoked it between the check and the subscribe."""
    if p is None:
        return None
    if st.auth is not None and not st.auth.keys.holds(p):
        st.hub.end(sub, "token_revoked")
        return None
    if p.expires is None:
        return None
    # a little after exp: the timer's clock may run early by a millisecond,
    # and a request at exp itself is refused (expired when now >= exp)
    delay = max(0.0, p.expires - time.time()) + 0.01
    return asyncio.get_running_loop().call_later(delay, st.hub.end, sub, "token_expired")


def end_marker(reason: str) -> dict[str, object]:
    return {"type": "end", "reason": reason}


async def events(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    if st.phase != "ready":
        raise _unavailable(st)
    fmt = request.query.get("format")
    if fmt is None:
        accept = request.headers.get("Accept", "")
        fmt = "sse" if "text/event-stream" in accept else "ndjson"
    if fmt not in ("ndjson", "sse"):
        raise _bad(f"format: must be 'ndjson' or 'sse', got {fmt!r}")
    after, after_epoch = _resume(st, request)
    flt = _filter(st, request, STREAM_PARAMS)
    principal, scope = _scope(st, request, flt)
    headers = {
        "Ringstream-Epoch": st.epoch,
        "Content-Type": "text/event-stream" if fmt == "sse" else "application/x-ndjson",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # tell proxies not to hold the stream back
    }
    if request.method == "HEAD":
        # what a GET would get, without the body (RFC 9110 9.3.2): no subscriber
        return web.Response(headers=headers)
    resp = web.StreamResponse(headers=headers)
    cap_send_buffer(request.transport, st.settings["send_buffer"])
    await resp.prepare(request)
    writer = SseWriter(resp, st.epoch) if fmt == "sse" else NdjsonWriter(resp, request.transport)
    try:
        after = await _catch_up(st, writer, after, after_epoch, flt, scope)
    except ConnectionError:
        return resp
    sub = st.hub.subscribe(
        fmt, _peer(request), flt, after, after_epoch, scope=scope, principal=principal
    )
    expiry = _guard(st, principal, sub)
    reason = "client"
    try:
        await _run_stream(st, sub, writer)
        reason = sub.closed or "client"
        if reason in END_REASONS:
            await writer.end(end_marker(reason))
        if reason == "shutdown" or reason in END_REASONS:
            await resp.write_eof()
            await flushed(request.transport, request.protocol)
    except ConnectionError:  # reset, or lost while a write waited to drain
        reason = sub.closed if sub.closed in ("shutdown", "slow") else "client"
    except asyncio.CancelledError:
        if sub.closed != "slow" and sub.closed not in END_REASONS:
            raise
        # the policy's cancel (or a stuck write at a token's end), not the
        # server's: this handler goes on
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        reason = "slow" if sub.closed == "slow" else "stuck"
    finally:
        if expiry is not None:
            expiry.cancel()
        st.hub.unsubscribe(sub, sub.closed or reason)
    if reason in ("slow", "stuck") and request.transport is not None:
        # disconnected by the policy, possibly in the middle of a write the
        # client is not reading: drop the connection, nothing more to say
        request.transport.abort()
    return resp


async def _catch_up(
    st: State,
    writer: Any,
    after: int | None,
    after_epoch: str | None,
    flt: Filter | None,
    scope: Filter | None,
) -> int | None:
    """A hub's resume older than its in-memory history: those records read
    from the JetStream stream and written first (scope, then filter, as
    live), until the history has the rest. Returns where the history takes
    over. Elsewhere, and for resumes the history holds: `after` as it is."""
    if st.feed is None or after is None or after_epoch is not None:
        return after
    # the history moves on while this writes: again until it holds the rest
    # (checked and subscribed with no await between, so nothing is evicted)
    while after < st.hub.history.evicted_last:
        before = after
        try:
            after = await _catch_up_pass(st, writer, after, flt, scope)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # NATS down, the stream gone: the history's gap says so
            log.info("catch-up failed", extra={"event": "hub_catchup_failed", "error": str(e)})
            break
        if after == before:
            break  # the stream gave nothing (unreachable): the history's gap says so
    return after


async def _catch_up_pass(
    st: State, writer: Any, after: int, flt: Filter | None, scope: Filter | None
) -> int:
    async for part in st.feed.catch_up(after, st.hub.history.evicted_last):
        if isinstance(part, dict):
            await writer.gap(part)
            after = int(part["next_id"]) - 1
            continue
        after = part.last
        if scope is not None:
            part = scope.apply(part)
        if flt is not None:
            part = flt.apply(part)
        if part.lines:
            await writer.records([part])
    return after


async def _run_stream(st: State, sub: Subscriber, writer: Any) -> None:
    task = asyncio.current_task()
    assert task is not None
    st.streams.add(task)
    sub.writer = task
    try:
        await pump(
            st.hub,
            sub,
            writer,
            st.latency,
            heartbeat=st.settings["heartbeat"],
            replay_limit=st.batch,
        )
    finally:
        st.streams.discard(task)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    st = request.app[STATE]
    if st.phase != "ready":
        raise _unavailable(st)
    batch = None
    if "batch" in request.query:
        text, most = request.query["batch"], st.settings["max_batch"]
        batch = ascii_int(text, 1, most)
        if batch is None:
            raise _bad(f"batch: must be an integer from 1 to {most}, got {text!r}")
    after, after_epoch = _resume(st, request)
    flt = _filter(st, request, WS_PARAMS)
    principal, scope = _scope(st, request, flt)
    ws = web.WebSocketResponse(
        heartbeat=st.settings["heartbeat"],
        compress=st.settings["ws_compress"],
        max_msg_size=1 << 16,
    )
    ws.headers["Ringstream-Epoch"] = st.epoch
    cap_send_buffer(request.transport, st.settings["send_buffer"])
    await ws.prepare(request)
    ws_writer = WsWriter(ws, batch, bool(ws.compress))
    try:
        after = await _catch_up(st, ws_writer, after, after_epoch, flt, scope)
    except ConnectionError:
        return ws
    sub = st.hub.subscribe(
        "ws", _peer(request), flt, after, after_epoch, scope=scope, principal=principal
    )
    expiry = _guard(st, principal, sub)
    sender = asyncio.create_task(_run_stream(st, sub, ws_writer))
    reason = "client"
    try:
        await _read_messages(st, sub, ws, sender)
        if sender.done() and not sender.cancelled() and sender.exception() is None:
            reason = sub.closed or "client"
    finally:
        if expiry is not None:
            expiry.cancel()
        if not sender.done():
            sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        reason = sub.closed if sub.closed in ("shutdown", "slow", *END_REASONS) else reason
        st.hub.unsubscribe(sub, reason)
        code = {
            "shutdown": WSCloseCode.GOING_AWAY,
            "slow": WSCloseCode.POLICY_VIOLATION,
            **END_REASONS,
        }
        if not ws.closed:
            try:
                # a client that reads nothing cannot take a close frame either
                async with asyncio.timeout(2.0):
                    if reason in END_REASONS:
                        await ws.send_frame(orjson.dumps(end_marker(reason)), WSMsgType.TEXT)
                    await ws.close(code=code.get(reason, WSCloseCode.OK), message=reason.encode())
            except (TimeoutError, ConnectionResetError):
                if request.transport is not None:
                    request.transport.abort()
    return ws


async def _read_messages(
    st: State, sub: Subscriber, ws: web.WebSocketResponse, sender: asyncio.Task[None]
) -> None:
    """Client messages until it goes, or the sender ends (shutdown or too slow)."""
    while True:
        receive = asyncio.ensure_future(ws.receive())
        done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
        if receive not in done:
            receive.cancel()
            return
        msg = receive.result()
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            if isinstance(ws.exception(), TimeoutError):
                # no pong within heartbeat / 2: a client that reads nothing,
                # not one that left
                sub.close("slow")
            return
        if msg.type != WSMsgType.TEXT:
            await _ws_error(ws, "messages must be JSON text frames")
            continue
        try:
            request = orjson.loads(msg.data)
        except orjson.JSONDecodeError as e:
            await _ws_error(ws, f"not JSON: {e}")
            continue
        if not isinstance(request, dict) or set(request) != {"filter"}:
            await _ws_error(
                ws,
                'expected {"filter": {...}} (or {"filter": null} for everything), '
                f"got {msg.data[:200]!r}",
            )
            continue
        try:
            flt = st.filters.parse_json(request["filter"])
            # the echo first: a filter that cannot be echoed is not applied
            ack = orjson.dumps({"type": "filter", "filter": flt.spec if flt else None})
        except FilterError as e:
            await _ws_error(ws, str(e))
            continue
        except orjson.JSONEncodeError as e:
            await _ws_error(ws, f"filter: cannot be echoed back ({e})")
            continue
        out = sub.principal.scope.refuses(flt) if sub.principal is not None else None
        if out is not None:
            if st.auth is not None:
                st.auth.refuse("scope", out, sub.peer, "/ws", sub.principal.name)
            await _ws_error(ws, out)
            continue
        sub.filter = flt
        await ws.send_frame(ack, WSMsgType.TEXT)


async def _ws_error(ws: web.WebSocketResponse, message: str) -> None:
    await ws.send_frame(orjson.dumps({"type": "error", "error": message}), WSMsgType.TEXT)


async def query(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.feed is not None:
        body: dict[str, Any] = st.feed.status()
        return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())
    q = st.ring.query()
    body = {name: getattr(q, name) for name in type(q).__match_args__}
    body["epoch"] = st.epoch
    if st.forwarder is not None:
        body["forward"] = st.forwarder.status()
    return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())


async def healthz(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.consumer is not None and st.consumer.corrupt is not None:
        return web.json_response({"status": "unhealthy", "error": st.consumer.corrupt}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.json_response({"status": st.phase}, status=200 if st.phase == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def reload_config(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.reload is None:
        raise _unavailable(st)
    status, body = await st.reload("http")
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())


PAGE = web.AppKey("page", Page)


async def landing(request: web.Request) -> web.Response:
    """The live page for a browser; the text index for curl and the rest."""
    page = request.app[PAGE]
    if page.wants(request):
        return page.page(request)
    return web.Response(text=LANDING, headers={"Vary": "Accept"})


def make_app(st: State, middlewares: Sequence[Any] = ()) -> web.Application:
    app = web.Application(middlewares=middlewares)
    app[STATE] = st
    app[PAGE] = page = Page()
    app.router.add_get("/", landing)
    app.router.add_get("/static/{name:.+}", page.static)
    app.router.add_get("/events", events)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/query", query)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/-/reload", reload_config)
    return app
