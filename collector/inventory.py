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
    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str
    metering: Literal["amr", "manual"] = "amr"
    plan: Literal["single", "two_zone", "three_zone"] = "single"
    category: Literal["gas_stove", "electric_stove"] = "gas_stove"
    area: Literal["urban", "rural"] = "urban"
    name: str | None = None
    rooms: int | None = Field(default=None, ge=1, le=50)  # the home's rooms: the consumption norm needs them
    residents: int | None = Field(default=None, ge=1, le=100)  # people registered in the home: likewise

    @field_validator("account", mode="before")
    @classmethod
    def _account(cls, v: Any) -> str:
        return normalize_account(v)


class Meter(BaseModel):
    """One meter. Adapter-specific keys are checked by the adapter at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    account: str
    adapter: Literal["modbus_tcp", "modbus_rtu", "iec62056", "mqtt", "manual"] = "modbus_tcp"
    preset: str | None = None
    host: str | None = None
    port: int | str | None = None
    unit: int | None = Field(default=None, ge=0, le=247)
    baudrate: int | None = Field(default=None, gt=0)
    parity: Literal["N", "E", "O"] | None = None  # Modbus RTU line parity; default N (8N1)
    address: str | None = None  # IEC 62056-21 device address (multi-drop)
    dialect: Literal["standard", "energomera"] = "standard"  # IEC 62056-21 dialect
    password: str | None = None  # IEC 62056-21 programming-mode password (Energomera)
    device: str | None = None  # MQTT device id / topic part
    format: str | None = None  # MQTT payload format
    bus: str | None = None  # name of the RS-485 bus; default: the port
    interval: timedelta = timedelta(minutes=30)
    timeout: float = Field(default=1.0, gt=0)
    pause: float = Field(default=0.0, ge=0)  # pause after each request on a shared bus
    max_request: int = Field(default=125, ge=1, le=125)  # registers per Modbus request
    multiplier: Decimal = Field(default=Decimal(1), gt=0)
    rollover: Decimal = Field(default=Decimal(1_000_000), gt=0)
    max_power_kw: Decimal = Field(default=Decimal(30), gt=0)
    installed: datetime | None = None
    removed: datetime | None = None
    registers: tuple[str, ...] = ("1.8.0",)

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
        return str(self.port or self.device or self.adapter)


@dataclass(frozen=True)
class Inventory:
    subscribers: dict[str, Subscriber]
    meters: dict[str, Meter]
    path: Path | None = None


def _describe(section: str, index: int, entry: Any) -> str:
    key = "account" if section == "subscriber" else "id"
    ident = entry.get(key) if isinstance(entry, dict) else None
    return f"{section}[{index}]" + (f" ({key} {ident!r})" if ident is not None else "")


def parse_inventory(data: dict[str, Any], source: str = "<inventory>") -> Inventory:
    """Validate a parsed TOML document; collect every problem before refusing."""
    problems: list[str] = []
    unknown = set(data) - {"subscriber", "meter"}
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
    if problems:
        raise InventoryError(problems)
    return Inventory(subscribers, meters, None)


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file; raise `InventoryError` naming each problem."""
    path = Path(path)
    try:
        data = read_toml(path)
    except TomlFileError as exc:
        raise InventoryError([str(exc)]) from None
    inv = parse_inventory(data, str(path))
    return Inventory(inv.subscribers, inv.meters, path)


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
