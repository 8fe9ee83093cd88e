"""Bank payment registries: the daily files of payments banks and agents accepted for us.

A registry is taken whole or not at all. It is first read completely (the
bytes decoded in the declared encoding, every line split and parsed, the
totals line checked against the lines); any line that is not what the layout
says refuses the whole file, naming the line and the reason, before anything
is written. Only then is it booked, in one transaction: each payment once per
(source, operation id), so a registry sent again books nothing; on its
operation date (the day the money was paid, which is what penalties count
to); as an energy payment unless the layout has a penalty column (a payment
says what it pays, and a registry line that does not say so pays energy).

A payment whose account is not one of ours goes to the unmatched queue
(registry_payment with status 'unmatched') for an operator to match by hand
(`match_payment`); a line whose operation id was seen before with another
account, date or amount is refused on its own (it is not a repeat but a
clash) and reported, the rest of the file is booked.

Layouts are data (billing/catalogues/registry-layouts/*.toml): which column
holds which field, the separator, the encoding, the date formats and the
totals line's prefix. The default layout is documented in its file.

The file's payments are booked set-based (COPY into a staging table, then
INSERT ... SELECT into registry_payment and ledger_entry), with the same keys
`billing.ledger.book_payment` writes (`registry:<source>:<operation id>`
then `:energy` / `:penalty`), because a registry holds a million lines; a
single payment matched by hand goes through `book_payment` itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

from amr.errors import UserError
from amr.tomlfile import TomlFileError, read_toml
from billing import ledger

LAYOUTS = Path(__file__).resolve().parent / "catalogues" / "registry-layouts"
DEFAULT_LAYOUT = LAYOUTS / "default.toml"
ENCODINGS = ("cp1251", "utf-8", "cp866")
FIELDS = ("date", "time", "branch", "operation_id", "account", "payer", "address", "period", "amount",
          "penalty")
REQUIRED = ("date", "operation_id", "account", "amount")
BOM = b"\xef\xbb\xbf"
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# an amount: digits in groups (spaces between them, as Excel writes them), then kopecks
_AMOUNT = re.compile(r"^(\d+)(?:[.,](\d{1,2}))?$")
_SPACES = str.maketrans("", "", " \u00a0\u202f\u2009")
# characters a registry written in the declared encoding does not hold: C0 controls, the
# symbols of cp1251's 0x80-0xBF that cp866 letters turn into, Cyrillic letters of no language
# a payer here writes (what cp866 capitals become in cp1251), box drawing (cp1251 letters read
# as cp866), and the replacement character
_FOREIGN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u0080-\u009f\u0402-\u0403\u0405\u0408-\u040d\u040f"
                      "\u0452-\u0453\u0455\u0458-\u045d\u045f\u00a4\u00a6\u00a7\u00a9\u00ac-\u00ae"
                      "\u201a\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122\u2500-\u25ff\ufffd]")


class RegistryRefused(UserError, ValueError):
    """A file that is not a registry as its layout describes it; nothing of it was booked."""


class LayoutError(UserError, ValueError):
    """A layout file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Layout:
    """How one kind of registry is written. Columns are numbered from 1, as bank specs number them."""

    name: str
    columns: dict[str, int]
    source: str = "bank"
    encoding: str = "cp1251"
    separator: str = ";"
    header_lines: int = 0
    fields: int | None = None
    date_formats: tuple[str, ...] = ("%d-%m-%Y", "%d.%m.%Y")
    time_formats: tuple[str, ...] = ("%H:%M:%S", "%H-%M-%S", "%H:%M")
    period_formats: tuple[str, ...] = ("%m%Y",)
    totals_prefix: str = "="
    totals_count: int = 1
    totals_sum: int = 2

    @property
    def width(self) -> int:
        """The number of fields a payment line has."""
        return self.fields or max(self.columns.values())


def load_layout(path: Path | str | None = None) -> Layout:
    """Read a layout file (default: the default layout), checked whole."""
    path = Path(path) if path is not None else DEFAULT_LAYOUT
    try:
        raw = read_toml(path)
    except TomlFileError as exc:
        raise LayoutError(str(exc)) from None
    problems: list[str] = []
    columns = raw.get("columns")
    if not isinstance(columns, dict):
        raise LayoutError(f"{path}: no [columns] table: name the column (from 1) of each field")
    for name, col in columns.items():
        if name not in FIELDS:
            problems.append(f"key 'columns.{name}': unknown field; expected one of {', '.join(FIELDS)}")
        elif not isinstance(col, int) or isinstance(col, bool) or col < 1:
            problems.append(f"key 'columns.{name}': a column number from 1, got {col!r}")
    for name in REQUIRED:
        if name not in columns:
            problems.append(f"key 'columns.{name}': missing (a registry line must have it)")
    totals = raw.get("totals", {})
    encoding = raw.get("encoding", "cp1251")
    if encoding not in ENCODINGS:
        problems.append(f"key 'encoding': {encoding!r} is not one of {', '.join(ENCODINGS)}")
    source = raw.get("source", "bank")
    if not isinstance(source, str) or not _SOURCE.match(source):
        problems.append(f"key 'source': {source!r}: lower-case letters, digits, '_', '.', '-'")
    separator = raw.get("separator", ";")
    if not isinstance(separator, str) or len(separator) != 1:
        problems.append(f"key 'separator': one character, got {separator!r}")
    header = raw.get("header_lines", 0)
    if not isinstance(header, int) or isinstance(header, bool) or header < 0:
        problems.append(f"key 'header_lines': the number of lines before the first payment, got {header!r}")
    if not isinstance(totals, dict):
        problems.append("key 'totals': a table with prefix, count and sum")
        totals = {}
    prefix = totals.get("prefix", "=")
    if not isinstance(prefix, str) or not prefix:
        problems.append(f"key 'totals.prefix': what the totals line starts with, like \"=\", got {prefix!r}")
    for k in ("count", "sum"):
        v = totals.get(k, 1 if k == "count" else 2)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"key 'totals.{k}': a field number from 1 (after the prefix), got {v!r}")
    fields = raw.get("fields")
    if fields is not None and (not isinstance(fields, int) or fields < max(
            [c for c in columns.values() if isinstance(c, int)], default=1)):
        problems.append(f"key 'fields': the number of fields in a line, at least the last column, got {fields!r}")
    if problems:
        raise LayoutError(f"{len(problems)} problem(s) in the layout {path}:\n" + "\n".join(problems))

    def formats(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = raw.get(key, list(default))
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise LayoutError(f"{path}: key '{key}': a list of strptime formats, got {value!r}")
        return tuple(value)

    return Layout(
        name=str(raw.get("name", path.stem)), columns={k: int(v) for k, v in columns.items()},
        source=source, encoding=encoding, separator=separator,
        header_lines=int(raw.get("header_lines", 0)), fields=fields,
        date_formats=formats("date_formats", ("%d-%m-%Y", "%d.%m.%Y")),
        time_formats=formats("time_formats", ("%H:%M:%S", "%H-%M-%S", "%H:%M")),
        period_formats=formats("period_formats", ("%m%Y",)),
        totals_prefix=str(totals.get("prefix", "=")), totals_count=int(totals.get("count", 1)),
        totals_sum=int(totals.get("sum", 2)),
    )


class Row(NamedTuple):
    """One payment line, parsed. Amounts are whole kopecks (int), exact and fast to add up.

    A tuple, not a dataclass: a registry has a million of them, and a tuple is
    made several times faster.
    """

    line: int
    operation_id: str
    account_given: str
    account: str | None  # normalised; None when the field is not an account number at all
    paid_on: date
    paid_time: time | None
    branch: str | None
    payer: str | None
    address: str | None
    period: date | None
    energy: int
    penalty: int


@dataclass(frozen=True)
class Registry:
    """A file read whole and found to be a registry: its rows and what its totals line said."""

    name: str
    checksum: str
    encoding: str
    rows: list[Row]
    count: int
    total: Decimal


def _kopecks_text(k: int) -> str:
    return f"{k // 100}.{k % 100:02d}"


def _money(k: int) -> Decimal:
    return Decimal(_kopecks_text(k))


def parse_amount(text: str) -> int | None:
    """Kopecks of '1 234,56', '1234.5' or '1234'; None when it is no amount."""
    m = _AMOUNT.match(text.translate(_SPACES))
    if m is None:
        return None
    frac = m.group(2) or "0"
    return int(m.group(1)) * 100 + int(frac.ljust(2, "0"))


def decode(data: bytes, layout: Layout, encoding: str | None = None) -> tuple[str, str]:
    """The file's text and the encoding it was read in; refused when it is not in that encoding.

    Without a declared encoding, a UTF-8 byte-order mark means UTF-8 and
    anything else the layout's encoding. A file that decodes in a one-byte
    encoding but is valid UTF-8 with letters beyond ASCII, or holds
    characters text in that encoding would not (box drawing, stray symbols),
    is another encoding misread, and refused with a hint rather than booked
    with a garbled payer.
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise RegistryRefused(f"encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
    if data.startswith(BOM):
        if encoding not in (None, "utf-8"):
            raise RegistryRefused(f"line 1: the file starts with a UTF-8 byte-order mark, but {encoding} was "
                                  "declared: import it with --encoding utf-8")
        encoding, data = "utf-8", data[len(BOM):]
    encoding = encoding or layout.encoding
    if encoding != "utf-8" and not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            raise RegistryRefused(f"the file is UTF-8, not {encoding} (read as {encoding} its letters would "
                                  "be garbled): import it with --encoding utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RegistryRefused(f"line {line}: byte 0x{data[exc.start]:02x} is not {encoding} text: the file "
                              f"is in another encoding (--encoding {'|'.join(ENCODINGS)}) or damaged") from None
    bad = _FOREIGN.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise RegistryRefused(f"line {line}: character {bad.group()!r} (U+{ord(bad.group()):04X}) is not "
                              f"what a registry in {encoding} holds: the file is probably in another "
                              f"encoding (--encoding {'|'.join(e for e in ENCODINGS if e != encoding)})")
    return text, encoding


class _Parser:
    """Turns field texts into values, caching dates and periods (a registry has few distinct ones)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self._dates: dict[str, date] = {}
        self._times: dict[str, time] = {}
        self._periods: dict[str, date] = {}

    def _parse(self, cache: dict[str, Any], text: str, formats: Sequence[str], kind: str, line: int,
               what: str) -> Any:
        value = cache.get(text)
        if value is not None:
            return value
        for fmt in formats:
            try:
                parsed = datetime.strptime(text, fmt)
            except ValueError:
                continue
            value = (parsed.time() if kind == "time" else parsed.date().replace(day=1) if kind == "period"
                     else parsed.date())
            cache[text] = value
            return value
        raise RegistryRefused(f"line {line}: {what} {text!r} is not a {kind} "
                              f"({' or '.join(formats)})")

    def day(self, text: str, line: int) -> date:
        return self._parse(self._dates, text, self.layout.date_formats, "date", line, "operation date")

    def clock(self, text: str, line: int) -> time | None:
        return self._parse(self._times, text, self.layout.time_formats, "time", line,
                           "operation time") if text else None

    def month(self, text: str, line: int) -> date | None:
        return self._parse(self._periods, text, self.layout.period_formats, "period", line,
                           "period") if text else None


def parse(data: bytes, layout: Layout, *, name: str = "registry", encoding: str | None = None) -> Registry:
    """Read a registry whole; `RegistryRefused` (with the line and the reason) if it is not one."""
    checksum = hashlib.sha256(data).hexdigest()
    text, used = decode(data, layout, encoding)
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) <= layout.header_lines:
        raise RegistryRefused("the file holds no totals line (it is empty): not a registry, or cut short")
    last = len(lines)
    prefix, sep, width = layout.totals_prefix, layout.separator, layout.width
    totals_line = lines[-1].rstrip("\r")
    if not totals_line.startswith(prefix):
        raise RegistryRefused(f"line {last}: the file ends without a totals line ('{prefix}COUNT{sep}SUM'): "
                              "it is cut short; ask the sender for the whole file")
    cols = layout.columns
    i_date, i_op, i_acc, i_amount = (cols[k] - 1 for k in ("date", "operation_id", "account", "amount"))
    optional = {k: cols[k] - 1 for k in ("time", "branch", "payer", "address", "period", "penalty") if k in cols}
    i_time, i_branch, i_payer = optional.get("time"), optional.get("branch"), optional.get("payer")
    i_address, i_period, i_penalty = optional.get("address"), optional.get("period"), optional.get("penalty")
    p = _Parser(layout)
    rows: list[Row] = []
    total = 0
    for n in range(layout.header_lines, last - 1):
        raw = lines[n].rstrip("\r")
        line = n + 1
        if not raw.strip():
            continue
        if raw.startswith(prefix):
            raise RegistryRefused(f"line {line}: a totals line before the last line ({last}): two registries "
                                  "in one file, or a damaged one")
        f = raw.split(sep)
        if len(f) != width:
            raise RegistryRefused(f"line {line}: {len(f)} fields, the layout {layout.name!r} has {width} "
                                  f"(separated by {sep!r})")
        op = f[i_op].strip()
        if not op:
            raise RegistryRefused(f"line {line}: no operation id (column {i_op + 1})")
        energy = parse_amount(f[i_amount])
        if energy is None:
            raise RegistryRefused(f"line {line}: amount {f[i_amount]!r} is not an amount (like 1234,56 or "
                                  "1 234.56; no sign)")
        penalty = 0
        if i_penalty is not None and f[i_penalty].strip():
            parsed = parse_amount(f[i_penalty])
            if parsed is None:
                raise RegistryRefused(f"line {line}: penalty {f[i_penalty]!r} is not an amount")
            penalty = parsed
        given = f[i_acc].strip()
        digits = given.translate(_SPACES)
        account = (digits.lstrip("0") or "0") if digits.isdigit() and digits.isascii() else None
        rows.append(Row(
            line, op, given, account, p.day(f[i_date].strip(), line),
            p.clock(f[i_time].strip(), line) if i_time is not None else None,
            f[i_branch].strip() or None if i_branch is not None else None,
            f[i_payer].strip() or None if i_payer is not None else None,
            f[i_address].strip() or None if i_address is not None else None,
            p.month(f[i_period].strip(), line) if i_period is not None else None,
            energy, penalty))
        total += energy + penalty
    t = totals_line[len(prefix):].split(sep)
    try:
        count = int(t[layout.totals_count - 1].strip())
        said = parse_amount(t[layout.totals_sum - 1])
    except (IndexError, ValueError):
        said = None
        count = -1
    if said is None or count < 0:
        raise RegistryRefused(f"line {last}: totals line {totals_line!r} is not '{prefix}COUNT{sep}SUM'")
    if count != len(rows):
        raise RegistryRefused(f"line {last}: the totals line counts {count} payments, the file has {len(rows)}: "
                              "lines are missing or extra")
    if said != total:
        raise RegistryRefused(f"line {last}: the totals line sums to {_kopecks_text(said)}, the payments add up "
                              f"to {_kopecks_text(total)}")
    return Registry(name, checksum, used, rows, count, _money(total))


@dataclass
class ImportResult:
    """What an import did: counts, and the lines refused or left unmatched with why."""

    file_id: int
    name: str
    source: str
    rows: int
    total: Decimal
    booked: int = 0
    duplicate: int = 0
    unmatched: int = 0
    refused: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)
    unmatched_rows: list[dict[str, Any]] = field(default_factory=list)
    seen_before: list[tuple[int, datetime]] = field(default_factory=list)  # earlier imports of these bytes

    def as_dict(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "file": self.name, "source": self.source, "rows": self.rows,
                "total": str(self.total), "booked": self.booked, "duplicate": self.duplicate,
                "unmatched": self.unmatched, "refused": self.refused, "refusals": self.refusals,
                "unmatched_rows": self.unmatched_rows,
                "imported_before": [{"file_id": i, "imported_at": at.isoformat()} for i, at in self.seen_before]}


def _copy_text(v: object) -> str:
    if v is None:
        return "\\N"
    s = str(v)
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        s = s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return s


def _stage(conn: Any, rows: Iterable[Row], ours: set[str]) -> None:
    """The rows to decide on, COPYed into a temporary table that ends with the transaction.

    Each is 'booked' when its account is in `ours`, else 'unmatched', until
    compared with earlier imports.
    """
    conn.execute("DROP TABLE IF EXISTS registry_stage")
    conn.execute(
        "CREATE TEMP TABLE registry_stage (line integer, operation_id text, account_given text, account text,"
        " paid_on date, paid_time time, branch text, payer text, address text, period date,"
        " energy numeric(14,2), penalty numeric(14,2), status text, reason text) ON COMMIT DROP")
    buf: list[str] = []
    with conn.cursor().copy(
            "COPY registry_stage (line, operation_id, account_given, account, paid_on, paid_time, branch,"
            " payer, address, period, energy, penalty, status) FROM STDIN") as copy:
        for r in rows:
            buf.append("\t".join((
                str(r.line), _copy_text(r.operation_id), _copy_text(r.account_given), _copy_text(r.account),
                r.paid_on.isoformat(), _copy_text(r.paid_time), _copy_text(r.branch), _copy_text(r.payer),
                _copy_text(r.address), _copy_text(r.period), _kopecks_text(r.energy),
                _kopecks_text(r.penalty), "booked" if r.account in ours else "unmatched")))
            if len(buf) >= 20_000:
                buf.append("")
                copy.write("\n".join(buf))
                buf.clear()
        if buf:
            buf.append("")
            copy.write("\n".join(buf))
    conn.execute("ANALYZE registry_stage")


def _same(a: Row, b: Row) -> bool:
    return (a.account_given, a.paid_on, a.energy, a.penalty) == (b.account_given, b.paid_on, b.energy, b.penalty)


def _describe(r: Row) -> str:
    return f"account {r.account_given}, {r.paid_on.isoformat()}, {_kopecks_text(r.energy + r.penalty)}"


def import_registry(conn: Any, registry: Registry, *, source: str, layout: Layout, author: str,
                    report_limit: int = 100) -> ImportResult:
    """Book a parsed registry in one transaction (the caller commits); see the module's docstring.

    Per line, in this order: a zero amount is refused; an operation id seen
    earlier in the file or in an earlier import is a duplicate when it has
    the same account, date and amounts, and refused (a clash) when not; an
    account number that is no subscriber's goes to the unmatched queue; the
    rest is booked. `report_limit` caps the refused and unmatched lines
    returned (the counts are always whole; every refusal is kept on the
    file's record).
    """
    if not _SOURCE.match(source):
        raise UserError(f"source {source!r}: lower-case letters, digits, '_', '.', '-' (it names the bank "
                        "in every payment's key, like 'sber')")
    refusals: list[dict[str, Any]] = []
    duplicate = 0
    first: dict[str, Row] = {}
    fresh: list[Row] = []
    for r in registry.rows:  # the file against itself: the first line of an operation id decides
        if r.energy + r.penalty == 0:
            refusals.append({"line": r.line, "operation_id": r.operation_id,
                             "reason": "the amount is zero: nothing to book"})
            continue
        f = first.setdefault(r.operation_id, r)
        if f is r:
            fresh.append(r)
        elif _same(f, r):
            duplicate += 1
        else:
            refusals.append({"line": r.line, "operation_id": r.operation_id,
                             "reason": f"operation {r.operation_id} is on line {f.line} as {_describe(f)}, "
                                       f"here as {_describe(r)}: one operation id, two payments"})
    key = f"registry:{source}:"
    with conn.transaction():
        seen = [(int(i), at) for i, at in conn.execute(
            "SELECT id, imported_at FROM registry_file WHERE checksum = %s ORDER BY id",
            (registry.checksum,)).fetchall()]
        fid = int(conn.execute(
            "INSERT INTO registry_file (name, checksum, source, layout, encoding, rows, total, booked,"
            " duplicate, unmatched, refused, imported_by) VALUES (%s, %s, %s, %s, %s, %s, %s, 0, 0, 0, 0, %s)"
            " RETURNING id", (registry.name, registry.checksum, source, layout.name, registry.encoding,
                              len(registry.rows), registry.total, author)).fetchone()[0])
        given = list({r.account for r in fresh if r.account is not None})
        ours = {a for (a,) in conn.execute("SELECT account FROM subscriber WHERE account = ANY(%s)", (given,))}
        _stage(conn, fresh, ours)
        conn.execute("SET LOCAL work_mem = '256MB'")
        # the file against earlier imports of the same source
        conn.execute(
            """UPDATE registry_stage s SET
                  status = CASE WHEN (p.account_given, p.paid_on, p.energy, p.penalty)
                                     = (s.account_given, s.paid_on, s.energy, s.penalty)
                                THEN 'duplicate' ELSE 'refused' END,
                  reason = 'operation ' || s.operation_id || ' was imported before (file ' || p.file_id
                           || ' line ' || p.line || ', ' || p.status || ') as account ' || p.account_given
                           || ', ' || p.paid_on || ', ' || (p.energy + p.penalty) || ', here as account '
                           || s.account_given || ', ' || s.paid_on || ', ' || (s.energy + s.penalty)
                           || ': one operation id, two payments'
               FROM registry_payment p
               WHERE p.source = %s AND p.operation_id = s.operation_id""", (source,))
        # the new payments: booked to their account, or queued; one ledger entry per component paid.
        # Plain statements, not one with RETURNING CTEs: those hold a million rows in a tuplestore
        conn.execute(
            """INSERT INTO registry_payment (file_id, line, source, operation_id, account, account_given,
                   paid_on, paid_time, branch, payer, address, period, energy, penalty, status)
               SELECT %s, line, %s, operation_id, CASE WHEN status = 'booked' THEN account END, account_given,
                   paid_on, paid_time, branch, payer, address, period, energy, penalty, status
               FROM registry_stage WHERE status IN ('booked', 'unmatched')""", (fid, source))
        try:
            with conn.transaction():
                conn.execute(
                    """INSERT INTO ledger_entry (account, component, kind, amount, booked_on, period, source,
                           reason, author, idempotency_key)
                       SELECT s.account, c.component, 'payment',
                           -CASE c.component WHEN 'energy' THEN s.energy ELSE s.penalty END, s.paid_on, s.period,
                           %(lsource)s, 'payment by registry ' || %(name)s || ' line ' || s.line
                           || ', operation ' || s.operation_id, %(author)s,
                           %(key)s || s.operation_id || ':' || c.component
                       FROM registry_stage s CROSS JOIN (VALUES ('energy'), ('penalty')) c(component)
                       WHERE s.status = 'booked'
                         AND CASE c.component WHEN 'energy' THEN s.energy ELSE s.penalty END > 0""",
                    {"lsource": f"registry:{source}", "name": registry.name, "author": author, "key": key})
        except psycopg.errors.UniqueViolation as exc:  # a key of ours posted outside any registry record
            raise RegistryRefused(f"a ledger entry keyed {key}<operation id> exists already without a registry "
                                  f"record of it ({exc.diag.message_detail}): nothing was booked; look it up"
                                  ) from None
        counts = {status: int(n) for status, n in conn.execute(
            "SELECT status, count(*) FROM registry_stage GROUP BY status")}
        booked, queued = counts.get("booked", 0), counts.get("unmatched", 0)
        duplicate += counts.get("duplicate", 0)
        refusals += [{"line": line, "operation_id": op, "reason": why} for line, op, why in conn.execute(
            "SELECT line, operation_id, reason FROM registry_stage WHERE status = 'refused' ORDER BY line")]
        refusals.sort(key=lambda x: x["line"])
        unmatched_rows = [
            {"id": i, "line": line, "operation_id": op, "account": acc,
             "reason": f"no such account: {acc}" if acc.translate(_SPACES).isdigit()
             else f"not an account number: {acc!r}"}
            for i, line, op, acc in conn.execute(
                "SELECT id, line, operation_id, account_given FROM registry_payment"
                " WHERE status = 'unmatched' AND file_id = %s ORDER BY line LIMIT %s", (fid, report_limit))]
        from psycopg.types.json import Jsonb

        conn.execute("UPDATE registry_file SET booked = %s, duplicate = %s, unmatched = %s, refused = %s,"
                     " refusals = %s WHERE id = %s",
                     (booked, duplicate, queued, len(refusals), Jsonb(refusals), fid))
        conn.execute("DROP TABLE registry_stage")  # also when this is a savepoint in a longer transaction
    return ImportResult(fid, registry.name, source, len(registry.rows), registry.total, int(booked), duplicate,
                        int(queued), len(refusals), refusals[:report_limit], unmatched_rows, seen)


def import_file(conn: Any, path: Path | str, *, layout: Layout | None = None, encoding: str | None = None,
                source: str | None = None, author: str) -> ImportResult:
    """Read, check and book a registry file; `RegistryRefused` leaves the database as it was."""
    path = Path(path)
    layout = layout or load_layout()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        registry = parse(data, layout, name=path.name, encoding=encoding)
    except RegistryRefused as exc:
        raise RegistryRefused(f"{path}: refused, nothing booked: {exc}") from None
    return import_registry(conn, registry, source=source or layout.source, layout=layout, author=author)


@dataclass(frozen=True)
class Payment:
    """A registry payment as stored (the unmatched queue lists these)."""

    id: int
    source: str
    operation_id: str
    account: str | None
    account_given: str
    paid_on: date
    energy: Decimal
    penalty: Decimal
    status: str
    payer: str | None
    address: str | None
    period: date | None
    file: str
    line: int
    matched_by: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "operation_id": self.operation_id,
                "account": self.account, "account_given": self.account_given,
                "paid_on": self.paid_on.isoformat(), "energy": str(self.energy), "penalty": str(self.penalty),
                "status": self.status, "payer": self.payer, "address": self.address,
                "period": self.period.strftime("%Y-%m") if self.period else None, "file": self.file,
                "line": self.line, "matched_by": self.matched_by}


_PAYMENT = ("SELECT p.id, p.source, p.operation_id, p.account, p.account_given, p.paid_on, p.energy, p.penalty,"
            " p.status, p.payer, p.address, p.period, f.name, p.line, p.matched_by"
            " FROM registry_payment p JOIN registry_file f ON f.id = p.file_id")


def unmatched(conn: Any) -> list[Payment]:
    """The queue: payments whose account is not one of ours, oldest first."""
    return [Payment(*r) for r in conn.execute(f"{_PAYMENT} WHERE p.status = 'unmatched' ORDER BY p.id")]


def match_payment(conn: Any, payment_id: int, account: str, *, by: str) -> Payment:
    """Book an unmatched payment to `account`, recording who matched it (the caller commits)."""
    from collector.inventory import normalize_account

    try:
        account = normalize_account(account)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not by.strip():
        raise UserError("who matches the payment? --by NAME (kept with the payment)")
    with conn.transaction():
        row = conn.execute(f"{_PAYMENT} WHERE p.id = %s FOR UPDATE OF p", (payment_id,)).fetchone()
        if row is None:
            raise UserError(f"no registry payment {payment_id}: see `amr payments unmatched`")
        p = Payment(*row)
        if p.status != "unmatched":
            raise UserError(f"payment {payment_id} is booked already, to account {p.account}"
                            + (f" (matched by {p.matched_by})" if p.matched_by else ""))
        if conn.execute("SELECT 1 FROM subscriber WHERE account = %s", (account,)).fetchone() is None:
            raise UserError(f"no subscriber with account {account}")
        ledger.book_payment(conn, account, p.paid_on, energy=p.energy, penalty=p.penalty,
                            key=f"registry:{p.source}:{p.operation_id}", source=f"registry:{p.source}",
                            reason=f"payment by registry {p.file} line {p.line}, operation {p.operation_id},"
                                   f" matched by hand from account {p.account_given!r}",
                            author=by, period=p.period)
        conn.execute("UPDATE registry_payment SET status = 'booked', account = %s, matched_by = %s,"
                     " matched_at = now() WHERE id = %s", (account, by, payment_id))
        return Payment(*conn.execute(f"{_PAYMENT} WHERE p.id = %s", (payment_id,)).fetchone())
