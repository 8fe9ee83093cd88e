"""Each account's ledger: charges, payments, penalty accruals, adjustments, reversals.

The ledger is append-only (migration 015 refuses UPDATE and DELETE):
a correction is a new entry with its reason and author, and a reversal names
the entry it cancels. Two components are kept apart, energy and penalty,
because a payment says which one it pays and an energy overpayment is never
applied to penalties on its own. Balances at any date are sums over the
entries, never stored beside them, so they cannot drift from them.

Sign: an amount above zero adds to what the customer owes (a charge, an
accrual, a debit adjustment); below zero it takes from it (a payment, a
credit). A balance above zero is a debt; below zero an overpayment.

Every write carries an idempotency key (unique in the table): the same payment
arriving twice (a registry sent again, a callback repeated) is one entry, and
`post` says it already was there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from amr.errors import UserError

ENERGY = "energy"
PENALTY = "penalty"
COMPONENTS = (ENERGY, PENALTY)
KINDS = ("charge", "payment", "accrual", "adjustment", "reversal")
ZERO = Decimal("0.00")
KOPECK = Decimal("0.01")


class LedgerError(UserError, ValueError):
    """An entry the ledger refuses: it names the field and what to do."""


@dataclass(frozen=True)
class Entry:
    id: int
    account: str
    component: str
    kind: str
    amount: Decimal
    booked_on: date
    period: date | None
    source: str | None
    reverses: int | None
    reason: str
    author: str
    idempotency_key: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "account": self.account, "component": self.component, "kind": self.kind,
            "amount": str(self.amount), "booked_on": self.booked_on.isoformat(),
            "period": self.period.strftime("%Y-%m") if self.period else None, "source": self.source,
            "reverses": self.reverses, "reason": self.reason, "author": self.author,
        }


_COLUMNS = ("id, account, component, kind, amount, booked_on, period, source, reverses, reason, author,"
            " idempotency_key")


def post(conn: Any, account: str, component: str, kind: str, amount: Decimal, booked_on: date, *,
         reason: str, author: str, key: str, period: date | None = None, source: str | None = None,
         reverses: int | None = None) -> tuple[int, bool]:
    """Append one entry; (its id, True) or, when `key` was posted before, (that entry's id, False).

    The amount must be whole kopecks and not zero; the component and the kind
    must be known. A repeated key with a different amount or account is no
    repeat but a clash, and is refused rather than silently taken for one.
    """
    if component not in COMPONENTS:
        raise LedgerError(f"component {component!r}: expected one of {', '.join(COMPONENTS)}")
    if kind not in KINDS:
        raise LedgerError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    amount = Decimal(amount)
    if amount == 0 or amount != amount.quantize(KOPECK):
        raise LedgerError(f"amount {amount}: a ledger entry is a non-zero number of whole kopecks")
    if not key:
        raise LedgerError("an entry needs an idempotency key (what makes a repeat recognisable)")
    row = conn.execute(
        "INSERT INTO ledger_entry (account, component, kind, amount, booked_on, period, source, reverses,"
        " reason, author, idempotency_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        (account, component, kind, amount, booked_on, period, source, reverses, reason, author, key),
    ).fetchone()
    if row is not None:
        return int(row[0]), True
    old = conn.execute("SELECT id, account, component, amount FROM ledger_entry WHERE idempotency_key = %s",
                       (key,)).fetchone()
    if (old[1], old[2], Decimal(old[3])) != (account, component, amount):
        raise LedgerError(f"idempotency key {key!r} was posted before as {old[2]} {old[3]} on account {old[1]}, "
                          f"not {component} {amount} on account {account}: a key names one entry")
    return int(old[0]), False


def reverse(conn: Any, entry_id: int, *, reason: str, author: str, booked_on: date,
            key: str | None = None) -> tuple[int, bool]:
    """Cancel an entry by its opposite, naming it; an entry is reversed at most once."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM ledger_entry WHERE id = %s", (entry_id,)).fetchone()
    if row is None:
        raise LedgerError(f"no ledger entry {entry_id}")
    e = Entry(*row)
    if e.kind == "reversal":
        raise LedgerError(f"entry {entry_id} is itself a reversal: post a new entry instead")
    done = conn.execute("SELECT id FROM ledger_entry WHERE reverses = %s", (entry_id,)).fetchone()
    if done is not None:
        return int(done[0]), False
    return post(conn, e.account, e.component, "reversal", -e.amount, booked_on, reason=reason, author=author,
                key=key or f"reversal:{entry_id}", period=e.period, source=e.source, reverses=entry_id)


def entries(conn: Any, account: str, *, component: str | None = None) -> list[Entry]:
    """An account's entries in booking order (date, then the order they were written)."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM ledger_entry WHERE account = %s AND (%s::text IS NULL OR component = %s)"
        " ORDER BY booked_on, id", (account, component, component)).fetchall()
    return [Entry(*r) for r in rows]


def balance(conn: Any, account: str, on: date | None = None) -> dict[str, Decimal]:
    """What the account owes per component at the end of `on` (default: everything booked)."""
    rows = conn.execute(
        "SELECT component, sum(amount) FROM ledger_entry WHERE account = %s"
        " AND (%s::date IS NULL OR booked_on <= %s) GROUP BY component", (account, on, on)).fetchall()
    out = dict.fromkeys(COMPONENTS, ZERO)
    for component, total in rows:
        out[component] = Decimal(total)
    return out


def balances(conn: Any, on: date | None = None, accounts: Sequence[str] | None = None,
             ) -> dict[str, dict[str, Decimal]]:
    """`balance` of many accounts in one query (accounts with no entry are left out)."""
    rows = conn.execute(
        "SELECT account, component, sum(amount) FROM ledger_entry"
        " WHERE (%s::date IS NULL OR booked_on <= %s) AND (%s::text[] IS NULL OR account = ANY(%s))"
        " GROUP BY account, component", (on, on, accounts, accounts)).fetchall()
    out: dict[str, dict[str, Decimal]] = {}
    for account, component, total in rows:
        out.setdefault(account, dict.fromkeys(COMPONENTS, ZERO))[component] = Decimal(total)
    return out


_CHARGE_COLUMNS = ("account, component, kind, amount, booked_on, period, source, reason, author,"
                   " idempotency_key")


def _charge_row(account: str, period: date, version: int, amount: Decimal, why: str, booked_on: date,
                author: str) -> tuple[Any, ...]:
    """A bill version's charge as a ledger row: the one place its key, source and reason are spelled."""
    month = f"{period:%Y-%m}"
    head = "bill for " if version == 1 else f"bill version {version} for "
    return (account, ENERGY, "charge", amount, booked_on, period, f"bill {month} v{version}",
            f"{head}{month}: {why}", author, f"bill:{account}:{month}:v{version}")


def post_bill_charges(conn: Any, period: date, accounts: Iterable[str] | None = None, *,
                      tz: str = "Europe/Moscow", author: str = "billing") -> int:
    """Post every bill version of the period not posted yet: its difference to the version before.

    So the energy charges of a period always sum to its latest bill's total,
    however often it was re-billed, and re-running posts nothing. A version
    equal to the one before (no difference) posts nothing. Booked on the local
    date the version was issued. Returns the number of entries posted. (A
    billing run posts its own new versions with `copy_bill_charges`; this is
    the general, slower path that finds what is missing.)
    """
    period = period.replace(day=1)
    wanted = sorted(set(accounts)) if accounts is not None else None
    missing = conn.execute(
        """SELECT b.account, b.version, b.total - coalesce(p.total, 0), b.reason,
                  (b.created_at AT TIME ZONE %(tz)s)::date
           FROM bill b
           LEFT JOIN bill p ON p.account = b.account AND p.period = b.period AND p.version = b.version - 1
           WHERE b.period = %(period)s AND (%(acc)s::text[] IS NULL OR b.account = ANY(%(acc)s))
             AND b.total <> coalesce(p.total, 0)""",
        {"tz": tz, "period": period, "acc": wanted}).fetchall()
    posted = 0  # versions posted before are skipped by their key
    with conn.cursor() as cur:
        for account, version, amount, why, booked_on in missing:
            cur.execute(f"INSERT INTO ledger_entry ({_CHARGE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (idempotency_key) DO NOTHING",
                        _charge_row(account, period, version, Decimal(amount), why, booked_on, author))
            posted += cur.rowcount or 0
    return posted


def copy_bill_charges(conn: Any, period: date, charges: Iterable[tuple[str, int, Decimal, str]], *,
                      tz: str = "Europe/Moscow", author: str = "billing") -> int:
    """`post_bill_charges` for the versions a billing run has just written, from what it priced.

    `charges` are (account, version, difference to the version before, the
    version's reason). The run holds its period's lock and wrote these
    versions itself, so their keys are new: they go in by COPY, with no join
    and no conflict check, which is what a city-wide run can afford. Should a
    key exist after all (an entry posted by hand under a bill's key), nothing
    of the COPY stays and `post_bill_charges` posts what is missing instead.
    """
    period = period.replace(day=1)
    rows = [(a, v, amount, why) for a, v, amount, why in charges if amount != 0]
    if not rows:
        return 0
    import psycopg

    try:
        with conn.transaction():
            booked_on = conn.execute("SELECT (now() AT TIME ZONE %s)::date", (tz,)).fetchone()[0]
            with conn.cursor() as cur, cur.copy(f"COPY ledger_entry ({_CHARGE_COLUMNS}) FROM STDIN") as cp:
                for account, version, amount, why in rows:
                    cp.write_row(_charge_row(account, period, version, amount, why, booked_on, author))
    except psycopg.errors.UniqueViolation:
        return post_bill_charges(conn, period, sorted({r[0] for r in rows}), tz=tz, author=author)
    return len(rows)


def book_payment(conn: Any, account: str, paid_on: date, *, energy: Decimal = ZERO, penalty: Decimal = ZERO,
                 key: str, source: str, reason: str, author: str, period: date | None = None,
                 ) -> dict[str, tuple[int, bool]]:
    """A payment as the customer split it: one entry per component it pays (negative amounts).

    `key` names the payment (for a registry: its source and operation id); the
    entries are `key:energy` and `key:penalty`, so a repeat books nothing.
    """
    if energy < 0 or penalty < 0:
        raise LedgerError(f"payment {key}: amounts are paid, not owed: energy {energy}, penalty {penalty}")
    if energy == 0 and penalty == 0:
        raise LedgerError(f"payment {key}: nothing is paid (energy and penalty are both zero)")
    out = {}
    for component, amount in ((ENERGY, energy), (PENALTY, penalty)):
        if amount:
            out[component] = post(conn, account, component, "payment", -Decimal(amount), paid_on, reason=reason,
                                  author=author, key=f"{key}:{component}", period=period, source=source)
    return out
