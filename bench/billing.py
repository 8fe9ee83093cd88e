"""Benchmark: bill a city's month (100,000 subscribers, a month of 30-minute data).

The zone usage a month of 30-minute readings leaves behind (one row per
meter, local day and zone in daily_zone_usage) is made directly by the
server in one INSERT ... SELECT over generate_series, which is faster than
any client-side COPY and is not what is measured. Then it times:

- the bare aggregate: one SQL query summing the month's zone usage per meter
  and zone, all rows fetched to the client: the floor any billing run pays;
- `bill_period` on the same data, first run (every bill new, written with
  COPY) and second run (nothing changed: every bill compared, none written).

It prints total time, subscribers/s and the ratio to the bare aggregate.
Targets: the whole first run under 60 s, within 3 times the bare aggregate.

    .venv/bin/python bench/billing.py            # 100,000 subscribers
    .venv/bin/python bench/billing.py --quick    # 10,000 subscribers
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import date
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amr.storage import migrate  # noqa: E402
from billing.engine import bill_period, month_days  # noqa: E402
from billing.tariffs import load_catalogue_file, store_catalogue  # noqa: E402


def _with_db(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def populate(conn: psycopg.Connection, n: int, period: date) -> int:
    """Subscribers of every plan and category, one meter each, a month of zone usage."""
    first, last = month_days(period)
    conn.execute(
        "INSERT INTO subscriber (account, metering, plan, category, area)"
        " SELECT g::text, 'amr', (ARRAY['single','two_zone','three_zone'])[1 + g %% 3],"
        " (ARRAY['gas_stove','electric_stove'])[1 + (g / 3) %% 2],"
        " (ARRAY['urban','urban','rural'])[1 + (g / 7) %% 3]"
        " FROM generate_series(1, %s) g", (n,))
    # every meter installed long ago; one in a hundred taken out on the 15th (its later days
    # must not count, which exercises the day-by-day clipping)
    conn.execute("INSERT INTO meter (id, account, adapter, installed, removed)"
                 " SELECT 'm-' || g, g::text, 'modbus_tcp', '2025-01-01T00:00+03:00',"
                 " CASE WHEN g %% 100 = 0 THEN %s::timestamptz END"
                 " FROM generate_series(1, %s) g", (f"{first.replace(day=15)}T12:00+03:00", n))
    # per day: night 16 half-hours, peak 14, half-peak 18 of a household's load, kWh to 0.001
    conn.execute(
        "INSERT INTO daily_zone_usage (meter_id, day, zone, kwh, estimated_kwh)"
        " SELECT 'm-' || g, d::date, z.zone,"
        " round((z.slots * (0.10 + random() * 0.25))::numeric, 3),"
        " CASE WHEN random() < 0.02 THEN round((random() * 0.5)::numeric, 3) ELSE 0 END"
        " FROM generate_series(1, %s) g"
        " CROSS JOIN generate_series(%s::date, %s::date, interval '1 day') d"
        " CROSS JOIN (VALUES ('night', 16), ('peak', 14), ('half_peak', 18)) z(zone, slots)",
        (n, first, last))
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE subscriber")
    conn.execute("VACUUM ANALYZE meter")
    conn.execute("VACUUM ANALYZE daily_zone_usage")
    conn.autocommit = False
    return n * ((last - first).days + 1) * 3


def bare_aggregate(conn: psycopg.Connection, period: date) -> tuple[float, int]:
    first, last = month_days(period)
    conn.execute("SET LOCAL work_mem = '256MB'")  # the same settings the billing run uses
    conn.execute("SET LOCAL jit = off")
    t = time.perf_counter()
    rows = conn.execute(
        "SELECT meter_id, zone, sum(kwh), sum(estimated_kwh), sum(suspect_kwh)"
        " FROM daily_zone_usage WHERE day BETWEEN %s AND %s GROUP BY 1, 2", (first, last)).fetchall()
    conn.commit()
    return time.perf_counter() - t, len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=100_000, help="how many (default 100000)")
    p.add_argument("--quick", action="store_true", help="10,000 subscribers, for a fast check")
    p.add_argument("--period", default="2026-10", help="the month billed (default 2026-10)")
    p.add_argument("--admin-url", default=os.environ.get(
        "AMR_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to create databases (default: AMR_TEST_ADMIN_URL or local)")
    p.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = p.parse_args(argv)
    n = 10_000 if args.quick else args.subscribers
    y, m = args.period.split("-")
    period = date(int(y), int(m), 1)

    name = f"amr_bench_billing_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        with psycopg.connect(_with_db(args.admin_url, name)) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            migrate.migrate(conn, timescale=False)
            conn.commit()
            store_catalogue(conn, load_catalogue_file(ROOT / "billing" / "catalogues" / "example.toml"))
            t = time.perf_counter()
            rows = populate(conn, n, period)
            print(f"setup: {n} subscribers, {rows} daily zone rows (= {rows // 3 * 48} half-hours) "
                  f"in {time.perf_counter() - t:.1f} s (not measured)")
            bare_aggregate(conn, period)  # warm the cache, as the billing run would find it
            bare, groups = min(bare_aggregate(conn, period) for _ in range(2))
            first = bill_period(conn, period)
            second = bill_period(conn, period)
            print(f"bare SQL aggregate (physical limit): {bare:.2f} s for {groups} meter-zone sums")
            for label, s in (("first run (all bills written)", first),
                             ("second run (unchanged, nothing written)", second)):
                print(f"billing {label}: {s.seconds:.2f} s, {n / s.seconds:,.0f} subscribers/s, "
                      f"{s.seconds / bare:.2f}x the bare aggregate "
                      f"[billed {s.billed}, unchanged {s.unchanged}, new versions {s.new_versions}, "
                      f"held back {len(s.held_back)}]")
                ph = s.phases
                print(f"  phases: aggregate {ph.get('aggregate', 0):.2f} s, pricing "
                      f"{ph.get('priced', 0) - ph.get('aggregate', 0):.2f} s, writing "
                      f"{ph.get('written', 0) - ph.get('priced', 0):.2f} s")
            ok = first.seconds < 60 and first.seconds <= 3 * bare
            print(f"targets (< 60 s, <= 3x bare aggregate): {'met' if ok else 'NOT met'}")
    finally:
        if not args.keep:
            with psycopg.connect(args.admin_url, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        else:
            print(f"kept database {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
