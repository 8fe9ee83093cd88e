"""The file importer's bounds, line by line (pure: bytes in, Readings and Rejecteds out)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from adapters.reading import Reading, Rejected
from amr.errors import UserError
from collector.ingest.importfile import (
    HEAD_BYTES,
    MAX_DEPTH,
    MAX_EXPONENT,
    parse_columns,
    read_file,
    sniff_csv,
    too_deep,
)


def _rows(text: str, fmt: str = "jsonl") -> list[Reading | Rejected]:
    return list(read_file(io.BytesIO(text.encode()), fmt, "import:t"))


def _line(value: str, ts: str = "2026-10-01T00:00:00+03:00") -> str:
    return f'{{"meter_id": "m", "register": "1.8.0", "ts": "{ts}", "value": {value}}}\n'


def test_depth_counts_nesting_not_brackets_in_strings() -> None:
    assert not too_deep("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert too_deep("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert not too_deep('{"meter_id": "' + "[" * 500 + '"}')
    assert not too_deep('{"a": "\\"' + "{" * 500 + '"}')  # an escaped quote does not end the string
    assert too_deep('{"a": "\\\\"' + ", " + "[" * 40 + "]" * 40 + "}")  # an escaped backslash does


def test_each_line_is_refused_alone() -> None:
    deep = '{"meter_id": "m", "x": ' + "[" * 5000 + "]" * 5000 + "}\n"
    rows = _rows(_line('"1"') + deep + _line("1E-99999") + _line("9" * 5000) + _line('"2"'))
    assert [type(r).__name__ for r in rows] == ["Reading", "Rejected", "Rejected", "Rejected", "Reading"]
    assert [r.reason.split(":")[0] for r in rows if isinstance(r, Rejected)] == ["line 2", "line 3", "line 4"]
    assert all(len(r.reason) < 300 for r in rows if isinstance(r, Rejected))  # a 5,000-digit value is cut
    assert [r.source for r in rows if isinstance(r, Reading)] == ["import:t#L1", "import:t#L5"]


@pytest.mark.parametrize(
    "value,ok",
    [(f"1E+{MAX_EXPONENT}", True), (f"1E+{MAX_EXPONENT + 1}", False), (f"1E-{MAX_EXPONENT}", True),
     (f"1E-{MAX_EXPONENT + 1}", False), ('"0E-99999"', False), ('"123456.789"', True),
     ('"NaN"', True), ("Infinity", True)],  # not finite: left for validation to refuse as not_finite
)
def test_exponent_bound(value: str, ok: bool) -> None:
    (row,) = _rows(_line(value))
    assert isinstance(row, Reading) is ok, row
    if not ok:
        assert row.code == "implausible_value" and "exponent" in row.reason


@pytest.mark.parametrize(
    "ts,want",
    [("0001-01-01T00:00:00+03:00", None), ("9999-12-31T23:59:59-05:00", None),
     ("0001-01-01T03:00:00+03:00", datetime(1, 1, 1, tzinfo=UTC)),
     ("2026-10-02T01:59:00+23:59", datetime(2026, 10, 1, 2, 0, tzinfo=UTC)),
     ("1969-12-31T23:59:59+00:00", datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC))],
)
def test_timestamps_become_utc_or_a_refusal(ts: str, want: datetime | None) -> None:
    (row,) = _rows(_line('"1"', ts))
    if want is None:
        assert isinstance(row, Rejected) and row.code == "bad_ts" and "out of range" in row.reason
        assert row.ts is None  # nothing downstream tries to convert it again
    else:
        assert isinstance(row, Reading) and row.ts == want and row.ts.tzinfo is UTC


def test_naive_ts_is_left_for_validation() -> None:
    (row,) = _rows("meter_id,register,ts,value\nm,1.8.0,2026-10-01T00:00:00,1\n", "csv")
    assert isinstance(row, Reading) and row.ts.tzinfo is None and row.value == Decimal(1)


# --- CSV dialects (issue 18) ---

def _sniff(data: bytes, **options):
    return sniff_csv(io.BytesIO(data), "import:t", **options)


def test_every_refusal_carries_its_line_in_its_source() -> None:
    rows = _rows(_line('"1"') + "[1]\n" + "\n" + b"\xff".decode("latin-1") + "\n" + _line('"x"'))
    assert [r.source for r in rows] == ["import:t#L1", "import:t#L2", "import:t#L4", "import:t#L5"]
    csv_rows = _rows("meter_id,register,ts,value\nm,1.8.0\nm,1.8.0,now,1\n", "csv")
    assert [(r.source, r.code) for r in csv_rows] == [("import:t#L2", "truncated"), ("import:t#L3", "bad_ts")]


@pytest.mark.parametrize("data,encoding", [
    (b"meter_id,register,ts,value\n", "utf-8"),
    ("\ufeffmeter_id,register,ts,value\n".encode(), "utf-8-sig"),
    ("Счетчик;Регистр;Дата;Показание\n".encode(), "utf-8"),
    ("Счетчик;Регистр;Дата;Показание\n".encode("cp1251"), "cp1251"),
])
def test_the_encoding_is_detected(data: bytes, encoding: str) -> None:
    dialect, _ = _sniff(data)
    assert dialect.encoding == encoding and dialect.fields == ("meter_id", "register", "ts", "value")
    assert dialect.decimal == ("," if b";" in data else ".")


def test_bytes_that_are_neither_utf8_nor_cyrillic_stay_utf8_and_are_refused_by_line() -> None:
    data = "meter_id,register,ts,value\nm,1.8.0,2026-10-01T00:00:00+00:00,1 \xe9t\xe9\n".encode("latin-1")
    dialect, stream = _sniff(data)
    assert dialect.encoding == "utf-8"
    (row,) = read_file(stream, "csv", "import:t", dialect)
    assert isinstance(row, Rejected) and row.code == "encoding" and row.source == "import:t#L2"


def test_given_options_win_and_are_said_to_be_given() -> None:
    data = "a\tb\tc\td\nm\t1.8.0\t2026-10-01T00:00:00+00:00\t1.5\n".encode("cp1251")
    dialect, stream = _sniff(data, delimiter="tab", decimal=".", encoding="cp1251",
                             columns={"meter_id": "a", "register": "b", "ts": "c", "value": "d"})
    assert (dialect.delimiter, dialect.decimal, dialect.encoding) == ("\t", ".", "cp1251")
    assert "separator tab (given)" in dialect.describe() and "columns a=meter_id" in dialect.describe()
    (row,) = read_file(stream, "csv", "import:t", dialect)
    assert isinstance(row, Reading) and row.value == Decimal("1.5")


def test_a_decimal_comma_with_thousands_spaces() -> None:
    data = "Счетчик;Регистр;Дата;Показание\nm;1.8.0;2026-10-01T00:00:00+00:00;1\u00a0234,56\n".encode()
    dialect, stream = _sniff(data)
    (row,) = read_file(stream, "csv", "import:t", dialect)
    assert isinstance(row, Reading) and row.value == Decimal("1234.56")


def test_two_columns_of_one_meaning_and_unknown_options_are_refused() -> None:
    with pytest.raises(UserError, match="'Дата', 'Время' both mean 'ts'"):
        _sniff("Счетчик;Регистр;Дата;Время;Показание\n".encode())
    with pytest.raises(UserError, match="no such encoding"):
        _sniff(b"meter_id,register,ts,value\n", encoding="koi9")
    with pytest.raises(UserError, match="empty file"):
        _sniff(b"\n\n")
    with pytest.raises(UserError, match="FIELD=NAME"):
        parse_columns("meter=Счетчик")
    assert parse_columns("meter_id=Счетчик, ts=Дата") == {"meter_id": "Счетчик", "ts": "Дата"}


def test_a_file_longer_than_what_detection_reads_is_read_on() -> None:
    """The stream returned continues exactly where detection stopped reading."""
    t0 = datetime(2026, 10, 1, tzinfo=UTC)
    rows = "".join(f"m,1.8.0,{(t0 + timedelta(minutes=k)).isoformat()},{k}\n" for k in range(3000))
    assert len(rows) > HEAD_BYTES  # a line is cut in two where detection stopped
    dialect, stream = _sniff(("meter_id,register,ts,value\n" + rows).encode())
    out = list(read_file(stream, "csv", "import:t", dialect))
    assert len(out) == 3000 and all(isinstance(r, Reading) for r in out)
    assert [r.value for r in out] == [Decimal(k) for k in range(3000)]


def _lines_one_readline_each(f: io.BytesIO, limit: int) -> list[tuple[int, bytes, bool]]:
    """What _lines gives, the slow way: one bounded readline a line."""
    out, n = [], 0
    while chunk := f.readline(limit + 1):
        n += 1
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            head = chunk[:200]
            while chunk and not chunk.endswith(b"\n"):
                chunk = f.readline(1 << 20)
            out.append((n, head, True))
        else:
            out.append((n, chunk.rstrip(b"\r\n"), False))
    return out


@pytest.mark.parametrize("tail", [b"", b"\n", b"last", b"\r", b"y" * 700, b"y" * 700 + b"\n"])
def test_lines_read_in_blocks_are_the_lines_read_one_by_one(monkeypatch, tail) -> None:
    """Blocks that cut lines, too-long lines across several blocks, CRLF, a last line without its newline."""
    from collector.ingest import importfile

    monkeypatch.setattr(importfile, "MAX_LINE", 300)
    body = b"".join([
        b"meter_id,register,ts,value\r\n", b"a,1.8.0,2026-10-01T00:00:00+00:00,1\n", b"\n", b"\r\n",
        b"x" * 300 + b"\n", b"x" * 301 + b"\n", b"z" * 5000 + b"\r\n", b"b,1.8.0,t,2\r\r\n",
        b"q" * 299 + b"\r\n", b"w" * 1000, b"\n", b"c" * 64, b"\n", b"d" * 301,
    ]) + b"\n" + tail
    for block in (7, 64, 300, 301, 1 << 20):
        monkeypatch.setattr(importfile, "BLOCK", block)
        got = list(importfile._lines(io.BytesIO(body)))
        assert got == _lines_one_readline_each(io.BytesIO(body), 300), block


@pytest.mark.parametrize("header,encoding", [
    ("meter_id,register,ts,value", "utf-8"),
    ("Счетчик;Регистр;Дата;Показание;Комментарий", "cp1251"),
])
def test_parse_many_gives_what_parse_gives_line_by_line(header, encoding) -> None:
    from collector.ingest.importfile import LineParser, file_lines

    sep = ";" if ";" in header else ","
    extra = sep + "x" if header.count(sep) == 4 else ""
    value = "10,5" if sep == ";" else "10.5"
    rows = [
        f"m{k}{sep}1.8.0{sep}2026-10-01T00:{k:02d}:00+03:00{sep}{value}{extra}" for k in range(5)
    ] + [
        "", "   ", sep * (header.count(sep)), f'"m1"{sep}"1.8.0"{sep}"2026-10-01T01:00:00+03:00"{sep}"7"{extra}',
        f"m1{sep}1.8.0{sep}yesterday{sep}1{extra}", f"m1{sep}1.8.0{sep}2026-10-01T01:00:00{sep}1{extra}",
        f"m1{sep}1.8.0{sep}2026-10-01T01:00:00+03:00{sep}1E-99999{extra}", f"m1{sep}1.8.0",
        f"m1{sep}1.8.0{sep}2026-10-01T01:00:00+03:00{sep}{'9' * 40}{extra}",
        f" m2 {sep} 1.8.0 {sep}2026-10-01T01:00:00+03:00{sep} 3 {extra}",
    ]
    body = ("\n".join([header, *rows]) + "\n").encode(encoding) + b"m3,\xff\xfe\n" + b"y" * (70 * 1024) + b"\n"
    dialect, stream = sniff_csv(io.BytesIO(body), "import:t")
    lines = list(file_lines(stream, "csv", dialect.encoding))
    one = LineParser("csv", "import:t", dialect)
    expected = [x for n, raw, long in lines if (x := one.parse(n, raw, long)) is not None]
    got = LineParser("csv", "import:t", dialect).parse_many(lines)
    assert got == expected
    assert sum(isinstance(x, Reading) for x in got) >= 6 and any(isinstance(x, Rejected) for x in got)
