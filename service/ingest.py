"""POST /ingest: JSON records over HTTP, into the ring (off unless ingest.enabled).

    curl --data-binary @events.ndjson localhost:8080/ingest        # NDJSON
    curl -H 'Content-Type: application/json' -d '[{"a":1},{"a":2}]' localhost:8080/ingest
    curl -d '{"type":"deploy","app":"web"}' 'localhost:8080/ingest?type=ops'

The body is one JSON object per line (NDJSON; blank lines skipped), or, with
Content-Type: application/json or a body that starts with "[", one object
or an array of objects. Each object becomes one JSON record
(ringcore/frames.py): its own "type", else ?type=NAME, else ingest.type.

All or nothing per record, and in order: the whole body is checked first (a
400 names the line or index and what is wrong, and nothing is written; a
413 when the body outgrows ingest.max_body or a record the ring's largest),
then the records go in one by one. When the ring is full the rest are
refused: 429 with Retry-After and the exact count that went in, so a client
resends from there; no record is ever half-written. The answer is JSON:
{"accepted": N} or {"accepted": N, "refused": M, "error": ...}.

Counted: ringstream_ingest_records_total{result} (accepted, or refused by
reason) and, for a full ring, ringstream_reserve_failures_total{source="ingest"}
as for every producer.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

import ringcore
from ringcore import frames
from service.filters import is_type_name
from service.schema import no_constant

log = logging.getLogger("ringstream.ingest")

RETRY_AFTER = "1"  # seconds: the consumer drains a full ring in well under that
REASONS = ("ring_full", "invalid", "too_large", "disabled", "unavailable")


class BodyError(Exception):
    """The body cannot be taken: (HTTP status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Ingest(Collector):
    """The endpoint's settings (the [ingest] section, swapped by a reload)
    and its counts."""

    def __init__(
        self, ring: ringcore.Ring, settings: Mapping[str, Any], ready: Callable[[], bool]
    ) -> None:
        self.ring = ring
        self.settings = settings
        # records written once the consumer has drained for the last time
        # would be lost: while starting or stopping, 503
        self.ready = ready
        self.accepted = 0
        self.refused: Counter[str] = Counter(dict.fromkeys(REASONS, 0))

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily(
            "ringstream_ingest_records_total",
            "Records POSTed to /ingest: accepted into the ring, or refused and why "
            "(ring_full: 429; invalid: 400; too_large: 413; disabled: ingest is off; "
            "unavailable: 503 while starting or stopping).",
            labels=["result"],
        )
        c.add_metric(["accepted"], self.accepted)
        for reason in REASONS:
            c.add_metric([f"refused_{reason}"], self.refused[reason])
        yield c

    async def handle(self, request: web.Request) -> web.Response:
        s = self.settings
        if not s["enabled"]:
            self.refused["disabled"] += 1
            return _answer(
                404,
                {
                    "error": "POST /ingest is off: set ingest.enabled = true "
                    "(or RINGSTREAM_INGEST_ENABLED=true) to take records over HTTP"
                },
            )
        if not self.ready():
            self.refused["unavailable"] += 1
            return _answer(
                503,
                {"error": "the service is starting or stopping: nothing written", "accepted": 0},
                {"Retry-After": RETRY_AFTER},
            )
        try:
            type_name = _type_name(request.query.get("type", s["type"]))
            body = await _read(request, s["max_body"])
            payloads = parse_body(body, request.content_type)
            records = [frames.json_record(p, type_name) for p in payloads]
            _fits(records, self.ring.max_record_size)
        except BodyError as e:
            self.refused["too_large" if e.status == 413 else "invalid"] += 1
            log.info(
                "ingest refused",
                extra={"event": "ingest_refused", "peer": request.remote, "error": str(e)},
            )
            return _answer(e.status, {"error": str(e), "accepted": 0})
        accepted = self.ring.output_many(records) if records else 0
        self.accepted += accepted
        if accepted == len(records):
            return _answer(200, {"accepted": accepted})
        refused = len(records) - accepted
        self.refused["ring_full"] += refused
        log.info(
            "ingest: ring full",
            extra={
                "event": "ingest_ring_full",
                "peer": request.remote,
                "accepted": accepted,
                "refused": refused,
            },
        )
        return _answer(
            429,
            {
                "accepted": accepted,
                "refused": refused,
                "error": f"the ring is full: the first {accepted} records went in, "
                f"the {refused} after them did not; send those again after Retry-After",
            },
            {"Retry-After": RETRY_AFTER},
        )


def _answer(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body) + b"\n",
        content_type="application/json",
        headers=headers,
    )


def _type_name(name: str) -> str:
    if name and not is_type_name(name):
        raise BodyError(
            400, f"type: up to {frames.MAX_NAME} letters, digits and _ . : / -, got {name!r}"
        )
    return name


async def _read(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(
            413, f"body of {request.content_length} bytes: more than ingest.max_body ({limit})"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise BodyError(413, f"body of more than ingest.max_body ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(body: bytes, content_type: str) -> list[bytes]:
    """The payloads (one JSON object's text each) of an NDJSON body, or of a
    JSON one (an object or an array of objects); BodyError(400) names the
    first line or index that is not an object.

    An NDJSON line goes into the ring as it came (the consumer's check is
    the one that counts, and drops the whitespace); the members of an array
    are written anew, from the stdlib's reading, which keeps every digit of
    an integer (orjson reads one past 64 bits as a float)."""
    if content_type == "application/json" or body.lstrip()[:1] == b"[":
        try:
            value = json.loads(body, parse_constant=no_constant)
        except (ValueError, RecursionError) as e:
            raise BodyError(400, f"body: not JSON: {e}") from None
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                where = f"[{i}]" if isinstance(value, list) else "body"
                raise BodyError(400, f"{where}: a record is a JSON object, got {_kind(item)}")
        return [_dumps(item) for item in items]
    out = []
    for n, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            item = _loads(line)
        except ValueError as e:
            raise BodyError(400, f"line {n}: not JSON: {e}") from None
        if not isinstance(item, dict):
            raise BodyError(400, f"line {n}: a record is a JSON object, got {_kind(item)}")
        out.append(line)
    return out


def _loads(text: bytes) -> Any:
    """orjson, and the stdlib for the valid JSON orjson refuses (integers
    past 64 bits, lone surrogate escapes), still refusing NaN and Infinity."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        try:
            return json.loads(text, parse_constant=no_constant)
        except (ValueError, RecursionError):
            raise ValueError(str(e)) from None


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # integers past 64 bits, lone surrogates: the stdlib writes them
        return json.dumps(obj, separators=(",", ":")).encode()


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _fits(records: list[bytes], max_size: int) -> None:
    for i, r in enumerate(records):
        if len(r) > max_size:
            raise BodyError(
                413,
                f"record {i} (0-based) is {len(r)} bytes with its header: more than the "
                f"ring's largest record ({max_size} bytes); nothing was written",
            )


__all__ = ["Ingest", "parse_body"]
