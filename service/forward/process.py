"""The edge's forwarder in a process of its own.

Forwarding costs about 8 us a record on the event loop that also consumes
the ring and writes to the subscribers: acks parsed one by one by nats-py,
frames built, bookkeeping. In the service's own loop, at 150 k records/s
that took the local subscriber from 148 k to 53 k records/s (bench/
forward_bench.py). Here the service hands each published batch to a child
process over a SOCK_SEQPACKET socket pair, and the child runs the
Forwarder (edge.py) on its own loop:

    service loop                           forwarding process
    Hub.publish -> offer(batch)            recv -> Forwarder.offer
      packed: ids, ts, types, lengths,       |  NATS, acks, retries, buffer
      the lines; one send per <= 60 KiB      |
      (non-blocking: socket full =  ---->    v
       dropped, counted, and the next   <----  status JSON, 4 a second
       chunk says how many)                    (/query, /metrics read it)

A datagram socket keeps each chunk whole: a send takes all of it or, full,
none (EAGAIN), so a chunk is never half written and never waited for.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from prometheus_client.core import Metric

from service.batch import Batch
from service.forward.edge import ForwardConfigError, metrics

log = logging.getLogger("ringstream.forward")

# kind (0 records, 1 stop), count, records lost before these, stop's seconds left
HEAD = struct.Struct("<BIQd")
CHUNK_BYTES = 60 * 1024
SOCKET_BUFFER = 8 * 1024 * 1024
STATUS_EVERY = 0.25
COUNTERS = ("forwarded", "duplicates", "dropped", "retries", "errors", "reconnects")


def _pack(batch: Batch, start: int, stop: int, lost: int) -> bytes:
    lines = batch.lines[start:stop]
    parts = [
        HEAD.pack(0, stop - start, lost, 0.0),
        array.array("q", batch.positions[start:stop]).tobytes(),
        array.array("q", batch.ts_ns[start:stop]).tobytes(),
        array.array("H", batch.types[start:stop]).tobytes(),
        array.array("I", map(len, lines)).tobytes(),
        *lines,
    ]
    return b"".join(parts)


def _unpack(data: bytes) -> tuple[int, int, float, Batch | None]:
    kind, n, lost, left = HEAD.unpack_from(data)
    if kind != 0 or n == 0:
        return kind, lost, left, None
    off = HEAD.size
    pos = array.array("q")
    pos.frombytes(data[off : off + 8 * n])
    off += 8 * n
    ts = array.array("q")
    ts.frombytes(data[off : off + 8 * n])
    off += 8 * n
    types = array.array("H")
    types.frombytes(data[off : off + 2 * n])
    off += 2 * n
    lengths = array.array("I")
    lengths.frombytes(data[off : off + 4 * n])
    off += 4 * n
    lines = []
    for length in lengths:
        lines.append(data[off : off + length])
        off += length
    return kind, lost, left, Batch.of(lines, pos, ts, types)


def _buffers(sock: socket.socket) -> None:
    for opt in (32, socket.SO_SNDBUF), (33, socket.SO_RCVBUF):  # *BUFFORCE as root
        for name in opt:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, name, SOCKET_BUFFER)
                break


class ForwardProcess:
    """What app.py holds: the Forwarder's interface, its work in a child."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        host: str,
        epoch: str,
        type_names: Mapping[int, str],
        log_cfg: Mapping[str, Any],
    ) -> None:
        self.args = (dict(cfg), host, epoch, dict(type_names), dict(log_cfg))
        self.status_: dict[str, Any] = {
            "state": "starting",
            "stream": cfg["stream"],
            "forwarded": 0,
            "duplicates": 0,
            "dropped": 0,
            "retries": 0,
            "errors": 0,
            "reconnects": 0,
            "buffer_bytes": 0,
            "buffer_limit": cfg["buffer_bytes"],
            "in_flight": 0,
            "acks": None,  # "batch" or "record", once the child has seen the stream
            "connected": False,
            "lag_records": 0,
            "lag_seconds": 0.0,
        }
        self.lost = 0  # dropped here (the socket full), not yet told to the child
        self.dropped_here = 0
        # the counts of children that died, so the counters only grow
        self.retired = dict.fromkeys(COUNTERS, 0)
        self._restart: asyncio.Task[None] | None = None
        self.sock: socket.socket | None = None
        self.proc: Any = None
        self._first: asyncio.Future[dict[str, Any]] | None = None
        self._stopped: asyncio.Future[dict[str, Any]] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _buffers(ours)
        _buffers(theirs)
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(
            target=forward_main, args=(theirs, *self.args), name="ringstream-forward", daemon=True
        )
        self.proc.start()
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._stopped = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            first = await asyncio.wait_for(self._first, timeout)
        except TimeoutError:
            self._kill()
            raise ForwardConfigError("forward: the forwarding process did not start") from None
        if first.get("event") == "failed":
            self._kill()
            raise ForwardConfigError(first["error"])

    def _kill(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(5)

    def _on_readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the child is gone
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                if self._first is not None and not self._first.done():
                    self._first.set_result({"event": "failed", "error": "forward: exited"})
                if self._stopped is not None and not self._stopped.done():
                    self._stopped.set_result({})
                if self.status_.get("state") not in ("stopped", "stopping"):
                    self._lost_child()
                return
            msg = orjson.loads(data)
            event = msg.pop("event", "status")
            if event in ("started", "status", "stopped"):
                self.status_.update(msg)
            if self._first is not None and not self._first.done():
                self._first.set_result({"event": event, **msg})
            if event == "stopped" and self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(msg)

    def _lost_child(self) -> None:
        """The child died: what it held is lost (counted, and said in the
        stream by the next chunk), and a new one starts."""
        held = int(self.status_.get("lag_records", 0))
        self.dropped_here += held
        self.lost += held
        for key in COUNTERS:
            self.retired[key] += int(self.status_.get(key, 0))
            self.status_[key] = 0
        for key in ("buffer_bytes", "in_flight", "lag_records", "lag_seconds"):
            self.status_[key] = 0
        self.status_.update(state="restarting", connected=False)
        log.error(
            "the forwarding process exited; starting another",
            extra={"event": "forward_process_exited", "lost": held},
        )
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._restart = asyncio.get_running_loop().create_task(self._again())

    async def _again(self) -> None:
        delay = 1.0
        while self.status_.get("state") == "restarting":
            await asyncio.sleep(delay)
            try:
                await self.start()
                return
            except ForwardConfigError as e:
                log.error(str(e), extra={"event": "forward_failed"})
                delay = min(30.0, delay * 2)

    def offer(self, batch: Batch) -> None:
        sock = self.sock
        if sock is None:
            self.dropped_here += len(batch)
            return
        lines = batch.lines
        i, n = 0, len(lines)
        while i < n:
            j, size = i, 0
            while j < n and (j == i or size + len(lines[j]) < CHUNK_BYTES):
                size += len(lines[j])
                j += 1
            try:
                sock.send(_pack(batch, i, j, self.lost))
                self.lost = 0
            except (BlockingIOError, OSError):
                # the child is behind by a whole socket buffer: these go,
                # counted, and the next chunk that gets through says so
                self.lost += j - i
                self.dropped_here += j - i
            i = j

    async def stop(self, deadline: float) -> None:
        self.status_["state"] = "stopping"
        if self._restart is not None:
            self._restart.cancel()
        if self.sock is not None and self.proc is not None and self.proc.is_alive():
            left = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(OSError):
                self.sock.setblocking(True)
                self.sock.send(HEAD.pack(1, 0, self.lost, left))
                self.sock.setblocking(False)
            assert self._stopped is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped, left + 3.0)
        if self.proc is not None:
            await asyncio.to_thread(self.proc.join, 5)
            if self.proc.is_alive():
                self.proc.kill()
        if self.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.status_["state"] = "stopped"
        self.status_["connected"] = False

    def status(self) -> dict[str, Any]:
        st = dict(self.status_)
        # the child counts its drops, this side its own (a full socket, a
        # dead child's buffer): both only ever grow
        for key in COUNTERS:
            st[key] = st.get(key, 0) + self.retired[key]
        st["dropped"] += self.dropped_here
        return st

    def collect(self) -> Iterator[Metric]:
        return metrics(self.status())


# --- the child ----------------------------------------------------------------


def forward_main(
    sock: socket.socket,
    cfg: dict[str, Any],
    host: str,
    epoch: str,
    type_names: dict[int, str],
    log_cfg: dict[str, Any],
) -> None:
    import setproctitle

    from service import logs
    from service.workers import _die_with_parent

    setproctitle.setproctitle("ringstream: forward")
    # up to buffer_bytes of records (400 k at 150 bytes) live here, each an
    # object the cyclic collector would walk again and again as the buffer
    # grows: at 150 k records/s that was a third of this process's CPU. They
    # hold no cycles; a collection every 50 k allocations still finds any.
    gc.set_threshold(50_000, 20, 100)
    logs.setup(log_cfg["format"], log_cfg["level"])
    # the service says when to stop (its shutdown flushes through here)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(_child(sock, cfg, host, epoch, type_names))
    os._exit(0)  # nothing left to flush; skip the interpreter's teardown


async def _child(
    sock: socket.socket,
    cfg: dict[str, Any],
    host: str,
    epoch: str,
    type_names: dict[int, str],
) -> None:
    from service.forward.edge import Forwarder

    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    def tell(event: str, body: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):
            sock.send(orjson.dumps({"event": event, **body}))

    fwd = Forwarder(cfg, host=host, epoch=epoch, type_names=type_names)
    try:
        await fwd.start()
    except ForwardConfigError as e:
        tell("failed", {"error": str(e)})
        return
    tell("started", fwd.status())
    stop: asyncio.Future[float] = loop.create_future()

    # a datagram longer than the buffer would be cut short, silently: the
    # buffer is the socket's own size, which no datagram can pass
    buf = bytearray(SOCKET_BUFFER + 4096)

    def readable() -> None:
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            data = bytes(memoryview(buf)[:n])
            if not data:  # the service is gone
                if not stop.done():
                    stop.set_result(0.0)
                return
            kind, lost, left, batch = _unpack(data)
            if lost:  # dropped by the service (counted there): said in the stream
                fwd.lost_unreported += lost
            if batch is not None:
                fwd.offer(batch)
            if kind == 1 and not stop.done():
                stop.set_result(left)

    loop.add_reader(sock.fileno(), readable)
    try:
        while not stop.done():
            await asyncio.wait({stop}, timeout=STATUS_EVERY)
            tell("status", fwd.status())
    finally:
        loop.remove_reader(sock.fileno())
    await fwd.stop(time.monotonic() + stop.result())
    st = fwd.status()
    st["state"] = "stopped"
    st["unforwarded"] = st["lag_records"]
    tell("stopped", st)
    sock.close()
