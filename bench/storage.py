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
or less for `reading`.

With --timescale the same rows also go into a database migrated with
timescale=True on PostgreSQL 17 + TimescaleDB 2.23, which runs here only as the
tests' PGlite server (WASM, in memory: tests/timescale_server.py). It has no
COPY FROM STDIN, which the Ingestor writes with, so the rows the Ingestor wrote
on plain PostgreSQL (reading_data, its dictionaries, interval_segment,
daily_zone_usage) and the bare table are moved in with INSERT. After VACUUM
ANALYZE, reading is measured before and after compress_chunk on every chunk of
reading_data and interval_segment: hypertable_size() (every chunk's heap,
indexes and TOAST, and after compression the compressed chunks' too) plus the
dictionaries, checked against chunk_compression_stats(); bare is the bare table
in the same PGlite database. PGlite (a 32-bit WASM build) keeps relations in
the on-disk format of a native build - the bare table measures the same bytes
there as on native PostgreSQL 15 - so the sizes hold; its speed is not measured.

    .venv/bin/python bench/storage.py              # 2,000 meters x 10 days = 960,000 readings
    .venv/bin/python bench/storage.py --quick      # 200 meters x 3 days
    .venv/bin/python bench/storage.py --timescale  # the same, and on TimescaleDB before and after compression
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

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
    ap.add_argument("--timescale", action="store_true",
                    help="also on TimescaleDB (the tests' PGlite server), before and after compression")
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
        stored = conn.execute("SELECT count(*) FROM reading_data").fetchone()[0]  # type: ignore[index]
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
        segments = int(conn.execute("SELECT count(*) FROM interval_segment").fetchone()[0])  # type: ignore[index]
        timescale = on_timescale(conn, args.meters, n) if args.timescale else None

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
    if timescale is not None:
        print_timescale(timescale, n, segments, per)
    return 0


class Timescale(NamedTuple):
    chunks: int
    reading_before: int  # hypertable_size('reading_data') + dictionaries, uncompressed
    reading_after: int  # the same, every chunk compressed
    stats_before: int  # chunk_compression_stats('reading_data'): before_compression_total_bytes
    stats_after: int  # after_compression_total_bytes
    segment_before: int  # hypertable_size('interval_segment')
    segment_after: int
    bare: int
    dictionaries: int  # reading_series + reading_source, in both reading figures
    detailed_after: tuple[int, int, int]  # hypertable_detailed_size('reading_data') compressed: heap, indexes, TOAST


def on_timescale(plain: psycopg.Connection, meters: int, n: int) -> Timescale:
    """plain's readings (as the Ingestor stored them) and bare table in a TimescaleDB database, measured."""
    from _timescale import copy_table, timescale_database

    print("TimescaleDB (PGlite): starting, migrating, moving the rows in ...", flush=True)
    with timescale_database() as ts:
        add_meters(ts, meters)
        for table in ("quality_flag", "reading_series", "reading_source", "reading_data", "interval_segment",
                      "daily_zone_usage"):
            copy_table(plain, ts, table)
        ts.execute("CREATE TABLE bare_reading (series integer, ts timestamptz, value numeric,"
                   " PRIMARY KEY (series, ts))")
        copy_table(plain, ts, "bare_reading")
        for table in ("reading_data", "bare_reading"):
            got = ts.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert got is not None and got[0] == n, (table, got, n)
        ts.commit()
        ts.autocommit = True
        ts.execute("VACUUM ANALYZE")

        def sizes() -> tuple[int, int]:
            def one(sql: str) -> int:
                row = ts.execute(sql).fetchone()
                assert row is not None and row[0] is not None, sql
                return int(row[0])
            dictionaries = table_bytes(ts, "reading_series") + table_bytes(ts, "reading_source")
            return (one("SELECT hypertable_size('reading_data')") + dictionaries,
                    one("SELECT hypertable_size('interval_segment')"))

        reading_before, segment_before = sizes()
        chunks = 0
        for table in ("reading_data", "interval_segment"):
            for (chunk,) in ts.execute(f"SELECT show_chunks('{table}')::text").fetchall():
                ts.execute("SELECT compress_chunk(%s::regclass)", (chunk,))
                chunks += table == "reading_data"
        ts.execute("VACUUM ANALYZE")
        reading_after, segment_after = sizes()
        detail = ts.execute("SELECT table_bytes, index_bytes, toast_bytes"
                            " FROM hypertable_detailed_size('reading_data')").fetchone()
        assert detail is not None
        row = ts.execute("SELECT sum(before_compression_total_bytes), sum(after_compression_total_bytes),"
                         " count(*) FILTER (WHERE compression_status <> 'Compressed')"
                         " FROM chunk_compression_stats('reading_data')").fetchone()
        assert row is not None and row[2] == 0, row
        back = ts.execute("SELECT count(*) FROM reading_data").fetchone()
        assert back is not None and back[0] == n, (back, n)
        return Timescale(chunks, reading_before, reading_after, int(row[0]), int(row[1]),
                         segment_before, segment_after, table_bytes(ts, "bare_reading"),
                         table_bytes(ts, "reading_series") + table_bytes(ts, "reading_source"),
                         (int(detail[0]), int(detail[1]), int(detail[2])))


def print_timescale(t: Timescale, n: int, segments: int, plain_per: float) -> None:
    before, after, bare = t.reading_before / n, t.reading_after / n, t.bare / n
    print()
    print(f"TimescaleDB 2.23 on PostgreSQL 17 (PGlite, WASM: on-disk format as native, speed not measured),"
          f" the same {n:,} readings")
    print(f"reading, uncompressed (hypertable_size + dictionaries)  {before:>7.1f} bytes a reading")
    print(f"reading, compressed ({t.chunks} chunk(s), compress_chunk)      {after:>7.1f} bytes a reading"
          f"   target <= 100: {'met' if after <= 100 else 'not met'}")
    print(f"  chunk_compression_stats(reading_data): {t.stats_before / n:.1f} -> {t.stats_after / n:.1f}"
          f" bytes a reading (chunks only: heap, indexes, TOAST)")
    heap, index, toast = (b / n for b in t.detailed_after)
    print(f"  compressed hypertable_detailed_size: heap {heap:.1f} + indexes {index:.1f} + TOAST {toast:.1f};"
          f" dictionaries {t.dictionaries / n:.1f} bytes a reading")
    if segments:
        print(f"interval_segment ({segments:,} rows) uncompressed -> compressed: {t.segment_before / n:.1f} -> "
              f"{t.segment_after / n:.1f} bytes a reading")
    print(f"bare (series, ts, value, key) in the same database  {bare:>7.1f} bytes a reading")
    print(f"ratio compressed reading / bare                    {after / bare:>7.2f}")
    print(f"ratio compressed / uncompressed                    {after / before:>7.2f}")
    print(f"ratio compressed / plain PostgreSQL reading        {after / plain_per:>7.2f}")


if __name__ == "__main__":
    sys.exit(main())
