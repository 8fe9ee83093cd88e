"""Readings from files: CSV with the header `meter_id,register,ts,value`, or JSON lines.

Used by `amr ingest` for back-fills and imports from other systems. Parsing
only turns text into `Reading`s; whatever cannot be represented becomes a
`Rejected` with its line number and raw bytes; a `Reading` carries its
line in its source (`import:FILE#L12`). Whether a reading is valid is
decided by collector.rules.vee, in the ingestion path, like for every other source.

A file is untrusted input, so every line is bounded before it is believed:
its length (`MAX_LINE`), its JSON nesting (`MAX_DEPTH`, checked before the
parser runs, because Python's json recurses once per level and raises
RecursionError near a thousand), its number literals (integers are parsed as
Decimal, so a 5,000-digit integer is not Python's "exceeds the limit for
integer string conversion" ValueError), the decimal exponent of its value
(`MAX_EXPONENT`) and its timestamp (an instant that has no UTC equivalent in
years 1..9999 is refused here, because converting it would raise
OverflowError further down). Each bound refuses its line alone, with the
line number and the reason; the rest of the file goes on.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO

from adapters import quality
from adapters.reading import Reading, Rejected
from amr.errors import UserError

COLUMNS = ("meter_id", "register", "ts", "value")
MAX_LINE = 64 * 1024  # a reading is a few dozen bytes; anything this long is not one
# A reading is one flat object; 32 levels leaves room for wrappers other systems add
# (an envelope, a list of values) and stays far below the parser's recursion limit.
MAX_DEPTH = 32
# A register value is a count of kWh with a few decimals: nine integer digits
# cover any meter, six decimals any resolution. 30 either side of the point is
# generous and still keeps absurd literals (1E-99999, a 5,000-digit integer) out
# of the arithmetic of intervals and zones, where they would raise or take
# seconds each.
MAX_EXPONENT = 30
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, too long) without ever holding a huge line in memory."""
    n = 0
    while True:
        chunk = f.readline(MAX_LINE + 1)
        if not chunk:
            return
        n += 1
        if len(chunk) > MAX_LINE and not chunk.endswith(b"\n"):
            head = chunk[:200]
            while chunk and not chunk.endswith(b"\n"):  # skip the rest of the line
                chunk = f.readline(1 << 20)
            yield n, head, True
            continue
        yield n, chunk.rstrip(b"\r\n"), False


def _decode(raw: bytes, n: int, source: str) -> str | Rejected:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(
            source, raw, f"line {n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
            code="encoding",
        )


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether a JSON text nests objects and arrays deeper than limit.

    Brackets inside strings do not count. Linear in the text; a line with
    few brackets (every honest reading) is answered without a scan.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _BRACKETS.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _parse_ts(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        return None


def _as_utc(ts: datetime) -> datetime | None:
    """An aware ts as UTC (None when that instant is outside years 1..9999); naive ts as is.

    A naive ts is left for validation to refuse as naive_ts: converting it
    would read it in this machine's local time.
    """
    if ts.tzinfo is None or ts.utcoffset() is None:
        return ts
    try:
        return ts.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _implausible(value: Decimal) -> str | None:
    """Why a finite value is no register value (too many digits either side), else None.

    NaN and infinities pass: validation refuses them as not_finite.
    """
    if not value.is_finite():
        return None
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent >= -MAX_EXPONENT and value.adjusted() <= MAX_EXPONENT:
        return None
    digits = len(value.as_tuple().digits)
    text = str(value)
    shown = text if len(text) <= 40 else f"{text[:20]}...{text[-8:]}"
    return (
        f"{shown} is not a plausible register value: {digits} digits, decimal exponent "
        f"{value.adjusted()} (at most {MAX_EXPONENT} digits either side of the point)"
    )


def _parse_value(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            return None
    return None


def _reading(fields: dict[str, Any], n: int, raw: bytes, source: str) -> Reading | Rejected:
    meter_id, register = fields.get("meter_id"), fields.get("register")
    for key in COLUMNS:
        if fields.get(key) in (None, ""):
            return Rejected(source, raw, f"line {n}: field {key!r} is missing or empty", code="parse_error",
                            meter_id=meter_id if isinstance(meter_id, str) else None)
    if not isinstance(meter_id, str) or not isinstance(register, str):
        return Rejected(source, raw, f"line {n}: fields 'meter_id' and 'register' must be text", code="parse_error")
    parsed = _parse_ts(fields["ts"])
    if parsed is None:
        return Rejected(source, raw, f"line {n}: field 'ts' {_short(fields['ts'])} is not an ISO 8601 timestamp",
                        code="bad_ts", meter_id=meter_id, register=register)
    ts = _as_utc(parsed)
    if ts is None:
        return Rejected(source, raw, f"line {n}: field 'ts' {_short(fields['ts'])} is out of range: "
                        "its UTC instant is outside the years 1..9999", code="bad_ts",
                        meter_id=meter_id, register=register)
    value = _parse_value(fields["value"])
    if value is None:
        return Rejected(source, raw, f"line {n}: field 'value' {_short(fields['value'])} is not a decimal number",
                        code="not_numeric", meter_id=meter_id, register=register, ts=ts)
    why = _implausible(value)
    if why is not None:
        return Rejected(source, raw, f"line {n}: field 'value' {why}", code="implausible_value",
                        meter_id=meter_id, register=register, ts=ts)
    # the line travels in the source, so a refusal by validation (unknown meter, a date
    # outside the plausibility window) still says which line of the file it was
    return Reading(meter_id.strip(), register.strip(), ts, value, frozenset({quality.IMPORTED}), f"{source}#L{n}")


def _short(value: Any) -> str:
    """repr of a field for a reason, cut to a readable length (a line may hold 64 KB)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(text)} characters)"


def _csv_rows(f: BinaryIO, source: str) -> Iterator[Reading | Rejected]:
    lines = _lines(f)
    header: list[str] | None = None
    for n, raw, too_long in lines:
        if too_long:
            yield Rejected(source, raw, f"line {n}: longer than {MAX_LINE} bytes", code="too_long")
            continue
        text = _decode(raw, n, source)
        if isinstance(text, Rejected):
            if header is None:
                raise UserError(f"{source}: line {n}: the header is not UTF-8 text")
            yield text
            continue
        if not text.strip():
            continue
        try:
            cells = next(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            if header is None:
                raise UserError(f"{source}: line {n}: the header is not CSV: {exc}") from None
            yield Rejected(source, raw, f"line {n}: not CSV ({exc})", code="parse_error")
            continue
        if header is None:
            header = [c.strip().lstrip("\ufeff") for c in cells]
            if sorted(header) != sorted(COLUMNS):
                raise UserError(
                    f"{source}: line {n}: the header must name the columns {','.join(COLUMNS)}, "
                    f"got {text!r}"
                )
            continue
        if len(cells) != len(header):
            yield Rejected(source, raw, f"line {n}: {len(cells)} fields, expected {len(header)} "
                           f"({','.join(header)})", code="truncated" if len(cells) < len(header) else "parse_error")
            continue
        yield _reading(dict(zip(header, cells, strict=True)), n, raw, source)
    if header is None:
        raise UserError(f"{source}: empty file, expected the header {','.join(COLUMNS)}")


def _json_rows(f: BinaryIO, source: str) -> Iterator[Reading | Rejected]:
    for n, raw, too_long in _lines(f):
        if too_long:
            yield Rejected(source, raw, f"line {n}: longer than {MAX_LINE} bytes", code="too_long")
            continue
        text = _decode(raw, n, source)
        if isinstance(text, Rejected):
            yield text
            continue
        if not text.strip():
            continue
        if too_deep(text):
            yield Rejected(source, raw, f"line {n}: JSON nested deeper than {MAX_DEPTH} levels", code="parse_error")
            continue
        try:
            obj = json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=Decimal)
        except json.JSONDecodeError as exc:
            yield Rejected(source, raw, f"line {n}: not JSON ({exc.msg} at column {exc.colno})", code="parse_error")
            continue
        except (RecursionError, ValueError) as exc:  # the depth check should have caught it; a backstop
            yield Rejected(source, raw, f"line {n}: not JSON a reading can be read from ({type(exc).__name__})",
                           code="parse_error")
            continue
        if not isinstance(obj, dict):
            yield Rejected(source, raw, f"line {n}: expected a JSON object with keys {', '.join(COLUMNS)}",
                           code="parse_error")
            continue
        yield _reading(obj, n, raw, source)


def sniff_format(path: Path) -> str:
    """'csv' or 'jsonl', by extension, else by the first byte."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    with path.open("rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if head.startswith(b"{") else "csv"


def read_file(f: BinaryIO, fmt: str, source: str) -> Iterator[Reading | Rejected]:
    """Every line of an open binary file as a Reading or a Rejected."""
    if fmt == "csv":
        return _csv_rows(f, source)
    if fmt == "jsonl":
        return _json_rows(f, source)
    raise UserError(f"unknown format {fmt!r}: use csv or jsonl")
