"""The customer account in a real browser: headless Chromium from Debian's package, driven by Playwright.

One customer's whole way through the account, as a person clicks it: register
(both consents ticked, the captcha typed), read the confirmation letter from a
real SMTP server and open its link, log in, add two accounts by their last
payment, look at the automated one (zone chart, a bill, no readings form),
enter a reading on the manual one, pay at the simulated provider and come back
for the receipt. The portal runs under uvicorn with its pages as a role that is
only a member of amr_portal, as in production; the automated account's
consumption comes from 30-minute readings through the ingestion path and its
bill from the billing engine.

Screenshots of the main pages go to $AMR_TEST_SCREENSHOTS, else to the test's
own temporary directory (printed), so a person can look at what was tested.
The browser is never downloaded: without /usr/bin/chromium (`scripts/bootstrap`
installs it) the test fails saying so.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from pypdf import PdfReader

from adapters.reading import Reading
from amr.settings import Settings
from billing import ledger
from billing.engine import bill_period
from billing.tariffs import load_catalogue_file, store_catalogue
from collector.ingest.ingestor import Ingestor
from simulators.consumption import ConsumptionModel
from simulators.payment_provider import PaymentProviderSim
from tests.portal_kit import (
    CAPTCHA,
    PASSWORD,
    MailServer,
    Portal,
    drop_role,
    link_in,
    restricted_url,
)
from tests.test_billing import CATALOGUES, add_subscriber

CHROMIUM = Path("/usr/bin/chromium")
MSK = ZoneInfo("Europe/Moscow")
KEY = "browser-callback-key-7c2d"
OCT = date(2026, 10, 1)
TODAY = datetime.now(MSK).date()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's headless Chromium; its absence is a failure, not a skip."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/bootstrap does); "
                    "the browser tests never download a browser")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where the screenshots go: $AMR_TEST_SCREENSHOTS or the test's temporary directory."""
    out = Path(os.environ.get("AMR_TEST_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    print(f"screenshots of the customer account: {out}")
    return out


@pytest.fixture
def provider() -> Iterator[PaymentProviderSim]:
    sim = PaymentProviderSim("http://127.0.0.1:1/unset", KEY.encode()).start()  # callback set with the portal
    yield sim
    sim.close()


@pytest.fixture
def portal(pg_admin_url: str, db_url: str, mail: MailServer, provider: PaymentProviderSim) -> Iterator[Portal]:
    pages_url, role = restricted_url(pg_admin_url, db_url)
    p = Portal(pages_url, mail, portal_writer_url=db_url, payment_provider_url=provider.url,
               payment_provider_name="sim", payment_hmac_key=KEY, payment_break="",
               payment_supplier="Тестовый поставщик электроэнергии")
    provider.callback_url = f"{p.base}/payments/callback"
    yield p
    p.close()
    drop_role(pg_admin_url, role)


def seed(conn: psycopg.Connection, db_url: str) -> None:
    """Account 123 metered automatically (two days of 30-minute readings, billed); 456 read by hand."""
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    add_subscriber(conn, "123", "three_zone", meters=(("m-123", "2026-09-01T00:00+03:00", None),))
    conn.execute("UPDATE meter SET max_power_kw = 10 WHERE id = 'm-123'")
    conn.execute("INSERT INTO subscriber (account, metering, plan, category, area) VALUES"
                 " ('456', 'manual', 'single', 'electric_stove', 'rural')")
    conn.execute("INSERT INTO meter (id, account, adapter, max_power_kw, installed) VALUES"
                 " ('m-456', '456', 'manual', 10, '2026-01-01T00:00+03:00')")
    conn.execute("INSERT INTO reading (meter_id, register, ts, value) VALUES ('m-456', '1.8.0', %s, 1000)",
                 (datetime.now(UTC) - timedelta(days=40),))
    conn.commit()
    model = ConsumptionModel(seed=11)
    start = datetime(2026, 10, 1, tzinfo=MSK).astimezone(UTC)
    times = [start + timedelta(minutes=30 * i) for i in range(48 * 2 + 1)]  # 1 and 2 October, local
    with psycopg.connect(db_url) as ing_conn:
        result = Ingestor(ing_conn, Settings(database_url=db_url)).ingest(
            Reading("m-123", "1.8.0", t, model.energy_kwh(t), source="test") for t in times)
    assert result.accepted == len(times)
    assert bill_period(conn, OCT).billed == 1  # 456 has no October readings: held back
    ledger.book_payment(conn, "123", TODAY - timedelta(days=30), energy=Decimal("1500.00"),
                        key="cash:123-1", source="cash desk", reason="t", author="tests")
    ledger.book_payment(conn, "456", TODAY - timedelta(days=20), energy=Decimal("321.09"),
                        key="cash:456-1", source="cash desk", reason="t", author="tests")
    conn.commit()


def snap(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def add_account(page: Page, base: str, account: str, paid_on: date, amount: str) -> None:
    page.goto(f"{base}/accounts/add")
    page.fill("#account", account)
    page.fill("#paid_on", paid_on.isoformat())
    page.fill("#amount", amount)
    page.click("#add-account-submit")
    page.wait_for_url(f"{base}/accounts/{account.lstrip('0')}")


def test_a_customer_registers_links_two_accounts_reads_enters_and_pays(
        portal: Portal, browser: Browser, mail: MailServer, provider: PaymentProviderSim,
        conn: psycopg.Connection, db_url: str, shots: Path) -> None:
    # the browser is asked for after the portal, so it closes first, leaving no connection open
    seed(conn, db_url)
    base = portal.base
    context = browser.new_context(locale="ru-RU", viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(10_000)

    # registration: the form as a person fills it, both consents and the captcha
    page.goto(f"{base}/register")
    assert page.locator("img.captcha").is_visible()
    page.fill("#login", "petrova")
    page.fill("#password", PASSWORD)
    page.fill("#password2", PASSWORD)
    page.fill("#email", "petrova@example.ru")
    page.check("input[name=licence]")
    page.check("input[name=pd_consent]")
    page.fill("#captcha_answer", CAPTCHA)
    snap(page, shots, "01-register")
    page.click("#register button[type=submit]")
    page.wait_for_url(f"{base}/profile")
    assert "Email не подтвержден" in page.content()

    # the letter from the SMTP server; its link opened in the browser
    link = link_in(mail.wait_for("petrova@example.ru"))
    assert link.startswith(f"{base}/confirm?t=")
    page.goto(link)
    page.click("#confirm button[type=submit]")
    page.wait_for_url(f"{base}/profile")
    assert "Адрес электронной почты подтверждён." in page.content()
    assert "Email не подтвержден" not in page.content()
    snap(page, shots, "02-confirmed")

    # log out and in again
    page.click("header form[action='/logout'] button")
    page.wait_for_url(f"{base}/login")
    page.fill("#login", "petrova")
    page.fill("#password", PASSWORD)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{base}/")
    assert page.locator("#no-accounts").is_visible()

    # two accounts by their last payment (leading zeros do not count); both listed
    add_account(page, base, "000123", TODAY - timedelta(days=30), "1 500,00")
    add_account(page, base, "456", TODAY - timedelta(days=20), "321,09")
    page.goto(f"{base}/")
    assert page.locator("#accounts tr#account-123").is_visible()
    assert page.locator("#accounts tr#account-456").is_visible()
    snap(page, shots, "03-accounts")

    # the automated account: the zone chart and a bill, no readings form, readings arrive by themselves
    page.click("#account-123 a")
    page.wait_for_url(f"{base}/accounts/123")
    chart = page.locator("svg#monthly-chart")
    assert chart.is_visible()
    assert chart.locator(".zone-night").count() > 0 and chart.locator(".zone-peak").count() > 0
    assert page.locator("#bills tr#bill-2026-10").is_visible()
    assert page.locator("#metering-mode").get_attribute("data-metering") == "amr"
    assert page.locator("form.readings-form").count() == 0
    assert "поступают автоматически" in page.locator("#readings-auto").inner_text()
    snap(page, shots, "04-account-automated")
    page.click("#account-nav >> text=Показания")
    page.wait_for_url(f"{base}/accounts/123/readings")
    assert page.locator("main form").count() == 0
    assert "поступают автоматически" in page.locator("main #readings-auto").inner_text()
    snap(page, shots, "05-readings-automated")

    # the manual account: a reading entered and accepted
    page.goto(f"{base}/accounts/456")
    assert page.locator("#metering-mode").get_attribute("data-metering") == "manual"
    page.click("text=Заявить показания >> nth=-1")
    page.wait_for_url(f"{base}/accounts/456/readings")
    form = page.locator("#readings-form-m-456")
    form.locator("input[name='value_1.8.0']").fill("1100,5")
    form.locator("button[type=submit]").click()
    result = page.locator("#reading-result")
    assert result.get_attribute("data-result") == "accepted", result.inner_text()
    assert "1\u00a0100,50" in result.inner_text()
    snap(page, shots, "06-reading-accepted")
    stored = conn.execute("SELECT value FROM reading WHERE meter_id = 'm-456' AND source = 'portal'").fetchall()
    conn.commit()
    assert stored == [(Decimal("1100.5"),)]

    # payment: to the simulated provider and back to the account for the receipt
    page.goto(f"{base}/accounts/123/pay")
    page.fill("#energy", "250,50")
    page.fill("#penalty", "")
    page.check("#contact-email")
    page.fill("#email", "petrova@example.ru")
    snap(page, shots, "07-pay")
    page.click("#pay-submit")
    page.wait_for_url(f"{provider.url}/pay/*")
    assert "Оплата прошла." in page.content()
    snap(page, shots, "08-provider")
    page.goto(f"{base}/accounts/123/payments")
    assert "задержкой" in page.locator("#payments-note").inner_text()
    page.click("tr[id^='payment-card-'] a")
    page.wait_for_url(re.compile(re.escape(f"{base}/accounts/123/payments/") + r"\d+$"))
    deadline = time.monotonic() + 10  # the provider's callback may come a moment after the customer
    while page.locator("#payment-status").get_attribute("data-status") != "succeeded" \
            and time.monotonic() < deadline:
        time.sleep(0.2)
        page.reload()
    assert page.locator("#payment-status").get_attribute("data-status") == "succeeded"
    snap(page, shots, "09-payment")
    receipt = page.locator("#receipt-pdf")
    assert receipt.is_visible()
    pdf = context.request.get(base + str(receipt.get_attribute("href")))
    assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf"
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.body())).pages)
    assert "Квитанция об оплате" in text and "250,50" in text and "petrova@example.ru" in text
    context.close()
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "01-register.png", "02-confirmed.png", "03-accounts.png", "04-account-automated.png",
        "05-readings-automated.png", "06-reading-accepted.png", "07-pay.png", "08-provider.png",
        "09-payment.png"]
