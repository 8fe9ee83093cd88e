"""Benchmark: readings/s through the ingestion entry point vs the raw COPY rate.

Simulated 30-minute data for many meters, delivered time-major (as gateways
send it), goes through collector.ingest.ingestor.Ingestor: validation, idempotent
store, interval derivation, zone splitting and daily totals. Each call takes
a day's load profile of every meter (48 readings a meter), the way a head-end
collects half-hourly profiles once a day; `--batch` sets another size. The same rows are
then COPYed (binary, the fastest path psycopg has) into a plain table shaped
like `reading`, in the same database, in the same run: that is the physical
limit the figure is compared with.

    .venv/bin/python bench/ingest.py              # 2,000 meters x 31 days = 2.98 M readings
    .venv/bin/python bench/ingest.py --quick      # 200 meters x 7 days
    .venv/bin/python bench/ingest.py --batch 20000  # 10 readings a meter per call
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import psycopg
from _db import scratch_database

from adapters.reading import Reading
from amr.runtime import tune_gc
from collector.ingest.ingestor import Ingestor
from collector.inventory import parse_inventory, upsert_inventory
from simulators.consumption import ConsumptionModel

START = datetime(2026, 10, 1, tzinfo=UTC) - timedelta(hours=3)  # local midnight, 1 October


def generate(meters: int, days: int, first_day: int = 0) -> list[Reading]:
    """Counter values from the consumption model; each meter its own scale and start.

    `first_day` skips that many days: the readings that follow on from them.
    """
    model = ConsumptionModel(seed=7)
    steps = (first_day + days) * 48
    base = [model.energy_kwh(START + timedelta(minutes=30 * k)) for k in range(steps + 1)]
    incs = [b - a for a, b in itertools.pairwise(base)]
    out: list[Reading] = []
    values = [Decimal(1000 + 37 * m) for m in range(meters)]
    scale = [Decimal(50 + m % 100) / 100 for m in range(meters)]
    ids = [f"b{m:05d}" for m in range(meters)]
    empty: frozenset[str] = frozenset()
    for k in range(steps):
        ts = START + timedelta(minutes=30 * k)
        inc = incs[k]
        keep = k >= first_day * 48
        for m in range(meters):
            if keep:
                out.append(Reading(ids[m], "1.8.0", ts, values[m], empty, "bench"))
            values[m] = (values[m] + inc * scale[m]).quantize(Decimal("0.01"))
    return out


def add_meters(conn: psycopg.Connection, meters: int) -> None:
    """The meters generate() reads for (b00000, b00001, ...), on one account, through the inventory path."""
    upsert_inventory(conn, parse_inventory({
        "subscriber": [{"account": "1"}],
        "meter": [{"id": f"b{m:05d}", "account": "1", "installed": "2026-01-01T00:00:00+03:00"}
                  for m in range(meters)],
    }))
    conn.commit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meters", type=int, default=2000)
    ap.add_argument("--days", type=int, default=31)
    ap.add_argument("--batch", type=int, default=0,
                    help="readings per ingest call (default: one day of every meter, meters x 48)")
    ap.add_argument("--quick", action="store_true", help="200 meters x 7 days")
    ap.add_argument("--no-tail", action="store_true",
                    help="read every register's last readings from the database on each call, as before the "
                    "in-memory tail (migration 026)")
    ap.add_argument("--gc-defaults", action="store_true",
                    help="keep CPython's default cycle collector thresholds (what amr.runtime.tune_gc gains)")
    args = ap.parse_args()
    if not args.gc_defaults:
        tune_gc()  # as `amr` does in every command
    if args.quick:
        args.meters, args.days = 200, 7
    args.batch = args.batch or args.meters * 48

    print(f"generating {args.meters} meters x {args.days} days of 30-minute readings ...", flush=True)
    readings = generate(args.meters, args.days)
    n = len(readings)
    with scratch_database() as url, psycopg.connect(url) as conn:
        add_meters(conn, args.meters)
        ing = Ingestor(conn, clock=lambda: datetime(2026, 12, 1, tzinfo=UTC), tail=not args.no_tail)
        t0 = time.perf_counter()
        accepted = 0
        for i in range(0, n, args.batch):
            accepted += ing.ingest(readings[i : i + args.batch]).accepted
            done = min(i + args.batch, n)
            if (i // args.batch) % max(1, 400_000 // args.batch) == 0:
                print(f"  ingested {done:>9,} / {n:,}  ({done / (time.perf_counter() - t0):,.0f}/s)", flush=True)
        ingest_s = time.perf_counter() - t0
        assert accepted == n, (accepted, n)
        intervals = conn.execute("SELECT count(*) FROM interval_usage").fetchone()[0]
        days = conn.execute("SELECT count(*) FROM daily_zone_usage").fetchone()[0]

        conn.execute("CREATE TABLE raw_reading (meter_id text, register text, ts timestamptz,"
                     " value numeric, quality text[], source text, PRIMARY KEY (meter_id, register, ts))")
        conn.commit()
        t0 = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY raw_reading FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["text", "text", "timestamptz", "numeric", "text[]", "text"])
            for r in readings:
                cp.write_row((r.meter_id, r.register, r.ts, r.value, [], r.source))
        conn.commit()
        raw_s = time.perf_counter() - t0

    rate, raw = n / ingest_s, n / raw_s
    print()
    print(f"readings                    {n:>12,}   ({intervals:,} interval rows, {days:,} daily zone rows)")
    print(f"per ingest call             {args.batch:>12,}   ({args.batch / args.meters:g} readings a meter)")
    print(f"ingestion entry point       {rate:>12,.0f} readings/s   ({ingest_s:.1f} s; validation, store, "
          "intervals, zones, daily totals)")
    print(f"raw binary COPY, same rows  {raw:>12,.0f} readings/s   ({raw_s:.1f} s; the physical limit)")
    print(f"ratio                       {rate / raw:>12.2f}")
    print(f"windows from the tail       {ing.tail_hits:>12,}   (of {n // args.batch * args.meters:,} register-calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
