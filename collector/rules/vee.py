"""Validation (VEE): the one place where a reading is accepted or refused.

Every adapter, decoder and file import hands readings to ingestion, and
ingestion asks this module. A refusal is a (code, reason) pair: the code is a
short fixed word for metrics, the reason names the meter, the field and what is
wrong, for the person reading `rejected_reading`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from adapters.reading import Reading, Refusal, check_value

OBIS_REGISTER = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}$")
# the register whose energy is billed and kept in daily_zone_usage
BILLED_REGISTER = "1.8.0"


@dataclass(frozen=True, slots=True)
class MeterRules:
    """What validation and interval derivation need to know of a meter."""

    meter_id: str
    multiplier: Decimal = Decimal(1)
    rollover: Decimal = Decimal(1_000_000)
    max_power_kw: Decimal = Decimal(30)
    interval: timedelta = timedelta(minutes=30)
    installed: datetime | None = None
    removed: datetime | None = None
    # the registers configured for the meter; None: any OBIS register (see configured_registers)
    registers: frozenset[str] | None = None
    # readings further apart than this are a gap (1.5 intervals); kept, not recomputed
    gap_s: float = field(init=False, repr=False, compare=False)
    # max_energy_kwh by interval length: a meter's intervals take a handful of lengths
    _limits: dict[float, Decimal] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gap_s", self.interval.total_seconds() * 1.5)
        object.__setattr__(self, "_limits", {})

    def max_energy_kwh(self, seconds: float) -> Decimal:
        """The most energy this meter can pass in `seconds` (see max_energy_kwh), per reading."""
        limit = self._limits.get(seconds)
        if limit is None:
            if len(self._limits) >= 256:
                self._limits.clear()
            limit = self._limits[seconds] = max_energy_kwh(self.max_power_kw, self.multiplier, seconds)
        return limit


# Adapters whose meter says itself which registers it sends: an MQTT device's payload
# format maps its fields to registers (a Shelly Pro 3EM publishes 1.8.0 and 2.8.0),
# so the inventory's `registers` (a polling list, defaulting to 1.8.0) is not its list.
_SELF_DESCRIBING_ADAPTERS = frozenset({"mqtt"})


def configured_registers(adapter: str | None, config: object) -> frozenset[str] | None:
    """The registers a meter may send readings for, from its meter row; None: any OBIS register.

    The list is the inventory's `registers` key (kept in meter.config). A meter
    without one (a row not written from an inventory, config '{}') and an MQTT
    device (whose payload format, not the polling list, decides what it
    publishes) have no list: every register that is an OBIS code is taken.
    """
    if adapter in _SELF_DESCRIBING_ADAPTERS or not isinstance(config, dict):
        return None
    regs = config.get("registers")
    if not isinstance(regs, list | tuple) or not regs:
        return None
    return frozenset(r for r in regs if isinstance(r, str))


def register_refusal(meter_id: str, register: str, registers: frozenset[str] | None) -> Refusal | None:
    """The one rule for a register: refused unless configured for its meter (when it has a list).

    Every entry point (file import, MQTT, the gateway, the API's POST readings)
    goes through `check`, which applies this; the API calls it before its own
    checks so that its answer carries the same code and reason.
    """
    if registers is None or register in registers:
        return None
    return Refusal(
        "unknown_register",
        f"meter {meter_id!r}: register {register!r} is not configured for this meter "
        f"(its registers: {', '.join(sorted(registers))}); add it to the meter's 'registers' "
        "in the inventory and run amr inventory load, or correct the reading",
    )


def plausible_id(meter_id: object) -> bool:
    """Text that can name a meter: printable, at most 64 characters."""
    return isinstance(meter_id, str) and 0 < len(meter_id) <= 64 and meter_id.isprintable()


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """The instants a reading may carry, besides its meter's own dates.

    `earliest` is the later of the zone calendar's first instant (energy before
    it has no zones) and now minus AMR_MAX_READING_AGE_YEARS (a 1970 or year-0001
    date is a device without a clock, not a back-fill); `watermark` the
    retention watermark, below which readings were deleted and are refused so
    that their energy is never counted twice. A reading outside is refused
    alone, before any partition is made or any calendar consulted.
    """

    earliest: datetime
    watermark: datetime | None = None
    # the later of the two, compared once per reading
    lowest: datetime = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lowest = self.earliest if self.watermark is None else max(self.earliest, self.watermark)
        object.__setattr__(self, "lowest", lowest)

    @classmethod
    def build(cls, calendar_start: datetime, now: datetime, max_age_years: int,
              watermark: datetime | None = None) -> TimeWindow:
        try:
            by_age = now.replace(year=now.year - max_age_years)
        except ValueError:  # 29 February
            by_age = now.replace(year=now.year - max_age_years, day=28)
        return cls(max(calendar_start, by_age), watermark)

    def refusal(self, r: Reading, ts: datetime) -> Refusal:
        """Why a reading before `lowest` is refused (called only for those)."""
        if self.watermark is not None and ts < self.watermark:
            return Refusal(
                "beyond_retention",
                f"{_who(r)}: ts {_iso(ts)} is before the retention watermark "
                f"{self.watermark.isoformat()}: readings of that period were deleted by the retention "
                "policy (amr db maintain) and are not accepted again, so their energy is not counted twice",
            )
        return Refusal(
            "implausible_ts",
            f"{_who(r)}: ts {_iso(ts)} is before {self.earliest.isoformat()}, the earliest plausible "
            "instant (the zone calendar's start, or AMR_MAX_READING_AGE_YEARS ago); a date like this "
            "usually comes from a device whose clock was never set",
        )


def _iso(ts: datetime) -> str:
    try:
        return ts.isoformat()
    except (OverflowError, ValueError):
        return repr(ts)


def check(r: Reading, meter: MeterRules | None, now: datetime, future_tolerance: timedelta,
          window: TimeWindow | None = None) -> Refusal | None:
    """Refuse a reading that must not be stored; None when it may be.

    Runs once per reading on the ingestion path, so the passing case is a few
    comparisons; the reasons are composed only for a refusal.
    """
    if meter is None:
        if not plausible_id(r.meter_id):
            return Refusal("bad_meter_id", f"meter_id {r.meter_id!r} is not printable text of 1 to 64 characters")
        return Refusal("unknown_meter", f"meter_id {r.meter_id!r}: no such meter in the inventory")
    register = r.register
    if register not in _GOOD_REGISTERS:
        if not isinstance(register, str) or not OBIS_REGISTER.match(register):
            return Refusal("bad_register", f"meter {r.meter_id!r}: register {register!r} is not an OBIS code like 1.8.0")
        if len(_GOOD_REGISTERS) < 4096:
            _GOOD_REGISTERS.add(register)
    if meter.registers is not None and register not in meter.registers:
        refusal = register_refusal(r.meter_id, register, meter.registers)
        assert refusal is not None
        return refusal
    value = r.value
    if type(value) is not Decimal or not value.is_finite() or value < _ZERO:
        refusal = check_value(value, _who(r))
        if refusal is not None:
            return refusal
    if value >= meter.rollover:
        return Refusal(
            "above_rollover", f"{_who(r)}: value {value} is not below the register's rollover {meter.rollover}"
        )
    ts = r.ts
    if not isinstance(ts, datetime):
        return Refusal("bad_ts", f"{_who(r)}: ts {ts!r} is not a timestamp")
    tz = ts.tzinfo
    if tz is None or (tz is not UTC and ts.utcoffset() is None):
        return Refusal("naive_ts", f"{_who(r)}: ts {ts.isoformat()} has no UTC offset")
    if ts > now + future_tolerance:
        return Refusal(
            "future_ts",
            f"{_who(r)}: ts {ts.isoformat()} is in the future (now {now.isoformat(timespec='seconds')}, "
            f"tolerance {int(future_tolerance.total_seconds())} s)",
        )
    if window is not None and ts < window.lowest:
        return window.refusal(r, ts)
    if meter.installed is not None and ts < meter.installed:
        return Refusal(
            "before_installation",
            f"{_who(r)}: ts {ts.isoformat()} is before the meter was installed ({meter.installed.isoformat()})",
        )
    if meter.removed is not None and ts > meter.removed:
        return Refusal(
            "after_removal",
            f"{_who(r)}: ts {ts.isoformat()} is after the meter was removed ({meter.removed.isoformat()})",
        )
    return None


_ZERO = Decimal(0)
# registers already seen to be OBIS codes: a fleet reads a handful
_GOOD_REGISTERS: set[str] = set()


def _who(r: Reading) -> str:
    return f"meter {r.meter_id!r} register {r.register!r}"


def max_energy_kwh(max_power_kw: Decimal, multiplier: Decimal, seconds: float) -> Decimal:
    """The most energy a meter can pass in that time, with slack for register resolution.

    Asked per reading through MeterRules.max_energy_kwh, which keeps the answers.
    """
    limit = max_power_kw * Decimal(repr(seconds)) / Decimal(3600)
    return limit * Decimal("1.05") + Decimal("0.01") * multiplier
