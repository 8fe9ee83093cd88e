"""The `amr` console command.

Each concern registers its own subcommands from its own module (listed in
COMMAND_MODULES), so adding a command never means editing a central switch.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from collections.abc import Sequence

from amr.runtime import tune_gc

COMMAND_MODULES = [
    "amr.commands.db",
    "collector.commands.inventory",
    "collector.commands.ingest",
    "collector.commands.status",
    "simulators.commands",
    "billing.commands",
    "billing.payment_commands",
    "billing.penalty_commands",
    "billing.card_commands",
    "collector.commands.mqtt",
    "collector.commands.poll",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amr",
        description=(
            "Automated electricity metering: read meters, validate and store readings, "
            "split energy into tariff zones, bill it. Configuration comes from AMR_* "
            "environment variables (AMR_DATABASE_URL, AMR_INVENTORY, ...)."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# daemons whose SIGHUP means "reload" (their systemd units send it on `systemctl reload`)
DAEMONS = frozenset({"api", "gateway", "collect"})


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in DAEMONS and hasattr(signal, "SIGHUP"):
        # until the daemon installs its reload handler (after its imports and checks), a
        # reload request is ignored rather than fatal: SIGHUP's default action ends the
        # process, and systemd takes that for a clean exit and does not restart it
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    tune_gc()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a clear message, not a traceback, for known errors
        from amr.errors import ProblemsError, UserError
        from amr.logs import redact

        if isinstance(exc, UserError):
            text = exc.describe() if isinstance(exc, ProblemsError) else str(exc)
            print(f"amr {args.command}: {redact(text)}", file=sys.stderr)
            return 2
        # a bug or an error nobody foresaw: the traceback helps, but it goes through the
        # same scrubbing as the logs, since exception messages quote URLs and their passwords
        print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
        print(f"amr {args.command}: unexpected {type(exc).__name__} (traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
