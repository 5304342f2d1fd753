"""ringcore.Encoder (C) against the Python reference of service/schema.py, and schema parsing.

Both encoders must write the same JSON for every record: random schemas (every
kind, enums, pads, names that need escaping) and random records (framed,
unframed, unknown types, short, long; invalid UTF-8, NaN and infinite floats,
extreme integers) are encoded by both and compared parsed, key order included.
Floats must read back as the same double, as short as Python's repr where
that has at most 15 digits. From a real ring, Encoder.consume() must give what the reference gives
for the (position, bytes) pairs consume_with_pos() reads from a twin ring fed
the same records.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ringcore
from ringcore import PAGE_SIZE, Ring
from service import schema as S
from service.record import HEADER, HEADER_SIZE, MAGIC, pack_header

U64 = 2**64 - 1


def int_range(kind: str) -> tuple[int, int]:
    bits = S.FIXED_KINDS[kind][1] * 8
    return (0, 2**bits - 1) if kind[0] == "u" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def parsed(line: bytes) -> dict[str, object]:
    assert not line.endswith(b"\n")
    return orjson.loads(line)  # also rejects invalid UTF-8


def assert_same(c_line: bytes, ref_line: bytes) -> None:
    c, ref = parsed(c_line), parsed(ref_line)
    assert c == ref, f"\nC:   {c_line!r}\nref: {ref_line!r}"
    assert list(c) == list(ref), "key order differs"


# --- strategies -----------------------------------------------------------------

# names with quotes, backslashes, control characters and non-ASCII: the C
# encoder escapes keys and type names once, at set-up
names = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs", "Cc")),
    min_size=1,
    max_size=6,
)
field_names = names.filter(lambda n: n not in S.RESERVED_NAMES)


@st.composite
def field_defs(draw: st.DrawFn, name: str) -> dict[str, object]:
    kind = draw(st.sampled_from(S.KINDS))
    d: dict[str, object] = {"name": name, "kind": kind}
    if kind in S.SIZED_KINDS:
        d["size"] = draw(st.integers(1, 24))
    if kind == "bytes":
        d["encoding"] = draw(st.sampled_from(S.ENCODINGS))
    if kind in S.INT_KINDS and draw(st.booleans()):
        lo, hi = int_range(kind)
        values = draw(
            st.lists(
                st.integers(lo, hi) | st.integers(max(lo, -2), min(hi, 3)), max_size=5, unique=True
            )
        )
        d["enum"] = {str(v): draw(names) for v in values}
    return d


@st.composite
def schema_sets(draw: st.DrawFn) -> list[S.Schema]:
    n = draw(st.integers(1, 3))
    type_ids = draw(
        st.lists(st.integers(1, 4) | st.integers(1, 0xFFFD), min_size=n, max_size=n, unique=True)
    )
    snames = draw(st.lists(names.filter(lambda x: x != "raw"), min_size=n, max_size=n, unique=True))
    entries = []
    for type_id, name in zip(type_ids, snames, strict=True):
        fnames = draw(st.lists(field_names, max_size=8, unique=True))
        entries.append(
            {"type": type_id, "name": name, "fields": [draw(field_defs(f)) for f in fnames]}
        )
    return S.parse_schemas(entries)


# UTF-8 edge cases: overlongs, surrogates, > U+10FFFF, truncated sequences,
# stray continuation bytes, and valid multi-byte text
UTF8_PIECES = [
    b"\x80",
    b"\xbf",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xc2",
    b"\xdf",
    b"\xe0\x80\x80",
    b"\xe0\x9f\xbf",
    b"\xe0\xa0",
    b"\xe1\x80",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xed\x9f\xbf",
    b"\xef\xbf\xbd",
    b"\xf0\x80\x80\x80",
    b"\xf0\x8f\xbf\xbf",
    b"\xf0\x90\x80",
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xfe",
    b"\xff",
    "é€😀".encode(),
    b'"\\/\n\r\t\b\f\x01\x1f\x7f',
]
text_bytes = st.lists(
    st.sampled_from(UTF8_PIECES) | st.binary(max_size=3) | st.text(max_size=3).map(str.encode),
    max_size=10,
).map(b"".join)

floats64 = st.floats() | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan])


def field_value(f: S.Field) -> st.SearchStrategy[bytes]:
    if f.kind in S.INT_KINDS:
        code = "<" + S.FIXED_KINDS[f.kind][0]
        lo, hi = int_range(f.kind)
        ints = st.integers(lo, hi) | st.sampled_from([lo, hi, 0, -1 if lo < 0 else 1])
        if f.enum:
            ints = ints | st.sampled_from(sorted(f.enum))
        return ints.map(lambda v: struct.pack(code, v))
    if f.kind == "f32":
        return (st.floats(width=32) | floats64.map(lambda v: v if math.isnan(v) else 0.5)).map(
            lambda v: struct.pack("<f", v)
        )
    if f.kind == "f64":
        return floats64.map(lambda v: struct.pack("<d", v))
    if f.kind == "char":
        # cut at the size (which may split a sequence), NUL-padded or not
        return st.tuples(text_bytes, st.binary(max_size=f.size)).map(
            lambda t: (t[0][: f.size] + b"\0" + t[1])[: f.size].ljust(f.size, b"\0")
        )
    return st.binary(min_size=f.size, max_size=f.size)


@st.composite
def records(draw: st.DrawFn, schemas: list[S.Schema]) -> bytes:
    """A record for these schemas, or one that goes raw in one of every way."""
    how = draw(
        st.sampled_from(["fields"] * 5 + ["random", "unknown", "zero", "magic", "reserved", "tiny"])
    )
    if how == "tiny":
        return draw(st.binary(max_size=HEADER_SIZE - 1))
    s = draw(st.sampled_from(schemas))
    type_id, magic, reserved = s.type_id, MAGIC, 0
    if how == "unknown":
        known = {x.type_id for x in schemas}
        type_id = draw(st.integers(1, 0xFFFD).filter(lambda t: t not in known))
    elif how == "zero":
        type_id = 0
    elif how == "magic":
        magic = draw(st.binary(min_size=2, max_size=2).filter(lambda m: m != MAGIC))
    elif how == "reserved":
        reserved = draw(st.integers(1, 2**32 - 1))
    head = HEADER.pack(magic, type_id, reserved, draw(st.integers(0, U64)))
    if how == "random":
        body = draw(st.binary(max_size=s.size - HEADER_SIZE + 24))
    else:
        body = b"".join(draw(field_value(f)) for f in s.fields)
        cut = draw(st.sampled_from(["exact", "exact", "short", "long"]))
        if cut == "short" and body:
            body = body[: draw(st.integers(0, len(body) - 1))]
        elif cut == "long":
            body += draw(st.binary(min_size=1, max_size=24))
    return head + body


# --- C against the reference ---------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_encode_matches_reference(data):
    schemas = data.draw(schema_sets(), "schemas")
    enc = S.compile_encoder(schemas)
    table = S.by_type(schemas)
    now = data.draw(st.integers(0, U64), "now_ns")
    for rec in data.draw(st.lists(records(schemas), min_size=1, max_size=8), "records"):
        pos = data.draw(st.integers(0, U64))
        assert_same(enc.encode(pos, rec, now), S.encode_record(table, pos, rec, now))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_encode_many_matches_encode(data):
    schemas = data.draw(schema_sets(), "schemas")
    enc = S.compile_encoder(schemas)
    table = S.by_type(schemas)
    recs = data.draw(st.lists(records(schemas), max_size=12), "records")
    pairs = [(i * 8, r) for i, r in enumerate(recs)]
    lines, positions, stamps, types = enc.encode_many(pairs, 12345)
    assert positions == [p for p, _ in pairs]
    for line, (pos, rec), ts, type_id in zip(lines, pairs, stamps, types, strict=True):
        ref = S.decode_record(table, pos, rec, 12345)
        assert_same(line, orjson.dumps(ref))
        assert ts == ref["ts_ns"]
        assert type_id == (0 if ref["type"] == "raw" else table[rec[2] | rec[3] << 8].type_id)
    # a bytearray or memoryview is as good as bytes
    if recs:
        assert (
            enc.encode_many([(0, bytearray(recs[0]))], 1)[0]
            == enc.encode_many([(0, memoryview(recs[0]))], 1)[0]
        )


F_ENC = ringcore.Encoder(
    [(1, "f", [("d", "f64", 16, 8, None, None), ("s", "f32", 24, 4, None, None)])]
)
F_TEXT = re.compile(rb'"d":([^,]*),"s":([^}]*)}')


def significant(text: str) -> str:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "")
    return mantissa.lstrip("0").rstrip("0") or "0"


def check_float_text(text: bytes, v: float) -> None:
    if not math.isfinite(v):
        assert text == b"null"
        return
    back = float(text)
    assert back == v and math.copysign(1, back) == math.copysign(1, v)
    assert b"." in text or b"e" in text  # reads as a float, not an integer
    # as short as Python's repr when that has 15 digits or fewer (0.021, not
    # 0.021000000000000001), at most one digit longer otherwise; subnormals
    # hold fewer digits than that, so the 15-digit text can be longer
    ours, shortest = significant(text.decode()), significant(repr(v))
    if abs(v) < sys.float_info.min:
        assert len(ours) <= 17
    elif len(shortest) <= 15:
        assert ours == shortest
    else:
        assert len(ours) <= len(shortest) + 1


# ties at the 17th digit (m / 256 with 18 significant digits), integers near
# 2^53 and 1e17, and the edges of the fast path (1e-6, 2^64)
awkward = (
    st.builds(lambda a, b: a + b / 256, st.integers(0, 10**10), st.integers(0, 255))
    | st.integers(-(2**64), 2**64).map(float)
    | st.builds(lambda m, e: m * 10.0**e, st.floats(1, 10), st.integers(-8, 21))
)


@settings(max_examples=1000, deadline=None)
@given(st.floats() | awkward, st.floats(width=32))
def test_floats_print_short_and_read_back(d, s):
    line = F_ENC.encode(0, pack_header(1, 0) + struct.pack("<df", d, s), 0)
    m = F_TEXT.search(line)
    assert m, line
    check_float_text(m.group(1), d)
    check_float_text(m.group(2), s)


C_ENC = ringcore.Encoder([(1, "t", [("s", "char", 16, 64, None, None)])])


@settings(max_examples=1000, deadline=None)
@given(text_bytes)
def test_char_decodes_as_python_replace(raw):
    """Invalid UTF-8 becomes U+FFFD as bytes.decode("utf-8", "replace") does it."""
    body = raw[:64].ljust(64, b"\0")
    line = C_ENC.encode(0, pack_header(1, 0) + body, 0)
    assert parsed(line)["s"] == body.split(b"\0", 1)[0].decode("utf-8", "replace")


def test_builtin_schemas_records():
    schemas = S.builtin_schemas()
    sizes = {s.name: s.size for s in schemas}
    assert sizes["synthetic"] == 64  # the benchmark's record
    assert sizes["exec"] == 453
    enc = S.compile_encoder(schemas)
    assert enc.type_ids == [s.type_id for s in schemas]
    rec = pack_header(10, 77) + struct.pack(
        "<QHB5xd16s8s", 1, 2, 3, -0.5, "héllo\n".encode(), b"\x00\xff" * 4
    )
    assert parsed(enc.encode(5, rec, 9)) == {
        "id": 5,
        "ts_ns": 77,
        "type": "synthetic",
        "seq": 1,
        "worker": 2,
        "level": "error",
        "value": -0.5,
        "label": "héllo\n",
        "token": "00ff00ff00ff00ff",
    }
    short = pack_header(1, 77) + bytes(24)
    assert parsed(enc.encode(5, short, 9)) == {
        "id": 5,
        "ts_ns": 9,
        "type": "raw",
        "type_id": 1,
        "error": "short record: 40 bytes, schema exec needs 453",
        "raw": "UlMBAAAAAABNAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==",
    }
    assert parsed(enc.encode(5, b"hi", 9)) == {
        "id": 5,
        "ts_ns": 9,
        "type": "raw",
        "error": "unframed: no RS record header",
        "raw": "aGk=",
    }
    unknown = pack_header(999, 77) + bytes(8)
    got = parsed(enc.encode(5, unknown, 9))
    assert got["type"] == "raw" and got["type_id"] == 999, got
    assert got["error"] == "unknown type: no schema has this type_id", got


def test_stats_count_by_reason():
    schemas = S.builtin_schemas()
    enc = S.compile_encoder(schemas)
    zero = {"json": 0, "text": 0, "invalid_json": 0}
    assert enc.stats() == {
        "encoded": 0,
        "decoded": 0,
        "unframed": 0,
        "unknown_type": 0,
        "short": 0,
        **zero,
    }
    recs = [
        pack_header(2) + bytes(64),  # exit: decoded
        pack_header(2) + bytes(65),  # decoded, with _extra
        pack_header(2) + bytes(63),  # short
        pack_header(999) + bytes(40),  # unknown type
        pack_header(0) + bytes(40),  # type 0: unframed
        b"plain text",  # unframed
    ]
    enc.encode_many(list(enumerate(recs)), 0)
    enc.encode(0, recs[0], 0)
    assert enc.stats() == {
        "encoded": 7,
        "decoded": 3,
        "unframed": 2,
        "unknown_type": 1,
        "short": 1,
        **zero,
    }


def test_large_records_and_buffer_growth():
    enc = S.compile_encoder(S.builtin_schemas())
    table = S.by_type(S.builtin_schemas())
    for n in (0, 1, 5000, 1 << 20, 6 << 20):
        for rec in (os.urandom(n), pack_header(10) + os.urandom(max(n, 48))):
            assert_same(enc.encode(1, rec, 2), S.encode_record(table, 1, rec, 2))


def test_u64_ts_and_positions_reach_2_64():
    enc = S.compile_encoder(S.builtin_schemas())
    line = enc.encode(U64, pack_header(2, U64) + b"\xff" * 40 + b"-" * 24, 0)
    rec = parsed(line)
    assert (rec["id"], rec["ts_ns"], rec["pid"], rec["exit_code"], rec["lifetime_ns"]) == (
        U64,
        U64,
        2**32 - 1,
        -1,
        U64,
    )
    with pytest.raises(ValueError, match="pos"):
        enc.encode(-1, b"", 0)
    with pytest.raises(ValueError, match="now_ns"):
        enc.encode(0, b"", 2**64)
    with pytest.raises(TypeError):
        enc.encode(0, "text", 0)


# --- from a ring ------------------------------------------------------------------


def produce(ring: Ring, recs: list[bytes], discards: list[bool]) -> int:
    """Write recs (discarding some); returns how many went in before the ring was full."""
    for i, (rec, disc) in enumerate(zip(recs, discards, strict=True)):
        res = ring.reserve(len(rec))
        if res is None:
            return i
        with memoryview(res) as mv:
            mv[:] = rec
        if disc:
            res.discard()
        else:
            res.submit()
    return len(recs)


def drain_and_compare(
    enc: ringcore.Encoder, ring: Ring, twin: Ring, table: dict, limit: int | None
) -> int:
    """Encoder.consume(ring) against the reference over twin.consume_with_pos()."""
    before = time.time_ns()
    lines, positions, stamps, types = enc.consume(ring, limit)
    after = time.time_ns()
    expected = twin.consume_with_pos(limit)
    assert positions == [pos for pos, _ in expected]
    assert len(lines) == len(stamps) == len(types) == len(expected)
    raw_stamps = set()
    for line, ts, type_id, (pos, rec) in zip(lines, stamps, types, expected, strict=True):
        ref = S.decode_record(table, pos, rec, ts)
        assert_same(line, orjson.dumps(ref))
        if ref["type"] == "raw":
            assert type_id == 0
            raw_stamps.add(ts)
        else:
            assert type_id == struct.unpack_from("<H", rec, 2)[0]
            assert ts == struct.unpack_from("<Q", rec, 8)[0]
    # raw records: one stamp per call, taken during it
    assert len(raw_stamps) <= 1
    assert all(before <= ts <= after for ts in raw_stamps)
    return len(lines)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_consume_matches_reference_on_a_ring(data):
    schemas = data.draw(st.just(S.builtin_schemas()) | schema_sets(), "schemas")
    enc = S.compile_encoder(schemas)
    table = S.by_type(schemas)
    with Ring(PAGE_SIZE) as ring, Ring(PAGE_SIZE) as twin:
        # several rounds on a one-page ring: positions run past the end and wrap
        for _ in range(data.draw(st.integers(1, 8), "rounds")):
            recs = data.draw(st.lists(records(schemas), max_size=30), "records")
            discards = data.draw(
                st.lists(st.booleans(), min_size=len(recs), max_size=len(recs)), "discards"
            )
            assert produce(ring, recs, discards) == produce(twin, recs, discards)
            limit = data.draw(st.none() | st.integers(1, 10), "max_records")
            drain_and_compare(enc, ring, twin, table, limit)
        drain_and_compare(enc, ring, twin, table, None)
        assert enc.consume(ring) == ([], [], [], [])


def test_consume_overwrite_ring_and_max_records():
    schemas = S.builtin_schemas()
    enc = S.compile_encoder(schemas)
    table = S.by_type(schemas)
    rec = [pack_header(11, i) + struct.pack("<QH6x16s", i, 7, bytes(range(16))) for i in range(400)]
    with Ring(PAGE_SIZE, overwrite=True) as ring, Ring(PAGE_SIZE, overwrite=True) as twin:
        for r in rec:
            assert ring.output(r) and twin.output(r)
        lines, positions, _, types = enc.consume(ring, max_records=3)
        expected = twin.consume_with_pos(3)
        assert positions == [p for p, _ in expected] and types == [11] * 3
        lines2, positions2, _, _ = enc.consume(ring)
        expected += twin.consume_with_pos()
        assert positions + positions2 == [p for p, _ in expected]
        for line, (pos, r) in zip(lines + lines2, expected, strict=True):
            assert_same(line, S.encode_record(table, pos, r, 0))
        assert enc.consume(ring) == ([], [], [], [])


def test_consume_hands_out_records_before_a_corrupt_header():
    enc = S.compile_encoder(S.builtin_schemas())
    with Ring(4096) as ring:
        ring.output_many([b"good", b"next"])
        fd = os.dup(ring._mem_fd)
        try:
            meta_pages = int.from_bytes(os.pread(fd, 4, 24), "little")  # struct rc_ctrl
            data = meta_pages * PAGE_SIZE
            os.pwrite(fd, (0x3FFFFFF0).to_bytes(4, "little"), data + 16)  # 2nd header
        finally:
            os.close(fd)
        lines, positions, _, types = enc.consume(ring)
        assert positions == [0] and types == [0]
        assert parsed(lines[0])["raw"] == "Z29vZA=="
        with pytest.raises(ringcore.RingCorruptedError, match="position 16"):
            enc.consume(ring)


def test_consume_misuse():
    enc = S.compile_encoder(S.builtin_schemas())
    with pytest.raises(TypeError, match=r"ringcore\.Ring"):
        enc.consume(object())
    with Ring(PAGE_SIZE, consumer=False) as keeper, pytest.raises(ringcore.NotConsumerError):
        enc.consume(keeper)
    ring = Ring(PAGE_SIZE)
    with pytest.raises(ValueError, match="max_records"):
        enc.consume(ring, 0)
    ring.output(b"x")
    inner: list[BaseException] = []

    def callback(view):
        try:
            enc.consume(ring)
        except ringcore.RingError as e:
            inner.append(e)

    assert ring.consume_each(callback) == 1
    assert inner and "consume_each" in str(inner[0])
    ring.close()
    with pytest.raises(ringcore.RingClosedError):
        enc.consume(ring)


# --- validation: the C constructor ---------------------------------------------


def c_spec(*fields: tuple, type_id: object = 1, name: object = "t") -> list:
    return [(type_id, name, list(fields))]


@pytest.mark.parametrize(
    ("spec", "exc", "match"),
    [
        (
            c_spec(("a", "u128", 16, 16, None, None)),
            ValueError,
            r"fields\[0\].*unknown kind 'u128'",
        ),
        (
            c_spec(("a", "u32", 16, 4, None, None), ("b", "u32", 18, 4, None, None)),
            ValueError,
            r"fields\[1\].*offset 18 is before the end of the previous field \(20\)",
        ),
        (c_spec(("a", "u32", 8, 4, None, None)), ValueError, r"fields\[0\].*offset"),
        (c_spec(("a", "u32", 16, 8, None, None)), ValueError, "a u32 is 4 bytes, not 8"),
        (c_spec(("a", "char", 16, 0, None, None)), ValueError, "size"),
        (c_spec(("a", "bytes", 16, 4, "b64", None)), ValueError, "encoding 'hex' or 'base64'"),
        (c_spec(("a", "bytes", 16, 4, None, None)), ValueError, "encoding"),
        (c_spec(("a", "u8", 16, 1, "hex", None)), ValueError, "only bytes fields"),
        (c_spec(("a", "f32", 16, 4, None, {1: "x"})), ValueError, "only integer fields"),
        (c_spec(("a", "u8", 16, 1, None, {256: "x"})), ValueError, "256 is out of range for u8"),
        (c_spec(("a", "i8", 16, 1, None, {-129: "x"})), ValueError, "out of range for i8"),
        (c_spec(("a", "u8", 16, 1, None, {"1": "x"})), TypeError, "enum key '1' is not an int"),
        (c_spec(("a", "u8", 16, 1, None, {1: ""})), TypeError, "enum name"),
        (c_spec(("type", "u8", 16, 1, None, None)), ValueError, "'type' is reserved"),
        (
            c_spec(("a", "u8", 16, 1, None, None), ("a", "u8", 17, 1, None, None)),
            ValueError,
            r"fields\[1\].*duplicate field name 'a'",
        ),
        (c_spec(("a", "u8", 16, 1, None)), TypeError, r"fields\[0\]: a field must be"),
        (c_spec(type_id=0), ValueError, "type id must be an int from 1 to 65535"),
        (c_spec(type_id=65536), ValueError, "type id"),
        (c_spec(type_id=True), TypeError, "type id"),
        (c_spec(name="raw"), ValueError, "'raw' is reserved"),
        (c_spec(name=""), TypeError, "schema name"),
        (c_spec() + c_spec(name="u"), ValueError, r"schemas\[1\]: duplicate type id 1"),
        (c_spec() + c_spec(type_id=2), ValueError, r"schemas\[1\]: duplicate schema name 't'"),
        ([(1, "t")], TypeError, r"schemas\[0\]: a schema must be"),
        (5, TypeError, "list"),
    ],
)
def test_encoder_rejects_bad_schemas(spec, exc, match):
    with pytest.raises(exc, match=match):
        ringcore.Encoder(spec)


def test_encoder_accepts_gaps_pads_and_every_kind():
    fields = [(k, k, 0, S.FIXED_KINDS[k][1], None, None) for k in S.FIXED_KINDS]
    fields += [("c", "char", 0, 3, None, None), ("h", "bytes", 0, 2, "hex", None)]
    fields += [("b", "bytes", 0, 2, "base64", None), ("p", "pad", 0, 1, None, None)]
    offset = 16
    for i, f in enumerate(fields):
        fields[i] = (f[0], f[1], offset, *f[3:])
        offset += f[3] + 1  # a gap after each: skipped like a pad
    enc = ringcore.Encoder([(3, "all", fields)])
    end = offset - 1  # the schema ends with its last field (a pad), not a gap
    rec = parsed(enc.encode(0, pack_header(3) + bytes(end - 16), 0))
    assert list(rec) == ["id", "ts_ns", "type", *(f[0] for f in fields if f[1] != "pad")]
    assert rec["c"] == "" and rec["h"] == "0000" and rec["b"] == "AAA=" and rec["f32"] == 0.0
    # one byte short of the end of the last field
    short = parsed(enc.encode(0, pack_header(3) + bytes(end - 17), 0))
    assert short["error"] == f"short record: {end - 1} bytes, schema all needs {end}"


# --- validation: the schema parser ------------------------------------------------


def entry(**fields: object) -> dict[str, object]:
    return {"type": 1, "name": "t", "fields": [{"name": "a", "kind": "u32", **fields}]}


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        (
            [entry(), entry(kind="u128") | {"type": 2, "name": "u"}],
            r"^schemas\[1\]\.fields\[0\]\.kind: unknown kind 'u128' \(expected one of u8, u16,",
        ),
        ([entry(), entry()], r"^schemas\[1\]\.type: duplicate type 1 \(also schemas\[0\], 't'\)"),
        ([entry(), entry() | {"type": 2}], r"^schemas\[1\]\.name: duplicate name 't'"),
        ([entry() | {"type": 0}], r"^schemas\[0\]\.type: 0 is reserved"),
        ([entry() | {"type": 65536}], r"^schemas\[0\]\.type: 65536 is out of range"),
        ([entry() | {"type": "1"}], r"^schemas\[0\]\.type: expected an integer"),
        ([entry() | {"type": True}], r"^schemas\[0\]\.type: expected an integer"),
        ([{"name": "t", "fields": []}], r"^schemas\[0\]\.type: missing"),
        ([entry() | {"name": "raw"}], r"^schemas\[0\]\.name: 'raw' is reserved"),
        ([entry() | {"nmae": "x"}], r"^schemas\[0\]\.nmae: unknown key .*did you mean 'name'"),
        ([entry(sise=4)], r"^schemas\[0\]\.fields\[0\]\.sise: unknown key .*did you mean 'size'"),
        ([entry(kind="char")], r"^schemas\[0\]\.fields\[0\]\.size: missing"),
        ([entry(kind="bytes", size=4)], r"^schemas\[0\]\.fields\[0\]\.encoding: missing"),
        ([entry(kind="pad", size=0)], r"^schemas\[0\]\.fields\[0\]\.size: expected a positive"),
        ([entry(kind="char", size=True)], r"^schemas\[0\]\.fields\[0\]\.size: expected a positive"),
        ([entry(size=8)], r"^schemas\[0\]\.fields\[0\]\.size: a u32 is 4 bytes, not 8"),
        (
            [entry(kind="bytes", size=4, encoding="b64")],
            r"^schemas\[0\]\.fields\[0\]\.encoding: unknown encoding 'b64' \(expected one of hex",
        ),
        ([entry(encoding="hex")], r"^schemas\[0\]\.fields\[0\]\.encoding: only bytes fields"),
        ([entry(kind="f64", enum={"0": "a"})], r"^schemas\[0\]\.fields\[0\]\.enum: only integer"),
        ([entry(enum=["a"])], r"^schemas\[0\]\.fields\[0\]\.enum: expected a table"),
        ([entry(enum={"x": "a"})], r'^schemas\[0\]\.fields\[0\]\.enum\."x": enum keys must be'),
        ([entry(enum={"1.5": "a"})], r'^schemas\[0\]\.fields\[0\]\.enum\."1\.5": enum keys'),
        ([entry(kind="u8", enum={"256": "a"})], r'\.enum\."256": 256 is out of range for u8'),
        ([entry(kind="i8", enum={"-129": "a"})], r"out of range for i8 \(-128\.\.127\)"),
        ([entry(enum={"1": "a", "0x1": "b"})], r'\.enum\."0x1": the value 1 is listed twice'),
        ([entry(enum={"1": 2})], r'\.enum\."1": expected a non-empty string'),
        ([entry(name="ts_ns")], r"^schemas\[0\]\.fields\[0\]\.name: 'ts_ns' is reserved"),
        ([entry(name="")], r"^schemas\[0\]\.fields\[0\]\.name: expected a non-empty string"),
        ([{"type": 1, "name": "t", "fields": [{"kind": "u8"}]}], r"\.fields\[0\]\.name: missing"),
        ([{"type": 1, "name": "t", "fields": [{"name": "a"}]}], r"\.fields\[0\]\.kind: missing"),
        (
            [{"type": 1, "name": "t", "fields": [{"name": "a", "kind": "u8"}] * 2}],
            r"^schemas\[0\]\.fields\[1\]\.name: duplicate field name 'a' \(also fields\[0\]\)",
        ),
        ([{"type": 1, "name": "t", "fields": {}}], r"^schemas\[0\]\.fields: expected a list"),
        ([entry(kind="char", size=2**31)], r"\.fields\[0\]\.size: 2147483648 is larger"),
        ({"type": 1}, r"^schemas: expected a list"),
        (["x"], r"^schemas\[0\]: expected a table"),
    ],
)
def test_schema_errors_name_the_key(entries, match):
    with pytest.raises(S.SchemaError, match=match):
        S.parse_schemas(entries)


def test_schema_parsing():
    [s] = S.parse_schemas(
        [
            {
                "type": 7,
                "name": "t",
                "fields": [
                    {"name": "a", "kind": "i16", "enum": {"0": "zero", "0x10": "x", "-3": "m"}},
                    {"name": "gap", "kind": "pad", "size": 2},
                    {"name": "b", "kind": "bytes", "size": 3, "encoding": "base64"},
                ],
            }
        ]
    )
    assert s.size == 16 + 2 + 2 + 3
    assert [(f.name, f.kind, f.offset, f.size, f.encoding) for f in s.fields] == [
        ("a", "i16", 16, 2, None),
        ("gap", "pad", 18, 2, None),
        ("b", "bytes", 20, 3, "base64"),
    ]
    assert dict(s.fields[0].enum) == {0: "zero", 16: "x", -3: "m"}
    with pytest.raises(TypeError):
        s.fields[0].enum[1] = "y"  # type: ignore[index]
    with pytest.raises(AttributeError):
        s.name = "u"  # type: ignore[misc]
    assert hash(s.fields[0]) == hash(s.fields[0])


def test_load_schema_file(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text('[[schemas]]\ntype = 5\nname = "x"\nfields = [{ name = "a", kind = "u8" }]\n')
    assert [s.name for s in S.load_schema_file(good)] == ["x"]
    typo = tmp_path / "typo.toml"
    typo.write_text('[[schemas]]\ntype = 5\nname = "x"\nfields = [{ name = "a", knid = "u8" }]\n')
    with pytest.raises(
        S.SchemaError, match=r"typo\.toml: schemas\[0\]\.fields\[0\]\.knid: unknown"
    ):
        S.load_schema_file(typo)
    broken = tmp_path / "broken.toml"
    broken.write_text("[[schemas]\n")
    with pytest.raises(S.SchemaError, match=r"broken\.toml"):
        S.load_schema_file(broken)
    other = tmp_path / "other.toml"
    other.write_text("schema = []\n")
    with pytest.raises(S.SchemaError, match=r"other\.toml: schema: unknown key"):
        S.load_schema_file(other)
    with pytest.raises(S.SchemaError, match="cannot read"):
        S.load_schema_file(tmp_path / "missing.toml")
