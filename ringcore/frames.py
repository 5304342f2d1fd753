"""Records that need no schema: JSON objects and lines of text.

Any producer can write them; the service's encoder (ringcore.Encoder)
delivers them as JSON without a schema configured::

    json_record(b'{"user": {"id": 7}, "type": "login"}')
      -> {"id": POS, "ts_ns": TS, "type": "login", "user": {"id": 7}}
    text_record(b"disk full", type_name="syslog")
      -> {"id": POS, "ts_ns": TS, "type": "syslog", "line": "disk full"}

A JSON record's type is the object's own "type" string, else the
`type_name` it was written with, else "json" (a text line's: `type_name`,
else "text"). The envelope owns "id" and "ts_ns": the object's members of
those names (and a "type" that is not a string) arrive with a leading
underscore. An object that does not parse arrives raw, with the reason and
the byte it failed at, and is counted (ringstream_decoded_records_total
{result="raw_invalid_json"}): never dropped.

Layout, after the 16-byte header of service/record.py (ringcore/src/encode.h
has the same picture)::

    0        16     17          17+n
    +--------+------+-----------+-------------------------
    | header | n u8 | name[n]   | payload ...
    +--------+------+-----------+-------------------------

The payload is taken as it is: the check happens once, in the consumer,
which has to check anyway (any process on the ring may write anything).
"""

from __future__ import annotations

import struct
import time

MAGIC = b"RS"
HEADER = struct.Struct("<2sHIQ")  # service/record.py's header
TEXT_TYPE = 0xFFFE
JSON_TYPE = 0xFFFF
BUILTIN_TYPES = (TEXT_TYPE, JSON_TYPE)
MAX_NAME = 255  # UTF-8 bytes of a type name


def _name(type_name: str) -> bytes:
    name = type_name.encode()
    if len(name) > MAX_NAME:
        raise ValueError(f"type name {type_name[:40]!r}...: longer than {MAX_NAME} bytes")
    return bytes((len(name),)) + name


def prefix(type_id: int, type_name: str = "", ts_ns: int | None = None) -> bytes:
    """The bytes before the payload of a TEXT_TYPE or JSON_TYPE record."""
    ts = time.time_ns() if ts_ns is None else ts_ns
    return HEADER.pack(MAGIC, type_id, 0, ts) + _name(type_name)


def json_record(payload: bytes, type_name: str = "", ts_ns: int | None = None) -> bytes:
    """A record of one JSON object (its text, as it is)."""
    return prefix(JSON_TYPE, type_name, ts_ns) + payload


def text_record(line: bytes, type_name: str = "", ts_ns: int | None = None) -> bytes:
    """A record of one line of text (UTF-8; invalid bytes arrive as U+FFFD)."""
    return prefix(TEXT_TYPE, type_name, ts_ns) + line


__all__ = [
    "BUILTIN_TYPES",
    "JSON_TYPE",
    "TEXT_TYPE",
    "json_record",
    "prefix",
    "text_record",
]
