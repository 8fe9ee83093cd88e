"""One seedable household consumption model behind every simulated meter.

A meter's registers are cumulative, so the model answers "what does the
counter show at instant t" exactly and deterministically for any t: the same
seed and instant give the same value in every simulator and every test, and a
test can compute what a poller should have read.

The load is a household day (low at night, a morning and an evening peak),
scaled by season and by a per-day random factor, constant within 15-minute
slots. Tariff registers T1..T3 count the same energy split by the meter's own
zone table (T1 = peak, T2 = night, T3 = half-peak by default).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Protocol
from zoneinfo import ZoneInfo

SLOT = timedelta(minutes=15)
SLOTS_PER_DAY = 96
EPOCH = date(2024, 1, 1)  # the counters start here (at start_kwh)
_MSK = ZoneInfo("Europe/Moscow")

# relative load per local hour: night trough, morning peak at 7-9, evening peak at 18-21
_HOURLY_SHAPE = (
    0.35, 0.30, 0.28, 0.27, 0.28, 0.35, 0.70, 1.30, 1.40, 1.00, 0.80, 0.75,
    0.80, 0.80, 0.75, 0.75, 0.90, 1.30, 1.70, 1.90, 1.80, 1.30, 0.90, 0.55,
)

# the meter's own tariff table: local hour -> tariff register
_DEFAULT_TARIFF_OF_HOUR = tuple(
    "1.8.2" if (h >= 23 or h < 7) else "1.8.1" if (7 <= h < 10 or 17 <= h < 21) else "1.8.3"
    for h in range(24)
)


@dataclass
class ConsumptionModel:
    """Cumulative registers of one simulated meter.

    mean_kw is the yearly mean load; start_kwh is the counter value on 2024-01-01
    (a counter that has run for years). resolution is the register's step.
    """

    seed: int
    mean_kw: float = 0.4
    start_kwh: Decimal = Decimal("1000")
    resolution: Decimal = Decimal("0.01")
    tariff_of_hour: tuple[str, ...] = _DEFAULT_TARIFF_OF_HOUR
    _days: dict[int, tuple[float, ...]] = field(default_factory=dict, repr=False)
    _cum: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)

    def _day_slots(self, n: int) -> tuple[float, ...]:
        """kWh of each 15-minute slot of local day number n since EPOCH."""
        got = self._days.get(n)
        if got is None:
            d = EPOCH + timedelta(days=n)
            season = 1.0 + 0.35 * math.cos(2 * math.pi * (d.timetuple().tm_yday - 15) / 365.25)
            rng = random.Random(self.seed * 1_000_003 + n)
            day_factor = 0.75 + 0.5 * rng.random()
            scale = self.mean_kw * season * day_factor / (sum(_HOURLY_SHAPE) / 24)
            got = tuple(
                _HOURLY_SHAPE[s // 4] * scale * (0.8 + 0.4 * rng.random()) * 0.25
                for s in range(SLOTS_PER_DAY)
            )
            self._days[n] = got
        return got

    def _cumulative_before_day(self, n: int) -> dict[str, float]:
        """Energy of every register from EPOCH to the start of local day n."""
        if n in self._cum:
            return self._cum[n]
        known = [k for k in self._cum if k < n]
        k = max(known) if known else 0
        acc = dict(self._cum.get(k, {"1.8.0": 0.0, "1.8.1": 0.0, "1.8.2": 0.0, "1.8.3": 0.0}))
        while k < n:
            for s, e in enumerate(self._day_slots(k)):
                acc["1.8.0"] += e
                acc[self.tariff_of_hour[s // 4]] += e
            k += 1
            if k % 30 == 0 or k == n:
                self._cum[k] = dict(acc)
        return acc

    def energy_kwh(self, t: datetime, register: str = "1.8.0") -> Decimal:
        """The counter at instant t, truncated to the register's resolution."""
        if t.tzinfo is None:
            raise ValueError("t must be timezone-aware")
        local = t.astimezone(_MSK)
        n = (local.date() - EPOCH).days
        if n < 0:
            raise ValueError(f"the simulated counters start on {EPOCH}; asked for {t}")
        acc = dict(self._cumulative_before_day(n))
        slots = self._day_slots(n)
        seconds = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        whole, frac = divmod(seconds, SLOT.total_seconds())
        for s in range(int(whole)):
            acc["1.8.0"] += slots[s]
            acc[self.tariff_of_hour[s // 4]] += slots[s]
        if int(whole) < SLOTS_PER_DAY:
            part = slots[int(whole)] * frac / SLOT.total_seconds()
            acc["1.8.0"] += part
            acc[self.tariff_of_hour[int(whole) // 4]] += part
        if register == "2.8.0":
            return Decimal(0)
        if register not in acc:
            raise KeyError(f"the consumption model has no register {register!r}")
        base = self.start_kwh if register == "1.8.0" else Decimal(0)
        value = base + Decimal(repr(acc[register]))
        return value.quantize(self.resolution, rounding=ROUND_DOWN)

    def power_kw(self, t: datetime) -> float:
        """Instantaneous active power at t (constant within a 15-minute slot)."""
        local = t.astimezone(_MSK)
        n = (local.date() - EPOCH).days
        s = (local.hour * 60 + local.minute) // 15
        return self._day_slots(n)[s] * 4


class Clock(Protocol):
    """What a simulated meter asks of time: the instant it is now (a SimClock, or the
    demo's clock that moves one slot at a time)."""

    def now(self) -> datetime: ...


@dataclass
class SimClock:
    """Simulated time that can run faster than the wall clock.

    scale=1440 passes a day in a minute and a 30-day month in 30 minutes;
    scale=43200 passes a month in a minute.
    """

    start: datetime
    scale: float = 1.0
    _wall0: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("SimClock start must be timezone-aware")

    def now(self) -> datetime:
        return (self.start + timedelta(seconds=(time.monotonic() - self._wall0) * self.scale)).astimezone(UTC)

    def wall_seconds(self, simulated: timedelta) -> float:
        """How long the wall clock waits for this much simulated time."""
        return simulated.total_seconds() / self.scale
