"""`amr penalties`: the late-payment penalty of an account, and the monthly accrual run.

Two uses of one command, so `amr penalties --account N --on DATE` stays as
the issue spells it: with `--account` it shows; with `--accrue` it posts
(every account, or those named). The arithmetic is billing.penalties'.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from typing import TYPE_CHECKING

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db

if TYPE_CHECKING:
    from billing.penalties import PenaltyRules


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2026-05-31: {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "penalties", help="late-payment penalties: show an account's, or accrue everyone's (--accrue)",
        description="Housing Code art. 155 p. 14: per unpaid period, nothing for 30 days after the due "
        "date, then 1/300 of the key rate a day to day 90 and 1/130 from day 91, each day at the rate in "
        "force that day after the 2020 suspension and the 9.5 % caps (billing/catalogues/key_rates.toml, "
        "penalty_rules.toml). Energy payments pay the oldest period first. With --account: the penalty "
        "per charge with its day ranges. With --accrue: post each account's increase since the last "
        "accrual into the ledger (once per account, period and month).")
    p.add_argument("--account", action="append", metavar="N",
                   help="the account to show (with --accrue: only these; repeatable)")
    p.add_argument("--on", type=_day, required=True, metavar="DATE",
                   help="count days up to and including this date (YYYY-MM-DD) for what is still unpaid")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: each charge (period, amount, due, days, penalty, ...), "
                   "then {\"total\": ...}")
    p.add_argument("--accrue", action="store_true", help="post the accruals (the monthly run)")
    p.add_argument("--allow-unchecked-rates", action="store_true",
                   help="with --accrue: post even penalties that use key rates after the file's checked_through")
    p.add_argument("--by", default="billing", help="author of the accrual entries (default: billing)")
    p.set_defaults(func=cmd_penalties)


def cmd_penalties(args: argparse.Namespace) -> int:
    from billing.penalties import PenaltyRulesError, default_rules
    from collector.inventory import normalize_account

    try:
        accounts = [normalize_account(a) for a in args.account] if args.account else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        rules = default_rules()
    except PenaltyRulesError as exc:
        raise UserError(exc.describe()) from None
    if args.accrue:
        return _accrue(args, accounts, rules)
    if not accounts or len(accounts) != 1:
        raise UserError("name one account to show (--account N), or post everyone's with --accrue")
    return _show(args, accounts[0], rules)


def _show(args: argparse.Namespace, account: str, rules: PenaltyRules) -> int:
    from billing.penalties import penalties, total

    with db.connect(get_settings().database_url) as conn:
        known = conn.execute("SELECT 1 FROM subscriber WHERE account = %s", (account,)).fetchone()
        if known is None:
            raise UserError(f"no account {account}: check the number (leading zeros do not matter)")
        charges = penalties(conn, account, args.on, rules=rules)
    if any(c.provisional for c in charges):
        print(f"warning: key rates after {rules.checked_through} are not checked; those days use the last "
              "known rate (update billing/catalogues/key_rates.toml)", file=sys.stderr)
    if args.json:
        for c in charges:
            print(json.dumps(c.as_dict(), ensure_ascii=False))
        print(json.dumps({"total": str(total(charges))}))
        return 0
    if not charges:
        print(f"account {account}: nothing overdue or unpaid on {args.on}")
    for c in charges:
        mark = " (provisional)" if c.provisional else ""
        print(f"{c.period:%Y-%m}: charge {c.amount}, due {c.due}, {c.days} days overdue, unpaid {c.unpaid}, "
              f"penalty {c.penalty}{mark}")
        for r in c.ranges:
            rule = f"  [{r.rule}]" if r.rule else ""
            if r.provisional:
                rule += "  (key rate not checked)"
            key = "-" if r.key_rate is None else f"{r.key_rate}"
            print(f"  {r.start}..{r.end} {r.days:>4} d  on {r.unpaid}  key {key} %  applied {r.rate} %  "
                  f"x {r.fraction}  = {r.penalty}{rule}")
    print(f"total penalty {total(charges)}")
    return 0


def _accrue(args: argparse.Namespace, accounts: list[str] | None, rules: PenaltyRules) -> int:
    from billing.penalties import accrue

    with db.connect(get_settings().database_url) as conn:
        s = accrue(conn, args.on, accounts, rules=rules, author=args.by,
                   allow_provisional=args.allow_unchecked_rates)
        conn.commit()
    if args.json:
        for account, period, now, before in s.lower:
            print(json.dumps({"kind": "lower", "account": account, "period": f"{period:%Y-%m}",
                              "penalty": str(now), "accrued": str(before)}))
        print(json.dumps({"kind": "summary", "on": args.on.isoformat(), "posted": s.posted,
                          "amount": str(s.amount), "unchanged": s.unchanged,
                          "already_this_month": s.already_this_month, "lower": len(s.lower)}))
        return 0
    for account, period, now, before in s.lower:
        print(f"lower: account {account} {period:%Y-%m}: penalty now {now}, accrued {before} "
              "(not credited: post an adjustment if it should be)")
    print(f"penalties on {args.on}: posted {s.posted} accruals, {s.amount} in all; unchanged {s.unchanged}, "
          f"already accrued this month {s.already_this_month}, lower than accrued {len(s.lower)}")
    return 0
