"""A migrated TimescaleDB database for a benchmark: the tests' PGlite server (tests/timescale_server.py).

PostgreSQL 17 + TimescaleDB compiled to WASM, in memory, one session. Its
relations have the on-disk format of a native build, so sizes compare; its
speed does not. It has no COPY FROM STDIN, so rows are moved in with INSERT.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from amr.storage import migrate
from tests.timescale_server import serve


@contextmanager
def timescale_database() -> Iterator[psycopg.Connection]:
    """Start the server, migrate its database with timescale=True, yield the one connection."""
    with tempfile.TemporaryDirectory(prefix="amr-bench-timescale-") as tmp, serve(Path(tmp)) as url, \
            psycopg.connect(url, connect_timeout=10) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.commit()
        migrate.migrate(conn, timescale=True)
        conn.commit()
        yield conn


def copy_table(src: psycopg.Connection, dst: psycopg.Connection, table: str, batch: int = 20_000) -> int:
    """Every row of src's table into dst's table of the same columns (INSERT of JSON batches); rows copied."""
    rows = [r[0] for r in src.execute(f"SELECT row_to_json(t)::text FROM {table} t")]
    for i in range(0, len(rows), batch):
        dst.execute(f"INSERT INTO {table} SELECT * FROM json_populate_recordset(NULL::{table}, %s::json)"
                    " ON CONFLICT DO NOTHING", ("[" + ",".join(rows[i:i + batch]) + "]",))
    dst.commit()
    return len(rows)
