"""Benchmark: a utility-scale run, inventory to bills, through the MQTT collector.

In a fresh database it:

1. builds an inventory of `--meters` meters (default 1,000,000), each on an
   account of its own (plans, categories and areas mixed), through the
   inventory upsert (collector.inventory), 10,000 meters a call;
2. ingests one day of 30-minute data (48 readings a meter, local day
   2026-10-01) through the MQTT collector path: amr/v1 messages of 100
   readings, one gateway per 100 meters each on its own topic, queued in a
   Mosquitto of its own for a persistent session, then drained by a real
   collector process (`Consumer` with `--workers` ingestion processes: decode,
   validate, store, intervals, zones, daily totals, PUBACK);
3. the same for a second day on top of the first;
4. bills the month (billing.engine.bill_period) for every account.

Beside each stage, in the same run: raw COPY of the same day's rows into a
bare table (meter text, register text, ts, value numeric, PRIMARY KEY),
the second day on top of the first; and the bare SQL aggregate of the month
billing starts from (bench/billing.py). It prints each stage's time and rate,
the database size after each day, and the peak RSS (VmHWM) of the collector
process and of each of its workers. A run smaller than 1,000,000 meters ends
with the linear extrapolation of its figures to 1,000,000 (an extrapolation,
not a measurement). Before starting it checks that the machine's free disk and
memory can hold the run and, if not, runs the largest size that fits.

Targets at 1,000,000 meters: each day under 10 minutes, the second day no
slower than the first by more than 10 %, billing under 2 minutes.

    .venv/bin/python bench/scale.py                 # 1,000,000 meters (hours on 2 cores)
    .venv/bin/python bench/scale.py --meters 20000  # 960,000 readings a day, minutes
    .venv/bin/python bench/scale.py --meters 20000 --order profile --batch 500  # day profiles
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from _db import scratch_database  # noqa: E402
from ingest import generate  # noqa: E402
from mqtt import Mosquitto, create_session, publish_all  # noqa: E402

from adapters.wire import AMR_SUBSCRIBE, amr_v1_payload  # noqa: E402
from amr.runtime import tune_gc  # noqa: E402
from amr.settings import Settings  # noqa: E402
from billing.engine import bill_period  # noqa: E402
from billing.tariffs import load_catalogue_file, store_catalogue  # noqa: E402
from collector.inventory import parse_inventory, upsert_inventory  # noqa: E402
from collector.mqtt.client import parse_broker_url  # noqa: E402
from collector.mqtt.consumer import Consumer, shared  # noqa: E402

# bench/billing.py shares its name with the billing package: load it under another
_spec = importlib.util.spec_from_file_location("bench_billing", Path(__file__).with_name("billing.py"))
assert _spec is not None and _spec.loader is not None
bench_billing: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_billing)

FULL = 1_000_000
PER_MESSAGE = 100
SLOTS = 48
PERIOD = date(2026, 10, 1)
# what a reading costs (bench/storage.py: 103.6 bytes stored + 9.7 of daily totals; the bare
# table about 100) and what a queued 100-reading message costs in memory, for the pre-flight check
DB_BYTES_PER_READING = 115 + 100
CHUNK = 10_000


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f}, {b:.2f}, {c:.2f}"


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a process, in kB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_pids(parent: int) -> list[int]:
    """The ingestion worker processes (`python -m collector.mqtt.workers`) of `parent`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"collector.mqtt.workers" in cmd:
            out.append(int(d.name))
    return sorted(out)


def preflight(meters: int, db_url: str) -> int:
    """The largest size up to `meters` the free disk and memory hold; says what it checked."""
    msg_bytes = len(day_messages(PER_MESSAGE, 0)[0][1]) + 300  # payload, topic, Python's/the broker's overhead
    # a day's messages live twice at once (this process, the broker) and once more in part (the
    # collector's queue); the day's readings, made before its messages, about 250 bytes each
    mem_per_meter = 3 * SLOTS / PER_MESSAGE * msg_bytes + SLOTS * 250
    disk_per_meter = 2 * SLOTS * DB_BYTES_PER_READING
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    data_dir = row[0]
    disk = shutil.disk_usage(data_dir if Path(data_dir).exists() else "/").free
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemAvailable:"))
    fits = min(int(0.8 * disk / disk_per_meter), int(0.6 * mem / mem_per_meter))
    print(f"pre-flight: {meters:,} meters need about {meters * disk_per_meter / 1e9:.1f} GB of disk "
          f"({disk / 1e9:.1f} GB free) and {meters * mem_per_meter / 1e9:.1f} GB of memory "
          f"({mem / 1e9:.1f} GB available); the largest that fits: {fits:,} meters")
    if meters > fits:
        print(f"  the machine cannot hold {meters:,} meters: running {fits:,}, extrapolated to {meters:,}")
        return fits
    return meters


def build_inventory(conn: psycopg.Connection, meters: int) -> float:
    """Meters b00000, b00001, ... (bench/ingest.py's generate), each on an account of its own."""
    t0 = time.perf_counter()
    last = t0
    for lo in range(0, meters, CHUNK):
        ns = range(lo, min(lo + CHUNK, meters))
        upsert_inventory(conn, parse_inventory({
            "subscriber": [{"account": str(n + 1), "metering": "amr",
                            "plan": ("single", "two_zone", "three_zone")[n % 3],
                            "category": ("gas_stove", "electric_stove")[(n // 3) % 2],
                            "area": ("urban", "urban", "rural")[(n // 7) % 3]} for n in ns],
            "meter": [{"id": f"b{n:05d}", "account": str(n + 1), "adapter": "mqtt",
                       "installed": "2026-01-01T00:00:00+03:00"} for n in ns],
        }))
        conn.commit()
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            print(f"  inventory {ns.stop:>9,} / {meters:,}  ({ns.stop / (last - t0):,.0f} meters/s)", flush=True)
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE subscriber")
    conn.execute("VACUUM ANALYZE meter")
    conn.autocommit = False
    return time.perf_counter() - t0


def day_messages(meters: int, day: int, order: str = "slot") -> list[tuple[str, bytes]]:
    """One local day of every meter (bench/ingest.py's readings) in amr/v1 messages of 100 readings.

    One gateway per 100 meters, each on its own topic. `order` "slot": each
    half-hour, every gateway publishes that slot's readings of its meters (a
    live fleet); "profile": each gateway publishes its meters' day profiles,
    meter by meter (a once-a-day load-profile upload).
    """
    readings = generate(meters, 1, first_day=day)
    out = []
    if order == "slot":
        for i in range(0, len(readings), PER_MESSAGE):
            gw = f"gw{(i % meters) // PER_MESSAGE}"
            out.append((f"amr/v1/{gw}/readings", amr_v1_payload(readings[i: i + PER_MESSAGE], gw)))
        return out
    for lo in range(0, meters, PER_MESSAGE):
        gw = f"gw{lo // PER_MESSAGE}"
        own = [readings[k * meters + m] for m in range(lo, min(lo + PER_MESSAGE, meters)) for k in range(SLOTS)]
        out.extend((f"amr/v1/{gw}/readings", amr_v1_payload(own[i: i + PER_MESSAGE], gw))
                   for i in range(0, len(own), PER_MESSAGE))
    return out


def collect(port: int, url: str, msgs: list[tuple[str, bytes]], workers: int, batch: int,
            ) -> tuple[float, int, list[int]]:
    """Queue `msgs` for a collector's session, start a collector process, time its drain.

    Returns (seconds, the collector's peak RSS kB, each worker's peak RSS kB).
    """
    cid = f"scale-col-{uuid.uuid4().hex[:6]}"
    group = f"scale{uuid.uuid4().hex[:6]}"
    create_session(port, cid, shared(group, AMR_SUBSCRIBE[0]))
    t = time.perf_counter()
    publish_all(port, msgs)
    print(f"  queued {len(msgs):,} messages in the broker in {time.perf_counter() - t:.1f} s (not timed)",
          flush=True)
    child = subprocess.Popen([sys.executable, __file__, "--collector", str(port), url, cid, group, str(batch),
                              str(workers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("the collector process did not start")
        t0 = time.perf_counter()
        child.stdin.write("go\n")
        child.stdin.flush()
        last, stored = t0, 0
        while stored < len(msgs):
            line = child.stdout.readline()
            if not line:
                raise SystemExit(f"the collector process ended after {stored:,} of {len(msgs):,} messages")
            stored = int(line.split()[1])
            if time.perf_counter() - last > 15 and stored < len(msgs):
                last = time.perf_counter()
                print(f"  stored {stored * PER_MESSAGE:>11,} / {len(msgs) * PER_MESSAGE:,} readings  "
                      f"({stored * PER_MESSAGE / (last - t0):,.0f}/s; {load()})", flush=True)
        dt = time.perf_counter() - t0
        rss = peak_rss_kb(child.pid), [peak_rss_kb(p) for p in worker_pids(child.pid)]
        child.stdin.write("stop\n")
        child.stdin.flush()
        child.wait(60)
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait(30)
    return dt, rss[0], rss[1]


def _collector(port: str, url: str, cid: str, group: str, batch: str, workers: str) -> int:
    """The collector process of collect(): prepared, then on "go" consumes, reporting messages stored."""
    consumer = Consumer(parse_broker_url(f"mqtt://127.0.0.1:{port}"), url, cid, group=group,
                        families=["amr"], settings=Settings(database_url=url, metrics_port=0),
                        batch_messages=int(batch), batch_wait=0.02, receive_maximum=65535,
                        workers=int(workers))
    signal.signal(signal.SIGTERM, lambda *a: consumer.stop())
    consumer.prepare()  # workers started and connected: a running collector, not its start-up
    print("ready", flush=True)
    sys.stdin.readline()
    th = threading.Thread(target=consumer.run, daemon=True)
    th.start()
    def stop_on_line() -> None:
        sys.stdin.readline()
        consumer.stop()

    threading.Thread(target=stop_on_line, daemon=True).start()
    while th.is_alive():
        print(f"stored {consumer.stored_messages}", flush=True)
        time.sleep(0.25)
    th.join()
    return 0


def raw_copy(conn: psycopg.Connection, msgs: list[tuple[str, bytes]]) -> float:
    """COPY the readings of `msgs` into the bare table; only the COPY and its commit are timed."""
    conn.execute("CREATE TABLE IF NOT EXISTS bare_reading (meter text, register text, ts timestamptz,"
                 " value numeric, PRIMARY KEY (meter, register, ts))")
    conn.commit()
    spent = 0.0
    with conn.cursor() as cur, cur.copy("COPY bare_reading FROM STDIN") as cp:
        for i in range(0, len(msgs), 1000):
            block = "".join(f"{r['meter']}\t{r['register']}\t{r['ts']}\t{r['value']}\n"
                            for _, p in msgs[i: i + 1000] for r in json.loads(p)["readings"]).encode()
            t = time.perf_counter()
            cp.write(block)
            spent += time.perf_counter() - t
        t = time.perf_counter()
    conn.commit()
    return spent + time.perf_counter() - t


def db_size(conn: psycopg.Connection) -> int:
    """The database's bytes, without the bare comparison table."""
    row = conn.execute("SELECT pg_database_size(current_database())"
                       " - coalesce(pg_total_relation_size(to_regclass('bare_reading')), 0)").fetchone()
    conn.commit()
    assert row is not None
    return int(row[0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--collector"]:
        tune_gc()
        return _collector(*argv[1:7])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Needs PostgreSQL (AMR_BENCH_ADMIN_URL) and /usr/sbin/mosquitto.")
    p.add_argument("--meters", type=int, default=FULL, help="meters in the inventory (1000000)")
    p.add_argument("--workers", type=int, default=2, help="ingestion processes of the collector (2)")
    p.add_argument("--batch", type=int, default=40, help=(
        "messages per transaction, as amr collect --batch (40: a slot's messages carry 100 different "
        "meters each and ingestion takes a transaction lock per meter, so 500 messages, 50,000 meters, "
        "overflow the server's lock table of max_locks_per_transaction x max_connections, 6,400 by default)"))
    p.add_argument("--order", choices=("slot", "profile"), default="slot", help=(
        "slot: every half-hour each gateway publishes its meters' readings (default); profile: each "
        "gateway publishes its meters' day profiles, 48 readings a meter in a row"))
    args = p.parse_args(argv)
    tune_gc()  # as `amr` does in every command
    print(f"{os.cpu_count()} CPUs; {load()}; messages in {args.order} order, {args.batch} a transaction, "
          f"{args.workers} ingestion workers")
    with scratch_database("amr_bench_scale") as url, psycopg.connect(url) as conn:
        n = preflight(args.meters, url)
        conn.execute("SET TIME ZONE 'UTC'")
        store_catalogue(conn, load_catalogue_file(ROOT / "billing" / "catalogues" / "example.toml"))
        conn.commit()
        print(f"inventory: {n:,} meters and accounts ...", flush=True)
        inv_s = build_inventory(conn, n)
        print(f"inventory: {inv_s:.1f} s, {n / inv_s:,.0f} meters/s ({load()})", flush=True)

        broker = Mosquitto()
        days: list[dict[str, float]] = []
        try:
            for day in range(2):
                t = time.perf_counter()
                msgs = day_messages(n, day, args.order)
                readings = len(msgs) * PER_MESSAGE
                assert readings == n * SLOTS, (readings, n)
                print(f"day {day + 1}: {readings:,} readings in {len(msgs):,} messages generated in "
                      f"{time.perf_counter() - t:.1f} s (not timed)", flush=True)
                before = load()
                secs, col_kb, work_kb = collect(broker.port, url, msgs, args.workers, args.batch)
                size = db_size(conn)
                copy_s = raw_copy(conn, msgs)
                days.append({"s": secs, "copy": copy_s, "size": size, "n": readings,
                             "col": col_kb, "work": max(work_kb, default=0)})
                print(f"day {day + 1}: collector {secs:.1f} s, {readings / secs:,.0f} readings/s; raw COPY "
                      f"{copy_s:.1f} s, {readings / copy_s:,.0f}/s; ratio {copy_s / secs:.2f}; database "
                      f"{size / 1e9:.2f} GB; peak RSS collector {col_kb / 1024:.0f} MB, workers "
                      f"{', '.join(f'{k / 1024:.0f}' for k in work_kb)} MB ({before} before, {load()} after)",
                      flush=True)
                del msgs
        finally:
            broker.close()

        print("billing the month ...", flush=True)
        t0 = time.perf_counter()
        last = [t0]

        def progress(done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 10:
                last[0] = time.perf_counter()
                print(f"  billed {done:>9,} / {total:,}  ({done / (last[0] - t0):,.0f}/s)", flush=True)

        bench_billing.bare_aggregate(conn, PERIOD)  # warm the cache, as the billing run finds it
        bare, groups = min(bench_billing.bare_aggregate(conn, PERIOD) for _ in range(2))
        summary = bill_period(conn, PERIOD, progress=progress)
        bill_s = summary.seconds
        print(f"billing: {bill_s:.1f} s, {n / bill_s:,.0f} accounts/s [billed {summary.billed}, held back "
              f"{len(summary.held_back)}]; bare aggregate {bare:.2f} s ({groups:,} meter-zone sums), "
              f"{bill_s / bare:.2f}x ({load()})")
        reasons = Counter(h.reason.split(":")[0] for h in summary.held_back)
        for reason, k in reasons.most_common(3):
            print(f"  held back: {k:,} ({reason})")

    d1, d2 = days
    print()
    print(f"measured at {n:,} meters ({os.cpu_count()} CPUs):")
    print(f"{'stage':30s} {'seconds':>9s} {'rate/s':>11s} {'raw COPY s':>11s} {'/ COPY':>7s}")
    print(f"{'inventory':30s} {inv_s:9.1f} {n / inv_s:11,.0f}")
    for i, d in enumerate(days, 1):
        print(f"{f'day {i}, collector':30s} {d['s']:9.1f} {d['n'] / d['s']:11,.0f} {d['copy']:11.1f} "
              f"{d['copy'] / d['s']:7.2f}")
    print(f"{'billing':30s} {bill_s:9.1f} {n / bill_s:11,.0f} {bare:11.2f} (bare aggregate)")
    print(f"database: {d1['size'] / 1e9:.2f} GB after day 1, {d2['size'] / 1e9:.2f} GB after day 2 "
          f"({(d2['size'] - d1['size']) / d2['n']:.0f} bytes a reading on day 2)")
    print(f"peak RSS: collector {max(d1['col'], d2['col']) / 1024:.0f} MB, largest worker "
          f"{max(d1['work'], d2['work']) / 1024:.0f} MB")
    f = FULL / n
    x1, x2, xb = d1["s"] * f, d2["s"] * f, bill_s * f
    if n != FULL:
        print(f"linear extrapolation to {FULL:,} meters (x {f:g}; an extrapolation, not a measurement: it "
              f"assumes the rates stay as measured while tables and indexes grow {f:g}-fold):")
        print(f"  inventory {inv_s * f / 60:.1f} min; day 1 {x1 / 60:.1f} min ({FULL * SLOTS:,} readings at "
              f"{d1['n'] / d1['s']:,.0f}/s); day 2 {x2 / 60:.1f} min; billing {xb / 60:.1f} min; "
              f"database {d1['size'] * f / 1e9:.1f} GB after day 1, {d2['size'] * f / 1e9:.1f} GB after day 2")
    print(f"targets at {FULL:,}: each day < 10 min: {'met' if max(x1, x2) < 600 else 'NOT met'} "
          f"({x1 / 60:.1f}, {x2 / 60:.1f}); day 2 <= 1.1 x day 1: {'met' if x2 <= 1.1 * x1 else 'NOT met'} "
          f"({x2 / x1:.2f}); billing < 2 min: {'met' if xb < 120 else 'NOT met'} ({xb / 60:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
