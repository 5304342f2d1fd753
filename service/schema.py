"""Record schemas: parsing them, and decoding records by them into JSON.

The schema format is the TOML of config/schemas.toml (its header comment is
the spec): a list of ``{type, name, fields}`` tables, each field
``{name, kind, size?, encoding?, enum?}``, packed after the 16-byte header of
service/record.py in declaration order. Mistakes are reported as
:class:`SchemaError` naming the exact key (``schemas[2].fields[4].kind: ...``),
unknown keys included: a typo must not silently become a default.

Two decoders share the JSON shape below. :func:`decode_record` /
:func:`encode_record` are the Python reference (struct + dict + orjson);
:func:`compile_encoder` builds the C encoder (``ringcore.Encoder``) the
service runs, which the tests hold to the reference. One record becomes::

    {"id": pos, "ts_ns": header ts, "type": "<schema name>",
     <fields in order, pads skipped>, "_extra": base64 (bytes past the schema)}

JSON and text records (ringcore/frames.py, the two type ids no schema may
take) need no schema: the object's members merged into the envelope, or
{"line": ...}; _decode_builtin is their reference. A record that cannot be
decoded (unframed, unknown type, shorter than its schema, a JSON record that
does not parse) is delivered raw, stamped with the time the consumer took it::

    {"id": pos, "ts_ns": now, "type": "raw", "type_id": N (framed only),
     "error": why it is raw, "raw": base64}
"""

from __future__ import annotations

import base64
import difflib
import json
import math
import re
import struct
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from os import PathLike
from types import MappingProxyType
from typing import Any

import orjson

import ringcore
from ringcore.frames import BUILTIN_TYPES, TEXT_TYPE
from service.record import HEADER_SIZE, parse_header

# kind -> (struct code, size); char/bytes/pad take their size from the schema
FIXED_KINDS: dict[str, tuple[str, int]] = {
    "u8": ("B", 1),
    "u16": ("H", 2),
    "u32": ("I", 4),
    "u64": ("Q", 8),
    "i8": ("b", 1),
    "i16": ("h", 2),
    "i32": ("i", 4),
    "i64": ("q", 8),
    "f32": ("f", 4),
    "f64": ("d", 8),
}
SIZED_KINDS = ("char", "bytes", "pad")
KINDS = (*FIXED_KINDS, *SIZED_KINDS)
INT_KINDS = frozenset(k for k in FIXED_KINDS if k[0] in "ui")
ENCODINGS = ("hex", "base64")

# Keys of the JSON envelope (and of raw records): a field of the same name
# would be shadowed by, or shadow, the envelope's key.
JSON_MAX_DEPTH = 128  # encode.h's ENC_JSON_MAX_DEPTH
RESERVED_NAMES = ("id", "ts_ns", "type", "type_id", "error", "raw", "_extra")
RAW_NAME = "raw"  # the "type" of records delivered raw
# as ringcore's RC_MAX_RECORD_SZ: a record longer than this cannot exist
MAX_RECORD_SIZE = 0xFFFFFFFF // 4

_SCHEMA_KEYS = ("type", "name", "fields")
_FIELD_KEYS = ("name", "kind", "size", "encoding", "enum")
# TOML keys are strings: "0" = "name"; hex for flag-like values
_ENUM_KEY = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|[0-9]+)")


class SchemaError(ValueError):
    """A schema definition that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # one of KINDS
    offset: int  # from the start of the record (the header included)
    size: int
    encoding: str | None = None  # bytes only: "hex" or "base64"
    # integer kinds only: value -> name (read-only)
    enum: Mapping[int, str] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Schema:
    type_id: int
    name: str
    fields: tuple[Field, ...]
    size: int  # the header and every field: the shortest record decoded by it
    # compiled by __post_init__ for decode_record(): one struct for the whole
    # record, and a converter (or None) per value it yields
    _struct: struct.Struct = field(init=False, repr=False, compare=False, hash=False)
    _values: tuple[tuple[str, Callable[[Any], Any] | None], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        fmt = [f"<{HEADER_SIZE}x"]
        values = []
        at = HEADER_SIZE
        for f in self.fields:
            if f.offset != at:
                raise SchemaError(
                    f"schema {self.name!r}: field {f.name!r} at offset {f.offset}, expected {at} "
                    "(fields are packed in order, no implicit padding)"
                )
            at += f.size
            if f.kind == "pad":
                fmt.append(f"{f.size}x")
                continue
            fmt.append(FIXED_KINDS[f.kind][0] if f.kind in FIXED_KINDS else f"{f.size}s")
            values.append((f.name, _converter(f)))
        if at != self.size:
            raise SchemaError(f"schema {self.name!r}: size {self.size}, fields end at {at}")
        object.__setattr__(self, "_struct", struct.Struct("".join(fmt)))
        object.__setattr__(self, "_values", tuple(values))


def _converter(f: Field) -> Callable[[Any], Any] | None:
    if f.enum is not None:
        names = dict(f.enum)
        return lambda v: names.get(v, v)
    if f.kind in ("f32", "f64"):
        return lambda v: v if math.isfinite(v) else None
    if f.kind == "char":
        return lambda v: v.split(b"\0", 1)[0].decode("utf-8", "replace")
    if f.kind == "bytes":
        if f.encoding == "hex":
            return bytes.hex
        return lambda v: base64.b64encode(v).decode("ascii")
    return None  # integers are JSON as they come


# --- parsing ----------------------------------------------------------------


def _listing(names: tuple[str, ...]) -> str:
    return ", ".join(names)


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SchemaError(f"{where}.{key}: unknown key (expected {_listing(allowed)}){hint}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name(table: dict[str, Any], where: str, what: str) -> str:
    if "name" not in table:
        raise SchemaError(f"{where}.name: missing: every {what} needs a name")
    return _text(table["name"], f"{where}.name", "a non-empty string")


def _text(value: object, at: str, expected: str) -> str:
    """A name that JSON output can carry: a non-empty, UTF-8 encodable str."""
    if not isinstance(value, str) or not value:
        raise SchemaError(f"{at}: expected {expected}, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SchemaError(f"{at}: not encodable as UTF-8: {value!r}") from e
    return value


def _int_range(kind: str) -> tuple[int, int]:
    bits = FIXED_KINDS[kind][1] * 8
    if kind[0] == "u":
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _parse_enum(raw: object, kind: str, where: str) -> Mapping[int, str]:
    if kind not in INT_KINDS:
        raise SchemaError(f"{where}: only integer fields take an enum, this one is {kind}")
    if not isinstance(raw, dict):
        raise SchemaError(
            f'{where}: expected a table of value = name ({{ "0" = "name" }}), got {raw!r}'
        )
    lo, hi = _int_range(kind)
    out: dict[int, str] = {}
    keys: dict[int, object] = {}
    for key, name in raw.items():
        at = f"{where}.{key!r}" if not isinstance(key, str) else f'{where}."{key}"'
        if _is_int(key):
            value = key
        elif isinstance(key, str) and _ENUM_KEY.fullmatch(key):
            value = int(key, 0) if not re.fullmatch(r"[+-]?0[0-9]+", key) else int(key, 10)
        else:
            raise SchemaError(
                f'{at}: enum keys must be integers (written "0" = "name" in TOML), got {key!r}'
            )
        if not lo <= value <= hi:
            raise SchemaError(f"{at}: {value} is out of range for {kind} ({lo}..{hi})")
        if value in out:
            raise SchemaError(f"{at}: the value {value} is listed twice (also as {keys[value]!r})")
        out[value] = _text(name, at, "a non-empty string (the value's name)")
        keys[value] = key
    return MappingProxyType(out)


def _parse_field(raw: object, offset: int, where: str) -> Field:
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: expected a table {{ name = ..., kind = ... }}, got {raw!r}")
    _check_keys(raw, _FIELD_KEYS, where)
    name = _name(raw, where, "field")
    if name in RESERVED_NAMES:
        raise SchemaError(
            f"{where}.name: {name!r} is reserved for the record envelope "
            f"({_listing(RESERVED_NAMES)})"
        )
    if "kind" not in raw:
        raise SchemaError(f"{where}.kind: missing (one of {_listing(KINDS)})")
    kind = raw["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise SchemaError(
            f"{where}.kind: unknown kind {kind!r} (expected one of {_listing(KINDS)})"
        )
    size = raw.get("size")
    if kind in FIXED_KINDS:
        natural = FIXED_KINDS[kind][1]
        if size is not None and size != natural:
            raise SchemaError(
                f"{where}.size: a {kind} is {natural} bytes, not {size!r} (leave size out)"
            )
        size = natural
    elif size is None:
        raise SchemaError(f"{where}.size: missing: a {kind} field needs size = N (bytes)")
    elif not _is_int(size) or size < 1:
        raise SchemaError(f"{where}.size: expected a positive integer, got {size!r}")
    elif size > MAX_RECORD_SIZE:
        raise SchemaError(f"{where}.size: {size} is larger than a record can be")
    encoding = raw.get("encoding")
    if kind == "bytes":
        if encoding is None:
            raise SchemaError(
                f'{where}.encoding: missing: a bytes field needs encoding = "hex" or "base64"'
            )
        if encoding not in ENCODINGS:
            raise SchemaError(
                f"{where}.encoding: unknown encoding {encoding!r} "
                f"(expected one of {_listing(ENCODINGS)})"
            )
    elif encoding is not None:
        raise SchemaError(
            f"{where}.encoding: only bytes fields take an encoding, this one is {kind}"
        )
    enum = raw.get("enum")
    if enum is not None:
        enum = _parse_enum(enum, kind, f"{where}.enum")
    return Field(name, kind, offset, size, encoding, enum)


def _parse_schema(raw: object, where: str) -> Schema:
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: expected a table {{ type, name, fields }}, got {raw!r}")
    _check_keys(raw, _SCHEMA_KEYS, where)
    if "type" not in raw:
        raise SchemaError(f"{where}.type: missing: every schema needs a type id (1..65533)")
    type_id = raw["type"]
    if not _is_int(type_id):
        raise SchemaError(f"{where}.type: expected an integer 1..65533, got {type_id!r}")
    if type_id == 0:
        raise SchemaError(f"{where}.type: 0 is reserved (records delivered raw)")
    if not 0 < type_id <= 0xFFFF:
        raise SchemaError(f"{where}.type: {type_id} is out of range (1..65533: the header's u16)")
    if type_id in BUILTIN_TYPES:
        raise SchemaError(
            f"{where}.type: {type_id} is taken by the built-in "
            f"{'text' if type_id == TEXT_TYPE else 'JSON'} records (schemas use 1..65533)"
        )
    name = _name(raw, where, "schema")
    if name == RAW_NAME:
        raise SchemaError(f"{where}.name: {name!r} is reserved (records delivered raw)")
    if "fields" not in raw:
        raise SchemaError(f"{where}.fields: missing (a list of {{ name, kind }} tables)")
    raw_fields = raw["fields"]
    if not isinstance(raw_fields, list):
        raise SchemaError(f"{where}.fields: expected a list of tables, got {raw_fields!r}")
    fields: list[Field] = []
    seen: dict[str, int] = {}
    offset = HEADER_SIZE
    for j, rf in enumerate(raw_fields):
        fw = f"{where}.fields[{j}]"
        f = _parse_field(rf, offset, fw)
        if f.name in seen:
            raise SchemaError(
                f"{fw}.name: duplicate field name {f.name!r} (also fields[{seen[f.name]}])"
            )
        seen[f.name] = j
        offset += f.size
        if offset > MAX_RECORD_SIZE:
            raise SchemaError(
                f"{fw}.size: the schema reaches {offset} bytes, more than a record can be "
                f"({MAX_RECORD_SIZE})"
            )
        fields.append(f)
    return Schema(type_id, name, tuple(fields), offset)


def parse_schemas(entries: list[dict[str, Any]], where: str = "schemas") -> list[Schema]:
    """Schemas from their definitions (the [[schemas]] tables of a TOML file).

    Raises SchemaError naming the key at fault, e.g.
    ``schemas[2].fields[4].kind: unknown kind 'u128' (expected one of u8, ...)``.
    """
    if not isinstance(entries, list):
        raise SchemaError(f"{where}: expected a list of schema tables, got {entries!r}")
    out: list[Schema] = []
    by_type: dict[int, int] = {}
    by_name: dict[str, int] = {}
    for i, raw in enumerate(entries):
        w = f"{where}[{i}]"
        s = _parse_schema(raw, w)
        if s.type_id in by_type:
            j = by_type[s.type_id]
            raise SchemaError(
                f"{w}.type: duplicate type {s.type_id} (also {where}[{j}], {out[j].name!r})"
            )
        if s.name in by_name:
            raise SchemaError(
                f"{w}.name: duplicate name {s.name!r} (also {where}[{by_name[s.name]}])"
            )
        by_type[s.type_id] = i
        by_name[s.name] = i
        out.append(s)
    return out


def load_schema_file(path: str | PathLike[str]) -> list[Schema]:
    """The schemas of a TOML file like config/schemas.toml; errors name the file."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SchemaError(f"{path}: {e}") from e
    except OSError as e:
        raise SchemaError(f"{path}: cannot read: {e.strerror or e}") from e
    return _load_doc(doc, str(path))


def _load_doc(doc: dict[str, Any], source: str) -> list[Schema]:
    for key in doc:
        if key != "schemas":
            raise SchemaError(f"{source}: {key}: unknown key (expected schemas)")
    return parse_schemas(doc.get("schemas", []), f"{source}: schemas")


def builtin_schemas() -> list[Schema]:
    """The schemas shipped in the package (config/schemas.toml)."""
    res = resources.files("service.config") / "schemas.toml"
    return _load_doc(tomllib.loads(res.read_text(encoding="utf-8")), "schemas.toml")


def by_type(schemas: list[Schema]) -> dict[int, Schema]:
    """The type id -> schema table decode_record() takes."""
    return {s.type_id: s for s in schemas}


# --- the Python reference decoder -------------------------------------------


def _b64(data: bytes | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


# ringcore/src/encode.c's ENC_UNFRAMED and ENC_UNKNOWN_TYPE, word for word
UNFRAMED = "unframed: no RS record header"
UNKNOWN_TYPE = "unknown type: no schema has this type_id"


def decode_record(schemas: dict[int, Schema], pos: int, data: bytes, now_ns: int) -> dict[str, Any]:
    """One record as the dict its JSON is made of (see the module docstring)."""
    head = parse_header(data)
    if head is None:
        return {"id": pos, "ts_ns": now_ns, "type": RAW_NAME, "error": UNFRAMED, "raw": _b64(data)}
    type_id, ts_ns = head
    schema = schemas.get(type_id)
    if schema is None and type_id in BUILTIN_TYPES:
        return _decode_builtin(pos, data, ts_ns, now_ns, type_id)
    if schema is None:
        return {
            "id": pos,
            "ts_ns": now_ns,
            "type": RAW_NAME,
            "type_id": type_id,
            "error": UNKNOWN_TYPE,
            "raw": _b64(data),
        }
    if len(data) < schema.size:
        return {
            "id": pos,
            "ts_ns": now_ns,
            "type": RAW_NAME,
            "type_id": type_id,
            "error": f"short record: {len(data)} bytes, schema {schema.name} needs {schema.size}",
            "raw": _b64(data),
        }
    rec: dict[str, Any] = {"id": pos, "ts_ns": ts_ns, "type": schema.name}
    for (name, conv), value in zip(schema._values, schema._struct.unpack_from(data), strict=True):
        rec[name] = value if conv is None else conv(value)
    if len(data) > schema.size:
        rec["_extra"] = _b64(data[schema.size :])
    return rec


def _raw(pos: int, data: bytes, now_ns: int, type_id: int, error: str) -> dict[str, Any]:
    return {
        "id": pos,
        "ts_ns": now_ns,
        "type": RAW_NAME,
        "type_id": type_id,
        "error": error,
        "raw": _b64(data),
    }


def no_constant(name: str) -> None:
    """json.loads' parse_constant: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def _depth(value: object, depth: int = 1) -> int:
    if isinstance(value, dict):
        return max((_depth(v, depth + 1) for v in value.values()), default=depth)
    if isinstance(value, list):
        return max((_depth(v, depth + 1) for v in value), default=depth)
    return depth - 1


def _decode_builtin(pos: int, data: bytes, ts_ns: int, now_ns: int, type_id: int) -> dict[str, Any]:
    """ringcore/frames.py's text and JSON records (encode.c's put_builtin).
    The error texts of invalid JSON are Python's, not the C encoder's: both
    start with "invalid JSON"."""
    if len(data) < HEADER_SIZE + 1 or len(data) < HEADER_SIZE + 1 + data[HEADER_SIZE]:
        return _raw(pos, data, now_ns, type_id, "short record: its type name runs past the end")
    n = data[HEADER_SIZE]
    name = data[HEADER_SIZE + 1 : HEADER_SIZE + 1 + n].decode("utf-8", "replace")
    body = data[HEADER_SIZE + 1 + n :]
    if type_id == TEXT_TYPE:
        line = body.decode("utf-8", "replace")
        return {"id": pos, "ts_ns": ts_ns, "type": name or "text", "line": line}
    try:
        obj = json.loads(body.decode(), parse_constant=no_constant, object_pairs_hook=_Obj)
        if not isinstance(obj, _Obj):
            raise ValueError("not an object")
        if _depth(obj) > JSON_MAX_DEPTH:
            raise ValueError(f"nested deeper than {JSON_MAX_DEPTH} levels")
    except (ValueError, RecursionError) as e:
        return _raw(pos, data, now_ns, type_id, f"invalid JSON: {e}")
    rec: dict[str, Any] = {"id": pos, "ts_ns": ts_ns, "type": name or "json"}
    # member by member, duplicates included, as encode.c reads them
    for key, value in obj.pairs:
        if key == "type" and isinstance(value, str):
            rec["type"] = value
        elif key in ("id", "ts_ns", "type"):
            rec["_" + key] = value
        else:
            rec[key] = value
    return rec


class _Obj(dict[str, Any]):
    """A JSON object that keeps its members as given (json's object_pairs_hook)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def encode_record(schemas: dict[int, Schema], pos: int, data: bytes, now_ns: int) -> bytes:
    """One record's JSON: orjson.dumps(decode_record(...))."""
    return orjson.dumps(decode_record(schemas, pos, data, now_ns))


def encoder_spec(
    schemas: list[Schema],
) -> list[tuple[int, str, list[tuple[str, str, int, int, str | None, dict[int, str] | None]]]]:
    """The argument ringcore.Encoder takes for these schemas."""
    return [
        (
            s.type_id,
            s.name,
            [
                (
                    f.name,
                    f.kind,
                    f.offset,
                    f.size,
                    f.encoding,
                    None if f.enum is None else dict(f.enum),
                )
                for f in s.fields
            ],
        )
        for s in schemas
    ]


def compile_encoder(schemas: list[Schema]) -> ringcore.Encoder:
    """The C encoder for these schemas: the JSON of encode_record(), 15-20x as fast."""
    return ringcore.Encoder(encoder_spec(schemas))
