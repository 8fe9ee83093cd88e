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

from collector.rules.vee import MeterRules

NEAR = Decimal("0.1")  # "near the maximum": the top and bottom tenth of the register


def glitches(values: Sequence[Decimal]) -> list[bool]:
    """Which readings are glitches: single readings out of line with their neighbours.

    A backward step between two readings means one of them is wrong. Which one:
    - a **dip**: a reading below its predecessor, when its successor is not
      below that predecessor (prev <= next). It is the one out of line, and its
      predecessor, which agreed with the readings before it, stays. Worked case
      (the one that moved a billed month): 100 (1 Oct), 200 (1 Nov), 195 (15 Nov),
      300 (1 Dec): 195 is the dip; 200 stays, so October keeps its 100 kWh and
      November gets 100;
    - a **spike**: a reading above its successor, when its predecessor is not
      above that successor (prev <= next), unless the successor is itself a dip
      (then the successor is the one out of line, as above). 100, 500, 200, 300:
      500 is the spike, since 200 is no dip (300 < 500);
    - the **last** reading, when it is below its predecessor and not below the
      one before that: a dip pending its successor (100, 200, 195 -> 195). Without
      this, 200 would be judged a spike until 195's successor arrived, and the
      interval it closes (in a month perhaps billed) would move for nothing.
    The first reading is never judged. A step back that no single reading explains
    (a rollover, a reset, a replaced meter) is no glitch: `between` classifies it.

    A reading's class depends on the values from one before it to two after it
    (two before, for the last), so ingestion re-derives a window of that reach.
    """
    n = len(values)
    out = [False] * n
    if all(map(le, values, values[1:])):  # counters counting up, the common case: none
        return out

    def dip(i: int) -> bool:
        """Reading i (interior) is below its predecessor, which its successor is not."""
        return values[i] < values[i - 1] <= values[i + 1]

    def pending_dip(i: int) -> bool:
        """Reading i (the last) is below its predecessor and not below the one before."""
        return i >= 2 and values[i - 2] <= values[i] < values[i - 1]

    for i in range(1, n - 1):
        prev, cur, nxt = values[i - 1], values[i], values[i + 1]
        if cur < prev:
            out[i] = prev <= nxt
        elif cur > nxt and prev <= nxt:
            successor_is_dip = dip(i + 1) if i + 2 < n else pending_dip(i + 1)
            out[i] = not successor_is_dip
    if n >= 3 and pending_dip(n - 1):
        out[n - 1] = True
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
