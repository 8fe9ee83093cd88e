"""The customer account API: read-only consumption and bills, readings entry for manual metering.

What a customer sees on the supplier's portal. Every endpoint needs a bearer
token; the tokens file names the accounts each token may see (one person can
hold several). Another account's data, a malformed account number and an
unknown one all answer the same 404, so a probe learns nothing. Reads go
through the portal views (migration 011), the same ones the read-only
database role sees. The writes are `POST /accounts/{n}/readings`, for
manual-metering subscribers, which goes through the one ingestion path
(`collector.ingest.ingestor.Ingestor`) with the quality flag `manual`, and
card payments (`POST /accounts/{n}/payments`, and the provider's signed
`POST /payments/callback`, the one route without a bearer token), which go
through billing/payments.py.

The edges are bounded, because the API faces the internet: a request body
is read only after its bearer token is known and only up to
AMR_API_MAX_BODY_BYTES (a larger one is refused with 413 before it is read,
by its Content-Length or by counting a chunked one), and with the database
down a request waits at most AMR_API_DB_WAIT_S for a connection and answers
503 `database_unavailable` as JSON, like every other error here. The pool
checks each connection before handing it out, so a database restart costs
no request. SIGHUP reloads the tokens file; a broken one keeps the old
tokens (`install_token_reload`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import signal
import threading
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amr.metrics_http import DB_STATE
from amr.settings import Settings, get_settings
from billing import account_data
from collector.inventory import normalize_account

log = logging.getLogger("amr.api")

MONTH = r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$"
MAX_DAYS = 366


# --- tokens -------------------------------------------------------------------------

class TokenFileError(ValueError):
    pass


def hash_token(token: str) -> str:
    """Tokens are kept at rest as SHA-256: a leaked tokens file opens no account."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenStore:
    """Which accounts each token (by its SHA-256) may see."""

    accounts_by_hash: dict[str, frozenset[str]]

    @classmethod
    def from_toml(cls, text: str, source: str = "<tokens>") -> TokenStore:
        """[[token]] tables with `sha256` (or, for development, `token`) and `accounts`."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TokenFileError(f"{source}: not valid TOML: {exc}") from None
        out: dict[str, frozenset[str]] = {}
        entries = data.get("token", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TokenFileError(f"{source}: tokens must be [[token]] tables")
        for i, entry in enumerate(entries):
            where = f"{source}: token[{i}]" + (f" ({entry['name']!r})" if "name" in entry else "")
            digest = entry.get("sha256") or (hash_token(entry["token"]) if entry.get("token") else None)
            if not digest or len(digest) != 64:
                raise TokenFileError(f"{where}: key 'sha256': missing or not 64 hex digits")
            try:
                accounts = frozenset(normalize_account(a) for a in entry.get("accounts", []))
            except ValueError as exc:
                raise TokenFileError(f"{where}: key 'accounts': {exc}") from None
            if not accounts:
                raise TokenFileError(f"{where}: key 'accounts': names no account")
            out[digest.lower()] = accounts
        return cls(out)

    @classmethod
    def load(cls, path: Path | None) -> TokenStore:
        if path is None:
            return cls({})
        return cls.from_toml(Path(path).read_text(encoding="utf-8"), str(path))

    def __len__(self) -> int:
        return len(self.accounts_by_hash)

    def accounts(self, token: str) -> frozenset[str] | None:
        digest = hash_token(token)
        for known, accounts in self.accounts_by_hash.items():
            if hmac.compare_digest(known, digest):
                return accounts
        return None


def install_token_reload(app: FastAPI, path: Path) -> Any:
    """SIGHUP reloads the tokens file into the running API, whole or not at all.

    The new file is read and checked completely in a thread of its own (not
    in the signal handler), then swapped in with one assignment that every
    request reads once; a file that does not parse, or names no token at
    all (a half-written file, most likely: it would lock every customer out),
    keeps the tokens in use and logs why (`amr_config_reloads_total`
    counts both outcomes). Returns the `amr.reload.Reloader`.
    """
    from amr.reload import Reloader

    def load() -> TokenStore:
        try:
            store = TokenStore.load(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"{path}: cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if not len(store):
            raise TokenFileError(f"{path}: names no token; refusing to lock every customer out "
                                 "(to revoke every token, stop the API)")
        return store

    def apply(old: TokenStore | None, new: TokenStore) -> None:
        app.state.tokens = new
        if old is not None:
            log.info("tokens reloaded from %s: %d token(s), %d before", path, len(new), len(old))

    reloader: Reloader[TokenStore] = Reloader(load, apply, name="API tokens", initial=app.state.tokens)
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: threading.Thread(target=reloader.reload, name="amr-reload", daemon=True).start(),
    )
    return reloader


# --- response models ----------------------------------------------------------------

class Problem(BaseModel):
    code: str
    message: str


class RegisterValue(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    obis: str = Field(alias="register", description="OBIS code, like 1.8.0")
    value: Decimal
    read_at: datetime


class MeterInfo(BaseModel):
    meter_id: str
    installed: datetime | None
    removed: datetime | None
    registers: list[RegisterValue]


class AccountSummary(BaseModel):
    account: str
    metering: str = Field(description="amr: read remotely; manual: the customer enters readings")
    plan: str
    category: str
    area: str
    meters: list[MeterInfo]


class AccountList(BaseModel):
    accounts: list[str]


class ZoneEnergy(BaseModel):
    night: Decimal = Decimal(0)
    peak: Decimal = Decimal(0)
    half_peak: Decimal = Decimal(0)
    total: Decimal = Decimal(0)
    estimated: Decimal = Field(default=Decimal(0), description="part of total whose time placement is estimated")
    suspect: Decimal = Field(default=Decimal(0), description="energy held back pending a check, not in total")


class DayUsage(ZoneEnergy):
    day: date


class MonthUsage(ZoneEnergy):
    month: str


class DailyConsumption(BaseModel):
    account: str
    days: list[DayUsage]


class MonthlyConsumption(BaseModel):
    account: str
    months: list[MonthUsage]


class BillLineOut(BaseModel):
    zone: str
    band: int | None = Field(default=None, description="the volume band of a banded tariff (1, 2, 3), else null")
    date_from: date
    date_to: date
    kwh: Decimal
    estimated_kwh: Decimal
    rate: Decimal
    amount: Decimal


class BillVersion(BaseModel):
    version: int
    total: Decimal
    kwh: Decimal
    estimated_kwh: Decimal
    plan: str
    method: str = Field(default="readings", description="how the volume was found: readings, average or norm")
    reason: str
    diff: dict[str, Any] | None
    created_at: datetime
    lines: list[BillLineOut]


class BillSummary(BaseModel):
    period: str
    version: int
    versions: int
    total: Decimal
    kwh: Decimal
    estimated_kwh: Decimal


class BillList(BaseModel):
    account: str
    bills: list[BillSummary]


class BillDetail(BaseModel):
    account: str
    period: str
    latest: BillVersion
    versions: list[BillVersion]


class ReadingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    meter_id: str | None = Field(default=None, max_length=64,
                                 description="needed only when the account has several meters")
    # any OBIS code here: whether the meter has that register is the one rule every entry point
    # applies (collector.rules.vee.register_refusal, 422 unknown_register)
    obis: str = Field(default="1.8.0", alias="register", pattern=r"^\d{1,3}\.\d{1,3}\.\d{1,3}$")
    ts: AwareDatetime = Field(description="when the value was read, with an offset")
    value: Decimal = Field(ge=0, max_digits=16, decimal_places=6, allow_inf_nan=False)


class ReadingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    readings: list[ReadingIn] = Field(min_length=1, max_length=10)


class ReadingsResult(BaseModel):
    accepted: int
    duplicate: int
    conflict: int
    rejected: int


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message


NOT_FOUND = ApiError(404, "not_found", "Лицевой счёт не найден.")
NO_TOKEN = "Нужен токен доступа (Authorization: Bearer ...)."
BAD_TOKEN = "Токен доступа не принят."
DB_UNAVAILABLE = "База данных временно недоступна, повторите запрос позже."
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": Problem, "description": "no or unknown bearer token"},
          404: {"model": Problem, "description": "no such account among the token's accounts"},
          422: {"model": Problem, "description": "invalid parameters"},
          503: {"model": Problem, "description": "database_unavailable: try again later"}}
RETRY_AFTER_S = 5


def problem(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the API's one shape, {"code", "message"}; 401 says which scheme it wants."""
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    elif status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return JSONResponse({"code": code, "message": message}, status, headers=headers)


def bearer_problem(authorization: str | None, tokens: TokenStore) -> tuple[str, frozenset[str] | None]:
    """(message, accounts): accounts of the Authorization header's token, or the reason it has none."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return NO_TOKEN, None
    accounts = tokens.accounts(credentials.strip())
    return (BAD_TOKEN, None) if accounts is None else ("", accounts)


# --- the edge: no body read without a token, none beyond the bound ------------------

class _BodyTooLarge(Exception):
    """Raised into the app by the guarded `receive` once a body passes the bound."""


# paths whose requests are authenticated by a signature over their body, not a bearer token
SIGNED_PATHS = frozenset({"/payments/callback"})


class RequestGuard:
    """Refuses a request body before reading it: without a known bearer token (401), or too large (413).

    FastAPI reads a body before it resolves dependencies, so the token
    dependency alone would let anyone make the process read (and hold) any
    amount of data; this middleware runs first. A Content-Length above the
    bound is refused at once; a body without one (chunked) is counted as it
    streams and refused the moment it passes the bound, so at most the bound
    plus one chunk is ever held. Early refusals close the connection: the
    server then does not read on to the end of a body nobody wants.
    """

    def __init__(self, app: ASGIApp, max_body: int, signed_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_body = max_body
        self.signed_paths = signed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = int(declared) if declared and declared.isdigit() else None
        # a signed path (the payment provider's callback) carries no token: its body is its credential,
        # checked by the route; it is still bounded below
        if (chunked or (length or 0) > 0) and scope["path"] not in self.signed_paths:
            why, accounts = bearer_problem(headers.get("authorization"), scope["app"].state.tokens)
            if accounts is None:
                await self._refuse(scope, receive, send, 401, "unauthorized", why)
                return
        if length is not None and length > self.max_body:
            await self._refuse(scope, receive, send, 413, "body_too_large", self._too_large())
            return
        received = 0
        cut = False
        started = False

        async def counted() -> Message:
            nonlocal received, cut
            if cut:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    cut = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut and not started:
                return  # the app's answer to a body it never got whole (a 400): ours replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except _BodyTooLarge:
            pass
        if cut and not started:
            await self._refuse(scope, receive, send, 413, "body_too_large", self._too_large())

    def _too_large(self) -> str:
        return f"Тело запроса больше {self.max_body} байт."

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str,
                      message: str) -> None:
        await problem(status, code, message, {"Connection": "close"})(scope, receive, send)


# --- the database: a short wait, a check before use, one line when it goes -----------

class DatabaseUnavailable(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "database_unavailable", DB_UNAVAILABLE)


class DatabaseGate:
    """The API's pool, with what it knows of the database's state.

    Requests wait `wait_s` for a connection (AMR_API_DB_WAIT_S); while the
    database is known to be down, a fraction of that (DOWN_WAIT_S), so an
    outage answers 503 quickly instead of stacking requests up. Connection attempts (the
    pool's, in its own threads) report to the process's amr_db_up and log
    "database unreachable" once. The pool checks every connection before
    handing it out; when one is stale, the server went away and came back
    (or not), and every idle connection is as old, so all of them are
    checked at once: without that, each request after a restart would meet
    a stale connection of its own and the pool's retry back-off would time
    it out.
    """

    DOWN_WAIT_S = 0.2
    RECONNECT_TIMEOUT_S = 5.0  # give up a retry sequence this soon: the next request starts a fresh one

    def __init__(self, url: str, wait_s: float, *, max_size: int = 8):
        self.url = url
        self.wait_s = wait_s
        self.up = True
        gate = self

        class WatchedConnection(psycopg.Connection):
            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except Exception as exc:
                    gate.up = False
                    DB_STATE.failed(url, exc)
                    raise
                gate.up = True
                DB_STATE.report(url, True)
                return conn

        self.pool: ConnectionPool = ConnectionPool(
            url, connection_class=WatchedConnection, min_size=1, max_size=max_size, open=False,
            timeout=wait_s, check=self._check, reconnect_timeout=self.RECONNECT_TIMEOUT_S,
            kwargs={"connect_timeout": 2, "options": "-c TimeZone=UTC"}, name="amr-api")

    def _check(self, conn: psycopg.Connection) -> None:
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            self.pool.check()  # the others are as old as this one: sort them out now
            raise

    def open(self) -> None:
        """Start connecting in the background: a database that is down does not stop the API starting."""
        if self.pool.closed:
            self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close(timeout=2)

    def _get(self) -> psycopg.Connection | None:
        """A connection within the wait, or None; sooner when a connection attempt has just failed.

        The first slice of the wait is short: if by then the pool's attempt
        to connect has failed (the server refused, or was down before), the
        answer is 503 at once; otherwise (a busy pool, a slow network) the
        rest of the wait is given. PoolTimeout alone is not taken for an
        outage in amr_db_up: the connection attempts say that.
        """
        first = min(self.wait_s, self.DOWN_WAIT_S)
        try:
            return self.pool.getconn(timeout=first)
        except PoolTimeout:
            if not self.up or self.wait_s <= first:
                return None
        try:
            return self.pool.getconn(timeout=self.wait_s - first)
        except PoolTimeout:
            return None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A checked connection in a transaction, or DatabaseUnavailable (503) within the wait."""
        self.open()
        conn = self._get()
        if conn is None:
            raise DatabaseUnavailable
        try:
            with conn:  # commit, or roll back on an error; the pool keeps it open
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction) as exc:
            # (a read-only standby refusing the readings entry is unavailable too, not a bug: 503)
            if conn.broken or conn.closed:  # lost on the way, not a query the server refused
                self.up = False
                DB_STATE.failed(self.url, exc)
            raise DatabaseUnavailable from None
        finally:
            self.pool.putconn(conn)


# --- the app: routes on a router, what they need given by dependencies --------------
#
# A route asks for what it uses (the token's accounts, the database gate, the
# settings); `create_app` puts those on `app.state` and assembles the rest. The
# account check (`own`) runs in the route's body, after every parameter is
# validated and before a connection is taken: a malformed request is a 422
# whoever's account it names, and a probe of an account not the token's costs
# no database connection.

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="a token from the supplier's portal")


def token_accounts(
    request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> frozenset[str]:
    """The accounts the presented token may see; 401 without a known token."""
    if cred is None or cred.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", NO_TOKEN)
    accounts: frozenset[str] | None = request.app.state.tokens.accounts(cred.credentials)
    if accounts is None:
        raise ApiError(401, "unauthorized", BAD_TOKEN)
    return accounts


def app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def database(request: Request) -> DatabaseGate:
    """The app's database gate; a route takes its connection only once it knows it needs one."""
    gate: DatabaseGate = request.app.state.database
    return gate


Tokens = Annotated[frozenset[str], Depends(token_accounts)]
AppSettings = Annotated[Settings, Depends(app_settings)]
Database = Annotated[DatabaseGate, Depends(database)]
AccountNo = Annotated[str, PathParam(description="account number; leading zeros are ignored",
                                     max_length=32)]


def own(account: str, allowed: frozenset[str]) -> str:
    """The account number normalised, if the token may see it; else the one 404 for every other case."""
    try:
        acc = normalize_account(account)
    except ValueError:
        raise NOT_FOUND from None
    if acc not in allowed:
        raise NOT_FOUND
    return acc


def subscriber(conn: psycopg.Connection, acc: str) -> tuple[Any, ...]:
    """(account, metering, plan, category, area) of a subscriber; 404 when there is none."""
    row: tuple[Any, ...] | None = conn.execute(
        "SELECT account, metering, plan, category, area FROM portal_account"
        " WHERE account = %s", (acc,)).fetchone()
    if row is None:
        raise NOT_FOUND
    return row


def _month(text: str | None, default: date) -> date:
    if text is None:
        return default
    y, m = text.split("-")
    return date(int(y), int(m), 1)


@router.get("/accounts", response_model=AccountList, responses={401: ERRORS[401]},
            summary="the accounts this token may see")
def list_accounts(allowed: Tokens) -> AccountList:
    return AccountList(accounts=sorted(allowed, key=lambda a: (len(a), a)))


@router.get("/accounts/{account}", response_model=AccountSummary, responses=ERRORS,
            summary="metering mode, plan, meters and their latest register values")
def account_summary(account: AccountNo, allowed: Tokens, db: Database) -> AccountSummary:
    acc = own(account, allowed)
    with db.connection() as conn:
        row = subscriber(conn, acc)
        meters = account_data.meters(conn, acc)
    return AccountSummary(
        account=row[0], metering=row[1], plan=row[2], category=row[3], area=row[4],
        meters=[MeterInfo(meter_id=m.meter_id, installed=m.installed, removed=m.removed, registers=[
            RegisterValue(register=v.register, value=v.value, read_at=v.ts) for v in m.registers])
            for m in meters])


@router.get("/accounts/{account}/consumption/daily", response_model=DailyConsumption,
            responses=ERRORS, summary="energy per local day, split by tariff zone")
def daily(account: AccountNo, allowed: Tokens, db: Database, settings: AppSettings,
          from_: Annotated[date | None, Query(alias="from", description="first day (default: 1st of this month)")] = None,
          to: Annotated[date | None, Query(description="last day, inclusive (default: today)")] = None,
          ) -> DailyConsumption:
    acc = own(account, allowed)
    today = datetime.now(ZoneInfo(settings.timezone)).date()
    last = to or today
    first = from_ or last.replace(day=1)
    if last < first or (last - first).days >= MAX_DAYS:
        raise ApiError(422, "invalid_range", f"Период должен быть от 1 до {MAX_DAYS} дней.")
    with db.connection() as conn:
        subscriber(conn, acc)
        per = account_data.daily_usage(conn, acc, first, last, settings.timezone)
    return DailyConsumption(account=acc, days=[DayUsage(day=d, **z) for d, z in sorted(per.items())])


@router.get("/accounts/{account}/consumption/monthly", response_model=MonthlyConsumption,
            responses=ERRORS, summary="energy per calendar month, split by tariff zone")
def monthly(account: AccountNo, allowed: Tokens, db: Database, settings: AppSettings,
            from_: Annotated[str | None, Query(alias="from", pattern=MONTH, description="first month, like 2026-01")] = None,
            to: Annotated[str | None, Query(pattern=MONTH, description="last month, like 2026-12")] = None,
            ) -> MonthlyConsumption:
    acc = own(account, allowed)
    this = datetime.now(ZoneInfo(settings.timezone)).date().replace(day=1)
    last = _month(to, this)
    first = _month(from_, date(last.year - 1, last.month, 1) if last.year > 1 else last)
    if last < first or (last.year - first.year) * 12 + last.month - first.month >= 120:
        raise ApiError(422, "invalid_range", "Период должен быть от 1 до 120 месяцев.")
    end = date(last.year + (last.month == 12), last.month % 12 + 1, 1) if last.year < 9999 else date.max
    with db.connection() as conn:
        subscriber(conn, acc)
        per = account_data.monthly_usage(conn, acc, first, end, settings.timezone)
    return MonthlyConsumption(account=acc, months=[MonthUsage(month=m, **z) for m, z in sorted(per.items())])


@router.get("/accounts/{account}/bills", response_model=BillList, responses=ERRORS,
            summary="the latest version of each month's bill")
def bills(account: AccountNo, allowed: Tokens, db: Database) -> BillList:
    acc = own(account, allowed)
    with db.connection() as conn:
        subscriber(conn, acc)
        found = account_data.bill_summaries(conn, acc)
    return BillList(account=acc, bills=[BillSummary(period=b.period, version=b.version, versions=b.versions,
                                                    total=b.total, kwh=b.kwh, estimated_kwh=b.estimated_kwh)
                                        for b in found])


@router.get("/accounts/{account}/bills/{period}", response_model=BillDetail, responses=ERRORS,
            summary="one month's bill: every version with its lines, reason and difference")
def bill(account: AccountNo, allowed: Tokens, db: Database,
         period: Annotated[str, PathParam(pattern=MONTH, description="the month, like 2026-10")],
         ) -> BillDetail:
    acc = own(account, allowed)
    p = _month(period, date.min)
    with db.connection() as conn:
        subscriber(conn, acc)
        found = account_data.bill_versions(conn, acc, p)
    if not found:
        raise ApiError(404, "not_found", "Счёт за этот месяц не выставлен.")
    versions = [BillVersion(
        version=h.version, total=h.total, kwh=h.kwh, estimated_kwh=h.estimated_kwh, plan=h.plan, reason=h.reason,
        diff=h.diff, created_at=h.created_at, method=h.method,
        lines=[BillLineOut(zone=ln.zone, date_from=ln.date_from, date_to=ln.date_to, kwh=ln.kwh,
                           estimated_kwh=ln.estimated_kwh, rate=ln.rate, amount=ln.amount, band=ln.band)
               for ln in h.lines]) for h in found]
    return BillDetail(account=acc, period=period, latest=versions[-1], versions=versions)


@router.post("/accounts/{account}/readings", response_model=ReadingsResult, status_code=201,
             responses={**ERRORS, 409: {"model": Problem, "description":
                                        "readings_entry_disabled: the account is on automated metering"}},
             summary="enter meter readings (manual-metering accounts only)")
def enter_readings(account: AccountNo, allowed: Tokens, db: Database, settings: AppSettings,
                   body: ReadingsIn) -> ReadingsResult:
    acc = own(account, allowed)
    with db.connection() as conn:
        subscriber(conn, acc)
        try:
            counts = account_data.enter_readings(conn, acc, [
                account_data.ManualReading(r.meter_id, r.obis, r.ts, r.value) for r in body.readings], settings)
        except account_data.EntryDisabled as exc:
            raise ApiError(409, exc.code, str(exc)) from None
        except account_data.ReadingRefused as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        return ReadingsResult(**counts)


# --- card payments (billing/payments.py) ----------------------------------------------
#
# The customer starts a payment with an Idempotency-Key header and gets the
# provider's confirmation URL; the provider's signed callback (no bearer
# token: the HMAC over the body is its credential) says how it ended. A
# printable receipt exists only for card payments made here.

class CardPaymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    energy: Decimal = Field(default=Decimal(0), ge=0, max_digits=11, decimal_places=2, allow_inf_nan=False,
                            description="RUB paid for energy")
    penalty: Decimal = Field(default=Decimal(0), ge=0, max_digits=11, decimal_places=2, allow_inf_nan=False,
                             description="RUB paid for penalties (пени), apart from energy")
    email: str | None = Field(default=None, max_length=254,
                              description="where the electronic receipt goes (or phone, not both)")
    phone: str | None = Field(default=None, max_length=32,
                              description="where the electronic receipt goes (or email, not both)")


class CardPaymentOut(BaseModel):
    id: str
    status: str = Field(description="created, pending, succeeded, failed or unknown")
    energy: Decimal
    penalty: Decimal
    amount: Decimal
    confirmation_url: str | None = Field(description="where the customer pays; none while unknown")
    created_at: datetime


class PaymentOut(BaseModel):
    id: str = Field(description="the payment's number within its source")
    source: str = Field(description="card: paid in the account; registry: through a bank or agent")
    status: str
    energy: Decimal
    penalty: Decimal
    amount: Decimal
    paid_on: date | None = Field(description="the Moscow date it counts from")
    receipt: str | None = Field(description="the printable receipt's path: card payments made in the "
                                "account that succeeded have one, nothing else does")


class PaymentList(BaseModel):
    account: str
    payments: list[PaymentOut]
    note: str


class CallbackOut(BaseModel):
    payment: str
    status: str


PAYMENT_REFUSALS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"model": CardPaymentOut, "description": "a repeat of the Idempotency-Key: the same payment"},
    202: {"model": CardPaymentOut, "description": "the provider did not answer: status unknown; "
          "repeat with the same Idempotency-Key"},
    409: {"model": Problem, "description": "technical_break (the bank's daily break) or card_payments_off"},
}
REGISTRY_NOTE = ("Платежи через банки и платёжных агентов появляются здесь после получения реестра "
                 "от банка, обычно через несколько дней; квитанции по ним нет.")


def card_provider(request: Request) -> Any:
    """The app's payment provider (AMR_PAYMENT_PROVIDER_URL), or None when card payments are off."""
    return request.app.state.payment_provider


def clock(request: Request) -> datetime:
    """Now, by the app's clock (a test sets another)."""
    now: datetime = request.app.state.clock()
    return now


async def raw_body(request: Request) -> bytes:
    """The body as sent: the callback's signature is over these bytes, not a re-encoding."""
    return await request.body()


def _card_out(p: Any) -> CardPaymentOut:
    return CardPaymentOut(id=str(p.id), status=p.state, energy=p.energy, penalty=p.penalty, amount=p.amount,
                          confirmation_url=p.confirmation_url if p.state == "pending" else None,
                          created_at=p.created_at)


@router.post("/accounts/{account}/payments", response_model=CardPaymentOut, status_code=201,
             responses=PAYMENT_REFUSALS, summary="start a card payment: energy and penalties apart")
def start_card_payment(
    account: AccountNo, allowed: Tokens, db: Database, settings: AppSettings, body: CardPaymentIn,
    response: Response, provider: Annotated[Any, Depends(card_provider)],
    now: Annotated[datetime, Depends(clock)],
    key: Annotated[str, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                               description="the client's key: a repeat returns the same payment")],
) -> CardPaymentOut:
    from billing import payments

    acc = own(account, allowed)
    with db.connection() as conn:
        subscriber(conn, acc)
        try:
            p, new = payments.start_payment(conn, provider, settings, account=acc, key=key,
                                            energy=body.energy, penalty=body.penalty, email=body.email,
                                            phone=body.phone, now=now)
        except payments.PaymentRefused as exc:
            status = 409 if isinstance(exc, payments.TechnicalBreak | payments.CardPaymentsOff) else 422
            raise ApiError(status, exc.code, str(exc)) from None
    response.status_code = 202 if p.state in ("created", "unknown") else 201 if new else 200
    return _card_out(p)


@router.post("/payments/callback", response_model=CallbackOut,
             responses={403: {"model": Problem, "description": "bad_signature"},
                        404: {"model": Problem, "description": "no such provider payment"},
                        422: {"model": Problem, "description": "the body describes no payment"},
                        503: ERRORS[503]},
             summary="the payment provider's callback, signed (X-Payment-Signature: HMAC-SHA256 of the body)")
def payment_callback(
    request: Request, db: Database, settings: AppSettings, body: Annotated[bytes, Depends(raw_body)],
    now: Annotated[datetime, Depends(clock)],
    signed: Annotated[str | None, Header(alias="X-Payment-Signature", max_length=200)] = None,
) -> CallbackOut:
    from billing import payments

    client = request.client.host if request.client else "?"
    with db.connection() as conn:
        try:
            p, _ = payments.handle_callback(conn, body, signed, settings, now=now, client=client)
        except payments.CallbackRefused as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
    return CallbackOut(payment=str(p.id), status=p.state)


@router.get("/accounts/{account}/payments", response_model=PaymentList, responses=ERRORS,
            summary="payments from every source, with their status")
def account_payments(account: AccountNo, allowed: Tokens, db: Database) -> PaymentList:
    from billing import payments

    acc = own(account, allowed)
    with db.connection() as conn:
        subscriber(conn, acc)
        rows = payments.account_payments(conn, acc)
    return PaymentList(account=acc, note=REGISTRY_NOTE, payments=[
        PaymentOut(**{**r, "receipt": f"/accounts/{acc}/payments/{r['id']}/receipt" if r["receipt"] else None})
        for r in rows])


@router.get("/accounts/{account}/payments/{payment}/receipt", response_class=HTMLResponse,
            responses={**ERRORS, 200: {"content": {"text/html": {}}, "description": "a printable receipt"}},
            summary="the printable receipt of a card payment made in the account")
def payment_receipt(account: AccountNo, allowed: Tokens, db: Database,
                    payment: Annotated[str, PathParam(pattern=r"^[0-9]{1,18}$",
                                                      description="the card payment's id")],
                    ) -> HTMLResponse:
    from billing import payments

    acc = own(account, allowed)
    with db.connection() as conn:
        subscriber(conn, acc)
        receipt = payments.receipt_of(conn, acc, int(payment))
    if receipt is None:
        raise ApiError(404, "not_found", "Квитанция есть только у оплаченных картой в личном кабинете "
                                         "платежей этого лицевого счёта.")
    return HTMLResponse(payments.receipt_html(receipt))


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    """Every refusal a route raises, in the API's one error shape."""
    return problem(exc.status, exc.code, exc.message)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors in the API's shape: the first five, where and why."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse({"code": "invalid_request", "message": "; ".join(parts)}, 422)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The pool lives as long as the server: opened (in the background) at start, closed at the end."""
    gate: DatabaseGate = app.state.database
    gate.open()
    try:
        yield
    finally:
        gate.close()


def create_app(settings: Settings | None = None, tokens: TokenStore | None = None) -> FastAPI:
    """The API bound to one database and one tokens file."""
    settings = settings or get_settings()
    store = tokens if tokens is not None else TokenStore.load(settings.api_tokens)
    ZoneInfo(settings.timezone)  # an unknown time zone stops the API at start, not at every request
    app = FastAPI(
        title="AMR customer account API",
        version="1",
        description="Read-only consumption by tariff zone and bills of the accounts a bearer "
        "token names; readings entry for manual-metering accounts. Amounts are RUB with VAT, "
        "energy kWh, both as decimal strings. Request bodies are limited to "
        f"{settings.api_max_body_bytes} bytes (413 body_too_large) and read only with a known "
        "token; with the database down every data endpoint answers 503 database_unavailable.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tokens = store
    app.state.database = DatabaseGate(settings.database_url, settings.api_db_wait_s)
    from billing.payments import provider_from

    app.state.payment_provider = provider_from(settings)
    app.state.clock = lambda: datetime.now(UTC)
    app.include_router(router)
    # the money routes use this module's dependencies, so they are imported here, not above
    from billing import api_money

    app.include_router(api_money.router)
    app.exception_handler(ApiError)(api_error)
    app.exception_handler(RequestValidationError)(invalid_request)
    app.add_middleware(RequestGuard, max_body=settings.api_max_body_bytes, signed_paths=SIGNED_PATHS)
    return app

