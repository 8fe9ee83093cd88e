"""`amr tariffs`, `amr bill`, `amr suspect` and `amr api`: billing staff's commands."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tariffs", help="tariff catalogue: load a TOML file, list what is stored",
                       description="Tariffs are effective-dated rates (RUB/kWh with VAT) per "
                       "category, area and plan. A file is checked whole before anything is stored.")
    tsub = t.add_subparsers(dest="tariffs_command", metavar="ACTION", required=True)
    ld = tsub.add_parser("load", help="validate FILE and add its tariffs (identical entries are skipped)",
                         description="The file is checked whole: with any problem, every one is listed "
                         "and nothing is stored. Without FILE, the file AMR_TARIFFS names is loaded.")
    ld.add_argument("file", type=Path, nargs="?", metavar="FILE",
                    help="a TOML tariff catalogue (default: AMR_TARIFFS)")
    ld.add_argument("--check", action="store_true", help="only validate the file; store nothing")
    ld.set_defaults(func=cmd_tariffs_load)
    nm = tsub.add_parser("norms", help="validate FILE and add its consumption norms (identical cells are skipped)",
                         description="Consumption norms (kWh a month per category, rooms and residents) "
                         "bill a manual-metering month after the average of past months runs out "
                         "(Decree 354). The file is checked whole: with any problem nothing is stored.")
    nm.add_argument("file", type=Path, metavar="FILE",
                    help="a TOML norms file, like billing/catalogues/norms-example.toml")
    nm.add_argument("--check", action="store_true", help="only validate the file; store nothing")
    nm.set_defaults(func=cmd_tariffs_norms)
    ls = tsub.add_parser("list", help="the stored tariffs")
    ls.add_argument("--on", type=date.fromisoformat, help="only those in force on this date")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=cmd_tariffs_list)

    b = sub.add_parser(
        "bill", help="bill a calendar month (every subscriber or the accounts named), or show one bill",
        usage="%(prog)s --period YYYY-MM [--account N ...] [--reason TEXT] [--json]\n"
              "       %(prog)s show --account N --period YYYY-MM [--json]",
        description="Prices each account's stored zone energy for a month at the rates in force "
        "(a change inside the month splits it by day), one line per plan zone rounded half-up "
        "to kopecks. Re-running changes nothing unless the data changed; then a new version "
        "is written with the reason and the difference. Accounts with suspect energy are held "
        "back until `amr suspect accept|reject`. `amr bill show --account N --period YYYY-MM` "
        "prints one bill instead: its lines (zone, band, days, kWh, rate, amount), the total, and "
        "every version with its reason and the difference from the one before.")
    b.add_argument("action", nargs="?", choices=["show"], metavar="show",
                   help="print the account's stored bill for the month instead of billing "
                        "(needs exactly one --account)")
    b.add_argument("--period", required=True, help="the month, like 2026-10 (local time)")
    b.add_argument("--account", action="append", metavar="N",
                   help="bill only this account (repeatable); with show: the account to print")
    b.add_argument("--reason", help="why this run, kept on every new version (e.g. 'late data')")
    b.add_argument("--json", action="store_true",
                   help="one JSON object per line: each bill written, each held back, the summary")
    b.set_defaults(func=cmd_bill)

    s = sub.add_parser("suspect", help="energy held out of bills: list, accept or reject it",
                       description="Two things wait for a person here. Intervals implying more than "
                       "a meter's maximum power are suspect and hold the account's bill back; the "
                       "decision is applied to the daily totals and kept in an audit record. And a "
                       "billed month is closed: data arriving later that would change it is stored, "
                       "and the month's bill is held at its version until the change is accepted "
                       "(a new version, with the reason and the difference) or rejected (the bill "
                       "stays): `accept|reject --account N --period YYYY-MM`.")
    ssub = s.add_subparsers(dest="suspect_command", metavar="ACTION", required=True)
    sl = ssub.add_parser("list", help="suspect intervals and changes to billed months waiting for a decision")
    sl.add_argument("--account", help="only this account's meters")
    sl.add_argument("--meter", help="only this meter")
    sl.add_argument("--json", action="store_true", help="one JSON object per line")
    sl.set_defaults(func=cmd_suspect_list)
    for name, verb in (("accept", "count it in bills"), ("reject", "leave it out of bills")):
        a = ssub.add_parser(name, help=f"{name} a suspect interval ({verb}), or the changes to a billed month")
        a.add_argument("meter", nargs="?", help="meter id of a suspect interval")
        a.add_argument("start", nargs="?", type=_aware,
                       help="interval start, ISO 8601 with offset (from `list`)")
        a.add_argument("--account", help="with --period: the account whose billed month changed")
        a.add_argument("--period", help="with --account: the billed month, like 2026-10")
        a.add_argument("--end", type=_aware, help="interval end (default: the suspect interval at START)")
        a.add_argument("--register", default="1.8.0", help="register (default 1.8.0)")
        a.add_argument("--by", default=None, help="who decides (default: the login name)")
        a.add_argument("--note", help="why, for the audit record")
        a.set_defaults(func=cmd_suspect_decide, decision="accepted" if name == "accept" else "rejected")

    api = sub.add_parser("api", help="serve the read-only customer account API (uvicorn)",
                         description="Bearer tokens come from the TOML file AMR_API_TOKENS; the "
                         "OpenAPI spec is at /openapi.json, interactive docs at /docs.")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    api.add_argument("--hash-token", action="store_true",
                     help="read a token on stdin, print its sha256 for the tokens file, and exit")
    api.set_defaults(func=cmd_api)


def _aware(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs an offset, like 2026-10-05T14:00+03:00")
    return ts


def _jsonable(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, date | datetime):
        return v.isoformat()
    return v


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps({k: _jsonable(v) for k, v in obj.items()}, ensure_ascii=False))


def cmd_tariffs_load(args: argparse.Namespace) -> int:
    from billing.tariffs import TariffError, load_catalogue_file, store_catalogue

    path = args.file or get_settings().tariffs
    if path is None:
        raise UserError("no tariff file: name one (amr tariffs load FILE) or set AMR_TARIFFS")
    try:
        tariffs = load_catalogue_file(path)
        if args.check:
            print(f"{path}: {len(tariffs)} tariffs: OK")
            return 0
        with db.connect(get_settings().database_url) as conn:
            added, known = store_catalogue(conn, tariffs)
    except TariffError as exc:  # every problem, headed by their count, as `amr` prints any ProblemsError
        raise UserError(exc.describe()) from None
    print(f"{path}: added {added} tariffs, {known} already stored")
    return 0


def cmd_tariffs_norms(args: argparse.Namespace) -> int:
    from billing.tariffs import load_norms_file, store_norms

    norms = load_norms_file(args.file)  # a TariffError is printed by the CLI with every problem
    if args.check:
        print(f"{args.file}: {len(norms)} norm cells: OK")
        return 0
    with db.connect(get_settings().database_url) as conn:
        added, known = store_norms(conn, norms)
    print(f"{args.file}: added {added} norm cells, {known} already stored")
    return 0


def cmd_tariffs_list(args: argparse.Namespace) -> int:
    from billing.tariffs import load_db_catalogue

    with db.connect(get_settings().database_url) as conn:
        cat = load_db_catalogue(conn)
    rows = [t for t in cat.tariffs if args.on is None or t.covers(args.on)]
    for t in rows:
        if args.json:
            _print_json({"from": t.valid_from, "to": t.valid_to, "category": t.category,
                         "area": t.area, "plan": t.plan, "band": t.band,
                         "rates": {z: str(r) for z, r in t.rates}, "source": t.source})
        else:
            rates = ", ".join(f"{z} {r}" for z, r in t.rates)
            band = f" band {t.band}" if t.band != 1 else ""
            print(f"{t.valid_from}..{t.valid_to}  {t.category:<14} {t.area:<5} {t.plan:<10}{band}  {rates}")
    if not rows and not args.json:
        print("no tariffs stored: load one with `amr tariffs load FILE`", file=sys.stderr)
    return 0


def _export_run_metrics(summary: object, settings: object) -> None:
    """Held-back count and run time for Prometheus, via AMR_METRICS_TEXTFILE (this process is short-lived)."""
    import time

    from amr import metrics
    from amr.metrics_http import write_textfile

    metrics.BILLING_HELD_BACK.set(len(summary.held_back))  # type: ignore[attr-defined]
    metrics.BILLING_LAST_RUN.set(time.time())
    write_textfile(settings)  # type: ignore[arg-type]


def cmd_bill(args: argparse.Namespace) -> int:
    from billing.engine import UnknownAccounts, bill_period, parse_period
    from collector.inventory import normalize_account

    if args.action == "show":
        return cmd_bill_show(args)
    try:
        period = parse_period(args.period)
        accounts = [normalize_account(a) for a in args.account] if args.account else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    settings = get_settings()
    try:
        with db.connect(settings.database_url) as conn:
            if sys.stdout.isatty() and not args.json:
                from rich.progress import Progress

                with Progress(transient=True) as bar:
                    task = bar.add_task(f"billing {period:%Y-%m}", total=None)
                    summary = bill_period(
                        conn, period, accounts, tz=settings.timezone, reason=args.reason,
                        progress=lambda n, total: bar.update(task, completed=n, total=total))
            else:
                summary = bill_period(conn, period, accounts, tz=settings.timezone, reason=args.reason)
    except UnknownAccounts as exc:
        raise UserError(str(exc)) from None
    _export_run_metrics(summary, settings)
    if args.json:
        for account, version, why in summary.written:
            _print_json({"kind": "bill", "account": account, "period": args.period,
                         "version": version, "reason": why})
        for h in summary.held_back:
            _print_json({"kind": "held_back", "account": h.account, "reason": h.reason})
        _print_json({"kind": "summary", **summary.as_dict()})
        return 0
    for h in summary.held_back[:20]:
        print(f"held back: account {h.account}: {h.reason}")
    if len(summary.held_back) > 20:
        print(f"... and {len(summary.held_back) - 20} more held back (use --json for all)")
    for account, version, why in summary.written:
        if version > 1:
            print(f"new version {version} of account {account}: {why}")
    print(f"{period:%Y-%m}: billed {summary.billed}, unchanged {summary.unchanged}, "
          f"new versions {summary.new_versions}, held back {len(summary.held_back)} "
          f"({summary.seconds:.1f} s)")
    return 0


def cmd_bill_show(args: argparse.Namespace) -> int:
    """`amr bill show`: one stored bill, read only; the same data the customer API serves."""
    from billing.engine import parse_period
    from billing.statements import is_subscriber, statement
    from collector.inventory import normalize_account

    if not args.account or len(args.account) != 1:
        raise UserError("amr bill show needs exactly one --account N (and --period YYYY-MM)")
    if args.reason:
        raise UserError("--reason is for billing runs; amr bill show only reads a stored bill")
    try:
        period = parse_period(args.period)
        account = normalize_account(args.account[0])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with db.connect(get_settings().database_url) as conn:
        st = statement(conn, account, period)
        known = st is not None or is_subscriber(conn, account)
    if st is None:
        if not known:
            raise UserError(f"account {account}: no such subscriber (load it with `amr inventory load FILE`)")
        raise UserError(f"account {account}: no bill for {period:%Y-%m}; bill the month with "
                        f"`amr bill --period {period:%Y-%m} --account {account}`")
    if args.json:
        print(json.dumps(st.as_dict(), ensure_ascii=False))
        return 0
    _print_statement(st, get_settings().timezone)
    return 0


def _print_statement(st: Any, tz: str) -> None:
    from zoneinfo import ZoneInfo

    from billing.statements import line_days

    v = st.latest
    print(f"account {st.account}  {st.period:%Y-%m}  plan {v.plan}  version {v.version} of "
          f"{len(st.versions)}  billed by {v.method}")
    banded = any(ln.band is not None for ln in v.lines)
    head = f"  {'zone':<10} {'band':>4} {'from':<10} {'to':<10} {'days':>4} {'kWh':>12} {'rate':>8} {'amount':>12}"
    print(head if banded else head.replace(f" {'band':>4}", ""))
    for ln in v.lines:
        band = f" {ln.band if ln.band is not None else '':>4}" if banded else ""
        print(f"  {ln.zone:<10}{band} {ln.date_from.isoformat():<10} {ln.date_to.isoformat():<10} "
              f"{line_days(ln):>4} {ln.kwh:>12} {ln.rate:>8} {ln.amount:>12}")
    est = f" (estimated {v.estimated_kwh})" if v.estimated_kwh else ""
    print(f"  total {v.total} RUB for {v.kwh} kWh{est}")
    print("versions:")
    for ver in st.versions:
        made = ver.created_at.astimezone(ZoneInfo(tz))  # when it was billed, in the supplier's time
        print(f"  {ver.version}  {made:%Y-%m-%d %H:%M}  total {ver.total}  {ver.reason}")
        for d in (ver.diff or {}).get("lines", []):
            band = f" band {d['band']}" if d.get("band") else ""
            rate = (f"rate {d['rate_new']}" if d["rate_old"] == d["rate_new"]
                    else f"rate {d['rate_old']} -> {d['rate_new']}")
            print(f"       {d['zone']}{band} from {d['date_from']}: kWh {d['kwh_old']} -> {d['kwh_new']}, "
                  f"{rate}, amount {d['amount_old']} -> {d['amount_new']}")


def suspect_intervals(conn: Any, account: str | None = None, meter: str | None = None) -> list[dict]:
    """Suspect intervals waiting for a decision, with their energy."""
    rows = conn.execute(
        "SELECT m.account, i.meter_id, i.register, i.start_ts, i.end_ts, sum(i.kwh)"
        " FROM interval_usage i JOIN meter m ON m.id = i.meter_id"
        " WHERE i.status = 'suspect' AND (%(a)s::text IS NULL OR m.account = %(a)s)"
        " AND (%(m)s::text IS NULL OR i.meter_id = %(m)s)"
        " GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4",
        {"a": account, "m": meter}).fetchall()
    return [{"account": r[0], "meter_id": r[1], "register": r[2], "start": r[3], "end": r[4],
             "kwh": r[5]} for r in rows]


def cmd_suspect_list(args: argparse.Namespace) -> int:
    from billing.closure import open_changes
    from collector.inventory import normalize_account

    account = normalize_account(args.account) if args.account else None
    settings = get_settings()
    with db.connect(settings.database_url) as conn:
        rows = suspect_intervals(conn, account, args.meter)
        changes = [] if args.meter else open_changes(conn, account, settings.timezone)
    for r in rows:
        if args.json:
            _print_json({"kind": "suspect", **r})
        else:
            print(f"account {r['account']}  meter {r['meter_id']}  {r['register']}  "
                  f"{r['start'].isoformat()} .. {r['end'].isoformat()}  {r['kwh']} kWh")
    for c in changes:
        if args.json:
            print(json.dumps(c.as_dict(), ensure_ascii=False))
            continue
        now = (f"would be {c.new_total} ({'+' if c.delta >= 0 else ''}{c.delta})" if c.delta is not None
               else f"cannot be priced: {c.held}")
        print(f"account {c.account}  changes billed period {c.period:%Y-%m}: bill version {c.version} "
              f"total {c.billed_total}, {now}")
        for i in c.intervals:
            what = "taken away" if i["kwh"] is None else f"{i['kwh']} kWh"
            print(f"    meter {i['meter_id']}  {i['start'].isoformat()} .. {i['end'].isoformat()}  {what}")
        print(f"    accept: amr suspect accept --account {c.account} --period {c.period:%Y-%m}")
    if not rows and not changes and not args.json:
        print("no suspect energy and no change to a billed month waiting for a decision")
    return 0


def decide(conn: Any, meter: str, register: str, start: datetime, end: datetime | None,
           decision: str, by: str, note: str | None) -> dict[str, Any]:
    """Apply a decision on one suspect interval and write its audit record, together."""
    from collector.ingest.ingestor import decide_interval

    with conn.transaction():
        found = conn.execute(
            "SELECT end_ts, sum(kwh) FROM interval_usage WHERE meter_id = %s AND register = %s"
            " AND start_ts = %s AND (%s::timestamptz IS NULL OR end_ts = %s) AND status = 'suspect'"
            " GROUP BY end_ts", (meter, register, start, end, end)).fetchall()
        if len(found) != 1:
            raise UserError(
                f"meter {meter}: no suspect interval of register {register} starting at "
                f"{start.isoformat()}" + (f" and ending at {end.isoformat()}" if end else "")
                + "; see `amr suspect list --meter " + meter + "`")
        end_ts, kwh = found[0]
        changed = decide_interval(conn, meter, register, start, end_ts, decision, by, note)
        conn.execute(
            "INSERT INTO suspect_audit (meter_id, register, start_ts, end_ts, kwh, decision,"
            " decided_by, note) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (meter, register, start, end_ts, kwh, decision, by, note))
    return {"meter_id": meter, "register": register, "start": start, "end": end_ts, "kwh": kwh,
            "decision": decision, "by": by, "segments": changed}


def cmd_suspect_decide(args: argparse.Namespace) -> int:
    by = args.by or getpass.getuser()
    verb = "accept" if args.decision == "accepted" else "reject"
    settings = get_settings()
    if args.account or args.period:
        if not (args.account and args.period) or args.meter:
            raise UserError(f"give --account N and --period YYYY-MM together (the changes to a billed "
                            f"month), or METER START (a suspect interval): see `amr suspect {verb} --help`")
        return _decide_period(args, by, settings)
    if not (args.meter and args.start):
        raise UserError(f"name what to {verb}: METER START (a suspect interval, from `amr suspect list`) "
                        "or --account N --period YYYY-MM (the changes to a billed month)")
    with db.connect(settings.database_url) as conn:
        r = decide(conn, args.meter, args.register, args.start, args.end, args.decision, by, args.note)
    print(f"meter {r['meter_id']} {r['register']} {r['start'].isoformat()} .. {r['end'].isoformat()}: "
          f"{r['kwh']} kWh {r['decision']} by {by}; bill the period again to apply it")
    return 0


def _decide_period(args: argparse.Namespace, by: str, settings: Any) -> int:
    from billing.closure import decide_period
    from billing.engine import parse_period
    from collector.inventory import normalize_account

    try:
        period = parse_period(args.period)
        account = normalize_account(args.account)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with db.connect(settings.database_url) as conn:
        n, run = decide_period(conn, account, period, args.decision, by, args.note, tz=settings.timezone)
    if not n:
        raise UserError(f"account {account}: no change to billed period {period:%Y-%m} waits for a decision "
                        "(see `amr suspect list`)")
    if run is None:
        print(f"account {account} {period:%Y-%m}: {n} change(s) rejected by {by}; the bill stays as billed")
        return 0
    for acc, version, why in run.written:
        print(f"account {acc} {period:%Y-%m}: {n} change(s) accepted by {by}; new version {version}: {why}")
    for h in run.held_back:
        print(f"account {h.account} {period:%Y-%m}: {n} change(s) accepted by {by}; still held back: {h.reason}")
    if not run.written and not run.held_back:
        print(f"account {account} {period:%Y-%m}: {n} change(s) accepted by {by}; the bill is unchanged")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the API under uvicorn: tokens reloaded on SIGHUP, /metrics beside it.

    A malformed AMR_DATABASE_URL is refused at start (it would never work);
    a database that is down is not: the API starts, says so in one log line
    and answers 503 until the database is back.
    """
    import logging

    from billing.api import TokenFileError, TokenStore, create_app, hash_token, install_token_reload

    if args.hash_token:
        token = sys.stdin.readline().strip()
        if not token:
            raise UserError("no token on stdin")
        print(f'sha256 = "{hash_token(token)}"')
        return 0
    settings = get_settings()
    if settings.api_tokens is None or not settings.api_tokens.is_file():
        raise UserError(f"no tokens file ({settings.api_tokens or 'AMR_API_TOKENS is not set'}): set "
                        "AMR_API_TOKENS to a TOML file of [[token]] entries with sha256 (see "
                        "`amr api --hash-token`) and accounts")
    db.check_url(settings.database_url)
    try:
        tokens = TokenStore.load(settings.api_tokens)
    except (OSError, UnicodeDecodeError, TokenFileError) as exc:
        raise UserError(str(exc)) from None
    import uvicorn

    from amr import logs
    from amr.metrics_http import serve_metrics

    logs.setup("INFO", settings.log_format)
    # the pool's own warnings repeat libpq's message on every retry; DB_STATE says it once
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    app = create_app(settings, tokens)
    install_token_reload(app, settings.api_tokens)  # before serving: a SIGHUP never meets the default action
    endpoint = serve_metrics(settings, db_url=settings.database_url)  # /metrics beside the API
    logging.getLogger("amr.api").info(
        "serving the customer account API on %s:%d (%d token(s), database %s)", args.host, args.port,
        len(tokens), db.describe_database(settings.database_url))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0
