"""amr/v1: the msgspec fast path gives exactly what the JSON Schema path gives, or steps aside.

`_decode_amr_fast` must return None for any message that is not valid throughout
(so the checked path can name every problem), and otherwise exactly the values
of `_decode_amr_checked`. These tests hold the two to that, with generated valid
gateway messages (which must take the fast path) and with mutations that each
break one thing.

The fast path's caches of meter ids and registers already checked are cleared before every generated example, so each example stands on its own;
what the cache carries from one message to the next is tested separately below.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from functools import cache

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from adapters import mqtt_formats as fmt
from adapters import wire
from adapters.reading import Reading
from adapters.wire import amr_v1_payload

TOPIC = "amr/v1/gw-7/readings"
SCHEMA = json.loads(wire.AMR_SCHEMA_PATH.read_text(encoding="utf-8"))
FLAGS = SCHEMA["$defs"]["reading"]["properties"]["quality"]["items"]["enum"]
WH = Decimal("0.001")

VALID = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MUTATED = settings(max_examples=60, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# --- JSON text with full control over number literals, duplicate keys and layout -----------


class Raw(str):
    """JSON text put into the payload as it is (a number literal, NaN, ...)."""


class Pairs(list):
    """A JSON object as (key, value) pairs: it can repeat a key, which a dict cannot."""


def dump(obj, ascii_only: bool, item_sep: str, key_sep: str) -> str:
    def go(o):
        if isinstance(o, Raw):
            return str(o)
        if isinstance(o, dict | Pairs):
            pairs = o.items() if isinstance(o, dict) else o
            return "{" + item_sep.join(json.dumps(k, ensure_ascii=ascii_only) + key_sep + go(v) for k, v in pairs) + "}"
        if isinstance(o, list):
            return "[" + item_sep.join(go(x) for x in o) + "]"
        return json.dumps(o, ensure_ascii=ascii_only)

    return go(obj)


LAYOUTS = st.sampled_from([(",", ":"), (", ", ": "), (",\n  ", " : ")])


# --- comparing the two decoders ----------------------------------------------------------------


def same_values(fast: list[fmt.DeviceValue], checked: list[fmt.DeviceValue]) -> None:
    assert len(fast) == len(checked)
    for i, (f, c) in enumerate(zip(fast, checked, strict=True)):
        where = f"values[{i}]"
        assert (f.device, f.register, f.source) == (c.device, c.register, c.source), where
        assert type(f.value) is Decimal and type(c.value) is Decimal, where
        assert str(f.value) == str(c.value), where  # equal including the scale: 1.500 is not 1.5
        assert f.ts == c.ts and f.ts.tzinfo is UTC and c.ts.tzinfo is UTC, where
        assert type(f.quality) is frozenset and type(c.quality) is frozenset, where
        assert f.quality == c.quality, where
    assert fast == checked


def both(payload: bytes, topic: str = TOPIC) -> tuple[fmt.Decoded | None, fmt.Decoded]:
    """Both decoders on one message; when the fast path answers, it answers as the checked one."""
    wire._forget_known_ids()
    fast = wire._decode_amr_fast(topic, payload)
    checked = wire._decode_amr_checked(topic, payload)
    if currently_in_test_context():
        note(f"payload={payload!r}")
        note(f"fast={None if fast is None else fast.values!r}")
        note(f"checked values={checked.values!r} problems={checked.problems!r} forwarded={checked.forwarded!r}")
    if fast is not None:
        assert checked.problems == [], "fast path accepted a message the schema path refuses"
        assert checked.forwarded == [], "fast path took a message with forwarded rejects"
        assert (fast.topic, fast.format, fast.family) == (checked.topic, checked.format, checked.family)
        assert fast.problems == [] and fast.forwarded == [] and fast.ignored is None
        same_values(fast.values, checked.values)
    return fast, checked


# --- valid messages ----------------------------------------------------------------------------

# Strategies are built once, at import: hypothesis spends more building and checking a strategy
# than drawing from it, so composites below only draw from these.
_DIGIT_COUNT: dict[tuple[int, int], st.SearchStrategy[int]] = {}
_DIGIT_VALUE = {n: st.integers(0, 10**n - 1) for n in range(1, 26)}


@st.composite
def _digits(draw, lo: int, hi: int) -> str:
    n = draw(_DIGIT_COUNT[lo, hi])
    return str(draw(_DIGIT_VALUE[n])).zfill(n)


@cache
def digits(lo: int, hi: int) -> st.SearchStrategy[str]:
    """lo..hi ASCII digits, leading zeros included (cheaper to draw than st.from_regex)."""
    _DIGIT_COUNT[lo, hi] = st.integers(lo, hi)
    return _digits(lo, hi)


@cache
def orders(keys: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    return st.permutations(keys)


def shuffled(draw, d: dict) -> dict:
    return {k: d[k] for k in draw(orders(tuple(d)))}


METER_CHARS = st.characters(exclude_characters=[chr(c) for c in range(32)], exclude_categories=["Cs"])
METERS = st.one_of(
    st.integers(0, 999_999).map(lambda n: f"MTR-{n:06d}"),
    st.integers(0, 99_999_999).map(str),  # bare serial numbers
    st.text(METER_CHARS, min_size=1, max_size=64),
    st.just("m" * 64),
    st.just("é" * 64),
)
METER_POOLS = st.lists(METERS, min_size=1, max_size=5)
POOL_INDEX = st.integers(0, 4)
OBIS = st.one_of(
    st.sampled_from(["1.8.0", "1.8.1", "1.8.2", "1.8.3", "2.8.0", "15.8.0", "1.8.0"]),
    st.tuples(*[digits(1, 3)] * 3).map(".".join),
)
OFFSETS = st.one_of(
    st.sampled_from([0, 180, -330, 345, 840, -720, 60]).map(lambda m: timedelta(minutes=m)),
    st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timedelta(minutes=m)),
)
NAIVE_TIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31))
TIMESPECS = st.sampled_from(["seconds", "seconds", "milliseconds", "microseconds", "minutes", "auto"])
SEPARATORS = st.sampled_from("TT ")
VALUE_KINDS = st.sampled_from(["str", "str", "str", "int", "float", "literal", "bigint"])
FRACTIONS = st.one_of(st.just(""), digits(1, 9).map(lambda s: "." + s))
COUNTS = st.integers(0, 10**15)
BIGINTS = st.integers(2**63 - 2, 10**40)
FLOATS = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
MANTISSAS = st.tuples(st.integers(0, 10**25 - 1).map(str), st.one_of(st.just(""), digits(1, 25).map(lambda s: "." + s)))
EXPONENTS = st.one_of(st.just(""), st.integers(-300, 290).map(lambda e: f"{'eE'[e % 2]}{e:+d}"),
                      st.integers(0, 30).map(lambda e: f"e{e}"))
QUALITY = st.lists(st.sampled_from(FLAGS), unique=True, max_size=len(FLAGS))
READING_SOURCES = st.one_of(st.just(""), st.text(max_size=20), st.just("s" * 256))
MESSAGE_SOURCES = st.one_of(st.just(""), st.just("gw-7"), st.text(max_size=128))
UNITS = st.sampled_from([None, "kWh", "Wh"])
READING_COUNTS = {n: st.integers(n, 12) for n in (0, 1)}


@st.composite
def timestamps(draw) -> tuple[str, datetime]:
    """(ISO text with an offset, the instant in UTC)."""
    t = draw(NAIVE_TIMES)
    spec = draw(TIMESPECS)
    if spec in ("seconds", "minutes"):
        t = t.replace(microsecond=0, second=0 if spec == "minutes" else t.second)
    elif spec == "milliseconds":
        t = t.replace(microsecond=t.microsecond // 1000 * 1000)
    aware = t.replace(tzinfo=timezone(draw(OFFSETS)))
    text = aware.isoformat(sep=draw(SEPARATORS), timespec=spec)
    if text.endswith("+00:00") and draw(st.booleans()):
        text = text[:-6] + "Z"
    return text, aware.astimezone(UTC)


TIMESTAMPS = timestamps()


@st.composite
def values(draw) -> tuple[object, Decimal]:
    """(the JSON value, the Decimal it stands for)."""
    kind = draw(VALUE_KINDS)
    if kind == "str":
        text = draw(digits(1, 15)) + draw(FRACTIONS)
        return text, Decimal(text)
    if kind in ("int", "bigint"):  # a JSON number has no upper bound in the schema
        n = draw(COUNTS if kind == "int" else BIGINTS)
        return n, Decimal(n)
    if kind == "float":
        f = draw(FLOATS)
        return f, Decimal(repr(f))
    # a number literal as a gateway's own JSON encoder might write it
    text = "".join(draw(MANTISSAS)) + draw(EXPONENTS)
    if "." in text or "e" in text.lower():
        # a literal beyond the largest float is not finite: the invalid mutations cover it
        assume(math.isfinite(float(text)))
        return Raw(text), Decimal(repr(float(text)))
    return Raw(text), Decimal(int(text))


VALUES = values()


@st.composite
def readings(draw) -> tuple[dict, tuple]:
    """(a reading without its meter, what it stands for): the message picks the meter from a fleet."""
    register = draw(OBIS)
    ts_text, ts = draw(TIMESTAMPS)
    value, num = draw(VALUES)
    r: dict = {"meter": None, "register": register, "ts": ts_text, "value": value}
    flags = frozenset()
    if draw(st.booleans()):
        r["quality"] = draw(QUALITY)
        flags = frozenset(r["quality"])
    src = None
    if draw(st.booleans()):
        src = r["source"] = draw(READING_SOURCES)
    return shuffled(draw, r), (register, ts, num, flags, src)


READINGS = readings()


@st.composite
def messages(draw, min_readings: int = 0) -> tuple[dict, list[fmt.DeviceValue], dict]:
    """(the message as objects, the values it stands for, how to write it)."""
    meters = draw(METER_POOLS)
    rs = []
    for _ in range(draw(READING_COUNTS[min_readings])):
        r, facts = draw(READINGS)
        r["meter"] = meters[draw(POOL_INDEX) % len(meters)]
        rs.append((r, facts))
    doc: dict = {"v": 1, "readings": [r for r, _ in rs]}
    if draw(st.booleans()):
        doc["source"] = draw(MESSAGE_SOURCES)
    unit = draw(UNITS)
    if unit is not None:
        doc["unit"] = unit
    doc = shuffled(draw, doc)
    msg_source = doc.get("source") or f"mqtt:{TOPIC}"
    expected = [
        fmt.DeviceValue(r["meter"], reg, ts, num * WH if unit == "Wh" else num, flags, src or msg_source)
        for r, (reg, ts, num, flags, src) in rs
    ]
    layout = draw(LAYOUTS)
    how = {"ascii_only": draw(st.booleans()), "item_sep": layout[0], "key_sep": layout[1]}
    return doc, expected, how


MESSAGES = {n: messages(n) for n in (0, 1)}


@VALID
@given(MESSAGES[0])
def test_valid_messages_take_the_fast_path_with_the_checked_result(msg):
    doc, expected, how = msg
    payload = dump(doc, **how).encode()
    fast, checked = both(payload)
    assert checked.problems == [] and checked.forwarded == [], "generator made an invalid message"
    same_values(checked.values, expected)
    assert fast is not None, "a valid amr/v1 message fell back to the schema path"


# --- mutations that break one thing ------------------------------------------------------------
# Each takes (draw, doc, i) and breaks reading i or the message; it returns what the checked path
# must then say: "reading" (that reading refused, the others kept), "message" (nothing kept),
# "forwarded" (forwarded rejects), "bad_forwarded" (a forwarded reject refused), or None (the mutation may leave a valid message).

BAD_VALUE_TEXT = ["1e5", "+1", " 1", "1 ", "1_0", ".5", "5.", "١٢", "１２", "12.1234567890", "1234567890123456",
                  "1234567890123456.5", "", "-1", "-0", "1.2.3", "0x10", "NaN", "Infinity", "1,5", "12\n", "1.", "½"]


BAD_VALUES = st.one_of(
    st.sampled_from(BAD_VALUE_TEXT),
    st.integers(max_value=-1),
    st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False),
    st.sampled_from([True, False, None, [], {}, [1], {"v": 1}]),
    st.sampled_from([Raw("1e400"), Raw("-1e400"), Raw("-1"), Raw("-0.5")]),  # 1e400 is inf in JSON readers
    st.tuples(digits(16, 20), st.one_of(st.just(""), digits(1, 3).map(lambda s: "." + s))).map("".join),  # 16+ digit whole part
    st.tuples(digits(1, 3), digits(10, 14)).map(".".join),  # 10+ decimals
)


def m_value(draw, doc, i):
    doc["readings"][i]["value"] = draw(BAD_VALUES)
    return "reading"


BAD_TS = ["2026-01-01T00:30:00", "2026-01-01 00:30:00.123", "2026-01-01", "20260101T003000",  # naive
          "01/01/2026 00:30 +03:00", "2026-13-01T00:00:00Z", "2026-01-01T25:00:00Z", "yesterday at noon",
          "2026-02-30T00:00:00+03:00", "2026-01-01T00:30:00+25:00", "2026-01-01T00:30:00 UTC", "Thu, 01 Jan 2026",
          "2026-1-1", "2026-01-01T00:30:00.123456789012345678901+03:00"]  # too short; longer than 40


BAD_TIMES = st.one_of(st.sampled_from(BAD_TS), NAIVE_TIMES.map(datetime.isoformat),
                      st.sampled_from([1767225600, 1767225600.5, None, ["2026-01-01T00:00:00Z"]]))


def m_ts(draw, doc, i):
    doc["readings"][i]["ts"] = draw(BAD_TIMES)
    return "reading"


BAD_REGISTERS = ["1.8", "1.8.0.0", "a.b.c", "1.8.0 ", " 1.8.0", "1234.8.0", "", "1.8.x", "１.８.０", "١.٨.٠",
                 "1.8.0\n", "1..8", "1-8-0", "1:1.8.0", "1.8.0*255", "1.8."]


BAD_REGISTER_VALUES = st.one_of(
    st.sampled_from(BAD_REGISTERS), st.sampled_from([180, 1.8, None, ["1", "8", "0"]]),
    st.text(max_size=8).filter(lambda s: wire._REGISTER_TEXT.fullmatch(s) is None),
)


def m_register(draw, doc, i):
    bad = draw(BAD_REGISTER_VALUES)
    # a register that is also the text of a meter id: its own case below
    assume(bad not in [r["meter"] for r in doc["readings"]])
    doc["readings"][i]["register"] = bad
    return "reading"


BAD_METERS = st.one_of(
    st.sampled_from(["", "\x00", "a\tb", "meter\n", "x\x1f", "\x1b[31mred", "m" * 65, "é" * 65, "😀" * 65]),
    st.text(METER_CHARS, min_size=65, max_size=80),
    st.tuples(st.text(METER_CHARS, max_size=10), st.characters(max_codepoint=31), st.text(max_size=10)).map("".join),
    st.sampled_from([123, None, True, ["m"]]),
)


def m_meter(draw, doc, i):
    doc["readings"][i]["meter"] = draw(BAD_METERS)
    return "reading"


def m_reading_fields(draw, doc, i):
    r = doc["readings"][i]
    what = draw(st.sampled_from(["unknown", "missing", "quality", "source", "not_object"]))
    if what == "unknown":
        r[draw(st.sampled_from(["unit", "Meter", "extra", "rejected", "values", "quality "]))] = draw(
            st.sampled_from(["kWh", 1, None, "x"]))
    elif what == "missing":
        del r[draw(st.sampled_from(["meter", "register", "ts", "value"]))]
    elif what == "quality":
        flag = draw(st.sampled_from(FLAGS))
        r["quality"] = draw(st.sampled_from([
            [flag, flag], [*FLAGS, flag], ["estimated"], ["RETRIED"], [""], [flag, "suspect"],
            FLAGS * 3, "retried", None, [1], {"retried": True},
        ]))
    elif what == "source":
        r["source"] = draw(st.sampled_from(["s" * 257, None, 1, ["gw"]]))
    else:
        doc["readings"][i] = draw(st.sampled_from(["1.8.0=5", 5, None, [r.get("meter"), 5], True]))
    return "reading"


def m_message(draw, doc, i):
    what = draw(st.sampled_from(["v", "v_missing", "unit", "source", "unknown", "readings", "not_object"]))
    if what == "v":
        doc["v"] = draw(st.sampled_from([2, 0, -1, "1", True, None, 1.5, [1]]))
    elif what == "v_missing":
        del doc["v"]
    elif what == "unit":
        doc["unit"] = draw(st.sampled_from(["MWh", "kwh", "wh", "", None, 1, "kWh "]))
    elif what == "source":
        doc["source"] = draw(st.sampled_from(["g" * 129, None, 7, ["gw"]]))
    elif what == "unknown":
        doc[draw(st.sampled_from(["ts", "readings2", "V", "meta", "Rejected"]))] = draw(st.sampled_from([1, "x", [], {}]))
    elif what == "readings":
        if draw(st.booleans()):
            del doc["readings"]
        else:
            doc["readings"] = draw(st.sampled_from(["many", None, {"0": doc["readings"][0]}, 5]))
    else:
        return Raw(json.dumps(draw(st.sampled_from([doc["readings"], "amr", 1, None, [doc]]))))
    return "message"


def m_forwarded(draw, doc, i):
    def reject():
        x = {"rejected": True, "source": "mqtt:tele/x/SENSOR", "reason": "bad checksum", "code": "checksum",
             "raw": base64.b64encode(draw(st.binary(max_size=20))).decode()}
        for k in draw(st.lists(st.sampled_from(["meter", "register", "ts"]), unique=True)):
            x[k] = draw(st.sampled_from([None, {"meter": "m1", "register": "1.8.0", "ts": "2026-01-01T00:00:00Z"}[k]]))
        return x

    kind = draw(st.sampled_from(["valid", "valid", "invalid"]))
    doc["rejected"] = [reject() for _ in range(draw(st.integers(1, 3)))]
    if kind == "invalid":
        bad = doc["rejected"][0]
        what = draw(st.sampled_from(["rejected", "missing", "unknown", "long"]))
        if what == "rejected":
            bad["rejected"] = False
        elif what == "missing":
            del bad["reason"]
        elif what == "unknown":
            bad["extra"] = 1
        else:
            bad["code"] = "c" * 65
    return "forwarded" if kind == "valid" else "bad_forwarded"


def m_encoding(draw, doc, i):
    """Not JSON, not UTF-8 outside strings, non-finite literals, control characters raw in a string."""
    what = draw(st.sampled_from(["nan", "bom", "trailing", "truncated", "empty", "non_utf8", "raw_control"]))
    if what == "nan":
        doc["readings"][i]["value"] = Raw(draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])))
        return "message"
    if what == "raw_control":  # JSON forbids a raw control character in a string
        return ("raw", draw(st.sampled_from(["\t", "\n", "\r", "\x00", "\x01", "\x1f"])))
    return (what, None)


def m_lenient(draw, doc, i):
    """Breaks nothing the schema path minds, but the fast path may step aside."""
    r = doc["readings"][i]
    what = draw(st.sampled_from(["dup_value_last_wins", "dup_value_bad_last", "v_float", "empty_rejected"]))
    if what == "dup_value_last_wins":  # json.loads keeps the last of repeated keys
        doc["readings"][i] = Pairs([("value", -1), *r.items()])
        return None
    if what == "dup_value_bad_last":
        doc["readings"][i] = Pairs([*r.items(), ("value", -1)])
        return "reading"
    if what == "v_float":  # JSON Schema's const compares numbers by value: 1.0 is 1
        doc["v"] = Raw("1.0")
        return None
    doc["rejected"] = []
    return None


# The two below once found real disagreements; see the regression tests at the end of the file.


def m_register_text_seen_as_meter(draw, doc, i):
    """Reading i's register is the text of a meter id checked just before it (this or an earlier reading).

    Once, meter ids and registers shared one cache keyed by the text alone, so a text that
    passed as a meter id then passed as a register without the register pattern.
    """
    j = draw(st.integers(0, i))
    text = doc["readings"][j]["meter"]
    assume(wire._REGISTER_TEXT.fullmatch(text) is None)
    doc["readings"][i]["register"] = text
    return "reading"


def m_non_utf8_in_string(draw, doc, i):
    """Bytes that are not UTF-8 inside a JSON string (a Latin-1 meter id, a cut multibyte character).

    msgspec raises UnicodeDecodeError (not msgspec.DecodeError) for them; the fast path must
    step aside so that `decode()` reports `malformed` instead of raising.
    """
    field = draw(st.sampled_from(["meter", "source", "ts", "value"]))
    target = doc if field == "source" and draw(st.booleans()) else doc["readings"][i]
    target[field] = "M\ue000" if field != "ts" else "2026-01-01T00:00:00\ue000Z"
    return ("in_string", draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf",
                                               b"\xf4\x90\x80\x80", b"\xe2\x82"])))


MUTATIONS = {
    "value": m_value,
    "ts": m_ts,
    "register": m_register,
    "meter": m_meter,
    "reading_fields": m_reading_fields,
    "message": m_message,
    "forwarded": m_forwarded,
    "encoding": m_encoding,
    "lenient": m_lenient,
    "register_text_seen_as_meter": m_register_text_seen_as_meter,
    "non_utf8_in_string": m_non_utf8_in_string,
}


@st.composite
def mutated(draw, kind: str) -> tuple[bytes, str | None, int]:
    doc, _, how = draw(MESSAGES[1])
    i = draw(st.integers(0, len(doc["readings"]) - 1))
    n = len(doc["readings"])
    says = MUTATIONS[kind](draw, doc, i)
    note(f"mutation {kind} of reading {i}: {says!r}")
    if isinstance(says, Raw):  # the whole payload replaced
        return str(says).encode(), "message", n
    if isinstance(says, tuple):  # byte-level damage to the written message
        what, arg = says
        if what == "in_string":
            text = dump(doc, ascii_only=False, item_sep=how["item_sep"], key_sep=how["key_sep"])
            return text.encode().replace("\ue000".encode(), arg), "message", n
        text = dump(doc, ascii_only=True, item_sep=how["item_sep"], key_sep=how["key_sep"])
        payload = text.encode()
        if what == "bom":
            payload = b"\xef\xbb\xbf" + payload
        elif what == "trailing":
            payload += draw(st.sampled_from([b"x", b",", b"}", b"{}", b" 1", b"\x00"]))
        elif what == "truncated":
            payload = payload[: draw(st.integers(0, len(payload) - 1))]
        elif what == "empty":
            payload = draw(st.sampled_from([b"", b" ", b"\n", b"null"]))
        elif what == "non_utf8":  # between tokens: at either end or after a separator
            bad = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"]))
            cut = draw(st.sampled_from([0, 1, len(payload) - 1, len(payload)]))
            payload = payload[:cut] + bad + payload[cut:]
        elif what == "raw":
            doc["source"] = "gw\ue000" + "7"
            text = dump(doc, ascii_only=True, item_sep=how["item_sep"], key_sep=how["key_sep"])
            payload = text.replace("\\ue000", arg).encode()
        return payload, "message", n
    return dump(doc, **how).encode(), says, n


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_mutated_messages_fall_back_or_agree(kind):
    @MUTATED
    @given(mutated(kind))
    def run(case):
        payload, says, n = case
        fast, checked = both(payload)
        if says == "reading":  # the schema path refuses that reading alone, by name
            assert fast is None
            assert len(checked.problems) == 1 and len(checked.values) == n - 1 and checked.forwarded == []
            assert checked.problems[0].raw is not None
        elif says == "message":
            assert fast is None
            assert checked.problems and checked.values == []
        elif says == "forwarded":
            assert fast is None
            assert checked.forwarded and checked.problems == [] and len(checked.values) == n
        elif says == "bad_forwarded":  # the refused reject is named, the readings are kept
            assert fast is None
            assert checked.problems and len(checked.values) == n

    run()


# --- every listed edge, deterministically (the properties draw them only now and then) ---------


def three(field: str, value) -> bytes:
    rs = [{"meter": f"m{k}", "register": "1.8.0", "ts": "2026-01-01T00:30:00+03:00", "value": "12.5"} for k in range(3)]
    rs[1][field] = value
    return dump({"v": 1, "source": "gw-7", "readings": rs}, ascii_only=False, item_sep=",", key_sep=":").encode()


BAD_FIELDS = (
    [("value", v) for v in [*BAD_VALUE_TEXT, -1, -0.5, True, None, [], {}, Raw("1e400"), Raw("-1e400")]]
    + [("ts", v) for v in [*BAD_TS, 1767225600, None]]
    + [("register", v) for v in [*BAD_REGISTERS, 180, None]]
    + [("meter", v) for v in ["", "\x00", "a\tb", "meter\n", "x\x1f", "m" * 65, "é" * 65, "😀" * 65, 123, None]]
    + [("quality", v) for v in [["late", "late"], ["estimated"], ["RETRIED"], [*FLAGS, "late"], "late", None]]
    + [("source", v) for v in ["s" * 257, None, 5]]
    + [("unit", "kWh"), ("extra", 1)]
)


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in BAD_FIELDS])
def test_every_listed_bad_field_falls_back_and_is_named(field, value):
    fast, checked = both(three(field, value))
    assert fast is None
    [p] = checked.problems
    assert p.reason.startswith("readings/1") and p.raw is not None
    assert [v.device for v in checked.values] == ["m0", "m2"]


GOOD_EDGES = [
    ("value", "0"), ("value", "000"), ("value", "123456789012345"), ("value", "123456789012345.123456789"),
    ("value", "0.000000001"), ("value", 0), ("value", 0.0), ("value", Raw("-0")), ("value", Raw("1E+3")),
    ("value", Raw("12.50")), ("value", 10**30), ("meter", "m" * 64), ("meter", "😀" * 64), ("meter", "a\x7f\u0085\u2028"),
    ("meter", "1.8.0"), ("register", "999.999.999"), ("register", "0.0.0"), ("register", "001.008.000"),
    ("ts", "2026-01-01T00:00:00.123456+14:00"), ("ts", "2026-01-01 00:00:00-05:30"), ("ts", "2026-01-01T00:00Z"),
    ("ts", "20260101T000000Z"), ("ts", "2026-01-01\u00e900:00:00Z"), ("ts", "2026-01-01T00:00:00.1+00:00"),
    ("quality", list(FLAGS)), ("quality", []), ("source", ""), ("source", "s" * 256), ("source", "a\tb\x00"),
]


@pytest.mark.parametrize(("field", "value"), GOOD_EDGES, ids=[f"{f}={v!r}"[:40] for f, v in GOOD_EDGES])
def test_every_listed_good_edge_takes_the_fast_path(field, value):
    fast, checked = both(three(field, value))
    assert checked.problems == [] and len(checked.values) == 3
    assert fast is not None


# --- examples ----------------------------------------------------------------------------------

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def gateway_batch(n: int = 100) -> list[Reading]:
    """What a gateway's uplink publishes: spooled readings of a fleet, two registers each."""
    out = []
    for k in range(n):
        ts = T0 + timedelta(minutes=30 * (k // 50), microseconds=1000 * (k % 3 == 0))
        if k % 4 == 1:
            ts = ts.astimezone(timezone(timedelta(hours=3)))
        flags = frozenset({"spooled"} | ({"retried", "late"} if k % 7 == 0 else set()))
        value = Decimal(f"{10_000 + 13 * k}.{k % 100:02d}") if k % 5 else Decimal(12_345 + k) * Decimal("0.001")
        out.append(Reading(f"MTR-{k // 2:05d}", ("1.8.1", "1.8.2")[k % 2], ts, value, flags,
                           "" if k % 3 else "modbus:10.0.0.7:502/unit 3"))
    return out


def test_gateway_batch_of_100_takes_the_fast_path():
    items = gateway_batch()
    payload = amr_v1_payload(items, "gw-7")
    fast, checked = both(payload)
    assert fast is not None
    assert checked.problems == [] and len(checked.values) == 100
    assert [(v.device, v.register, v.ts, str(v.value), v.quality, v.source) for v in fast.values] == [
        (r.meter_id, r.register, r.ts, str(r.value), r.quality, r.source or "gw-7") for r in items
    ]
    public = fmt.decode(TOPIC, payload)
    same_values(public.values, checked.values)
    assert public.problems == []


def test_simulator_batch_takes_the_fast_path():
    from simulators import mqtt_sim
    from simulators.consumption import ConsumptionModel

    models = {n: ConsumptionModel(seed=n) for n in range(10)}
    [(topic, payload)] = mqtt_sim.messages("amr", range(10), T0, models, batch=10)
    fast, checked = both(payload, topic)
    assert fast is not None and len(fast.values) == 10 and checked.problems == []


def test_one_bad_reading_falls_back_and_is_named_alone():
    items = gateway_batch()
    good = json.loads(amr_v1_payload(items, "gw-7"))
    doc = json.loads(amr_v1_payload(items, "gw-7"))
    doc["readings"][37]["value"] = -5
    payload = json.dumps(doc, separators=(",", ":")).encode()

    wire._forget_known_ids()
    assert wire._decode_amr_fast(TOPIC, payload) is None
    d = fmt.decode(TOPIC, payload)  # the public path: falls back to the schema pass
    assert d.format == "amr" and d.forwarded == []
    [p] = d.problems
    assert p.code == "negative"
    assert p.reason == "readings/37/value: -5 is negative; an energy counter never is"
    assert (p.device, p.register) == (items[37].meter_id, items[37].register)
    assert p.raw == json.dumps(doc["readings"][37], separators=(",", ":")).encode()

    del good["readings"][37]
    without = wire._decode_amr_fast(TOPIC, json.dumps(good).encode())
    assert without is not None and len(d.values) == 99
    same_values(d.values, without.values)


@pytest.mark.parametrize(("value", "code", "why"), [
    ('"1e5"', "type", "'1e5' is not a decimal string"),
    ('"12.1234567890"', "type", "'12.1234567890' is not a decimal string"),
    ('"1234567890123456"', "type", "'1234567890123456' is not a decimal string"),
    ("-0.5", "negative", "-0.5 is negative"),
])
def test_bad_value_is_named_by_the_public_path(value, code, why):
    payload = ('{"v":1,"readings":[{"meter":"m1","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"7"},'
               '{"meter":"m2","register":"1.8.0","ts":"2026-01-01T00:00:00+03:00","value":' + value + "}]}").encode()
    wire._forget_known_ids()
    assert wire._decode_amr_fast(TOPIC, payload) is None
    d = fmt.decode(TOPIC, payload)
    [p] = d.problems
    assert p.code == code and p.reason.startswith(f"readings/1/value: {why}") and p.device == "m2"
    assert [(v.device, str(v.value)) for v in d.values] == [("m1", "7")]


# --- regressions: disagreements the tests above once found between the two decoders ---


# Meter ids and registers once shared one cache keyed by the text alone. A text that passed
# `_METER_TEXT` as a meter id was then taken as a valid register without `_REGISTER_TEXT`, while
# the schema path refuses that reading ('"a.b.c" does not match "^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$"').
def test_register_is_checked_as_a_register_even_when_its_text_was_a_meter_id():
    payload = b'{"v":1,"readings":[{"meter":"a.b.c","register":"a.b.c","ts":"2026-01-01T00:00:00Z","value":"1"}]}'
    fast, checked = both(payload)
    assert checked.values == [] and checked.problems[0].code == "schema"
    assert fast is None


# The same across messages: the caches outlive a message.
def test_a_meter_id_seen_earlier_does_not_make_a_valid_register():
    wire._forget_known_ids()
    first = b'{"v":1,"readings":[{"meter":"1.8","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"1"}]}'
    later = b'{"v":1,"readings":[{"meter":"m1","register":"1.8","ts":"2026-01-01T00:00:00Z","value":"2"}]}'
    assert wire._decode_amr_fast(TOPIC, first) is not None
    assert wire._decode_amr_checked(TOPIC, later).problems  # register "1.8" breaks the schema
    assert wire._decode_amr_fast(TOPIC, later) is None


# Bytes that are not UTF-8 inside a JSON string make msgspec raise UnicodeDecodeError, a
# ValueError but not a msgspec.DecodeError: the fast path must step aside for 'malformed'.
@pytest.mark.parametrize("payload", [
    b'{"v":1,"readings":[{"meter":"Z\xe4hler-1","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"1"}]}',
    b'{"v":1,"source":"gw\xff","readings":[]}',
], ids=["latin1_meter_id", "ff_in_source"])
def test_non_utf8_inside_a_string_falls_back_to_malformed(payload):
    checked = wire._decode_amr_checked(TOPIC, payload)
    assert [p.code for p in checked.problems] == ["malformed"]
    assert wire._decode_amr_fast(TOPIC, payload) is None
    assert [p.code for p in fmt.decode(TOPIC, payload).problems] == ["malformed"]


# Found by the tests above, outside the fast path: both used to raise out of decode().
def test_a_lone_surrogate_escape_is_malformed_not_an_exception():
    payload = b'{"v":1,"readings":[{"meter":"\\udc00x","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"1"}]}'
    assert wire._decode_amr_fast(TOPIC, payload) is None
    d = fmt.decode(TOPIC, payload)
    assert [p.code for p in d.problems] == ["malformed"] and "not text" in d.problems[0].reason


def test_a_time_out_of_range_in_utc_refuses_that_reading_alone():
    payload = (b'{"v":1,"readings":[{"meter":"m1","register":"1.8.0","ts":"0001-01-01T00:00:00+01:00","value":"1"},'
               b'{"meter":"m1","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"2"}]}')
    assert wire._decode_amr_fast(TOPIC, payload) is None
    d = fmt.decode(TOPIC, payload)
    assert [(p.code, p.meter if hasattr(p, "meter") else p.device) for p in d.problems] == [("ts", "m1")]
    assert "out of range" in d.problems[0].reason
    assert [str(v.value) for v in d.values] == ["2"]
