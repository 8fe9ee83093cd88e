"""Retention: the operator's explicit policy for deleting old readings, and its watermark.

Metering data is billing evidence, so nothing is deleted unless someone set
AMR_RETENTION (months, never below the dispute horizon; see
amr.settings). Only `amr db maintain` applies it, never `amr db
migrate`, and it can show first what it would drop (`--dry-run`).

What was dropped is remembered as a watermark (table retention_watermark):
the instant below which no reading is kept. Ingestion refuses readings older
than the watermark with the code `beyond_retention`. Without it, the
dropped readings could be ingested again and their energy, which the daily
totals still hold, would be counted twice. Daily zone totals and bills of
pruned periods stay: they are small, and they are what was billed.

Both storage paths follow the same rule: on plain PostgreSQL whole monthly
partitions are dropped, on TimescaleDB whole chunks (`drop_chunks`); no
background job of TimescaleDB deletes anything (migration 013 removed the
policies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg

from amr.storage import timeseries


@dataclass(frozen=True)
class Dropped:
    """One partition or chunk past retention, with what it held."""

    table: str
    part: str
    range_from: datetime | None
    range_to: datetime
    rows: int | None


@dataclass
class RetentionReport:
    """What one `maintain` run dropped (or, in a dry run, would drop)."""

    policy_months: int | None
    cutoff: datetime | None
    dry_run: bool
    dropped: list[Dropped] = field(default_factory=list)
    watermark: datetime | None = None  # after this run

    @property
    def rows(self) -> int:
        return sum(d.rows or 0 for d in self.dropped)


def watermark(conn: psycopg.Connection) -> datetime | None:
    """The instant below which readings were dropped and are refused; None when nothing was."""
    row = conn.execute(
        "SELECT watermark FROM retention_watermark WHERE name = 'readings'").fetchone()
    return row[0] if row else None


def cutoff_for(now: datetime, months: int) -> datetime:
    """The start of the month `months` months before now's month (UTC): older whole months go."""
    first = timeseries.month_start(now.astimezone(UTC).date())
    y, m = divmod(first.year * 12 + first.month - 1 - months, 12)
    return datetime(y, m + 1, 1, tzinfo=UTC)


def apply(conn: psycopg.Connection, months: int | None, now: datetime | None = None, *,
          dry_run: bool = False) -> RetentionReport:
    """Drop what lies wholly before the retention cutoff and raise the watermark; in one transaction.

    `months` None: nothing is dropped (the default policy is to keep everything).
    """
    now = now or datetime.now(UTC)
    if months is None:
        return RetentionReport(None, None, dry_run, watermark=watermark(conn))
    cutoff = cutoff_for(now, months)
    report = RetentionReport(months, cutoff, dry_run)
    with conn.transaction():
        # one maintainer at a time, and no ingestion of the rows being dropped meanwhile
        conn.execute("SELECT pg_advisory_xact_lock(7217002)")
        report.dropped = _expired(conn, cutoff)
        high = max((d.range_to for d in report.dropped), default=None)
        old = watermark(conn)
        report.watermark = old if high is None or (old is not None and old >= high) else high
        if dry_run or not report.dropped:
            return report
        hypertables = set()
        for d in report.dropped:
            if "." in d.part:  # a chunk, schema-qualified: dropped below, by its hypertable
                hypertables.add(d.table)
            else:
                conn.execute(f'DROP TABLE IF EXISTS "{d.part}"')
            conn.execute(
                "INSERT INTO retention_log (table_name, part, range_from, range_to, rows, policy_months)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (d.table, d.part, d.range_from, d.range_to, d.rows, months))
        conn.execute(
            "INSERT INTO retention_watermark (name, watermark) VALUES ('readings', %s)"
            " ON CONFLICT (name) DO UPDATE SET watermark = greatest(retention_watermark.watermark,"
            " EXCLUDED.watermark), updated_at = now()", (report.watermark,))
        for table in sorted(hypertables):  # exactly the chunks listed: those ending by the cutoff
            conn.execute("SELECT drop_chunks(%s::regclass, older_than => %s::timestamptz)", (table, cutoff))
        # readings an ingesting process keeps in memory may be among those dropped (migration 026)
        conn.execute("UPDATE tail_owner SET gen = gen + 1")
    return report


def _expired(conn: psycopg.Connection, cutoff: datetime) -> list[Dropped]:
    """Partitions (plain PostgreSQL) or chunks (TimescaleDB) that end at or before the cutoff."""
    out: list[Dropped] = []
    tables = conn.execute("SELECT name, hypertable FROM amr_time_table ORDER BY name").fetchall()
    partitions = timeseries.Partitions().existing(conn)
    for table, hypertable in tables:
        if hypertable:
            chunks = conn.execute(
                "SELECT chunk_schema || '.' || chunk_name, range_start, range_end"
                " FROM timescaledb_information.chunks WHERE hypertable_name = %s AND range_end <= %s"
                " ORDER BY range_start", (table, cutoff)).fetchall()
            for part, lo, hi in chunks:
                out.append(Dropped(table, part, lo, hi, _count(conn, part)))
            continue
        for name, month in partitions:
            if name != table:
                continue
            hi_day = timeseries.next_month(month)
            hi = datetime(hi_day.year, hi_day.month, 1, tzinfo=UTC)
            if hi <= cutoff:
                part = f"{table}_p{month:%Y%m}"
                out.append(Dropped(table, part, datetime(month.year, month.month, 1, tzinfo=UTC), hi,
                                   _count(conn, part)))
    return out


def _count(conn: psycopg.Connection, part: str) -> int:
    schema, _, name = part.rpartition(".")
    ident = f'"{schema}"."{name}"' if schema else f'"{name}"'
    row = conn.execute(f"SELECT count(*) FROM {ident}").fetchone()
    return int(row[0]) if row else 0
