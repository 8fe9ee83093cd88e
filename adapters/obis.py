"""OBIS codes in IEC 62056-21 readouts: which we keep, under what name, in what unit.

The table is the protocol knowledge; `parse_data_block` is one small loop
over it, in the manner of dsmr_parser's telegram specifications. A readout
line holds one or more data sets `ADDRESS(VALUE*UNIT)`; meters write the
address with or without the medium/channel prefix (`1-0:`) and with or
without a billing-period suffix (`*255`, `&01`), so addresses are normalised
to the reduced `C.D.E` form before the table is consulted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

Kind = Literal["energy", "time", "date", "info"]


@dataclass(frozen=True, slots=True)
class ObisEntry:
    register: str  # our register name (the reduced OBIS code)
    kind: Kind
    unit: str | None  # the unit we store: energies are always kWh
    description: str


OBIS: dict[str, ObisEntry] = {
    "1.8.0": ObisEntry("1.8.0", "energy", "kWh", "active energy import, total"),
    "1.8.1": ObisEntry("1.8.1", "energy", "kWh", "active energy import, tariff 1"),
    "1.8.2": ObisEntry("1.8.2", "energy", "kWh", "active energy import, tariff 2"),
    "1.8.3": ObisEntry("1.8.3", "energy", "kWh", "active energy import, tariff 3"),
    "1.8.4": ObisEntry("1.8.4", "energy", "kWh", "active energy import, tariff 4"),
    "2.8.0": ObisEntry("2.8.0", "energy", "kWh", "active energy export, total"),
    "0.9.1": ObisEntry("0.9.1", "time", None, "meter clock, local time"),
    "0.9.2": ObisEntry("0.9.2", "date", None, "meter calendar, local date"),
    "0.0.0": ObisEntry("0.0.0", "info", None, "device address"),
    "C.1.0": ObisEntry("C.1.0", "info", None, "meter serial number"),
    "F.F": ObisEntry("F.F", "info", None, "fatal error register"),
}

# energy units a meter may print -> factor to kWh
ENERGY_UNITS: dict[str, Decimal] = {
    "kWh": Decimal(1),
    "Wh": Decimal("0.001"),
    "MWh": Decimal(1000),
}

_DATA_SET = re.compile(r"([^()\s!]+)\(([^()]*)\)")
_PREFIX = re.compile(r"^(?:\d+-\d+:)?")
_SUFFIX = re.compile(r"(?:\*\d+|&\d+)$")


class ObisError(ValueError):
    """A data set that names a known register but whose value cannot be read."""

    def __init__(self, address: str, raw: str, reason: str):
        self.address = address
        self.raw = raw
        super().__init__(f"register {address}: {reason} (got {raw!r})")


@dataclass(frozen=True, slots=True)
class DataSet:
    register: str
    kind: Kind
    value: Decimal | str  # Decimal (kWh) for energies, text for the rest
    unit: str | None


def normalise(address: str) -> str:
    """'1-0:1.8.0*255' -> '1.8.0'; letters of the reduced form are kept ('C.1.0')."""
    return _SUFFIX.sub("", _PREFIX.sub("", address.strip()))


def energy_kwh(address: str, raw: str, default_unit: str = "") -> Decimal:
    """'012.5*kWh' -> Decimal kWh; a meter that prints no unit gets default_unit."""
    number, _, unit = raw.partition("*")
    unit = unit.strip() or default_unit
    factor = ENERGY_UNITS.get(unit)
    if factor is None:
        known = ", ".join(ENERGY_UNITS)
        raise ObisError(address, raw, f"unit {unit or '(none)'!r} is not an energy unit ({known})")
    try:
        value = Decimal(number.strip())
    except InvalidOperation:
        raise ObisError(address, raw, "value is not a decimal number") from None
    if not value.is_finite():
        raise ObisError(address, raw, "value is not finite")
    return value * factor


def parse_data_block(text: str) -> dict[str, DataSet]:
    """Every known data set of a readout, by register; unknown addresses are skipped.

    Raises ObisError for a known register with an unreadable value: a
    counter we cannot read must not silently disappear from the poll.
    """
    found: dict[str, DataSet] = {}
    for address, raw in _DATA_SET.findall(text):
        entry = OBIS.get(normalise(address))
        if entry is None:
            continue
        if entry.kind == "energy":
            value: Decimal | str = energy_kwh(entry.register, raw)
        else:
            value = raw.strip()
        found.setdefault(entry.register, DataSet(entry.register, entry.kind, value, entry.unit))
    return found
