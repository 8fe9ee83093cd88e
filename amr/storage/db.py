"""Connections to PostgreSQL through psycopg 3, and how a database is named in messages.

A database URL carries a password more often than not, and libpq's own
errors quote the text they could not parse. So nothing here ever prints a
URL or a raw libpq message: `describe_database` names the target as
`user@host:port/dbname`, `safe_reason` gives libpq's reason with every part
of the URL's secrets masked, and `connect` turns a failure to connect into an
error a person can act on (a `UserError`, printed by the CLI in one line).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import cast
from urllib.parse import unquote

import psycopg

from amr.errors import UserError

HINT_URL = "a libpq URL like postgresql://amr@db.example.net:5432/amr (the password in ~/.pgpass or PGPASSWORD)"


class DatabaseNotConfigured(UserError, RuntimeError):
    """No AMR_DATABASE_URL: what to set, not a traceback."""


class DatabaseConnectError(UserError):
    """A connection that could not be opened; the message names the target, never the password."""

    target: str = ""
    reason: str = ""  # libpq's reason alone, secrets masked (the message adds what and where)


class DatabaseUrlInvalid(DatabaseConnectError, psycopg.ProgrammingError):
    """AMR_DATABASE_URL does not parse (libpq's conninfo parser refused it).

    Also a `psycopg.ProgrammingError` (what psycopg raises for it), so code
    that tells a configuration problem from a refusal of data keeps working.
    """


class DatabaseUnreachable(DatabaseConnectError, psycopg.OperationalError):
    """The server did not let us in: down, unknown host or port, refused login, no such database.

    Also a `psycopg.OperationalError`, so retry loops that wait out an
    outage keep treating it as one.
    """


def connect(url: str, *, autocommit: bool = False, connect_timeout: int | None = None) -> psycopg.Connection:
    """Open a connection in UTC; a failure says what is wrong and where, without the password.

    `connect_timeout` (seconds, libpq's minimum is 2) bounds the wait for an
    unreachable host; without it the URL's own setting (or none) applies.
    """
    timeout = None if connect_timeout is None else max(2, int(connect_timeout))
    target = describe_database(url)
    check_url(url)
    try:
        # psycopg leaves out a parameter given as None: the URL's own timeout then applies
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=timeout)
    except psycopg.ProgrammingError as exc:  # the conninfo parser: nothing was sent anywhere
        raise _error(DatabaseUrlInvalid, f"AMR_DATABASE_URL does not parse: {safe_reason(exc, url)}; "
                     f"expected {HINT_URL}", target) from None
    except psycopg.OperationalError as exc:
        reason = safe_reason(exc, url)
        if reason.startswith("connection is bad: invalid"):  # libpq refused a value of the URL
            raise _error(DatabaseUrlInvalid, f"AMR_DATABASE_URL ({target}): {reason}", target, reason) from None
        raise _error(DatabaseUnreachable, f"cannot connect to the database {target}: {reason}; "
                     f"{_next_step(reason)}", target, reason) from None
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    if not autocommit:
        conn.commit()
    return conn


# libpq's reasons for a refused connection, and what the person at the keyboard does about each
_NEXT_STEPS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r'database "[^"]*" does not exist'),
     "create it (createdb, or CREATE DATABASE as a superuser) and run `amr db migrate`, "
     "or fix the database name in AMR_DATABASE_URL"),
    (re.compile(r'role "[^"]*" does not exist'),
     "create the role (CREATE ROLE ... LOGIN) or fix the user name in AMR_DATABASE_URL"),
    (re.compile(r"password authentication failed|no password supplied|authentication failed"),
     "check the role's password (in ~/.pgpass or PGPASSWORD) and pg_hba.conf"),
    (re.compile(r"no pg_hba\.conf entry"), "allow this host in the server's pg_hba.conf"),
    (re.compile(r"could not translate host name|Name or service not known"),
     "fix the host name in AMR_DATABASE_URL"),
)
_DEFAULT_NEXT = ("check that PostgreSQL runs there and that the host and port in AMR_DATABASE_URL "
                 "are right (or run `amr demo`, which starts its own)")


def _next_step(reason: str) -> str:
    """What to do about libpq's `reason` for refusing a connection: a message without it is a dead end."""
    for pattern, step in _NEXT_STEPS:
        if pattern.search(reason):
            return step
    return _DEFAULT_NEXT


class DatabaseNotMigrated(UserError):
    """The database answers but lacks a table, column or function this version of amr uses."""


class DatabaseRefused(UserError):
    """The database refused a statement for the role's lack of rights."""


# errors raised by a statement because the schema is older than the code (or absent)
_SCHEMA_ERRORS: tuple[type[psycopg.Error], ...] = (
    psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedFunction,
    psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedObject,
)


def explain_error(exc: BaseException, url: str) -> UserError | None:
    """A psycopg error that escaped a command after connecting, as a `UserError` naming the next step.

    `connect` already turns a refused connection into one; what reaches the
    CLI's boundary later is a database never migrated (or migrated by an
    older amr), a role without the rights, or a server that went away mid-way.
    Anything else is None: an error nobody foresaw is a bug and keeps its
    traceback.
    """
    if isinstance(exc, UserError) or not isinstance(exc, psycopg.Error):
        return None
    target = describe_database(url)
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)  # without the statement quoted
    reason = safe_reason(psycopg.Error(primary) if primary else exc, url)
    if isinstance(exc, _SCHEMA_ERRORS):
        return DatabaseNotMigrated(
            f"the database {target} lacks this version's schema ({reason}): run `amr db migrate` "
            "(as the database's owner), then retry")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return DatabaseRefused(
            f"the database {target} refused the statement ({reason}): connect as a role with the "
            "rights (the owner that ran `amr db migrate`), or grant them")
    if isinstance(exc, psycopg.OperationalError):
        return DatabaseUnreachable(
            f"lost the connection to the database {target}: {reason}; check that PostgreSQL runs "
            "there and retry")
    return None


def check_url(url: str) -> None:
    """Refuse a URL that can never work (empty, unparseable, a port that is no number), without connecting.

    For daemons at start: a database that is down is waited for, a URL
    that cannot work is a configuration error to fix now.
    """
    if not url:
        raise DatabaseNotConfigured(
            "no database configured: set AMR_DATABASE_URL to a libpq URL "
            "(for example postgresql://postgres@127.0.0.1:5432/amr), or run `amr demo`, "
            "which starts its own"
        )
    target = describe_database(url)
    if re.fullmatch(r"[^\s=:/@]+", url.strip()):
        # a bare word, like a database name typed alone: libpq would say only `missing "=" after
        # "..."`. The word is not repeated, since it may as well be a password set by mistake.
        raise _error(DatabaseUrlInvalid, 'AMR_DATABASE_URL does not parse: missing "=" after "...": it is a bare '
                     "word, not a URL; write postgresql://USER@HOST:5432/DBNAME (the password in ~/.pgpass "
                     "or PGPASSWORD)", target)
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise _error(DatabaseUrlInvalid, f"AMR_DATABASE_URL does not parse: {safe_reason(exc, url)}; "
                     f"expected {HINT_URL}", target) from None
    if problem := _setting_problem(url):
        where = target.split(" (", 1)[0]  # the problem says what is malformed
        raise _error(DatabaseUrlInvalid, f"AMR_DATABASE_URL ({where}): {problem}; expected {HINT_URL}", target)


def _error(cls: type[DatabaseConnectError], message: str, target: str, reason: str = "") -> DatabaseConnectError:
    err = cls(message)
    err.target, err.reason = target, reason or message
    return err


def _setting_problem(url: str) -> str | None:
    """What libpq would refuse only deep inside a connection attempt, named plainly (the port)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return None  # the parser's own error says more
    if "@" in str(info.get("host") or ""):  # libpq cut the URL at the password's first @
        return "the password holds an unencoded @ (write it as %40)"
    for port in str(info.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return f"port {port[:16]!r} is not a port number (1-65535)"
    return None


# --- naming a database without its secrets --------------------------------------------

def describe_database(url: str) -> str:
    """`user@host:port/dbname` of a libpq URL or key=value string, for logs and messages.

    Never the password, never the other options (they may hold an sslkey
    path or a password too). A URL that libpq cannot parse is named by what
    a URL reader sees in it, marked as malformed, or not at all: the text
    around a parse error may be the password.
    """
    if not url:
        return "(AMR_DATABASE_URL not set)"
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return _describe_unparsed(url)
    host = str(info.get("host") or info.get("hostaddr") or os.environ.get("PGHOST") or "localhost")
    malformed = ""
    if "@" in host:  # a password with an unencoded @: its tail spilled into the host
        host = host.rsplit("@", 1)[1]
        malformed = " (a malformed URL: encode @ in the password as %40)"
    port = str(info.get("port") or os.environ.get("PGPORT") or "5432")
    hosts, ports = host.split(","), port.split(",")
    ports += [ports[-1]] * (len(hosts) - len(ports))
    where = ",".join(f"{_bracket(h)}:{p}" for h, p in zip(hosts, ports, strict=False))
    user = str(info.get("user") or os.environ.get("PGUSER") or "")
    dbname = info.get("dbname") or os.environ.get("PGDATABASE") or user or "?"
    return f"{user + '@' if user else ''}{where}/{dbname}{malformed}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("/") else host


_URL = re.compile(
    r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?:(?P<user>[^:@/?#]*)(?::.*)?@)?"
    r"(?P<host>\[[0-9a-fA-F:.]*\]|[^:/?#\[\]@,]*)(?::(?P<port>[^/?#]*))?(?:/(?P<db>[^?#]*))?"
)


def _describe_unparsed(url: str) -> str:
    m = _URL.match(url.strip())
    if m and m["scheme"].lower() in ("postgres", "postgresql") and m["host"]:
        user = f"{m['user']}@" if m["user"] else ""
        port = m["port"] if m["port"] and m["port"].isdigit() else (m["port"] and "?") or "5432"
        db = m["db"] if m["db"] and re.fullmatch(r"[\w.-]+", m["db"]) else "?"
        return f"{user}{m['host']}:{port}/{db} (a malformed URL)"
    return "(an AMR_DATABASE_URL that does not parse)"


def url_secrets(url: str) -> list[str]:
    """Every text of `url` that may be a secret: its password however written, and what a bad parse leaks.

    Best effort on purpose: a URL that does not parse still has its
    password found by the shapes people write (scheme://user:pw@host,
    password=pw, ?password=pw), percent-decoded too.
    """
    found: list[str] = []
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        info = {}
    if info.get("password"):
        found.append(str(info["password"]))
    host = str(info.get("host") or "")
    if "@" in host:  # the tail of a password that held an unencoded @
        found += [host.rsplit("@", 1)[0] + "@", host.rsplit("@", 1)[0]]
    m = re.match(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*://(?P<userinfo>.*)@", url)
    if m and ":" in m["userinfo"]:
        greedy = m["userinfo"].split(":", 1)[1]  # up to the last @: a password may hold @ and /
        found.append(greedy)
        # a password holding unencoded @ / : ? # is cut up by libpq's parser, and its
        # pieces land in the host, port or database name that messages quote
        found += [piece for piece in re.split(r"[@/:?#,]", greedy) if piece]
        lazy = re.match(r"[^:]*:([^@]*)@", m["userinfo"] + "@")
        if lazy:
            found.append(lazy.group(1))
    for m2 in re.finditer(r"(?i)\bpassword\s*=\s*(?:'((?:[^'\\]|\\.)*)'|([^\s&#]+))", url):
        found.append(m2.group(1) if m2.group(1) is not None else m2.group(2))
    out: list[str] = []
    for s in found:
        for v in (s, unquote(s)):
            if v and v not in out:
                out.append(v)
    return sorted(out, key=len, reverse=True)  # the longest first: a part never unmasks the whole


def safe_reason(exc: BaseException, url: str = "") -> str:
    """libpq's reason for a failure, in one line, with nothing of the URL's secrets in it.

    Quoted text in a conninfo parse error is the text that did not parse and
    may be the password, so it goes; so does anything `logs.redact`
    recognises and every text `url_secrets` finds, wherever it appears.
    """
    from amr.logs import redact

    if isinstance(exc, DatabaseConnectError):  # already made safe, by connect
        return exc.reason or str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg.ProgrammingError) and getattr(exc, "sqlstate", None) is None:
        # (a token of the syntax, like "=" or "]", stays: it says what is missing)
        text = re.sub(r'"([^"]*)"', lambda m: m[0] if len(m[1]) <= 2 else '"..."', text)
    return redact(text, url_secrets(url) if url else ())


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
        texts = cast("list[str]", vals)  # every element is a str, as kinds says
        return "{" + ",".join(['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in texts]) + "}"
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
