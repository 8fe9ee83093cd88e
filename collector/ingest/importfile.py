"""Readings from files: CSV with the header `meter_id,register,ts,value`, or JSON lines.

Used by `amr ingest` for back-fills and imports from other systems. Parsing
only turns text into `Reading`s; whatever cannot be represented becomes a
`Rejected` with its line number and raw bytes. Both carry the line in their
source (`import:FILE#L12`), so every refusal, the importer's or validation's,
can be traced to its line. Whether a reading is valid is decided by
collector.rules.vee, in the ingestion path, like for every other source.

CSV comes as spreadsheets in Russia export it, too (Excel, 1C): `;` between
fields, a decimal comma, a UTF-8 BOM or cp1251 text, Russian column names
(`HEADER_NAMES`), extra columns. `sniff_csv` detects each of these where the
file leaves no doubt and takes it from the caller where it does (see
`CsvDialect`); an ambiguous separator is refused with the option to give.

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

import codecs
import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
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
# Column names other systems use, lower-cased, with the column each means. Russian
# spreadsheet exports (Excel, 1C) name the columns in Russian; a file whose names are
# not here gives them with --columns.
HEADER_NAMES: dict[str, str] = {
    "meter_id": "meter_id", "счетчик": "meter_id", "счётчик": "meter_id",
    "прибор учета": "meter_id", "прибор учёта": "meter_id",
    "register": "register", "регистр": "register", "obis": "register",
    "ts": "ts", "дата": "ts", "время": "ts",
    "value": "value", "показание": "value", "значение": "value",
}
# separators a CSV export uses; the one of these the header holds is taken
DELIMITERS = (",", ";", "\t", "|")
HEAD_BYTES = 64 * 1024  # what dialect detection reads of a file
_BOM = b"\xef\xbb\xbf"
_SPACES = str.maketrans("", "", " \u00a0\u202f")  # thousands separators of a decimal-comma export
_WORD = re.compile(r"[^\W\d_]+")
_CYRILLIC_WORD = re.compile(r"[\u0400-\u04ff]+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


BLOCK = 1 << 20  # what _lines reads at a time


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, too long) without ever holding a huge line in memory.

    Reads the file in blocks of BLOCK bytes and splits each at once (a
    readline per line costs more than the parsing of a short line); a line
    longer than MAX_LINE bytes keeps its first 200 bytes, the rest of it is
    read and dropped a block at a time.
    """
    n = 0
    rest = b""
    long_head: bytes | None = None  # the head of a too-long line whose end is still to come
    read = f.read
    while True:
        block = read(BLOCK)
        if not block:
            break
        if long_head is not None:
            end = block.find(b"\n")
            if end < 0:
                continue
            n += 1
            yield n, long_head, True
            long_head = None
            block = block[end + 1:]
        parts = (rest + block).split(b"\n") if rest else block.split(b"\n")
        rest = parts.pop()
        for raw in parts:
            n += 1
            if len(raw) > MAX_LINE:
                yield n, raw[:200], True
            else:
                yield n, raw.rstrip(b"\r"), False
        if len(rest) > MAX_LINE:
            long_head, rest = rest[:200], b""
    if long_head is not None:
        yield n + 1, long_head, True
    elif rest:
        yield n + 1, rest.rstrip(b"\r"), False


def _decode(raw: bytes, n: int, source: str, encoding: str = "utf-8") -> str | Rejected:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        name = "UTF-8" if encoding.startswith("utf-8") else encoding
        return Rejected(
            source, raw, f"line {n}: not {name} text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
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


def _parse_value(value: Any, decimal: str = ".") -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        if decimal == ",":
            value = value.translate(_SPACES).replace(",", ".")
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            return None
    return None


def _reading(fields: dict[str, Any], n: int, raw: bytes, source: str, decimal: str = ".") -> Reading | Rejected:
    """One line's fields as a Reading, or a Rejected; source already names the line (#L<n>)."""
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
    value = _parse_value(fields["value"], decimal)
    if value is None:
        return Rejected(source, raw, f"line {n}: field 'value' {_short(fields['value'])} is not a decimal number",
                        code="not_numeric", meter_id=meter_id, register=register, ts=ts)
    why = _implausible(value)
    if why is not None:
        return Rejected(source, raw, f"line {n}: field 'value' {why}", code="implausible_value",
                        meter_id=meter_id, register=register, ts=ts)
    # the line travels in the source, so a refusal by validation (unknown meter, a date
    # outside the plausibility window) still says which line of the file it was
    return Reading(meter_id.strip(), register.strip(), ts, value, frozenset({quality.IMPORTED}), source)


def _short(value: Any) -> str:
    """repr of a field for a reason, cut to a readable length (a line may hold 64 KB)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(text)} characters)"


@dataclass(frozen=True)
class CsvDialect:
    """How a CSV file is written: what `sniff_csv` detected or was told.

    fields holds, per column of the file, the reading field it carries, or
    None for a column that is ignored (an export's extra column). given names
    what the caller set; the rest was detected.
    """

    delimiter: str = ","
    decimal: str = "."
    encoding: str = "utf-8"
    header: tuple[str, ...] = COLUMNS
    fields: tuple[str | None, ...] = COLUMNS
    given: frozenset[str] = frozenset()

    @property
    def ignored(self) -> tuple[str, ...]:
        """The file's columns that carry no reading field."""
        return tuple(h for h, f in zip(self.header, self.fields, strict=True) if f is None)

    def describe(self) -> str:
        """One line for a person: each choice, and whether it was detected or given."""
        def how(key: str) -> str:
            return "given" if key in self.given else "detected"

        sep = {"\t": "tab", ",": "','", ";": "';'", "|": "'|'"}.get(self.delimiter, repr(self.delimiter))
        cols = ", ".join(f"{h}={f}" for h, f in zip(self.header, self.fields, strict=True)
                         if f is not None and h != f)
        return (
            f"csv dialect: separator {sep} ({how('delimiter')}), decimal "
            f"{'comma' if self.decimal == ',' else 'point'} ({how('decimal')}), "
            f"encoding {self.encoding} ({how('encoding')})"
            + (f", columns {cols} ({how('columns')})" if cols else "")
            + (f"; ignoring the columns {', '.join(self.ignored)}" if self.ignored else "")
        )


def parse_columns(text: str) -> dict[str, str]:
    """`--columns meter_id=Счетчик,ts=Дата` as {field: the file's column name}."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, name = part.partition("=")
        key, name = key.strip(), name.strip()
        if not eq or key not in COLUMNS or not name:
            raise UserError(
                f"--columns: {part.strip()!r} is not FIELD=NAME with FIELD one of {', '.join(COLUMNS)}, "
                "like --columns meter_id=Счетчик,register=Регистр,ts=Дата,value=Показание"
            )
        out[key] = name
    return out


class _Prefixed:
    """A binary stream whose first bytes were read already (for detection), read on as one."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def readline(self, limit: int = -1) -> bytes:
        line = self._head.readline(limit)
        if line.endswith(b"\n") or (limit >= 0 and len(line) >= limit):
            return line
        return line + self._rest.readline(-1 if limit < 0 else limit - len(line))

    def read(self, size: int = -1) -> bytes:
        data = self._head.read(size)
        if size < 0:
            return data + self._rest.read()
        if len(data) < size:
            data += self._rest.read(size - len(data))
        return data

    def tell(self) -> int:
        return self._rest.tell()


def _encoding_of(head: bytes, given: str | None) -> str:
    """BOM: utf-8-sig; valid UTF-8: utf-8; else the given one, or cp1251 when it reads as Cyrillic."""
    if given is not None:
        try:
            name = codecs.lookup(given).name
        except LookupError:
            raise UserError(f"--encoding {given!r}: no such encoding (use utf-8, utf-8-sig or cp1251)") from None
        return "utf-8-sig" if name == "utf-8" and head.startswith(_BOM) else name
    if head.startswith(_BOM):
        return "utf-8-sig"
    cut = head if len(head) < HEAD_BYTES else head[:head.rfind(b"\n") + 1]  # no character cut in two
    try:
        cut.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    # every byte from 0xC0 is a Cyrillic letter in cp1251, so a letter alone proves nothing;
    # Russian text is words of Cyrillic letters only, where Latin-1 or another code page
    # read as cp1251 gives words of Latin and Cyrillic letters mixed ('été' as 'йtй')
    words = [w for w in _WORD.findall(cut.decode("cp1251", errors="replace")) if not w.isascii()]
    if words and sum(bool(_CYRILLIC_WORD.fullmatch(w)) for w in words) >= 0.9 * len(words):
        return "cp1251"
    return "utf-8"  # not text this can name: its lines are refused one by one as not UTF-8


def _field_of(name: str, columns: Mapping[str, str]) -> str | None:
    key = name.strip().lstrip("\ufeff").strip('"').strip().lower()
    for field_name, theirs in columns.items():
        if theirs.strip().lower() == key:
            return field_name
    return HEADER_NAMES.get(key)


def _header_problem(header: list[str], fields: list[str | None]) -> str | None:
    missing = [c for c in COLUMNS if c not in fields]
    twice = sorted({f for f in fields if f is not None and fields.count(f) > 1})
    if twice:
        both = [h for h, f in zip(header, fields, strict=True) if f == twice[0]]
        return f"columns {', '.join(map(repr, both))} both mean {twice[0]!r}; say which with --columns {twice[0]}=NAME"
    if missing:
        return f"no column for {', '.join(missing)}"
    return None


def sniff_csv(
    f: BinaryIO, source: str, delimiter: str | None = None, decimal: str | None = None,
    encoding: str | None = None, columns: Mapping[str, str] | None = None,
) -> tuple[CsvDialect, BinaryIO]:
    """Detect how a CSV file is written, from its first bytes; returns the stream to read on.

    The separator is the one of DELIMITERS whose split of the header names the
    four columns and gives the first lines as many fields; when more than one
    does (or none does and several occur), the file is refused with the option to
    give. The decimal mark is a comma when the separator is not. What is given is
    taken as it is.
    """
    columns = dict(columns or {})
    given = frozenset(k for k, v in (("delimiter", delimiter), ("decimal", decimal),
                                     ("encoding", encoding), ("columns", columns or None)) if v)
    head = f.read(HEAD_BYTES)
    stream: BinaryIO = _Prefixed(head, f)  # type: ignore[assignment]
    enc = _encoding_of(head, encoding)
    lines = [ln for ln in head.split(b"\n")[:20] if ln.strip()]
    if not lines:
        raise UserError(f"{source}: empty file, expected the header {','.join(COLUMNS)}")
    try:
        header_text = lines[0].rstrip(b"\r").decode(enc)
    except UnicodeDecodeError:
        raise UserError(f"{source}: line 1: the header is not {enc} text; give the file's encoding "
                        "with --encoding (utf-8, cp1251)") from None
    header_text = header_text.lstrip("\ufeff")
    whole = len(head) < HEAD_BYTES  # else the last line read may be cut short
    sample = [header_text] + [ln.rstrip(b"\r").decode(enc, errors="replace")
                              for ln in (lines[1:] if whole else lines[1:-1])]

    def split(line: str, sep: str) -> list[str]:
        try:
            return next(csv.reader([line], delimiter=sep), [])
        except csv.Error:
            return []

    if delimiter is not None:
        if delimiter in ("tab", "\\t"):
            delimiter = "\t"
        if len(delimiter) != 1:
            raise UserError(f"--delimiter {delimiter!r}: give one character, like ';' or ',' (or 'tab')")
        sep = delimiter
    else:
        present = [d for d in DELIMITERS if d in header_text]
        fitting = []
        for d in present:
            cells = split(header_text, d)
            fields = [_field_of(c, columns) for c in cells]
            widths = {len(split(line, d)) for line in sample[1:]}
            if _header_problem(cells, fields) is None and widths <= {len(cells)}:
                fitting.append(d)
        if len(fitting) == 1:
            sep = fitting[0]
        elif not present or (not fitting and len(present) == 1):
            sep = present[0] if present else ","
        else:
            shown = " or ".join(repr(d) for d in (fitting or present))
            raise UserError(
                f"{source}: cannot tell the field separator from the header {header_text!r}: it could be "
                f"{shown}; give it with --delimiter (like --delimiter ';')"
            )
    if decimal is not None and decimal not in (".", ","):
        raise UserError(f"--decimal {decimal!r}: give '.' or ','")
    dec = decimal or ("," if sep != "," else ".")
    cells = split(header_text, sep)
    fields = [_field_of(c, columns) for c in cells]
    problem = _header_problem(cells, fields)
    if problem is not None:
        known = ", ".join(sorted({k for k in HEADER_NAMES if not k.isascii()}))
        raise UserError(
            f"{source}: line 1: the header must name the columns {','.join(COLUMNS)} ({problem}), got "
            f"{header_text!r}; names known besides these: {known}; name yours with "
            "--columns meter_id=NAME,register=NAME,ts=NAME,value=NAME"
        )
    dialect = CsvDialect(sep, dec, enc, tuple(c.strip() for c in cells), tuple(fields), given)
    return dialect, stream


class _FastLine:
    """The common line of a CSV export, turned into a Reading without the general path's detours.

    An export repeats each timestamp for every meter (files are sorted by
    time), so the timestamp's text is parsed once and its UTC instant reused;
    a value of a few plain digits cannot break MAX_EXPONENT, so its check is
    skipped. Anything else (an empty field, an odd timestamp or value) returns
    None and the line takes `_reading`, which names what is wrong: the result
    is the same Reading either way, only sooner.
    """

    __slots__ = ("decimal", "flags", "meter", "register", "times", "ts", "value")

    def __init__(self, meter: int, register: int, ts: int, value: int, decimal: str) -> None:
        self.meter, self.register, self.ts, self.value = meter, register, ts, value
        self.decimal = decimal
        self.flags = frozenset({quality.IMPORTED})
        self.times: dict[str, datetime] = {}

    @classmethod
    def of(cls, dialect: CsvDialect) -> _FastLine | None:
        fields = dialect.fields
        if not all(fields.count(k) == 1 for k in COLUMNS):
            return None
        meter, register, ts, value = (fields.index(k) for k in COLUMNS)
        return cls(meter, register, ts, value, dialect.decimal)

    def reading(self, cells: list[str], source: str) -> Reading | None:
        meter_id, register = cells[self.meter].strip(), cells[self.register].strip()
        text, value_text = cells[self.ts], cells[self.value]
        if not meter_id or not register or not value_text or len(value_text) > MAX_EXPONENT:
            return None
        ts = self.times.get(text)
        if ts is None:
            parsed = _parse_ts(text)
            if parsed is None or parsed.tzinfo is None or parsed.utcoffset() is None:
                return None
            try:
                ts = parsed.astimezone(UTC)
            except (OverflowError, ValueError):
                return None
            if len(self.times) >= 100_000:
                self.times.clear()
            self.times[text] = ts
        if self.decimal == ",":
            value_text = value_text.translate(_SPACES).replace(",", ".")
        if "e" in value_text or "E" in value_text:
            return None
        try:
            value = Decimal(value_text)
        except InvalidOperation:
            return None
        return Reading(meter_id, register, ts, value, self.flags, source)


class LineParser:
    """Turns one line of a file into a Reading, a Rejected, or None (a blank line).

    The unit `amr ingest`'s worker processes share: the parent reads and
    bounds the lines (`_lines`) and skips the header, each worker parses its
    lines here, so one line gives the same result in one process or in many.
    """

    def __init__(self, fmt: str, source: str, dialect: CsvDialect | None = None) -> None:
        if fmt not in ("csv", "jsonl"):
            raise UserError(f"unknown format {fmt!r}: use csv or jsonl")
        if fmt == "csv" and dialect is None:
            raise ValueError("a CSV LineParser needs the file's dialect (sniff_csv)")
        self.fmt, self.source, self.dialect = fmt, source, dialect
        self._fast = _FastLine.of(dialect) if dialect is not None else None
        self._names = ",".join(dialect.header) if dialect is not None else ""

    def parse(self, n: int, raw: bytes, too_long: bool = False) -> Reading | Rejected | None:
        at = f"{self.source}#L{n}"
        if too_long:
            return Rejected(at, raw, f"line {n}: longer than {MAX_LINE} bytes", code="too_long")
        if self.dialect is None:
            return self._json(n, raw, at)
        text = _decode(raw, n, at, self.dialect.encoding)
        if isinstance(text, Rejected):
            return text
        if not text.strip():
            return None
        return self._csv(n, raw, at, text, self.dialect)

    def parse_many(self, lines: Iterable[tuple[int, bytes, bool]]) -> list[Reading | Rejected]:
        """parse() of each line, blank lines left out: the same items, in one loop.

        The common CSV line (no quotes, every field, a plain timestamp and
        value) takes _FastLine without the per-line calls of parse(); any
        other line goes through parse() itself.
        """
        fast, dialect = self._fast, self.dialect
        if fast is None or dialect is None:
            return [x for n, raw, long in lines if (x := self.parse(n, raw, long)) is not None]
        out: list[Reading | Rejected] = []
        append, reading, parse = out.append, fast.reading, self.parse
        encoding, sep, width, prefix = dialect.encoding, dialect.delimiter, len(dialect.fields), f"{self.source}#L"
        for n, raw, long in lines:
            if not long:
                try:
                    text = raw.decode(encoding)
                except UnicodeDecodeError:
                    text = '"'  # parse() says why
                if '"' not in text:
                    cells = text.split(sep)
                    if len(cells) == width and (r := reading(cells, f"{prefix}{n}")) is not None:
                        append(r)
                        continue
            x = parse(n, raw, long)
            if x is not None:
                append(x)
        return out

    def _csv(self, n: int, raw: bytes, at: str, text: str, dialect: CsvDialect) -> Reading | Rejected:
        width = len(dialect.fields)
        if '"' in text:
            try:
                cells = next(csv.reader(io.StringIO(text), delimiter=dialect.delimiter))
            except csv.Error as exc:
                return Rejected(at, raw, f"line {n}: not CSV ({exc})", code="parse_error")
        else:  # what csv.reader gives for a line without quotes, at a fraction of its cost
            cells = text.split(dialect.delimiter)
            if self._fast is not None and len(cells) == width:
                reading = self._fast.reading(cells, at)
                if reading is not None:
                    return reading
        if len(cells) != width:
            return Rejected(at, raw, f"line {n}: {len(cells)} fields, expected {width} "
                            f"({self._names})", code="truncated" if len(cells) < width else "parse_error")
        fields = {k: v for k, v in zip(dialect.fields, cells, strict=True) if k is not None}
        return _reading(fields, n, raw, at, dialect.decimal)

    def _json(self, n: int, raw: bytes, at: str) -> Reading | Rejected | None:
        text = _decode(raw, n, at)
        if isinstance(text, Rejected):
            return text
        if not text.strip():
            return None
        if too_deep(text):
            return Rejected(at, raw, f"line {n}: JSON nested deeper than {MAX_DEPTH} levels", code="parse_error")
        try:
            obj = json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=Decimal)
        except json.JSONDecodeError as exc:
            return Rejected(at, raw, f"line {n}: not JSON ({exc.msg} at column {exc.colno})", code="parse_error")
        except (RecursionError, ValueError) as exc:  # the depth check should have caught it; a backstop
            return Rejected(at, raw, f"line {n}: not JSON a reading can be read from ({type(exc).__name__})",
                            code="parse_error")
        if not isinstance(obj, dict):
            return Rejected(at, raw, f"line {n}: expected a JSON object with keys {', '.join(COLUMNS)}",
                            code="parse_error")
        return _reading(obj, n, raw, at)


def file_lines(f: BinaryIO, fmt: str, encoding: str = "utf-8") -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, too long) of every line a LineParser is to see.

    A CSV file's header (its first line that decodes and is not blank, which
    sniff_csv checked) is left out; lines before it go to the parser, which
    refuses or skips them as anywhere else.
    """
    lines = _lines(f)
    if fmt == "csv":
        for n, raw, too_long in lines:
            if not too_long:
                try:
                    header = raw.decode(encoding).strip() != ""
                except UnicodeDecodeError:
                    header = False
                if header:
                    break
            yield n, raw, too_long
    yield from lines


def _rows(f: BinaryIO, parser: LineParser, fmt: str) -> Iterator[Reading | Rejected]:
    encoding = parser.dialect.encoding if parser.dialect is not None else "utf-8"
    for n, raw, too_long in file_lines(f, fmt, encoding):
        item = parser.parse(n, raw, too_long)
        if item is not None:
            yield item


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


def read_file(f: BinaryIO, fmt: str, source: str, dialect: CsvDialect | None = None) -> Iterator[Reading | Rejected]:
    """Every line of an open binary file as a Reading or a Rejected.

    A CSV file is read with the dialect given (from `sniff_csv`, with the stream
    it returned), else with the one detected from its first bytes.
    """
    if fmt == "csv" and dialect is None:
        dialect, f = sniff_csv(f, source)
    return _rows(f, LineParser(fmt, source, dialect), fmt)
