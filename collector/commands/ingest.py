"""`amr ingest FILE`: load readings from CSV or JSON lines through the ingestion path."""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db
from collector.ingest.importfile import read_file, sniff_format
from collector.ingest.ingestor import Ingestor, IngestResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="load readings from a CSV (meter_id,register,ts,value) or JSON lines file",
        description=(
            "Validate and store readings from FILE, derive interval energy and daily zone "
            "totals. Re-running the same file changes nothing. Refused lines go to "
            "rejected_reading with the reason. Prints accepted / duplicate / conflict / "
            "rejected counts."
        ),
    )
    p.add_argument("file", type=Path, help="CSV with a header, or JSON lines; '-' reads stdin")
    p.add_argument("--format", choices=["auto", "csv", "jsonl"], default="auto")
    p.add_argument("--batch", type=int, default=50000,
                   help="readings per transaction (default 50000); each transaction loads every "
                        "register's last readings once, so larger batches import faster")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    if str(args.file) == "-":
        stream, size, name = sys.stdin.buffer, None, "stdin"
        fmt = "csv" if args.format == "auto" else args.format
    else:
        if not args.file.is_file():
            raise UserError(f"{args.file}: no such file")
        stream, size, name = args.file.open("rb"), args.file.stat().st_size, args.file.name
        fmt = sniff_format(args.file) if args.format == "auto" else args.format
    total = IngestResult()
    show = sys.stderr.isatty() and not args.json
    with db.connect(get_settings().database_url) as conn:
        ingestor = Ingestor(conn)
        rows = read_file(stream, fmt, f"import:{name}")
        if show:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(
                TextColumn("[bold]ingest[/] {task.description}"), BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[counts]}"),
                TimeRemainingColumn(), transient=False,
            )
            task = progress.add_task(name, total=size, counts="")
            progress.start()
        try:
            while batch := list(islice(rows, args.batch)):
                total += ingestor.ingest(batch)
                if show:
                    progress.update(task, completed=stream.tell() if size else None,
                                    counts=f"{total.accepted} accepted, {total.rejected} rejected")
        finally:
            if show:
                progress.stop()
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
            print("  reasons: SELECT code, reason FROM rejected_reading ORDER BY id DESC")
    return 0
