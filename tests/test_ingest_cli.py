"""`amr ingest FILE` end to end: a subprocess, a real file, a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from tests.helpers import T0, add_meters


def amr(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AMR_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "collector.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def write_csv(path: Path, n: int = 96) -> None:
    lines = ["meter_id,register,ts,value"]
    for k in range(n):
        ts = (T0 + timedelta(minutes=30 * k)).isoformat()
        lines.append(f"f1,1.8.0,{ts},{1000 + k * 0.25:.2f}")
    path.write_text("\n".join(lines) + "\n")


def counts(conn) -> tuple[int, ...]:
    return conn.execute(
        "SELECT (SELECT count(*) FROM reading), (SELECT count(*) FROM interval_usage),"
        " (SELECT count(*) FROM daily_zone_usage), (SELECT count(*) FROM rejected_reading)"
    ).fetchone()


def test_reingesting_a_whole_file_changes_nothing(db_url, conn, tmp_path) -> None:
    add_meters(conn, "f1")
    f = tmp_path / "month.csv"
    write_csv(f)
    first = amr(db_url, "ingest", str(f), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"file": str(f), "accepted": 96, "duplicate": 0, "conflict": 0, "rejected": 0}
    before = counts(conn)
    total = conn.execute("SELECT sum(kwh) FROM daily_zone_usage").fetchone()[0]
    again = amr(db_url, "ingest", str(f), "--json")
    assert json.loads(again.stdout)["duplicate"] == 96
    conn.rollback()
    assert counts(conn) == before
    assert conn.execute("SELECT sum(kwh) FROM daily_zone_usage").fetchone()[0] == total == 23.75


def test_bad_lines_are_rejected_with_reasons_and_good_ones_stored(db_url, conn, tmp_path) -> None:
    add_meters(conn, "f1")
    f = tmp_path / "bad.csv"
    good = [f"f1,1.8.0,{(T0 + timedelta(minutes=30 * k)).isoformat()},{100 + k}" for k in range(4)]
    body = (
        b"meter_id,register,ts,value\n"
        + good[0].encode() + b"\n"
        + b"f1,1.8.0,2026-10-01T00:30:00+00:00\n"  # truncated
        + b"f1,1.8.0," + b"9" * (10 * 1024 * 1024) + b",1\n"  # a 10 MB line
        + "f1,1.8.0,2026-10-01T01:00:00+00:00,значение".encode("cp1251") + b"\n"  # wrong encoding
        + b"f1,1.8.0,2026-10-01T01:30:00,104\n"  # naive timestamp
        + b"f1,1.8.0,yesterday,104\n"
        + b"f1,1.8.0,2026-10-01T02:00:00+00:00,NaN\n"
        + b"f1,1.8.0,2026-10-01T02:30:00+00:00,-3\n"
        + b"ghost,1.8.0,2026-10-01T02:30:00+00:00,1\n"
        + b"f1,1.8.0,2099-10-01T02:30:00+00:00,1\n"
        + "\n".join(good[1:]).encode() + b"\n"
    )
    f.write_bytes(body)
    res = amr(db_url, "ingest", str(f), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"file": str(f), "accepted": 4, "duplicate": 0, "conflict": 0, "rejected": 9}
    rows = conn.execute("SELECT code, reason, length(raw) FROM rejected_reading ORDER BY id").fetchall()
    assert [c for c, _, _ in rows] == [
        "truncated", "too_long", "encoding", "naive_ts", "bad_ts", "not_finite", "negative",
        "unknown_meter", "future_ts",
    ]
    assert "line 3: 3 fields, expected 4" in rows[0][1]
    assert "line 4: longer than" in rows[1][1] and rows[1][2] <= 200
    assert "not UTF-8" in rows[2][1]
    assert "'yesterday' is not an ISO 8601 timestamp" in rows[4][1]


def test_jsonl_and_clear_errors(db_url, conn, tmp_path) -> None:
    add_meters(conn, "f1")
    f = tmp_path / "r.jsonl"
    f.write_text(
        '{"meter_id": "f1", "register": "1.8.0", "ts": "2026-10-01T03:00:00+03:00", "value": 10.5}\n'
        '{"meter_id": "f1", "register": "1.8.0", "ts": "2026-10-01T03:30:00+03:00", "value": "11.0"}\n'
        '{"meter_id": "f1", "register": "1.8.0", "ts": "2026-10-01T04:00:00+03:00", "value": NaN}\n'
        '[1, 2]\n{"meter_id": "f1"\n'
    )
    res = amr(db_url, "ingest", str(f), "--json")
    assert json.loads(res.stdout)["accepted"] == 2 and json.loads(res.stdout)["rejected"] == 3
    assert conn.execute("SELECT sum(kwh) FROM interval_usage").fetchone()[0] == 0.5
    missing = amr(db_url, "ingest", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("meter,reg,time,val\n")
    res = amr(db_url, "ingest", str(bad_header))
    assert res.returncode == 2 and "header must name the columns meter_id,register,ts,value" in res.stderr
    nodb = subprocess.run([sys.executable, "-m", "collector.cli", "ingest", str(f)],
                          env={k: v for k, v in os.environ.items() if k != "AMR_DATABASE_URL"},
                          capture_output=True, text=True, timeout=60)
    assert nodb.returncode != 0 and "AMR_DATABASE_URL" in nodb.stderr
