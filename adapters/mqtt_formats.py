"""Decode what arrives over MQTT into device values, and map devices to meters.

Two kinds of payload:

- our own `amr/v1` batch (adapters/schemas/amr-v1.schema.json), validated
  against its JSON Schema; a bad reading is rejected alone, the rest kept;
- what devices publish (Tasmota, Shelly Gen1 and Gen2/Pro, Zigbee2MQTT),
  described as data in adapters/schemas/mqtt-devices.toml and read by one
  small loop, so a new device layout is a data change.

Decoding needs no inventory: it yields `DeviceValue`s named by device, which
is what `amr mqtt decode` prints. `to_items()` then maps devices to meters
through a `DeviceMap` built from the inventory; an unmapped device becomes a
`Rejected` with code `unknown_device`, never an exception. Every refusal
carries a reason that names the field and what is wrong with it.
"""

from __future__ import annotations

import base64
import json
import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

import msgspec

from adapters import quality
from adapters.obis import ENERGY_UNITS
from adapters.reading import Reading, Rejected, check_value

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
AMR_SCHEMA_PATH = SCHEMA_DIR / "amr-v1.schema.json"
DEVICES_PATH = SCHEMA_DIR / "mqtt-devices.toml"

AMR_TOPIC = re.compile(r"^amr/v1/(?P<device>[^/]+)/readings$")
AMR_SUBSCRIBE = ("amr/v1/+/readings",)
MAX_PAYLOAD_BYTES = 1 << 20  # a 10000-reading amr/v1 batch fits; anything larger is refused
MAX_RAW_KEPT = 64 * 1024  # raw bytes kept in rejected_reading for one refused message
FAMILIES = ("amr", "tasmota", "shelly", "zigbee2mqtt")


_KWH = ENERGY_UNITS["kWh"]  # the unit of amr/v1 unless a message names another
_NO_FLAGS: frozenset[str] = frozenset()


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


@dataclass(frozen=True)
class DeviceFormat:
    name: str
    family: str
    topic: re.Pattern[str]
    device: str
    subscribe: tuple[str, ...]
    payload: str
    unit: str
    ts: tuple[tuple[str, str], ...] = ()
    values: tuple[tuple[str, str], ...] = ()
    registers: dict[str, str] = field(default_factory=dict)
    each_path: str | None = None
    each_key: re.Pattern[str] | None = None
    ignore: re.Pattern[str] | None = None


@lru_cache(maxsize=1)
def device_formats() -> tuple[DeviceFormat, ...]:
    """The device layouts of mqtt-devices.toml, checked once."""
    data = tomllib.loads(DEVICES_PATH.read_text(encoding="utf-8"))
    out = []
    for i, f in enumerate(data["format"]):
        where = f"{DEVICES_PATH.name}: format[{i}] ({f.get('name')!r})"
        if f["unit"] not in ENERGY_UNITS or f["payload"] not in ("json", "number"):
            raise ValueError(
                f"{where}: unit must be one of {', '.join(ENERGY_UNITS)} and payload json or number"
            )
        each = f.get("each")
        out.append(
            DeviceFormat(
                name=f["name"],
                family=f["family"],
                topic=re.compile(f["topic"]),
                device=f["device"],
                subscribe=tuple(f["subscribe"]),
                payload=f["payload"],
                unit=f["unit"],
                ts=tuple((t["path"], t["kind"]) for t in f.get("ts", ())),
                values=tuple((v["path"], v["register"]) for v in f.get("value", ())),
                registers=dict(f.get("registers", {})),
                each_path=each["path"] if each else None,
                each_key=re.compile(each["key"]) if each else None,
                ignore=re.compile(f["ignore"]) if f.get("ignore") else None,
            )
        )
    return tuple(out)


def subscriptions(families: Iterable[str] = FAMILIES) -> list[str]:
    """Topic filters that carry the given payload families."""
    wanted = set(families)
    subs = list(AMR_SUBSCRIBE) if "amr" in wanted else []
    for f in device_formats():
        if f.family in wanted:
            subs.extend(s for s in f.subscribe if s not in subs)
    return subs


@lru_cache(maxsize=1)
def _amr_validator() -> Any:
    import jsonschema_rs

    return jsonschema_rs.validator_for(json.loads(AMR_SCHEMA_PATH.read_text(encoding="utf-8")))


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number a meter can count")


def _load_json(payload: bytes, d: Decoded) -> Any:
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


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _number(v: Any, where: str, d: Decoded, device: str, register: str) -> Decimal | None:
    """A finite, non-negative number from JSON (numbers, or numeric strings as Shelly Gen1 sends)."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        d.reject("type", f"{where}: expected a number, got {type(v).__name__} {_short(v)}",
                 device=device, register=register)
        return None
    try:
        num = Decimal(repr(v) if isinstance(v, float) else str(v).strip())
    except InvalidOperation:
        d.reject("type", f"{where}: expected a number, got {_short(v)}", device=device, register=register)
        return None
    refusal = check_value(num, where)  # the same value rules as ingestion, reported at decode
    if refusal is not None:
        d.reject(refusal.code, refusal.reason, device=device, register=register)
        return None
    return num


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_ts(v: Any, kind: str, local_tz: ZoneInfo) -> datetime:
    """A device clock value as aware UTC; raises ValueError with the reason."""
    if kind == "auto":
        kind = "iso" if isinstance(v, str) else ("epoch_ms" if v > 1e11 else "epoch_s")
    if kind in ("epoch_s", "epoch_ms"):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"expected seconds since 1970, got {_short(v)}")
        return datetime.fromtimestamp(v / 1000 if kind == "epoch_ms" else v, UTC)
    if not isinstance(v, str):
        raise ValueError(f"expected an ISO 8601 time, got {_short(v)}")
    t = datetime.fromisoformat(v)
    if t.tzinfo is None:  # Tasmota's Time is local clock without offset unless SetOption52 1
        t = t.replace(tzinfo=local_tz)
    return t.astimezone(UTC)


def detect(topic: str) -> tuple[str, str] | None:
    """(format name, family) of a topic, or None when no format claims it."""
    if AMR_TOPIC.match(topic):
        return "amr", "amr"
    for f in device_formats():
        if f.topic.match(topic):
            return f.name, f.family
    return None


def decode(
    topic: str,
    payload: bytes,
    received: datetime | None = None,
    family: str | None = None,
    local_tz: str = "Europe/Moscow",
) -> Decoded:
    """Everything a message yields, or why it yields nothing; never raises on bad input.

    `family` forces a payload family (amr, tasmota, shelly, zigbee2mqtt) when
    the topic is not the device's default one.
    """
    received = received or datetime.now(UTC)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown format {family!r}: use one of {', '.join(FAMILIES)}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Decoded(topic, None, family).reject(
            "too_large", f"payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}"
        )
    if family == "amr" or (family is None and AMR_TOPIC.match(topic)):
        return _decode_amr(topic, payload)
    candidates = [f for f in device_formats() if family is None or f.family == family]
    for f in candidates:
        m = f.topic.match(topic)
        if m:
            return _decode_device(f, m, topic, payload, received, ZoneInfo(local_tz))
    for f in candidates:
        if f.ignore is not None and f.ignore.match(topic):
            d = Decoded(topic, f.name, f.family)
            d.ignored = f"topic {topic!r} is a {f.family} topic without energy counters"
            return d
    if family is not None:
        names = ", ".join(s for f in candidates for s in f.subscribe)
        return Decoded(topic, None, family).reject(
            "unknown_topic", f"topic {topic!r} is not a {family} topic (expected {names})"
        )
    return Decoded(topic, None, None).reject(
        "unknown_topic",
        f"topic {topic!r} matches no known format (amr/v1/<source>/readings, "
        + ", ".join(s for f in device_formats() for s in f.subscribe) + ")",
    )


def _decode_device(
    f: DeviceFormat, m: re.Match[str], topic: str, payload: bytes, received: datetime, tz: ZoneInfo
) -> Decoded:
    d = Decoded(topic, f.name, f.family)
    groups = {k: v for k, v in m.groupdict().items() if v is not None}
    source = f"mqtt:{topic}"
    unit = ENERGY_UNITS[f.unit]
    if f.payload == "number":
        device = f.device.format(**groups)
        register = f.registers[groups["field"]]
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            return d.reject("malformed", "payload is not UTF-8 text", device=device)
        if not text:
            return d.reject("malformed", "payload is empty; expected a number", device=device)
        num = _number(text, f"payload ({f.unit})", d, device, register)
        if num is not None:
            d.values.append(DeviceValue(device, register, received, num * unit, frozenset(), source))
        return d
    doc = _load_json(payload, d)
    if d.problems:
        return d
    if not isinstance(doc, dict):
        return d.reject("type", f"payload is JSON {type(doc).__name__}; expected an object")
    ts = received
    flags: frozenset[str] = frozenset()
    for path, kind in f.ts:
        raw_ts = _get(doc, path)
        if raw_ts is None:
            continue
        try:
            ts = _parse_ts(raw_ts, kind, tz)
            flags = frozenset({quality.METER_CLOCK})
        except (ValueError, OverflowError, OSError) as exc:
            return d.reject("ts", f"{path}: {exc}", device=groups.get("device"))
        break
    if f.each_path is not None:
        container = _get(doc, f.each_path)
        parts = []
        if isinstance(container, dict):
            for key, sub in container.items():
                km = f.each_key.match(key) if f.each_key else None
                if km and isinstance(sub, dict):
                    parts.append(({**groups, **km.groupdict()}, sub, f"{f.each_path}.{key}."))
        if not parts:
            d.ignored = f"no energy component under {f.each_path!r} (a status event without counters)"
            return d
    else:
        parts = [(groups, doc, "")]
    for g, obj, prefix in parts:
        device = f.device.format(**g)
        seen: set[str] = set()
        for path, register in f.values:
            if register in seen:
                continue
            v = _get(obj, path)
            if v is None:
                continue
            seen.add(register)
            if isinstance(v, list):  # per-phase totals: the meter's total is their sum
                nums = [_number(x, f"{prefix}{path}[{i}] ({f.unit})", d, device, register) for i, x in enumerate(v)]
                if not v or any(n is None for n in nums):
                    if not v:
                        d.reject("type", f"{prefix}{path}: empty list", device=device, register=register)
                    continue
                num = sum(nums, Decimal(0))  # type: ignore[arg-type]
            else:
                num = _number(v, f"{prefix}{path} ({f.unit})", d, device, register)
                if num is None:
                    continue
            d.values.append(DeviceValue(device, register, ts, num * unit, flags, source))
        if not seen:
            paths = ", ".join(f"{prefix}{p}" for p, _ in f.values)
            d.reject("no_energy", f"no energy counter in the payload: none of {paths} is present", device=device)
    return d


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
    quality: Annotated[list[Literal[quality.RETRIED, quality.CLOCK_SKEW, quality.METER_CLOCK, quality.LATE,
                                    quality.MANUAL, quality.IMPORTED, quality.SPOOLED]],
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


def _decode_amr(topic: str, payload: bytes) -> Decoded:
    return _decode_amr_fast(topic, payload) or _decode_amr_checked(topic, payload)


def _decode_amr_checked(topic: str, payload: bytes) -> Decoded:
    """Any amr/v1 message, validated against its JSON Schema: every problem named."""
    d = Decoded(topic, "amr", "amr")
    doc = _load_json(payload, d)
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
        return f"{_short(v)} is not a decimal string like \"1234.56\" (digits, one dot, no sign)"
    return f"expected a number or a decimal string, got {type(v).__name__} {_short(v)}"


def _code_of(reason: str) -> str:
    if "is negative" in reason:
        return "negative"
    if "is not a finite number" in reason:
        return "not_finite"
    if "/value" in reason:
        return "type"
    return "schema"


def _printable(text: str | None) -> str | None:
    """A refused field that goes into a text column: none when it holds control characters (NUL...)."""
    if text is None or len(text) > 64 or any(ord(c) < 32 for c in text):
        return None
    return text


class DeviceMap:
    """Which meter a device is, from the inventory's `adapter = "mqtt"` meters.

    A meter's `device` is the id `amr mqtt decode` prints; its `format`, when
    set, restricts the match to one payload family (or one format name).
    """

    def __init__(self, meters: Iterable[Any] = ()):
        self._by_key: dict[tuple[str | None, str], str] = {}
        self.warnings: list[str] = []
        known = set(FAMILIES) | {f.name for f in device_formats()}
        for m in meters:
            if getattr(m, "adapter", None) != "mqtt" or not getattr(m, "device", None):
                continue
            if m.format is not None and m.format not in known:
                self.warnings.append(
                    f"meter {m.id!r}: key 'format': {m.format!r} is not a known MQTT format "
                    f"({', '.join(sorted(known))}); its device {m.device!r} will never match"
                )
            other = self._by_key.get((m.format, m.device))
            if other is not None:
                self.warnings.append(f"meter {m.id!r}: device {m.device!r} is already meter {other!r}; kept {other!r}")
                continue
            self._by_key[(m.format, m.device)] = m.id

    def meter_for(self, fmt: str | None, family: str | None, device: str) -> str | None:
        return (
            self._by_key.get((fmt, device))
            or self._by_key.get((family, device))
            or self._by_key.get((None, device))
        )

    def __len__(self) -> int:
        return len(self._by_key)


def to_items(d: Decoded, payload: bytes, devices: DeviceMap | None) -> list[Reading | Rejected]:
    """Readings for mapped devices, `Rejected` for everything else (with its raw bytes).

    amr/v1 readings name meters directly; validation checks that they exist.
    """
    items: list[Reading | Rejected] = []
    raw_whole = payload[:MAX_RAW_KEPT]
    source = f"mqtt:{d.topic}"[:256]
    if d.family == "amr":  # amr/v1 readings name meters directly: a DeviceValue is a Reading's fields
        new = tuple.__new__
        items.extend([new(Reading, v) for v in d.values])
    for v in d.values if d.family != "amr" else ():
        meter = devices.meter_for(d.format, d.family, v.device) if devices is not None else None
        if meter is None:
            items.append(Rejected(
                source, raw_whole,
                f"device {v.device!r} ({d.family}) is not in the inventory: add a [[meter]] with "
                f'adapter = "mqtt", device = "{v.device}"',
                "unknown_device", None, v.register, v.ts,
            ))
            continue
        items.append(Reading(meter, v.register, v.ts, v.value, v.quality, v.source))
    for p in d.problems:
        meter = None
        if p.device is not None:
            meter = p.device if d.family == "amr" else (
                devices.meter_for(d.format, d.family, p.device) if devices is not None else None
            )
        reason = p.reason if p.device is None or d.family == "amr" else f"device {p.device!r}: {p.reason}"
        items.append(Rejected(source, p.raw if p.raw is not None else raw_whole, reason, p.code,
                              _printable(meter), _printable(p.register)))
    items.extend(d.forwarded)
    return items
