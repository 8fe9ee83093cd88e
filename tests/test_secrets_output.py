"""No secret in any output: one-shot commands on malformed or wrong database URLs, and the CLI's tracebacks.

Each command runs as a real process, the way an operator runs it, with an
AMR_DATABASE_URL that carries a password and is wrong in one of many ways
(unparseable, a bad port, an unknown option, an unencoded @, a server that
refuses, a database that does not exist...). The password must appear in
neither stdout nor stderr, the exit status must be non-zero, and the reason
must be one line naming what is wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from amr.storage.db import describe_database, safe_reason, url_secrets
from tests.conftest import ROOT, free_port

PW = "Zq8-hunter2-Secret"


def _variants(real_port: int, dead_port: int) -> list[str]:
    return [
        f"postgresql://amr:{PW}@127.0.0.1:notaport/amr",  # a port that is no number
        f"postgresql://amr:{PW}@[::1/amr",  # an IPv6 bracket never closed
        f"host=127.0.0.1 password={PW} port=abc",  # key=value with a bad port
        f"host=127.0.0.1 password={PW} dbname=amr port=99999",  # a port out of range
        f"postgresql://amr:{PW}@127.0.0.1:{dead_port}/amr",  # nothing listens
        f"postgresql://amr:{PW}@host.invalid:5432/amr",  # a host that does not resolve
        f"postgresql://amr:{PW}@127.0.0.1:{real_port}/amr?sslmode=bogus",  # a bad option value
        f"postgresql://amr:{PW}@127.0.0.1:{real_port}/amr?no_such_option=1",  # an unknown option
        f"mysql://amr:{PW}@127.0.0.1/amr",  # another scheme: libpq reads it as key=value
        f"postgresql://amr:p@{PW}@127.0.0.1:{real_port}/amr",  # an unencoded @ in the password
        f"postgresql://amr:{PW}%zz@127.0.0.1:{real_port}/amr",  # bad percent-encoding
        f"postgresql://postgres:{PW}@127.0.0.1:{real_port}/amr_no_such_database",  # no such database
        f"postgresql://no_such_role:{PW}@127.0.0.1:{real_port}/postgres",  # no such role
        PW,  # the password pasted alone
        f"postgresql:///amr?host=/nonexistent-dir&password={PW}",  # a password as a query parameter
        f"host=127.0.0.1 password='{PW} x' port={dead_port}",  # a quoted password with a space
    ]


def _run(args: list[str], url: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
    env |= {"AMR_DATABASE_URL": url, "AMR_LOG_FORMAT": "text", "AMR_METRICS_PORT": "0",
            "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "amr.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    path.write_text('[[token]]\ntoken = "t-1"\naccounts = ["1"]\n')
    return path


def test_one_shot_commands_never_print_the_password(pg_admin_url: str, tokens_file: Path) -> None:
    import psycopg

    real_port = int(psycopg.conninfo.conninfo_to_dict(pg_admin_url).get("port") or 5432)
    variants = _variants(real_port, free_port())
    assert len(variants) >= 11
    commands = [["db", "status"]]
    runs = [(cmd, url) for cmd in commands for url in variants]
    # more commands on a few variants of each kind (unparseable, bad setting, refused, wrong target)
    for cmd in (["db", "migrate"], ["bill", "--period", "2026-10"], ["status"]):
        runs += [(cmd, variants[i]) for i in (1, 2, 4, 9, 11)]
    # the API waits out a database that is down, but refuses at start a URL that can never work
    runs += [(["api", "--port", "0"], variants[i]) for i in (0, 1, 2, 8, 9, 10, 13)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(
            lambda r: (r, _run(r[0], r[1], {"AMR_API_TOKENS": str(tokens_file)})), runs))
    for (cmd, url), proc in results:
        out = proc.stdout + proc.stderr
        where = f"amr {' '.join(cmd)} with {url!r}:\n{out}"
        assert PW not in out, where
        assert proc.returncode != 0, where
        assert "Traceback" not in out, where
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"amr {cmd[0]}: "), where
        reason = lines[0].lower()
        assert any(word in reason for word in (
            "does not parse", "not a port number", "cannot connect", "amr_database_url (")), where
        assert "(a malformed url" not in reason or "%40" in reason, where


def test_a_malformed_url_is_named_without_its_password(pg_admin_url: str) -> None:
    out = _run(["db", "status"], f"postgresql://amr:{PW}@127.0.0.1:notaport/amr").stderr
    assert "amr@127.0.0.1:notaport/amr" in out and "'notaport' is not a port number" in out
    out = _run(["db", "status"], f"postgresql://amr:{PW}@127.0.0.1:{free_port()}/amr_x").stderr
    assert "cannot connect to the database amr@127.0.0.1:" in out and "/amr_x" in out
    assert "Connection refused" in out
    out = _run(["db", "status"], "nc_trial").stderr
    assert 'does not parse: missing "=" after "..."' in out and "nc_trial" not in out


@pytest.mark.parametrize("url", _variants(5432, 1))
def test_describe_database_and_safe_reason_hide_the_password(url: str) -> None:
    import psycopg

    described = describe_database(url)
    assert PW not in described
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error as exc:
        assert PW not in safe_reason(exc, url)
    else:  # trust auth may let one in: nothing to say then
        pass
    if "password" in url or ":" + PW in url or "@" + PW in url:
        assert any(PW in s for s in url_secrets(url)), url


def test_describe_database_names_host_port_and_database() -> None:
    assert describe_database(f"postgresql://amr:{PW}@db.example.net:6543/metering?sslmode=require") == \
        "amr@db.example.net:6543/metering"
    assert describe_database("postgresql://db.example.net/metering") == "db.example.net:5432/metering"
    assert describe_database(f"host=10.0.0.5 port=5433 dbname=amr user=writer password={PW}") == \
        "writer@10.0.0.5:5433/amr"
    assert describe_database("postgresql://u@h1:5432,h2:5433/db") == "u@h1:5432,h2:5433/db"
    assert describe_database("postgresql://[::1]:5432/db") == "[::1]:5432/db"
    assert describe_database("") == "(AMR_DATABASE_URL not set)"


def test_an_unforeseen_traceback_is_printed_redacted(monkeypatch, capsys) -> None:
    """The CLI's error boundary: a bug's traceback still helps, without the secrets in it."""
    from amr import cli
    from amr.commands import db as db_commands

    url = f"postgresql://amr:{PW}@db.example.net/amr"
    monkeypatch.setenv("AMR_DATABASE_URL", url)

    def broken(args):
        raise RuntimeError(f"something unforeseen while talking to {url} (password={PW})")

    monkeypatch.setattr(db_commands, "cmd_status", broken)
    assert cli.main(["db", "status"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: something unforeseen" in err
    assert "postgresql://amr:***@db.example.net/amr" in err
    assert PW not in err
    assert err.strip().splitlines()[-1] == "amr db: unexpected RuntimeError (traceback above)"
