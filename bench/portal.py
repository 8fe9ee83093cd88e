"""Benchmark: the customer account's pages under 50 concurrent sessions, beside the bare query behind each.

What is measured: the account page (/accounts/{account}) and the daily
consumption page (/accounts/{account}/daily) of `portal.account_routes`, served
by a real uvicorn in a process of its own, fetched by 50 concurrent httpx async
clients, each request carrying the session cookie of a logged-in user linked to
the account it asks for. Beside each page, in the same run and on the same
database: the bare SQL query behind it (`billing.account_data.monthly_usage`,
a year of months by zone, for the account page; `daily_usage`, a month of days by
zone, for the daily page), run from 50 concurrent threads through a pool of the
size the portal's own pool has (8 connections, `billing.api.DatabaseGate`), so
both wait for a connection the same way. A third line, for information, runs
every query the route runs (session lookup, link check, meters and their latest
readings, balance, usage, bills, this month's readings) the same way: what the
page costs the database, without HTTP and templates.

p50 and p99 latency of each, and the ratio of the page's to the bare query's.
Target: page p99 under 100 ms and at most 3 x the bare query's p99.

The data. 100,000 accounts with a year of 30-minute data would be
100,000 x 365 x 48 = 1,752,000,000 readings (about 80 GB as reading_data with
its key): more than this machine holds in the time a benchmark may take. The
pages do not read the 30-minute data of other accounts than the one shown: they
read daily totals (daily_zone_usage, what the derivation leaves of the
half-hours, per meter, day and zone), bills and their lines, and the ledger; the
30-minute readings are read only through portal_latest_reading (the latest value
of each register of the account's own meters). So:

- daily totals for all accounts for a year: 100,000 x 365 days x 3 zones =
  109,500,000 rows of daily_zone_usage;
- bills for all accounts, 12 months (1 in 20 accounts with a second version of
  one month): 1,205,000 bills with 3 lines each; the ledger: a charge and a
  payment a month, 2,400,000 entries;
- the 30-minute readings in full only for the accounts the sessions use (1,000
  accounts, one register each): 1,000 x 365 x 48 = 17,520,000 readings.

Everything is made by the server (INSERT ... SELECT over generate_series, two
connections in parallel for the daily totals), not through the ingestion path,
which is not what is measured here. Users, links and sessions are written
straight into their tables (one user per session account, linked to it, a
confirmed e-mail, a live session whose cookie its requests carry), not made by
1,000 argon2 logins, which would measure the login.

    .venv/bin/python bench/portal.py            # 100,000 accounts, 1,000 of them with 30-minute data
    .venv/bin/python bench/portal.py --quick    # 10,000 accounts, 200 with 30-minute data, fewer requests
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
from psycopg_pool import ConnectionPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amr.storage import migrate, timeseries  # noqa: E402
from billing import account_data  # noqa: E402
from portal import linking  # noqa: E402

MSK = ZoneInfo("Europe/Moscow")
TODAY = date(2026, 11, 20)  # the portal's clock: 12:00 Moscow time that day
CLOCK = datetime(2026, 11, 20, 12, 0, tzinfo=MSK)
FIRST_DAY = TODAY - timedelta(days=364)  # a year of days up to today
PERIODS = [date(2025 + (10 + i) // 12, (10 + i) % 12 + 1, 1) for i in range(12)]  # 2025-11 .. 2026-10
SESSIONS = 50
POOL = 8  # billing.api.DatabaseGate's max_size, the portal's pool
TZ = "Europe/Moscow"


def _with_db(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo("", **info)


# --- the data ------------------------------------------------------------------------------

def session_accounts(n: int, s: int) -> list[str]:
    """The accounts the sessions use: spread over the whole range, s of n."""
    step = n // s
    return [str(step * (i + 1)) for i in range(s)]


def _daily(url: str, lo: int, hi: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        # per day of a household: night 16 half-hours, peak 14, half-peak 18, kWh to 0.001
        conn.execute(
            "INSERT INTO daily_zone_usage (meter_id, day, zone, kwh, estimated_kwh)"
            " SELECT 'm-' || g, d::date, z.zone, round((z.slots * (0.10 + random() * 0.25))::numeric, 3),"
            " CASE WHEN random() < 0.01 THEN round((random() * 0.5)::numeric, 3) ELSE 0 END"
            " FROM generate_series(%s::int, %s::int) g"
            " CROSS JOIN generate_series(%s::date, %s::date, interval '1 day') d"
            " CROSS JOIN (VALUES ('night', 16), ('peak', 14), ('half_peak', 18)) z(zone, slots)",
            (lo, hi, FIRST_DAY, TODAY))


def populate(url: str, n: int, s: int) -> dict[str, int]:
    """Accounts, meters, a year of daily totals, bills, ledger; 30-minute readings of the session accounts."""
    counts: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(
            "INSERT INTO subscriber (account, metering, plan, category, area)"
            " SELECT g::text, CASE WHEN g %% 10 = 0 THEN 'manual' ELSE 'amr' END,"
            " (ARRAY['single','two_zone','three_zone'])[1 + g %% 3],"
            " (ARRAY['gas_stove','electric_stove'])[1 + (g / 3) %% 2],"
            " (ARRAY['urban','urban','rural'])[1 + (g / 7) %% 3]"
            " FROM generate_series(1, %s) g", (n,))
        conn.execute("INSERT INTO meter (id, account, adapter, installed, config)"
                     " SELECT 'm-' || g, g::text, 'modbus_tcp', '2025-01-01T00:00+03:00',"
                     " '{\"registers\": [\"1.8.0\"]}' FROM generate_series(1, %s) g", (n,))
        conn.commit()
    # the daily totals, the bulk of it: the key is built once after the load, not row by row
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE daily_zone_usage DROP CONSTRAINT daily_zone_usage_pkey")
        conn.execute("DROP INDEX daily_zone_usage_day_idx")
    half = n // 2
    with ThreadPoolExecutor(2) as ex:
        for f in [ex.submit(_daily, url, lo, hi) for lo, hi in ((1, half), (half + 1, n))]:
            f.result()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("ALTER TABLE daily_zone_usage ADD PRIMARY KEY (meter_id, day, zone)")
        conn.execute("CREATE INDEX daily_zone_usage_day_idx ON daily_zone_usage (day)")
    counts["daily_zone_usage"] = n * ((TODAY - FIRST_DAY).days + 1) * 3
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        # a bill a month, each month's volume from the daily totals would cost a second pass over
        # 110 million rows: a plausible volume is enough for the pages, which show what is stored
        conn.execute(
            "INSERT INTO bill (account, period, version, total, kwh, estimated_kwh, plan, category, area,"
            " reason, fingerprint, created_at)"
            " SELECT s.account, p::date, v, round((200 + random() * 900)::numeric, 2),"
            " round((150 + random() * 250)::numeric, 3), 0, s.plan, s.category, s.area,"
            " CASE v WHEN 1 THEN 'first' ELSE 'readings changed' END, md5(s.account || p::text || v),"
            " p + interval '1 month 2 days' + (v - 1) * interval '5 days'"
            " FROM subscriber s CROSS JOIN unnest(%s::date[]) p"
            " CROSS JOIN LATERAL generate_series(1, CASE WHEN s.account::int %% 20 = 0"
            "   AND p = %s::date THEN 2 ELSE 1 END) v", (PERIODS, PERIODS[6]))
        conn.execute(
            "INSERT INTO bill_line (account, period, version, line_no, zone, date_from, date_to, kwh,"
            " estimated_kwh, rate, amount)"
            " SELECT b.account, b.period, b.version, z.no, z.zone, b.period,"
            " (b.period + interval '1 month' - interval '1 day')::date, round(b.kwh * z.share, 3), 0, z.rate,"
            " round(round(b.kwh * z.share, 3) * z.rate, 2)"
            " FROM bill b CROSS JOIN (VALUES (1, 'night', 0.33, 4.12), (2, 'peak', 0.29, 7.98),"
            "   (3, 'half_peak', 0.38, 6.62)) z(no, zone, share, rate)")
        conn.execute(
            "INSERT INTO ledger_entry (account, component, kind, amount, booked_on, period, source, reason,"
            " author, idempotency_key)"
            " SELECT b.account, 'energy', k.kind, CASE k.kind WHEN 'charge' THEN b.total ELSE -b.total END,"
            " CASE k.kind WHEN 'charge' THEN b.period + interval '1 month 1 day'"
            "   ELSE b.period + interval '1 month 12 days' END, b.period,"
            " CASE k.kind WHEN 'charge' THEN 'bill' ELSE 'card' END, 'bench', 'bench',"
            " k.kind || ':' || b.account || ':' || b.period || ':energy'"
            " FROM bill b CROSS JOIN (VALUES ('charge'), ('payment')) k(kind) WHERE b.version = 1")
        counts["bill"] = conn.execute("SELECT count(*) FROM bill").fetchone()[0]  # type: ignore[index]
        counts["ledger_entry"] = conn.execute("SELECT count(*) FROM ledger_entry").fetchone()[0]  # type: ignore[index]
        # 30-minute readings (register 1.8.0) of the session accounts' meters, a year up to the clock
        accounts = session_accounts(n, s)
        start = datetime.combine(FIRST_DAY, datetime.min.time(), MSK).astimezone(UTC)
        end = CLOCK.astimezone(UTC)
        timeseries.Partitions().ensure(conn, start, end)
        conn.execute("INSERT INTO reading_series (meter_id, register)"
                     " SELECT 'm-' || a, '1.8.0' FROM unnest(%s::text[]) a ORDER BY 1", (accounts,))
        conn.execute(
            "INSERT INTO reading_data (series, flags, ts, source, value, kwh, span)"
            " SELECT rs.id, (1 << 18) | (1 << 21) | (1 << 24), t, 0,"
            " 1000 + round((extract(epoch FROM t - %s::timestamptz) / 1800 * 0.21)::numeric, 3), 0.21,"
            " 1800000000 FROM reading_series rs"
            " CROSS JOIN generate_series(%s::timestamptz, %s::timestamptz, interval '30 minutes') t"
            " WHERE rs.register = '1.8.0' ORDER BY rs.id, t", (start, start, end))
        counts["reading_data"] = conn.execute("SELECT count(*) FROM reading_data").fetchone()[0]  # type: ignore[index]
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("subscriber", "meter", "daily_zone_usage", "bill", "bill_line", "ledger_entry",
                      "reading_series", "reading_data"):
            conn.execute(f"VACUUM ANALYZE {table}")
    return counts


def make_sessions(url: str, accounts: list[str]) -> list[tuple[str, str]]:
    """A user per account, linked to it, with a confirmed e-mail and a live session: (account, cookie)."""
    tokens = [secrets.token_urlsafe(32) for _ in accounts]
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO portal_user (login, password_hash, email, email_confirmed_at, licence_version,"
            " licence_accepted_at, pd_consent_version, pd_consent_at)"
            " SELECT 'bench' || a, '$argon2id$v=19$m=65536,t=3,p=4$bench$bench', 'bench' || a || '@example.ru',"
            " now(), 'v1', now(), 'v1', now() FROM unnest(%s::text[]) a", (accounts,))
        conn.execute("INSERT INTO portal_account_link (user_id, account)"
                     " SELECT id, substring(login from 6) FROM portal_user WHERE login LIKE 'bench%%'")
        ids: dict[str, int] = dict(conn.execute("SELECT substring(login from 6), id FROM portal_user"
                                " WHERE login LIKE 'bench%%'").fetchall())
        with conn.cursor().copy("COPY portal_session (user_id, token_hash, remember, expires_at, ip, user_agent)"
                                " FROM STDIN") as copy:
            expires = datetime.now(UTC) + timedelta(days=1)
            for acc, token in zip(accounts, tokens, strict=True):
                copy.write_row((ids[acc], hashlib.sha256(token.encode()).digest(), False, expires,
                                "127.0.0.1", "bench/portal.py"))
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("portal_user", "portal_account_link", "portal_session"):
            conn.execute(f"VACUUM ANALYZE {table}")
    return list(zip(accounts, tokens, strict=True))


# --- the portal in a process of its own --------------------------------------------------------

def serve(url: str, port: int) -> None:
    """`--serve`: the customer account under uvicorn, its clock at CLOCK (the data's today)."""
    import uvicorn

    from amr.settings import Settings
    from portal.app import create_app

    settings = Settings(database_url=url, portal_base_url=f"http://127.0.0.1:{port}",
                        portal_secure_cookies=False, smtp_url="")
    app = create_app(settings)
    app.state.clock = lambda: CLOCK.astimezone(UTC)
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- measuring ---------------------------------------------------------------------------------

def pct(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49] * 1000, q[98] * 1000


def page_paths(acc: str, i: int) -> dict[str, str]:
    month = PERIODS[i % 12] if i % 2 else TODAY.replace(day=1)  # this month, or one of the year's
    return {"account": f"/accounts/{acc}", "daily": f"/accounts/{acc}/daily?month={month:%Y-%m}"}


MARKS = {"account": 'id="monthly-chart"', "daily": 'id="daily-table"'}


async def drive(base: str, sessions: list[tuple[str, str]], page: str, requests: int) -> list[float]:
    """`requests` GETs of one page by SESSIONS concurrent clients; client k uses sessions k, k+50, ..."""
    samples: list[float] = []
    left = iter(range(requests))

    async def client(k: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            mine = sessions[k::SESSIONS]
            j = 0
            for i in left:
                acc, token = mine[j % len(mine)]
                j += 1
                path = page_paths(acc, i)[page]
                t = time.perf_counter()
                r = await http.get(path, headers={"Cookie": f"amr_session={token}"})
                dt = time.perf_counter() - t
                if r.status_code != 200 or MARKS[page] not in r.text:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
                samples.append(dt)

    await asyncio.gather(*(client(k) for k in range(SESSIONS)))
    return samples


def bare(pool: ConnectionPool, sessions: list[tuple[str, str]], work: Callable[[Any, str, str, int], Any],
         requests: int) -> list[float]:
    """`requests` runs of `work(conn, account, token, i)` from SESSIONS threads through `pool`."""
    def one(i: int) -> float:
        acc, token = sessions[i % len(sessions)]
        t = time.perf_counter()
        with pool.connection() as conn:
            work(conn, acc, token, i)
        return time.perf_counter() - t

    with ThreadPoolExecutor(SESSIONS) as ex:
        return list(ex.map(one, range(requests)))


def _month_of(i: int) -> date:
    return PERIODS[i % 12] if i % 2 else TODAY.replace(day=1)


def _next_month(d: date) -> date:
    return timeseries.next_month(d)


def q_monthly(conn: Any, acc: str, token: str, i: int) -> Any:
    first = PERIODS[1]  # the account page's twelve months: 2025-12 .. 2026-11
    return account_data.monthly_usage(conn, acc, first, _next_month(TODAY.replace(day=1)), TZ)


def q_daily(conn: Any, acc: str, token: str, i: int) -> Any:
    first = _month_of(i)
    return account_data.daily_usage(conn, acc, first, _next_month(first) - timedelta(days=1), TZ)


def _session(conn: Any, token: str) -> Any:
    return conn.execute(
        "SELECT u.id, u.login, u.email, u.email_confirmed_at IS NOT NULL, u.phone, s.id"
        " FROM portal_session s JOIN portal_user u ON u.id = s.user_id"
        " WHERE s.token_hash = %s AND s.revoked_at IS NULL AND s.expires_at > now()",
        (hashlib.sha256(token.encode()).digest(),)).fetchone()


def q_account_all(conn: Any, acc: str, token: str, i: int) -> Any:
    """Every query the account page's route runs (portal.account_routes.account_page), in order."""
    uid = _session(conn, token)[0]
    sub = linking.linked_account(conn, uid, acc)
    account_data.meters(conn, acc)
    account_data.balance(conn, acc, TODAY)
    q_monthly(conn, acc, token, i)
    bills = account_data.bill_summaries(conn, acc)
    start = datetime.combine(TODAY.replace(day=1), datetime.min.time(), MSK).astimezone(UTC)
    account_data.readings_since(conn, acc, start)
    account_data.bill_versions(conn, acc, date.fromisoformat(bills[0].period + "-01"))
    conn.commit()
    return sub


def q_daily_all(conn: Any, acc: str, token: str, i: int) -> Any:
    uid = _session(conn, token)[0]
    sub = linking.linked_account(conn, uid, acc)
    q_daily(conn, acc, token, i)
    conn.commit()
    return sub


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=100_000, help="how many accounts (default 100000)")
    p.add_argument("--session-accounts", type=int, default=1_000,
                   help="accounts with 30-minute data, one logged-in user each (default 1000)")
    p.add_argument("--requests", type=int, default=5_000, help="requests per page (default 5000)")
    p.add_argument("--quick", action="store_true", help="10,000 accounts, 200 sessions' accounts, 1,000 requests")
    p.add_argument("--admin-url", default=os.environ.get(
        "AMR_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to create databases (default: AMR_TEST_ADMIN_URL or local)")
    p.add_argument("--keep", action="store_true", help="keep the benchmark database")
    p.add_argument("--db", help="use this existing database (made by an earlier --keep run) instead")
    p.add_argument("--serve", nargs=2, metavar=("URL", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    n, s, requests = ((10_000, 200, 1_000) if args.quick
                      else (args.accounts, args.session_accounts, args.requests))

    name = args.db or f"amr_bench_portal_{uuid.uuid4().hex[:8]}"
    url = _with_db(args.admin_url, name)
    if not args.db:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    server = None
    try:
        accounts = session_accounts(n, s)
        if not args.db:
            with psycopg.connect(url) as conn:
                migrate.migrate(conn, timescale=False)
                conn.commit()
            t = time.perf_counter()
            counts = populate(url, n, s)
            print(f"setup: {n:,} accounts; " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
                  + f" in {time.perf_counter() - t:.0f} s (not measured)", flush=True)
        else:
            with psycopg.connect(url) as conn:
                conn.execute("DELETE FROM portal_session")
                conn.execute("DELETE FROM portal_account_link")
                conn.execute("DELETE FROM portal_user")
                conn.commit()
        sessions = make_sessions(url, accounts)
        print(f"{len(sessions):,} users linked to their accounts, logged in", flush=True)

        port = free_port()
        server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", url, str(port)],
                                  cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/login", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the portal did not start") from None
                time.sleep(0.2)

        pool = ConnectionPool(url, min_size=POOL, max_size=POOL, kwargs={"options": "-c TimeZone=UTC"})
        pool.wait()
        warm = min(requests, 500)
        for page in ("account", "daily"):  # every session account's rows read once, as the pages find them
            asyncio.run(drive(base, sessions, page, max(warm, len(sessions))))
        load0 = os.getloadavg()
        results = {}
        for page, only, every in (("account", q_monthly, q_account_all), ("daily", q_daily, q_daily_all)):
            results[page] = (pct(asyncio.run(drive(base, sessions, page, requests))),
                             pct(bare(pool, sessions, only, requests)), pct(bare(pool, sessions, every, requests)))
        load1 = os.getloadavg()
        pool.close()

        print(f"{SESSIONS} concurrent sessions, {requests:,} requests per page, {len(sessions):,} users; "
              f"bare queries from {SESSIONS} threads through a pool of {POOL} (the portal's)")
        print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} (1 min; other work runs on this machine)")
        met = True
        for page, ((p50, p99), (b50, b99), (a50, a99)) in results.items():
            ok = p99 < 100 and p99 <= 3 * b99
            met = met and ok
            print(f"{page} page: p50 {p50:.1f} ms, p99 {p99:.1f} ms | bare query p50 {b50:.1f} ms, "
                  f"p99 {b99:.1f} ms | ratio p50 {p50 / b50:.2f}x, p99 {p99 / b99:.2f}x | "
                  f"all the page's queries p50 {a50:.1f} ms, p99 {a99:.1f} ms | "
                  f"target (p99 < 100 ms, <= 3x bare): {'met' if ok else 'NOT met'}")
        print(f"targets: {'met' if met else 'NOT met'}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if not args.keep and not args.db:
            with psycopg.connect(args.admin_url, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        else:
            print(f"kept database {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
