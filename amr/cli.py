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
    "portal.commands",
]


EXIT_STATUSES = """\
exit status:
  0  done
  1  an unexpected error: a bug (its traceback is printed, secrets masked; please report it)
  2  a problem you can fix, named in one line with the next step: configuration (AMR_DATABASE_URL
     unset, unreachable or not migrated), a file refused, bad arguments
  3  amr ingest only: some lines were refused (the others were stored); amr ingest exits 1 when
     nothing at all was accepted
  130  interrupted (Ctrl-C)
`amr --debug COMMAND ...` shows the traceback of the expected errors (status 2) too.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amr",
        description=(
            "Automated electricity metering: read meters, validate and store readings, "
            "split energy into tariff zones, bill it. Configuration comes from AMR_* "
            "environment variables (AMR_DATABASE_URL, AMR_INVENTORY, ...)."
        ),
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of expected errors too (a bug always shows one)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# daemons whose SIGHUP means "reload" (their systemd units send it on `systemctl reload`)
DAEMONS = frozenset({"api", "gateway", "collect"})


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), "")  # after global options like --debug
    if command in DAEMONS and hasattr(signal, "SIGHUP"):
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
        return report_error(exc, args.command, debug=bool(getattr(args, "debug", False)))


def _file_error(exc: BaseException) -> Exception | None:
    """A file named on the command line (or by an AMR_* variable) that cannot be opened, as a message."""
    from amr.errors import UserError

    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError) \
            and exc.filename:
        what = {FileNotFoundError: "no such file", IsADirectoryError: "a directory, not a file",
                NotADirectoryError: "a path through something that is not a directory",
                PermissionError: "permission denied"}.get(type(exc), exc.strerror or type(exc).__name__)
        return UserError(f"{exc.filename}: cannot open it: {what}; check the path (and its permissions)")
    return None


def report_error(exc: BaseException, command: str, *, debug: bool = False) -> int:
    """The CLI's one error boundary: print what went wrong and return the exit status.

    A `UserError` (or a database error `storage.db.explain_error` recognises:
    a schema never migrated, a role without rights, a connection lost) is one
    message with its next step and status 2; anything else is a bug, shown
    with its traceback and status 1. Everything printed goes through
    `logs.redact`, since exception messages quote URLs and their passwords.
    """
    import os

    from amr.errors import ProblemsError, UserError
    from amr.logs import redact
    from amr.storage.db import explain_error

    known = exc if isinstance(exc, UserError) else (
        explain_error(exc, os.environ.get("AMR_DATABASE_URL", "")) or _file_error(exc))
    if known is not None:
        if debug:
            print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
        text = known.describe() if isinstance(known, ProblemsError) else str(known)
        print(f"amr {command}: {redact(text)}", file=sys.stderr)
        return 2
    # a bug or an error nobody foresaw: the traceback helps, but it goes through the
    # same scrubbing as the logs, since exception messages quote URLs and their passwords
    print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
    print(f"amr {command}: unexpected {type(exc).__name__} (traceback above)", file=sys.stderr)
    return 1

if __name__ == "__main__":
    sys.exit(main())
