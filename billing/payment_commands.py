"""`amr payments import|unmatched|match`: bank payment registries, for billing staff.

Thin over billing.registry: a command parses its options, calls the library
and prints what it did; the registry's rules live there.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import Any

from amr.settings import get_settings
from amr.storage import db

SHOWN = 20  # refused and unmatched lines printed in full; --json gives up to 100


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "payments", help="bank payment registries: import a file, list and match unmatched payments",
        description="A registry is the daily file of payments a bank accepted for us. It is read whole "
        "first: a wrong totals line, bytes not in the encoding, a file cut short, a line that does not "
        "parse refuse the whole file with the line and the reason, and nothing is booked. Then each "
        "payment is booked once per (source, operation id) on its operation date, as an energy "
        "payment; payments to accounts we do not have wait in the unmatched queue.")
    psub = p.add_subparsers(dest="payments_command", metavar="ACTION", required=True)
    im = psub.add_parser("import", help="check a registry FILE whole and book its payments",
                         description="Prints how many payments were booked, were duplicates of ones "
                         "imported before, went to the unmatched queue, and were refused (with the line "
                         "and the reason). Re-importing a file books nothing and says so.")
    im.add_argument("file", type=Path, metavar="FILE", help="the registry")
    im.add_argument("--encoding", choices=("cp1251", "utf-8", "cp866"),
                    help="the file's encoding (default: the layout's, cp1251; a UTF-8 byte-order mark "
                    "is recognised)")
    im.add_argument("--layout", type=Path, metavar="LAYOUT.toml",
                    help="the registry's layout (default: billing/catalogues/registry-layouts/default.toml)")
    im.add_argument("--source", metavar="NAME",
                    help="the bank or agent that sent it, like 'sber': operation ids are unique per source "
                    "(default: the layout's source)")
    im.add_argument("--by", default=None, help="who imports (default: the login name)")
    im.add_argument("--json", action="store_true", help="one JSON object with the counts and the lines")
    im.set_defaults(func=cmd_import)
    un = psub.add_parser("unmatched", help="payments whose account is not one of ours, waiting for a match")
    un.add_argument("--json", action="store_true", help="one JSON object per line")
    un.set_defaults(func=cmd_unmatched)
    ma = psub.add_parser("match", help="book an unmatched payment to an account",
                         description="The payment is booked on its operation date to ACCOUNT; who matched "
                         "it is kept with it.")
    ma.add_argument("id", type=int, metavar="ID", help="the payment's id (from `amr payments unmatched`)")
    ma.add_argument("--account", required=True, metavar="N", help="the account it pays")
    ma.add_argument("--by", default=None, help="who matches it (default: the login name)")
    ma.set_defaults(func=cmd_match)


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def cmd_import(args: argparse.Namespace) -> int:
    from billing.registry import import_file, load_layout

    layout = load_layout(args.layout)
    with db.connect(get_settings().database_url) as conn:
        r = import_file(conn, args.file, layout=layout, encoding=args.encoding, source=args.source,
                        author=args.by or getpass.getuser())
        conn.commit()
    if args.json:
        _print_json(r.as_dict())
        return 0
    print(f"{args.file}: {r.rows} payments, {r.total} (source {r.source}, import {r.file_id}): "
          f"booked {r.booked}, duplicate {r.duplicate}, unmatched {r.unmatched}, refused {r.refused}")
    for x in r.refusals[:SHOWN]:
        print(f"refused: line {x['line']}: {x['reason']}")
    if r.refused > SHOWN:
        print(f"... and {r.refused - SHOWN} more refused (--json lists 100; all are kept with import {r.file_id})")
    for x in r.unmatched_rows[:SHOWN]:
        print(f"unmatched: line {x['line']}: {x['reason']} (payment {x['id']})")
    if r.unmatched > SHOWN:
        print(f"... and {r.unmatched - SHOWN} more unmatched")
    if r.unmatched:
        print("match them with `amr payments match ID --account N` (list: `amr payments unmatched`)")
    if r.booked == 0 and r.unmatched == 0:
        before = (f"; the same file was imported before as import {r.seen_before[0][0]} on "
                  f"{r.seen_before[0][1]:%Y-%m-%d %H:%M} UTC" if r.seen_before else "")
        print(f"nothing new booked: every payment in it was imported before or refused{before}")
    return 0


def cmd_unmatched(args: argparse.Namespace) -> int:
    from billing.registry import unmatched

    with db.connect(get_settings().database_url) as conn:
        rows = unmatched(conn)
    for p in rows:
        if args.json:
            _print_json(p.as_dict())
        else:
            print(f"{p.id:>8}  {p.paid_on}  {p.energy + p.penalty:>10}  account {p.account_given!r:<16} "
                  f"{p.source}:{p.operation_id}  {p.payer or ''}  ({p.file} line {p.line})")
    if not rows and not args.json:
        print("no unmatched payments")
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    from billing.registry import match_payment

    with db.connect(get_settings().database_url) as conn:
        p = match_payment(conn, args.id, args.account, by=args.by or getpass.getuser())
        conn.commit()
    print(f"payment {p.id} ({p.source}:{p.operation_id}, {p.paid_on}, {p.energy + p.penalty}) booked to "
          f"account {p.account}, matched by {p.matched_by}")
    return 0
