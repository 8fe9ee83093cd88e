"""`amr inventory check|load FILE`."""

from __future__ import annotations

import argparse
from pathlib import Path

from amr.settings import get_settings
from amr.storage import db
from collector.inventory import upsert_inventory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inventory", help="subscribers and meters: check or load the TOML inventory")
    isub = p.add_subparsers(dest="inv_command", metavar="ACTION", required=True)
    c = isub.add_parser("check", help="validate FILE and report every problem; writes nothing")
    c.add_argument("file", type=Path)
    c.set_defaults(func=cmd_check)
    ld = isub.add_parser("load", help="validate FILE and upsert its subscribers and meters")
    ld.add_argument("file", type=Path)
    ld.set_defaults(func=cmd_load)


def _load(path: Path):
    """The inventory, with every polled meter checked against its adapter and preset."""
    from collector.gateway.daemon import check_inventory

    return check_inventory(path)  # an InventoryError is printed by the CLI with its problems


def cmd_check(args: argparse.Namespace) -> int:
    inv = _load(args.file)
    print(f"{args.file}: {len(inv.subscribers)} subscribers, {len(inv.meters)} meters: OK")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    inv = _load(args.file)
    with db.connect(get_settings().database_url) as conn:
        subs, meters = upsert_inventory(conn, inv)
    print(f"loaded {subs} subscribers and {meters} meters from {args.file}")
    return 0
