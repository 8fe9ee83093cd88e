"""Decode what arrives over MQTT into device values, and map devices to meters.

Two kinds of payload:

- our own `amr/v1` batch, decoded by `adapters.wire` (the format's one
  home: topic, schema, encoder and decoders); a bad reading is rejected
  alone, the rest kept;
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

import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from adapters import quality
from adapters.obis import ENERGY_UNITS
from adapters.reading import Reading, Rejected, check_value
from adapters.wire import AMR_SUBSCRIBE, AMR_TOPIC, decode_amr, load_json, short_text

# what decode() returns, and the raw bytes a refusal keeps: defined with the amr/v1 format
from adapters.wire import MAX_RAW_KEPT as MAX_RAW_KEPT
from adapters.wire import Decoded as Decoded
from adapters.wire import DeviceValue as DeviceValue
from adapters.wire import Problem as Problem

DEVICES_PATH = Path(__file__).resolve().parent / "schemas" / "mqtt-devices.toml"

MAX_PAYLOAD_BYTES = 1 << 20  # a 10000-reading amr/v1 batch fits; anything larger is refused
FAMILIES = ("amr", "tasmota", "shelly", "zigbee2mqtt")


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


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _number(v: Any, where: str, d: Decoded, device: str, register: str) -> Decimal | None:
    """A finite, non-negative number from JSON (numbers, or numeric strings as Shelly Gen1 sends)."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        d.reject("type", f"{where}: expected a number, got {type(v).__name__} {short_text(v)}",
                 device=device, register=register)
        return None
    try:
        num = Decimal(repr(v) if isinstance(v, float) else str(v).strip())
    except InvalidOperation:
        d.reject("type", f"{where}: expected a number, got {short_text(v)}", device=device, register=register)
        return None
    refusal = check_value(num, where)  # the same value rules as ingestion, reported at decode
    if refusal is not None:
        d.reject(refusal.code, refusal.reason, device=device, register=register)
        return None
    return num


def _parse_ts(v: Any, kind: str, local_tz: ZoneInfo) -> datetime:
    """A device clock value as aware UTC; raises ValueError with the reason."""
    if kind == "auto":
        kind = "iso" if isinstance(v, str) else ("epoch_ms" if v > 1e11 else "epoch_s")
    if kind in ("epoch_s", "epoch_ms"):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"expected seconds since 1970, got {short_text(v)}")
        return datetime.fromtimestamp(v / 1000 if kind == "epoch_ms" else v, UTC)
    if not isinstance(v, str):
        raise ValueError(f"expected an ISO 8601 time, got {short_text(v)}")
    t = datetime.fromisoformat(v)
    if t.tzinfo is None:  # Tasmota's Time is local clock without offset unless SetOption52 1
        t = t.replace(tzinfo=local_tz)
    return t.astimezone(UTC)


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
        return decode_amr(topic, payload)
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
    doc = load_json(payload, d)
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
                phases = [n for n in nums if n is not None]
                if not v or len(phases) < len(nums):
                    if not v:
                        d.reject("type", f"{prefix}{path}: empty list", device=device, register=register)
                    continue
                num = sum(phases, Decimal(0))
            else:
                num = _number(v, f"{prefix}{path} ({f.unit})", d, device, register)
                if num is None:
                    continue
            d.values.append(DeviceValue(device, register, ts, num * unit, flags, source))
        if not seen:
            paths = ", ".join(f"{prefix}{p}" for p, _ in f.values)
            d.reject("no_energy", f"no energy counter in the payload: none of {paths} is present", device=device)
    return d


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
