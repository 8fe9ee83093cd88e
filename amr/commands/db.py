"""`amr db migrate` and `amr db status`."""

from __future__ import annotations

import argparse
import logging

from amr.errors import UserError
from amr.settings import get_settings
from amr.storage import db, migrate

log = logging.getLogger("amr.db")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: migrate, status")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    m = dbsub.add_parser("migrate", help="apply the schema migrations this code ships (safe to rerun)")
    m.add_argument("--timescale", choices=["auto", "on", "off"], default="auto",
                   help="use TimescaleDB hypertables (auto: when the extension is available)")
    m.set_defaults(func=cmd_migrate)
    s = dbsub.add_parser("status", help="schema version of the database and of this code")
    s.set_defaults(func=cmd_status)
    mt = dbsub.add_parser(
        "maintain",
        help="create time partitions ahead; apply the retention policy if AMR_RETENTION is set (run daily)",
        description="Creates the monthly partitions around now (plain PostgreSQL). Deletes nothing "
        "unless AMR_RETENTION (months) is set: then whole partitions (or TimescaleDB chunks) older "
        "than that are dropped, each is listed and logged, and the retention watermark is raised, "
        "below which readings are refused (beyond_retention) so a pruned period is never counted "
        "twice. Daily zone totals and bills are kept. `amr db migrate` never deletes anything.",
    )
    mt.add_argument("--dry-run", action="store_true",
                    help="show what the retention policy would drop; change nothing")
    mt.set_defaults(func=cmd_maintain)


def cmd_migrate(args: argparse.Namespace) -> int:
    ts = {"auto": None, "on": True, "off": False}[args.timescale]
    with db.connect(get_settings().database_url) as conn:
        try:
            applied = migrate.migrate(conn, timescale=ts)
        except migrate.SchemaTooNew as exc:
            raise UserError(str(exc)) from None
        version = migrate.current_version(conn)
    if applied:
        for mig in applied:
            print(f"applied {mig.version:03d}_{mig.name}")
    else:
        print("nothing to do")
    print(f"schema version {version}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with db.connect(get_settings().database_url) as conn:
        have = migrate.current_version(conn)
    latest = migrate.available()[-1].version
    state = "up to date" if have == latest else ("behind: run `amr db migrate`" if have < latest else "NEWER than this code")
    print(f"database schema {have}, code {latest}: {state}")
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    settings = get_settings()
    with db.connect(settings.database_url) as conn:
        report = migrate.maintain(conn, retention_months=settings.retention, dry_run=args.dry_run)
    if not args.dry_run:
        print("partitions ready")
    if report.policy_months is None:
        print("retention: not configured (AMR_RETENTION unset): nothing is deleted")
        return 0
    verb = "would drop" if args.dry_run else "dropped"
    cutoff = report.cutoff.date().isoformat() if report.cutoff else "?"
    for d in report.dropped:
        line = (f"{verb} {d.part} ({d.table}, {d.range_from.date() if d.range_from else '...'} .. "
                f"{d.range_to.date()}, {d.rows} rows)")
        print(line)
    mark = report.watermark.isoformat() if report.watermark else "none"
    if report.dropped and not args.dry_run:  # one line for the journal, beside the printed list
        log.warning("retention %d months: dropped %s (%d rows); watermark %s", report.policy_months,
                    ", ".join(d.part for d in report.dropped), report.rows, mark)
    print(f"retention {report.policy_months} months (before {cutoff}): {verb} {len(report.dropped)} "
          f"partitions, {report.rows} rows; watermark {mark}"
          + ("; readings before it are refused (beyond_retention)" if report.watermark else ""))
    return 0
