"""Card payments over real HTTP: the API under uvicorn, the simulated provider, the real PostgreSQL.

The API and the simulated provider each listen on a free port of their own and
talk to each other as they would in production: the API creates payments at
the provider, the customer "pays" by opening the confirmation URL, the
provider sends its signed callback back to the API, and the janitor
(`billing.payments.reconcile`) asks the provider over HTTP when no callback
comes. Nothing of ours is mocked; the clock is injected where the test is
about time (the bank's break, the back-off).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from amr.settings import Settings
from billing import ledger, payments
from billing.api import TokenStore, create_app, hash_token
from simulators.payment_provider import PaymentProviderSim
from tests.conftest import free_port
from tests.test_billing import add_subscriber

KEY = "callback-key-not-for-logs-7f3a"
TOKEN = "card-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOKENS = f'[[token]]\nname = "card"\nsha256 = "{hash_token(TOKEN)}"\naccounts = ["123", "456"]\n'
MSK = ZoneInfo("Europe/Moscow")
BREAK_MESSAGE = ("Оплата недоступна с 23:50 до 00:10 по московскому времени: технический перерыв банка. "
                 "Повторите после 00:10.")


class Stack:
    """The API on a free port and the simulated provider calling back to it."""

    def __init__(self, db_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sim = PaymentProviderSim(f"{self.url}/payments/callback", KEY.encode(), late_s=0.5, hang_s=5).start()
        self.settings = Settings(database_url=db_url, payment_provider_url=self.sim.url,
                                 payment_provider_name="sim", payment_hmac_key=KEY,
                                 payment_supplier="Тестовый поставщик электроэнергии")
        self.app = create_app(self.settings, TokenStore.from_toml(TOKENS))
        # the same provider as configured, with a short timeout, so a provider that hangs costs a second
        self.provider = payments.HttpProvider(self.sim.url, "sim", timeout_s=1.0)
        self.app.state.payment_provider = self.provider
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def pay(self, energy: str = "100.50", penalty: str = "12.30", key: str = "k-1", account: str = "123",
            **contact: str) -> httpx.Response:
        body = {"energy": energy, "penalty": penalty, **(contact or {"email": "Ivan@Example.RU"})}
        return self.http.post(f"/accounts/{account}/payments", json=body,
                              headers={**AUTH, "Idempotency-Key": key})

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.sim.close()


@pytest.fixture
def stack(db_url: str, conn: psycopg.Connection) -> Iterator[Stack]:
    add_subscriber(conn, "123", "single")
    add_subscriber(conn, "456", "single")
    s = Stack(db_url)
    yield s
    s.close()


def wait_for(what: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def state(conn: psycopg.Connection, payment_id: str | int) -> str:
    row = conn.execute("SELECT state FROM card_payment WHERE id = %s", (int(payment_id),)).fetchone()
    conn.commit()
    return str(row[0])


def provider_id(conn: psycopg.Connection, payment_id: str | int) -> str:
    row = conn.execute("SELECT provider_payment_id FROM card_payment WHERE id = %s", (int(payment_id),)).fetchone()
    conn.commit()
    return str(row[0])


def card_entries(conn: psycopg.Connection) -> list[tuple[str, str, Decimal, str]]:
    rows = conn.execute("SELECT account, component, amount, idempotency_key FROM ledger_entry"
                        " WHERE kind = 'payment' ORDER BY idempotency_key").fetchall()
    conn.commit()
    return [tuple(r) for r in rows]


def signed(body: bytes, key: str = KEY) -> dict[str, str]:
    return {"X-Payment-Signature": hmac.new(key.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}


# --- the whole way, and what the ledger and the receipt say -------------------------------

def test_a_paid_payment_books_energy_and_penalty_apart_and_has_a_receipt(stack: Stack, conn) -> None:
    r = stack.pay(energy="100.50", penalty="12.30", email="Ivan@Example.RU")
    assert r.status_code == 201, r.text
    p = r.json()
    assert (p["status"], p["energy"], p["penalty"], p["amount"]) == ("pending", "100.50", "12.30", "112.80")
    assert p["confirmation_url"].startswith(stack.sim.url + "/pay/")
    # before paying: nothing booked, no receipt
    assert card_entries(conn) == []
    assert stack.http.get(f"/accounts/123/payments/{p['id']}/receipt", headers=AUTH).status_code == 404

    assert httpx.get(p["confirmation_url"]).status_code == 200  # the customer pays at the provider
    wait_for(lambda: state(conn, p["id"]) == "succeeded")
    pid = provider_id(conn, p["id"])
    assert card_entries(conn) == [("123", "energy", Decimal("-100.50"), f"card:sim:{pid}:energy"),
                                  ("123", "penalty", Decimal("-12.30"), f"card:sim:{pid}:penalty")]
    assert ledger.balance(conn, "123") == {"energy": Decimal("-100.50"), "penalty": Decimal("-12.30")}
    paid_at = conn.execute("SELECT paid_at FROM card_payment WHERE id = %s", (int(p["id"]),)).fetchone()[0]
    booked = {r[0] for r in conn.execute("SELECT booked_on FROM ledger_entry").fetchall()}
    assert booked == {paid_at.astimezone(MSK).date()}  # the Moscow date it was paid
    history = [(e[1], e[2], e[3]) for e in payments.events(conn, int(p["id"]))]
    assert history == [(None, "created", "api"), ("created", "pending", "api"), ("pending", "succeeded", "callback")]

    listed = stack.http.get("/accounts/123/payments", headers=AUTH).json()
    assert [(x["id"], x["source"], x["status"], x["energy"], x["penalty"], x["receipt"])
            for x in listed["payments"]] == [(p["id"], "card", "succeeded", "100.50", "12.30",
                                              f"/accounts/123/payments/{p['id']}/receipt")]
    assert listed["note"]

    receipt = stack.http.get(listed["payments"][0]["receipt"], headers=AUTH)
    assert receipt.status_code == 200 and receipt.headers["content-type"].startswith("text/html")
    text = receipt.text
    for expected in ("Квитанция об оплате", "Тестовый поставщик электроэнергии", "Оплата электроэнергии",
                     "100,50\u00a0₽", "Оплата пеней", "12,30\u00a0₽", "112,80\u00a0₽", "Ivan@example.ru",
                     f"{paid_at.astimezone(MSK):%d.%m.%Y %H:%M}", "Лицевой счёт", pid):
        assert expected in text, expected
    row = conn.execute("SELECT amount, energy, penalty, contact, contact_kind FROM card_receipt").fetchall()
    assert row == [(Decimal("112.80"), Decimal("100.50"), Decimal("12.30"), "Ivan@example.ru", "email")]
    # the receipt is this account's: another account the token holds gets the same 404 as a stranger
    assert stack.http.get(f"/accounts/456/payments/{p['id']}/receipt", headers=AUTH).status_code == 404


def test_a_repeated_idempotency_key_returns_the_same_payment(stack: Stack, conn) -> None:
    first = stack.pay(key="same", energy="50", penalty="0", phone="8 (900) 123-45-67")
    again = stack.pay(key="same", energy="50", penalty="0", phone="+79001234567")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert len(stack.sim.payments) == 1  # the provider was not asked for a second one
    assert conn.execute("SELECT count(*), min(contact) FROM card_payment").fetchone() == (1, "+79001234567")
    clash = stack.pay(key="same", energy="51", penalty="0", phone="+79001234567")
    assert clash.status_code == 422 and clash.json()["code"] == "idempotency_key_reused"
    # the same key on another account is another payment
    other = stack.pay(key="same", energy="50", penalty="0", account="456", phone="+79001234567")
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    missing = stack.http.post("/accounts/123/payments", json={"energy": "1"}, headers=AUTH)
    assert missing.status_code == 422 and "Idempotency-Key" in missing.json()["message"]


@pytest.mark.parametrize(("body", "words"), [
    ({"energy": "0", "penalty": "0", "email": "a@b.ru"}, "Укажите сумму"),
    ({"energy": "-1", "email": "a@b.ru"}, "energy"),
    ({"energy": "1.001", "email": "a@b.ru"}, "energy"),
    ({"energy": "1", "email": "a@b.ru", "phone": "+79001234567"}, "одно из двух"),
    ({"energy": "1"}, "одно из двух"),
    ({"energy": "1", "email": "not-an-address"}, "почты"),
    ({"energy": "1", "phone": "12-34"}, "телефона"),
])
def test_a_payment_the_rules_refuse_is_not_started(stack: Stack, conn, body, words) -> None:
    r = stack.http.post("/accounts/123/payments", json=body, headers={**AUTH, "Idempotency-Key": "x"})
    assert r.status_code == 422 and words in r.json()["message"], r.text
    assert conn.execute("SELECT count(*) FROM card_payment").fetchone() == (0,)
    assert stack.sim.payments == {}


# --- the signature ---------------------------------------------------------------------------

def test_a_callback_with_a_bad_signature_is_refused_and_logged(stack: Stack, conn, caplog) -> None:
    p = stack.pay().json()
    pid = provider_id(conn, p["id"])
    body = json.dumps({"id": pid, "status": "succeeded", "amount": "112.80",
                       "paid_at": datetime.now(UTC).isoformat()}).encode()
    caplog.set_level(logging.WARNING, logger="amr.payments")
    for headers in (signed(body, "another-key"), {"Content-Type": "application/json"},
                    {**signed(body + b" "), "Content-Type": "application/json"}):
        r = httpx.post(f"{stack.url}/payments/callback", content=body, headers=headers)
        assert r.status_code == 403 and r.json()["code"] == "bad_signature", r.text
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3 and all("signature" in m for m in refusals), refusals
    assert KEY not in caplog.text
    assert state(conn, p["id"]) == "pending" and card_entries(conn) == []
    # the same body, signed with the shared key, is taken: the signature was all that was wrong
    r = httpx.post(f"{stack.url}/payments/callback", content=body, headers=signed(body))
    assert r.status_code == 200 and r.json() == {"payment": p["id"], "status": "succeeded"}
    assert len(card_entries(conn)) == 2


def test_a_signed_callback_with_another_amount_is_not_booked(stack: Stack, conn, caplog) -> None:
    p = stack.pay().json()
    body = json.dumps({"id": provider_id(conn, p["id"]), "status": "succeeded", "amount": "1.00"}).encode()
    r = httpx.post(f"{stack.url}/payments/callback", content=body, headers=signed(body))
    assert r.status_code == 200 and r.json()["status"] == "unknown"
    assert card_entries(conn) == []
    assert "the provider says 1.00 was paid, we asked for 112.80" in caplog.text


def test_a_callback_for_no_payment_of_ours_is_404(stack: Stack) -> None:
    body = b'{"id": "sim-nobody", "status": "succeeded", "amount": "1.00"}'
    assert httpx.post(f"{stack.url}/payments/callback", content=body, headers=signed(body)).status_code == 404
    body = b'{"no": "payment"}'
    assert httpx.post(f"{stack.url}/payments/callback", content=body, headers=signed(body)).status_code == 422


# --- callbacks twice, late, never; the janitor ------------------------------------------------

def test_a_double_callback_and_racing_janitors_book_once(stack: Stack, conn, db_url) -> None:
    stack.sim.set_behaviour("double")
    p = stack.pay().json()
    later = datetime.now(UTC) + timedelta(hours=2)

    def janitor() -> None:
        with psycopg.connect(db_url) as c:
            payments.reconcile(c, stack.provider, stack.settings, now=later)

    httpx.get(p["confirmation_url"])
    janitors = [threading.Thread(target=janitor) for _ in range(3)]
    for t in janitors:
        t.start()
    for t in janitors:
        t.join(20)
    wait_for(lambda: len(stack.sim.callbacks) == 2)
    assert [c.answer for c in stack.sim.callbacks] == [200, 200]  # a repeat is taken, and changes nothing
    assert state(conn, p["id"]) == "succeeded"
    assert [(e[1], e[2]) for e in card_entries(conn)] == [("energy", Decimal("-100.50")),
                                                           ("penalty", Decimal("-12.30"))]
    assert conn.execute("SELECT count(*) FROM card_receipt").fetchone() == (1,)
    moves = conn.execute("SELECT count(*) FROM card_payment_event WHERE state_to = 'succeeded'").fetchone()
    assert moves == (1,)


def test_a_lost_callback_is_recovered_by_reconciliation(stack: Stack, conn) -> None:
    stack.sim.set_behaviour("never")
    started = datetime.now(UTC)
    p = stack.pay().json()
    httpx.get(p["confirmation_url"])
    time.sleep(0.3)
    assert stack.sim.callbacks == [] and state(conn, p["id"]) == "pending"
    # not due yet: the first check is a minute after the provider took the payment
    assert payments.reconcile(conn, stack.provider, stack.settings, now=started).checked == 0
    result = payments.reconcile(conn, stack.provider, stack.settings, now=started + timedelta(minutes=2))
    assert (result.checked, result.succeeded) == (1, 1)
    assert state(conn, p["id"]) == "succeeded" and len(card_entries(conn)) == 2
    assert ("GET", f"/payments/{provider_id(conn, p['id'])}") in stack.sim.requests
    # once settled, the janitor leaves it alone
    assert payments.reconcile(conn, stack.provider, stack.settings, now=started + timedelta(days=1)).checked == 0


def test_a_late_callback_after_reconciliation_changes_nothing(stack: Stack, conn) -> None:
    stack.sim.set_behaviour("late")  # 0.5 s
    started = datetime.now(UTC)
    p = stack.pay().json()
    httpx.get(p["confirmation_url"])
    assert payments.reconcile(conn, stack.provider, stack.settings,
                              now=started + timedelta(minutes=5)).succeeded == 1
    wait_for(lambda: stack.sim.callbacks)
    assert stack.sim.callbacks[0].answer == 200
    assert len(card_entries(conn)) == 2
    assert [e[3] for e in payments.events(conn, int(p["id"]))] == ["api", "api", "reconcile"]


def test_an_unpaid_payment_is_asked_about_less_and_less_often(stack: Stack, conn) -> None:
    started = datetime.now(UTC)
    p = stack.pay().json()  # never paid: the provider keeps saying pending
    now = started
    waits = []
    for _ in range(9):
        due = conn.execute("SELECT next_check_at FROM card_payment").fetchone()[0]
        conn.commit()
        waits.append(round((due - now).total_seconds() / 60))
        now = due
        assert payments.reconcile(conn, stack.provider, stack.settings, now=now).still_open == 1
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert state(conn, p["id"]) == "pending"


def test_a_failed_payment_books_nothing_and_has_no_receipt(stack: Stack, conn) -> None:
    stack.sim.set_behaviour("fail")
    p = stack.pay().json()
    httpx.get(p["confirmation_url"])
    wait_for(lambda: state(conn, p["id"]) == "failed")
    assert card_entries(conn) == []
    assert stack.http.get(f"/accounts/123/payments/{p['id']}/receipt", headers=AUTH).status_code == 404
    # a repeat of the key returns the failed payment; a new attempt needs a new key
    again = stack.pay()
    assert again.status_code == 200 and again.json()["status"] == "failed"


def test_a_provider_that_times_out_leaves_the_payment_unknown_until_asked_again(stack: Stack, conn) -> None:
    stack.sim.set_behaviour("timeout")
    started = datetime.now(UTC)
    r = stack.pay()
    assert r.status_code == 202 and r.json()["status"] == "unknown" and r.json()["confirmation_url"] is None
    assert len(stack.sim.payments) == 1  # the provider made it; only its answer was lost
    made = next(iter(stack.sim.payments))
    stack.sim.set_behaviour("succeed")
    stack.sim.set_behaviour("succeed", made)
    result = payments.reconcile(conn, stack.provider, stack.settings, now=started + timedelta(minutes=2))
    assert result.checked == 1
    p = r.json()
    assert state(conn, p["id"]) == "pending" and provider_id(conn, p["id"]) == made
    assert len(stack.sim.payments) == 1  # asked again by the same key: the same payment, not a second
    again = stack.pay()
    assert again.status_code == 200 and again.json()["confirmation_url"].endswith(made)
    httpx.get(again.json()["confirmation_url"])
    wait_for(lambda: state(conn, p["id"]) == "succeeded")
    assert len(card_entries(conn)) == 2


# --- the bank's technical break -------------------------------------------------------------

@pytest.mark.parametrize(("local", "refused"), [
    ("23:55", True), ("23:50", True), ("00:00", True), ("00:09:59", True),
    ("23:49:59", False), ("00:10", False), ("12:00", False),
])
def test_a_payment_in_the_banks_break_is_refused_in_russian(stack: Stack, conn, local, refused) -> None:
    at = datetime.combine(datetime(2026, 12, 2).date(), datetime.strptime(local, "%H:%M:%S" if local.count(":") == 2
                                                                          else "%H:%M").time(), MSK)
    stack.app.state.clock = lambda: at.astimezone(UTC)
    r = stack.pay()
    if refused:
        assert r.status_code == 409, r.text
        assert r.json() == {"code": "technical_break", "message": BREAK_MESSAGE}
        assert conn.execute("SELECT count(*) FROM card_payment").fetchone() == (0,)
        assert stack.sim.payments == {}
    else:
        assert r.status_code == 201, r.text


def test_the_break_is_configurable() -> None:
    payments.check_break(datetime(2026, 12, 2, 20, 55, tzinfo=UTC), "")  # none configured
    with pytest.raises(payments.TechnicalBreak, match=r"с 01:00 до 02:30 .* после 02:30"):
        payments.check_break(datetime(2026, 12, 2, 23, 0, tzinfo=UTC), "01:00-02:30")  # 02:00 Moscow
    payments.check_break(datetime(2026, 12, 2, 23, 30, tzinfo=UTC), "01:00-02:30")  # 02:30 Moscow: over


# --- the list, the portal role, the command -------------------------------------------------

def test_the_portal_role_reads_card_payments_only_through_views(stack: Stack, conn) -> None:
    stack.pay()
    conn.execute("SET ROLE amr_portal")
    assert conn.execute("SELECT count(*) FROM portal_card_payment").fetchone() == (1,)
    conn.execute("SELECT * FROM portal_card_receipt")
    for sql in ("SELECT * FROM card_payment", "SELECT * FROM card_receipt", "SELECT * FROM card_payment_event"):
        conn.rollback()
        conn.execute("SET ROLE amr_portal")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)
    conn.rollback()
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        conn.execute("UPDATE card_payment_event SET detail = 'x'")
    conn.rollback()


def test_amr_card_list_and_reconcile(stack: Stack, conn, monkeypatch, capsys) -> None:
    from amr.cli import main
    from amr.settings import get_settings

    stack.sim.set_behaviour("never")
    p = stack.pay().json()
    httpx.get(p["confirmation_url"])
    conn.execute("UPDATE card_payment SET next_check_at = now() - interval '1 second'")
    conn.commit()
    monkeypatch.setenv("AMR_DATABASE_URL", stack.settings.database_url)
    monkeypatch.setenv("AMR_PAYMENT_PROVIDER_URL", stack.sim.url)
    monkeypatch.setenv("AMR_PAYMENT_PROVIDER_NAME", "sim")
    get_settings.cache_clear()
    try:
        assert main(["card", "reconcile", "--once", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"checked": 1, "succeeded": 1, "failed": 0,
                                                       "still_open": 0, "no_answer": 0}
        assert main(["card", "list", "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["id"], r["state"], r["amount"]) for r in rows] == [(int(p["id"]), "succeeded", "112.80")]
        assert "ivan" not in json.dumps(rows).lower()  # operators' lists carry no e-mail
        monkeypatch.setenv("AMR_PAYMENT_PROVIDER_URL", "")
        get_settings.cache_clear()
        assert main(["card", "reconcile", "--once"]) == 2
        assert "AMR_PAYMENT_PROVIDER_URL" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
    assert len(card_entries(conn)) == 2


def test_registry_payments_are_listed_beside_card_ones_without_a_receipt(stack: Stack, conn) -> None:
    stack.pay(energy="10", penalty="0")
    file_id = conn.execute(
        "INSERT INTO registry_file (name, checksum, source, layout, encoding, rows, total, booked, duplicate,"
        " unmatched, refused, imported_by) VALUES ('r.txt', %s, 'sber', 'default', 'cp1251', 2, 300, 1, 0, 1,"
        " 0, 'test') RETURNING id", ("0" * 64,)).fetchone()[0]
    for op, account, status in (("op-1", "123", "booked"), ("op-2", None, "unmatched")):
        conn.execute(
            "INSERT INTO registry_payment (file_id, line, source, operation_id, account, account_given, paid_on,"
            " energy, status) VALUES (%s, 1, 'sber', %s, %s, '00123', '2026-11-20', 150, %s)",
            (file_id, op, account, status))
    conn.commit()
    listed = stack.http.get("/accounts/123/payments", headers=AUTH).json()["payments"]
    assert [(x["source"], x["status"], x["amount"], x["receipt"]) for x in listed] == [
        ("card", "pending", "10.00", None), ("registry", "succeeded", "150.00", None)]  # a bank's: no receipt
    assert listed[1]["paid_on"] == "2026-11-20"


def test_the_simulator_runs_as_a_program() -> None:
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "simulators.payment_provider", "--port", str(port),
                             "--callback", "http://127.0.0.1:9/payments/callback", "--key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "payment provider simulator on" in proc.stdout.readline()
        provider = payments.HttpProvider(f"http://127.0.0.1:{port}", "sim", timeout_s=5)
        made = provider.create("key-1", Decimal("5.00"), "test")
        assert made.status == "pending" and provider.create("key-1", Decimal("5.00"), "test").id == made.id
        httpx.get(made.confirmation_url or "")
        assert provider.status(made.id).status == "succeeded"
        with pytest.raises(payments.ProviderRefused):
            provider.status("sim-nobody")
    finally:
        proc.terminate()
        proc.wait(5)


# --- a property: any sequence of callbacks, repeats included ------------------------------

@hyp_settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.sampled_from(["pending", "succeeded", "failed"]), min_size=1, max_size=6))
def test_any_sequence_of_signed_callbacks_books_the_first_final_word_once(stack: Stack, conn, calls) -> None:
    """Callbacks in any order and number for one payment: its first final status is the one taken,
    a succeeded payment is booked exactly once, and nothing else is ever booked."""
    p = stack.pay(key=f"prop-{uuid.uuid4()}").json()
    pid = provider_id(conn, p["id"])
    for status in calls:
        body = json.dumps({"id": pid, "status": status, "amount": "112.80",
                           "paid_at": datetime.now(UTC).isoformat() if status == "succeeded" else None}).encode()
        r = httpx.post(f"{stack.url}/payments/callback", content=body, headers=signed(body))
        assert r.status_code == 200, r.text
    first_final = next((s for s in calls if s != "pending"), None)
    assert state(conn, p["id"]) == (first_final or "pending")
    booked = conn.execute("SELECT component, amount FROM ledger_entry WHERE idempotency_key LIKE %s"
                          " ORDER BY component", (f"card:sim:{pid}:%",)).fetchall()
    conn.commit()
    want = [("energy", Decimal("-100.50")), ("penalty", Decimal("-12.30"))] if first_final == "succeeded" else []
    assert [tuple(b) for b in booked] == want
