"""Monthly partitions made by several sessions at once (amr.storage.timeseries.Partitions)."""

from __future__ import annotations

import threading
from datetime import date

import psycopg

from amr.storage.timeseries import Partitions


def test_sessions_making_the_same_partitions_at_once_all_succeed(db_url: str) -> None:
    """Two ingesting processes on a fresh database both find a month missing and make it:
    CREATE TABLE IF NOT EXISTS alone lets the second fail with DuplicateTable."""
    sessions = 4
    months = [date(2001 + k // 12, k % 12 + 1, 1) for k in range(24)]
    errors: list[BaseException] = []
    for month in months:
        start = threading.Barrier(sessions)

        def make(month: date = month, start: threading.Barrier = start) -> None:
            try:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    parts = Partitions()
                    parts.missing(conn, [month])  # loads what exists before the race
                    start.wait()
                    parts.ensure_months(conn, [month])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=make) for _ in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    with psycopg.connect(db_url) as conn:
        made = conn.execute("SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE 'reading_data_p200%'").fetchone()[0]
    assert made == len(months)
