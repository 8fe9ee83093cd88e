"""Refused input is recorded once per distinct input and source, with how often it came."""

from __future__ import annotations

from datetime import timedelta

from tests.helpers import T0, add_meters
from tests.test_ingest_cli import amr


def test_reingesting_a_file_with_refused_lines_adds_no_rows(db_url, conn, tmp_path) -> None:
    add_meters(conn, "rj1")
    lines = ["meter_id,register,ts,value"]
    for k in range(10):
        lines.append(f"rj1,1.8.0,{(T0 + timedelta(minutes=30 * k)).isoformat()},{100 + k}")
    lines += ["rj1,1.8.0,not-a-time,5", "nobody,1.8.0,2026-10-01T00:00:00+00:00,5",
              "rj1,1.8.0,2026-10-01T00:00:00+00:00,-1", f"rj1,1.8.0,{T0.isoformat()},999"]  # last: a conflict
    f = tmp_path / "with-bad-lines.csv"
    f.write_text("\n".join(lines) + "\n")
    for run in range(1, 4):
        res = amr(db_url, "ingest", str(f))
        assert "Traceback" not in res.stderr, res.stderr
        conn.rollback()
        rows = conn.execute("SELECT kind, code, times FROM rejected_reading ORDER BY id").fetchall()
        assert len(rows) == 4, rows
        assert sorted(r[2] for r in rows) == [run] * 4
    assert {r[1] for r in rows} == {"bad_ts", "unknown_meter", "negative", "conflict"}
    assert conn.execute("SELECT count(*) FROM reading").fetchone()[0] == 10
    status = amr(db_url, "status")
    assert status.returncode == 0, status.stderr


def test_the_same_bytes_from_another_source_are_another_row(db_url, conn) -> None:
    from adapters.reading import Rejected
    from collector.ingest.ingestor import Ingestor

    ing = Ingestor(conn)
    ing.ingest([Rejected("gw-a", b"garbage", "not a reading", "malformed")] * 3)
    ing.ingest([Rejected("gw-b", b"garbage", "not a reading", "malformed")])
    ing.ingest([Rejected("gw-a", b"garbage!", "not a reading", "malformed")])
    rows = conn.execute("SELECT source, raw, times FROM rejected_reading ORDER BY id").fetchall()
    assert [(s, bytes(r), n) for s, r, n in rows] == [
        ("gw-a", b"garbage", 3), ("gw-b", b"garbage", 1), ("gw-a", b"garbage!", 1)]
