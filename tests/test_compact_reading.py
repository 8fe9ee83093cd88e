"""Migration 023: `reading` becomes a view over the compact reading_data, keeping every reading.

A database is filled by ingestion with every interval kind (normal, rollover,
reset, gap, a glitch, suspect energy accepted and rejected by a person, an
interval split at a zone border, a reading in the middle of a second, every
quality flag, an import's line in its source), and its readings, interval
parts, decisions and daily totals are written the old way into a database
migrated to 022. Migrating that one to the end must give back every reading
(all its columns), every interval (interval_usage) and every daily total, on
plain PostgreSQL and on TimescaleDB (PGlite, tests/test_timescale.py), where
the old chunks are compressed first, as in production. Ingestion then goes on
from the migrated readings exactly as from the original ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from adapters import quality
from adapters.reading import Reading
from amr.settings import Settings
from amr.storage import migrate
from collector.ingest.ingestor import Ingestor, decide_interval
from collector.ingest.layout import QUALITY_BITS
from tests.helpers import add_meters
from tests.test_migrate_012 import migrate_upto

BEFORE = 22  # the last schema with reading as a table
T0 = datetime(2026, 10, 1, 20, 0, tzinfo=UTC)  # 23:00 in Moscow: the night starts
HALF = timedelta(minutes=30)
OLD_COLUMNS = ("meter_id, register, ts, value, quality, source, start_ts, kwh, kind, status, estimated,"
               " day, zone")
READINGS = f"SELECT {OLD_COLUMNS} FROM reading ORDER BY meter_id, register, ts"
INTERVALS = "SELECT * FROM interval_usage ORDER BY meter_id, register, seg_start"
SEGMENTS = "SELECT * FROM interval_segment ORDER BY meter_id, register, end_ts, seg_start"
DAILY = "SELECT * FROM daily_zone_usage ORDER BY meter_id, day, zone"
DECISIONS = ("SELECT meter_id, register, start_ts, end_ts, decision, decided_by, decided_at, note"
             " FROM interval_decision ORDER BY 1, 2, 3")


def _scenario() -> list[Reading]:
    """One meter's day with every kind of interval, and a second register and meter."""
    src = "mqtt:amr/v1/gw-1/ck-1"
    values = [
        "990", "995", "999.5",  # normal
        "3", "5",               # a rollover at 1000
        "7", "2", "3", "4",     # a reset (7 -> 2, and it stays low)
        "4.5", "600", "5",      # a glitch: a spike alone, ignored
        "5.25",
    ]
    out = [Reading("ck-1", "1.8.0", T0 + i * HALF, Decimal(v), frozenset(), src) for i, v in enumerate(values)]
    t = T0 + len(values) * HALF
    out.append(Reading("ck-1", "1.8.0", t + 5 * HALF, Decimal("6.5"), frozenset(), src))  # a gap: estimated
    t += 5 * HALF
    out.append(Reading("ck-1", "1.8.0", t + HALF, Decimal("206.5"), frozenset(), src))  # suspect: 200 kWh
    out.append(Reading("ck-1", "1.8.0", t + 2 * HALF, Decimal("207"), frozenset(), src))
    out.append(Reading("ck-1", "1.8.0", t + 3 * HALF, Decimal("407"), frozenset(), src))  # suspect again
    # off the half hour, across 07:00 Moscow (04:00 UTC): cut in two parts, in interval_segment
    day2 = (T0 + timedelta(days=2)).replace(hour=3, minute=50)
    out.append(Reading("ck-1", "1.8.0", day2, Decimal("408"), frozenset({quality.METER_CLOCK}), src))
    out.append(Reading("ck-1", "1.8.0", day2 + HALF, Decimal("409.125"), frozenset({quality.RETRIED}), src))
    # in the middle of a second, and every source flag there is
    out.append(Reading("ck-1", "1.8.0", day2 + 2 * HALF + timedelta(microseconds=500_001), Decimal("409.5"),
                       frozenset(quality.SOURCE_FLAGS), "import:day.csv#L12"))
    out += [Reading("ck-1", "2.8.0", T0 + i * HALF, Decimal(i) / 4, frozenset({quality.LATE}), "portal")
            for i in range(4)]
    out += [Reading("ck-2", "1.8.0", T0 + i * HALF, Decimal("12.5") + i, frozenset(), "import:a.csv#L0")
            for i in range(3)]
    return out


def _fill(conn: psycopg.Connection) -> None:
    """Ingest the scenario (in two batches, the second out of order) and decide the suspects."""
    add_meters(conn, "ck-1", "ck-2", rollover=1000, adapter="mqtt")  # an MQTT meter takes any register
    ing = Ingestor(conn, Settings())
    readings = _scenario()
    done = ing.ingest(readings[::2])
    done += ing.ingest(readings[1::2][::-1])
    assert (done.accepted, done.total) == (len(readings), len(readings))
    suspects = conn.execute("SELECT DISTINCT start_ts, end_ts FROM interval_usage WHERE status = 'suspect'"
                            " ORDER BY start_ts").fetchall()
    assert len(suspects) == 2
    decide_interval(conn, "ck-1", "1.8.0", *suspects[0], "accepted", "test")
    decide_interval(conn, "ck-1", "1.8.0", *suspects[1], "rejected", "test", "meter swapped")
    conn.commit()


def _state(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    out = {name: conn.execute(sql).fetchall() for name, sql in
           (("reading", READINGS), ("interval_usage", INTERVALS), ("interval_segment", SEGMENTS),
            ("daily_zone_usage", DAILY), ("interval_decision", DECISIONS))}
    conn.commit()
    return out


def _covers_every_kind(state: dict[str, list[tuple]]) -> None:
    """The scenario holds what it says (so the comparison covers it)."""
    rows = state["reading"]
    assert {r[8] for r in rows} == {None, "normal", "rollover", "reset", "gap"}
    assert {r[9] for r in rows} == {None, "ok", "accepted", "rejected"}
    assert {r[10] for r in rows} == {None, True, False}
    assert any(r[7] is not None and r[12] is None for r in rows)  # cut in parts
    assert state["interval_segment"]
    assert any(quality.GLITCH in r[4] for r in rows) and any(quality.ROLLOVER in r[4] for r in rows)
    assert any(quality.RESET in r[4] for r in rows)
    assert any(set(r[4]) >= quality.SOURCE_FLAGS for r in rows)
    assert any(r[2].microsecond for r in rows) and any(r[5] == "import:day.csv#L12" for r in rows)
    assert {"night", "peak"} <= {r[12] for r in rows}
    assert any(r[11] is not None and r[11] != r[2].date() for r in rows)  # a local day not the UTC one


def _write_old(conn: psycopg.Connection, state: dict[str, list[tuple]]) -> None:
    """The state as the schema before 023 held it (reading a table), by plain INSERTs."""
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO reading ({OLD_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})",
                        state["reading"])
        cur.executemany(f"INSERT INTO interval_segment VALUES ({', '.join(['%s'] * 8)})", state["interval_segment"])
        cur.executemany(f"INSERT INTO daily_zone_usage VALUES ({', '.join(['%s'] * 6)})", state["daily_zone_usage"])
        cur.executemany(f"INSERT INTO interval_decision VALUES ({', '.join(['%s'] * 8)})",
                        state["interval_decision"])
    conn.commit()


@pytest.fixture
def source(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    _fill(conn)
    state = _state(conn)
    _covers_every_kind(state)
    return state


def test_every_reading_interval_and_daily_total_survives_on_plain_postgresql(
        source: dict[str, list[tuple]], conn: psycopg.Connection, empty_conn: psycopg.Connection) -> None:
    old = empty_conn
    assert migrate_upto(old, BEFORE, timescale=False)[-1] <= BEFORE
    from amr.storage.timeseries import Partitions

    with old.transaction():
        Partitions().ensure(old, T0, T0 + timedelta(days=2))
    _write_old(old, source)
    applied = [m.version for m in migrate.migrate(old, timescale=False)]
    old.commit()
    assert 23 in applied
    assert _state(old) == source
    assert old.execute("SELECT relkind FROM pg_class WHERE relname = 'reading'").fetchone() == ("v",)
    assert old.execute("SELECT count(*) FROM reading_data").fetchone() == (len(source["reading"]),)
    # the import lines are not one dictionary entry each
    assert old.execute("SELECT source FROM reading_source ORDER BY 1").fetchall() == [
        ("",), ("import:a.csv#L0",), ("import:day.csv",), ("mqtt:amr/v1/gw-1/ck-1",), ("portal",)]
    old.commit()

    # ingestion goes on from the migrated readings as from the original ones
    add_meters(old, "ck-1", "ck-2", rollover=1000, adapter="mqtt")
    last = max(r.ts for r in _scenario() if r.register == "1.8.0" and r.meter_id == "ck-1")
    more = [Reading("ck-1", "1.8.0", last + HALF, Decimal("410")),
            Reading("ck-1", "1.8.0", T0 + 7 * HALF + timedelta(minutes=10), Decimal("2.5"))]  # a late one
    for db in (conn, old):
        assert Ingestor(db, Settings()).ingest(more).accepted == 2
        db.commit()
    assert _state(old) == _state(conn)


def test_the_view_takes_inserts_updates_and_deletes(conn: psycopg.Connection) -> None:
    ts = T0 + timedelta(microseconds=7)
    conn.execute("INSERT INTO reading (meter_id, register, ts, value) VALUES ('v-1', '1.8.0', %s, 1.50)", (ts,))
    conn.execute("INSERT INTO reading (meter_id, register, ts, value, quality, source, start_ts, kwh, kind,"
                 " status, estimated, day, zone) VALUES ('v-1', '1.8.0', %s, 2, '{late,brand_new}',"
                 " 'import:x.csv#L7', %s, 0.5, 'normal', 'ok', false, %s, 'night')",
                 (ts + HALF, ts, (ts + HALF).date()))
    rows = conn.execute(f"SELECT {OLD_COLUMNS} FROM reading WHERE meter_id = 'v-1' ORDER BY ts").fetchall()
    assert rows == [
        ("v-1", "1.8.0", ts, Decimal("1.50"), [], "", None, None, None, None, None, None, None),
        ("v-1", "1.8.0", ts + HALF, Decimal("2"), ["brand_new", "late"], "import:x.csv#L7", ts, Decimal("0.5"),
         "normal", "ok", False, (ts + HALF).date(), "night")]
    # an unknown flag took the next free bit
    assert conn.execute("SELECT bit FROM quality_flag WHERE name = 'brand_new'").fetchone()[0] < QUALITY_BITS
    conn.execute("UPDATE reading SET status = 'accepted', value = 3 WHERE meter_id = 'v-1' AND ts = %s",
                 (ts + HALF,))
    assert conn.execute("SELECT value, status, kind, start_ts FROM reading WHERE meter_id = 'v-1' AND ts = %s",
                        (ts + HALF,)).fetchone() == (Decimal(3), "accepted", "normal", ts)
    conn.commit()
    with pytest.raises(psycopg.errors.CheckViolation, match="reading_zone_check"):
        conn.execute("UPDATE reading SET zone = 'dusk' WHERE meter_id = 'v-1'")
    conn.rollback()
    conn.execute("DELETE FROM reading WHERE meter_id = 'v-1' AND ts = %s", (ts,))
    assert conn.execute("SELECT count(*) FROM reading WHERE meter_id = 'v-1'").fetchone() == (1,)
    conn.rollback()


def test_every_quality_flag_has_a_bit_and_round_trips_through_ingestion(conn: psycopg.Connection) -> None:
    add_meters(conn, "q-1")
    ing = Ingestor(conn, Settings())
    flags = sorted(quality.SOURCE_FLAGS)
    ing.ingest([Reading("q-1", "1.8.0", T0 + i * HALF, Decimal(i), frozenset(flags[:i + 1]), "s")
                for i in range(len(flags))])
    bits = dict(conn.execute("SELECT name, bit FROM quality_flag").fetchall())
    assert set(quality.ALL) <= set(bits), "every flag of adapters/quality.py has a bit"
    assert len(set(bits.values())) == len(bits)
    got = [r[0] for r in conn.execute("SELECT quality FROM reading WHERE meter_id = 'q-1' ORDER BY ts")]
    assert got == [sorted(flags[:i + 1]) for i in range(len(flags))]


# --- TimescaleDB (PGlite): the same upgrade, the old chunks compressed first -------------------

@pytest.fixture(scope="module")
def pglite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.test_timescale import _serve

    with _serve(tmp_path_factory) as url:
        yield url


def test_every_reading_interval_and_daily_total_survives_on_timescaledb(
        source: dict[str, list[tuple]], pglite: str) -> None:
    with psycopg.connect(pglite, connect_timeout=10) as ts:
        ts.execute("SET TIME ZONE 'UTC'")
        ts.commit()
        migrate_upto(ts, BEFORE, timescale=True)
        _write_old(ts, source)
        jobs = ts.execute("SELECT job_id FROM timescaledb_information.jobs"
                          " WHERE proc_name = 'policy_compression' ORDER BY 1").fetchall()
        ts.commit()
        ts.autocommit = True  # the policy commits per chunk
        try:
            for job in jobs:
                ts.execute("CALL run_job(%s)", job)
        finally:
            ts.autocommit = False
        assert ts.execute("SELECT bool_and(is_compressed) FROM timescaledb_information.chunks"
                          " WHERE hypertable_name = 'reading'").fetchone() == (True,)
        ts.commit()
        applied = [m.version for m in migrate.migrate(ts, timescale=True)]
        ts.commit()
        assert 23 in applied
        assert _state(ts) == source
        assert ts.execute("SELECT hypertable_name FROM timescaledb_information.hypertables ORDER BY 1"
                          ).fetchall() == [("interval_segment",), ("reading_data",)]
        assert ts.execute("SELECT relkind FROM pg_class WHERE relname = 'reading'").fetchone() == ("v",)
        ts.commit()
