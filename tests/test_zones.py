"""Zone splitting: worked cases at every border, in local time (Europe/Moscow)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from collector.rules.zones import ZoneCalendar, default_calendar

MSK = ZoneInfo("Europe/Moscow")


def local(*args: int) -> datetime:
    return datetime(*args, tzinfo=MSK)


@pytest.mark.parametrize(
    ("start", "minutes", "expected"),
    [
        # half-open borders: 06:30-07:00 is night, 07:00-07:30 peak
        (local(2026, 10, 5, 6, 30), 30, [("night", "2026-10-05", "1")]),
        (local(2026, 10, 5, 7, 0), 30, [("peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 9, 30), 30, [("peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 10, 0), 30, [("half_peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 16, 30), 30, [("half_peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 17, 0), 30, [("peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 20, 30), 30, [("peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 21, 0), 30, [("half_peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 22, 30), 30, [("half_peak", "2026-10-05", "1")]),
        (local(2026, 10, 5, 23, 0), 30, [("night", "2026-10-05", "1")]),
        # crossing a border: split in proportion to time
        (local(2026, 10, 5, 6, 45), 30, [("night", "2026-10-05", "0.5"), ("peak", "2026-10-05", "0.5")]),
        (local(2026, 10, 5, 9, 0), 120, [("peak", "2026-10-05", "0.5"), ("half_peak", "2026-10-05", "0.5")]),
        (local(2026, 10, 5, 16, 0), 240,
         [("half_peak", "2026-10-05", "0.25"), ("peak", "2026-10-05", "0.75")]),
        (local(2026, 10, 5, 20, 0), 240,
         [("peak", "2026-10-05", "0.25"), ("half_peak", "2026-10-05", "0.5"),
          ("night", "2026-10-05", "0.25")]),
        # thirds do not divide exactly: the remainder goes to the longest part
        (local(2026, 10, 5, 22, 0), 90, [("half_peak", "2026-10-05", "0.666667"),
                                         ("night", "2026-10-05", "0.333333")]),
        # midnight: same zone, two local days
        (local(2026, 10, 5, 23, 30), 60, [("night", "2026-10-05", "0.5"), ("night", "2026-10-06", "0.5")]),
        # a month boundary in local time (which is 21:00 UTC the day before)
        (local(2026, 10, 31, 23, 45), 30, [("night", "2026-10-31", "0.5"), ("night", "2026-11-01", "0.5")]),
    ],
)
def test_split_worked_cases(start: datetime, minutes: int, expected: list[tuple[str, str, str]]) -> None:
    segs = default_calendar().split(start.astimezone(UTC), (start + timedelta(minutes=minutes)).astimezone(UTC),
                                    Decimal(1))
    assert [(s.zone, s.day.isoformat(), s.kwh) for s in segs] == [
        (z, d, Decimal(k)) for z, d, k in expected
    ]
    assert sum(s.kwh for s in segs) == Decimal(1)


def test_month_boundary_is_local_not_utc() -> None:
    # 2026-11-01 00:10 MSK is still 31 October in UTC: the day must be 1 November
    start = local(2026, 11, 1, 0, 0).astimezone(UTC)
    (seg,) = default_calendar().split(start, start + timedelta(minutes=30), Decimal("2.5"))
    assert seg.day.isoformat() == "2026-11-01" and seg.zone == "night"
    assert start.date().isoformat() == "2026-10-31"


def test_utc_plus_four_era_uses_the_offset_of_its_time() -> None:
    # from 2011-03-27 to 2014-10-26 Moscow was UTC+4: 03:00 UTC was 07:00 local, peak
    ts = datetime(2013, 6, 1, 3, 0, tzinfo=UTC)
    assert default_calendar().zone_at(ts) == "peak"
    assert default_calendar().zone_at(datetime(2015, 6, 1, 3, 0, tzinfo=UTC)) == "night"


CHANGED = """
timezone = "Europe/Moscow"
[[version]]
from = "2026-01-01"
zones = [{start="00:00", zone="night"}, {start="07:00", zone="peak"}, {start="10:00", zone="half_peak"},
         {start="17:00", zone="peak"}, {start="21:00", zone="half_peak"}, {start="23:00", zone="night"}]
[[version]]
from = "2026-07-01"
zones = [{start="00:00", zone="night"}, {start="06:00", zone="peak"}, {start="09:00", zone="half_peak"},
         {start="17:00", zone="peak"}, {start="20:00", zone="half_peak"}, {start="22:00", zone="night"}]
"""


def test_calendar_change_mid_year() -> None:
    cal = ZoneCalendar.from_toml(CHANGED)
    at = lambda *a: local(*a).astimezone(UTC)  # noqa: E731
    assert cal.zone_at(at(2026, 6, 30, 6, 30)) == "night"
    assert cal.zone_at(at(2026, 7, 1, 6, 30)) == "peak"
    assert cal.zone_at(at(2026, 6, 30, 22, 30)) == "half_peak"
    assert cal.zone_at(at(2026, 7, 1, 22, 30)) == "night"
    # an interval across the change: 30 June 21:30 .. 1 July 06:30
    segs = cal.split(at(2026, 6, 30, 21, 30), at(2026, 7, 1, 6, 30), Decimal(9))
    assert [(s.day.isoformat(), s.zone, s.kwh) for s in segs] == [
        ("2026-06-30", "half_peak", Decimal("1.5")),
        ("2026-06-30", "night", Decimal("1")),
        ("2026-07-01", "night", Decimal("6")),
        ("2026-07-01", "peak", Decimal("0.5")),
    ]


def test_bad_calendar_is_refused_with_the_key() -> None:
    with pytest.raises(ValueError, match="unknown zone 'evening'"):
        ZoneCalendar.from_toml('[[version]]\nfrom="2026-01-01"\nzones=[{start="00:00", zone="evening"}]')
    with pytest.raises(ValueError, match="must start at 00:00"):
        ZoneCalendar.from_toml('[[version]]\nfrom="2026-01-01"\nzones=[{start="01:00", zone="night"}]')
