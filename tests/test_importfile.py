"""The file importer's bounds, line by line (pure: bytes in, Readings and Rejecteds out)."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from adapters.reading import Reading, Rejected
from collector.ingest.importfile import MAX_DEPTH, MAX_EXPONENT, read_file, too_deep


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
