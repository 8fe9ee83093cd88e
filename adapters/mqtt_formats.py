"""Decode what arrives over MQTT into device values, and map devices to meters.

Two kinds of payload:

- our own `amr/v1` batch, decoded by `adapters.wire` (the format's one
  home: topic, schema, encoder and decoders); a bad reading is rejected
  alone, the rest kept;
- what devices publish (Tasmota, Shelly Gen1 and Gen2/Pro, Zigbee2MQTT,
  ESPHome, Home Assistant-style energy sensors), described as data in
  adapters/schemas/mqtt-devices.toml and read by one small loop, so a new
  device layout is a data change.

Topics are matched through `Layouts`: the data file's default layouts, plus
what the inventory configures (a meter's or a family's `topic_prefix` or full
`topic` pattern, adapters.mqtt_layouts). A meter may also say how its device's
payload is read (`tariffs`, `fields`, `channels`, `energy_unit`): those are
`DeviceOptions`, looked up by device id while decoding.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import cache, lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from adapters import quality
from adapters.mqtt_layouts import (
    LayoutError,
    check_prefix,
    compile_pattern,
    normalize,
    topic_filter,
)
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
_REGISTER = re.compile(r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")


@dataclass(frozen=True)
class DeviceFormat:
    name: str
    family: str
    pattern: str  # normalized topic pattern (adapters.mqtt_layouts)
    prefix: str | None
    device: str
    subscribe: tuple[str, ...]
    payload: str
    unit: str
    auto: bool = True
    leaf: str | None = None
    ends: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    ignore_reason: str = ""
    ignore_first: bool = False
    not_devices: frozenset[str] = frozenset()
    ts: tuple[tuple[str, str], ...] = ()
    values: tuple[tuple[str, str], ...] = ()
    tariffs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    registers: dict[str, str] = field(default_factory=dict)
    each_path: str | None = None
    each_key: re.Pattern[str] | None = None

    def strict(self, pattern: str | None = None, prefix: str | None = None) -> re.Pattern[str]:
        return compile_pattern(pattern or self.pattern, prefix if prefix is not None else self.prefix,
                               self.registers, kinds=self.kinds)

    def filters(self, pattern: str | None = None, prefix: str | None = None) -> list[str]:
        return topic_filter(pattern or self.pattern, prefix if prefix is not None else self.prefix,
                            self.registers)


@dataclass(frozen=True)
class Layout:
    """One way a format's topics look: a matcher, the filters that carry it, its ignore patterns."""

    format: DeviceFormat
    regex: re.Pattern[str]
    filters: tuple[str, ...]
    ignore: tuple[re.Pattern[str], ...] = ()
    device: str | None = None  # a whole topic given for one device (Home Assistant state topics)
    origin: str = "default"


@dataclass(frozen=True)
class DeviceOptions:
    """How one device's payload is read, from its meter's inventory keys."""

    tariffs: tuple[str, ...] | None = None  # import register of each tariff position (TotalTariff)
    fields: tuple[tuple[str, str], ...] | None = None  # payload path -> register, instead of the format's
    split: bool = False  # list values are channels ("<device>/1"...), not phases to sum
    unit: str | None = None  # the values' unit, instead of the format's


def _load_format(i: int, f: dict[str, Any]) -> DeviceFormat:
    where = f"{DEVICES_PATH.name}: format[{i}] ({f.get('name')!r})"
    if f["unit"] not in ENERGY_UNITS or f["payload"] not in ("json", "number"):
        raise ValueError(f"{where}: unit must be one of {', '.join(ENERGY_UNITS)} and payload json or number")
    each = f.get("each")
    try:
        pattern = normalize(f["topic"], f.get("leaf"))
        fmt = DeviceFormat(
            name=f["name"], family=f["family"], pattern=pattern, prefix=f.get("prefix"),
            device=f["device"], subscribe=tuple(f["subscribe"]), payload=f["payload"], unit=f["unit"],
            auto=f.get("auto", True), leaf=f.get("leaf"),
            ends=tuple(normalize(e) for e in f.get("ends", ())), kinds=tuple(f.get("kinds", ())),
            ignore=tuple(normalize(p) for p in f.get("ignore", ())), ignore_reason=f.get("ignore_reason", ""),
            ignore_first=f.get("ignore_first", False),
            not_devices=frozenset(f.get("not_devices", ())),
            ts=tuple((t["path"], t["kind"]) for t in f.get("ts", ())),
            values=tuple((v["path"], v["register"]) for v in f.get("value", ())),
            tariffs=tuple((t["path"], tuple(t["registers"])) for t in f.get("tariff", ())),
            registers=dict(f.get("registers", {})),
            each_path=each["path"] if each else None,
            each_key=re.compile(each["key"]) if each else None,
        )
        fmt.strict()
        if fmt.auto and sorted(fmt.filters()) != sorted(fmt.subscribe):
            raise ValueError(f"subscribe {list(fmt.subscribe)} is not what topic {f['topic']!r} gives: {fmt.filters()}")
    except (LayoutError, KeyError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return fmt


@lru_cache(maxsize=1)
def device_formats() -> tuple[DeviceFormat, ...]:
    """The device layouts of mqtt-devices.toml, checked once."""
    data = tomllib.loads(DEVICES_PATH.read_text(encoding="utf-8"))
    return tuple(_load_format(i, f) for i, f in enumerate(data["format"]))


@lru_cache(maxsize=1)
def _families() -> tuple[str, ...]:
    out = ["amr"]
    for f in device_formats():
        if f.family not in out:
            out.append(f.family)
    return tuple(out)


FAMILIES: tuple[str, ...] = _families()


def formats_named(name: str) -> list[DeviceFormat]:
    """The formats a meter's `format` key names: one format by name, or every format of a family."""
    return [f for f in device_formats() if f.name == name or f.family == name]


def _ignores(f: DeviceFormat, prefix: str | None, loose: bool = False) -> tuple[re.Pattern[str], ...]:
    return tuple(compile_pattern(p, prefix if prefix is not None else f.prefix, kinds=(), loose=loose)
                 for p in f.ignore)


def _default_layout(f: DeviceFormat) -> Layout:
    return Layout(f, f.strict(), tuple(f.filters()), _ignores(f, None))


@cache
def _loose_layouts(family: str) -> tuple[Layout, ...]:
    """Any topic that ends like one of the family's patterns (`amr mqtt decode --format F`)."""
    out = []
    for f in device_formats():
        if f.family != family and f.name != family:
            continue
        ign = _ignores(f, None, loose=True)
        for p in f.ends or (f.pattern,):
            out.append(Layout(f, compile_pattern(p, None, f.registers, loose=True, kinds=f.kinds), (), ign,
                              origin="loose"))
    return tuple(out)


def loose_layouts(family: str) -> tuple[Layout, ...]:
    """The layouts `--format` decoding tries for a family or format name (any prefix)."""
    return _loose_layouts(family)


def layout_for(f: DeviceFormat, *, topic: str | None = None, prefix: str | None = None,
               device: str | None = None, origin: str = "inventory") -> Layout:
    """The layout a meter or family configures: its own prefix, or a whole pattern.

    A pattern without placeholders is one device's topic (Home Assistant state
    topics): it matches that topic only and names `device`. Raises LayoutError.
    """
    pattern = normalize(topic, f.leaf) if topic else f.pattern
    pre = check_prefix(prefix) if prefix is not None else f.prefix
    fixed = None
    if topic and "{" not in pattern and "+" not in pattern.split("/"):
        if device is None:
            raise LayoutError(f"topic {topic!r} has no placeholders: it is one device's topic, so give its device")
        fixed = device
    elif "{device}" not in pattern and "{prefix}" not in f.device and "{name}" not in pattern:
        raise LayoutError(f"topic {topic!r} names no {{device}} (Tasmota: %topic%), so no device id can be read from it")
    regex = compile_pattern(pattern, pre, f.registers, kinds=f.kinds)
    filters = tuple(topic_filter(pattern, pre, f.registers))
    return Layout(f, regex, filters, _ignores(f, pre), fixed, origin)


@dataclass(frozen=True)
class Layouts:
    """Topic layouts in the order they are tried (configured first), and each device's options."""

    layouts: tuple[Layout, ...]
    options: dict[str, DeviceOptions] = field(default_factory=dict)

    def filters(self, families: Iterable[str] = FAMILIES) -> list[str]:
        """Topic filters that carry the given payload families' layouts."""
        wanted = set(families)
        subs = list(AMR_SUBSCRIBE) if "amr" in wanted else []
        for lay in self.layouts:
            if lay.format.family in wanted or lay.format.name in wanted:
                subs.extend(s for s in lay.filters if s not in subs)
        return subs

    def option(self, device: str) -> DeviceOptions | None:
        return self.options.get(device) if self.options else None


@lru_cache(maxsize=1)
def default_layouts() -> Layouts:
    """The data file's default layouts of the formats decoded without an inventory."""
    return Layouts(tuple(_default_layout(f) for f in device_formats() if f.auto))


def subscriptions(families: Iterable[str] = FAMILIES, layouts: Layouts | None = None) -> list[str]:
    """Topic filters that carry the given payload families (default layouts unless given)."""
    return (layouts or default_layouts()).filters(families)


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


def _match(topic: str, candidates: Sequence[Layout]) -> list[tuple[Layout, re.Match[str]]]:
    """The layout that places a topic (the first), or every one-device layout of that exact topic."""
    found: list[tuple[Layout, re.Match[str]]] = []
    for lay in candidates:
        m = lay.regex.match(topic)
        if m is None or m.groupdict().get("device") in lay.format.not_devices:
            continue
        if lay.device is None:
            return found or [(lay, m)]
        found.append((lay, m))
    return found


def decode(
    topic: str,
    payload: bytes,
    received: datetime | None = None,
    family: str | None = None,
    local_tz: str = "Europe/Moscow",
    layouts: Layouts | None = None,
) -> Decoded:
    """Everything a message yields, or why it yields nothing; never raises on bad input.

    `family` forces a payload family (or one format by name): then any topic
    that ends like one of its patterns is taken, whatever its prefix.
    `layouts` are the inventory's (DeviceMap.layouts); default: the data file's.
    """
    received = received or datetime.now(UTC)
    if family is not None and family not in FAMILIES and not formats_named(family):
        raise ValueError(f"unknown format {family!r}: use one of {', '.join(FAMILIES)}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Decoded(topic, None, family).reject(
            "too_large", f"payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}"
        )
    if family == "amr" or (family is None and AMR_TOPIC.match(topic)):
        return decode_amr(topic, payload)
    lays = layouts or default_layouts()
    if family is None:
        candidates: Sequence[Layout] = lays.layouts
    else:
        candidates = [lay for lay in lays.layouts if family in (lay.format.family, lay.format.name)]
        candidates += list(_loose_layouts(family))
    for lay in candidates:
        if lay.format.ignore_first and any(p.match(topic) for p in lay.ignore):
            return _ignored(topic, lay)
    found = _match(topic, candidates)
    if found:
        tz = ZoneInfo(local_tz)
        d = _decode_device(found[0][0], found[0][1], topic, payload, received, tz, lays)
        for lay, m in found[1:]:
            more = _decode_device(lay, m, topic, payload, received, tz, lays)
            d.values.extend(more.values)
            d.problems.extend(more.problems)
        return d
    for lay in candidates:
        if any(p.match(topic) for p in lay.ignore):
            return _ignored(topic, lay)
    if family is not None:
        ends = ", ".join(p for f in formats_named(family) for p in (f.ends or (f.pattern,)))
        return Decoded(topic, None, family).reject(
            "unknown_topic", f"topic {topic!r} is not a {family} topic (expected a topic ending like {ends})"
        )
    known = ", ".join(s for s in lays.filters(FAMILIES))
    return Decoded(topic, None, None).reject(
        "unknown_topic",
        f"topic {topic!r} matches no known format ({known}); for a device with a topic of its own, "
        "try amr mqtt decode --format FAMILY, then give the meter topic_prefix or topic in the inventory",
    )


def _ignored(topic: str, lay: Layout) -> Decoded:
    d = Decoded(topic, lay.format.name, lay.format.family)
    d.ignored = f"topic {topic!r}: {lay.format.ignore_reason or 'carries no energy counters'}"
    return d


def _decode_device(
    lay: Layout, m: re.Match[str], topic: str, payload: bytes, received: datetime, tz: ZoneInfo, lays: Layouts
) -> Decoded:
    f = lay.format
    d = Decoded(topic, f.name, f.family)
    groups = {k: v for k, v in m.groupdict().items() if v is not None}
    source = f"mqtt:{topic}"
    base_device = lay.device or _device_id(f.device, groups)
    opts = lays.option(base_device) if base_device is not None else None
    unit_name = (opts.unit if opts and opts.unit else None) or f.unit
    unit = ENERGY_UNITS[unit_name]
    json_state = f.payload == "number" and opts is not None and opts.fields and payload.lstrip()[:1] == b"{"
    if f.payload == "number" and not json_state:  # one number as text; a meter's fields may name its register
        device = base_device or ""
        key = groups.get("field", "value")
        register = dict(opts.fields).get(key) if opts and opts.fields else None
        register = register or f.registers.get(key, "1.8.0")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            return d.reject("malformed", "payload is not UTF-8 text", device=device)
        if not text:
            return d.reject("malformed", "payload is empty; expected a number", device=device)
        num = _number(text, f"payload ({unit_name})", d, device, register)
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
            return d.reject("ts", f"{path}: {exc}", device=base_device)
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
    values = opts.fields if opts and opts.fields else f.values
    for g, obj, prefix in parts:
        device = lay.device or _device_id(f.device, g) or ""
        seen: set[str] = set()
        for path, register in values:
            if register in seen:
                continue
            v = _get(obj, path)
            if v is None:
                continue
            seen.add(register)
            where = f"{prefix}{path}"
            if isinstance(v, list) and opts is not None and opts.split:  # one channel per element
                for i, x in enumerate(v):
                    num = _number(x, f"{where}[{i}] ({unit_name})", d, f"{device}/{i + 1}", register)
                    if num is not None:
                        d.values.append(DeviceValue(f"{device}/{i + 1}", register, ts, num * unit, flags, source))
                continue
            if isinstance(v, list):  # per-phase totals: the meter's total is their sum
                nums = [_number(x, f"{where}[{i}] ({unit_name})", d, device, register) for i, x in enumerate(v)]
                phases = [n for n in nums if n is not None]
                if not v or len(phases) < len(nums):
                    if not v:
                        d.reject("type", f"{where}: empty list", device=device, register=register)
                    continue
                num = sum(phases, Decimal(0))
            else:
                num = _number(v, f"{where} ({unit_name})", d, device, register)
                if num is None:
                    continue
            d.values.append(DeviceValue(device, register, ts, num * unit, flags, source))
        if not (opts and opts.fields):
            _tariffs(f, obj, opts, d, device, ts, unit, unit_name, flags, source, seen)
        if not seen:
            paths = ", ".join(f"{prefix}{p}" for p, _ in values)
            d.reject("no_energy", f"no energy counter in the payload: none of {paths} is present", device=device)
    return d


def _tariffs(f: DeviceFormat, obj: Any, opts: DeviceOptions | None, d: Decoded, device: str, ts: datetime,
             unit: Decimal, unit_name: str, flags: frozenset[str], source: str, seen: set[str]) -> None:
    """Per-tariff totals (Tasmota's TotalTariff): each position to its zone register."""
    for path, registers in f.tariffs:
        v = _get(obj, path)
        if v is None:
            continue
        if not isinstance(v, list):
            d.reject("type", f"{path}: expected a list of per-tariff totals, got {short_text(v)}", device=device)
            continue
        regs = registers
        if opts is not None and opts.tariffs:
            export = registers[0].startswith("2.") if registers else False
            regs = tuple(("2." + r[2:]) if export else r for r in opts.tariffs)
        for i, x in enumerate(v):
            if i >= len(regs):
                d.reject("unknown_register",
                         f"{path}[{i}]: tariff {i + 1} has no zone register; give the meter tariffs = [...] "
                         f"with {len(v)} registers", device=device)
                break
            num = _number(x, f"{path}[{i}] ({unit_name})", d, device, regs[i])
            if num is not None:
                seen.add(regs[i])
                d.values.append(DeviceValue(device, regs[i], ts, num * unit, flags, source))


def _device_id(template: str, groups: dict[str, str]) -> str | None:
    try:
        return template.format(**groups)
    except (KeyError, IndexError):
        return None


def _printable(text: str | None) -> str | None:
    """A refused field that goes into a text column: none when it holds control characters (NUL...)."""
    if text is None or len(text) > 64 or any(ord(c) < 32 for c in text):
        return None
    return text


def meter_options(m: Any) -> DeviceOptions | None:
    """A meter's payload options, or None when it sets none."""
    tariffs = getattr(m, "tariffs", None)
    fields_ = getattr(m, "fields", None)
    split = getattr(m, "channels", None) == "split"
    unit = getattr(m, "energy_unit", None)
    if not (tariffs or fields_ or split or unit):
        return None
    return DeviceOptions(tuple(tariffs) if tariffs else None,
                         tuple(fields_.items()) if fields_ else None, split, unit)


def exact_topic(f: DeviceFormat, device: str) -> str | None:
    """The one topic a device of an inventory-only format publishes on (ESPHome: <prefix>/sensor/<name>/state)."""
    rx = "^" + re.sub(r"\\{(\w+)\\}", lambda m: f"(?P<{m.group(1)}>.+)" if m.group(1) == "prefix"
                      else f"(?P<{m.group(1)}>[^/]+)", re.escape(f.device)) + "$"
    m = re.match(rx, device)
    if m is None:
        return None
    out = f.pattern
    for k, v in m.groupdict().items():
        out = out.replace("{" + k + "}", v)
    return None if "{" in out else out


def check_meter(m: Any) -> list[str]:
    """What is wrong with an MQTT meter's topic and payload keys, each problem naming its key."""
    problems: list[str] = []
    fmts = formats_named(m.format) if m.format else []
    if m.format and not fmts and m.format != "amr":
        problems.append(f"key 'format': {m.format!r} is not a known MQTT format "
                        f"({', '.join(sorted(set(FAMILIES) | {f.name for f in device_formats()}))})")
    if (getattr(m, "topic", None) or getattr(m, "topic_prefix", None)) and not fmts:
        problems.append("keys 'topic'/'topic_prefix' need a 'format' (the family whose layout they change)")
    if getattr(m, "topic", None) and len(fmts) > 1:
        problems.append(f"key 'topic': family {m.format!r} has several formats "
                        f"({', '.join(f.name for f in fmts)}); name one of them in 'format'")
    if not problems and fmts:
        for f in fmts:
            try:
                layout_for(f, topic=m.topic, prefix=m.topic_prefix, device=m.device)
            except LayoutError as exc:
                problems.append(f"key {'topic' if m.topic else 'topic_prefix'!r}: {exc}")
                break
    if fmts and not any(f.auto for f in fmts):
        if not m.device:
            problems.append(f"key 'device': a {m.format} meter needs its device id")
        elif not getattr(m, "topic", None) and any(exact_topic(f, m.device) is None for f in fmts):
            problems.append(f"key 'device': {m.device!r} is not a {m.format} device id "
                            f"({' or '.join(f.device for f in fmts)}); or give the meter its whole 'topic'")
    for reg in list(getattr(m, "tariffs", None) or ()) + list((getattr(m, "fields", None) or {}).values()):
        if not _REGISTER.match(reg):
            problems.append(f"register {reg!r} in 'tariffs'/'fields' is not an OBIS code like 1.8.1")
    unit = getattr(m, "energy_unit", None)
    if unit is not None and unit not in ENERGY_UNITS:
        problems.append(f"key 'energy_unit': {unit!r} is not one of {', '.join(ENERGY_UNITS)}")
    return problems


def build_layouts(meters: Iterable[Any], families: Iterable[Any] = ()) -> tuple[Layouts, list[str]]:
    """The layouts and device options an inventory configures, and a warning for each it cannot use.

    Order: one-device topics, then meters' own layouts, then families'
    (`[[mqtt_layout]]`), then the data file's defaults; a family configured in
    the inventory keeps its default layout too, so a device left at the
    default is still heard.
    """
    fixed: list[Layout] = []
    own: list[Layout] = []
    fam: list[Layout] = []
    warnings: list[str] = []
    options: dict[str, DeviceOptions] = {}
    for entry in families:
        for f in formats_named(entry.family):
            try:
                fam.append(layout_for(f, topic=entry.topic, prefix=entry.topic_prefix, origin=f"family {entry.family}"))
            except LayoutError as exc:
                warnings.append(f"mqtt_layout {entry.family!r}: {exc}")
    seen_layouts: set[tuple[str, str]] = set()
    for m in meters:
        if getattr(m, "adapter", None) != "mqtt" or not getattr(m, "device", None):
            continue
        opts = meter_options(m)
        if opts is not None:
            options[m.device] = opts
            base = re.sub(r"/[0-9]+$", "", m.device)
            if opts.split and base != m.device:
                options.setdefault(base, opts)
        fmts = formats_named(m.format) if m.format else []
        if not fmts:
            continue
        topic, prefix = getattr(m, "topic", None), getattr(m, "topic_prefix", None)
        for f in fmts:
            if not f.auto and topic is None:
                topic = exact_topic(f, m.device)  # one device's own topic: no other sensor is heard
                if topic is None:
                    warnings.append(f"meter {m.id!r}: device {m.device!r} is not a {f.name} device id ({f.device})")
                    continue
            if topic is None and prefix is None and f.auto:
                continue  # the default layout hears it
            key = (f.name, f"{topic}|{prefix}|{m.device if topic else ''}")
            if key in seen_layouts:
                continue
            seen_layouts.add(key)
            try:
                lay = layout_for(f, topic=topic, prefix=prefix, device=m.device, origin=f"meter {m.id}")
            except LayoutError as exc:
                warnings.append(f"meter {m.id!r}: {exc}")
                break
            (fixed if lay.device is not None else own).append(lay)
    defaults = tuple(_default_layout(f) for f in device_formats() if f.auto)
    return Layouts(tuple(fixed + own + fam) + defaults, options), warnings


class DeviceMap:
    """Which meter a device is, from the inventory's `adapter = "mqtt"` meters, and the topic layouts they need.

    A meter's `device` is the id `amr mqtt decode` prints; its `format`, when
    set, restricts the match to one payload family (or one format name).
    """

    def __init__(self, meters: Iterable[Any] = (), families: Iterable[Any] = ()):
        meters = list(meters)
        self._by_key: dict[tuple[str | None, str], str] = {}
        self.layouts, self.warnings = build_layouts(meters, families)
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


def check_mqtt(meters: Iterable[Any], families: Iterable[Any] = ()) -> list[str]:
    """Every problem of an inventory's MQTT meters and `[[mqtt_layout]]`s (`amr inventory check`)."""
    problems = [f"meter {m.id!r}: {p}" for m in meters if getattr(m, "adapter", None) == "mqtt"
                for p in check_meter(m)]
    for i, entry in enumerate(families):
        fmts = formats_named(entry.family)
        if not fmts:
            problems.append(f"mqtt_layout[{i}]: key 'family': {entry.family!r} is not a known MQTT format")
            continue
        if entry.topic and len(fmts) > 1:
            problems.append(f"mqtt_layout[{i}]: key 'topic': family {entry.family!r} has several formats "
                            f"({', '.join(f.name for f in fmts)}); name one of them")
            continue
        for f in fmts:
            try:
                layout_for(f, topic=entry.topic, prefix=entry.topic_prefix, device="-")
            except LayoutError as exc:
                problems.append(f"mqtt_layout[{i}] ({entry.family}): {exc}")
                break
    return problems
