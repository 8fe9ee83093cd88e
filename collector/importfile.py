"""Readings from files: CSV with the header `meter_id,register,ts,value`, or JSON lines.

Used by `amr ingest` for back-fills and imports from other systems. Parsing
only turns text into `Reading`s; whatever cannot be represented becomes a
`Rejected` with its line number and raw bytes. Whether a reading is valid is
decided by collector.vee, in the ingestion path, like for every other source.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO

from adapters import quality
from adapters.reading import Reading, Rejected
from collector.errors import UserError

COLUMNS = ("meter_id", "register", "ts", "value")
MAX_LINE = 64 * 1024  # a reading is a few dozen bytes; anything this long is not one


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


def _parse_ts(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


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
    ts = _parse_ts(fields["ts"])
    if ts is None:
        return Rejected(source, raw, f"line {n}: field 'ts' {fields['ts']!r} is not an ISO 8601 timestamp",
                        code="bad_ts", meter_id=meter_id, register=register)
    value = _parse_value(fields["value"])
    if value is None:
        return Rejected(source, raw, f"line {n}: field 'value' {fields['value']!r} is not a decimal number",
                        code="not_numeric", meter_id=meter_id, register=register, ts=ts)
    return Reading(meter_id.strip(), register.strip(), ts, value, frozenset({quality.IMPORTED}), source)


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
        cells = next(csv.reader(io.StringIO(text)))
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
        try:
            obj = json.loads(text, parse_float=Decimal, parse_constant=Decimal)
        except json.JSONDecodeError as exc:
            yield Rejected(source, raw, f"line {n}: not JSON ({exc.msg} at column {exc.colno})", code="parse_error")
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
