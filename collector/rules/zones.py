"""The zone calendar and the one place where energy is split into zones.

The calendar is data with effective dates (collector/rules/calendars/*.toml), so a
new order or another region is a file, not a code change. Splitting cuts an
interval at every zone border and local midnight and shares its energy in
proportion to time; the parts always sum exactly to the whole.
"""

from __future__ import annotations

import bisect
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_DOWN, Decimal
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

from collector.rules.vocabulary import STORED_ZONES

ZONES = STORED_ZONES  # the zones a calendar may name (collector.rules.vocabulary)
# kWh are kept to the milliwatt-hour: finer than any meter register
KWH_QUANTUM = Decimal("0.000001")


@dataclass(frozen=True)
class Segment:
    """A piece of an interval within one local day and one zone."""

    start: datetime  # UTC
    end: datetime  # UTC
    day: date  # local calendar date
    zone: str
    kwh: Decimal


@dataclass(frozen=True)
class CalendarVersion:
    valid_from: date
    starts: tuple[time, ...]  # sorted local start times, the first is 00:00
    zones: tuple[str, ...]


class ZoneCalendar:
    """Which zone each local instant belongs to, by effective-dated versions."""

    def __init__(self, tz: str, versions: list[CalendarVersion]):
        if not versions:
            raise ValueError("a zone calendar needs at least one version")
        self.tz = ZoneInfo(tz)
        self.tz_name = tz
        self.versions = sorted(versions, key=lambda v: v.valid_from)
        self._from = [v.valid_from for v in self.versions]
        self._day_cache: dict[date, list[tuple[datetime, datetime, str]]] = {}
        # many meters read at the same instants: cut each interval once
        self._cut_cache: dict[tuple[datetime, datetime], list[tuple[datetime, datetime, date, str]]] = {}

    @classmethod
    def from_toml(cls, text: str, source: str = "<calendar>") -> ZoneCalendar:
        data = tomllib.loads(text)
        versions = []
        for i, v in enumerate(data.get("version", [])):
            where = f"{source}: version[{i}]"
            try:
                valid_from = date.fromisoformat(str(v["from"]))
                pairs = sorted((time.fromisoformat(z["start"]), z["zone"]) for z in v["zones"])
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{where}: {exc}") from None
            if not pairs or pairs[0][0] != time(0, 0):
                raise ValueError(f"{where}: key 'zones': the first zone must start at 00:00")
            for t, z in pairs:
                if z not in ZONES:
                    raise ValueError(f"{where}: key 'zones': unknown zone {z!r} (known: {ZONES})")
                if t.second or t.microsecond:
                    raise ValueError(f"{where}: key 'zones': start {t} is not on a minute")
            versions.append(
                CalendarVersion(valid_from, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
            )
        return cls(data.get("timezone", "Europe/Moscow"), versions)

    @classmethod
    def load(cls, path: Path | str | None = None) -> ZoneCalendar:
        """The calendar at path, or the St. Petersburg default shipped with the code."""
        if path is None:
            text = resources.files("collector.rules.calendars").joinpath("spb.toml").read_text("utf-8")
            return cls.from_toml(text, "spb.toml")
        return cls.from_toml(Path(path).read_text("utf-8"), str(path))

    @property
    def starts_at(self) -> datetime:
        """The first instant (UTC) the calendar has zones for: energy before it cannot be split."""
        return datetime.combine(self.versions[0].valid_from, time(0), self.tz).astimezone(UTC)

    def version_for(self, day: date) -> CalendarVersion:
        i = bisect.bisect_right(self._from, day) - 1
        if i < 0:
            raise ValueError(f"the zone calendar starts on {self._from[0]}, nothing for {day}")
        return self.versions[i]

    def day_spans(self, day: date) -> list[tuple[datetime, datetime, str]]:
        """The local day cut into zone spans, as UTC instants."""
        spans = self._day_cache.get(day)
        if spans is None:
            v = self.version_for(day)
            borders = [datetime.combine(day, t, self.tz) for t in v.starts]
            borders.append(datetime.combine(day + timedelta(days=1), time(0), self.tz))
            utc = [b.astimezone(UTC) for b in borders]
            spans = []
            for i, zone in enumerate(v.zones):
                if spans and spans[-1][2] == zone:  # merge equal neighbours
                    spans[-1] = (spans[-1][0], utc[i + 1], zone)
                else:
                    spans.append((utc[i], utc[i + 1], zone))
            if len(self._day_cache) > 4096:
                self._day_cache.clear()
            self._day_cache[day] = spans
        return spans

    def zone_at(self, ts: datetime) -> str:
        day = ts.astimezone(self.tz).date()
        for start, end, zone in self.day_spans(day):
            if start <= ts < end:
                return zone
        raise AssertionError("unreachable: day spans cover the day")

    def cut(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime, date, str]]:
        """[start, end) cut at zone borders and local midnights."""
        key = (start, end)
        got = self._cut_cache.get(key)
        if got is None:
            if len(self._cut_cache) > 65536:
                self._cut_cache.clear()
            got = self._cut_cache[key] = self._cut(start, end)
        return got

    def _cut(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime, date, str]]:
        out: list[tuple[datetime, datetime, date, str]] = []
        day = start.astimezone(self.tz).date()
        while True:
            for s, e, zone in self.day_spans(day):
                lo, hi = max(s, start), min(e, end)
                if lo < hi:
                    out.append((lo, hi, day, zone))
            if self.day_spans(day)[-1][1] >= end:
                return out
            day += timedelta(days=1)

    def split(self, start: datetime, end: datetime, kwh: Decimal) -> list[Segment]:
        """Share kwh over the zones of [start, end) in proportion to time.

        Each part is rounded down to KWH_QUANTUM and the remainder goes to the
        longest part, so the parts sum exactly to kwh.
        """
        if end <= start:
            raise ValueError(f"empty interval {start} .. {end}")
        pieces = self.cut(start, end)
        if len(pieces) == 1:
            s, e, d, z = pieces[0]
            return [Segment(s, e, d, z, kwh)]
        total = (end - start).total_seconds()
        parts = [
            (kwh * Decimal(repr((e - s).total_seconds())) / Decimal(repr(total))).quantize(
                KWH_QUANTUM, rounding=ROUND_DOWN
            )
            for s, e, _, _ in pieces
        ]
        longest = max(range(len(pieces)), key=lambda i: (pieces[i][1] - pieces[i][0], -i))
        parts[longest] += kwh - sum(parts)
        return [Segment(s, e, d, z, p) for (s, e, d, z), p in zip(pieces, parts, strict=True)]


_default: ZoneCalendar | None = None


def default_calendar() -> ZoneCalendar:
    global _default
    if _default is None:
        _default = ZoneCalendar.load()
    return _default
