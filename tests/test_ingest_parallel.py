"""`amr ingest --workers N`: several processes give the same result as one, line for line.

The parent routes lines by meter to worker processes that parse and store
them (collector/ingest/parallel.py). What must not change is anything a user
can see: the stored readings, intervals and daily totals, the counts, the
exit status and the rejects file, for good lines, refused lines of every
kind (quoted, too long, bad timestamp, unknown meter) and JSON lines.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psycopg

from collector.ingest.importfile import MAX_LINE
from tests.conftest import fresh_database
from tests.helpers import T0, add_meters

METERS = [f"p{m:03d}" for m in range(40)]


def amr(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AMR_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "amr.cli", *args], env=env,
                          capture_output=True, text=True, timeout=180)


def write_mixed_csv(path: Path) -> int:
    """Time-sorted lines of 40 meters with refusals of every kind sprinkled in."""
    lines = ["meter_id,register,ts,value"]
    for k in range(48):
        ts = (T0 + timedelta(minutes=30 * k)).isoformat()
        for m, meter in enumerate(METERS):
            lines.append(f"{meter},1.8.0,{ts},{100 + m + k * 0.5:.2f}")
        lines.append(f'"q01","1.8.0","{ts}","{10 + k * 0.25:.2f}"')  # quoted: the general path
    lines += [
        "p002,1.8.0,yesterday,5",            # bad timestamp
        "zz9,1.8.0,2026-10-01T00:00:00+00:00,1",  # unknown meter
        "p003,1.8.0,2026-10-01T00:00:00+00:00",   # a field short
        "p004,1.8.0,2026-10-01T00:00:00+00:00,1e99999",  # implausible value
        "p005," + "x" * (MAX_LINE + 10),     # too long
        "",
        "p006,1.8.0,2026-10-01T01:00:00,5",  # naive timestamp
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) - 1


def stored(url: str) -> tuple:
    with psycopg.connect(url) as conn:
        readings = conn.execute("SELECT meter_id, register, ts, value, source FROM reading"
                                " ORDER BY 1, 2, 3").fetchall()
        intervals = conn.execute("SELECT meter_id, register, seg_start, kwh, kind, estimated FROM interval_usage"
                                 " ORDER BY 1, 2, 3").fetchall()
        daily = conn.execute("SELECT meter_id, day, zone, kwh FROM daily_zone_usage ORDER BY 1, 2, 3").fetchall()
        rejects = conn.execute("SELECT source, code, reason FROM rejected_reading ORDER BY 1, 2").fetchall()
    return readings, intervals, daily, rejects


def run_into(pg_admin_url: str, template_db: str, tmp_path: Path, f: Path, workers: int) -> tuple:
    with fresh_database(pg_admin_url, template_db) as url:
        with psycopg.connect(url) as conn:
            add_meters(conn, *METERS, "q01")
        rejects = tmp_path / f"rejects-{workers}.csv"
        out = amr(url, "ingest", str(f), "--json", "--workers", str(workers), "--batch", "300",
                  "--rejects", str(rejects))
        with rejects.open(encoding="utf-8") as r:
            rows = sorted((int(x["line"]), x["code"], x["reason"]) for x in csv.DictReader(r))
        return out.returncode, json.loads(out.stdout), rows, stored(url)


def test_two_workers_store_exactly_what_one_process_stores(pg_admin_url, template_db, tmp_path) -> None:
    f = tmp_path / "mixed.csv"
    write_mixed_csv(f)
    one = run_into(pg_admin_url, template_db, tmp_path, f, 1)
    two = run_into(pg_admin_url, template_db, tmp_path, f, 2)
    status, counts, rejects, data = one
    assert status == 3, "some lines refused, the others stored"
    assert counts["accepted"] == 48 * 40 + 48
    assert {code for _, code, _ in rejects} >= {"bad_ts", "unknown_meter", "truncated", "implausible_value",
                                                "too_long", "naive_ts"}
    assert len(data[0]) == counts["accepted"] and data[1] and data[2]
    assert two == one


def test_json_lines_through_workers_match_one_process(pg_admin_url, template_db, tmp_path) -> None:
    f = tmp_path / "r.jsonl"
    lines = []
    for k in range(24):
        ts = (T0 + timedelta(minutes=30 * k)).isoformat()
        lines += [json.dumps({"meter_id": m, "register": "1.8.0", "ts": ts, "value": 50 + i + k})
                  for i, m in enumerate(METERS)]
    lines += ['{"meter_id": 7, "register": "1.8.0"}', "not json", '{"value": 1}']
    f.write_text("\n".join(lines) + "\n")
    one = run_into(pg_admin_url, template_db, tmp_path, f, 1)
    two = run_into(pg_admin_url, template_db, tmp_path, f, 3)
    assert one[1]["accepted"] == 24 * 40 and one[1]["rejected"] == 3
    assert two == one


def test_a_worker_that_cannot_store_is_named_and_what_was_stored_stays(db_url, conn, tmp_path) -> None:
    add_meters(conn, *METERS)
    f = tmp_path / "mixed.csv"
    write_mixed_csv(f)
    conn.execute("ALTER DATABASE " + conn.info.dbname + " SET default_transaction_read_only = on")
    conn.commit()
    out = amr(db_url, "ingest", str(f), "--workers", "2", "--batch", "300")
    assert out.returncode == 2, out.stderr
    assert "ingestion worker" in out.stderr and "run the same command again" in out.stderr
    assert "Traceback" not in out.stderr


def _ingest_with(pg_admin_url: str, template_db: str, tmp_path: Path, f: Path, workers: int, batch: int) -> tuple:
    with fresh_database(pg_admin_url, template_db) as url:
        with psycopg.connect(url) as conn:
            add_meters(conn, *METERS, "q01")
        rejects = tmp_path / f"rejects-{workers}-{batch}.csv"
        args = ("ingest", str(f), "--json", "--workers", str(workers), "--batch", str(batch), "--rejects", str(rejects))
        out = amr(url, *args)
        with rejects.open(encoding="utf-8") as r:
            lines = [(int(x["line"]), x["code"], x["reason"]) for x in csv.DictReader(r)]
        again = amr(url, *args)
        return out.returncode, json.loads(out.stdout), lines, stored(url), again.returncode, json.loads(again.stdout)


def test_a_time_sorted_file_grouped_by_meter_stores_what_one_call_stores(pg_admin_url, template_db, tmp_path) -> None:
    """A window of a time-sorted file is stored in calls grouped by meter (many readings of fewer meters
    each): readings, intervals, daily totals, counts and refusals are those of storing it as read."""
    f = tmp_path / "mixed.csv"
    write_mixed_csv(f)
    as_read = _ingest_with(pg_admin_url, template_db, tmp_path, f, 1, 100_000)  # one call, in file order
    grouped = _ingest_with(pg_admin_url, template_db, tmp_path, f, 1, 50)  # windows of 200 lines, calls of 50
    by_two = _ingest_with(pg_admin_url, template_db, tmp_path, f, 2, 50)
    status, counts, rejects, data, again, recount = as_read
    assert status == 3 and counts["accepted"] == 48 * 40 + 48 and data[1] and data[2]
    assert again == 3 and recount["accepted"] == 0 and recount["duplicate"] == counts["accepted"]
    assert [n for n, _, _ in rejects] == sorted(n for n, _, _ in rejects)
    assert grouped == as_read  # the rejects file too: one process writes it in the file's order
    assert by_two[:2] == as_read[:2] and by_two[3:] == as_read[3:]
    assert sorted(by_two[2]) == sorted(rejects)
