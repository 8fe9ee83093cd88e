"""Connections to PostgreSQL through psycopg 3."""

from __future__ import annotations

import psycopg


class DatabaseNotConfigured(RuntimeError):
    pass


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection, with an error that says what to set when none is configured."""
    if not url:
        raise DatabaseNotConfigured(
            "no database configured: set AMR_DATABASE_URL to a libpq URL "
            "(for example postgresql://postgres@127.0.0.1:5432/amr), or run `amr demo`, "
            "which starts its own"
        )
    conn = psycopg.connect(url, autocommit=autocommit)
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    if not autocommit:
        conn.commit()
    return conn
