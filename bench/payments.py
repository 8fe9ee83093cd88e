"""Benchmark: a bank registry of 1,000,000 payments for 100,000 accounts, and what follows it.

Setup (not measured): a scratch database with the subscribers and six months
of energy charges each (April to September 2026), and a registry
file in the default layout (cp1251, `;`-separated, Excel-style amounts like
"1 234,56", account numbers some with leading zeros, one payment in a
thousand to an account we do not have, the totals line last).

Then it times, in the same run and on the same file:

- the raw COPY: the file's payment lines COPYed as they are into a scratch
  table of text columns (no parsing, no checks, no index): the floor of
  getting those bytes into PostgreSQL;
- `amr payments import` of the file (billing.registry: read whole and checked,
  then booked in one transaction into registry_payment and ledger_entry);
- importing it again (every payment a duplicate, nothing booked);
- the balances of all accounts (billing.ledger.balances) beside the bare SQL
  aggregate over the same ledger rows;
- the penalty run: billing.penalties.penalties_many over every account
  beside the bare aggregate over the same ledger rows.

Targets: the import at 0.3 or more of the raw COPY's speed (COPY seconds /
import seconds); the penalty run at most 3 times the bare aggregate.

    .venv/bin/python bench/payments.py            # 1,000,000 payments, 100,000 accounts
    .venv/bin/python bench/payments.py --quick    # 100,000 payments, 10,000 accounts
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amr.runtime import tune_gc  # noqa: E402
from bench._db import scratch_database  # noqa: E402
from billing import ledger, registry  # noqa: E402

NAMES = ["ИВАНОВ И.И.", "ПЕТРОВА АННА СЕРГЕЕВНА", "СМИРНОВ П.", "КУЗНЕЦОВА Е.В.", "ПОПОВ АЛЕКСЕЙ"]
STREETS = ["ул. Садовая", "Невский пр.", "ул. Марата", "Лиговский пр.", "ул. Гороховая"]


def make_registry(path: Path, payments: int, accounts: int, seed: int = 14) -> int:
    """Write a registry of `payments` lines to `path`; returns the file's size in bytes."""
    rnd = random.Random(seed)
    start = date(2026, 10, 1)
    days = [(start + timedelta(days=d)).strftime("%d-%m-%Y" if d % 2 else "%d.%m.%Y") for d in range(20)]
    lines = []
    total = 0
    for i in range(payments):
        acc = rnd.randrange(1, accounts + 1)
        account = f"{acc:012d}" if i % 5 == 0 else str(acc)  # old numbers with their leading zeros
        if i % 1000 == 999:
            account = str(accounts + 1 + i)  # nobody's: the unmatched queue
        kopecks = rnd.randrange(100, 300_000)
        total += kopecks
        rub, kop = divmod(kopecks, 100)
        amount = f"{rub:,}".replace(",", " ") + f",{kop:02d}" if i % 2 else f"{rub}.{kop:02d}"
        lines.append(f"{days[i % 20]};{8 + i % 12:02d}:{i % 60:02d}:{(i * 7) % 60:02d};9055/{i % 900:04d};"
                     f"{70_000_000 + i};{account};{NAMES[i % 5]};СПб, {STREETS[i % 5]}, д. {i % 90 + 1}, "
                     f"кв. {i % 300 + 1};092026;{amount}")
    rub, kop = divmod(total, 100)
    lines.append(f"={payments};{rub},{kop:02d};")
    data = ("\r\n".join(lines) + "\r\n").encode("cp1251")
    path.write_bytes(data)
    return len(data)


def raw_copy(conn: psycopg.Connection, path: Path) -> float:
    """The file's payment lines into a scratch table of text columns, as they are."""
    conn.execute("DROP TABLE IF EXISTS raw_registry")
    conn.execute("CREATE TABLE raw_registry (op_date text, op_time text, branch text, op_id text,"
                 " account text, payer text, address text, period text, amount text)")
    conn.commit()
    t = time.perf_counter()
    data = path.read_bytes()
    body = data[:data.rindex(b"\r\n=") + 2].replace(b"\r\n", b"\n")  # the payments, not the totals line
    with conn.cursor().copy("COPY raw_registry FROM STDIN (FORMAT text, DELIMITER ';', ENCODING 'WIN1251')"
                            ) as copy:
        for i in range(0, len(body), 1 << 20):
            copy.write(body[i:i + (1 << 20)])
    conn.commit()
    return time.perf_counter() - t


def balances_run(conn: psycopg.Connection) -> tuple[float, float, int]:
    """ledger.balances of every account, and the bare aggregate over the same rows."""
    t = time.perf_counter()
    rows = conn.execute("SELECT account, component, sum(amount) FROM ledger_entry GROUP BY 1, 2").fetchall()
    bare = time.perf_counter() - t
    conn.commit()
    t = time.perf_counter()
    got = ledger.balances(conn)
    ours = time.perf_counter() - t
    conn.commit()
    assert len(got) == len({r[0] for r in rows})
    return bare, ours, len(got)


def add_charges(conn: psycopg.Connection, accounts: int) -> int:
    """Six months of energy charges per account (April to September 2026), each booked when billed.

    Payments alone owe no penalty; these make the penalty run find overdue
    charges, paid late by the registry's October payments or not at all.
    """
    cur = conn.execute(
        """INSERT INTO ledger_entry (account, component, kind, amount, booked_on, period, source, reason, author,
               idempotency_key)
           SELECT a::text, 'energy', 'charge', round((300 + random() * 4700)::numeric, 2), (p + interval '1 month')::date,
                  p::date, 'bench', 'bench charge', 'bench', 'bench:' || a || ':' || to_char(p, 'YYYY-MM')
           FROM generate_series(1, %s) a CROSS JOIN generate_series(date '2026-04-01', date '2026-09-01',
                interval '1 month') p""", (accounts,))
    conn.commit()
    return int(cur.rowcount or 0)


def penalty_run(conn: psycopg.Connection, on: date) -> str:
    """The penalty half, kept apart: billing.penalties is another engineer's module.

    Times `billing.penalties.penalties_many` (every account's overdue charges
    and their penalty, one pass over the ledger) against the bare SQL
    aggregate over the same rows: the energy entries summed per account and
    period (charges) or day (payments), fetched to the client.
    """
    try:
        from billing import penalties
    except ImportError:
        return "penalty run: not measured (billing.penalties does not exist yet)"
    run = getattr(penalties, "penalties_many", None)
    if run is None:
        return "penalty run: not measured (billing.penalties has no set-based run for many accounts)"
    bare = []
    for _ in range(2):
        t = time.perf_counter()
        conn.execute("SELECT account, CASE WHEN kind = 'payment' THEN booked_on ELSE period END, sum(amount)"
                     " FROM ledger_entry WHERE component = 'energy' AND booked_on <= %s GROUP BY 1, 2",
                     (on,)).fetchall()
        bare.append(time.perf_counter() - t)
        conn.rollback()
    t = time.perf_counter()
    found = run(conn, on)
    ours = time.perf_counter() - t
    conn.rollback()
    charges = sum(len(v) for v in found.values())
    owed = sum((c.penalty for v in found.values() for c in v), start=penalties.ZERO)
    return (f"penalty run (billing.penalties.penalties_many on {on}): {ours:.2f} s for {len(found)} accounts, "
            f"{charges} overdue charges, {owed} RUB of penalty; bare aggregate {min(bare):.2f} s, "
            f"{ours / min(bare):.2f}x (target <= 3x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payments", type=int, default=1_000_000, help="lines in the registry (default 1000000)")
    p.add_argument("--accounts", type=int, default=100_000, help="subscribers (default 100000)")
    p.add_argument("--quick", action="store_true", help="100,000 payments for 10,000 accounts")
    args = p.parse_args(argv)
    n, accounts = (100_000, 10_000) if args.quick else (args.payments, args.accounts)
    tune_gc()  # as `amr` does for every command

    with scratch_database("amr_bench_payments") as url, tempfile.TemporaryDirectory() as tmp, \
            psycopg.connect(url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        path = Path(tmp) / "reestr.txt"
        t = time.perf_counter()
        conn.execute("INSERT INTO subscriber (account, metering, plan, category, area)"
                     " SELECT g::text, 'amr', 'single', 'gas_stove', 'urban' FROM generate_series(1, %s) g",
                     (accounts,))
        conn.commit()
        charges = add_charges(conn, accounts)
        size = make_registry(path, n, accounts)
        print(f"setup: {accounts} subscribers with {charges} charges, a registry of {n} payments "
              f"({size / 1e6:.0f} MB, cp1251) "
              f"in {time.perf_counter() - t:.1f} s (not measured)")
        raw_copy(conn, path)  # warm: the file in the page cache, the server's buffers as an import finds them
        copy_s = min(raw_copy(conn, path) for _ in range(2))
        conn.execute("DROP TABLE raw_registry")
        conn.commit()

        layout = registry.load_layout()
        t = time.perf_counter()
        parsed = registry.parse(path.read_bytes(), layout, name=path.name)
        parse_s = time.perf_counter() - t
        r = registry.import_registry(conn, parsed, source="sber", layout=layout, author="bench")
        conn.commit()
        import_s = time.perf_counter() - t
        assert r.booked + r.unmatched == n and r.refused == 0, r.as_dict()
        t = time.perf_counter()
        again = registry.import_file(conn, path, layout=layout, source="sber", author="bench")
        conn.commit()
        again_s = time.perf_counter() - t
        assert (again.booked, again.duplicate) == (0, n), again.as_dict()
        ledger_rows = conn.execute("SELECT count(*) FROM ledger_entry").fetchone()[0]
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE ledger_entry")
        conn.autocommit = False
        bare, ours, nacc = balances_run(conn)

        print(f"raw COPY of the file's lines (physical limit): {copy_s:.2f} s, {n / copy_s:,.0f} lines/s")
        print(f"import: {import_s:.2f} s, {n / import_s:,.0f} payments/s (reading and checking the file "
              f"{parse_s:.2f} s, booking {import_s - parse_s:.2f} s) [booked {r.booked}, unmatched "
              f"{r.unmatched}, {ledger_rows - charges} ledger entries]")
        ratio = copy_s / import_s
        print(f"import at {ratio:.2f} of the raw COPY's speed (target >= 0.3: {'met' if ratio >= 0.3 else 'NOT met'})")
        print(f"re-import (all {again.duplicate} duplicates, nothing booked): {again_s:.2f} s")
        print(f"balances of {nacc} accounts: {ours:.2f} s, bare aggregate {bare:.2f} s, {ours / bare:.2f}x")
        print(penalty_run(conn, date(2027, 1, 31)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
