"""What a connection may cost before it is a request: the connection cap, the
header timeout, and aiohttp's own errors about malformed requests.

    accept ──> open < server.max_connections ? ──no──> 503, closed (_Refusal)
                    │ yes
                    v
               _Guarded(RequestHandler): a complete request head within
               server.header_timeout, else 408, closed
                    │ head parsed: the middleware disarms the timer
                    v
               aiohttp; between requests, server.idle_timeout (its keep-alive)

Every refusal is the client's doing: counted by reason in
ringstream_http_rejected_requests_total and logged at info or debug, never
error, so that nobody can flood the logs or trip error alerts from outside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("ringstream.http")

# the reasons, all exported from the start so that rate() sees the first one
REASONS = ("bad_request", "malformed", "origin", "header_timeout", "max_connections")
# how long a refused connection may take to send its request head, so that
# the 503 is read as an answer rather than lost to a reset
REFUSAL_GRACE = 1.0
HEAD_LIMIT = 16 << 10
FULL_LOG_INTERVAL = 10.0


def _response(status: str, error: str, extra: str = "") -> bytes:
    body = orjson.dumps({"error": error}) + b"\n"
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _error_of(e: web.HTTPException) -> str:
    try:
        return str(orjson.loads(e.text or "")["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return e.text or e.reason


class Rejections(Collector):
    """Requests and connections refused because of what the client did."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({r: 0 for r in REASONS})

    def add(self, reason: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        self.counts[reason] += 1
        log.log(level, message, extra={"event": "http_rejected", "reason": reason, **fields})

    def collect(self) -> Iterator[Metric]:
        m = CounterMetricFamily(
            "ringstream_http_rejected_requests",
            "Requests and connections refused for what the client sent or did, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self.counts.items()):
            m.add_metric([reason], n)
        yield m


class ConnectionGuard(Collector):
    """Wraps aiohttp's protocol factory (the runner's `server`) to bound what a
    connection may hold before it has sent a request."""

    def __init__(self, rejections: Rejections, server: Mapping[str, Any]) -> None:
        self.rejections = rejections
        self.open = 0
        self._waiting: dict[asyncio.BaseProtocol, _Guarded] = {}
        self._full_logged = 0.0
        self.configure(server)

    def configure(self, server: Mapping[str, Any]) -> None:
        """The [server] limits; at start and on reload (for new connections)."""
        self.max_connections: int = server["max_connections"]
        self.header_timeout: float = server["header_timeout"]

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if self.open >= self.max_connections:
                return _Refusal(self)
            return _Guarded(self, inner())

        return make

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        guarded = self._waiting.pop(request.protocol, None)
        if guarded is not None:
            guarded.disarm()
        try:
            return await handler(request)
        except web.HTTPBadRequest as e:
            self.rejections.add(
                "bad_request",
                "bad request",
                path=request.path,
                peer=request.remote,
                error=_error_of(e),
            )
            raise

    def refused(self, peer: object) -> None:
        now = time.monotonic()
        # one warning per burst: the counter has every refusal
        level = logging.DEBUG
        if now - self._full_logged >= FULL_LOG_INTERVAL:
            self._full_logged = now
            level = logging.WARNING
        self.rejections.add(
            "max_connections",
            f"connection refused: server.max_connections ({self.max_connections}) reached",
            level,
            peer=str(peer),
        )

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ringstream_http_connections",
            "Open HTTP connections (subscribers included), against server.max_connections.",
            value=self.open,
        )


class _Guarded(asyncio.Protocol):
    """aiohttp's RequestHandler behind a header timer; everything else is passed on."""

    __slots__ = ("guard", "inner", "timer", "transport")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.guard.open += 1
        self.transport = transport  # type: ignore[assignment]
        self.guard._waiting[self.inner] = self
        self.timer = asyncio.get_running_loop().call_later(
            self.guard.header_timeout, self._timed_out
        )
        self.inner.connection_made(transport)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        self.guard._waiting.pop(self.inner, None)
        t = self.transport
        if t is None or t.is_closing():
            return
        timeout = self.guard.header_timeout
        peer = t.get_extra_info("peername")
        self.guard.rejections.add(
            "header_timeout",
            "no complete request head in time",
            peer=str(peer[0] if isinstance(peer, tuple) else peer),
            seconds=timeout,
        )
        t.write(
            _response(
                "408 Request Timeout",
                f"no complete request head within server.header_timeout ({timeout:g} s)",
            )
        )
        t.close()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open -= 1
        self.disarm()
        self.guard._waiting.pop(self.inner, None)
        self.transport = None
        self.inner.connection_lost(exc)


class _Refusal(asyncio.Protocol):
    """A connection over the cap: read its request head (so the answer is not
    lost to a reset), answer 503, close."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.guard.refused(peer[0] if isinstance(peer, tuple) else peer)
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_GRACE, self._answer)

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head or len(self.head) > HEAD_LIMIT:
            self._answer()

    def _answer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(
            _response(
                "503 Service Unavailable",
                f"server.max_connections ({self.guard.max_connections}) reached: try again later",
                "Retry-After: 1\r\n",
            )
        )
        t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


class ClientErrorFilter(logging.Filter):
    """aiohttp logs a malformed request (a bad header, a bad chunk) and a
    client gone mid-request at error level with a traceback: the client's
    doing, so one info line without the traceback, counted."""

    def __init__(self, rejections: Rejections) -> None:
        super().__init__()
        self.rejections = rejections

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # at any level: aiohttp logs a bad method on a first request (TLS or
        # other non-HTTP traffic) at debug, and it counts as well
        if isinstance(exc, HttpProcessingError):
            message = " ".join((getattr(exc, "message", "") or str(exc)).split())[:300]
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
            self.rejections.add("malformed", "malformed request", peer=str(peer), error=message)
            return False
        if isinstance(exc, ConnectionError):
            log.debug("client gone mid-request", extra={"event": "client_gone", "error": str(exc)})
            return False
        # the logger passes everything to this filter: the service's level here
        return record.levelno >= logging.getLogger().getEffectiveLevel()


def install_log_filter(rejections: Rejections) -> Callable[[], None]:
    """Filter aiohttp.server's records; returns what removes the filter."""
    f = ClientErrorFilter(rejections)
    logger = logging.getLogger("aiohttp.server")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addFilter(f)

    def remove() -> None:
        logger.removeFilter(f)
        logger.setLevel(level)

    return remove


class GuardedRunner(web.AppRunner):
    """An AppRunner whose sites accept connections through `guard`."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard
        self._factory: Callable[[], asyncio.Protocol] | None = None

    @property
    def server(self) -> Any:
        # what TCPSite hands to loop.create_server: the guard's factory
        inner = super().server
        if inner is None:
            return None
        if self._factory is None:
            self._factory = self._guard.factory(inner)
        return self._factory
