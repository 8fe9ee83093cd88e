"""`amr ingest FILE` end to end: a subprocess, a real file, a real database."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.helpers import T0, add_meters


def amr(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AMR_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "amr.cli", *args], env=env,
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
    # one worker: the refusals are then recorded in the file's order (the 10 MB line makes the file
    # big enough for two workers by default, and each worker records its own meters' refusals)
    res = amr(db_url, "ingest", str(f), "--json", "--workers", "1")
    assert res.returncode == 3, res.stderr  # some lines refused (issue 18: was 0)
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
    nodb = subprocess.run([sys.executable, "-m", "amr.cli", "ingest", str(f)],
                          env={k: v for k, v in os.environ.items() if k != "AMR_DATABASE_URL"},
                          capture_output=True, text=True, timeout=60)
    assert nodb.returncode != 0 and "AMR_DATABASE_URL" in nodb.stderr


def _line(ts: str, value: str) -> str:
    return f'{{"meter_id": "f1", "register": "1.8.0", "ts": "{ts}", "value": {value}}}'


def test_hostile_lines_are_refused_one_by_one_without_a_traceback(db_url, conn, tmp_path) -> None:
    """Depth, exponent and date-range attacks each cost their own line, never the batch."""
    add_meters(conn, "f1")
    good = [_line((T0 + timedelta(minutes=30 * k)).isoformat(), f'"{100 + k}"') for k in range(4)]
    hostile = {
        # line number in the file -> (line, what the refusal must say)
        2: ('{"meter_id": "f1", "value": ' + "[" * 1000 + "]" * 1000 + "}", "nested deeper than 32"),
        3: (_line("2026-10-01T02:00:00+00:00", "1E-99999"), "exponent"),
        4: (_line("2026-10-01T02:00:00+00:00", '"1E-99999"'), "exponent"),
        5: (_line("2026-10-01T02:00:00+00:00", "1E+99999"), "exponent"),
        6: (_line("2026-10-01T02:00:00+00:00", "9" * 5000), "digits"),
        7: (_line("0001-01-01T00:00:00+03:00", '"5"'), "out of range"),
        8: (_line("9999-12-31T23:59:59-05:00", '"5"'), "out of range"),
        9: (_line("2026-10-01T02:00:00+00:00", "1" + "0" * 40), "exponent"),
        10: (_line("9999-12-31T23:59:59+00:00", '"5"'), "in the future"),  # refused by validation
    }
    lines = [good[0]] + [hostile[n][0] for n in range(2, 11)]
    # an offset Python accepts and PostgreSQL would not (beyond 15:59): the same instant in UTC
    lines += [*good[1:], _line("2026-10-02T01:59:00+23:59", '"104"')]
    f = tmp_path / "hostile.jsonl"
    f.write_text("\n".join(lines) + "\n")
    res = amr(db_url, "ingest", str(f), "--json")
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 3, res.stderr  # some lines refused
    out = json.loads(res.stdout)
    assert (out["accepted"], out["rejected"]) == (5, 9), out
    conn.rollback()
    stored = conn.execute("SELECT ts, value FROM reading WHERE meter_id = 'f1' ORDER BY ts").fetchall()
    assert [v for _, v in stored] == [100, 101, 102, 103, 104]
    assert [t for t, _ in stored] == [T0 + timedelta(minutes=30 * k) for k in range(5)]
    rows = conn.execute("SELECT source, reason FROM rejected_reading ORDER BY id").fetchall()
    assert len(rows) == 9
    for n, (_, why) in hostile.items():
        # the importer's refusals say the line; validation's carry it in the source
        mine = [r for s, r in rows if r.startswith(f"line {n}:") or s == f"import:{f.name}#L{n}"]
        assert len(mine) == 1 and why in mine[0], (n, why, rows)


def test_old_dates_are_refused_one_by_one(db_url, conn, tmp_path) -> None:
    """Dates that have a UTC instant but no place in metering (1969, 1970, year 1).

    The importer parses them; validation's plausibility window refuses them
    (code implausible_ts), before any partition is made: a year-1 reading
    must not make ingestion create a partition per month since year 1.
    """
    add_meters(conn, "f1")
    good = [_line((T0 + timedelta(minutes=30 * k)).isoformat(), f'"{100 + k}"') for k in range(3)]
    old = ["1970-01-01T00:00:00+00:00", "1969-12-31T23:59:59+00:00", "0001-01-01T00:00:00+00:00",
           "1970-01-01T03:00:00+03:00"]
    f = tmp_path / "old.jsonl"
    f.write_text("\n".join([good[0], *(_line(ts, '"5"') for ts in old), *good[1:]]) + "\n")
    res = amr(db_url, "ingest", str(f), "--json")
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.returncode == 3, res.stderr[-2000:]  # some lines refused
    out = json.loads(res.stdout)
    assert (out["accepted"], out["rejected"]) == (3, 4), out
    conn.rollback()
    assert [v for (v,) in conn.execute("SELECT value FROM reading ORDER BY ts").fetchall()] == [100, 101, 102]
    rows = conn.execute("SELECT source, ts, reason FROM rejected_reading ORDER BY id").fetchall()
    assert sorted(s for s, _, _ in rows) == [f"import:{f.name}#L{n}" for n in (2, 3, 4, 5)], rows
    assert sorted(ts.year for _, ts, _ in rows) == [1, 1969, 1970, 1970], rows


def test_hostile_csv_lines_are_refused_one_by_one(db_url, conn, tmp_path) -> None:
    add_meters(conn, "f1")
    good = [f"f1,1.8.0,{(T0 + timedelta(minutes=30 * k)).isoformat()},{100 + k}" for k in range(3)]
    f = tmp_path / "hostile.csv"
    f.write_text("\n".join([
        "meter_id,register,ts,value", good[0],
        "f1,1.8.0,2026-10-01T02:00:00+00:00,1E-99999",
        "f1,1.8.0,0001-01-01T00:00:00+03:00,5",
        "f1,1.8.0,9999-12-31T23:59:59-05:00,5",
        "f1,1.8.0,2026-10-01T02:00:00+00:00," + "0." + "0" * 50 + "1",
        *good[1:],
    ]) + "\n")
    res = amr(db_url, "ingest", str(f), "--json")
    assert "Traceback" not in res.stderr, res.stderr
    out = json.loads(res.stdout)
    assert (out["accepted"], out["rejected"]) == (3, 4), out
    conn.rollback()
    rows = conn.execute("SELECT code, reason FROM rejected_reading ORDER BY id").fetchall()
    assert [r.split(":")[0] for _, r in rows] == ["line 3", "line 4", "line 5", "line 6"]
    assert [c for c, _ in rows] == ["implausible_value", "bad_ts", "bad_ts", "implausible_value"]


# --- issue 18: exit statuses, the rejects file, spreadsheet dialects ---

def _plain(n: int = 6) -> list[tuple[str, str, str]]:
    return [((T0 + timedelta(minutes=30 * k)).isoformat(), f"{1000 + k}.{25 * (k % 4):02d}", f"note {k}")
            for k in range(n)]


def _stored_rows(conn) -> list[tuple]:
    conn.rollback()
    return conn.execute("SELECT meter_id, register, ts, value, quality, status, kwh FROM reading"
                        " ORDER BY meter_id, register, ts").fetchall()


def _plain_twin(path: Path) -> Path:
    path.write_text("meter_id,register,ts,value\n" + "".join(f"f1,1.8.0,{ts},{v}\n" for ts, v, _ in _plain()))
    return path


RUSSIAN = {
    # a 1C export: ';', decimal comma, cp1251, Russian names in another order, an extra column
    "cp1251": ("Дата;Счётчик;Показание;Регистр;Примечание\n", "{ts};f1;{v};1.8.0;{note} ок\n", "cp1251"),
    # Excel's "CSV UTF-8": a BOM, ';', decimal comma
    "utf-8-bom": ("\ufeffСчетчик;Регистр;Дата;Показание\n", "f1;1.8.0;{ts};{v}\n", "utf-8"),
}



@pytest.mark.parametrize("variant", sorted(RUSSIAN))
def test_a_russian_spreadsheet_export_ingests_like_its_plain_twin(db_url, conn, tmp_path, variant) -> None:
    add_meters(conn, "f1")
    head, row, encoding = RUSSIAN[variant]
    f = tmp_path / f"export-{variant}.csv"
    f.write_bytes((head + "".join(row.format(ts=ts, v=v.replace(".", ","), note=note) for ts, v, note in _plain()))
                  .encode(encoding))
    res = amr(db_url, "ingest", str(f), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["accepted"] == 6
    dialect = [ln for ln in res.stderr.splitlines() if "csv dialect" in ln]
    assert len(dialect) == 1, res.stderr  # one line
    assert "separator ';' (detected)" in dialect[0] and "decimal comma (detected)" in dialect[0]
    assert ("encoding cp1251" if variant == "cp1251" else "encoding utf-8-sig") in dialect[0]
    assert ("ignoring the columns Примечание" in dialect[0]) == (variant == "cp1251")
    russian = _stored_rows(conn)
    # the plain twin: every line is a duplicate of what the export stored, nothing differs
    twin = amr(db_url, "ingest", str(_plain_twin(tmp_path / "plain.csv")), "--json")
    assert twin.returncode == 0 and json.loads(twin.stdout)["duplicate"] == 6, twin.stdout
    assert _stored_rows(conn) == russian
    assert [(r[2], r[3]) for r in russian] == [(datetime.fromisoformat(ts), Decimal(v)) for ts, v, _ in _plain()]


def test_a_plain_file_and_its_export_give_equal_tables(db_url, conn, tmp_path) -> None:
    """The other way round: the plain twin first, then the cp1251 export is all duplicates."""
    add_meters(conn, "f1")
    assert amr(db_url, "ingest", str(_plain_twin(tmp_path / "plain.csv"))).returncode == 0
    plain = _stored_rows(conn)
    head, row, encoding = RUSSIAN["cp1251"]
    f = tmp_path / "export.csv"
    f.write_bytes((head + "".join(row.format(ts=ts, v=v.replace(".", ","), note=note) for ts, v, note in _plain()))
                  .encode(encoding))
    res = amr(db_url, "ingest", str(f), "--json")
    assert json.loads(res.stdout) == {"file": str(f), "accepted": 0, "duplicate": 6, "conflict": 0, "rejected": 0}
    assert _stored_rows(conn) == plain


def test_exit_statuses_and_the_rejects_file(db_url, conn, tmp_path) -> None:
    add_meters(conn, "f1")
    good = _plain_twin(tmp_path / "good.csv")
    assert amr(db_url, "ingest", str(good)).returncode == 0  # all accepted
    assert amr(db_url, "ingest", str(good)).returncode == 0  # all duplicates
    bad = tmp_path / "bad.csv"
    bad.write_text("meter_id,register,ts,value\n"
                   "ghost,1.8.0,2026-10-01T00:00:00+00:00,1\n"
                   "\n"
                   "f1,1.8.0,yesterday,1\n")
    out = tmp_path / "rejects.csv"
    res = amr(db_url, "ingest", str(bad), "--rejects", str(out))
    assert res.returncode == 1, res.stdout + res.stderr  # nothing accepted
    assert f"in {out}" in res.stdout
    rows = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
    assert [(r["line"], r["code"]) for r in rows] == [("2", "unknown_meter"), ("4", "bad_ts")]
    assert "no such meter" in rows[0]["reason"] and "'yesterday' is not an ISO 8601" in rows[1]["reason"]
    assert rows[1]["raw"] == "f1,1.8.0,yesterday,1"
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("meter_id,register,ts,value\n"
                     f"f1,1.8.0,{(T0 + timedelta(days=1)).isoformat()},2000\n"
                     "f1,1.8.0,2026-10-01T00:00:00+00:00,-1\n")
    res = amr(db_url, "ingest", str(mixed), "--rejects", str(out), "--json")
    assert res.returncode == 3 and json.loads(res.stdout)["accepted"] == 1, res.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
    assert [(r["line"], r["code"]) for r in rows] == [("3", "negative")]  # rewritten, not appended
    helptext = amr(db_url, "ingest", "--help").stdout
    assert "exit status" in helptext and "1  every line was refused" in helptext and "3  some lines" in helptext


def test_an_ambiguous_separator_asks_for_delimiter(db_url, conn, tmp_path) -> None:
    add_meters(conn, "f1")
    f = tmp_path / "odd.csv"
    ts = T0.isoformat()
    f.write_text(f"Прибор;Рег;Дата;Показание;Комментарий, если есть\nf1;1.8.0;{ts};10,5;нет, всё верно\n",
                 encoding="utf-8")
    res = amr(db_url, "ingest", str(f))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot tell the field separator" in res.stderr and "--delimiter" in res.stderr, res.stderr
    res = amr(db_url, "ingest", str(f), "--delimiter", ";")
    assert res.returncode == 2 and "no column for meter_id, register" in res.stderr and "--columns" in res.stderr
    res = amr(db_url, "ingest", str(f), "--delimiter", ";", "--columns", "meter_id=Прибор,register=Рег", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["accepted"] == 1, res.stderr
    assert "separator ';' (given)" in res.stderr and "columns Прибор=meter_id" in res.stderr
    assert _stored_rows(conn)[0][3] == Decimal("10.5")
    bad = amr(db_url, "ingest", str(f), "--columns", "meter=Прибор")
    assert bad.returncode == 2 and "FIELD=NAME" in bad.stderr
