"""Linking an account to a login ("Добавить абонента") by proof of possession, and who may see what.

The proof is the date and amount of the account's last payment, taken from
the ledger (view portal_payment_proof, migration 021: a payment's energy and
penalty entries together, reversed ones left out). When the last payment came
through a third party (a bank's or agent's registry) less than 14 days ago,
the one before it is asked instead: the customer may not know yet that the
registry arrived, and a payment the customer made through a bank shows up
here days later (ACCOUNT.md). Leading zeros of the account number are not
significant (`collector.inventory.normalize_account`).

A wrong proof, an unknown account and an account without payments all get the
same answer (`WRONG_PROOF`), so the form tells nobody which accounts exist.
Wrong proofs are counted per user, per account number and per address
(portal.web rate counters); once a count is used up every attempt of that key
is refused for the window, a right proof too, so guessing does not pay.

`linked_account` is the one check every account route makes: an account the
user has not linked answers exactly like one that does not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from billing import account_data
from collector.inventory import normalize_account

THIRD_PARTY_DAYS = 14
# wrong proofs allowed per window, per key
USER_LIMIT, USER_WINDOW_S = 5, 15 * 60
ACCOUNT_LIMIT, ACCOUNT_WINDOW_S = 10, 60 * 60
IP_LIMIT, IP_WINDOW_S = 20, 60 * 60
# every attempt of a user, right or wrong (the form is a lookup: it must not be a fast one)
ANY_LIMIT, ANY_WINDOW_S = 30, 60 * 60

WRONG_PROOF = ("Не удалось добавить лицевой счёт: проверьте номер лицевого счёта, дату и сумму последнего "
               "платежа.")


class ProofFormError(ValueError):
    """A field of the form that cannot be read (not a wrong proof: nothing is looked up)."""


@dataclass(frozen=True)
class ProofPayment:
    paid_on: date
    amount: Decimal
    third_party: bool


def proof_payments(conn: Any, acc: str, limit: int = 2) -> list[ProofPayment]:
    """The account's latest payments, newest first (the two a proof may be checked against)."""
    rows = conn.execute("SELECT paid_on, amount, third_party FROM portal_payment_proof WHERE account = %s"
                        " ORDER BY paid_on DESC, first_entry DESC LIMIT %s", (acc, limit)).fetchall()
    return [ProofPayment(*r) for r in rows]


def expected_payment(payments: list[ProofPayment], today: date) -> ProofPayment | None:
    """The payment the customer must name: the last, or the one before it when the last came
    through a third party less than THIRD_PARTY_DAYS days ago; None when there is none."""
    if not payments:
        return None
    last = payments[0]
    if last.third_party and (today - last.paid_on).days < THIRD_PARTY_DAYS:
        return payments[1] if len(payments) > 1 else None
    return last


def parse_account(text: str) -> str:
    try:
        return normalize_account((text or "").replace(" ", ""))
    except ValueError:
        raise ProofFormError("Номер лицевого счёта — только цифры.") from None


def parse_amount(text: str) -> Decimal:
    """«1 234,56», «1234.56», «1234» as Decimal; ProofFormError when it is no sum of money."""
    clean = re.sub(r"[\s\u00a0\u202f₽р.уб]+$", "", (text or "").strip())
    clean = re.sub(r"[\s\u00a0\u202f]", "", clean).replace(",", ".")
    if not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{1,2})?", clean):
        raise ProofFormError("Сумму укажите в рублях и копейках, например 1234,56.")
    value = Decimal(clean)
    if value <= 0:
        raise ProofFormError("Сумму укажите в рублях и копейках, например 1234,56.")
    return value


def parse_day(text: str) -> date:
    """2026-11-05 (a date field) or 05.11.2026 as a date."""
    text = (text or "").strip()
    for fmt in ("%Y-%m-%d", "%d.%m.%Y"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ProofFormError("Дату платежа укажите как ДД.ММ.ГГГГ, например 05.11.2026.")


def proof_holds(conn: Any, acc: str, paid_on: date, amount: Decimal, today: date) -> bool:
    """Whether (paid_on, amount) is the payment the account's proof asks for."""
    if account_data.subscriber(conn, acc) is None:
        return False
    want = expected_payment(proof_payments(conn, acc), today)
    return want is not None and want.paid_on == paid_on and want.amount == amount


def linked_accounts(conn: Any, user_id: int) -> list[str]:
    """The accounts a user linked, in the order of their numbers."""
    rows = conn.execute("SELECT account FROM portal_account_link WHERE user_id = %s", (user_id,)).fetchall()
    return sorted((r[0] for r in rows), key=lambda a: (len(a), a))


def linked_account(conn: Any, user_id: int, account_text: str) -> account_data.Subscriber | None:
    """The subscriber of `account_text` if this user linked it; None for every other case alike."""
    try:
        acc = normalize_account(account_text)
    except ValueError:
        return None
    row = conn.execute("SELECT 1 FROM portal_account_link WHERE user_id = %s AND account = %s",
                       (user_id, acc)).fetchone()
    if row is None:
        return None
    return account_data.subscriber(conn, acc)


def link(conn: Any, user_id: int, acc: str) -> bool:
    """Link through the narrow function of migration 021; False when it was linked already."""
    return bool(conn.execute("SELECT portal_link_account(%s, %s)", (user_id, acc)).fetchone()[0])


def unlink(conn: Any, user_id: int, acc: str) -> bool:
    return bool(conn.execute("SELECT portal_unlink_account(%s, %s)", (user_id, acc)).fetchone()[0])
