"""Numbered SQL migrations, applied in order, each once, in its own transaction.

`amr db migrate` is safe to rerun and refuses a database whose schema is newer
than this code, so an old gateway binary can never write into a schema it
does not understand.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import NamedTuple

import psycopg

from amr.storage import retention, timeseries

_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


class SchemaTooNew(RuntimeError):
    pass


def available() -> list[Migration]:
    """The migrations shipped with this code, in order."""
    found = []
    for entry in resources.files("amr.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number: {versions}")
    return found


def applied_versions(conn: psycopg.Connection) -> set[int]:
    row = conn.execute("SELECT to_regclass('amr_schema_migration')").fetchone()
    if not row or row[0] is None:
        return set()
    return {r[0] for r in conn.execute("SELECT version FROM amr_schema_migration").fetchall()}


def current_version(conn: psycopg.Connection) -> int:
    return max(applied_versions(conn), default=0)


def migrate(conn: psycopg.Connection, *, timescale: bool | None = None) -> list[Migration]:
    """Apply what is missing; return the migrations applied now."""
    migrations = available()
    latest = migrations[-1].version if migrations else 0
    with conn.transaction():
        # one migrator at a time, even with several gateways starting together
        conn.execute("SELECT pg_advisory_xact_lock(7217001)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS amr_schema_migration (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS amr_time_table (name text PRIMARY KEY,"
            " column_name text NOT NULL, chunk text NOT NULL, hypertable boolean NOT NULL,"
            " retention text)"
        )
        have = applied_versions(conn)
        if max(have, default=0) > latest:
            raise SchemaTooNew(
                f"the database schema is at version {max(have)}, newer than this code knows "
                f"({latest}); upgrade amr before running it against this database"
            )
        if timescale is None:
            timescale = timeseries.timescale_available(conn)
        if timescale:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    applied = []
    # every shipped migration not yet applied, in order: a lower number added later
    # (a branch merged after a higher one was released) is applied too, not skipped
    for mig in migrations:
        if mig.version in have:
            continue
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(7217001)")
            if mig.version in applied_versions(conn):
                continue
            sql, tables = timeseries.render(mig.sql, timescale)
            conn.execute(sql)
            for table in tables:
                timeseries.setup_time_table(conn, table, timescale)
            conn.execute(
                "INSERT INTO amr_schema_migration (version, name) VALUES (%s, %s)",
                (mig.version, mig.name),
            )
        applied.append(mig)
    prepare_partitions(conn)  # never retention: migrating deletes nothing
    return applied


def prepare_partitions(conn: psycopg.Connection, now: datetime | None = None) -> None:
    """Create the monthly partitions around now (plain PostgreSQL; TimescaleDB makes chunks itself).

    Run by `amr db migrate` and `amr db maintain` (daily, from a timer); ingestion
    also creates the partitions a batch needs, so a missed run loses nothing.
    Deletes nothing: retention is `maintain`'s, and only when configured.
    """
    now = now or datetime.now(UTC)
    with conn.transaction():
        timeseries.Partitions().ensure(conn, now - timedelta(days=62), now + timedelta(days=92))


def maintain(conn: psycopg.Connection, now: datetime | None = None, *, retention_months: int | None = None,
             dry_run: bool = False) -> retention.RetentionReport:
    """The daily upkeep: partitions ahead, and the retention policy when one is configured.

    `retention_months` None (AMR_RETENTION unset, the default) drops nothing.
    """
    now = now or datetime.now(UTC)
    if not dry_run:
        prepare_partitions(conn, now)
    return retention.apply(conn, retention_months, now, dry_run=dry_run)
