"""`amr db migrate` and `amr db status`."""

from __future__ import annotations

import argparse

from collector.errors import UserError
from collector.settings import get_settings
from collector.storage import db, migrate


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
        help="create time partitions ahead and drop those past retention (plain PostgreSQL; run daily)",
    )
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
    with db.connect(get_settings().database_url) as conn:
        dropped = migrate.maintain(conn)
    print(f"partitions ready; dropped past retention: {', '.join(dropped) or 'none'}")
    return 0
