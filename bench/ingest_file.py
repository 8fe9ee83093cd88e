"""Benchmark: `amr ingest FILE` (the command people run) vs a bare COPY of the same file.

A CSV export as head-ends and spreadsheets write it: one reading a line,
sorted by time (every meter's 00:00, then every meter's 00:30, ...). The
command runs as a process, the way a person or a cron job runs it, into a
fresh migrated database; then the same file is COPYed (CSV, PostgreSQL's
own parser, the `\\copy` of psql) into a plain table with the same key in the
same database: that is the physical limit the figure is compared with.

    .venv/bin/python bench/ingest_file.py               # 2,000 meters x 500 half-hours = 1,000,000 lines
    .venv/bin/python bench/ingest_file.py --quick       # 200 meters x 500
    .venv/bin/python bench/ingest_file.py --workers 1   # the command's --workers
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from _db import scratch_database  # noqa: E402

from collector.inventory import parse_inventory, upsert_inventory  # noqa: E402

START = datetime(2026, 10, 1, tzinfo=UTC) - timedelta(hours=3)  # local midnight, 1 October


def write_csv(path: Path, meters: int, slots: int) -> int:
    """meter_id,register,ts,value lines sorted by time; returns the number of readings."""
    values = [1000.0 + 37 * m for m in range(meters)]
    step = [0.05 + (m % 100) / 400 for m in range(meters)]
    ids = [f"f{m:05d}" for m in range(meters)]
    with path.open("w", encoding="utf-8") as f:
        f.write("meter_id,register,ts,value\n")
        for k in range(slots):
            ts = (START + timedelta(minutes=30 * k)).isoformat()
            lines = []
            for m in range(meters):
                lines.append(f"{ids[m]},1.8.0,{ts},{values[m]:.2f}\n")
                values[m] += step[m] * (1 + (k % 48 > 30))
            f.writelines(lines)
    return meters * slots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meters", type=int, default=2000)
    ap.add_argument("--slots", type=int, default=500, help="half-hours per meter (default 500)")
    ap.add_argument("--quick", action="store_true", help="200 meters x 500 half-hours")
    ap.add_argument("--workers", type=int, default=None, help="passed to amr ingest --workers")
    args = ap.parse_args()
    if args.quick:
        args.meters = 200
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "readings.csv"
        n = write_csv(csv_path, args.meters, args.slots)
        size_mb = csv_path.stat().st_size / 1e6
        print(f"{csv_path.name}: {n:,} readings, {size_mb:.1f} MB, sorted by time", flush=True)
        with scratch_database() as url:
            with psycopg.connect(url) as conn:
                upsert_inventory(conn, parse_inventory({
                    "subscriber": [{"account": "1"}],
                    "meter": [{"id": f"f{m:05d}", "account": "1", "installed": "2026-01-01T00:00:00+03:00"}
                              for m in range(args.meters)],
                }))
                conn.commit()
            cmd = [str(ROOT / ".venv/bin/amr"), "ingest", str(csv_path), "--json"]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            env = {**os.environ, "AMR_DATABASE_URL": url}
            load_before = os.getloadavg()
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            ingest_s = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its worker processes
            cpu_s = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
            if out.returncode != 0:
                print(out.stdout, out.stderr, file=sys.stderr)
                return 1
            with psycopg.connect(url) as conn:
                stored = conn.execute("SELECT count(*) FROM reading").fetchone()[0]
                assert stored == n, (stored, n)
                conn.execute("CREATE TABLE raw_reading (meter_id text, register text, ts timestamptz,"
                             " value numeric, PRIMARY KEY (meter_id, register, ts))")
                conn.commit()
                t0 = time.perf_counter()
                with conn.cursor() as cur, cur.copy("COPY raw_reading FROM STDIN (FORMAT CSV, HEADER)") as cp, \
                        csv_path.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        cp.write(chunk)
                conn.commit()
                raw_s = time.perf_counter() - t0
            load_after = os.getloadavg()
    rate, raw = n / ingest_s, n / raw_s
    workers = "default" if args.workers is None else args.workers
    print(f"amr ingest (whole command)  {rate:>12,.0f} readings/s   ({ingest_s:.1f} s; parse, validate, store, "
          "intervals, zones, daily totals)")
    print(f"  its CPU (not the server's) {cpu_s:>11.1f} s      ({n / cpu_s:,.0f} readings per CPU second: "
          "less swayed than the rate by others' load)")
    print(f"COPY of the same file       {raw:>12,.0f} readings/s   ({raw_s:.1f} s; the physical limit)")
    print(f"ratio                       {rate / raw:>12.2f}   (target 0.5; --workers {workers})")
    # the machine may be shared: the figures mean little without what else was running
    print(f"load average                {load_before[0]:>12.2f}   (1 minute; {load_after[0]:.2f} after the COPY)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
