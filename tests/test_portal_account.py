"""The account pages over real HTTP: the portal under uvicorn, the simulated payment provider, real PostgreSQL.

Two users with sessions of their own (made through migration 020's functions,
as a login would make them); alice links two accounts by their last payment
through the "Добавить абонента" form, bob links a third. Pages are fetched as
plain HTTP with no JavaScript: what a test finds (forms, tables, the SVG
chart) is in the HTML the server sent. PDFs are opened with pypdf and their
text read back. The payment goes to the simulated provider over HTTP and its
signed callback comes back to the portal.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
import uvicorn
from pypdf import PdfReader

from amr.settings import Settings
from billing import ledger
from billing.engine import bill_period
from billing.tariffs import load_catalogue_file, store_catalogue
from portal.app import create_app
from portal.formatting import MONTHS
from simulators.payment_provider import PaymentProviderSim
from tests.conftest import free_port
from tests.test_billing import CATALOGUES, add_subscriber, add_usage

MSK = ZoneInfo("Europe/Moscow")
KEY = "portal-callback-key-5b1e"
TODAY = datetime.now(MSK).date()
OCT = date(2026, 10, 1)


def login_session(conn: psycopg.Connection, login: str) -> tuple[int, str]:
    """A user and a session of theirs, as registration and login make them (migration 020's functions)."""
    uid = conn.execute("SELECT portal_user_create(%s, %s, %s, NULL, 'v1', 'v1')",
                       (login, "$argon2id$v=19$m=65536,t=3,p=4$test$test", f"{login}@example.ru")).fetchone()[0]
    conn.execute("UPDATE portal_user SET email_confirmed_at = now() WHERE id = %s", (uid,))
    token = secrets.token_urlsafe(32)
    conn.execute("SELECT portal_session_create(%s, %s, %s, false, '127.0.0.1', 'tests')",
                 (uid, hashlib.sha256(token.encode()).digest(), datetime.now(UTC) + timedelta(hours=2)))
    conn.commit()
    return int(uid), token


def seed(conn: psycopg.Connection) -> None:
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    add_subscriber(conn, "123", "three_zone")  # automated metering
    conn.execute("INSERT INTO subscriber (account, metering, plan, category, area) VALUES"
                 " ('456', 'manual', 'single', 'electric_stove', 'rural')")
    conn.execute("INSERT INTO meter (id, account, adapter, max_power_kw, installed) VALUES"
                 " ('m-456', '456', 'manual', 10, '2026-01-01T00:00+03:00')")
    conn.commit()
    add_subscriber(conn, "789", "single")
    for acc in ("123", "789"):
        add_usage(conn, f"m-{acc}", OCT, night="10", peak="2", half_peak="3")
        add_usage(conn, f"m-{acc}", OCT + timedelta(days=1), night="5", peak="1.5")
        add_usage(conn, f"m-{acc}", TODAY.replace(day=1), night="4", half_peak="2")
    conn.execute("INSERT INTO reading (meter_id, register, ts, value) VALUES"
                 " ('m-456', '1.8.0', %s, 1000)", (datetime.now(UTC) - timedelta(days=40),))
    conn.commit()
    bill_period(conn, OCT)
    add_usage(conn, "m-123", date(2026, 10, 30), night="1.5")  # late data: October's bill gets version 2
    assert bill_period(conn, OCT).new_versions == 1
    # payments: 123's last one came through a bank 5 days ago, so its proof is the card payment before it
    ledger.book_payment(conn, "123", TODAY - timedelta(days=30), energy=Decimal("1400.00"),
                        penalty=Decimal("100.00"), key="cash:123-1", source="cash desk", reason="t",
                        author="tests")
    # a bank's registry payment, as billing/registry.py records and books one
    file_id = conn.execute(
        "INSERT INTO registry_file (name, checksum, source, layout, encoding, rows, total, booked, duplicate,"
        " unmatched, refused, imported_by) VALUES ('r.txt', %s, 'sber', 'default', 'cp1251', 1, 700, 1, 0, 0,"
        " 0, 'test') RETURNING id", ("0" * 64,)).fetchone()[0]
    conn.execute("INSERT INTO registry_payment (file_id, line, source, operation_id, account, account_given,"
                 " paid_on, energy, status) VALUES (%s, 1, 'sber', 'op-9', '123', '000123', %s, 700, 'booked')",
                 (file_id, TODAY - timedelta(days=5)))
    ledger.book_payment(conn, "123", TODAY - timedelta(days=5), energy=Decimal("700.00"),
                        key="registry:sber:op-9", source="registry:sber", reason="t", author="tests")
    ledger.book_payment(conn, "456", TODAY - timedelta(days=20), energy=Decimal("321.09"),
                        key="cash:1", source="cash desk", reason="t", author="tests")
    ledger.book_payment(conn, "789", TODAY - timedelta(days=3), energy=Decimal("55.00"),
                        key="cash:789-1", source="cash desk", reason="t", author="tests")
    conn.commit()


class Portal:
    """The portal on a free port, with the simulated provider calling back to it."""

    def __init__(self, db_url: str, writer_url: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sim = PaymentProviderSim(f"{self.url}/payments/callback", KEY.encode()).start()
        self.settings = Settings(database_url=db_url, portal_secure_cookies=False, portal_base_url=self.url,
                                 payment_provider_url=self.sim.url, payment_provider_name="sim",
                                 payment_hmac_key=KEY, payment_supplier="Тестовый поставщик электроэнергии",
                                 payment_break="23:50-00:10", portal_writer_url=writer_url)
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def client(self, token: str | None) -> httpx.Client:
        cookies = {"amr_session": token} if token else {}
        return httpx.Client(base_url=self.url, cookies=cookies, timeout=15, follow_redirects=False)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sim.close()


def csrf(page: httpx.Response) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, "the page has no form with a CSRF token"
    return m.group(1)


def post_form(c: httpx.Client, form_page: str, action: str, data: dict[str, str]) -> httpx.Response:
    """Open the page the form is on, take its CSRF token, post the form: what a browser does."""
    page = c.get(form_page)
    assert page.status_code == 200, page.text
    return c.post(action, data={"csrf_token": csrf(page), **data})


def link(c: httpx.Client, account: str, paid_on: date, amount: str) -> httpx.Response:
    return post_form(c, "/accounts/add", "/accounts/add",
                     {"account": account, "paid_on": paid_on.isoformat(), "amount": amount})


@pytest.fixture
def portal(db_url: str, conn: psycopg.Connection) -> Iterator[Portal]:
    seed(conn)
    p = Portal(db_url)
    yield p
    p.close()


@pytest.fixture
def users(portal: Portal, conn: psycopg.Connection) -> dict[str, tuple[int, httpx.Client]]:
    out = {}
    for login in ("alice", "bob", "carol"):
        uid, token = login_session(conn, login)
        out[login] = (uid, portal.client(token))
    yield out
    for _, c in out.values():
        c.close()


@pytest.fixture
def linked(users: dict[str, tuple[int, httpx.Client]]) -> dict[str, tuple[int, httpx.Client]]:
    alice, bob = users["alice"][1], users["bob"][1]
    # leading zeros are not significant; 123's last payment is a bank's of 5 days ago: the card one before it
    r = link(alice, "000123", TODAY - timedelta(days=30), "1 500,00")
    assert r.status_code == 303 and r.headers["location"] == "/accounts/123", r.text
    r = link(alice, "456", TODAY - timedelta(days=20), "321.09")
    assert r.status_code == 303, r.text
    r = link(bob, "789", TODAY - timedelta(days=3), "55")
    assert r.status_code == 303, r.text
    return users


def audit_actions(conn: psycopg.Connection, user_id: int) -> list[str]:
    rows = conn.execute("SELECT action FROM portal_audit_log WHERE user_id = %s ORDER BY id", (user_id,)).fetchall()
    conn.commit()
    return [r[0] for r in rows]


# --- linking --------------------------------------------------------------------------------

def test_two_accounts_linked_by_last_payment_both_listed(linked, conn) -> None:
    uid, alice = linked["alice"]
    page = alice.get("/")
    assert page.status_code == 200
    assert '<table id="accounts">' in page.text
    assert 'id="account-123"' in page.text and 'id="account-456"' in page.text
    assert 'id="account-789"' not in page.text
    assert audit_actions(conn, uid).count("link_added") == 2
    assert conn.execute("SELECT account FROM portal_account_link WHERE user_id = %s ORDER BY account",
                        (uid,)).fetchall() == [("123",), ("456",)]


def test_the_recent_third_party_payment_is_not_the_proof(users) -> None:
    alice = users["alice"][1]
    # the registry payment of 5 days ago is the last one, but it is not what is asked for
    r = link(alice, "123", TODAY - timedelta(days=5), "700.00")
    assert r.status_code == 422
    assert "Не удалось добавить лицевой счёт" in r.text


def test_wrong_proof_says_the_same_for_a_missing_account(users) -> None:
    alice = users["alice"][1]
    wrong = link(alice, "123", TODAY - timedelta(days=30), "1499.99")
    missing = link(alice, "99999", TODAY - timedelta(days=30), "1500.00")
    assert wrong.status_code == missing.status_code == 422

    def error(r: httpx.Response) -> str:
        return re.search(r'id="add-account-error"[^>]*>([^<]+)<', r.text).group(1)

    assert error(wrong) == error(missing)


def test_wrong_proofs_are_throttled_even_a_right_one_after(users, conn) -> None:
    uid, alice = users["carol"]
    for i in range(5):
        r = link(alice, "456", TODAY - timedelta(days=20), f"{i + 1}.00")
        assert r.status_code == 422
    r = link(alice, "456", TODAY - timedelta(days=20), "321.09")  # right, but the window is used up
    assert r.status_code == 429
    assert "Слишком много попыток" in r.text
    assert "Retry-After" in r.headers
    assert "link_throttled" in audit_actions(conn, uid)
    assert conn.execute("SELECT count(*) FROM portal_account_link WHERE user_id = %s", (uid,)).fetchone()[0] == 0


# --- the account page ------------------------------------------------------------------------

def test_account_page_has_zone_chart_table_balance_due_date(linked) -> None:
    alice = linked["alice"][1]
    page = alice.get("/accounts/123")
    assert page.status_code == 200, page.text
    t = page.text
    assert "<script" not in t
    svg = re.search(r'<svg[^>]*id="monthly-chart".*?</svg>', t, re.S).group(0)
    assert '<title id="monthly-chart-title">' in svg and "<desc" in svg
    assert 'class="zone-night"' in svg and 'class="zone-peak"' in svg and 'class="zone-half_peak"' in svg
    assert "10.2026" in svg  # an axis label
    table = re.search(r'<table id="monthly-table">.*?</table>', t, re.S).group(0)
    assert "октябрь 2026" in table and "16,5" in table  # night 10 + 5 + 1.5
    assert 'data-metering="amr"' in t
    assert re.search(r'id="balance-energy".*?₽', t, re.S)
    assert "Переплата за электроэнергию не засчитывается в оплату пеней" in t
    assert 'id="due-date"' in t and "15.11.2026" in t  # October's bill is due on 15 November (177-FZ)
    assert 'id="readings-auto"' in t


def test_daily_page_chart_and_table(linked) -> None:
    alice = linked["alice"][1]
    page = alice.get("/accounts/123/daily?month=2026-10")
    assert page.status_code == 200
    assert re.search(r'<svg[^>]*id="daily-chart"', page.text)
    table = re.search(r'<table id="daily-table">.*?</table>', page.text, re.S).group(0)
    assert "01.10.2026" in table and "02.10.2026" in table


def test_bill_page_and_pdf(linked) -> None:
    alice = linked["alice"][1]
    page = alice.get("/accounts/123/bills/2026-10")
    assert page.status_code == 200, page.text
    assert 'id="bill-versions"' in page.text and 'id="bill-lines"' in page.text
    v2 = re.search(r'<article class="version" id="bill-version-2">.*?</article>', page.text, re.S).group(0)
    assert "Что изменилось" in v2 and "ночь" in v2 and "15,000" in v2 and "16,500" in v2
    assert 'id="bill-version-1"' in page.text
    pdf = alice.get("/accounts/123/bills/2026-10/pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "Счёт за электроэнергию" in text
    assert "октябрь 2026" in text and "123" in text
    assert "15.11.2026" in text
    assert "ночь" in text and "пик" in text
    assert "Версии счёта" in text  # both versions listed, with their reasons


# --- readings --------------------------------------------------------------------------------

def test_manual_reading_accepted_and_refused_with_russian_reason(linked, conn) -> None:
    uid, alice = linked["alice"]
    page = alice.get("/accounts/456/readings")
    assert '<form id="readings-form-m-456"' in page.text
    r = post_form(alice, "/accounts/456/readings", "/accounts/456/readings",
                  {"meter": "m-456", "value_1.8.0": "1100,5", "date": TODAY.isoformat()})
    assert r.status_code == 200, r.text
    assert 'data-result="accepted"' in r.text
    assert f"будут учтены в счёте за {MONTHS[TODAY.month - 1]} {TODAY.year}" in r.text
    assert conn.execute("SELECT value FROM reading WHERE meter_id = 'm-456' ORDER BY ts DESC LIMIT 1"
                        ).fetchone()[0] == Decimal("1100.5")
    conn.commit()
    r = post_form(alice, "/accounts/456/readings", "/accounts/456/readings",
                  {"meter": "m-456", "value_1.8.0": "900", "date": TODAY.isoformat()})
    assert r.status_code == 422
    assert 'data-result="refused"' in r.text
    assert "показание меньше переданного ранее" in r.text
    assert audit_actions(conn, uid)[-2:] == ["reading_entered", "reading_refused"]


def test_a_correction_in_the_same_month_is_taken_and_shown(linked, conn) -> None:
    alice = linked["alice"][1]
    # a reading taken yesterday, then the corrected one today (both go through the same checks; a
    # correction is a later reading, so it may not be below the one it corrects)
    for value, day in (("1100", TODAY - timedelta(days=1)), ("1102,25", TODAY)):
        r = post_form(alice, "/accounts/456/readings", "/accounts/456/readings",
                      {"meter": "m-456", "value_1.8.0": value, "date": day.isoformat()})
        assert 'data-result="accepted"' in r.text, r.text
    page = alice.get("/accounts/456/readings")
    assert "Предыдущее: 1\u00a0102,25" in page.text
    account = alice.get("/accounts/456")
    assert 'id="readings-counted"' in account.text and "1\u00a0102,25" in account.text
    assert conn.execute("SELECT count(*) FROM reading WHERE meter_id = 'm-456' AND source = 'portal'"
                        ).fetchone()[0] == 2


def test_automated_account_has_no_form_and_refuses_the_post(linked, conn) -> None:
    alice = linked["alice"][1]
    page = alice.get("/accounts/123/readings")
    assert page.status_code == 200
    assert "<form" not in page.text.split("<main>")[1].split("</main>")[0]
    assert "поступают автоматически" in page.text
    r = alice.post("/accounts/123/readings", data={"csrf_token": csrf(page), "meter": "m-123",
                                                   "value_1.8.0": "5000"})
    assert r.status_code == 409
    assert "автоматически" in r.text
    assert conn.execute("SELECT count(*) FROM reading WHERE meter_id = 'm-123'").fetchone()[0] == 0


def test_readings_post_without_csrf_is_refused(linked, conn) -> None:
    alice = linked["alice"][1]
    r = alice.post("/accounts/456/readings", data={"meter": "m-456", "value_1.8.0": "2000"})
    assert r.status_code == 403
    r = alice.post("/accounts/456/readings", data={"csrf_token": "forged", "meter": "m-456", "value_1.8.0": "2000"})
    assert r.status_code == 403
    assert conn.execute("SELECT count(*) FROM reading WHERE meter_id = 'm-456' AND value = 2000").fetchone()[0] == 0
    for action, data in (("/accounts/add", {"account": "789", "paid_on": TODAY.isoformat(), "amount": "55"}),
                         ("/accounts/123/pay", {"energy": "10", "email": "a@b.ru"}),
                         ("/accounts/123/unlink", {})):
        assert alice.post(action, data={"csrf_token": "forged", **data}).status_code == 403, action
        assert alice.post(action, data=data).status_code == 403, action
    assert conn.execute("SELECT count(*) FROM card_payment").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM portal_account_link").fetchone()[0] == 3


# --- another user's account --------------------------------------------------------------------

ROUTES_GET = ["/accounts/{a}", "/accounts/{a}/daily", "/accounts/{a}/bills", "/accounts/{a}/bills/2026-10",
              "/accounts/{a}/bills/2026-10/pdf", "/accounts/{a}/payments", "/accounts/{a}/payments/1",
              "/accounts/{a}/payments/1/receipt.pdf", "/accounts/{a}/pay", "/accounts/{a}/readings"]
ROUTES_POST = ["/accounts/{a}/readings", "/accounts/{a}/pay", "/accounts/{a}/unlink"]


def test_another_users_account_answers_like_a_missing_one(linked, conn) -> None:
    alice = linked["alice"][1]
    token = csrf(alice.get("/"))
    for route in ROUTES_GET:
        theirs = alice.get(route.format(a="789"))
        missing = alice.get(route.format(a="99999"))
        assert theirs.status_code == missing.status_code == 404, route
        assert theirs.text == missing.text, route
    for route in ROUTES_POST:
        data = {"csrf_token": token, "meter": "m-789", "value_1.8.0": "1", "energy": "1", "email": "a@b.ru"}
        theirs = alice.post(route.format(a="789"), data=data)
        missing = alice.post(route.format(a="99999"), data=data)
        assert theirs.status_code == missing.status_code == 404, route
        assert theirs.text == missing.text, route
    assert conn.execute("SELECT count(*) FROM card_payment WHERE account = '789'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM portal_account_link WHERE account = '789'").fetchone()[0] == 1


def test_without_a_session_pages_go_to_login(portal) -> None:
    with portal.client(None) as anon:
        r = anon.get("/accounts/123")
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")


# --- payment and receipt ----------------------------------------------------------------------------

def test_pay_through_the_provider_and_print_the_receipt(linked, conn) -> None:
    uid, alice = linked["alice"]
    form = alice.get("/accounts/123/pay")
    assert '<form id="pay-form"' in form.text and 'name="penalty"' in form.text
    assert "с 23:50 до 00:10" in form.text
    r = alice.post("/accounts/123/pay", data={"csrf_token": csrf(form), "energy": "250,50", "penalty": "0",
                                              "contact": "email", "email": "alice@example.ru",
                                              "key": re.search(r'name="key" value="([^"]+)"', form.text).group(1)})
    assert r.status_code == 303, r.text
    confirmation = r.headers["location"]
    assert confirmation.startswith(linked and r.headers["location"].split("/pay/")[0])
    paid = httpx.get(confirmation, timeout=10)  # the customer pays at the provider's page
    assert "Оплата прошла" in paid.text
    assert f'id="return" href="{str(alice.base_url).rstrip("/")}/accounts/123/payments"' in paid.text  # and back
    pid = conn.execute("SELECT id FROM card_payment WHERE account = '123'").fetchone()[0]
    conn.commit()
    deadline = time.monotonic() + 10
    while True:
        page = alice.get(f"/accounts/123/payments/{pid}")
        if 'data-status="succeeded"' in page.text or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 'data-status="succeeded"' in page.text
    assert 'id="receipt-pdf"' in page.text
    history = alice.get("/accounts/123/payments")
    assert 'id="payments-note"' in history.text and "задержкой" in history.text
    assert f'id="payment-card-{pid}" data-status="succeeded"' in history.text
    # every source: the card payment, the bank's registry payment, the cash desk's one
    assert 'id="payment-registry-' in history.text and "через банк или платёжного агента" in history.text
    assert 'id="payment-other-' in history.text and "в кассе или другим способом" in history.text
    assert history.text.count('<tr id="payment-') == 3
    pdf = alice.get(f"/accounts/123/payments/{pid}/receipt.pdf")
    assert pdf.status_code == 200
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "Квитанция об оплате" in text
    assert "250,50" in text and "alice@example.ru" in text and "Тестовый поставщик" in text
    assert "payment_started" in audit_actions(conn, uid)


def test_a_declined_payment_shows_its_status_and_has_no_receipt(linked, portal, conn) -> None:
    alice = linked["alice"][1]
    portal.sim.set_behaviour("fail")
    form = alice.get("/accounts/456/pay")
    r = alice.post("/accounts/456/pay", data={"csrf_token": csrf(form), "energy": "10", "penalty": "",
                                              "contact": "phone", "phone": "8 900 123-45-67"})
    assert r.status_code == 303
    httpx.get(r.headers["location"], timeout=10)
    pid = conn.execute("SELECT id FROM card_payment WHERE account = '456'").fetchone()[0]
    conn.commit()
    page = alice.get(f"/accounts/456/payments/{pid}")
    assert 'data-status="failed"' in page.text and "отклонён" in page.text
    assert "receipt.pdf" not in page.text
    assert alice.get(f"/accounts/456/payments/{pid}/receipt.pdf").status_code == 404
    assert conn.execute("SELECT contact FROM card_payment WHERE id = %s", (pid,)).fetchone()[0] == "+79001234567"


def test_no_receipt_for_a_payment_not_made_in_the_account(linked) -> None:
    bob = linked["bob"][1]
    page = bob.get("/accounts/789/payments")
    assert page.status_code == 200
    assert 'id="payment-other-' in page.text and "55,00" in page.text  # a ledger payment of another source
    assert "receipt.pdf" not in page.text  # the card payment of the seed is no card_payment of the account


def test_the_banks_break_is_explained_and_refuses(linked, portal) -> None:
    alice = linked["alice"][1]
    portal.app.state.clock = lambda: datetime(2026, 12, 2, 23, 55, tzinfo=MSK).astimezone(UTC)
    form = alice.get("/accounts/123/pay")
    assert 'id="break-now"' in form.text and "технический перерыв банка" in form.text
    r = alice.post("/accounts/123/pay", data={"csrf_token": csrf(form), "energy": "10", "email": "a@b.ru",
                                              "contact": "email"})
    assert r.status_code == 422 and "технический перерыв банка" in r.text


def test_pages_render_without_javascript(linked) -> None:
    alice = linked["alice"][1]
    for path in ("/", "/accounts/add", "/accounts/123", "/accounts/123/daily", "/accounts/123/bills",
                 "/accounts/123/payments", "/accounts/123/pay", "/accounts/456/readings"):
        page = alice.get(path)
        assert page.status_code == 200, path
        assert "<script" not in page.text, path
        assert "<table" in page.text or "<form" in page.text, path


def test_the_portal_role_links_only_through_the_function(db_url, conn) -> None:
    """amr_portal may read links and the proof view, and write links only by portal_link_account."""
    seed(conn)
    uid, _ = login_session(conn, "dave")
    role = f"portal_web_{secrets.token_hex(4)}"
    conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE amr_portal")
    conn.commit()
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    info["user"] = role
    try:
        with psycopg.connect(psycopg.conninfo.make_conninfo(**info)) as web_conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                web_conn.execute("INSERT INTO portal_account_link (user_id, account) VALUES (%s, '456')", (uid,))
            web_conn.rollback()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                web_conn.execute("SELECT * FROM ledger_entry")
            web_conn.rollback()
            assert web_conn.execute("SELECT amount FROM portal_payment_proof WHERE account = '456'").fetchall() \
                == [(Decimal("321.09"),)]
            assert web_conn.execute("SELECT portal_link_account(%s, '456')", (uid,)).fetchone()[0] is True
            assert web_conn.execute("SELECT portal_link_account(%s, '456')", (uid,)).fetchone()[0] is False
            web_conn.commit()
            assert web_conn.execute("SELECT account FROM portal_account_link WHERE user_id = %s",
                                    (uid,)).fetchall() == [("456",)]
            assert web_conn.execute("SELECT portal_unlink_account(%s, '456')", (uid,)).fetchone()[0] is True
            web_conn.commit()
    finally:
        conn.execute(f"DROP ROLE {role}")
        conn.commit()


def test_the_pages_role_writes_readings_and_payments_only_through_the_writer(db_url, conn, pg_admin_url) -> None:
    """Pages read as a role that is only a member of amr_portal; readings and payments go through the writer."""
    from tests.portal_kit import drop_role, restricted_url

    seed(conn)
    pages_url, role = restricted_url(pg_admin_url, db_url)
    p = Portal(pages_url, writer_url=db_url)
    try:
        uid, token = login_session(conn, "dora")
        c = p.client(token)
        assert link(c, "456", TODAY - timedelta(days=20), "321.09").status_code == 303
        assert link(c, "123", TODAY - timedelta(days=30), "1500").status_code == 303
        r = post_form(c, "/accounts/456/readings", "/accounts/456/readings",
                      {"meter": "m-456", "value_1.8.0": "1200", "date": TODAY.isoformat()})
        assert r.status_code == 200 and 'data-result="accepted"' in r.text, r.text[:500]
        assert conn.execute("SELECT value FROM reading WHERE meter_id = 'm-456' ORDER BY ts DESC LIMIT 1"
                            ).fetchone()[0] == Decimal("1200")
        conn.commit()
        form = c.get("/accounts/123/pay")
        r = c.post("/accounts/123/pay", data={"csrf_token": csrf(form), "energy": "10,00", "penalty": "0",
                                              "contact": "email", "email": "dora@example.ru",
                                              "key": re.search(r'name="key" value="([^"]+)"', form.text).group(1)})
        assert r.status_code == 303 and "/pay/" in r.headers["location"], r.text[:500]
        assert conn.execute("SELECT count(*) FROM card_payment WHERE account = '123'").fetchone()[0] == 1
        conn.commit()
        assert audit_actions(conn, uid)[-2:] == ["reading_entered", "payment_started"]
        with psycopg.connect(pages_url, autocommit=True) as pages:  # the pages' role itself cannot
            for sql in ("INSERT INTO reading (meter_id, register, ts, value) VALUES ('m-456', '1.8.0', now(), 1300)",
                        "UPDATE card_payment SET state = 'succeeded'", "DELETE FROM ledger_entry"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    pages.execute(sql)
        c.close()
    finally:
        p.close()
        drop_role(pg_admin_url, role)
