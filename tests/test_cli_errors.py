"""The CLI's error boundary: every command that touches the database, against every wrong database.

Each command runs as a person runs it (a subprocess of `python -m amr.cli`)
against an unset AMR_DATABASE_URL, a closed port, a database that does not
exist, a role that does not exist, a bare name given as the URL and a
database that was never migrated. Each must end with status 2 and a message
that names the database and the next step, never a traceback and never the
password. The commands are listed from `build_parser()`, so a new command
must be put in one list or the other here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from amr.cli import build_parser, report_error
from amr.storage.db import DatabaseNotMigrated, explain_error

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Sekr3tPw9"  # in every URL that can carry one: it must never be printed

# commands that need no database (or start their own, like demo), and daemons, which wait out an
# outage by design (their start-up checks are tested with them)
NO_DATABASE = {
    "inventory check", "demo", "mqtt decode", "mqtt drain", "mqtt listen", "scan", "poll", "api", "portal",
    "collect", "gateway",
    "card reconcile",  # talks to the payment provider first; its refusal is tested in test_card_payments
}


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(prefix)
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_commands(sub, (*prefix, name))


def database_commands(tmp: Path) -> dict[str, list[str]]:
    """Each command that touches the database, with minimal valid arguments (files that parse)."""
    readings = tmp / "readings.csv"
    readings.write_text("meter_id,ts,register,value\nsdm630-0001,2026-01-01T00:00:00Z,1.8.0,10.5\n")
    registry = tmp / "registry.txt"
    registry.write_bytes(
        "01-10-2026;10:15:30;9055/0123;1;1001;ИВАНОВ ИВАН;СПб, ул. Садовая, д. 1;092026;100,00\r\n"
        "=1;100.00;\r\n".encode("cp1251"))
    inventory = str(ROOT / "deploy/examples/inventory.toml")
    tariffs = str(ROOT / "billing/catalogues/example.toml")
    norms = str(ROOT / "billing/catalogues/norms-example.toml")
    return {
        "db migrate": ["db", "migrate"],
        "db status": ["db", "status"],
        "db maintain": ["db", "maintain"],
        "inventory load": ["inventory", "load", inventory],
        "ingest": ["ingest", str(readings)],
        "status": ["status"],
        "tariffs load": ["tariffs", "load", tariffs],
        "tariffs norms": ["tariffs", "norms", norms],
        "tariffs list": ["tariffs", "list"],
        "bill": ["bill", "--period", "2026-01"],
        "suspect list": ["suspect", "list"],
        "suspect accept": ["suspect", "accept", "sdm630-0001", "2026-01-01T00:00:00Z"],
        "suspect reject": ["suspect", "reject", "sdm630-0001", "2026-01-01T00:00:00Z"],
        "payments import": ["payments", "import", str(registry)],
        "payments unmatched": ["payments", "unmatched"],
        "payments match": ["payments", "match", "1", "--account", "1001"],
        "penalties": ["penalties", "--account", "1001", "--on", "2026-01-31"],
        "card list": ["card", "list"],
    }


def test_every_command_is_classified(tmp_path: Path) -> None:
    """A new command must say whether it touches the database, so this test covers it."""
    listed = set(database_commands(tmp_path)) | NO_DATABASE
    assert set(leaf_commands(build_parser())) == listed


def _server(pg_admin_url: str) -> tuple[str, int, str]:
    info = psycopg.conninfo.conninfo_to_dict(pg_admin_url)
    return str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432), str(info.get("user") or "postgres")


@pytest.fixture
def unmigrated_url(pg_admin_url: str) -> Iterator[str]:
    """A database that exists, reachable, with no schema: `amr db migrate` was never run."""
    name = f"amr_u_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    host, port, user = _server(pg_admin_url)
    yield f"postgresql://{user}@{host}:{port}/{name}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_no_traceback_for_any_wrong_database(tmp_path: Path, pg_admin_url: str, unmigrated_url: str) -> None:
    host, port, user = _server(pg_admin_url)
    closed = _closed_port()
    missing = f"amr_missing_{uuid.uuid4().hex[:8]}"
    # case: (AMR_DATABASE_URL or None for unset, what the message must name, a next step it must give)
    cases: dict[str, tuple[str | None, str, str]] = {
        "unset": (None, "AMR_DATABASE_URL", "set AMR_DATABASE_URL"),
        "closed port": (f"postgresql://amr:{PASSWORD}@127.0.0.1:{closed}/amr", f"amr@127.0.0.1:{closed}/amr",
                        "check that PostgreSQL runs"),
        "missing database": (f"postgresql://{user}:{PASSWORD}@{host}:{port}/{missing}",
                             f"{user}@{host}:{port}/{missing}", "amr db migrate"),
        "unknown role": (f"postgresql://nobody_{PASSWORD.lower()[:3]}x:{PASSWORD}@{host}:{port}/postgres",
                         f"nobody_{PASSWORD.lower()[:3]}x@{host}:{port}/postgres", "create the role"),
        # the word itself is not repeated: it may be a password set by mistake (test_secrets_output)
        "bare name": ("nc_trial", "AMR_DATABASE_URL", "it is a bare word, not a URL; write postgresql://USER@HOST"),
        "never migrated": (unmigrated_url, unmigrated_url.split("://", 1)[1], "run `amr db migrate`"),
    }
    commands = database_commands(tmp_path)
    runs = [(case, name) for case in cases for name in commands
            if not (case == "never migrated" and name in ("db migrate", "db status"))]

    def run(job: tuple[str, str]) -> tuple[str, str, int, str]:
        case, name = job
        url = cases[case][0]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
        env.update(PGCONNECT_TIMEOUT="2", AMR_INVENTORY=str(ROOT / "deploy/examples/inventory.toml"))
        if url is not None:
            env["AMR_DATABASE_URL"] = url
        proc = subprocess.run([sys.executable, "-m", "amr.cli", *commands[name]], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        return case, name, proc.returncode, proc.stderr + proc.stdout

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(run, runs))
    failures = []
    for case, name, status, output in results:
        _, names, step = cases[case]
        problems = [what for what, bad in (
            ("a traceback", "Traceback" in output), ("the password", PASSWORD in output),
            (f"status {status}", status != 2), (f"no {names!r}", names not in output),
            (f"no next step {step!r}", step not in output)) if bad]
        if problems:
            failures.append(f"{case} / amr {name}: {', '.join(problems)}:\n{output.strip()[-600:]}")
    assert not failures, "\n\n".join(failures)


def test_db_status_of_a_database_never_migrated_says_so(unmigrated_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
    env["AMR_DATABASE_URL"] = unmigrated_url
    proc = subprocess.run([sys.executable, "-m", "amr.cli", "db", "status"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0 and "behind: run `amr db migrate`" in proc.stdout


def test_debug_shows_the_traceback_of_an_expected_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
    env["AMR_DATABASE_URL"] = "nc_trial"
    plain = subprocess.run([sys.executable, "-m", "amr.cli", "status"], env=env, capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "amr.cli", "--debug", "status"], env=env, capture_output=True,
                           text=True)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and plain.stderr.startswith("amr status: AMR_DATABASE_URL")
    assert "Traceback" in debug.stderr and "DatabaseUrlInvalid" in debug.stderr
    assert debug.stderr.rstrip().endswith(plain.stderr.rstrip())


def test_help_documents_the_exit_statuses() -> None:
    out = subprocess.run([sys.executable, "-m", "amr.cli", "--help"], capture_output=True, text=True).stdout
    for line in ("0  done", "1  an unexpected error", "2  a problem you can fix", "3  amr ingest only", "--debug"):
        assert line in out


def test_a_bug_keeps_its_traceback_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        raise ZeroDivisionError("a bug")
    except ZeroDivisionError as exc:
        assert report_error(exc, "status") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "amr status: unexpected ZeroDivisionError" in err


def test_schema_errors_become_the_migrate_hint(unmigrated_url: str) -> None:
    with psycopg.connect(unmigrated_url) as c, pytest.raises(psycopg.errors.UndefinedTable) as caught:
        c.execute("SELECT * FROM reading")
    known = explain_error(caught.value, unmigrated_url)
    assert isinstance(known, DatabaseNotMigrated) and "run `amr db migrate`" in str(known)
    assert 'relation "reading" does not exist)' in str(known) and "LINE 1" not in str(known)
    assert explain_error(ValueError("x"), unmigrated_url) is None


def test_a_file_that_cannot_be_opened_is_a_message(tmp_path: Path) -> None:
    """A directory given where a file goes is named, with status 2 and no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
    proc = subprocess.run([sys.executable, "-m", "amr.cli", "tariffs", "norms", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"amr tariffs: {tmp_path}: cannot open it: a directory, not a file; check the path " \
        "(and its permissions)\n"
