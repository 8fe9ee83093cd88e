"""A PostgreSQL of one test's own, that the test may stop and start (never the shared one on 5432).

The server runs from the PostgreSQL 15 binaries in /usr/lib/postgresql/15/bin
on a free port, with its data and its unix socket in a short temporary
directory (socket paths must stay under about 100 characters). initdb refuses
to run as root, so as root the server runs as the `postgres` system user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port

BIN = Path(os.environ.get("AMR_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class OwnPostgres:
    """initdb, start, stop, restart; `url(dbname, password=...)` for clients (trust auth: any password)."""

    def __init__(self) -> None:
        if not (BIN / "pg_ctl").exists():
            pytest.skip(f"no PostgreSQL binaries in {BIN} (set AMR_TEST_PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="amr-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.running = False
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(BIN / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "start")
        self.running = True

    def stop(self) -> None:
        """A fast shutdown: every client connection is cut, as in a restart or failover."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.running = False

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        auth = f"postgres:{password}" if password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A migrated database `name`; returns its URL."""
        from amr.storage import migrate

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(self.url(name)) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            migrate.migrate(conn)
            conn.commit()
        return self.url(name)

    def close(self) -> None:
        if self.running:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres():
    pg = OwnPostgres()
    try:
        yield pg
    finally:
        pg.close()
