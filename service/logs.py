"""Structured logs: one JSON object per line on stderr (or plain text).

Every line has ts, level, logger and msg; whatever a call passes in
`extra=` (event, source, peer, ...) becomes more keys of the same object, so
the lines can be filtered with jq without parsing prose.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import orjson

# attributes every LogRecord has; anything else came from `extra=`
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extra(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:
            # orjson refuses integers beyond 64 bits (a client's id, say); a
            # log line must never be lost to the value it reports
            return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def setup(fmt: str, level: str) -> None:
    """Route the root logger (and aiohttp's) to stderr in `fmt` ("json" or "plain")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # one line per request would drown the events that matter at 'info'
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
