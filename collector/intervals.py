"""Interval energy from cumulative readings: the one place that turns counters into kWh.

Energy is the difference of two counter values, so a gap loses no energy,
only its placement in time. A backward step is one of three things:
- a glitch: one reading out of line with both neighbours (a spike or a dip);
  it is ignored, and the interval spans over it, without re-basing;
- a rollover: the previous value near the register's maximum, the next near 0;
- a reset or meter replacement: anything else; never negative energy.

Classifying a reading looks only at its two neighbours, so a late reading
changes the classification of its neighbours only, and the ingestion path can
re-derive a short window around it instead of the whole history.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from operator import le

from collector.vee import MeterRules

NEAR = Decimal("0.1")  # "near the maximum": the top and bottom tenth of the register


def glitches(values: Sequence[Decimal]) -> list[bool]:
    """Which readings are glitches, by their raw neighbours.

    A reading is a glitch when dropping it makes its neighbours consistent
    (previous <= next) and it lies outside [previous, next]. The first and
    last readings have only one neighbour and are never judged glitches; the
    caller re-derives them once their other neighbour arrives.
    """
    n = len(values)
    out = [False] * n
    if all(map(le, values, values[1:])):  # counters counting up, the common case: none
        return out
    for i in range(1, n - 1):
        prev, cur, nxt = values[i - 1], values[i], values[i + 1]
        if prev <= nxt and (cur < prev or cur > nxt):
            out[i] = True
    return out


def between(
    a_ts: datetime, a: Decimal, b_ts: datetime, b: Decimal, meter: MeterRules
) -> tuple[Decimal, str, bool, bool]:
    """The interval from one valid reading to the next: (kwh, kind, estimated, suspect).

    kwh has the multiplier applied and is never negative; kind is normal,
    rollover, reset or gap; estimated says its placement (or, for a reset, its
    amount) is estimated; suspect that more passed than the meter's maximum
    power could. A plain tuple: ingestion makes one per reading.
    """
    seconds = (b_ts - a_ts).total_seconds()
    gap = seconds > meter.gap_s
    if b >= a:
        raw, kind, estimated = b - a, ("gap" if gap else "normal"), gap
    elif a >= meter.rollover * (1 - NEAR) and b < meter.rollover * NEAR:
        raw, kind, estimated = meter.rollover - a + b, "rollover", gap
    else:
        # a reset to zero counts what was read since; a replaced counter that did
        # not start near zero would invent energy, so it counts nothing
        plausible = b * meter.multiplier <= meter.max_energy_kwh(seconds)
        raw, kind, estimated = (b if plausible else Decimal(0)), "reset", True
    kwh = raw * meter.multiplier
    return kwh, kind, estimated, kwh > meter.max_energy_kwh(seconds)
