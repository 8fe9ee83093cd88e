"""Connections to PostgreSQL through psycopg 3."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal

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


def array_literal(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of text, numbers, dates, timestamps, booleans or None.

    For parameters of thousands of elements sent once per ingested batch (the
    meters to lock, the windows to load, the daily totals to add): psycopg
    adapts a list element by element through its dumpers, several times slower
    than one join. Pass the result as text and cast it in SQL (`%s::text[]`).
    """
    vals = values if isinstance(values, list) else list(values)
    kinds = {type(v) for v in vals}
    if kinds == {str}:  # the common shapes skip the per-element dispatch
        return "{" + ",".join(['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in vals]) + "}"
    if kinds <= {Decimal, int}:
        return "{" + ",".join(map(str, vals)) + "}"
    return "{" + ",".join(map(_element, vals)) + "}"


def _element(v: object) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, Decimal | int):
        return str(v)
    raise TypeError(f"no array literal for {type(v).__name__} {v!r}")
