"""The TOML inventory of subscribers and meters: parsing, validation, upsert.

Every error names the file, the entry and the key, because the person who
reads it is an engineer with a 300-line file open on a gateway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from amr.errors import ProblemsError
from amr.tomlfile import TomlFileError, read_toml

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class InventoryError(ProblemsError):
    """A refused inventory; `str()` lists every problem, one per line."""

    what = "the inventory"


def normalize_account(account: str | int) -> str:
    """Account numbers are digits whose leading zeros are not significant."""
    text = str(account).strip()
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"account must be digits, got {account!r}")
    return text.lstrip("0") or "0"


def parse_duration(text: str | int) -> timedelta:
    """'30m', '1h', '15s', '1d' or a number of seconds."""
    if isinstance(text, int):
        seconds = text
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise ValueError(f"invalid duration {text!r}: use a number and s, m, h or d, like '30m'")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return timedelta(seconds=seconds)


class Subscriber(BaseModel):
    """One household account: how it is metered and which tariff applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str = Field(
        description="The account number: digits, leading zeros not significant (`000123` is `123`). "
        "Required; unique in the file."
    )
    metering: Literal["amr", "manual"] = Field(
        default="amr",
        description="`amr`: readings come from meters the system polls or hears; "
        "`manual`: a person enters readings (customer API or `amr ingest`).",
    )
    plan: Literal["single", "two_zone", "three_zone"] = Field(
        default="single", description="The tariff plan: one rate, day/night zones, or peak/half-peak/night zones."
    )
    category: Literal["gas_stove", "electric_stove"] = Field(
        default="gas_stove", description="The tariff category of the home's cooker; rates differ by category."
    )
    area: Literal["urban", "rural"] = Field(
        default="urban", description="Urban or rural home; rural homes have their own rates in the catalogue."
    )
    name: str | None = Field(default=None, description="A free-text name for people; not used in billing.")
    rooms: int | None = Field(
        default=None, ge=1, le=50,
        description="The home's rooms (1-50): the consumption norm for a month billed without readings needs them.",
    )
    residents: int | None = Field(
        default=None, ge=1, le=100,
        description="People registered in the home (1-100): the consumption norm needs them too.",
    )

    @field_validator("account", mode="before")
    @classmethod
    def _account(cls, v: Any) -> str:
        return normalize_account(v)


class Meter(BaseModel):
    """One meter. Adapter-specific keys are checked by the adapter at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        min_length=1, max_length=64,
        description="The meter's id (1-64 characters), used by every command, reading and topic. Required; unique.",
    )
    account: str = Field(description="The account of a `[[subscriber]]` in the same file that this meter bills. Required.")
    adapter: Literal["modbus_tcp", "modbus_rtu", "iec62056", "mercury230", "mercury200", "dlms", "mqtt", "manual"] = Field(
        default="modbus_tcp",
        description="How readings arrive: polled over Modbus TCP, Modbus RTU (RS-485) or IEC 62056-21; "
        "published over MQTT; or entered by a person (`manual`). "
        "`mercury230`: Incotex Mercury three-phase protocol (230, 231, 233, 234, 236, 238, 203.2TD, 204, 208); "
        "`mercury200`: Mercury single-phase protocol (200, 201, 203, 206). "
        "`dlms`: DLMS/COSEM meters with the SPODES profile (HDLC on RS-485 or an optical probe, or the TCP wrapper).",
    )
    preset: str | None = Field(
        default=None,
        description="Modbus: the register map, a file name in `adapters/presets/` without `.toml` "
        "(`eastron_sdm630`, ...). Required for `modbus_tcp` and `modbus_rtu`.",
    )
    host: str | None = Field(
        default=None,
        description="Modbus TCP: the meter's or the TCP gateway's host name or address. IEC 62056: the "
        "RS-485-to-Ethernet converter's host, with `tcp_port`.",
    )
    port: int | str | None = Field(
        default=None,
        description="Modbus TCP: the TCP port (default 502). Modbus RTU, IEC 62056 and Mercury: the serial device, "
        "like `/dev/ttyUSB0`.",
    )
    unit: int | None = Field(
        default=None, ge=0, le=247,
        description="Modbus: the unit (slave) id, 0-247; two meters on one bus may not share it.",
    )
    baudrate: int | None = Field(
        default=None, gt=0,
        description="Serial line speed: Modbus RTU's rate, or IEC 62056-21's initial rate (300) before the "
        "meter proposes its own. Mercury: the port's rate, default 9600 (8N1); a wrong rate is silence or CRC errors.",
    )
    parity: Literal["N", "E", "O"] | None = Field(
        default=None, description="Modbus RTU line parity: none, even or odd; default N (8N1)."
    )
    address: str | None = Field(
        default=None, description="IEC 62056-21: the device address in the sign-on, for several meters on one line. "
        "Mercury v2 (`mercury230`): the network address 1..240 (factory: the serial's last 3 digits, the last 2 "
        "when above 240); Mercury v1 (`mercury200`): the serial's last 6 digits (200) or 8 (203, 206). A wrong "
        "address is silence (`timeout`); `amr scan --mercury` finds a single meter's address."
    )
    dialect: Literal["standard", "energomera", "energomera_spodes", "neva"] = Field(
        default="standard", description="IEC 62056-21: the meter family's dialect (`energomera`: password and `ET0PE()`; "
        "`energomera_spodes`: Energomera SPODES models in IEC mode, energy from the `EMD` archive; "
        "`neva`: Neva MT, XOR check, OBIS codes as hex commands)."
    )
    tcp_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="IEC 62056 behind a transparent RS-485-to-Ethernet converter: the converter's TCP port, "
        "with `host`, instead of a serial `port` (the same bytes, no header). Mercury too (the converter must be "
        "transparent: a Modbus TCP gateway that adds a header gets no answer). Modbus RTU (`modbus_rtu`) too: "
        "RTU frames with their CRC over the socket, meters behind one converter polled as one bus.",
    )
    clock_correction: bool = Field(
        default=False,
        description="Let the gateway correct the meter's clock when it is off, within the protocol's daily limit "
        "(Energomera 29 s a day); every correction is logged. Off unless set.",
    )
    backfill_slots: int = Field(
        default=48, ge=0, le=10000,
        description="When slots were missed and the meter's adapter reads its load profile: at most this many "
        "missed slots read back from the profile per cycle (the rest next cycle); 0 turns back-fill off.",
    )
    password: str | None = Field(
        default=None,
        description="IEC 62056-21: the programming-mode password (Energomera). Mercury v2: the channel password "
        "of `access_level`, 6 characters, default `111111` (level 2: `222222`); a refusal says 'password'. "
        "Never stored in the database or logged.",
    )
    transport: Literal["hdlc", "wrapper"] | None = Field(
        default=None,
        description="DLMS: `hdlc` (default) on the serial `port`, or through a transparent converter at `host` and "
        "`tcp_port`; `wrapper`: the IEC 62056-47 TCP wrapper of a meter's modem at `host` and `tcp_port` (default 4059).",
    )
    client_address: int | None = Field(
        default=None, ge=1, le=127,
        description="DLMS: the client SAP: 16 public (no password), 32 reader (SPODES, with `password`; the default "
        "when a password is set), 48 configurator. `password` is the low-level security (LLS) password of this client.",
    )
    server_address: int | None = Field(
        default=None, ge=0, le=16383,
        description="DLMS: the server's logical device (default 1, the meter); in the wrapper, its wPort.",
    )
    physical_address: int | None = Field(
        default=None, ge=0, le=16383,
        description="DLMS over HDLC: the meter's physical address on a multi-drop bus (often derived from the serial, "
        "like the last 4 digits + 16); omitted on a point-to-point line. `amr scan --dlms` finds them.",
    )
    password_encoding: Literal["digits", "ascii"] | None = Field(
        default=None,
        description="Mercury v2: how the password goes on the wire: `digits` (default; each digit a byte 0..9) "
        "or `ascii` (its characters), as the meter's configurator set it. The wrong one is the most common "
        "reason a Mercury does not answer or refuses the channel: try the other.",
    )
    access_level: int | None = Field(
        default=None, ge=1, le=2,
        description="Mercury v2: the channel's access level, 1 read (default) or 2 write (with its password). "
        "Reading needs 1; the daily clock correction is allowed at 1 too.",
    )
    device: str | None = Field(
        default=None,
        description="MQTT: the device id as it appears in its topic (Tasmota's topic, Shelly's id, "
        "Zigbee2MQTT's friendly name): it says which device is this meter.",
    )
    format: str | None = Field(
        default=None,
        description="MQTT: the device's payload format, a `name` or `family` from "
        "`adapters/schemas/mqtt-devices.toml` (`tasmota`, `shelly_gen1`, `shelly`, `zigbee2mqtt`); "
        "omitted: the device id alone decides.",
    )
    topic_prefix: str | None = Field(
        default=None,
        description="MQTT: the device's topic prefix when it is not its family's default (Tasmota's `tele`, "
        "Shelly Gen1's `shellies`, Zigbee2MQTT's `base_topic`, a Shelly Gen2 or ESPHome topic prefix); "
        "levels and `+` allowed, like `home/shellies`. Needs `format`. For every device of a family: "
        "`[[mqtt_layout]]` with `family` and `topic_prefix` or `topic`.",
    )
    topic: str | None = Field(
        default=None,
        description="MQTT: the device's whole topic pattern, like Tasmota's FullTopic `tasmota/%topic%/%prefix%/` "
        "(`%prefix%`, `%topic%`, or `{prefix}`, `{device}`, `{channel}`; a trailing `/` gets the family's last "
        "level), or one device's exact topic (Home Assistant state topics). Needs `format`.",
    )
    tariffs: tuple[str, ...] | None = Field(
        default=None,
        description="MQTT (Tasmota `TotalTariff`): the zone register of each tariff position, as the meter is "
        "configured, like `[\"1.8.2\", \"1.8.1\"]` when Tasmota's tariff 1 is the night zone; export tariffs "
        "follow (2.8.x). Default `[\"1.8.1\", \"1.8.2\"]`.",
    )
    fields: dict[str, str] | None = Field(
        default=None,
        description="MQTT: which payload fields are which registers, instead of the format's, for readers "
        "whose field names the user chose (Tasmota SML: `{ \"SML.Total_in\" = \"1.8.0\", \"SML.Total_out\" = "
        "\"2.8.0\" }`, a Home Assistant value_json path); `value` names a plain number's register.",
    )
    channels: Literal["sum", "split"] | None = Field(
        default=None,
        description="MQTT: a list of totals (Tasmota `\"Total\":[...]`) is phases to `sum` (default) or channels to "
        "`split`: then the devices are `<device>/1`, `<device>/2`..., one meter each.",
    )
    energy_unit: Literal["Wh", "kWh", "MWh"] | None = Field(
        default=None,
        description="MQTT: the unit of the device's values when its format does not fix it (ESPHome and Home "
        "Assistant sensors: their `unit_of_measurement`); default the format's unit.",
    )
    bus: str | None = Field(
        default=None,
        description="The name of the RS-485 bus: meters of one bus are polled one after the other. "
        "Default: the serial port (Modbus TCP: `host:port`).",
    )
    interval: timedelta = Field(
        default=timedelta(minutes=30),
        description="How often the meter is read, aligned to the wall clock: `30m`, `1h`, `15s`, `1d` or seconds.",
    )
    timeout: float = Field(default=1.0, gt=0, description="Seconds to wait for an answer (IEC 62056: between bytes).")
    pause: float = Field(
        default=0.0, ge=0, description="Seconds of quiet after each request on a shared bus, for slow meters."
    )
    max_request: int = Field(
        default=125, ge=1, le=125,
        description="Modbus: at most this many registers per request (1-125), for meters that refuse long reads.",
    )
    multiplier: Decimal = Field(
        default=Decimal(1), gt=0,
        description="The transformer ratio: the register's kWh times this is the energy billed.",
    )
    rollover: Decimal = Field(
        default=Decimal(1_000_000), gt=0,
        description="The register's wrap value: a reading at or above it is refused (`above_rollover`), and a drop "
        "from near it to near 0 is a rollover, not a reset.",
    )
    max_power_kw: Decimal = Field(
        default=Decimal(30), gt=0,
        description="The largest plausible power in kW: more energy in an interval than this allows is a glitch.",
    )
    installed: datetime | None = Field(
        default=None,
        description="When the meter was installed, with an offset (`2026-01-01T00:00:00+03:00`); earlier readings "
        "are refused (`before_installation`).",
    )
    removed: datetime | None = Field(
        default=None,
        description="When the meter was removed, with an offset, after `installed`; later readings are refused "
        "(`after_removal`).",
    )
    registers: tuple[str, ...] = Field(
        default=("1.8.0",),
        description="The OBIS registers this meter has and is read for (`1.8.0` total import, `1.8.1`... zones).",
    )

    @field_validator("account", mode="before")
    @classmethod
    def _account(cls, v: Any) -> str:
        return normalize_account(v)

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> timedelta:
        if isinstance(v, timedelta):
            return v
        return parse_duration(v)

    @field_validator("installed", "removed")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("timestamp needs an offset, like 2026-01-01T00:00:00+03:00")
        return v

    @property
    def bus_name(self) -> str:
        """Which serial scheduler this meter belongs to (RTU/IEC) or its host."""
        if self.bus:
            return self.bus
        if self.adapter in ("modbus_tcp",):
            return f"{self.host}:{self.port or 502}"
        if self.host and self.tcp_port is not None:  # a serial line behind a TCP converter
            return f"{self.host}:{self.tcp_port}"
        if self.host and self.adapter == "dlms":  # the TCP wrapper on its default port: that endpoint
            from adapters.dlms import DEFAULT_TCP_PORT

            return f"{self.host}:{DEFAULT_TCP_PORT}"
        return str(self.port or self.device or self.adapter)


class MqttLayout(BaseModel):
    """`[[mqtt_layout]]`: one MQTT device family's topic layout for every device of the inventory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(min_length=1, description="A format `name` or `family` from mqtt-devices.toml.")
    topic_prefix: str | None = Field(default=None, description="The family's topic prefix, like `home/tele`.")
    topic: str | None = Field(default=None, description="The family's whole topic pattern (Tasmota FullTopic).")


@dataclass(frozen=True)
class Inventory:
    subscribers: dict[str, Subscriber]
    meters: dict[str, Meter]
    path: Path | None = None
    mqtt_layouts: tuple[MqttLayout, ...] = ()


def _describe(section: str, index: int, entry: Any) -> str:
    key = "account" if section == "subscriber" else "id"
    ident = entry.get(key) if isinstance(entry, dict) else None
    return f"{section}[{index}]" + (f" ({key} {ident!r})" if ident is not None else "")


def parse_inventory(data: dict[str, Any], source: str = "<inventory>") -> Inventory:
    """Validate a parsed TOML document; collect every problem before refusing."""
    problems: list[str] = []
    unknown = set(data) - {"subscriber", "meter", "mqtt_layout"}
    for key in sorted(unknown):
        problems.append(f"{source}: unknown section {key!r} (expected [[subscriber]] and [[meter]])")
    subscribers: dict[str, Subscriber] = {}
    meters: dict[str, Meter] = {}
    for section, model, target in (
        ("subscriber", Subscriber, subscribers),
        ("meter", Meter, meters),
    ):
        entries = data.get(section, [])
        if not isinstance(entries, list):
            problems.append(f"{source}: {section} must be an array of tables ([[{section}]])")
            continue
        for i, entry in enumerate(entries):
            where = f"{source}: {_describe(section, i, entry)}"
            try:
                obj = model.model_validate(entry)
            except ValidationError as exc:
                for err in exc.errors():
                    key = ".".join(str(p) for p in err["loc"]) or "(entry)"
                    msg = err["msg"].removeprefix("Value error, ")
                    problems.append(f"{where}: key {key!r}: {msg}")
                continue
            ident = obj.account if isinstance(obj, Subscriber) else obj.id
            if ident in target:
                problems.append(f"{where}: duplicate {section} {ident!r}")
                continue
            target[ident] = obj  # type: ignore[assignment]
    for i, m in enumerate(meters.values()):
        if m.account not in subscribers:
            problems.append(
                f"{source}: meter[{i}] (id {m.id!r}): key 'account': no subscriber {m.account!r}"
            )
        if m.installed and m.removed and m.removed <= m.installed:
            problems.append(f"{source}: meter[{i}] (id {m.id!r}): key 'removed': not after 'installed'")
    layouts = _mqtt_layouts(data.get("mqtt_layout", []), source, problems)
    if problems:
        raise InventoryError(problems)
    return Inventory(subscribers, meters, None, layouts)


def _mqtt_layouts(entries: Any, source: str, problems: list[str]) -> tuple[MqttLayout, ...]:
    """`[[mqtt_layout]]` entries, each needing `topic_prefix` or `topic`; problems appended."""
    if not isinstance(entries, list):
        problems.append(f"{source}: mqtt_layout must be an array of tables ([[mqtt_layout]])")
        return ()
    out = []
    for i, entry in enumerate(entries):
        where = f"{source}: mqtt_layout[{i}]"
        try:
            lay = MqttLayout.model_validate(entry)
        except ValidationError as exc:
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "(entry)"
                problems.append(f"{where}: key {key!r}: {err['msg'].removeprefix('Value error, ')}")
            continue
        if (lay.topic is None) == (lay.topic_prefix is None):
            problems.append(f"{where} (family {lay.family!r}): give one of 'topic_prefix' or 'topic'")
            continue
        out.append(lay)
    return tuple(out)


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file; raise `InventoryError` naming each problem."""
    path = Path(path)
    try:
        data = read_toml(path)
    except TomlFileError as exc:
        raise InventoryError([str(exc)]) from None
    inv = parse_inventory(data, str(path))
    return Inventory(inv.subscribers, inv.meters, path, inv.mqtt_layouts)


def upsert_inventory(conn: Any, inv: Inventory) -> tuple[int, int]:
    """Insert or update subscribers and meters; returns (subscribers, meters).

    Meters and subscribers absent from the file are left alone: an inventory
    file may describe one gateway's share of the fleet.
    """
    from psycopg.types.json import Jsonb

    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO subscriber (account, metering, plan, category, area, name, rooms, residents)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (account) DO UPDATE SET metering = EXCLUDED.metering,
                 plan = EXCLUDED.plan, category = EXCLUDED.category, area = EXCLUDED.area,
                 name = EXCLUDED.name, rooms = EXCLUDED.rooms, residents = EXCLUDED.residents,
                 updated_at = now()""",
            [(s.account, s.metering, s.plan, s.category, s.area, s.name, s.rooms, s.residents)
             for s in inv.subscribers.values()],
        )
        cur.executemany(
            """INSERT INTO meter (id, account, adapter, multiplier, rollover, max_power_kw,
                 interval_s, installed, removed, config)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (id) DO UPDATE SET account = EXCLUDED.account,
                 adapter = EXCLUDED.adapter, multiplier = EXCLUDED.multiplier,
                 rollover = EXCLUDED.rollover, max_power_kw = EXCLUDED.max_power_kw,
                 interval_s = EXCLUDED.interval_s, installed = EXCLUDED.installed,
                 removed = EXCLUDED.removed, config = EXCLUDED.config, updated_at = now()""",
            [
                (
                    m.id,
                    m.account,
                    m.adapter,
                    m.multiplier,
                    m.rollover,
                    m.max_power_kw,
                    int(m.interval.total_seconds()),
                    m.installed,
                    m.removed,
                    Jsonb(m.model_dump(mode="json", exclude={"id", "account", "adapter", "password"})),  # no secrets in the DB
                )
                for m in inv.meters.values()
            ],
        )
    return len(inv.subscribers), len(inv.meters)
