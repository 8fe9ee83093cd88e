"""Migration 012 on a database with data: intervals move into reading and interval_segment.

A database is migrated to 011, given readings and old-style interval_usage rows
by hand (one interval of one segment, one cut in two at a zone border, one
suspect), and then migrated to the end. interval_usage, now a view, must give
back exactly the old rows. The builders here are shared with the TimescaleDB
upgrade test in test_timescale.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from amr.storage import migrate, timeseries

BEFORE = 11  # the last migration with interval_usage as a table
REG = "1.8.0"


def migrate_upto(conn: psycopg.Connection, version: int, *, timescale: bool) -> list[int]:
    """migrate.migrate as if the code shipped only the migrations up to `version`."""
    shipped = migrate.available()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(migrate, "available", lambda: [m for m in shipped if m.version <= version])
        return [m.version for m in migrate.migrate(conn, timescale=timescale)]


def old_day() -> date:
    """About five months back: outside the partitions `maintain` makes, inside retention."""
    return (datetime.now(UTC) - timedelta(days=150)).date()


def _at(d: date, hh: int, mm: int) -> datetime:
    return datetime(d.year, d.month, d.day, hh, mm, tzinfo=UTC)


def scenario(d: date) -> tuple[list[tuple], list[tuple]]:
    """Readings (meter_id, register, ts, value) and old interval_usage rows on day `d`.

    Europe/Moscow is UTC+3, so local 07:00 (night -> peak) is 04:00 UTC.
    """
    r0, r1, r2, r3 = _at(d, 3, 20), _at(d, 3, 50), _at(d, 4, 20), _at(d, 4, 50)
    readings = [
        ("m012", REG, r0, Decimal("100")),      # first of its series: ends no interval
        ("m012", REG, r1, Decimal("101.25")),
        ("m012", REG, r2, Decimal("102.25")),
        ("m012", REG, r3, Decimal("110.25")),
        ("m012", "2.8.0", r2, Decimal("7")),    # same meter and time, another register
        ("m012-b", REG, r2, Decimal("55")),     # another meter at the same time
    ]
    cols = ("meter_id", "register", "start_ts", "end_ts", "seg_start", "seg_end", "day", "zone",
            "kwh", "estimated", "kind", "status")
    intervals = [
        # one segment
        ("m012", REG, r0, r1, r0, r1, d, "night", Decimal("1.25"), False, "normal", "ok"),
        # cut in two at the night/peak border
        ("m012", REG, r1, r2, r1, _at(d, 4, 0), d, "night", Decimal("0.333333"), True, "normal", "ok"),
        ("m012", REG, r1, r2, _at(d, 4, 0), r2, d, "peak", Decimal("0.666667"), True, "normal", "ok"),
        # a suspect jump, kept apart until someone decides
        ("m012", REG, r2, r3, r2, r3, d, "peak", Decimal("8"), True, "reset", "suspect"),
    ]
    assert all(len(i) == len(cols) for i in intervals)
    return readings, intervals


def expected_readings(d: date) -> dict[tuple, tuple]:
    """(meter_id, register, ts) -> (start_ts, kwh, kind, status, estimated, day, zone) after 012."""
    r0, r1, r2, r3 = _at(d, 3, 20), _at(d, 3, 50), _at(d, 4, 20), _at(d, 4, 50)
    none = (None,) * 7
    return {
        ("m012", REG, r0): none,
        ("m012", REG, r1): (r0, Decimal("1.25"), "normal", "ok", False, d, "night"),
        ("m012", REG, r2): (r1, Decimal("1.000000"), "normal", "ok", True, None, None),
        ("m012", REG, r3): (r2, Decimal("8"), "reset", "suspect", True, d, "peak"),
        ("m012", "2.8.0", r2): none,
        ("m012-b", REG, r2): none,
    }


def seed_before_012(conn: psycopg.Connection, d: date) -> None:
    """Store the scenario the way code before 012 did (native partitions made as ingest would)."""
    readings, intervals = scenario(d)
    with conn.transaction():
        timeseries.Partitions().ensure(conn, _at(d, 0, 0), _at(d, 0, 0))  # no-op on TimescaleDB
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO reading (meter_id, register, ts, value) VALUES (%s, %s, %s, %s)",
                            readings)
            cur.executemany("INSERT INTO interval_usage (meter_id, register, start_ts, end_ts, seg_start,"
                            " seg_end, day, zone, kwh, estimated, kind, status)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", intervals)


INTERVAL_ROWS = "SELECT * FROM interval_usage ORDER BY meter_id, register, seg_start"
INTERVAL_COLUMNS = ("SELECT column_name::text, data_type::text FROM information_schema.columns"
                    " WHERE table_schema = 'public' AND table_name = 'interval_usage'"
                    " ORDER BY ordinal_position")
NEW_READING_COLUMNS = ("SELECT meter_id, register, ts, start_ts, kwh, kind, status, estimated, day, zone"
                       " FROM reading WHERE meter_id LIKE 'm012%'")
SEGMENTS = ("SELECT meter_id, register, end_ts, seg_start, seg_end, day, zone, kwh"
            " FROM interval_segment ORDER BY seg_start")


def expected_segments(d: date) -> list[tuple]:
    _, intervals = scenario(d)
    return [(m, r, e, s0, s1, dd, z, k) for m, r, _s, e, s0, s1, dd, z, k, *_ in intervals[1:3]]


def reading_state(conn: psycopg.Connection) -> dict[tuple, tuple]:
    return {tuple(r[:3]): tuple(r[3:]) for r in conn.execute(NEW_READING_COLUMNS).fetchall()}


@dataclass
class Upgraded:
    conn: psycopg.Connection
    day: date
    rows_before: list[tuple]  # interval_usage, the table, before 012
    columns_before: list[tuple]
    applied: list[int]


@pytest.fixture
def upgraded(empty_conn: psycopg.Connection) -> Upgraded:
    conn = empty_conn
    assert migrate_upto(conn, BEFORE, timescale=False)[-1] == BEFORE
    d = old_day()
    seed_before_012(conn, d)
    rows = conn.execute(INTERVAL_ROWS).fetchall()
    columns = conn.execute(INTERVAL_COLUMNS).fetchall()
    assert len(rows) == 4
    conn.commit()
    applied = [m.version for m in migrate.migrate(conn, timescale=False)]
    conn.commit()
    return Upgraded(conn, d, rows, columns, applied)


def test_applies_the_rest(upgraded: Upgraded) -> None:
    rest = [m.version for m in migrate.available() if m.version > BEFORE]
    assert 12 in rest and upgraded.applied == rest
    assert migrate.current_version(upgraded.conn) == migrate.available()[-1].version


def test_interval_usage_is_a_view_giving_back_exactly_the_old_rows(upgraded: Upgraded) -> None:
    conn = upgraded.conn
    assert conn.execute("SELECT relkind FROM pg_class WHERE relname = 'interval_usage'"
                        ).fetchall() == [("v",)]
    assert conn.execute(INTERVAL_COLUMNS).fetchall() == upgraded.columns_before
    assert conn.execute(INTERVAL_ROWS).fetchall() == upgraded.rows_before


def test_readings_carry_their_interval(upgraded: Upgraded) -> None:
    assert reading_state(upgraded.conn) == expected_readings(upgraded.day)


def test_interval_segment_holds_the_parts_of_the_split_interval_only(upgraded: Upgraded) -> None:
    conn = upgraded.conn
    assert conn.execute(SEGMENTS).fetchall() == expected_segments(upgraded.day)
    # a native partition was made for the old month, named as Partitions names them
    month = f"interval_segment_p{upgraded.day:%Y%m}"
    assert conn.execute("SELECT count(*) FROM ONLY interval_segment").fetchone() == (0,)
    assert conn.execute("SELECT tableoid::regclass::text FROM interval_segment").fetchall() == [
        (month,), (month,)]


def test_time_tables_are_reading_and_interval_segment(upgraded: Upgraded) -> None:
    conn = upgraded.conn
    assert conn.execute("SELECT name, column_name, hypertable FROM amr_time_table ORDER BY name"
                        ).fetchall() == [("interval_segment", "end_ts", False), ("reading_data", "ts", False)]
    assert conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'interval\\_usage%'"
                        ).fetchall() == [("interval_usage",)]


def test_maintain_and_partitions_leave_interval_usage_alone(upgraded: Upgraded) -> None:
    conn = upgraded.conn
    parts = timeseries.Partitions()
    with conn.transaction():
        parts.ensure(conn, datetime.now(UTC) - timedelta(days=400), datetime.now(UTC) + timedelta(days=400))
    assert parts._tables == ["interval_segment", "reading_data"]  # reading is a view over reading_data since 023
    assert {t for t, _ in parts._known} == {"interval_segment", "reading_data"}
    later = datetime.now(UTC) + timedelta(days=365 * 5 + 200)  # the seeded month is past retention
    dropped = [d.part for d in migrate.maintain(conn, now=later, retention_months=60).dropped]
    assert f"interval_segment_p{upgraded.day:%Y%m}" in dropped
    assert f"reading_data_p{upgraded.day:%Y%m}" in dropped
    assert not [n for n in dropped if n.startswith("interval_usage")]
    conn.commit()
    assert conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'interval\\_usage%'"
                        ).fetchall() == [("interval_usage",)]


@pytest.mark.parametrize("column, value", [("kwh", -1), ("kind", "weird"), ("status", "pending")])
def test_reading_refuses_bad_interval_values(upgraded: Upgraded, column: str, value: object) -> None:
    conn = upgraded.conn
    with pytest.raises(psycopg.errors.CheckViolation, match=f"reading_{column}_check"):
        conn.execute(f"UPDATE reading SET {column} = %s WHERE meter_id = 'm012' AND ts = %s",
                     (value, _at(upgraded.day, 4, 50)))
    conn.rollback()
    # NULL is allowed: a reading that ends no interval
    conn.execute(f"UPDATE reading SET {column} = NULL WHERE meter_id = 'm012' AND ts = %s",
                 (_at(upgraded.day, 4, 50),))
    conn.rollback()


def test_a_database_with_no_intervals_upgrades_too(empty_conn: psycopg.Connection) -> None:
    conn = empty_conn
    migrate_upto(conn, BEFORE, timescale=False)
    assert [m.version for m in migrate.migrate(conn, timescale=False)] == [
        m.version for m in migrate.available() if m.version > BEFORE]
    assert conn.execute("SELECT count(*) FROM interval_usage").fetchone() == (0,)
