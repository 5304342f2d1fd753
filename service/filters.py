"""Subscriber filters: ?type=exec,exit  ?field.comm=bash  ?field.filename=/usr/*  ?sample=10.

All conditions must hold. `type` takes schema names, "raw", and the types
JSON and text records bring themselves (ringcore/frames.py: any name of
letters, digits and _ . : / -, since such a type is known only once its
first record comes); a `field.NAME` value ending in `*` matches as a prefix,
otherwise exactly (numbers compare by their JSON text: field.pid=42), and a
dotted NAME reaches into nested objects (field.user.id=7) when the record has
no member of that whole name; `sample=N` passes every Nth record that
matched the rest. Gap records (a source's marker where it lost events) pass
every filter. A filter keeps per-subscriber state (the sample counter), so
each subscriber gets its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ringcore.frames import BUILTIN_TYPES, MAX_NAME
from service.batch import Batch
from service.sources.gap import GAP_TYPE

# the keys every record has, besides its schema's fields
ENVELOPE_FIELDS = frozenset({"id", "ts_ns", "type", "type_id", "raw", "error", "_extra"})

# a type name a filter can name beyond the schemas' (those of JSON and text records)
OPEN_TYPE_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")


def is_type_name(name: str) -> bool:
    """Whether `name` can be a JSON or text record's type in a filter, a
    ?type= of /ingest or ingest.type: up to MAX_NAME of OPEN_TYPE_NAME."""
    return OPEN_TYPE_NAME.fullmatch(name) is not None and len(name) <= MAX_NAME


U64_MAX = (1 << 64) - 1  # the largest record id, and the largest sample
I64_MIN = -(1 << 63)  # with U64_MAX, the integers a record field (and orjson) can hold


def ascii_int(text: str, lo: int, hi: int) -> int | None:
    """`text` as an integer in [lo, hi] if it is ASCII digits only, else None.

    int() also takes a sign, spaces, underscores ("1_0") and any Unicode
    digit (Arabic-Indic three is 3); str.isdigit() takes superscripts that
    int() then refuses. None of these belongs in an id or a count.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(hi)):  # out of range, and int() of it could be slow
        return None
    n = int(digits)
    return n if lo <= n <= hi else None


def condition(value: object) -> tuple[str, bool] | None:
    """A field condition's (text, is_prefix): a string ("PREFIX*" for a
    prefix) or an integer a record field can hold; None for anything else.
    Filters and token scopes (service/auth/scope.py) read them alike."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    if isinstance(value, int) and not I64_MIN <= value <= U64_MAX:
        return None
    text = str(value)
    prefix = text.endswith("*")
    return (text[:-1] if prefix else text), prefix


class FilterError(ValueError):
    """A filter that cannot be applied; the message names the parameter."""


def load(line: bytes) -> Any:
    """A record's JSON. orjson refuses what JSON records may hold and the
    stdlib reads: integers past 64 bits, lone surrogate escapes."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)


@dataclass
class Filter:
    type_ids: frozenset[int] | None = None  # None: no type condition
    fields: tuple[tuple[str, str, bool], ...] = ()  # (name, value, is_prefix)
    sample: int = 1
    spec: dict[str, object] = field(default_factory=dict)  # as given, for echoing back
    type_names: frozenset[str] = frozenset()  # of JSON and text records
    _seen: int = 0
    _named: dict[int, bool] = field(default_factory=dict)

    def _named_type(self, type_id: int, line: bytes) -> bool:
        """Whether records of a schema's type_id carry a name of type_names:
        a schema added by a reload after this filter was made (read once per
        type id from its first record)."""
        hit = self._named.get(type_id)
        if hit is None:
            hit = self._named[type_id] = load(line).get("type") in self.type_names
        return hit

    def apply(self, batch: Batch) -> Batch:
        tids, names, fields, sample = self.type_ids, self.type_names, self.fields, self.sample
        types, lines = batch.types, batch.lines
        keep: list[int] = []
        for i in range(len(lines)):
            if types[i] == GAP_TYPE:
                # a source's loss marker: every subscriber must learn of it
                keep.append(i)
                continue
            obj = None
            if tids is not None and types[i] not in tids:
                if not names:
                    continue
                if types[i] in BUILTIN_TYPES:
                    # a JSON or text record's type is in its JSON only
                    obj = load(lines[i])
                    if obj["type"] not in names:
                        continue
                elif not self._named_type(types[i], lines[i]):
                    continue
            if fields and not _fields_match(
                load(lines[i]) if obj is None else obj, fields, lines[i]
            ):
                continue
            if sample > 1:
                self._seen += 1
                if (self._seen - 1) % sample:
                    continue
            keep.append(i)
        return batch.select(keep)


def _fields_match(
    obj: dict[str, object], fields: tuple[tuple[str, str, bool], ...], line: bytes
) -> bool:
    for name, want, prefix in fields:
        value = _field(obj, name)
        if isinstance(value, float):
            # orjson reads an integer past 64 bits as a float, digits lost:
            # a JSON record may hold one, and it compares by its own text
            value = _field(json.loads(line), name)
        if value is None:
            return False
        text = value if isinstance(value, str) else _text(value)
        if not (text.startswith(want) if prefix else text == want):
            return False
    return True


def _field(obj: dict[str, object], name: str) -> object:
    value = obj.get(name)
    if value is None and "." in name:
        value = _nested(obj, name)
    return value


def _text(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer past 64 bits, which only the stdlib read
        return json.dumps(value, separators=(",", ":"))


def _nested(obj: object, name: str) -> object:
    for part in name.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


class FilterSchema:
    """What filters may name: the configured schemas' type names and fields."""

    def __init__(self, types: Mapping[str, int], fields: Iterable[str]) -> None:
        self.types = {**types, "raw": 0}
        self.fields = frozenset(fields) | ENVELOPE_FIELDS

    def parse(self, items: Iterable[tuple[str, object]]) -> Filter | None:
        """A Filter from (parameter, value) pairs, or None when there is no condition."""
        type_ids: set[int] | None = None
        type_names: set[str] = set()
        fields: list[tuple[str, str, bool]] = []
        sample = 1
        spec: dict[str, object] = {}
        for key, value in items:
            if key == "type":
                names = _names(value, key)
                for n in names:
                    if n not in self.types and not is_type_name(n):
                        raise FilterError(
                            f"type: {n!r} is no schema's type ({', '.join(sorted(self.types))}) "
                            "and cannot be a JSON or text record's type name (up to "
                            f"{MAX_NAME} letters, digits and _ . : / -)"
                        )
                type_ids = (type_ids or set()) | {self.types[n] for n in names if n in self.types}
                type_names |= {n for n in names if n not in self.types}
                spec.setdefault("type", [])
                spec["type"] += names  # type: ignore[operator]
            elif key.startswith("field."):
                name = key[len("field.") :]
                if name not in self.fields and not all(name.split(".")):
                    # open: JSON records bring fields no schema names
                    raise FilterError(
                        f"{key}: a field name (dotted for nested members: field.user.id), "
                        f"got {name!r}"
                    )
                cond = condition(value)
                if cond is None:
                    raise FilterError(f"{key}: must be a string or a 64-bit integer, got {value!r}")
                fields.append((name, *cond))
                spec[key] = value
            elif key == "sample":
                sample = _sample(value)
                spec["sample"] = sample
            else:
                raise FilterError(
                    f"unknown filter {key!r} (filters: type=NAME[,NAME], field.NAME=VALUE "
                    "or field.NAME=PREFIX*, sample=N)"
                )
        if type_ids is None and not fields and sample == 1:
            return None
        return Filter(
            None if type_ids is None else frozenset(type_ids),
            tuple(fields),
            sample,
            spec,
            frozenset(type_names),
        )

    def parse_json(self, value: object) -> Filter | None:
        """A filter sent over a WebSocket: {"type": [...], "field.comm": "bash", "sample": 10}."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise FilterError(f"filter: must be an object or null, got {value!r}")
        items: list[tuple[str, object]] = []
        for key, v in value.items():
            if key == "type" and isinstance(v, list):
                if not v:
                    raise FilterError("type: must name at least one record type, got []")
                items.extend(("type", name) for name in v)
            else:
                items.append((key, v))
        return self.parse(items)


def _names(value: object, key: str) -> list[str]:
    names = [n for n in value.split(",") if n] if isinstance(value, str) else []
    if not names:
        raise FilterError(f"{key}: must be a record type name, got {value!r}")
    return names


def _sample(value: object) -> int:
    """A query string's ASCII digits, or a JSON integer (integral floats too: 1e3)."""
    n: int | None = None
    if isinstance(value, str):
        n = ascii_int(value, 1, U64_MAX)
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value if 1 <= value <= U64_MAX else None
    elif isinstance(value, float) and value.is_integer() and 1 <= value <= U64_MAX:
        n = int(value)
    if n is None:
        raise FilterError(
            f"sample: must be an integer from 1 to {U64_MAX} (every Nth record), got {value!r}"
        )
    return n
