"""JSON and text records (ringcore/frames.py) through the C encoder
(ringcore/src/json.c), held to the Python reference (service/schema.py's
decode_record) on generated objects, on every way of writing them, and on
mutated and arbitrary bytes: the C check accepts exactly what a strict JSON
parser accepts, and what it delivers is one line of valid JSON that reads
back as the reference's record.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ringcore import Encoder
from ringcore.frames import JSON_TYPE, json_record, text_record
from service.schema import JSON_MAX_DEPTH, decode_record

ENC = Encoder([])
TS = 1_700_000_000_123_456_789
NOW = 42


def c_record(data: bytes, pos: int = 7) -> dict[str, Any]:
    out = ENC.encode(pos, data, NOW)
    assert b"\n" not in out and b"\r" not in out  # one NDJSON line, one SSE data: line
    return json.loads(out)  # the stdlib: integers of any size


def same(c: dict[str, Any], ref: dict[str, Any]) -> bool:
    if c.get("type") == "raw" or ref.get("type") == "raw":
        # the reasons' words differ (Python's parser, encode.c's): both say invalid JSON
        return (
            c.get("type") == ref.get("type") == "raw"
            and c["raw"] == ref["raw"]
            and c["error"].startswith(ref["error"][: len("invalid JSON")])
        )
    return _eq(c, ref)


def _eq(a: object, b: object) -> bool:
    # NaN never comes out of JSON; 1e400 reads as inf on both sides
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


KEYS = st.sampled_from(["id", "ts_ns", "type", "user", "a", "é", "", "x y"]) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=6)


@settings(max_examples=400, deadline=None)
@given(
    obj=OBJECTS,
    name=st.sampled_from(["", "app", "é/ü"]),
    indent=st.sampled_from([None, 0, 2, "\t"]),
    ascii_only=st.booleans(),
)
def test_objects_written_any_way_arrive_as_the_reference_reads_them(
    obj: dict[str, Any], name: str, indent: int | str | None, ascii_only: bool
) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only).encode()
    data = json_record(text, name, TS)
    got, ref = c_record(data), decode_record({}, 7, data, NOW)
    assert got["type"] != "raw", got
    assert _eq(got, ref), (got, ref)
    assert got["id"] == 7 and got["ts_ns"] == TS


def _mutations(text: bytes) -> st.SearchStrategy[bytes]:
    at = st.integers(0, max(len(text) - 1, 0))
    byte = st.sampled_from(list(b'{}[]":,\\ \n0-.eEtfnu\x00\x7f\xc3\xa9\xff\x80'))
    return st.one_of(
        st.tuples(at).map(lambda t: text[: t[0]] + text[t[0] + 1 :]),
        st.tuples(at, byte).map(lambda t: text[: t[0]] + bytes([t[1]]) + text[t[0] :]),
        st.tuples(at, byte).map(lambda t: text[: t[0]] + bytes([t[1]]) + text[t[0] + 1 :]),
        st.tuples(at).map(lambda t: text[: t[0]]),
    )


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_c_accepts_exactly_what_a_strict_parser_accepts(data: st.DataObject) -> None:
    text = json.dumps(data.draw(OBJECTS), ensure_ascii=data.draw(st.booleans())).encode()
    broken = data.draw(_mutations(text) | st.binary(max_size=40))
    rec = json_record(broken, "", TS)
    got, ref = c_record(rec), decode_record({}, 7, rec, NOW)
    assert same(got, ref), (broken, got, ref)


def test_the_envelope_owns_id_and_ts_ns_and_a_string_type_is_the_records() -> None:
    payload = b'{"id": 1, "ts_ns": 2, "type": "login", "i\\u0064": 3, "n": [1, {"id": 4}]}'
    got = c_record(json_record(payload, "app", TS))
    assert got == {
        "id": 7,
        "ts_ns": TS,
        "type": "login",
        "_id": 3,  # "i\u0064" is "id" too (the later one wins, as in any JSON reader)
        "_ts_ns": 2,
        "n": [1, {"id": 4}],  # only top-level members are the envelope's
    }
    assert c_record(json_record(b'{"type": 5}', "app", TS))["_type"] == 5
    assert c_record(json_record(b"{}", "", TS))["type"] == "json"


def test_invalid_json_arrives_raw_with_the_byte_and_the_reason() -> None:
    for payload, why in [
        (b"", "invalid JSON at byte 0: empty: expected an object"),
        (b"[1]", "invalid JSON at byte 0: not an object"),
        (b'{"a": 1,}', "invalid JSON at byte 8: expected a string key"),
        (b'{"a": NaN}', "invalid JSON at byte 6: expected a value"),
        (b'{"a": "\x01"}', "invalid JSON at byte 7: control character in a string"),
        (b'{"a": "\xc3("}', "invalid JSON at byte 7: invalid UTF-8 in a string"),
        (b'{"a": "\\x"}', "invalid JSON at byte 7: invalid escape in a string"),
        (b'{"a": 1} {}', "invalid JSON at byte 9: data after the object"),
        (b'{"a": 01}', "invalid JSON at byte 7: expected ',' or '}'"),
    ]:
        got = c_record(json_record(payload, "", TS))
        assert got["type"] == "raw" and got["type_id"] == JSON_TYPE, got
        assert got["error"] == why, (payload, got["error"])
        assert got["ts_ns"] == NOW  # stamped when taken, as every raw record


def test_nesting_is_bounded() -> None:
    def nested(depth: int) -> bytes:
        return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert c_record(json_record(nested(JSON_MAX_DEPTH), "", TS))["type"] == "json"
    deep = c_record(json_record(nested(JSON_MAX_DEPTH + 1), "", TS))
    assert deep["type"] == "raw" and f"deeper than {JSON_MAX_DEPTH}" in deep["error"]
    assert decode_record({}, 7, json_record(nested(JSON_MAX_DEPTH + 1), "", TS), NOW)["type"] == (
        "raw"
    )


@settings(max_examples=300, deadline=None)
@given(line=st.binary(max_size=64), name=st.sampled_from(["", "syslog"]))
def test_text_lines_match_the_reference(line: bytes, name: str) -> None:
    data = text_record(line, name, TS)
    got, ref = c_record(data), decode_record({}, 7, data, NOW)
    assert got == ref
    assert got["type"] == (name or "text")


def test_a_type_name_past_the_end_is_a_short_record() -> None:
    data = json_record(b"", "", TS)[:-1] + b"\x09ab"
    got = c_record(data)
    assert got["type"] == "raw" and got["error"].startswith("short record")
    assert got == decode_record({}, 7, data, NOW)
