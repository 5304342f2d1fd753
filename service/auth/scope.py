"""What a token may do and see: its actions and its scope of records.

A token file entry and a JWT's `ringstream` claim say it the same way:

    types = ["exec", "exit"]         # the record types it may see (absent: all)
    fields = { comm = "bash" }       # conditions every record it sees meets
    allow = ["subscribe"]            # subscribe (the default), ingest, reload

The server applies the scope to every record before the subscriber's own
filter (the two are ANDed), and refuses a subscriber filter that asks for
what the scope excludes, naming it, rather than sending it nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ringcore.frames import MAX_NAME
from service.filters import Filter, FilterSchema, condition, is_type_name

ACTIONS = ("subscribe", "ingest", "reload")


class ScopeError(ValueError):
    """A scope that cannot be read; the message names the member."""


@dataclass(frozen=True)
class Scope:
    types: frozenset[str] | None = None  # None: every type
    fields: tuple[tuple[str, str, bool], ...] = ()  # (name, value, is_prefix)
    allow: frozenset[str] = frozenset({"subscribe"})

    @property
    def unrestricted(self) -> bool:
        return self.types is None and not self.fields

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.types is not None:
            out["types"] = sorted(self.types)
        if self.fields:
            out["fields"] = {n: v + ("*" if p else "") for n, v, p in self.fields}
        return out

    def filter(self, schema: FilterSchema) -> Filter | None:
        """The scope as a filter of the running schemas (None: it passes everything)."""
        items: list[tuple[str, object]] = []
        if self.types is not None:
            items.append(("type", ",".join(sorted(self.types))))
        items.extend((f"field.{n}", v + ("*" if p else "")) for n, v, p in self.fields)
        return schema.parse(items)

    def refuses(self, flt: Filter | None) -> str | None:
        """What of a subscriber's filter lies outside this scope, or None."""
        if flt is None:
            return None
        asked = flt.spec.get("type")
        if self.types is not None and isinstance(asked, list):
            out = sorted({str(n) for n in asked} - self.types)
            if out:
                return (
                    f"type {', '.join(out)}: out of this token's scope "
                    f"(types: {', '.join(sorted(self.types))})"
                )
        for name, want, prefix in flt.fields:
            for sname, svalue, sprefix in self.fields:
                if name == sname and not _overlap(want, prefix, svalue, sprefix):
                    shown = svalue + ("*" if sprefix else "")
                    return (
                        f"field.{name}={want}{'*' if prefix else ''}: out of this token's "
                        f"scope (field.{name}={shown})"
                    )
        return None


def _overlap(a: str, a_prefix: bool, b: str, b_prefix: bool) -> bool:
    """Whether some value meets both conditions."""
    if a_prefix and b_prefix:
        return a.startswith(b) or b.startswith(a)
    if a_prefix:
        return b.startswith(a)
    if b_prefix:
        return a.startswith(b)
    return a == b


def parse_scope(obj: Mapping[str, object], where: str) -> Scope:
    """A Scope from a token file entry or a JWT claim; ScopeError names `where`."""
    types: frozenset[str] | None = None
    if "types" in obj:
        t = obj["types"]
        if not isinstance(t, list) or not t or not all(isinstance(n, str) for n in t):
            raise ScopeError(f"{where}.types: must be a non-empty list of record type names")
        for n in t:
            if not is_type_name(n):
                raise ScopeError(
                    f"{where}.types: {n!r} is not a type name (up to {MAX_NAME} letters, "
                    "digits and _ . : / -)"
                )
        types = frozenset(t)
    fields: list[tuple[str, str, bool]] = []
    f = obj.get("fields", {})
    if not isinstance(f, Mapping):
        raise ScopeError(f"{where}.fields: must be a table of field = value")
    for name, value in f.items():
        if not isinstance(name, str) or not name or not all(name.split(".")):
            raise ScopeError(f"{where}.fields: {name!r} is not a field name")
        cond = condition(value)
        if cond is None:
            raise ScopeError(f"{where}.fields.{name}: must be a string or a 64-bit integer")
        fields.append((name, *cond))
    allow = obj.get("allow", ["subscribe"])
    if not isinstance(allow, list) or not all(a in ACTIONS for a in allow):
        raise ScopeError(f"{where}.allow: must be a list of {', '.join(ACTIONS)}")
    unknown = set(obj) - {"types", "fields", "allow"}
    if unknown:
        raise ScopeError(
            f"{where}: unknown member {sorted(unknown)[0]!r} (known: types, fields, allow)"
        )
    return Scope(types, tuple(fields), frozenset(allow))


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token file entry's name, or a JWT's `sub`."""

    name: str
    kind: str  # "token" | "jwt"
    scope: Scope
    expires: float | None = None  # Unix time: a stream ends then
    # what a reload checks it by: the token's hash, or the JWT itself
    key: str = field(default="", repr=False)
