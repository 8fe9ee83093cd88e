"""`amr card`: card payments made in the customer account, for operators.

`amr card reconcile` is the janitor: it asks the payment provider about every
open card payment whose check is due, so a payment whose callback never came
is still booked (or failed) in the end; `--once` makes one pass (for a timer
unit or cron), without it the command keeps going. `amr card list` shows the
payments and their state, without the customers' e-mails and phones.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from typing import Any

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("card", help="card payments made in the customer account: reconcile, list",
                       description="Card payments go created -> pending -> succeeded | failed (unknown "
                       "while the provider does not answer). The provider's signed callback settles "
                       "them; `reconcile` asks the provider about those still open, on a back-off.")
    csub = c.add_subparsers(dest="card_command", metavar="ACTION", required=True)
    r = csub.add_parser("reconcile", help="ask the provider about open card payments whose check is due",
                        description="Uses AMR_PAYMENT_PROVIDER_URL. Each payment is asked again later "
                        "each time (from a minute, doubling, at most hourly) until it ends; a succeeded "
                        "one is booked to the ledger once, whatever callbacks do meanwhile.")
    r.add_argument("--once", action="store_true", help="one pass, then exit (default: keep going)")
    r.add_argument("--every", type=float, default=30.0, metavar="S",
                   help="seconds between passes without --once (default 30)")
    r.add_argument("--limit", type=int, default=100, metavar="N", help="payments asked about per pass")
    r.add_argument("--json", action="store_true", help="each pass's counts as one JSON object")
    r.set_defaults(func=cmd_reconcile)
    ls = csub.add_parser("list", help="card payments, newest first")
    ls.add_argument("--account", help="only this account")
    ls.add_argument("--state", choices=("created", "pending", "succeeded", "failed", "unknown"))
    ls.add_argument("--limit", type=int, default=100, metavar="N")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=cmd_list)


def cmd_reconcile(args: argparse.Namespace) -> int:
    from billing.payments import provider_from, reconcile

    settings = get_settings()
    provider = provider_from(settings)
    if provider is None:
        raise UserError("no payment provider configured: set AMR_PAYMENT_PROVIDER_URL to its API's base URL")
    if args.every <= 0 or args.limit < 1:
        raise UserError("--every must be above 0 seconds and --limit at least 1")
    stop = threading.Event()
    if not args.once:
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with db.connect(settings.database_url) as conn:
        while True:
            result = reconcile(conn, provider, settings, limit=args.limit)
            _show(result.as_dict(), args.json)
            if args.once or stop.wait(args.every):
                return 0


def _show(counts: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(counts), flush=True)
    else:
        print("reconciled: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()), flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    from billing.payments import listed
    from collector.inventory import normalize_account

    account = None
    if args.account:
        try:
            account = normalize_account(args.account)
        except ValueError as exc:
            raise UserError(f"--account {args.account!r}: {exc}") from None
    with db.connect(get_settings().database_url) as conn:
        rows = listed(conn, account=account, state=args.state, limit=args.limit)
    for p in rows:
        if args.json:
            print(json.dumps(p.as_dict()))
        else:
            print(f"{p.id:>8}  {p.account:<12} {p.state:<9} energy {p.energy:>10} penalty {p.penalty:>10}  "
                  f"{p.provider}:{p.provider_payment_id or '-'}  {p.created_at:%Y-%m-%d %H:%M}Z")
    if not rows and not args.json:
        print("no card payments")
    return 0
