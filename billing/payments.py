"""Card payments made in the customer account, through a payment provider.

A customer starts a payment with an idempotency key (the `Idempotency-Key`
header of the API), the energy and penalty amounts set apart (an energy
payment never pays penalties, so the customer says what each part pays), and
the e-mail or phone the electronic receipt goes to (54-FZ: given before
paying). The payment then moves

    created -> pending -> succeeded | failed        and unknown

`created` is our record before the provider has it; `pending` once the
provider has it and the customer is paying at its confirmation URL;
`unknown` when the provider did not answer (Kill Bill's UNKNOWN: we cannot
tell whether it exists or was paid, so we ask again). Every change is a row
of `card_payment_event` (migration 017).

The provider says how it ended in two ways, and either is enough: its
callback, signed with HMAC-SHA256 over the raw body (`handle_callback`), and,
for a callback that never comes, the reconciliation (`reconcile`, the janitor
of `amr card reconcile`), which asks the provider again on an exponential
back-off, capped (`next_check_at`). Both end in `apply_status`, which locks
the payment's row: a succeeded payment is booked to the ledger exactly once
(`billing.ledger.book_payment`, key `card:<provider>:<provider payment id>`,
on the Moscow date it was paid) and gets exactly one receipt, however many
callbacks and janitors race for it.

The receipt recorded (`card_receipt`) holds what the 54-FZ electronic cheque
needs: date and time, amount, what was paid (energy, penalties), the e-mail or
phone given before paying, the supplier, a number. Fiscalising it and sending
it (a cash register online, a fiscal data operator) is outside this module.
The printable receipt exists only for payments made in the account.

No payment can be started in the bank's daily technical break
(AMR_PAYMENT_BREAK, 23:50-00:10 Moscow time by default); the refusal says so
in Russian. Functions that talk to the provider commit: our record of a
payment must survive whatever happens to the call, and the row lock that
makes booking happen once must be released.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import http.client
import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from amr.errors import UserError
from amr.settings import Settings
from billing.ledger import book_payment

log = logging.getLogger("amr.payments")

MOSCOW = ZoneInfo("Europe/Moscow")
STATES = ("created", "pending", "succeeded", "failed", "unknown")
OPEN = ("created", "pending", "unknown")
FINAL = ("succeeded", "failed")
KOPECK = Decimal("0.01")
MAX_AMOUNT = Decimal("999999999.99")
# the janitor's back-off: the first check a minute after the last news, doubling, at most hourly
FIRST_CHECK = timedelta(minutes=1)
LONGEST_WAIT = timedelta(hours=1)
SIGNATURE_HEADER = "X-Payment-Signature"
AUTHOR = "card-payments"
_COLUMNS = ("id, account, idempotency_key, energy, penalty, contact, contact_kind, provider,"
            " provider_payment_id, confirmation_url, state, created_at, paid_at, checks, next_check_at")


# --- what can go wrong --------------------------------------------------------------

class PaymentRefused(UserError, ValueError):
    """A payment that cannot be started as asked; the message is for the customer, in Russian."""

    code = "payment_refused"


class TechnicalBreak(PaymentRefused):
    code = "technical_break"


class IdempotencyClash(PaymentRefused):
    code = "idempotency_key_reused"


class CardPaymentsOff(PaymentRefused):
    code = "card_payments_off"


class CallbackRefused(UserError):
    """A provider callback that is not taken: `status` is the HTTP answer it gets."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class ProviderUnavailable(Exception):
    """The provider did not answer, or not sensibly: whether it acted is not known."""


class ProviderRefused(Exception):
    """The provider answered that it will not do it (4xx): nothing was created there."""


# --- the provider ---------------------------------------------------------------------

@dataclass(frozen=True)
class ProviderPayment:
    """A payment as the provider describes it: status pending, succeeded or failed."""

    id: str
    status: str
    amount: Decimal | None = None
    confirmation_url: str | None = None
    paid_at: datetime | None = None


class PaymentProvider(Protocol):
    """What a payment provider (acquirer) does for us; `HttpProvider` speaks to one over HTTP.

    `create` must be idempotent by `key` at the provider: the same key asked
    again, after a call that timed out, gives the payment the first call made
    (if it made one), never a second one.
    """

    name: str

    def create(self, key: str, amount: Decimal, description: str,
               return_url: str | None = None) -> ProviderPayment: ...

    def status(self, provider_id: str) -> ProviderPayment: ...


def parse_provider_payment(data: Any) -> ProviderPayment:
    """The provider's JSON description of a payment, checked; ProviderUnavailable if it makes no sense."""
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not data["id"]:
        raise ProviderUnavailable("the provider's answer names no payment id")
    status = data.get("status")
    if status not in ("pending", "succeeded", "failed"):
        raise ProviderUnavailable(f"the provider's answer has status {status!r}, not pending, succeeded or failed")
    try:
        amount = Decimal(str(data["amount"])) if data.get("amount") is not None else None
        paid_at = datetime.fromisoformat(data["paid_at"]) if data.get("paid_at") else None
    except (InvalidOperation, ValueError, TypeError):
        raise ProviderUnavailable("the provider's answer has an amount or paid_at that does not parse") from None
    if paid_at is not None and paid_at.tzinfo is None:
        raise ProviderUnavailable("the provider's paid_at has no UTC offset")
    url = data.get("confirmation_url")
    return ProviderPayment(data["id"], status, amount, url if isinstance(url, str) else None, paid_at)


class HttpProvider:
    """The provider's JSON API over HTTP (stdlib urllib: two calls need no client library).

    POST {base}/payments with an `Idempotence-Key` header creates (or, for a
    key seen before, returns) a payment; GET {base}/payments/{id} describes
    one. A timeout, a refused connection, a 5xx or an answer that does not
    parse is ProviderUnavailable; a 4xx is ProviderRefused.
    """

    def __init__(self, base_url: str, name: str, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> ProviderPayment:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read(1 << 20)
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500:
                raise ProviderRefused(f"{method} {path}: the provider answered {exc.code}") from None
            raise ProviderUnavailable(f"{method} {path}: the provider answered {exc.code}") from None
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
            reason = getattr(exc, "reason", None) or exc
            raise ProviderUnavailable(f"{method} {path}: no answer from the provider ({reason})") from None
        try:
            return parse_provider_payment(json.loads(raw))
        except ValueError:
            raise ProviderUnavailable(f"{method} {path}: the provider's answer is not JSON") from None

    def create(self, key: str, amount: Decimal, description: str,
               return_url: str | None = None) -> ProviderPayment:
        body: dict[str, str] = {"amount": str(amount), "currency": "RUB", "description": description}
        if return_url:  # where the provider's page sends the customer back after paying
            body["return_url"] = return_url
        return self._call("POST", "/payments", body, {"Idempotence-Key": key})

    def status(self, provider_id: str) -> ProviderPayment:
        return self._call("GET", "/payments/" + urllib.parse.quote(provider_id, safe=""))


def provider_from(settings: Settings) -> HttpProvider | None:
    """The configured provider (AMR_PAYMENT_PROVIDER_URL), or None when card payments are off."""
    if not settings.payment_provider_url:
        return None
    return HttpProvider(settings.payment_provider_url, settings.payment_provider_name)


# --- what a customer may ask for ----------------------------------------------------

def technical_break(spec: str) -> tuple[time, time] | None:
    """AMR_PAYMENT_BREAK ("23:50-00:10") as (start, end), or None when empty."""
    if not spec:
        return None
    start, end = (time.fromisoformat(p) for p in spec.split("-"))
    return start, end


def check_break(now: datetime, spec: str) -> None:
    """TechnicalBreak when `now` is inside the break (start included, end not; it may cross midnight)."""
    window = technical_break(spec)
    if window is None:
        return
    start, end = window
    t = now.astimezone(MOSCOW).time().replace(tzinfo=None)
    inside = start <= t < end if start < end else (t >= start or t < end)
    if inside:
        raise TechnicalBreak(f"Оплата недоступна с {start:%H:%M} до {end:%H:%M} по московскому времени: "
                             f"технический перерыв банка. Повторите после {end:%H:%M}.")


def check_amounts(energy: Decimal, penalty: Decimal) -> tuple[Decimal, Decimal]:
    """Both whole kopecks, neither below zero, not both zero."""
    out = []
    for what, value in (("за электроэнергию", energy), ("пеней", penalty)):
        value = Decimal(value)
        if not value.is_finite() or value < 0 or value != value.quantize(KOPECK) or value > MAX_AMOUNT:
            raise PaymentRefused(f"Сумма оплаты {what} должна быть не меньше нуля, в рублях и копейках "
                                 f"(не больше {MAX_AMOUNT}).")
        out.append(value.quantize(KOPECK))
    if out[0] == 0 and out[1] == 0:
        raise PaymentRefused("Укажите сумму оплаты: за электроэнергию, пеней или обе.")
    return out[0], out[1]


_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s.]+$")


def receipt_contact(email: str | None, phone: str | None) -> tuple[str, str]:
    """(contact, 'email' | 'phone'): where the electronic receipt goes; exactly one must be given.

    A phone is kept as +<digits>; a Russian one written 8XXXXXXXXXX or
    9XXXXXXXXX becomes +7XXXXXXXXXX.
    """
    email = (email or "").strip() or None
    phone = (phone or "").strip() or None
    if (email is None) == (phone is None):
        raise PaymentRefused("Укажите адрес электронной почты или номер телефона (одно из двух): "
                             "на него придёт электронный чек.")
    if email is not None:
        if len(email) > 254 or not _EMAIL.match(email):
            raise PaymentRefused("Адрес электронной почты для чека указан неверно.")
        local, _, domain = email.rpartition("@")
        return f"{local}@{domain.lower()}", "email"
    assert phone is not None
    digits = re.sub(r"[\s()\-]", "", phone)
    plus = digits.startswith("+")
    digits = digits.removeprefix("+")
    if not digits.isdigit():
        raise PaymentRefused("Номер телефона для чека указан неверно: только цифры, например +79001234567.")
    if not plus and len(digits) == 11 and digits[0] == "8":
        digits = "7" + digits[1:]
    elif not plus and len(digits) == 10 and digits[0] == "9":
        digits = "7" + digits
    if not 11 <= len(digits) <= 15:
        raise PaymentRefused("Номер телефона для чека указан неверно, например +79001234567.")
    return "+" + digits, "phone"


# --- the payment ------------------------------------------------------------------------

@dataclass(frozen=True)
class CardPayment:
    id: int
    account: str
    idempotency_key: str
    energy: Decimal
    penalty: Decimal
    contact: str
    contact_kind: str
    provider: str
    provider_payment_id: str | None
    confirmation_url: str | None
    state: str
    created_at: datetime
    paid_at: datetime | None
    checks: int
    next_check_at: datetime | None

    @property
    def amount(self) -> Decimal:
        return self.energy + self.penalty

    @property
    def ledger_key(self) -> str:
        return f"card:{self.provider}:{self.provider_payment_id}"

    def as_dict(self) -> dict[str, Any]:
        """For operators (`amr card list --json`): no contact, no key."""
        return {"id": self.id, "account": self.account, "state": self.state, "energy": str(self.energy),
                "penalty": str(self.penalty), "amount": str(self.amount), "provider": self.provider,
                "provider_payment_id": self.provider_payment_id,
                "created_at": self.created_at.isoformat(),
                "paid_at": self.paid_at.isoformat() if self.paid_at else None, "checks": self.checks,
                "next_check_at": self.next_check_at.isoformat() if self.next_check_at else None}


def get(conn: Any, payment_id: int, *, lock: bool = False) -> CardPayment | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM card_payment WHERE id = %s" + (" FOR UPDATE" if lock else ""),
                       (payment_id,)).fetchone()
    return CardPayment(*row) if row else None


def listed(conn: Any, *, account: str | None = None, state: str | None = None,
           limit: int = 1000) -> list[CardPayment]:
    """Card payments, newest first, for operators."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM card_payment WHERE (%s::text IS NULL OR account = %s)"
        " AND (%s::text IS NULL OR state = %s) ORDER BY created_at DESC, id DESC LIMIT %s",
        (account, account, state, state, limit)).fetchall()
    return [CardPayment(*r) for r in rows]


def events(conn: Any, payment_id: int) -> list[tuple[datetime, str | None, str, str, str]]:
    """A payment's state history: (at, from, to, via, detail), oldest first."""
    return [tuple(r) for r in conn.execute(
        "SELECT at, state_from, state_to, via, detail FROM card_payment_event WHERE payment_id = %s"
        " ORDER BY id", (payment_id,)).fetchall()]


def backoff(checks: int) -> timedelta:
    """How long to wait before the next question to the provider, after `checks` of them."""
    return min(FIRST_CHECK * (2 ** min(checks, 20)), LONGEST_WAIT)


def _move(conn: Any, p: CardPayment, state: str, via: str, detail: str, now: datetime, *,
          next_check: datetime | None, checks: int | None = None, **fields: Any) -> None:
    sets = ", ".join(f"{k} = %({k})s" for k in fields)
    conn.execute(
        "UPDATE card_payment SET state = %(state)s, updated_at = %(now)s, next_check_at = %(next)s,"
        " checks = %(checks)s" + (", " + sets if sets else "") + " WHERE id = %(id)s",
        {"state": state, "now": now, "next": next_check, "checks": p.checks if checks is None else checks,
         "id": p.id, **fields})
    if state != p.state or detail:
        conn.execute("INSERT INTO card_payment_event (payment_id, at, state_from, state_to, via, detail)"
                     " VALUES (%s, %s, %s, %s, %s, %s)", (p.id, now, p.state, state, via, detail))


def start_payment(conn: Any, provider: PaymentProvider | None, settings: Settings, *, account: str,
                  key: str, energy: Decimal, penalty: Decimal, email: str | None = None,
                  phone: str | None = None, now: datetime | None = None,
                  return_url: str | None = None) -> tuple[CardPayment, bool]:
    """Start (or, for a key seen before, return) a card payment: (payment, True if new).

    `return_url` is where the provider's payment page sends the customer back
    (the account's payment history).

    Refused outside the rules (the technical break, amounts, the receipt's
    contact) with a PaymentRefused in Russian. The same key with other
    amounts or another contact is a clash, refused, never a second payment.
    A repeat of a payment the provider never confirmed asks it again, with
    the same key, so the provider returns what it may have made the first
    time. Commits: the record first, then what the provider said.
    """
    now = now or datetime.now(UTC)
    if provider is None:
        raise CardPaymentsOff("Оплата картой сейчас недоступна.")
    check_break(now, settings.payment_break)
    energy, penalty = check_amounts(energy, penalty)
    contact, kind = receipt_contact(email, phone)
    if not key or len(key) > 255:
        raise PaymentRefused("Ключ идемпотентности (Idempotency-Key) должен быть от 1 до 255 символов.")
    row = conn.execute(
        "INSERT INTO card_payment (account, idempotency_key, energy, penalty, contact, contact_kind,"
        " provider, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (account, idempotency_key) DO NOTHING RETURNING id",
        (account, key, energy, penalty, contact, kind, provider.name, now, now)).fetchone()
    new = row is not None
    if new:
        conn.execute("INSERT INTO card_payment_event (payment_id, at, state_to, via) VALUES (%s, %s, 'created', 'api')",
                     (row[0], now))
        conn.commit()
        p = get(conn, row[0])
    else:
        found = conn.execute("SELECT id FROM card_payment WHERE account = %s AND idempotency_key = %s",
                             (account, key)).fetchone()
        p = get(conn, found[0])
        assert p is not None
        if (p.energy, p.penalty, p.contact) != (energy, penalty, contact):
            raise IdempotencyClash("Этот ключ идемпотентности (Idempotency-Key) уже использован для другого "
                                   "платежа: для нового платежа нужен новый ключ.")
        conn.commit()
    assert p is not None
    if p.provider_payment_id is None and p.state in OPEN:
        p = _ask_create(conn, provider, p, "api", now, settings.payment_supplier, return_url)
    return p, new


def _ask_create(conn: Any, provider: PaymentProvider, p: CardPayment, via: str, now: datetime,
                supplier: str, return_url: str | None = None) -> CardPayment:
    """Ask the provider to create the payment (again: idempotent by our key); record what it said."""
    try:
        remote = provider.create(f"amr-card-{p.id}", p.amount, f"Оплата по лицевому счёту {p.account}",
                                 return_url)
    except ProviderRefused as exc:
        locked = get(conn, p.id, lock=True)
        assert locked is not None
        if locked.state in OPEN and locked.provider_payment_id is None:
            _move(conn, locked, "failed", via, str(exc), now, next_check=None)
        conn.commit()
        log.warning("card payment %d: the provider refused it: %s", p.id, exc)
    except ProviderUnavailable as exc:
        locked = get(conn, p.id, lock=True)
        assert locked is not None
        if locked.state in OPEN and locked.provider_payment_id is None:
            _move(conn, locked, "unknown", via, str(exc), now, next_check=now + backoff(locked.checks),
                  checks=locked.checks + 1)
        conn.commit()
        log.warning("card payment %d: not known whether the provider has it: %s", p.id, exc)
    else:
        locked = get(conn, p.id, lock=True)
        assert locked is not None
        if locked.provider_payment_id is None and locked.state in OPEN:
            _move(conn, locked, "pending", via, f"provider payment {remote.id}", now,
                  next_check=now + FIRST_CHECK, checks=0, provider_payment_id=remote.id,
                  confirmation_url=remote.confirmation_url)
        conn.commit()
        if remote.status != "pending":
            apply_status(conn, p.id, remote, via=via, now=now, supplier=supplier)
    out = get(conn, p.id)
    assert out is not None
    conn.commit()
    return out


def apply_status(conn: Any, payment_id: int, remote: ProviderPayment, *, via: str, now: datetime | None = None,
                 supplier: str) -> tuple[CardPayment, bool]:
    """Take the provider's word on a payment: (the payment after it, True if it was booked now).

    The row is locked first, so of a double callback and a janitor racing
    it one books and the others find the payment succeeded already. A final
    state does not change (a refund is another operation). A succeeded
    payment whose amount differs from ours is not booked: it is left
    unknown for an operator, and logged. Commits.
    """
    now = now or datetime.now(UTC)
    p = get(conn, payment_id, lock=True)
    if p is None:
        raise CallbackRefused(404, "not_found", f"no card payment {payment_id}")
    booked = False
    if p.state in FINAL:
        if remote.status != p.state:
            log.error("card payment %d is %s, but the provider now says %s: left as it is",
                      p.id, p.state, remote.status)
    elif remote.status == "succeeded" and remote.amount is not None and remote.amount != p.amount:
        log.error("card payment %d: the provider says %s was paid, we asked for %s: not booked, left "
                  "unknown for an operator", p.id, remote.amount, p.amount)
        _move(conn, p, "unknown", via, f"amount {remote.amount} differs from {p.amount}", now,
              next_check=now + LONGEST_WAIT, checks=p.checks + 1)
    elif remote.status == "succeeded":
        paid_at = remote.paid_at or now
        _move(conn, p, "succeeded", via, "", now, next_check=None, paid_at=paid_at)
        book_payment(conn, p.account, paid_at.astimezone(MOSCOW).date(), energy=p.energy, penalty=p.penalty,
                     key=p.ledger_key, source=f"card {p.provider}",
                     reason=f"card payment {p.id} in the customer account", author=AUTHOR)
        conn.execute(
            "INSERT INTO card_receipt (payment_id, issued_at, account, energy, penalty, amount, contact,"
            " contact_kind, supplier, provider, provider_payment_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (payment_id) DO NOTHING",
            (p.id, paid_at, p.account, p.energy, p.penalty, p.amount, p.contact, p.contact_kind,
             supplier, p.provider, p.provider_payment_id))
        booked = True
        log.info("card payment %d succeeded (%s): booked energy %s, penalty %s to account %s",
                 p.id, via, p.energy, p.penalty, p.account)
    elif remote.status == "failed":
        _move(conn, p, "failed", via, "", now, next_check=None)
    else:  # still pending: ask again later, later each time the janitor finds nothing new
        checks = p.checks + 1 if via == "reconcile" else p.checks
        _move(conn, p, "pending", via, "", now, next_check=now + backoff(checks), checks=checks)
    conn.commit()
    out = get(conn, payment_id)
    conn.commit()
    assert out is not None
    return out, booked


# --- the provider's callback --------------------------------------------------------------

def signature(key: bytes, body: bytes) -> str:
    """HMAC-SHA256 of the raw body, hex: what the provider puts in X-Payment-Signature."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def handle_callback(conn: Any, body: bytes, signed: str | None, settings: Settings, *,
                    now: datetime | None = None, client: str = "?") -> tuple[CardPayment, bool]:
    """Check a callback's signature over its raw body, then take its word (`apply_status`).

    A missing or wrong signature (or no key configured) is refused with 403
    and logged, without the key and without the body. A repeat of a
    callback already taken changes nothing.
    """
    key = settings.payment_hmac_key
    given = (signed or "").strip().lower().removeprefix("sha256=")
    if key is None:
        log.warning("card payment callback from %s refused: no AMR_PAYMENT_HMAC_KEY is configured", client)
        raise CallbackRefused(403, "bad_signature", "callbacks are refused: no signature key is configured")
    expected = signature(key.get_secret_value().encode(), body)
    if not given or not hmac.compare_digest(expected, given):
        log.warning("card payment callback from %s refused: %s signature (%d bytes)", client,
                    "no" if not given else "a wrong", len(body))
        raise CallbackRefused(403, "bad_signature", f"the {SIGNATURE_HEADER} header does not sign this body")
    try:
        remote = parse_provider_payment(json.loads(body))
    except (ValueError, ProviderUnavailable) as exc:
        log.warning("card payment callback from %s refused: %s", client, exc)
        raise CallbackRefused(422, "invalid_callback", f"the callback does not describe a payment: {exc}") from None
    row = conn.execute("SELECT id FROM card_payment WHERE provider = %s AND provider_payment_id = %s",
                       (settings.payment_provider_name, remote.id)).fetchone()
    if row is None:
        conn.commit()
        log.warning("card payment callback from %s for unknown provider payment %r", client, remote.id)
        raise CallbackRefused(404, "not_found", f"no card payment with provider id {remote.id!r}")
    return apply_status(conn, int(row[0]), remote, via="callback", now=now, supplier=settings.payment_supplier)


# --- the janitor ------------------------------------------------------------------------

@dataclass
class ReconcileResult:
    checked: int = 0
    succeeded: int = 0
    failed: int = 0
    still_open: int = 0
    no_answer: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def reconcile(conn: Any, provider: PaymentProvider, settings: Settings, *, now: datetime | None = None,
              limit: int = 100) -> ReconcileResult:
    """Ask the provider about every open payment whose check is due (`next_check_at`), at most `limit`.

    A payment the provider never confirmed is asked for again (by the same
    key: the one it may have made); one it has is asked its status. No row is
    locked while the provider is asked, only while its answer is applied.
    """
    now = now or datetime.now(UTC)
    due = [r[0] for r in conn.execute(
        "SELECT id FROM card_payment WHERE state IN ('created', 'pending', 'unknown') AND provider = %s"
        " AND coalesce(next_check_at, created_at) <= %s ORDER BY next_check_at NULLS FIRST, id LIMIT %s",
        (provider.name, now, limit)).fetchall()]
    conn.commit()
    out = ReconcileResult()
    for payment_id in due:
        p = get(conn, payment_id)
        conn.commit()
        if p is None or p.state not in OPEN:
            continue
        out.checked += 1
        if p.provider_payment_id is None:
            p = _ask_create(conn, provider, p, "reconcile", now, settings.payment_supplier)
            after = p.state
        else:
            try:
                remote = provider.status(p.provider_payment_id)
            except (ProviderUnavailable, ProviderRefused) as exc:
                locked = get(conn, p.id, lock=True)
                if locked is not None and locked.state in OPEN:
                    _move(conn, locked, "unknown", "reconcile", str(exc), now,
                          next_check=now + backoff(locked.checks), checks=locked.checks + 1)
                conn.commit()
                log.warning("card payment %d: no status from the provider: %s", p.id, exc)
                out.no_answer += 1
                continue
            after = apply_status(conn, p.id, remote, via="reconcile", now=now,
                                 supplier=settings.payment_supplier)[0].state
        if after == "succeeded":
            out.succeeded += 1
        elif after == "failed":
            out.failed += 1
        elif after == "unknown" and p.provider_payment_id is None:
            out.no_answer += 1
        else:
            out.still_open += 1
    return out


# --- what the customer sees -----------------------------------------------------------------

@dataclass(frozen=True)
class Receipt:
    payment_id: int
    number: int
    issued_at: datetime
    account: str
    energy: Decimal
    penalty: Decimal
    amount: Decimal
    contact: str
    contact_kind: str
    supplier: str
    provider: str
    provider_payment_id: str


def receipt_of(conn: Any, account: str, payment_id: int) -> Receipt | None:
    """The receipt of a card payment made in this account (through the portal view), or None."""
    row = conn.execute(
        "SELECT payment_id, number, issued_at, account, energy, penalty, amount, contact, contact_kind,"
        " supplier, provider, provider_payment_id FROM portal_card_receipt"
        " WHERE account = %s AND payment_id = %s", (account, payment_id)).fetchone()
    return Receipt(*row) if row else None


def rub(amount: Decimal) -> str:
    """1234.5 as «1 234,50 ₽», as a Russian reader writes it."""
    whole, _, kop = f"{amount.quantize(KOPECK):,.2f}".partition(".")
    return whole.replace(",", "\u00a0") + "," + kop + "\u00a0₽"


def receipt_html(r: Receipt) -> str:
    """A printable receipt, in Russian, with the fields of the 54-FZ electronic cheque."""
    at = r.issued_at.astimezone(MOSCOW)
    rows = [("Поставщик", r.supplier), ("Квитанция №", f"{r.number:08d}"),
            ("Дата и время оплаты", f"{at:%d.%m.%Y %H:%M} (МСК)"), ("Лицевой счёт", r.account)]
    items = []
    if r.energy:
        items.append(("Оплата электроэнергии", r.energy))
    if r.penalty:
        items.append(("Оплата пеней", r.penalty))
    where = "адрес электронной почты" if r.contact_kind == "email" else "номер телефона"
    tail = [("Итого оплачено", rub(r.amount)), ("Способ оплаты", "банковская карта, в личном кабинете"),
            ("Электронный чек направляется на", f"{where} {r.contact}"),
            ("Номер платежа у банка", f"{r.provider} {r.provider_payment_id}")]
    e = html.escape

    def tr(k: str, v: str) -> str:
        return f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>"

    return (
        "<!DOCTYPE html>\n<html lang=\"ru\"><head><meta charset=\"utf-8\">"
        f"<title>Квитанция об оплате № {r.number:08d}</title>"
        "<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}"
        "table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3em;"
        "border-bottom:1px solid #ccc}td.sum{text-align:right}@media print{a{display:none}}</style>"
        "</head><body>\n<h1>Квитанция об оплате</h1>\n<table>\n"
        + "\n".join(tr(k, v) for k, v in rows)
        + "\n</table>\n<h2>Что оплачено</h2>\n<table>\n"
        + "\n".join(f"<tr><th>{e(k)}</th><td class=\"sum\">{e(rub(v))}</td></tr>" for k, v in items)
        + "\n</table>\n<table>\n" + "\n".join(tr(k, v) for k, v in tail)
        + "\n</table>\n</body></html>\n")


def account_payments(conn: Any, account: str) -> list[dict[str, Any]]:
    """An account's payments for the customer, newest first: card ones, where the registry
    import is installed (view portal_registry_payment) those banks' registries brought, and
    (view portal_payment_proof) the ledger's other payments (source `other`).

    Each has its source (card, registry), status (a card payment's state;
    `succeeded` for a booked registry payment), amounts apart, the Moscow
    date it counts from, and whether a printable receipt exists (only card
    payments that succeeded: payments made in the account).
    """
    rows = conn.execute(
        "SELECT p.id::text, 'card', p.state, p.energy, p.penalty, p.amount,"
        " (p.paid_at AT TIME ZONE 'Europe/Moscow')::date, r.payment_id IS NOT NULL, p.created_at"
        " FROM portal_card_payment p LEFT JOIN portal_card_receipt r ON r.payment_id = p.id"
        " WHERE p.account = %s", (account,)).fetchall()
    if conn.execute("SELECT to_regclass('portal_registry_payment')").fetchone()[0] is not None:
        rows += conn.execute(
            "SELECT id::text, 'registry', 'succeeded', energy, penalty, amount, paid_on, false,"
            " created_at FROM portal_registry_payment WHERE account = %s", (account,)).fetchall()
    if conn.execute("SELECT to_regclass('portal_payment_proof')").fetchone()[0] is not None:
        # the ledger's payments that came neither by card nor by a registry (a cash desk, an operator's
        # booking; migration 021's view groups a payment's energy and penalty entries), so the history
        # shows every source
        rows += conn.execute(
            "SELECT first_entry::text, 'other', 'succeeded', energy, penalty, amount, paid_on, false,"
            " (paid_on::timestamp AT TIME ZONE 'Europe/Moscow') FROM portal_payment_proof"
            " WHERE account = %s AND payment NOT LIKE 'card:%%' AND payment NOT LIKE 'registry:%%'",
            (account,)).fetchall()
    rows.sort(key=lambda r: (r[6] or r[8].astimezone(MOSCOW).date(), r[8]), reverse=True)
    return [{"id": i, "source": src, "status": s, "energy": e, "penalty": pn, "amount": a, "paid_on": pd,
             "receipt": rc} for i, src, s, e, pn, a, pd, rc, _ in rows]
