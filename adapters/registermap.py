"""Modbus register maps as data: preset files, their schema, decoding and batching.

A meter model is a TOML file in `adapters/presets/` (or any path an inventory
names), never code: an engineer adds a model by writing the table the
manufacturer publishes. This module is the one loop that reads such a file,
refuses a wrong one with the file, the entry and the reason, turns registers
into values (every integer and float width, word and byte order, scale) and
back (for the simulators), and groups registers into as few requests as the
protocol allows, bridging small gaps where one longer request is cheaper
than two short ones (the request optimisation Telegraf's modbus input does).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import struct
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.base import ModbusMeter
from amr.errors import ProblemsError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
MAX_REGISTERS_PER_REQUEST = 125  # Modbus application protocol, function codes 3 and 4
_OBIS = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# type -> (struct format, bits, signed, float)
TYPES: dict[str, tuple[str, int, bool, bool]] = {
    "u16": ("H", 16, False, False),
    "i16": ("h", 16, True, False),
    "u32": ("I", 32, False, False),
    "i32": ("i", 32, True, False),
    "u64": ("Q", 64, False, False),
    "i64": ("q", 64, True, False),
    "f32": ("f", 32, True, True),
    "f64": ("d", 64, True, True),
}
Function = Literal["input", "holding"]
Order = Literal["big", "little"]


class RegisterMapError(ProblemsError):
    """A refused preset; `str()` lists every problem, one per line."""

    what = "the register map"


class DecodeError(ValueError):
    """Registers that do not hold a usable value (NaN, infinity, short answer)."""


class RegisterSpec(BaseModel):
    """One value of a meter: where it lives and how it is encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    obis: str | None = None  # the OBIS register a reading feeds (energy counters)
    name: str | None = None  # for values that are not readings (voltage, power, clock)
    address: int = Field(ge=0, le=0xFFFF)  # zero-based protocol address, not 30001-style
    function: Function = "holding"
    type: str = "u16"
    word_order: Order = "big"
    byte_order: Order = "big"
    scale: Decimal = Decimal(1)
    unit: str = ""

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v not in TYPES:
            raise ValueError(f"unknown type {v!r}; known: {', '.join(TYPES)}")
        return v

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: Any) -> Decimal:
        d = Decimal(str(v))
        if not d.is_finite() or d == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {v!r}")
        return d

    @field_validator("obis")
    @classmethod
    def _obis(cls, v: str | None) -> str | None:
        if v is not None and not _OBIS.match(v):
            raise ValueError(f"OBIS register must look like '1.8.0', got {v!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"name must be lower_snake_case, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_key(self) -> RegisterSpec:
        if (self.obis is None) == (self.name is None):
            raise ValueError("give exactly one of 'obis' (a reading) or 'name' (any other value)")
        if self.address + self.words - 1 > 0xFFFF:
            raise ValueError(f"{self.type} at address {self.address} runs past 65535")
        return self

    @property
    def key(self) -> str:
        return self.obis or self.name or ""

    @property
    def words(self) -> int:
        return TYPES[self.type][1] // 16

    @property
    def end(self) -> int:
        """First address after this value."""
        return self.address + self.words

    # --- decoding and encoding ------------------------------------------

    def _wire_bytes(self, words: Sequence[int]) -> bytes:
        ws = list(words)
        if self.word_order == "little":
            ws.reverse()
        raw = b"".join(w.to_bytes(2, "big") for w in ws)
        if self.byte_order == "little":
            raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
        return raw

    def _words_of(self, raw: bytes) -> list[int]:
        if self.byte_order == "little":
            raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
        ws = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
        if self.word_order == "little":
            ws.reverse()
        return ws

    def decode(self, words: Sequence[int]) -> Decimal:
        """The value in its unit, scale applied; exact for integers."""
        if len(words) != self.words:
            raise DecodeError(f"{self.key}: {self.type} needs {self.words} registers, got {len(words)}")
        fmt, _, _, is_float = TYPES[self.type]
        (raw,) = struct.unpack(">" + fmt, self._wire_bytes(words))
        if is_float:
            if not math.isfinite(raw):
                raise DecodeError(f"{self.key}: the meter sent {raw} ({self.type})")
            return _shortest(raw, self.type) * self.scale
        return Decimal(raw) * self.scale

    def encode(self, value: Decimal | float | int) -> list[int]:
        """Registers a meter would hold for value (simulators); integers wrap like counters."""
        fmt, bits, signed, is_float = TYPES[self.type]
        scaled = Decimal(str(value)) / self.scale
        if is_float:
            raw = struct.pack(">" + fmt, float(scaled))
        else:
            n = int(scaled.to_integral_value(rounding=ROUND_DOWN)) % (1 << bits)
            if signed and n >= 1 << (bits - 1):
                n -= 1 << bits
            raw = struct.pack(">" + fmt, n)
        return self._words_of(raw)


def _shortest(x: float, typ: str) -> Decimal:
    """The shortest decimal that is the same float32/64: what the meter meant to show."""
    if typ == "f64":
        return Decimal(repr(x))
    for digits in range(6, 10):
        text = f"{x:.{digits}g}"
        if struct.unpack(">f", struct.pack(">f", float(text)))[0] == x:
            return Decimal(text)
    return Decimal(repr(x))


class ProbeSpec(BaseModel):
    """A register `amr scan` reads to guess the model: it must answer within [min, max]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "probe"
    address: int = Field(ge=0, le=0xFFFF)
    function: Function = "input"
    type: str = "u16"
    word_order: Order = "big"
    byte_order: Order = "big"
    scale: Decimal = Decimal(1)
    min: Decimal
    max: Decimal

    def as_register(self) -> RegisterSpec:
        return RegisterSpec(
            name=self.name, address=self.address, function=self.function, type=self.type,
            word_order=self.word_order, byte_order=self.byte_order, scale=self.scale,
        )


class _PresetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    manufacturer: str = ""
    source: str = ""  # where the register table was taken from
    description: str = ""
    max_request: int = Field(default=MAX_REGISTERS_PER_REQUEST, ge=1, le=MAX_REGISTERS_PER_REQUEST)
    max_gap: int = Field(default=10, ge=0, le=MAX_REGISTERS_PER_REQUEST)
    probes: list[ProbeSpec] = Field(default=[], alias="probe")
    registers: list[RegisterSpec] = Field(alias="register")


@dataclass(frozen=True)
class RegisterMap:
    """A validated preset: registers by key, batching limits, scan probes."""

    name: str
    model: str
    registers: tuple[RegisterSpec, ...]
    probes: tuple[ProbeSpec, ...] = ()
    max_request: int = MAX_REGISTERS_PER_REQUEST
    max_gap: int = 10
    source: str = ""
    path: Path | None = None
    _by_key: dict[str, RegisterSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {r.key: r for r in self.registers})

    def get(self, key: str) -> RegisterSpec | None:
        return self._by_key.get(key)

    @property
    def readings(self) -> tuple[RegisterSpec, ...]:
        """Registers that feed OBIS readings."""
        return tuple(r for r in self.registers if r.obis)

    def select(self, keys: Iterable[str] | None) -> tuple[RegisterSpec, ...]:
        """The registers named by keys (all when None); unknown keys raise KeyError."""
        if keys is None:
            return self.registers
        out = []
        for k in keys:
            r = self.get(k)
            if r is None:
                raise KeyError(k)
            out.append(r)
        return tuple(out)


def _overlaps(regs: Sequence[RegisterSpec]) -> list[str]:
    problems = []
    for fn in ("input", "holding"):
        ordered = sorted((r for r in regs if r.function == fn), key=lambda r: r.address)
        for a, b in itertools.pairwise(ordered):
            if b.address < a.end:
                problems.append(
                    f"registers {a.key!r} ({fn} {a.address}..{a.end - 1}) and {b.key!r} "
                    f"({fn} {b.address}..{b.end - 1}) overlap"
                )
    return problems


def parse_register_map(data: dict[str, Any], name: str, source: str = "<preset>") -> RegisterMap:
    """Validate a parsed preset document; collect every problem before refusing."""
    problems: list[str] = []
    try:
        doc = _PresetFile.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = list(err["loc"])
            where = source
            if len(loc) >= 2 and loc[0] in ("register", "probe") and isinstance(loc[1], int):
                entry = (data.get(loc[0]) or [])[loc[1]]
                ident = (entry.get("obis") or entry.get("name")) if isinstance(entry, dict) else None
                where += f": {loc[0]}[{loc[1]}]" + (f" ({ident!r})" if ident else "")
                loc = loc[2:]
            key = ".".join(str(p) for p in loc) or "(entry)"
            problems.append(f"{where}: key {key!r}: {err['msg'].removeprefix('Value error, ')}")
        raise RegisterMapError(problems) from None
    seen: set[str] = set()
    for i, r in enumerate(doc.registers):
        if r.key in seen:
            problems.append(f"{source}: register[{i}] ({r.key!r}): duplicate register {r.key!r}")
        seen.add(r.key)
    problems += [f"{source}: {p}" for p in _overlaps(doc.registers)]
    if not doc.registers:
        problems.append(f"{source}: no [[register]] entries")
    if problems:
        raise RegisterMapError(problems)
    return RegisterMap(
        name=name, model=doc.model, registers=tuple(doc.registers), probes=tuple(doc.probes),
        max_request=doc.max_request, max_gap=doc.max_gap, source=doc.source,
    )


def load_register_map(ref: str, base: Path | None = None) -> RegisterMap:
    """A preset by name (`eastron_sdm630`) or by path to a .toml file (relative to base)."""
    if ref.endswith(".toml") or "/" in ref:
        path = Path(ref)
        if not path.is_absolute() and base is not None:
            path = base / path
        name = path.stem
    else:
        path = PRESETS_DIR / f"{ref}.toml"
        name = ref
        if not path.exists():
            known = ", ".join(available_presets()) or "none"
            raise RegisterMapError([f"unknown preset {ref!r}; known: {known}"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except FileNotFoundError:
        raise RegisterMapError([f"{path}: no such preset file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise RegisterMapError([f"{path}: not valid TOML: {exc}"]) from None
    rmap = parse_register_map(data, name, str(path))
    return dataclasses.replace(rmap, path=path)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


# --- request batching ------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One read request and the values it carries."""

    function: Function
    address: int
    count: int
    registers: tuple[RegisterSpec, ...]

    def values(self, words: Sequence[int]) -> dict[str, Decimal]:
        """The values in the words answering this request; exactly `count` words, no more.

        A longer answer is refused, not cut: it answers some other request, and
        the offsets of our values in it are not known.
        """
        if len(words) != self.count:
            raise DecodeError(
                f"asked {self.count} registers at {self.address}..{self.address + self.count - 1}, "
                f"got {len(words)}"
            )
        return {r.key: r.decode(words[r.address - self.address : r.end - self.address]) for r in self.registers}


def plan_requests(
    registers: Iterable[RegisterSpec], max_request: int = MAX_REGISTERS_PER_REQUEST, max_gap: int = 10
) -> list[Request]:
    """Group registers into few requests: same function, at most max_request
    registers each, unread gaps of at most max_gap registers bridged.

    max_gap=0 reads only contiguous runs (for meters that answer an exception
    for an unmapped address inside a block); max_request=1..125 caps a
    request for meters with small buffers.
    """
    if not 1 <= max_request <= MAX_REGISTERS_PER_REQUEST:
        raise ValueError(f"max_request must be 1..{MAX_REGISTERS_PER_REQUEST}, got {max_request}")
    out: list[Request] = []
    for fn in ("input", "holding"):
        regs = sorted((r for r in registers if r.function == fn), key=lambda r: (r.address, r.end))
        group: list[RegisterSpec] = []
        start = end = 0
        for r in regs:
            if group and r.address - end <= max_gap and max(end, r.end) - start <= max_request:
                group.append(r)
                end = max(end, r.end)
                continue
            if group:
                out.append(Request(fn, start, end - start, tuple(group)))
            group, start, end = [r], r.address, r.end
        if group:
            out.append(Request(fn, start, end - start, tuple(group)))
    return out


# --- inventory checks at start-up ----------------------------------------------

MODBUS_ADAPTERS = ("modbus_tcp", "modbus_rtu")


def check_modbus_meters(
    meters: Iterable[ModbusMeter], source: str = "<inventory>", base: Path | None = None,
    maps: dict[str, RegisterMap | None] | None = None,
) -> list[str]:
    """Every reason the Modbus meters of an inventory cannot be polled, one line each.

    Run before the first poll: a wrong preset, a register the preset lacks, a
    bad address or two meters answering to one unit id on one bus would
    otherwise show up as confusing timeouts or, worse, as another meter's
    values. `maps`, when given, receives every preset loaded (each file read
    once), for the daemon to hand to its adapters.
    """
    problems: list[str] = []
    maps = {} if maps is None else maps  # preset ref -> map (None: refused); the caller may keep it
    owners: dict[tuple[str, int], str] = {}
    bauds: dict[str, tuple[str, str]] = {}
    for m in meters:
        if m.adapter not in MODBUS_ADAPTERS:
            continue
        where = f"{source}: meter {m.id!r}"
        if not m.preset:
            problems.append(f"{where}: key 'preset': a Modbus meter needs a register map preset")
        else:
            if m.preset not in maps:
                try:
                    maps[m.preset] = load_register_map(m.preset, base)
                except RegisterMapError as exc:
                    maps[m.preset] = None
                    problems += [f"{where}: key 'preset': {p}" for p in exc.problems]
            rmap = maps[m.preset]
            if rmap is not None:
                for reg in m.registers:
                    if rmap.get(reg) is None:
                        known = ", ".join(r.key for r in rmap.readings)
                        problems.append(
                            f"{where}: key 'registers': preset {m.preset!r} has no register {reg!r} (it has {known})"
                        )
        if m.unit is None or not 1 <= m.unit <= 247:
            problems.append(f"{where}: key 'unit': a unit id 1..247 is needed (0 is broadcast, never answered)")
        if m.adapter == "modbus_tcp":
            if not m.host:
                problems.append(f"{where}: key 'host': a Modbus TCP meter needs a host")
            if m.port is not None and (not isinstance(m.port, int) or not 1 <= m.port <= 65535):
                problems.append(f"{where}: key 'port': a TCP port 1..65535 is needed, got {m.port!r}")
        else:
            host, tcp_port = getattr(m, "host", None), getattr(m, "tcp_port", None)
            line_ok = False
            if tcp_port is not None or (host and m.port is None):  # RTU frames through a TCP converter
                if not host or tcp_port is None:
                    problems.append(f"{where}: keys 'host' and 'tcp_port': an RS-485-to-Ethernet converter needs both "
                                    f"(got host {host!r}, tcp_port {tcp_port!r})")
                elif m.port is not None:
                    problems.append(f"{where}: key 'port': give either a serial 'port' or the converter's 'host' and "
                                    f"'tcp_port', not both (got port {m.port!r})")
                else:
                    line_ok = True
            elif not isinstance(m.port, str) or not m.port:
                problems.append(f"{where}: key 'port': a Modbus RTU meter needs a serial device path like /dev/ttyUSB0, "
                                "or 'host' and 'tcp_port' of an RS-485-to-Ethernet converter")
            else:
                line_ok = True
            if line_ok:
                line = f"{int(m.baudrate or 9600)} baud {m.parity or 'N'}"
                first = bauds.setdefault(m.bus_name, (line, m.id))
                if first[0] != line:
                    problems.append(
                        f"{where}: key 'baudrate': {line} on bus {m.bus_name}, but meter {first[1]!r} "
                        f"on the same bus uses {first[0]}"
                    )
        if m.unit is not None:
            key = (m.bus_name, m.unit)
            if key in owners:
                problems.append(f"{where}: key 'unit': unit {m.unit} on bus {m.bus_name} is already meter {owners[key]!r}")
            else:
                owners[key] = m.id
    return problems
