"""A logging handler that writes each log record into a ring, as JSON.

    import logging, ringcore.logging
    logging.getLogger().addHandler(ringcore.logging.RingHandler("/run/ringstream/ring.sock"))

Every process that logs through one (gunicorn or uvicorn workers, a
multiprocessing pool) writes into the same ring, so their logs arrive in one
ordered stream, each record with its pid::

    {"id": 4096, "ts_ns": ..., "type": "log", "level": "WARNING",
     "logger": "app.db", "message": "slow query", "pid": 4711, ...}

It never blocks the application: a record that finds the ring full is
dropped and counted (`dropped` here; the ring counts it as a reservation
failure, which the service exports as ringstream_reserve_failures_total), and
so is one larger than the ring can ever hold (`oversize` too).
The handler attaches by path (ringcore.attach) or takes a Ring: one handed
to a worker process, or inherited across fork, where the ring's handle
turns into a producer in the child.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson

from ringcore import Ring, frames
from ringcore.attach import attach

# LogRecord attributes that are not the caller's `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class RingHandler(logging.Handler):
    """Writes log records into `ring` (a Ring, or the path a ring is served
    at) as JSON records of type `type_name`."""

    def __init__(
        self,
        ring: Ring | str | os.PathLike[str],
        *,
        type_name: str = "log",
        level: int = logging.NOTSET,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(level)
        self._owned = not isinstance(ring, Ring)
        self.ring: Ring = attach(ring, timeout=timeout) if not isinstance(ring, Ring) else ring
        self.type_name = type_name
        self._formatter = logging.Formatter()
        self.written = 0
        self.dropped = 0  # the ring was full, or the record larger than it can hold
        self.oversize = 0

    def to_json(self, record: logging.LogRecord) -> bytes:
        """The record's JSON object: where it comes from, what it says, and
        the caller's `extra=` fields."""
        obj: dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "process": record.processName,
            "thread": record.threadName,
            "file": record.pathname,
            "line": record.lineno,
            "function": record.funcName,
        }
        if record.exc_info:
            obj["exception"] = self._formatter.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = record.stack_info
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in obj:
                obj[key] = value
        return orjson.dumps(obj, default=repr, option=orjson.OPT_NON_STR_KEYS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = frames.json_record(
                self.to_json(record), self.type_name, int(record.created * 1e9)
            )
            if len(data) > self.ring.max_record_size:
                # a record the ring can never hold: dropped, counted, not raised
                self.oversize += 1
                self.dropped += 1
            elif self.ring.output(data):
                self.written += 1
            else:
                self.dropped += 1
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        try:
            if self._owned and not self.ring.closed:
                self.ring.close()
        finally:
            super().close()


__all__ = ["RingHandler"]
