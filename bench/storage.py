"""Benchmark: bytes per stored reading on plain PostgreSQL, beside the bare minimum for the same rows.

30-minute readings of many meters go through the ingestion entry point
(collector.ingest.ingestor.Ingestor, a day of every meter per call, as
bench/ingest.py does), so the rows are what production writes: the compact
`reading_data` of migration 023 with its primary key, each reading's interval
energy, zone, status and flags in the same row. Then, after a plain VACUUM
(what autovacuum leaves; no VACUUM FULL, which production does not run):

- reading: reading_data's partitions, their indexes and TOAST, and the
  dictionaries behind the view (reading_series, reading_source), per reading;
- derived: interval_usage and daily_zone_usage, the tables billing reads, per
  reading (reported apart: they are not the reading);
- bare: the same readings COPYed into the smallest table that still holds them
  with their key, (series integer, ts timestamptz, value numeric, PRIMARY KEY
  (series, ts)) - the physical limit a layout with a B-tree key can reach.

The figure is reading / bare, and the issue's target is 100 bytes a reading
or less for `reading`. TimescaleDB's compressed figure is not measured here:
TimescaleDB runs only in the tests' WASM server on this machine kind.

    .venv/bin/python bench/storage.py            # 2,000 meters x 10 days = 960,000 readings
    .venv/bin/python bench/storage.py --quick    # 200 meters x 3 days
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from _db import scratch_database
from ingest import add_meters, generate

from amr.runtime import tune_gc
from collector.ingest.ingestor import Ingestor


def table_bytes(conn: psycopg.Connection, root: str) -> int:
    """Heap, indexes and TOAST of a table and of every partition under it."""
    row = conn.execute(
        "SELECT coalesce((SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(%s::regclass)),"
        " pg_total_relation_size(%s::regclass))", (root, root)).fetchone()
    assert row is not None
    return int(row[0])


def relkind(conn: psycopg.Connection, name: str) -> str:
    row = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meters", type=int, default=2000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="200 meters x 3 days")
    args = ap.parse_args()
    tune_gc()
    if args.quick:
        args.meters, args.days = 200, 3
    print(f"generating {args.meters} meters x {args.days} days of 30-minute readings ...", flush=True)
    readings = generate(args.meters, args.days)
    n = len(readings)
    batch = args.meters * 48
    with scratch_database("amr_bench_storage") as url, psycopg.connect(url) as conn:
        add_meters(conn, args.meters)
        ing = Ingestor(conn, clock=lambda: datetime(2026, 12, 1, tzinfo=UTC))
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            assert ing.ingest(readings[i:i + batch]).accepted == min(batch, n - i)
            print(f"  ingested {min(i + batch, n):>9,} / {n:,}", flush=True)
        ingest_s = time.perf_counter() - t0
        stored = conn.execute("SELECT count(*) FROM reading_data").fetchone()[0]
        assert stored == n, (stored, n)

        conn.execute("CREATE TABLE bare_reading (series integer, ts timestamptz, value numeric,"
                     " PRIMARY KEY (series, ts))")
        conn.commit()
        with conn.cursor() as cur, cur.copy("COPY bare_reading FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "timestamptz", "numeric"])
            series = {f"b{m:05d}": m + 1 for m in range(args.meters)}
            for r in readings:
                cp.write_row((series[r.meter_id], r.ts, r.value))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
        reading_b = (table_bytes(conn, "reading_data") + table_bytes(conn, "reading_series")
                     + table_bytes(conn, "reading_source"))
        # interval_usage is a view over reading_data since migration 023: its bytes are the reading's
        derived_b = sum(table_bytes(conn, t) for t in ("interval_usage", "daily_zone_usage")
                        if relkind(conn, t) in ("r", "p"))
        bare_b = table_bytes(conn, "bare_reading")

    per, bare = reading_b / n, bare_b / n
    print()
    print(f"readings stored             {n:>12,}   (ingested in {ingest_s:.1f} s)")
    print(f"reading (reading_data, key, dictionaries)  {per:>7.1f} bytes a reading   target <= 100: "
          f"{'met' if per <= 100 else 'not met'}")
    print(f"derived (interval_usage, daily totals)     {derived_b / n:>7.1f} bytes a reading")
    print(f"bare (series, ts, value, key), the limit   {bare:>7.1f} bytes a reading")
    print(f"ratio reading / bare                       {per / bare:>7.2f}")
    print(f"at 86 million readings a day: {per * 86e6 * 365 / 1e12:.1f} TB a year for reading "
          f"(+{derived_b / n * 86e6 * 365 / 1e12:.1f} TB derived)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
