"""The TimescaleDB path of the migrations, on PostgreSQL 17 with TimescaleDB 2.23.

No registry packages TimescaleDB for a real PostgreSQL here, so the server is
PGlite (PostgreSQL compiled to WASM) with TimescaleDB built in, served on a TCP
port by tests/timescale/serve.mjs (npm packages pinned in
tests/timescale/package-lock.json). It speaks the wire protocol and runs
hypertables, compression and policies, but not COPY FROM STDIN: this proves the
migrations and the storage switch, not the ingest path.

Without node/npm, or when `npm ci` fails, the module is skipped (a skip is not
a pass); with AMR_REQUIRE_TIMESCALE=1 that is a failure instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

import psycopg
import pytest

from amr.storage import migrate, timeseries
from tests.test_migrate_012 import (
    BEFORE,
    INTERVAL_ROWS,
    SEGMENTS,
    expected_readings,
    expected_segments,
    migrate_upto,
    old_day,
    reading_state,
    seed_before_012,
)
from tests.timescale_server import ServerFailed, Unavailable, install, serve

TIME_TABLES = {"reading_data": "ts", "interval_segment": "end_ts"}  # views since: interval_usage 012, reading 023
OTHER_TABLES = {
    "subscriber", "meter", "daily_zone_usage", "interval_decision", "rejected_reading",
    "tariff", "bill", "bill_line", "suspect_audit", "amr_schema_migration", "amr_time_table",
    "retention_watermark", "retention_log", "billed_change", "ledger_entry", "registry_file", "registry_payment",
    "card_payment", "card_payment_event", "card_receipt",
    "consumption_norm",
    "portal_user", "portal_session", "portal_token", "portal_captcha", "portal_rate_counter", "portal_audit_log",
    "portal_account_link",
    "reading_series", "reading_source", "quality_flag", "tail_owner",
}


def _unavailable(reason: str) -> None:
    if os.environ.get("AMR_REQUIRE_TIMESCALE") == "1":
        pytest.fail(f"AMR_REQUIRE_TIMESCALE=1 but the TimescaleDB test server cannot run: {reason}",
                    pytrace=False)
    pytest.skip(f"{reason}. The TimescaleDB path is NOT tested; this skip is not a pass "
                "(run scripts/bootstrap --with-broker; AMR_REQUIRE_TIMESCALE=1 makes it a failure)")


def _install() -> None:
    try:
        install()
    except Unavailable as e:
        _unavailable(str(e))


@pytest.fixture(scope="module")
def timescale_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PGlite+TimescaleDB server for this module, stopped with SIGTERM at the end."""
    with _serve(tmp_path_factory) as url:
        yield url


@contextmanager
def _serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _install()
    try:
        with serve(tmp_path_factory.mktemp("timescale")) as url:
            yield url
    except ServerFailed as e:
        pytest.fail(str(e), pytrace=False)


class Migrated(NamedTuple):
    conn: psycopg.Connection
    applied: list[migrate.Migration]


@pytest.fixture(scope="module")
def ts(timescale_url: str) -> Iterator[Migrated]:
    """The one connection (PGlite is a single session) to a database migrated with timescale=True."""
    with psycopg.connect(timescale_url, connect_timeout=10) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.commit()
        applied = migrate.migrate(conn, timescale=True)
        conn.commit()
        yield Migrated(conn, applied)


def _rows(conn: psycopg.Connection, sql: str, *params: object) -> list[tuple]:
    return conn.execute(sql, params or None).fetchall()


def test_every_migration_applies_on_timescaledb(ts: Migrated) -> None:
    assert [m.version for m in ts.applied] == [m.version for m in migrate.available()]
    assert migrate.current_version(ts.conn) == migrate.available()[-1].version
    assert _rows(ts.conn, "SELECT extname FROM pg_extension WHERE extname = 'timescaledb'")
    assert dict(_rows(ts.conn, "SELECT name, hypertable FROM amr_time_table")) == {
        "reading_data": True, "interval_segment": True}


def test_time_tables_are_hypertables_compressed_by_meter(ts: Migrated) -> None:
    hyper = _rows(ts.conn, "SELECT hypertable_name, compression_enabled"
                           " FROM timescaledb_information.hypertables WHERE hypertable_schema = 'public'")
    assert dict(hyper) == {"reading_data": True, "interval_segment": True}
    dims = _rows(ts.conn, "SELECT hypertable_name, column_name FROM timescaledb_information.dimensions")
    assert dict(dims) == TIME_TABLES
    segment_by = _rows(ts.conn, "SELECT hypertable_name, array_agg(attname::text ORDER BY segmentby_column_index)"
                                " FROM timescaledb_information.compression_settings"
                                " WHERE segmentby_column_index IS NOT NULL GROUP BY 1")
    assert dict(segment_by) == {"reading_data": ["series"], "interval_segment": ["meter_id"]}
    # native partitioning is the other path: none of it here
    assert _rows(ts.conn, "SELECT relname FROM pg_class WHERE relkind = 'p' OR relispartition") == []


def test_compression_is_scheduled_and_no_retention_policy_deletes_anything(ts: Migrated) -> None:
    jobs = _rows(ts.conn, "SELECT hypertable_name, config->>'compress_after', scheduled"
                          " FROM timescaledb_information.jobs WHERE proc_name = 'policy_compression'")
    assert sorted(jobs) == [("interval_segment", "30 days", True), ("reading_data", "30 days", True)]
    # retention is the operator's explicit policy, applied by `amr db maintain` only (013)
    assert _rows(ts.conn, "SELECT count(*) FROM timescaledb_information.jobs"
                          " WHERE proc_name = 'policy_retention'") == [(0,)]
    # the policies of interval_usage, a hypertable until 012 dropped it, went with it
    assert _policy_jobs(ts.conn) == sorted((t, "policy_compression") for t in TIME_TABLES)


def _policy_jobs(conn: psycopg.Connection) -> list[tuple]:
    """Every compression and retention job TimescaleDB keeps, by its table ('?': a table gone)."""
    return sorted(_rows(conn, "SELECT coalesce(h.table_name::text, '?'), j.proc_name::text"
                              " FROM _timescaledb_config.bgw_job j"
                              " LEFT JOIN _timescaledb_catalog.hypertable h"
                              "   ON h.id = (j.config->>'hypertable_id')::int"
                              " WHERE j.proc_name IN ('policy_compression', 'policy_retention')"))


def test_the_other_tables_and_views_exist(ts: Migrated) -> None:
    tables = {r[0] for r in _rows(ts.conn, "SELECT table_name FROM information_schema.tables"
                                           " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")}
    assert tables == OTHER_TABLES | set(TIME_TABLES)
    views = {r[0] for r in _rows(ts.conn, "SELECT table_name FROM information_schema.views"
                                          " WHERE table_schema = 'public'")}
    assert {"portal_account", "portal_latest_reading", "portal_bill", "interval_usage"} <= views
    assert _rows(ts.conn, "SELECT relkind FROM pg_class WHERE relname = 'interval_usage'") == [("v",)]


def test_rerun_applies_nothing_and_keeps_the_path(ts: Migrated) -> None:
    jobs_before = _rows(ts.conn, "SELECT count(*) FROM timescaledb_information.jobs")
    assert migrate.migrate(ts.conn, timescale=True) == []
    assert timeseries.timescale_available(ts.conn)  # auto mode follows the recorded path
    assert migrate.migrate(ts.conn) == []
    ts.conn.commit()
    assert migrate.current_version(ts.conn) == migrate.available()[-1].version
    assert _rows(ts.conn, "SELECT count(*) FROM timescaledb_information.jobs") == jobs_before


def test_inserted_readings_land_in_chunks_and_the_policy_compresses_old_ones(ts: Migrated) -> None:
    conn = ts.conn
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [("ts-m1", "1.8.0", now - timedelta(days=100), Decimal("10.5")),
            ("ts-m1", "1.8.0", now - timedelta(days=99), Decimal("12.25")),
            ("ts-m1", "1.8.0", now, Decimal("400"))]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO reading (meter_id, register, ts, value) VALUES (%s, %s, %s, %s)",
                        rows)
    conn.commit()
    chunks = {r[0] for r in _rows(conn, "SELECT show_chunks('reading_data')::text")}
    homes = _rows(conn, "SELECT d.tableoid::regclass::text, count(*) FROM reading_data d"
                        " JOIN reading_series s ON s.id = d.series WHERE s.meter_id = 'ts-m1' GROUP BY 1")
    assert len(homes) >= 2 and {h for h, _ in homes} <= chunks, homes
    assert _rows(conn, "SELECT count(*) FROM ONLY reading_data") == [(0,)]  # nothing in the parent

    (job,) = _rows(conn, "SELECT job_id FROM timescaledb_information.jobs"
                         " WHERE proc_name = 'policy_compression' AND hypertable_name = 'reading_data'")
    conn.commit()
    conn.autocommit = True  # the policy commits per chunk
    try:
        conn.execute("CALL run_job(%s)", job)
    finally:
        conn.autocommit = False
    compressed = dict(_rows(conn, "SELECT range_end < %s, bool_and(is_compressed)"
                                  " FROM timescaledb_information.chunks"
                                  " WHERE hypertable_name = 'reading_data' GROUP BY 1",
                            now - timedelta(days=30)))
    assert compressed == {True: True, False: False}
    back = _rows(conn, "SELECT meter_id, register, ts, value FROM reading"
                       " WHERE meter_id = 'ts-m1' ORDER BY ts")
    assert back == rows
    conn.commit()


_COLUMNS = """
    SELECT c.table_name::text, t.table_type::text, c.column_name::text, c.ordinal_position::int,
           c.data_type::text, c.is_nullable::text, c.column_default::text
    FROM information_schema.columns c
    JOIN information_schema.tables t USING (table_schema, table_name)
    JOIN pg_class k ON k.oid = format('%I.%I', c.table_schema, c.table_name)::regclass
    WHERE c.table_schema = 'public' AND NOT k.relispartition
    ORDER BY 1, 4
"""


def test_same_tables_and_columns_as_plain_postgresql(ts: Migrated, conn: psycopg.Connection) -> None:
    """One schema, a thin switch: both paths give the same tables, views and columns."""
    assert _rows(conn, "SELECT bool_and(NOT hypertable) FROM amr_time_table") == [(True,)]
    on_timescale = _rows(ts.conn, _COLUMNS)
    on_plain = _rows(conn, _COLUMNS)
    ts.conn.commit()
    assert {r[0] for r in on_timescale} >= OTHER_TABLES | set(TIME_TABLES)
    assert on_timescale == on_plain


class Upgraded(NamedTuple):
    conn: psycopg.Connection
    day: date
    rows_before: list[tuple]
    applied: list[int]


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgraded]:
    """A second server, migrated to 011 and given intervals the old way, its old chunks
    compressed by the policy (as in production), then migrated to the end."""
    with _serve(tmp_path_factory) as url, psycopg.connect(url, connect_timeout=10) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.commit()
        assert migrate_upto(conn, BEFORE, timescale=True)[-1] == BEFORE
        day = old_day()
        seed_before_012(conn, day)
        jobs = _rows(conn, "SELECT job_id FROM timescaledb_information.jobs"
                           " WHERE proc_name = 'policy_compression' ORDER BY 1")
        conn.commit()
        conn.autocommit = True  # the policy commits per chunk
        try:
            for job in jobs:
                conn.execute("CALL run_job(%s)", job)
        finally:
            conn.autocommit = False
        compressed = _rows(conn, "SELECT hypertable_name, bool_and(is_compressed)"
                                 " FROM timescaledb_information.chunks GROUP BY 1 ORDER BY 1")
        assert compressed == [("interval_usage", True), ("reading", True)]
        rows = _rows(conn, INTERVAL_ROWS)
        assert len(rows) == 4
        conn.commit()
        applied = [m.version for m in migrate.migrate(conn, timescale=True)]
        conn.commit()
        conn.autocommit = True  # 023 moved the readings into reading_data: compressed again, as the policy will
        try:
            for job in _rows(conn, "SELECT job_id FROM timescaledb_information.jobs"
                                   " WHERE proc_name = 'policy_compression' AND hypertable_name = 'reading_data'"):
                conn.execute("CALL run_job(%s)", job)
        finally:
            conn.autocommit = False
        yield Upgraded(conn, day, rows, applied)


def test_012_moves_compressed_intervals_into_reading_and_interval_segment(upgraded: Upgraded) -> None:
    conn = upgraded.conn
    assert upgraded.applied == [m.version for m in migrate.available() if m.version > BEFORE]
    assert _rows(conn, "SELECT relkind FROM pg_class WHERE relname = 'interval_usage'") == [("v",)]
    assert _rows(conn, INTERVAL_ROWS) == upgraded.rows_before
    assert reading_state(conn) == expected_readings(upgraded.day)
    assert _rows(conn, SEGMENTS) == expected_segments(upgraded.day)
    # the moved parts are in chunks of the new hypertable, not in its parent
    assert _rows(conn, "SELECT count(*) FROM ONLY interval_segment") == [(0,)]
    assert _rows(conn, "SELECT count(*) FROM show_chunks('interval_segment')") == [(1,)]
    conn.commit()


def test_012_leaves_the_policies_of_reading_and_interval_segment_only(upgraded: Upgraded) -> None:
    conn = upgraded.conn
    assert dict(_rows(conn, "SELECT name, column_name FROM amr_time_table")) == TIME_TABLES
    dims = _rows(conn, "SELECT hypertable_name, column_name FROM timescaledb_information.dimensions")
    assert dict(dims) == TIME_TABLES
    assert _policy_jobs(conn) == sorted((t, "policy_compression") for t in TIME_TABLES)
    segment_by = _rows(conn, "SELECT hypertable_name, attname::text"
                             " FROM timescaledb_information.compression_settings"
                             " WHERE segmentby_column_index IS NOT NULL ORDER BY 1")
    assert segment_by == [("interval_segment", "meter_id"), ("reading_data", "series")]
    conn.commit()


@pytest.mark.parametrize("column, value", [("kwh", -1), ("kind", "weird"), ("status", "pending")])
def test_012_checks_hold_on_compressed_and_new_chunks(upgraded: Upgraded, column: str,
                                                      value: object) -> None:
    conn = upgraded.conn
    ts = datetime(upgraded.day.year, upgraded.day.month, upgraded.day.day, 4, 50, tzinfo=UTC)
    home = _rows(conn, "SELECT c.is_compressed FROM timescaledb_information.chunks c"
                       " WHERE c.hypertable_name = 'reading_data' AND %s >= c.range_start"
                       " AND %s < c.range_end", ts, ts)
    assert home == [(True,)]
    conn.commit()
    with pytest.raises(psycopg.errors.CheckViolation, match=f"reading_{column}_check"):
        conn.execute(f"UPDATE reading SET {column} = %s WHERE meter_id = 'm012' AND ts = %s",
                     (value, ts))
    conn.rollback()
    with pytest.raises(psycopg.errors.CheckViolation, match=f"reading_{column}_check"):
        conn.execute(f"INSERT INTO reading (meter_id, register, ts, value, {column})"
                     " VALUES ('m012', '1.8.0', %s, 1, %s)",
                     (datetime.now(UTC) + timedelta(days=900), value))
    conn.rollback()


def test_013_removes_the_retention_policies_older_versions_scheduled(ts: Migrated) -> None:
    conn = ts.conn
    for table in TIME_TABLES:  # what 001 and 012 did before 013
        conn.execute(f"SELECT add_retention_policy('{table}', INTERVAL '5 years')")
    assert len(_rows(conn, "SELECT 1 FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'")) == 2
    sql = next(m.sql for m in migrate.available() if m.version == 13)
    block = sql[sql.index("DO $$"):sql.index("$$;", sql.index("DO $$")) + 3]
    conn.execute(block)
    assert _rows(conn, "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'"
                 ) == [(0,)]
    conn.commit()


def test_maintain_applies_retention_on_timescaledb_by_whole_chunks_and_a_watermark(ts: Migrated) -> None:
    from amr.storage import retention

    conn = ts.conn
    old, kept = datetime(2017, 3, 5, tzinfo=UTC), datetime(2025, 3, 5, tzinfo=UTC)
    for at in (old, kept):
        conn.execute("INSERT INTO reading (meter_id, register, ts, value) VALUES ('tsr', '1.8.0', %s, 1)", (at,))
    conn.commit()
    now = datetime(2026, 12, 1, tzinfo=UTC)
    # without a policy nothing goes
    assert migrate.maintain(conn, now=now).dropped == []
    dry = migrate.maintain(conn, now=now, retention_months=60, dry_run=True)
    assert [d.table for d in dry.dropped] == ["reading_data"] and dry.dropped[0].rows == 1
    assert _rows(conn, "SELECT count(*) FROM reading WHERE meter_id = 'tsr'") == [(2,)]
    report = migrate.maintain(conn, now=now, retention_months=60)
    conn.commit()
    assert [(d.table, d.rows) for d in report.dropped] == [("reading_data", 1)]
    assert _rows(conn, "SELECT ts FROM reading WHERE meter_id = 'tsr'") == [(kept,)]
    mark = retention.watermark(conn)
    assert mark is not None and old < mark <= datetime(2021, 12, 1, tzinfo=UTC)
    assert _rows(conn, "SELECT table_name, rows, policy_months FROM retention_log") == [("reading_data", 1, 60)]
    conn.commit()
