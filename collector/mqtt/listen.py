"""`amr mqtt listen`: hear a broker for a while and say which device is which, ready for the inventory.

The tool an integrator runs first: it subscribes to everything (`#`), places
each message the way the collector would (the default layouts), then, for a
topic no default layout places, tries every family's pattern anywhere in the
topic (`--format` decoding) and works out the `topic_prefix` or `topic` the
meter needs. Home Assistant discovery configs (retained, under
`homeassistant/.../config`) name energy sensors' state topics, units and value
templates: those become `homeassistant` meters. A Tasmota SML reader's fields
are guessed from their names. Every message it cannot place is listed with
the reason.

`Listener.feed()` is pure (a topic and a payload in, nothing out), so it is
tested without a broker; `listen()` only moves messages from the broker into it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from adapters import mqtt_formats as fmt
from adapters.mqtt_layouts import LayoutError
from adapters.wire import AMR_TOPIC

# loose families in the order they are tried: Zigbee2MQTT last, since any topic ends like <base>/<name>
_LOOSE_ORDER = ("tasmota", "shelly", "esphome", "zigbee2mqtt")
_ENERGY_NAME = re.compile(r"(?i)(energy|total|_in$|_out$|^e_?(in|out)$|import|export|1[._]8[._]|2[._]8[._]|kwh|verbrauch|einspeis)")
_NOT_TOTAL = re.compile(r"(?i)(today|yesterday|daily|starttime|power|curr|volt|period)")
_EXPORT = re.compile(r"(?i)(out|export|ret|einspeis|2[._]8|produced|feed)")
_HA_TEMPLATE = re.compile(r"""value_json(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[['"]([^'"]+)['"]\])""")


@dataclass
class SeenDevice:
    """One device heard: what it is and what its inventory entry says."""

    family: str
    format: str
    device: str
    topic: str
    registers: set[str] = field(default_factory=set)
    keys: dict[str, Any] = field(default_factory=dict)  # the meter keys it needs beyond adapter/device/format
    messages: int = 0
    note: str = ""


@dataclass
class Unplaced:
    topic: str
    reason: str
    messages: int = 0


@dataclass
class _Discovery:
    state_topic: str
    device: str
    unit: str
    register: str
    fields: dict[str, str] | None


class Listener:
    """What the messages heard so far say: devices by (format, device), unplaced topics with a reason."""

    def __init__(self, local_tz: str = "Europe/Moscow") -> None:
        self.local_tz = local_tz
        self.devices: dict[tuple[str, str], SeenDevice] = {}  # by (family, device)
        self.unplaced: dict[str, Unplaced] = {}
        self.discovered: dict[str, list[_Discovery]] = {}
        self.messages = 0
        self.ignored = 0

    # --- placing one message ---

    def feed(self, topic: str, payload: bytes, received: datetime | None = None) -> None:
        """Place one message; never raises."""
        self.messages += 1
        received = received or datetime.now(UTC)
        try:
            self._feed(topic, payload, received)
        except Exception as exc:  # a listener bug must not end the listening
            self._unplaced(topic, f"could not be read: {exc!r}")

    def _feed(self, topic: str, payload: bytes, received: datetime) -> None:
        if topic.startswith("homeassistant/") and topic.endswith("/config"):
            self._discovery(topic, payload)
            return
        if topic in self.discovered:
            self._ha_state(topic, payload, received)
            return
        d = fmt.decode(topic, payload, received, local_tz=self.local_tz)
        if d.family == "amr" or AMR_TOPIC.match(topic):
            for v in d.values:
                self._seen("amr", "amr", v.device, topic, {v.register}, {}, note="a meter behind a gateway")
            if d.problems and not d.values:
                self._unplaced(topic, d.problems[0].reason)
            return
        if d.values:
            self._values(d, topic, {})
            return
        if d.ignored:
            self.ignored += 1
            return
        codes = {p.code for p in d.problems}
        if "unknown_topic" not in codes:
            if codes == {"no_energy"} and d.family == "tasmota":
                self._sml(topic, payload, received, d, {})
                return
            self._unplaced(topic, d.problems[0].reason)
            return
        self._loose(topic, payload, received)

    def _loose(self, topic: str, payload: bytes, received: datetime) -> None:
        reasons = []
        for family in _LOOSE_ORDER:
            d = fmt.decode(topic, payload, received, family=family, local_tz=self.local_tz)
            if d.ignored:
                self.ignored += 1
                return
            if not d.format:
                continue
            f = next(x for x in fmt.device_formats() if x.name == d.format)
            keys = _layout_keys(f, topic)
            if keys is None:
                reasons.append(f"{family}: no topic_prefix or topic places {topic!r}")
                continue
            if family == "esphome":
                name = topic.rsplit("/", 2)[-2]
                if not _ENERGY_NAME.search(name):
                    self._unplaced(topic, f"an ESPHome sensor whose name ({name!r}) does not say energy; "
                                   "give it a meter with format = \"esphome\" if it is a meter's total")
                    return
                if _NOT_TOTAL.search(name):
                    self._unplaced(topic, f"ESPHome sensor {name!r} is a daily counter or a power, not a meter total")
                    return
            if d.values:
                self._values(d, topic, keys)
                return
            codes = {p.code for p in d.problems}
            if family == "tasmota" and codes == {"no_energy"}:
                self._sml(topic, payload, received, d, keys)
                return
            if family == "zigbee2mqtt":
                continue  # any topic ends like <base_topic>/<name>: its refusal would say nothing
            if d.problems:
                reasons.append(f"{family}: {d.problems[0].reason}")
        self._unplaced(topic, "; ".join(reasons) if reasons else
                       "matches no device family's topic and payload (tasmota, shelly, zigbee2mqtt with an "
                       "'energy' key, esphome) and no Home Assistant discovery config names it")

    def _values(self, d: fmt.Decoded, topic: str, keys: dict[str, Any]) -> None:
        by_device: dict[str, set[str]] = {}
        for v in d.values:
            by_device.setdefault(v.device, set()).add(v.register)
        for device, regs in by_device.items():
            note = ""
            if any(r in ("1.8.1", "1.8.2") for r in regs) and d.family == "tasmota":
                note = "tariffs: Tasmota's tariff 1 and 2 taken as 1.8.1 and 1.8.2; set tariffs = [...] if not"
            self._seen(d.family or "", d.format or "", device, topic, regs, keys, note=note)

    def _sml(self, topic: str, payload: bytes, received: datetime, d: fmt.Decoded, keys: dict[str, Any]) -> None:
        """A Tasmota sensor without ENERGY: an SML (or other) reader whose field names the user chose."""
        try:
            doc = json.loads(payload)
        except ValueError:
            self._unplaced(topic, d.problems[0].reason)
            return
        fields: dict[str, str] = {}
        for name, obj in doc.items() if isinstance(doc, dict) else ():
            if not isinstance(obj, dict):
                continue
            for key, val in obj.items():
                if isinstance(val, bool) or not isinstance(val, int | float):
                    continue
                if not _ENERGY_NAME.search(key) or _NOT_TOTAL.search(key):
                    continue
                reg = "2.8.0" if _EXPORT.search(key) else "1.8.0"
                if reg not in fields.values():
                    fields[f"{name}.{key}"] = reg
        device = d.problems[0].device if d.problems else None
        if not fields or not device:
            self._unplaced(topic, f"{d.problems[0].reason}; no field of it is named like an energy total")
            return
        dm = fmt.DeviceMap([_Probe(device, d.format or "tasmota", keys, fields)])
        check = fmt.decode(topic, payload, received, layouts=dm.layouts, local_tz=self.local_tz)
        if not check.values:
            self._unplaced(topic, f"{d.problems[0].reason}; guessed fields {fields} yield nothing")
            return
        self._seen("tasmota", d.format or "tasmota", device, topic, {v.register for v in check.values},
                   {**keys, "fields": fields}, note="fields guessed from their names: check them")

    # --- Home Assistant discovery ---

    def _discovery(self, topic: str, payload: bytes) -> None:
        try:
            cfg = json.loads(payload) if payload else None
        except ValueError:
            self._unplaced(topic, "a Home Assistant discovery config that is not JSON")
            return
        if not isinstance(cfg, dict):
            self.ignored += 1  # an empty retained message removes a config
            return
        cfg = _expand_ha(cfg)
        unit = cfg.get("unit_of_measurement")
        energy = cfg.get("device_class") == "energy" or unit in ("Wh", "kWh", "MWh")
        if not energy or cfg.get("state_class") not in ("total_increasing", "total"):
            self.ignored += 1
            return
        state = cfg.get("state_topic")
        if not isinstance(state, str) or not state:
            self._unplaced(topic, "a Home Assistant energy sensor config without a state_topic")
            return
        if unit not in ("Wh", "kWh", "MWh"):
            self._unplaced(topic, f"energy sensor {state!r} in {unit!r}, not Wh, kWh or MWh")
            return
        probe = fmt.decode(state, b"0", local_tz=self.local_tz)
        if probe.format is not None:  # a native family reads that topic itself: its entry says more
            self.ignored += 1
            return
        tpl = cfg.get("value_template") or ""
        m = _HA_TEMPLATE.search(tpl)
        name = str(cfg.get("unique_id") or cfg.get("object_id") or cfg.get("name") or state)
        register = "2.8.0" if _EXPORT.search(name) else "1.8.0"
        fields = {m.group(1) or m.group(2): register} if m else None
        device = re.sub(r"\s+", "_", name)[:64]
        known = self.discovered.setdefault(state, [])
        if all(k.device != device for k in known):
            known.append(_Discovery(state, device, unit, register, fields))
        self.unplaced.pop(state, None)

    def _ha_state(self, topic: str, payload: bytes, received: datetime) -> None:
        for disc in self.discovered[topic]:
            keys: dict[str, Any] = {"topic": topic, "energy_unit": disc.unit}
            if disc.fields:
                keys["fields"] = disc.fields
            elif disc.register != "1.8.0":
                keys["fields"] = {"value": disc.register}
            dm = fmt.DeviceMap([_Probe(disc.device, "homeassistant", keys, keys.get("fields"))])
            d = fmt.decode(topic, payload, received, layouts=dm.layouts, local_tz=self.local_tz)
            values = [v for v in d.values if v.device == disc.device]
            if values:
                self._seen("homeassistant", "homeassistant", disc.device, topic, {v.register for v in values}, keys,
                           note="from its Home Assistant discovery config")
            elif d.problems:
                self._unplaced(topic, d.problems[0].reason)

    # --- bookkeeping ---

    def _seen(self, family: str, format_: str, device: str, topic: str, registers: set[str],
              keys: dict[str, Any], note: str = "") -> None:
        key = (family, device)  # Shelly's status and its RPC events are one device
        s = self.devices.get(key)
        if s is None:
            s = self.devices[key] = SeenDevice(family, format_, device, topic, set(), dict(keys), note=note)
        elif "topic" in keys and "topic" not in s.keys:
            s.format, s.topic, s.keys = format_, topic, dict(keys)
        s.registers |= registers
        s.messages += 1

    def _unplaced(self, topic: str, reason: str) -> None:
        u = self.unplaced.get(topic)
        if u is None:
            u = self.unplaced[topic] = Unplaced(topic, reason)
        u.messages += 1

    # --- what it says ---

    def report(self) -> tuple[list[SeenDevice], list[Unplaced]]:
        devices = sorted(self.devices.values(), key=lambda s: (s.family, s.device))
        unplaced = sorted((u for u in self.unplaced.values() if u.topic not in self.discovered),
                          key=lambda u: u.topic)
        return devices, unplaced


@dataclass(frozen=True)
class _Probe:
    """A meter as `build_layouts` reads it, for checking a proposed entry before it is printed."""

    device: str
    format: str
    keys: dict[str, Any]
    fields_: dict[str, str] | None
    id: str = "probe"
    adapter: str = "mqtt"

    @property
    def topic(self) -> str | None:
        return self.keys.get("topic")

    @property
    def topic_prefix(self) -> str | None:
        return self.keys.get("topic_prefix")

    @property
    def fields(self) -> dict[str, str] | None:
        return self.fields_

    @property
    def energy_unit(self) -> str | None:
        return self.keys.get("energy_unit")

    tariffs = None
    channels = None


def _expand_ha(cfg: dict[str, Any]) -> dict[str, Any]:
    """A discovery config with its abbreviations and '~' expanded (the keys amr reads)."""
    abbrev = {"stat_t": "state_topic", "unit_of_meas": "unit_of_measurement", "dev_cla": "device_class",
              "stat_cla": "state_class", "val_tpl": "value_template", "uniq_id": "unique_id", "obj_id": "object_id"}
    out = {abbrev.get(k, k): v for k, v in cfg.items()}
    base = out.get("~")
    st = out.get("state_topic")
    if isinstance(base, str) and isinstance(st, str):
        if st.startswith("~"):
            st = base + st[1:]
        elif st.endswith("~"):
            st = st[:-1] + base
        out["state_topic"] = st.replace("//", "/")
    return out


def _layout_keys(f: fmt.DeviceFormat, topic: str) -> dict[str, Any] | None:
    """The `topic_prefix` or `topic` a meter needs so that the collector places `topic`; None: none does."""
    strict = f.strict()
    if strict.match(topic):
        return {}
    for loose in fmt.loose_layouts(f.family):
        if loose.format is not f:
            continue
        m = loose.regex.match(topic)
        if not m:
            continue
        groups = m.groupdict()
        candidates: list[dict[str, Any]] = []
        if groups.get("prefix"):
            candidates.append({"topic_prefix": groups["prefix"]})
        if groups.get("device") is not None:
            before = topic[: m.start("device")].rstrip("/")
            after = topic[m.end("device"):]
            if before:
                candidates.append({"topic_prefix": before})
            candidates.append({"topic": (before + "/" if before else "") + "{device}" + after})
        for keys in candidates:
            try:
                lay = fmt.layout_for(f, topic=keys.get("topic"), prefix=keys.get("topic_prefix"), device="-")
            except LayoutError:
                continue
            m2 = lay.regex.match(topic)
            if m2 and all(m2.groupdict().get(k) == v for k, v in groups.items() if k in ("device", "channel")):
                return keys
    return None


def listen(broker: Any, seconds: float, client_id: str, listener: Listener | None = None,
           topic_filter: str = "#", stop: threading.Event | None = None,
           on_ready: Callable[[], None] | None = None) -> Listener:
    """Subscribe to `topic_filter` for `seconds` (or until `stop` is set) and feed every message to a Listener.

    `on_ready` is called once the broker confirmed the subscription: what is
    published from then on is heard.
    """
    from collector.mqtt.client import Connection, make_client

    out = listener or Listener()
    client = make_client(broker, client_id, persistent=False)
    conn = Connection()
    lock = threading.Lock()

    subscribed = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        conn.on_connect(c, userdata, flags, reason_code, properties)
        if not reason_code.is_failure:
            c.subscribe(topic_filter, qos=0)

    def on_subscribe(c, userdata, mid, reason_codes, properties) -> None:
        subscribed.set()

    def on_message(c, userdata, msg) -> None:
        with lock:
            out.feed(msg.topic, bytes(msg.payload))

    client.on_connect = on_connect
    client.on_disconnect = conn.on_disconnect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    failed = threading.Event()
    client.on_connect_fail = lambda c, userdata: failed.set()  # refused at the TCP level: no use waiting
    client.connect_async(broker.host, broker.port, keepalive=30, clean_start=True)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not subscribed.is_set() and not failed.is_set() and time.monotonic() < deadline:
            subscribed.wait(0.05)
        if not subscribed.is_set():
            raise ConnectionError(f"no connection to {broker.describe()}: {conn.last_error or 'no answer'}")
        if on_ready is not None:
            on_ready()
        (stop or threading.Event()).wait(seconds)
    finally:
        client.disconnect()
        client.loop_stop()
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(x)}" for k, x in v.items()) + " }"
    return json.dumps(sorted(v) if isinstance(v, set) else v)


def inventory_toml(devices: list[SeenDevice], account: str = "0") -> str:
    """A ready inventory: one placeholder subscriber and a [[meter]] per device, as `amr inventory check` takes it."""
    lines = [
        "# Written by amr mqtt listen: one [[meter]] per device heard. Give each meter its",
        "# subscriber's account (the placeholder subscriber below is only there so the file checks).",
        "[[subscriber]]",
        f'account = "{account}"',
        'name = "placeholder: replace with the real subscribers"',
        "",
    ]
    used: set[str] = set()
    for s in devices:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", s.device).strip("-")[:48] or "device"
        mid = s.device if s.family == "amr" else f"{s.family}-{base}"
        n = 2
        while mid in used:
            mid, n = f"{s.family}-{base}-{n}", n + 1
        used.add(mid)
        lines.append(f"# {s.family} ({s.format}), heard on {s.topic}" + (f"; {s.note}" if s.note else ""))
        lines += ["[[meter]]", f"id = {json.dumps(mid)}", f'account = "{account}"', 'adapter = "mqtt"']
        if s.family != "amr":
            # a family's prefix applies to all its formats; a whole topic pattern to one
            name = s.format if "topic" in s.keys else s.family
            lines += [f"device = {json.dumps(s.device)}", f"format = {json.dumps(name)}"]
            for k, v in s.keys.items():
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append(f"registers = {_toml_value(s.registers)}")
        lines.append("")
    return "\n".join(lines)
