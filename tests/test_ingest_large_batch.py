"""A batch naming more meters than one transaction may lock (collector.ingest.ingestor)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg

from adapters.reading import Reading
from collector.ingest.ingestor import Ingestor
from collector.inventory import parse_inventory, upsert_inventory
from tests.helpers import T0


def _clock() -> datetime:
    return datetime(2027, 1, 1, tzinfo=UTC)


def test_a_batch_of_more_meters_than_the_lock_table_holds_is_stored(db_url: str) -> None:
    """Each meter is locked for its transaction; a batch naming more meters than the server's
    shared lock table holds is stored in parts of whole meters, not refused for ever."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        per, conns, prepared = (int(conn.execute(f"SHOW {s}").fetchone()[0]) for s in
                                ("max_locks_per_transaction", "max_connections", "max_prepared_transactions"))
        n = 3 * per * (conns + prepared)  # the table has some slack beyond its nominal size
        upsert_inventory(conn, parse_inventory({
            "subscriber": [{"account": "1"}],
            "meter": [{"id": f"L{m:05d}", "account": "1", "installed": "2026-01-01T00:00:00+03:00"}
                      for m in range(n)]}))
        conn.commit()
        day = [Reading(f"L{m:05d}", "1.8.0", T0 + timedelta(minutes=30 * k), Decimal(100 + k))
               for k in range(2) for m in range(n)]
        ing = Ingestor(conn, clock=_clock)
        first = ing.ingest(day)
        again = ing.ingest(day)
        assert (first.accepted, again.duplicate) == (2 * n, 2 * n)
        assert conn.execute("SELECT count(*) FROM interval_usage").fetchone()[0] == n
