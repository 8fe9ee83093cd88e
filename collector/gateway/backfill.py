"""Back-fill: the half-hours a gateway missed, read back from the meter's own load profile.

When a meter answers again after missed slots (a dead link, a reboot of the
line, a failed bus), the gap between its last reading and the new one would
otherwise hold one interval whose energy is exact but whose placement in time
is estimated (spread evenly over the gap, and across tariff zones). Meters
with a load profile remember the energy of each past slot; read back, it puts
the gap's energy where it was used.

A profile gives interval energy (Wh per slot), not counter values, so the
slots are turned into register values at each slot boundary, anchored to the
reading just taken: cum(t_k) = cum(now) - the sum of the slots from t_k to now.
The values are the meter's own register (before the transformer multiplier,
which the collector applies to every reading alike); a register that wrapped
within the gap is carried back over its rollover. The chain walks back from the
anchor only over consecutive valid slots: a slot the meter marks invalid or
does not give breaks it, and what lies before the break keeps its estimated
placement (counted, never invented).

A long outage is read in bounded steps: at most `limit` slots per meter per
cycle, newest first; the oldest value derived becomes the next cycle's anchor,
so no slot is read twice and the bus is never held long by one meter.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from adapters import quality
from adapters.base import ProfileSlot
from adapters.reading import Reading

log = logging.getLogger("amr.scheduler")

_KWH_PER_WH = Decimal("0.001")


@dataclass
class Gap:
    """Missed slots of one meter still to read back: those starting after `after` (stored)
    and before each register's anchor.

    anchors holds, per register, the instant and value known exactly: the
    reading that ended the gap, then the oldest value derived so far.
    """

    after: datetime
    anchors: dict[str, tuple[datetime, Decimal]]
    attempts: int = 0
    filled: int = 0
    invalid: int = 0

    @property
    def done(self) -> bool:
        return not self.anchors

    @property
    def until(self) -> datetime:
        """The newest anchor: the end of what is still to read."""
        return max(ts for ts, _ in self.anchors.values())


def derive(
    gap: Gap, slots: Sequence[ProfileSlot], meter_id: str, source: str, rollover: Decimal
) -> list[Reading]:
    """Readings at the slot starts after `gap.after`, walking back from each register's anchor.

    Consecutive valid slots only. A register is finished (dropped from the
    gap's anchors) when its chain reached `after`, when it met a slot the meter
    marks invalid, a hole in what the meter gave, or a register the profile does
    not hold at all (a tariff register): what is left keeps its estimated
    placement. Otherwise its anchor moves to the oldest value derived, for the
    next cycle.
    """
    out: list[Reading] = []
    flags = frozenset({quality.FROM_PROFILE, quality.METER_CLOCK})
    by_reg: dict[str, dict[datetime, ProfileSlot]] = {}
    for sl in slots:
        by_reg.setdefault(sl.register, {})[sl.end] = sl
    for register, (ts, value) in list(gap.anchors.items()):
        ends = by_reg.get(register)
        if not ends:  # the profile does not hold this register (or gave nothing): leave it
            del gap.anchors[register]
            continue
        t, cum, finished = ts, value, False
        while t > gap.after:
            got = ends.get(t)
            if got is None:  # older slots came but not this one: a hole; none older: the window's edge
                finished = any(end < t for end in ends)
                break
            if got.wh is None:
                gap.invalid += 1
                finished = True
                break
            cum -= Decimal(got.wh) * _KWH_PER_WH
            if cum < 0:  # the register wrapped at its rollover within the gap
                cum += rollover
            t = got.start
            if t > gap.after:
                out.append(Reading(meter_id, register, t, cum, flags, source))
                gap.filled += 1
        if finished or t <= gap.after:
            del gap.anchors[register]
        else:
            gap.anchors[register] = (t, cum)
    return out


class BackfillStore:
    """Where a gateway keeps, across restarts, each meter's last reading on the slot grid and
    the gaps still to read back: a reboot of the gateway is an outage like any other.

    A small JSON file, replaced whole (written beside, then renamed), so a crash
    mid-write leaves the old one. A file that cannot be read is logged and
    ignored: back-fill is an improvement, never a reason not to poll.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, tuple[datetime | None, list[Gap]]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("back-fill state %s is unreadable (%s): starting without it", self.path, exc)
            return {}
        out: dict[str, tuple[datetime | None, list[Gap]]] = {}
        try:
            for mid, entry in data.get("meters", {}).items():
                last = datetime.fromisoformat(entry["last_read"]) if entry.get("last_read") else None
                gaps = [
                    Gap(datetime.fromisoformat(g["after"]),
                        {reg: (datetime.fromisoformat(ts), Decimal(v)) for reg, (ts, v) in g["anchors"].items()},
                        int(g.get("attempts", 0)))
                    for g in entry.get("gaps", [])
                ]
                out[str(mid)] = (last, gaps)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            log.warning("back-fill state %s does not parse (%s): starting without it", self.path, exc)
            return {}
        return out

    def save(self, states: dict[str, tuple[datetime | None, list[Gap]]]) -> None:
        data = {"meters": {
            mid: {"last_read": last.isoformat() if last else None,
                  "gaps": [{"after": g.after.isoformat(), "attempts": g.attempts,
                            "anchors": {reg: [ts.isoformat(), str(v)] for reg, (ts, v) in g.anchors.items()}}
                           for g in gaps]}
            for mid, (last, gaps) in states.items() if last is not None or gaps
        }}
        tmp = self.path.with_name(self.path.name + ".new")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("back-fill state %s not written (%s): a restart would forget open gaps", self.path, exc)
