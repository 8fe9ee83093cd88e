"""The thin switch between TimescaleDB hypertables and native partitions.

Migrations declare time tables once (see 001_core.sql); this module is the only
place that knows which of the two storage paths a database takes. Everything
above storage sees the same tables either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import psycopg

MARKER = re.compile(r"/\*@time_partitioned\((\w+)\)\*/")
DIRECTIVE = re.compile(
    r"^--\s*@time_table\s+(\w+)\s+(\w+)\s+(\w+)\s+(\w+)\s+(\w+)\s+(\w+)\s*$", re.M
)
_INTERVALS = {
    "1month": "1 month", "7days": "7 days", "1day": "1 day", "30days": "30 days",
    "5years": "5 years", "10years": "10 years",
}


@dataclass(frozen=True)
class TimeTable:
    table: str
    column: str
    chunk: str
    compress_after: str
    segment_by: str
    retention: str  # in old migrations' directives; ignored: retention is AMR_RETENTION (retention.py)


def timescale_available(conn: psycopg.Connection) -> bool:
    """Which path a database takes when not told (`amr db migrate --timescale auto`).

    A database keeps the path its time tables took (recorded in amr_time_table).
    A new one takes TimescaleDB when the extension is already created here, or
    when it can be: installed and preloaded (CREATE EXTENSION timescaledb fails
    without shared_preload_libraries, so "installed" alone is not enough).
    """
    row = conn.execute("SELECT to_regclass('amr_time_table') IS NOT NULL").fetchone()
    if row and row[0]:
        row = conn.execute("SELECT bool_or(hypertable) FROM amr_time_table").fetchone()
        if row and row[0] is not None:
            return bool(row[0])
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb')"
        " OR (EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb')"
        "     AND current_setting('shared_preload_libraries') ~ '(^|[ ,/\"])timescaledb($|[ ,\"])')"
    ).fetchone()
    return bool(row and row[0])


def render(sql: str, timescale: bool) -> tuple[str, list[TimeTable]]:
    """Turn a migration's markers into SQL for this storage path."""
    tables = [TimeTable(*m.groups()) for m in DIRECTIVE.finditer(sql)]
    if timescale:
        sql = MARKER.sub("", sql)
    else:
        sql = MARKER.sub(lambda m: f"PARTITION BY RANGE ({m.group(1)})", sql)
    return sql, tables


def setup_time_table(conn: psycopg.Connection, t: TimeTable, timescale: bool) -> None:
    """Register one time table: a hypertable with compression, or a partitioned table."""
    chunk = _INTERVALS[t.chunk]
    if timescale:
        conn.execute(
            f"SELECT create_hypertable('{t.table}', by_range('{t.column}', INTERVAL '{chunk}'),"
            " migrate_data => true)"
        )
        conn.execute(
            f"ALTER TABLE {t.table} SET (timescaledb.compress, "
            f"timescaledb.compress_segmentby = '{t.segment_by}')"
        )
        conn.execute(
            f"SELECT add_compression_policy('{t.table}', INTERVAL '{_INTERVALS[t.compress_after]}')"
        )
        # no retention policy: nothing is deleted in the background (amr/storage/retention.py)
    conn.execute(
        "INSERT INTO amr_time_table (name, column_name, chunk, hypertable, retention)"
        " VALUES (%s, %s, %s, %s, NULL) ON CONFLICT (name) DO NOTHING",
        (t.table, t.column, chunk, timescale),
    )


def month_start(d: date) -> date:
    return date(d.year, d.month, 1)


def next_month(d: date) -> date:
    return date(d.year + (d.month == 12), d.month % 12 + 1, 1)


# the advisory lock held while monthly partitions are made
PARTITION_LOCK = 7217005


class Partitions:
    """Creates monthly partitions ahead of the rows that need them (plain PostgreSQL).

    Remembers what exists, so the per-batch check costs a set lookup. On a
    TimescaleDB database it does nothing: chunks are created by the extension.
    """

    def __init__(self) -> None:
        self._known: set[tuple[str, date]] = set()
        self._tables: list[str] | None = None

    def _load(self, conn: psycopg.Connection) -> list[str]:
        if self._tables is None:
            rows = conn.execute(
                "SELECT name FROM amr_time_table WHERE NOT hypertable ORDER BY name"
            ).fetchall()
            self._tables = [r[0] for r in rows]
            for (name, start) in conn.execute(
                "SELECT parent.relname, substring(child.relname from '_p(\\d{6})$')"
                " FROM pg_inherits JOIN pg_class parent ON parent.oid = inhparent"
                " JOIN pg_class child ON child.oid = inhrelid"
            ).fetchall():
                if start:
                    self._known.add((name, date(int(start[:4]), int(start[4:]), 1)))
        return self._tables

    def ensure(self, conn: psycopg.Connection, lo: datetime, hi: datetime) -> None:
        """Make sure every time table has a partition for each month in [lo, hi]."""
        month = month_start(lo.astimezone(UTC).date())
        last = month_start(hi.astimezone(UTC).date())
        months = []
        while month <= last:
            months.append(month)
            month = next_month(month)
        self.ensure_months(conn, months)

    def ensure_months(self, conn: psycopg.Connection, months: Iterable[date]) -> int:
        """Make sure every time table has a partition for each of these months (first days, UTC).

        Ingestion passes the months that hold accepted readings, so a batch spanning
        years makes partitions only where its rows go. Returns how many were made.
        """
        tables = self._load(conn)
        todo = [(table, month) for month in sorted(set(months)) for table in tables
                if (table, month) not in self._known]
        if not todo:
            return 0
        with conn.transaction():
            # one maker at a time: IF NOT EXISTS does not keep two sessions from creating the
            # same partition at once (the second fails with DuplicateTable); after the lock,
            # a partition another session just made is there and skipped
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            for table, month in todo:
                name = f"{table}_p{month:%Y%m}"
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES "
                    f"FROM ('{month.isoformat()} 00:00+00') TO ('{next_month(month).isoformat()} 00:00+00')"
                )
        self._known.update(todo)
        return len(todo)

    def missing(self, conn: psycopg.Connection, months: Iterable[date]) -> list[date]:
        """Of these months, those some time table has no partition for yet."""
        tables = self._load(conn)
        return sorted({m for m in months for t in tables if (t, m) not in self._known})

    def existing(self, conn: psycopg.Connection) -> list[tuple[str, date]]:
        """Every monthly partition known, as (table, first day of its month)."""
        self._load(conn)
        return sorted(self._known)

    def forget(self, table: str, month: date) -> None:
        self._known.discard((table, month))
