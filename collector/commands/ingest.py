"""`amr ingest FILE`: load readings from CSV or JSON lines through the ingestion path."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import IO, BinaryIO

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db
from collector.ingest.importfile import (
    CsvDialect,
    file_lines,
    parse_columns,
    sniff_csv,
    sniff_format,
)
from collector.ingest.ingestor import Ingestor, IngestResult, RefusedInput
from collector.ingest.parallel import default_workers, ingest_here, ingest_lines

# exit statuses beyond amr's own (0 done, 2 a user error): a cron job tells them apart
EXIT_NONE_ACCEPTED = 1
EXIT_SOME_REFUSED = 3
EPILOG = """\
exit status:
  0  every line was stored, or was stored already (duplicates)
  1  every line was refused: nothing was stored
  3  some lines were refused (the others were stored or were duplicates)
  2  a problem to fix first (the file, its header, an option, the database), named
     in the message; a file refused for its header or dialect stores nothing

CSV as spreadsheets in Russia export it (Excel, 1C) is read too: the separator
(',' ';' tab '|'), the decimal comma (when the separator is not a comma), the
encoding (UTF-8, UTF-8 with a BOM, cp1251) and Russian column names (Счетчик,
Регистр, Дата, Показание, ...) are detected where the file leaves no doubt and
printed on stderr; set them with --delimiter, --decimal, --encoding, --columns.
Columns that are no reading field are ignored.
"""
_LINE = re.compile(r"#L(\d+)$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="load readings from a CSV (meter_id,register,ts,value) or JSON lines file",
        description=(
            "Validate and store readings from FILE, derive interval energy and daily zone "
            "totals. Re-running the same file changes nothing. Refused lines go to "
            "rejected_reading with the reason (and to --rejects FILE). Prints accepted / "
            "duplicate / conflict / rejected counts."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", type=Path, help="CSV with a header, or JSON lines; '-' reads stdin")
    p.add_argument("--format", choices=["auto", "csv", "jsonl"], default="auto")
    p.add_argument("--batch", type=int, default=50000,
                   help="readings per transaction (default 50000); each transaction loads every "
                        "register's last readings once, so larger batches import faster; the lines of "
                        "4 batches at a time are grouped by meter first, so that a file sorted by time "
                        "stores many readings of each meter a transaction")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes that parse and store, each its own meters (default: one per core, "
                        "up to 4, for a file over 8 MB; else 1)")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.add_argument("--rejects", type=Path, metavar="FILE",
                   help="write every refused line to FILE as CSV (UTF-8): line, code, reason, raw")
    p.add_argument("--delimiter", help="CSV field separator (';', ',', 'tab', '|'); default: detected")
    p.add_argument("--decimal", choices=[".", ","], metavar="'.'|','",
                   help="decimal mark of the values; default: ',' when the separator is not a comma")
    p.add_argument("--encoding", help="text encoding (utf-8, utf-8-sig, cp1251); default: detected")
    p.add_argument("--columns", metavar="FIELD=NAME,...",
                   help="the file's column names, like meter_id=Счетчик,register=Регистр,ts=Дата,value=Показание")
    p.set_defaults(func=cmd_ingest)


def exit_status(total: IngestResult) -> int:
    """0 none refused; 1 every line refused; 3 some refused (see EPILOG)."""
    refused = total.rejected + total.conflict
    if not refused:
        return 0
    if not total.accepted and not total.duplicate:
        return EXIT_NONE_ACCEPTED
    return EXIT_SOME_REFUSED


def _line_of(source: str | None) -> int | None:
    m = _LINE.search(source or "")
    return int(m.group(1)) if m else None


def _write_rejects(out: csv.DictWriter, refused: list[RefusedInput], encoding: str) -> None:
    rows = sorted(refused, key=lambda r: _line_of(r.source) or 0)
    for r in rows:
        out.writerow({
            "line": _line_of(r.source), "code": r.code, "reason": r.reason or "",
            "raw": (r.raw or b"").decode(encoding, errors="backslashreplace"),
        })


def cmd_ingest(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    if args.workers < 0:
        raise UserError("--workers must be 0 (one per core for a large file) or more")
    columns = parse_columns(args.columns) if args.columns else None
    stream: BinaryIO
    if str(args.file) == "-":
        stream, size, name = sys.stdin.buffer, None, "stdin"
        fmt = "csv" if args.format == "auto" else args.format
    else:
        if not args.file.is_file():
            raise UserError(f"{args.file}: no such file")
        size, name = args.file.stat().st_size, args.file.name
        fmt = sniff_format(args.file) if args.format == "auto" else args.format
        stream = args.file.open("rb")
    source = f"import:{name}"
    options = [o for o in ("delimiter", "decimal", "encoding", "columns") if getattr(args, o)]
    if fmt != "csv" and options:
        raise UserError(f"--{options[0]} applies to CSV files; {args.file} is read as JSON lines")
    dialect: CsvDialect | None = None
    reader: BinaryIO = stream
    try:
        if fmt == "csv":
            dialect, reader = sniff_csv(stream, source, args.delimiter, args.decimal, args.encoding, columns)
            print(f"{name}: {dialect.describe()}", file=sys.stderr)
        rejects_file: IO[str] | None = None
        if args.rejects is not None:
            try:
                rejects_file = args.rejects.open("w", encoding="utf-8", newline="")
            except OSError as exc:
                raise UserError(f"--rejects {args.rejects}: cannot write it ({exc.strerror})") from None
        total = _ingest(args, reader, stream, size, name, fmt, source, dialect, rejects_file)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if args.json:
        print(json.dumps({"file": str(args.file), **total.as_dict()}))
    else:
        print(
            f"{args.file}: {total.accepted} accepted, {total.duplicate} duplicate, "
            f"{total.conflict} conflict, {total.rejected} rejected"
        )
        for code, n in sorted(total.rejects_by_code.items()):
            print(f"  rejected {n} x {code}")
        if total.rejected or total.conflict:
            where = f"in {args.rejects}" if args.rejects else "with --rejects FILE, or in rejected_reading"
            print(f"  each refused line with its number and reason: {where}")
    return exit_status(total)


def _ingest(args: argparse.Namespace, reader: BinaryIO, stream: BinaryIO, size: int | None, name: str,
            fmt: str, source: str, dialect: CsvDialect | None, rejects_file: IO[str] | None) -> IngestResult:
    total = IngestResult()
    show = sys.stderr.isatty() and not args.json
    out = None
    if rejects_file is not None:
        out = csv.DictWriter(rejects_file, fieldnames=["line", "code", "reason", "raw"])
        out.writeheader()
    raw_encoding = dialect.encoding if dialect is not None else "utf-8"
    workers = args.workers or default_workers(size)
    try:
        with db.connect(get_settings().database_url) as conn:
            ingestor = Ingestor(conn)
            if show:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

                progress = Progress(
                    TextColumn("[bold]ingest[/] {task.description}"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[counts]}"),
                    TimeRemainingColumn(), transient=False,
                )
                task = progress.add_task(name, total=size, counts="")
                progress.start()
            def stored(result: IngestResult) -> None:
                nonlocal total
                if out is not None:
                    _write_rejects(out, result.refused, raw_encoding)
                total += result
                if show:
                    progress.update(task, completed=stream.tell() if size else None,
                                    counts=f"{total.accepted} accepted, {total.rejected} rejected")

            try:
                if workers > 1:
                    conn.close()  # the workers store; this process only reads and routes the lines
                    ingest_lines(file_lines(reader, fmt, raw_encoding), database_url=get_settings().database_url,
                                 workers=workers, fmt=fmt, source=source, dialect=dialect, batch=args.batch,
                                 on_result=stored)
                else:
                    ingest_here(file_lines(reader, fmt, raw_encoding), ingestor, fmt=fmt, source=source,
                                dialect=dialect, batch=args.batch, on_result=stored)
            finally:
                if show:
                    progress.stop()
    finally:
        if rejects_file is not None:
            rejects_file.close()
    return total
