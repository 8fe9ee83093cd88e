"""amr/v1, the wire format of readings: one module for both of its ends.

A gateway's spool stores each reading (or reject) as the JSON text of one
amr/v1 item, and its uplink publishes a batch of those texts as one amr/v1
message on `amr/v1/<source>/readings`; the collector decodes such a message
back into readings. The encoder, the topic, the schema
(adapters/schemas/amr-v1.schema.json) and the two decoders live here
together, so a change to the format is made, and seen, in one place:

- the fast decoder (msgspec typed records) takes a message that is valid
  throughout, which is what gateways publish;
- any other message takes the JSON Schema pass, which names every problem
  and refuses a bad reading alone, keeping the rest.

tests/test_mqtt_fast_decode.py holds the two decoders to the same results.
A decoded message is a `Decoded` holding `DeviceValue`s, `Problem`s and the
rejects a gateway forwarded; `adapters.mqtt_formats` decodes the device
payloads into the same records.
"""

from __future__ import annotations

import base64
import json
import math
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from adapters import quality
from adapters.obis import ENERGY_UNITS
from adapters.reading import Reading, Rejected

AMR_SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "amr-v1.schema.json"
FORMAT_VERSION = 1  # the "v" of every message; an incompatible change gets a new topic amr/v2/...

AMR_TOPIC = re.compile(r"^amr/v1/(?P<device>[^/]+)/readings$")
AMR_SUBSCRIBE = ("amr/v1/+/readings",)
MAX_RAW_KEPT = 64 * 1024  # raw bytes kept in rejected_reading for one refused message

_KWH = ENERGY_UNITS["kWh"]  # the unit of amr/v1 unless a message names another
_NO_FLAGS: frozenset[str] = frozenset()


def default_topic(gateway_id: str | None = None) -> str:
    """The topic a gateway publishes on: its id (by default the host name) names it."""
    return f"amr/v1/{gateway_id or socket.gethostname()}/readings"


# --- what a decoded message is made of ------------------------------------------------


class DeviceValue(NamedTuple):
    """One register value as the device published it, converted to kWh.

    A tuple rather than a frozen dataclass: a batched message makes one per
    reading, and a tuple is built in half the time.
    """

    device: str
    register: str
    ts: datetime
    value: Decimal
    quality: frozenset[str] = frozenset()
    source: str = ""


@dataclass(frozen=True, slots=True)
class Problem:
    """Why (part of) a message yields no reading: code for metrics, reason for people."""

    code: str
    reason: str
    device: str | None = None
    register: str | None = None
    raw: bytes | None = None  # the part refused, when not the whole message


@dataclass
class Decoded:
    """Everything one message yields, or why it yields nothing (amr/v1 and device payloads alike)."""

    topic: str
    format: str | None  # the [[format]] name, "amr", or None when the topic is unknown
    family: str | None
    values: list[DeviceValue] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    forwarded: list[Rejected] = field(default_factory=list)  # rejects a gateway forwarded in amr/v1
    ignored: str | None = None  # a valid message that carries no energy by design (status events)

    def reject(self, code: str, reason: str, **kw: Any) -> Decoded:
        self.problems.append(Problem(code, reason, **kw))
        return self


# --- encoding: the spool's rows and the uplink's messages ---------------------------------


def encode_item(item: Reading | Rejected, flag: str | None = None) -> str:
    """One item as compact JSON text: the spool's row and the uplink's wire form agree.

    `flag` adds a quality flag to a reading (the spool adds `spooled`), so the
    uplink can publish the stored text as it is.
    """
    if isinstance(item, Reading):
        return json.dumps(
            {
                "meter": item.meter_id,
                "register": item.register,
                "ts": item.ts.isoformat(),
                "value": str(item.value),
                "quality": sorted(item.quality | {flag} if flag else item.quality),
                "source": item.source,
            },
            separators=(",", ":"),
        )
    return json.dumps(
        {
            "rejected": True,
            "source": item.source,
            "reason": item.reason,
            "code": item.code,
            "raw": base64.b64encode(item.raw).decode("ascii"),
            "meter": item.meter_id,
            "register": item.register,
            "ts": item.ts.isoformat() if item.ts else None,
        },
        separators=(",", ":"),
    )


def decode_item(text: str) -> Reading | Rejected:
    """Inverse of `encode_item`."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    if d.get("rejected"):
        return Rejected(
            source=d["source"],
            raw=base64.b64decode(d["raw"]),
            reason=d["reason"],
            code=d["code"],
            meter_id=d.get("meter"),
            register=d.get("register"),
            ts=datetime.fromisoformat(d["ts"]) if d.get("ts") else None,
        )
    return Reading(
        d["meter"],
        d["register"],
        datetime.fromisoformat(d["ts"]),
        Decimal(d["value"]),
        frozenset(d.get("quality", ())),
        d.get("source", ""),
    )


def amr_v1_payload(items: Sequence[Reading | Rejected], source: str) -> bytes:
    """One `amr/v1` message (adapters/schemas/amr-v1.schema.json) carrying the items."""
    readings: list[str] = []
    rejected: list[str] = []
    for it in items:
        (readings if isinstance(it, Reading) else rejected).append(encode_item(it))
    body = f'{{"v":{FORMAT_VERSION},"source":{json.dumps(source)},"readings":[{",".join(readings)}]'
    if rejected:
        body += f',"rejected":[{",".join(rejected)}]'
    return (body + "}").encode()


def amr_v1_payload_encoded(texts: Sequence[str], source: str) -> bytes:
    """`amr_v1_payload` from items already encoded by the spool (no decode and re-encode)."""
    readings = [t for t in texts if not t.startswith('{"rejected":true')]
    rejected = [t for t in texts if t.startswith('{"rejected":true')] if len(readings) < len(texts) else []
    body = f'{{"v":{FORMAT_VERSION},"source":{json.dumps(source)},"readings":[{",".join(readings)}]'
    if rejected:
        body += f',"rejected":[{",".join(rejected)}]'
    return (body + "}").encode()


# --- decoding -----------------------------------------------------------------------------


def decode_amr(topic: str, payload: bytes) -> Decoded:
    """An amr/v1 message: the fast path when it is valid throughout, else the schema path."""
    return _decode_amr_fast(topic, payload) or _decode_amr_checked(topic, payload)


@lru_cache(maxsize=1)
def _amr_validator() -> Any:
    import jsonschema_rs

    return jsonschema_rs.validator_for(json.loads(AMR_SCHEMA_PATH.read_text(encoding="utf-8")))


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number a meter can count")


def load_json(payload: bytes, d: Decoded) -> Any:
    """The JSON document of a payload, or None with the reason recorded on d."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        d.reject("malformed", f"payload is not UTF-8 text (byte {exc.start})")
        return None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        d.reject("too_deep", "payload JSON is nested too deeply")
    except ValueError as exc:
        if "is not a number" in str(exc):
            d.reject("not_finite", f"payload contains {exc}")
        else:
            d.reject("malformed", f"payload is not JSON: {exc}")
    return None


def short_text(v: Any) -> str:
    """A JSON value as at most 40 characters of text, for a reason that quotes it."""
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# amr/v1 as typed records, mirroring amr-v1.schema.json (tests/test_mqtt_fast_decode.py holds the
# two to the same results). Only for messages that are valid throughout: a message this
# refuses, or one with forwarded rejects, takes the schema path, which names every problem.
class _FastReading(msgspec.Struct, forbid_unknown_fields=True):
    # the schema's patterns are checked in _decode_amr_fast: msgspec's pattern check costs
    # about a microsecond a field, three times the whole decode of a reading
    meter: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    register: str
    ts: Annotated[str, msgspec.Meta(min_length=10, max_length=40)]
    value: Annotated[int, msgspec.Meta(ge=0)] | Annotated[float, msgspec.Meta(ge=0)] | str
    # the source flags by their names in adapters.quality, spelled once; msgspec reads the values,
    # mypy takes no names inside Literal[...] (to it the list is of Any)
    quality: Annotated[list[Literal[quality.RETRIED, quality.CLOCK_SKEW, quality.METER_CLOCK,  # type: ignore[valid-type]
                                    quality.LATE, quality.MANUAL, quality.IMPORTED, quality.SPOOLED,
                                    quality.FROM_PROFILE]],
                       msgspec.Meta(max_length=16)] = []
    source: Annotated[str, msgspec.Meta(max_length=256)] = ""


class _FastMessage(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    readings: Annotated[list[_FastReading], msgspec.Meta(max_length=10000)]
    source: Annotated[str, msgspec.Meta(max_length=128)] = ""
    unit: Literal["kWh", "Wh"] = "kWh"


_FAST = msgspec.json.Decoder(_FastMessage)
_METER_TEXT = re.compile("[^\x00-\x1f]+")  # the schema's patterns, anchored as JSON Schema anchors them
_REGISTER_TEXT = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
# meter ids and registers checked already, each against its own pattern: a fleet repeats them
_known_meters: dict[str, bool] = {}
_known_registers: dict[str, bool] = {}


def _valid_id(text: str, pattern: re.Pattern[str], known: dict[str, bool]) -> bool:
    ok = known.get(text)
    if ok is None:
        if len(known) > 200_000:
            known.clear()
        ok = known[text] = pattern.fullmatch(text) is not None
    return ok


def _forget_known_ids() -> None:
    """Empty the caches of checked meter ids and registers (tests start from nothing)."""
    _known_meters.clear()
    _known_registers.clear()


def _decimal_text(v: str) -> bool:
    """The schema's ^[0-9]{1,15}(\\.[0-9]{1,9})?$ without a regex (a regex costs more than the
    rest of a reading's decode): strip the digits off both ends and look at what is left."""
    rest = v.strip("0123456789")
    if not rest:
        return 0 < len(v) <= 15
    if rest != ".":
        return False
    dot = v.index(".")
    return 0 < dot <= 15 and 0 < len(v) - dot - 1 <= 9


def _decode_amr_fast(topic: str, payload: bytes) -> Decoded | None:
    """A valid amr/v1 message decoded without the JSON Schema pass; None for any other."""
    try:
        doc = _FAST.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):  # bad UTF-8 inside a string raises the latter
        return None
    d = Decoded(topic, "amr", "amr")
    unit = ENERGY_UNITS[doc.unit]
    msg_source = doc.source or f"mqtt:{topic}"
    fromiso = datetime.fromisoformat
    append = d.values.append
    new = tuple.__new__  # a NamedTuple's own __new__ costs half again as much
    meters, registers = _known_meters, _known_registers
    # a gateway's message holds one poll: its readings share one or a few instants
    ts_text, ts = None, None
    for r in doc.readings:
        if not (meters.get(r.meter) or _valid_id(r.meter, _METER_TEXT, meters)) or not (
                registers.get(r.register) or _valid_id(r.register, _REGISTER_TEXT, registers)):
            return None
        if r.ts != ts_text:
            try:
                ts = fromiso(r.ts)
            except ValueError:
                return None
            if ts.tzinfo is not UTC:
                if ts.tzinfo is None:
                    return None
                try:
                    ts = ts.astimezone(UTC)
                except OverflowError:
                    return None
            ts_text = r.ts
        v = r.value
        if type(v) is str:
            if not _decimal_text(v):
                return None
            value = Decimal(v)
        else:
            value = Decimal(repr(v) if type(v) is float else str(v))
        if unit is not _KWH:
            value *= unit
        flags = r.quality
        if flags and len(set(flags)) != len(flags):
            return None  # uniqueItems
        append(new(DeviceValue, (r.meter, r.register, ts, value, frozenset(flags) if flags else _NO_FLAGS,
                                 r.source or msg_source)))
    return d


def _decode_amr_checked(topic: str, payload: bytes) -> Decoded:
    """Any amr/v1 message, validated against its JSON Schema: every problem named."""
    d = Decoded(topic, "amr", "amr")
    doc = load_json(payload, d)
    if d.problems:
        return d
    validator = _amr_validator()
    bad_readings: dict[int, str] = {}
    bad_rejects: set[int] = set()
    try:
        valid = validator.is_valid(doc)
    except UnicodeEncodeError as exc:  # a JSON escape of half a UTF-16 pair: no text at all
        return d.reject("malformed", f"payload holds a string that is not text ({exc.reason}: "
                                     f"{exc.object[exc.start:exc.end]!a})")
    if not valid:
        whole: list[Problem] = []
        for err in validator.iter_errors(doc):
            path = list(err.instance_path)
            where = "/".join(str(p) for p in path) or "(message)"
            if len(path) >= 2 and path[0] == "readings" and isinstance(path[1], int):
                if path[2:] == ["value"]:
                    # the validator shows a number beyond the largest float as null: explain the parsed value
                    value = doc["readings"][path[1]].get("value") if isinstance(
                        doc["readings"][path[1]], dict) else err.instance
                    bad_readings.setdefault(path[1], f"{where}: {_explain_value(value)}")
                else:
                    bad_readings.setdefault(path[1], f"{where}: {_short_msg(err.message)}")
            elif len(path) >= 2 and path[0] == "rejected" and isinstance(path[1], int):
                if path[1] not in bad_rejects:
                    bad_rejects.add(path[1])
                    d.reject("schema", f"{where}: {_short_msg(err.message)}")
            else:
                code = "unit" if path == ["unit"] else "schema"
                whole.append(Problem(code, f"{where}: {_short_msg(err.message)} (amr-v1.schema.json)"))
        if whole:
            d.problems = whole
            return d
    unit = ENERGY_UNITS[doc.get("unit", "kWh")]
    msg_source = doc.get("source") or f"mqtt:{topic}"
    for i, r in enumerate(doc["readings"]):
        meter = r.get("meter") if isinstance(r, dict) else None
        register = r.get("register") if isinstance(r, dict) else None
        meter = meter if isinstance(meter, str) else None
        register = register if isinstance(register, str) else None
        if i in bad_readings:
            d.problems.append(Problem(_code_of(bad_readings[i]), bad_readings[i], meter, register, _raw(r)))
            continue
        try:
            ts = datetime.fromisoformat(r["ts"])
        except ValueError:
            d.problems.append(Problem("ts", f"readings/{i}/ts: {r['ts']!r} is not ISO 8601", meter, register, _raw(r)))
            continue
        if ts.tzinfo is None:
            d.problems.append(Problem("ts", f"readings/{i}/ts: {r['ts']!r} has no offset; add Z or +03:00", meter, register, _raw(r)))
            continue
        v = r["value"]
        value = Decimal(repr(v) if isinstance(v, float) else str(v))
        if unit is not _KWH:
            value *= unit
        if ts.tzinfo is not UTC:
            try:
                ts = ts.astimezone(UTC)
            except OverflowError:
                d.problems.append(Problem("ts", f"readings/{i}/ts: {r['ts']!r} is out of range in UTC",
                                          meter, register, _raw(r)))
                continue
        flags = r.get("quality")
        d.values.append(
            DeviceValue(meter, register, ts, value,  # type: ignore[arg-type]
                        frozenset(flags) if flags else _NO_FLAGS, r.get("source") or msg_source)
        )
    for i, x in enumerate(doc.get("rejected", ())):
        if i in bad_rejects:
            continue
        try:
            raw_x = base64.b64decode(x["raw"], validate=True)
        except ValueError:
            raw_x = x["raw"].encode()
        ts_x = None
        if x.get("ts"):
            try:
                ts_x = datetime.fromisoformat(x["ts"])
            except ValueError:
                ts_x = None
        d.forwarded.append(Rejected(x["source"], raw_x, x["reason"], x["code"], x.get("meter"), x.get("register"), ts_x))
    return d


def _raw(r: Any) -> bytes:
    """One refused reading's own JSON, kept as its raw bytes."""
    return json.dumps(r, separators=(",", ":"))[:MAX_RAW_KEPT].encode()


def _short_msg(msg: str) -> str:
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _explain_value(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v} is not a finite number (a literal beyond the largest number JSON readers hold)"
    if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
        return f"{v} is negative; an energy counter never is"
    if isinstance(v, str):
        return f"{short_text(v)} is not a decimal string like \"1234.56\" (digits, one dot, no sign)"
    return f"expected a number or a decimal string, got {type(v).__name__} {short_text(v)}"


def _code_of(reason: str) -> str:
    if "is negative" in reason:
        return "negative"
    if "is not a finite number" in reason:
        return "not_finite"
    if "/value" in reason:
        return "type"
    return "schema"


