"""Nothing accepted is deleted unless an operator said so, and nothing pruned is counted twice.

Against the real PostgreSQL, through the commands an operator runs (`amr ingest`,
`amr db migrate`, `amr db maintain`) as subprocesses. The TimescaleDB path of the same
rule is in tests/test_timescale.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from billing.engine import bill_period
from billing.tariffs import Catalogue, parse_catalogue
from tests.helpers import add_meters

T2017 = datetime(2017, 3, 1, tzinfo=UTC)
TARIFF_2017 = Catalogue(parse_catalogue({"tariff": [
    {"from": "2017-01-01", "to": "2017-12-31", "category": "gas_stove", "area": "urban",
     "plan": "single", "rates": {"all": "3.85"}}]}))


def amr(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "AMR_RETENTION"}
    full.update(AMR_DATABASE_URL=db_url, **env)
    out = subprocess.run([sys.executable, "-m", "amr.cli", *args], env=full,
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


def write_2017(path: Path) -> int:
    """March 2017, every half hour, one meter: a back-fill of old data."""
    rows = [("r1", "1.8.0", (T2017 + timedelta(minutes=30 * k)).isoformat(), f"{5000 + k * Decimal('0.125')}")
            for k in range(31 * 48 + 1)]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["meter_id", "register", "ts", "value"])
        w.writerows(rows)
    return len(rows)


def state(conn) -> tuple:
    conn.autocommit = True  # no open transaction of ours may hold a lock `maintain` waits for
    return conn.execute(
        "SELECT (SELECT count(*) FROM reading),"
        " (SELECT coalesce(sum(kwh), 0) FROM daily_zone_usage),"
        " (SELECT count(*) FROM daily_zone_usage),"
        " (SELECT string_agg(account || ':' || version || ':' || total, ',') FROM bill)").fetchone()


def test_old_readings_survive_migrate_and_maintain_without_a_policy(db_url, conn, tmp_path) -> None:
    add_meters(conn, "r1", account="7001", plan="single")
    n = write_2017(tmp_path / "2017.csv")
    res = amr(db_url, "ingest", str(tmp_path / "2017.csv"), "--json")
    assert res.returncode == 0, res.stderr
    before = state(conn)
    assert before[0] == n
    for cmd in (("db", "migrate"), ("db", "maintain"), ("db", "migrate")):
        res = amr(db_url, *cmd)
        assert res.returncode == 0, res.stderr
    assert "nothing is deleted" in amr(db_url, "db", "maintain").stdout
    assert state(conn) == before


def test_retention_drops_only_in_maintain_and_refuses_the_pruned_period(db_url, conn, tmp_path) -> None:
    add_meters(conn, "r1", account="7001", plan="single")
    write_2017(tmp_path / "2017.csv")
    assert amr(db_url, "ingest", str(tmp_path / "2017.csv")).returncode == 0
    conn.autocommit = True
    summary = bill_period(conn, date(2017, 3, 1), catalogue=TARIFF_2017)
    assert summary.billed == 1
    before = state(conn)
    daily_before = conn.execute("SELECT day, zone, kwh FROM daily_zone_usage ORDER BY 1, 2").fetchall()

    # migrate never applies retention, even when it is configured
    assert amr(db_url, "db", "migrate", AMR_RETENTION="60").returncode == 0
    assert state(conn) == before
    # a dry run names what would go and changes nothing
    dry = amr(db_url, "db", "maintain", "--dry-run", AMR_RETENTION="60")
    assert dry.returncode == 0, dry.stderr
    assert "would drop reading_data_p201703" in dry.stdout and "would drop interval_segment_p201703" in dry.stdout
    assert state(conn) == before
    # a policy shorter than the dispute horizon is refused, naming the setting
    short = amr(db_url, "db", "maintain", AMR_RETENTION="12")
    assert short.returncode != 0 and "AMR_RETENTION" in short.stderr and "36" in short.stderr
    assert state(conn) == before

    res = amr(db_url, "db", "maintain", AMR_RETENTION="60")
    assert res.returncode == 0, res.stderr
    assert "dropped reading_data_p201703" in res.stdout and f"{before[0]} rows" in res.stdout
    assert "watermark 2017-05-01T00:00:00+00:00" in res.stdout
    assert conn.execute("SELECT count(*) FROM reading").fetchone()[0] == 0
    assert conn.execute("SELECT table_name, part, rows FROM retention_log ORDER BY 1, 2").fetchall() == [
        ("interval_segment", "interval_segment_p201703", 0), ("interval_segment", "interval_segment_p201704", 0),
        ("reading_data", "reading_data_p201703", before[0] - 1), ("reading_data", "reading_data_p201704", 1)]

    # ingesting the pruned period again is refused reading by reading; the energy is not doubled
    res = amr(db_url, "ingest", str(tmp_path / "2017.csv"), "--json")
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["accepted"] == 0 and out["rejected"] == before[0], out
    codes = conn.execute("SELECT code, count(*) FROM rejected_reading GROUP BY 1").fetchall()
    assert codes == [("beyond_retention", before[0])]
    assert conn.execute("SELECT day, zone, kwh FROM daily_zone_usage ORDER BY 1, 2").fetchall() == daily_before
    # and the month's bill is what it was
    again = bill_period(conn, date(2017, 3, 1), catalogue=TARIFF_2017)
    assert (again.billed, again.new_versions, again.unchanged) == (0, 0, 1)
    assert state(conn)[1:] == before[1:]
