"""JSON and text records -> JSON lines: the C encoder's strict check and
splice (ringcore/src/json.c) against doing it in Python.

    .venv/bin/python bench/json_bench.py

Records as ringcore.logging.RingHandler writes them (a log record of ~330
bytes: level, logger, message, pid, file, line, function, two extra fields),
a small object ({"user": {"id": N}, "action": "login"}, ~50 bytes) and text
lines (~60 bytes), 4096 distinct of each, cycled. Measured: records/s on one
core through Encoder.encode_many(), against the Python way (orjson.loads,
a check that it is an object, the envelope merged into a dict, orjson.dumps),
which is what the consumer would do per record without json.c. Each figure
is the median of --repeat runs; nothing here is a threshold. Text lines:
the Python way decodes the line and writes the record with orjson.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402
from machine import describe as describe_machine  # noqa: E402

import ringcore  # noqa: E402
from ringcore.frames import HEADER, json_record, text_record  # noqa: E402

DISTINCT = 4096


def log_records() -> list[bytes]:
    return [
        json_record(
            orjson.dumps(
                {
                    "level": "INFO",
                    "logger": "app.requests",
                    "message": f"GET /api/items/{i} 200 in {i % 97} ms",
                    "pid": 4000 + i % 8,
                    "process": "MainProcess",
                    "thread": "MainThread",
                    "file": "/srv/app/handlers.py",
                    "line": 120 + i % 40,
                    "function": "handle",
                    "request_id": f"{i:016x}",
                    "user": {"id": i, "role": "reader"},
                }
            ),
            "log",
        )
        for i in range(DISTINCT)
    ]


def small_records() -> list[bytes]:
    return [
        json_record(orjson.dumps({"user": {"id": i}, "action": "login"}), "app")
        for i in range(DISTINCT)
    ]


def text_records() -> list[bytes]:
    return [
        text_record(f"kernel: eth0 link up, {i} Mbps full duplex".encode()) for i in range(DISTINCT)
    ]


def python_way(pos: int, data: bytes) -> bytes:
    n = data[16]
    ts = HEADER.unpack_from(data)[3]
    obj = orjson.loads(data[17 + n :])
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    rec = {"id": pos, "ts_ns": ts, "type": obj.pop("type", None) or data[17 : 17 + n].decode()}
    rec.update(obj)
    return orjson.dumps(rec)


def python_text(pos: int, data: bytes) -> bytes:
    n = data[16]
    line = data[17 + n :].decode("utf-8", "replace")
    name = data[17 : 17 + n].decode() or "text"
    return orjson.dumps(
        {"id": pos, "ts_ns": HEADER.unpack_from(data)[3], "type": name, "line": line}
    )


def rate(fn, records: list[tuple[int, bytes]], repeat: int) -> float:  # type: ignore[no-untyped-def]
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(records)
        runs.append(len(records) / (time.perf_counter() - t))
    return statistics.median(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(describe_machine())
    enc = ringcore.Encoder([])
    print(f"{'records':34} {'C (json.c)':>14} {'Python':>14} {'ratio':>7}")
    for name, make in (
        ("RingHandler log records (~330 B)", log_records),
        ("small objects (~50 B)", small_records),
        ("text lines (~60 B)", text_records),
    ):
        distinct = make()
        pairs = [(8 * i, distinct[i % DISTINCT]) for i in range(args.records)]
        now = time.time_ns()
        c = rate(lambda rs, now=now: enc.encode_many(rs, now), pairs, args.repeat)
        way = python_text if name.startswith("text") else python_way
        py = rate(lambda rs, way=way: [way(p, d) for p, d in rs], pairs, args.repeat)
        print(f"{name:34} {c:>12,.0f}/s {py:>12,.0f}/s {c / py:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
