"""Migrations: idempotent, refuse a newer schema, and the time-table switch."""

from __future__ import annotations

import pytest

from amr.storage import migrate, timeseries


def test_rerun_is_a_noop_and_partitions_exist(conn) -> None:
    version = migrate.current_version(conn)
    assert version == migrate.available()[-1].version
    assert migrate.migrate(conn) == []
    assert migrate.current_version(conn) == version
    for table in ("reading_data", "interval_segment"):  # reading is a view over reading_data (023)
        parts = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = %s::regclass", (table,)
        ).fetchone()[0]
        assert parts >= 4, table  # two months back, three ahead
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = %s", (table,)).fetchone()[0]
        assert kind == "p", table
    # interval_usage is a view over them now: no partitions of its own
    assert conn.execute("SELECT relkind FROM pg_class WHERE relname = 'interval_usage'").fetchone() == ("v",)
    assert conn.execute(
        "SELECT name FROM amr_time_table ORDER BY name").fetchall() == [("interval_segment",), ("reading_data",)]


def test_refuses_a_schema_newer_than_the_code(conn) -> None:
    conn.execute("INSERT INTO amr_schema_migration (version, name) VALUES (999, 'from_the_future')")
    conn.commit()
    with pytest.raises(migrate.SchemaTooNew, match="version 999, newer than this code"):
        migrate.migrate(conn)


def test_fresh_database_from_nothing(empty_conn) -> None:
    c = empty_conn
    applied = migrate.migrate(c, timescale=False)
    assert [m.version for m in applied] == [m.version for m in migrate.available()]
    kinds = dict(c.execute("SELECT relname::text, relkind::text FROM pg_class"
                           " WHERE relnamespace = 'public'::regnamespace").fetchall())
    for table in ("subscriber", "meter", "daily_zone_usage", "rejected_reading", "tariff",
                  "bill", "bill_line"):
        assert kinds.get(table) == "r", table
    for table in ("reading_data", "interval_segment"):  # time tables: natively partitioned
        assert kinds.get(table) == "p", table
    assert kinds.get("reading") == "v"  # a view over reading_data since 023
    assert kinds.get("interval_usage") == "v"  # a view since 012


def test_timescale_rendering_drops_partitioning_and_names_hypertables() -> None:
    by_version = {m.version: m.sql for m in migrate.available()}
    for version, column, names in ((1, "ts", ["reading", "interval_usage"]),
                                   (12, "end_ts", ["interval_segment"])):
        plain, tables = timeseries.render(by_version[version], timescale=False)
        ts_sql, ts_tables = timeseries.render(by_version[version], timescale=True)
        assert f"PARTITION BY RANGE ({column})" in plain and "PARTITION BY" not in ts_sql
        assert [t.table for t in tables] == [t.table for t in ts_tables] == names
    # 012 drops interval_usage (a view since): the time tables in the end are these two
    assert "DROP TABLE interval_usage;" in by_version[12]


def test_maintain_drops_partitions_past_retention_only(conn) -> None:
    from datetime import UTC, datetime

    from amr.storage.timeseries import Partitions

    with conn.transaction():
        Partitions().ensure(conn, datetime(2019, 1, 5, tzinfo=UTC), datetime(2019, 3, 5, tzinfo=UTC))
    conn.commit()
    names = lambda: {r[0] for r in conn.execute(  # noqa: E731
        "SELECT relname FROM pg_class WHERE relname ~ '_p2019\\d\\d$' AND relkind = 'r'").fetchall()}
    everything = {f"{t}_p2019{m}" for t in ("reading_data", "interval_segment") for m in ("01", "02", "03")}
    assert names() == everything
    # no retention configured (the default): nothing goes, however old
    assert migrate.maintain(conn, now=datetime(2024, 2, 15, tzinfo=UTC)).dropped == []
    assert names() == everything
    # five years of retention counted from 2024-02-15: January 2019 goes, February stays
    report = migrate.maintain(conn, now=datetime(2024, 2, 15, tzinfo=UTC), retention_months=60)
    dropped = [d.part for d in report.dropped]
    assert sorted(dropped) == ["interval_segment_p201901", "reading_data_p201901"]  # no interval_usage_p*
    assert names() == {f"{t}_p2019{m}" for t in ("reading_data", "interval_segment") for m in ("02", "03")}


def test_a_lower_numbered_migration_added_later_is_applied(conn, monkeypatch) -> None:
    shipped = migrate.available()
    late = migrate.Migration(5, "late_branch", "CREATE TABLE late_branch (id int);")
    newer = migrate.Migration(500, "newer", "CREATE TABLE newer_one (id int);")
    monkeypatch.setattr(migrate, "available", lambda: [*shipped, newer])
    assert [m.version for m in migrate.migrate(conn)] == [500]
    # 005 arrives after 500 was applied: applied, not skipped as "older than the schema"
    monkeypatch.setattr(migrate, "available", lambda: sorted([*shipped, late, newer]))
    assert [m.version for m in migrate.migrate(conn)] == [5]
    assert conn.execute("SELECT to_regclass('late_branch')").fetchone()[0] is not None
