"""`amr status`: which meters went quiet and since when, what came in, what was refused.

The dashboard shows a count of stale meters (amr_meters_stale, one series,
not one per meter); this command is where an operator goes next to learn
which meters those are.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db
from collector.fleet import STALE_AFTER_INTERVALS, collect_status


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="meters with no reading for more than two intervals, reading counts, rejects of the last day",
        description=(
            "Operational status from the database (AMR_DATABASE_URL): which meters have sent no "
            "reading for more than two of their intervals and since when, how many readings were "
            "stored, and the inputs refused in the last day by reason. Also sets the "
            "amr_meters_stale gauge of this process."
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument(
        "--at", type=datetime.fromisoformat, default=None, metavar="TIMESTAMP",
        help="judge staleness as of this instant (ISO 8601 with offset); default: now",
    )
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    at = args.at
    if at is not None and at.tzinfo is None:
        raise UserError("--at needs an offset, like 2026-01-31T12:00:00+03:00")
    with db.connect(get_settings().database_url) as conn:
        st = collect_status(conn, at)
    print_status(st, as_json=args.json)
    return 0


def print_status(st: dict[str, Any], *, as_json: bool, out: Any = None) -> None:
    out = out or sys.stdout
    counts, stale, rejects = st["counts"], st["stale"], st["rejects"]
    if as_json:
        print(json.dumps({"type": "summary", "at": st["at"].isoformat(), "stale_meters": len(stale), **counts}), file=out)
        for m in stale:
            print(json.dumps({"type": "stale_meter", **m.as_json()}), file=out)
        for kind, code, n in rejects:
            print(json.dumps({"type": "rejects", "kind": kind, "code": code, "count": n}), file=out)
        return
    print(
        f"{counts['meters']} meters; {counts['readings_total']} readings stored, "
        f"{counts['readings_last_day']} in the last day from {counts['meters_reporting_last_day']} meters",
        file=out,
    )
    if stale:
        print(f"{len(stale)} meter(s) with no reading for more than {STALE_AFTER_INTERVALS} intervals:", file=out)
        for m in stale:
            since = m.silent_since.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
            what = "last reading" if m.last_reading else "never read; registered"
            print(f"  {m.meter_id:<16} account {m.account:<10} {m.adapter:<11} bus {m.bus:<20} {what} {since}", file=out)
    else:
        print("no stale meters", file=out)
    if rejects:
        print("refused in the last day:", file=out)
        for kind, code, n in rejects:
            print(f"  {n:>8}  {kind}/{code}", file=out)
    else:
        print("nothing refused in the last day", file=out)
