"""The pages of a linked account: the list, "Добавить абонента", consumption, bills, payments, readings.

Every route under /accounts/{account} first asks `portal.linking.linked_account`
whether the logged-in user linked that account; an account the user did not
link, a number that is no account and a malformed number all get the one
404 page (`portal.web.not_found`), the same status and the same body. Every
POST carries the CSRF token (`portal.web.csrf_protect`). Links, readings and
payments are written to the audit log.

What the pages show comes from `billing.account_data` (the same queries as
the JSON API), `billing.payments` (card payments, receipts, the bank's break)
and `billing.penalties` (the due date). Charts are SVG drawn here
(portal/charts.py) with a table beside each; documents are PDF
(portal/pdf.py). No page needs JavaScript.

Ids the browser tests rely on: #accounts (the list), #add-account (its form),
#account-summary, #balance, #due-date, #readings-status, #monthly-chart,
#monthly-table, #daily-chart, #daily-table, #bills, #bill-versions,
#payments, #payments-note, #pay-form, #payment-status, #readings-form (a
form per meter: #readings-form-<meter>), #readings-auto, #reading-result.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from billing import account_data, payments
from portal import charts, linking, web
from portal import formatting as fmt
from portal.reasons import reject_text, reject_texts
from portal.web import CurrentUser, PortalUser

log = logging.getLogger("amr.portal")

router = APIRouter()
Csrf = [Depends(web.csrf_protect)]
THIRD_PARTY_NOTE = ("Платежи через банки, почту и платёжных агентов появляются здесь с задержкой в несколько "
                    "дней — после того как банк передаст реестр платежей. Квитанцию для печати можно получить "
                    "только по платежам, сделанным в личном кабинете.")
OVERPAYMENT_NOTE = "Переплата за электроэнергию не засчитывается в оплату пеней: пени оплачиваются отдельно."


# --- what every page needs ----------------------------------------------------------------

def now_of(request: Request) -> datetime:
    """Now, by the app's clock when a test set one (app.state.clock), else the system's."""
    clock = getattr(request.app.state, "clock", None)
    now: datetime = clock() if clock is not None else datetime.now(UTC)
    return now


def today_of(request: Request) -> date:
    return now_of(request).astimezone(fmt.MOSCOW).date()


def provider_of(request: Request) -> Any:
    """The card payment provider (AMR_PAYMENT_PROVIDER_URL), made once per app; None: card payments off."""
    state = request.app.state
    if not hasattr(state, "payment_provider"):
        state.payment_provider = payments.provider_from(web.settings_of(request))
    return state.payment_provider


def _own(conn: Any, user: PortalUser, account: str) -> account_data.Subscriber:
    sub = linking.linked_account(conn, user.id, account)
    if sub is None:
        raise web.not_found()
    return sub


def _month_start(d: date) -> date:
    return d.replace(day=1)


def _add_months(d: date, n: int) -> date:
    m = d.year * 12 + d.month - 1 + n
    return date(m // 12, m % 12 + 1, 1)


def _parse_month(text: str | None, default: date) -> date:
    if not text:
        return default
    try:
        y, m = text.split("-")
        return date(int(y), int(m), 1)
    except ValueError:
        raise web.not_found() from None


def _due(period: date) -> date | None:
    from billing.penalties import default_rules

    try:
        return default_rules().due(period)
    except Exception:  # a rules file without a rule for this period: no date rather than no page
        log.warning("no due-date rule for %s", period)
        return None


def _rows(per: dict[Any, dict[str, Decimal]]) -> list[dict[str, Any]]:
    return [{"key": k, **v} for k, v in per.items()]


# --- the list and "Добавить абонента" ----------------------------------------------------

@router.get("/")
def account_list(request: Request, user: CurrentUser) -> Response:
    today = today_of(request)
    with web.db(request) as conn:
        accounts = []
        for acc in linking.linked_accounts(conn, user.id):
            sub = account_data.subscriber(conn, acc)
            if sub is None:
                continue
            accounts.append({"sub": sub, "balance": account_data.balance(conn, acc, today)})
    return web.render(request, "account_list.html", accounts=accounts)


@router.get("/accounts/add")
def add_form(request: Request, user: CurrentUser) -> Response:
    return web.render(request, "account_add.html", form={}, error=None, days=linking.THIRD_PARTY_DAYS)


@router.post("/accounts/add", dependencies=Csrf)
def add_account(request: Request, user: CurrentUser, account: Annotated[str, Form(max_length=40)] = "",
                paid_on: Annotated[str, Form(max_length=20)] = "",
                amount: Annotated[str, Form(max_length=40)] = "") -> Response:
    form = {"account": account, "paid_on": paid_on, "amount": amount}
    try:
        acc = linking.parse_account(account)
        day = linking.parse_day(paid_on)
        money = linking.parse_amount(amount)
    except linking.ProofFormError as exc:
        return web.render(request, "account_add.html", status_code=422, form=form, error=str(exc),
                          days=linking.THIRD_PARTY_DAYS)
    keys = [(f"link:user:{user.id}", linking.USER_LIMIT, linking.USER_WINDOW_S),
            (f"link-account:{acc}", linking.ACCOUNT_LIMIT, linking.ACCOUNT_WINDOW_S),
            (f"link-ip:{web.client_ip(request)}", linking.IP_LIMIT, linking.IP_WINDOW_S)]
    with web.db(request) as conn:
        try:
            # every attempt counts here (a right proof too), beside the wrong-proof counts below
            web.rate_limit(conn, f"link-any:user:{user.id}", linking.ANY_LIMIT, linking.ANY_WINDOW_S)
            for key, limit, window in keys:
                web.rate_check(conn, key, limit, window)
        except web.RateLimited:
            web.audit(conn, user.id, "link_throttled", {"account": acc}, request)
            conn.commit()
            raise
        if not linking.proof_holds(conn, acc, day, money, today_of(request)):
            web.audit(conn, user.id, "link_refused", {"account": acc}, request)
            for key, limit, window in keys:
                try:
                    web.rate_limit(conn, key, limit, window)
                except web.RateLimited:
                    pass  # counted; the next attempt is refused by rate_check
            return web.render(request, "account_add.html", status_code=422, form=form,
                              error=linking.WRONG_PROOF, days=linking.THIRD_PARTY_DAYS)
        new = linking.link(conn, user.id, acc)
        web.audit(conn, user.id, "link_added" if new else "link_repeated", {"account": acc}, request)
    flash = f"Лицевой счёт {acc} добавлен." if new else f"Лицевой счёт {acc} уже добавлен."
    return web.redirect(f"/accounts/{acc}", flash=flash)


@router.post("/accounts/{account}/unlink", dependencies=Csrf)
def unlink_account(request: Request, user: CurrentUser, account: str) -> Response:
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        linking.unlink(conn, user.id, sub.account)
        web.audit(conn, user.id, "link_removed", {"account": sub.account}, request)
    return web.redirect("/", flash=f"Лицевой счёт {sub.account} удалён из списка.")


# --- the account page -----------------------------------------------------------------------

def _readings_status(conn: Any, sub: account_data.Subscriber, today: date) -> dict[str, Any]:
    """Whether this month's readings arrived, and how the last bill found the volume."""
    start = datetime.combine(today.replace(day=1), time(0), fmt.MOSCOW).astimezone(UTC)
    got = account_data.readings_since(conn, sub.account, start)
    return {"month": today.replace(day=1), "readings": got, "received": bool(got),
            "deadline": today.replace(day=25)}


@router.get("/accounts/{account}")
def account_page(request: Request, user: CurrentUser, account: str) -> Response:
    today = today_of(request)
    this = today.replace(day=1)
    first = _add_months(this, -11)
    settings = web.settings_of(request)
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        acc = sub.account
        meters = account_data.meters(conn, acc)
        bal = account_data.balance(conn, acc, today)
        monthly = account_data.monthly_usage(conn, acc, first, _add_months(this, 1), settings.timezone)
        bills = account_data.bill_summaries(conn, acc)
        status = _readings_status(conn, sub, today)
        last_bill = account_data.bill_versions(conn, acc, _parse_month(bills[0].period, this))[-1] if bills else None
    months = []
    m = first
    while m <= this:
        months.append((f"{m:%Y-%m}", monthly.get(f"{m:%Y-%m}")))
        m = _add_months(m, 1)
    bars = [charts.Bar(fmt.month_short(k), v or {}) for k, v in months]
    chart = charts.stacked_bars(bars, chart_id="monthly-chart", title=f"Потребление по месяцам, лицевой счёт {acc}",
                                desc=charts.describe(bars, "Потребление по месяцам и зонам суток"))
    due_period = _parse_month(bills[0].period, this) if bills else None
    return web.render(request, "account.html", sub=sub, meters=meters, balance=bal,
                      debt={k: max(v, Decimal(0)) for k, v in bal.items()}, chart=chart,
                      months=[(k, v) for k, v in months if v], bills=bills[:3], status=status,
                      last_bill=last_bill, due_period=due_period,
                      due=_due(due_period) if due_period else None, note=OVERPAYMENT_NOTE)


@router.get("/accounts/{account}/daily")
def daily_page(request: Request, user: CurrentUser, account: str, month: str | None = None) -> Response:
    today = today_of(request)
    first = _parse_month(month, today.replace(day=1))
    last = _add_months(first, 1) - timedelta(days=1)
    settings = web.settings_of(request)
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        per = account_data.daily_usage(conn, sub.account, first, last, settings.timezone)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    bars = [charts.Bar(f"{d:%d}", per.get(d, {})) for d in days]
    chart = charts.stacked_bars(bars, chart_id="daily-chart", title=f"Потребление по дням, {fmt.month(first)}",
                                desc=charts.describe(bars, f"Потребление по дням за {fmt.month(first)}"))
    return web.render(request, "daily.html", sub=sub, month=first, chart=chart,
                      days=[(d, per[d]) for d in days if d in per],
                      prev=f"{_add_months(first, -1):%Y-%m}", next=f"{_add_months(first, 1):%Y-%m}")


# --- bills -----------------------------------------------------------------------------------

@router.get("/accounts/{account}/bills")
def bills_page(request: Request, user: CurrentUser, account: str) -> Response:
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        bills = account_data.bill_summaries(conn, sub.account)
    return web.render(request, "bills.html", sub=sub, bills=bills)


def _bill(request: Request, user: PortalUser, account: str, period: str
          ) -> tuple[account_data.Subscriber, date, list[account_data.BillVersion]]:
    p = _parse_month(period, date.min)
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        versions = account_data.bill_versions(conn, sub.account, p)
    if not versions:
        raise web.not_found()
    return sub, p, versions


@router.get("/accounts/{account}/bills/{period}")
def bill_page(request: Request, user: CurrentUser, account: str, period: str) -> Response:
    sub, p, versions = _bill(request, user, account, period)
    return web.render(request, "bill.html", sub=sub, period=p, versions=versions, latest=versions[-1],
                      due=_due(p))


@router.get("/accounts/{account}/bills/{period}/pdf")
def bill_pdf(request: Request, user: CurrentUser, account: str, period: str) -> Response:
    from portal.pdf import bill_pdf as make

    sub, p, versions = _bill(request, user, account, period)
    body = make(supplier=web.settings_of(request).payment_supplier, account=sub.account, period=p,
                versions=versions, due=_due(p))
    return Response(body, media_type="application/pdf", headers={
        "Content-Disposition": f'inline; filename="bill-{sub.account}-{p:%Y-%m}.pdf"'})


# --- payments --------------------------------------------------------------------------------

@router.get("/accounts/{account}/payments")
def payments_page(request: Request, user: CurrentUser, account: str) -> Response:
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        rows = payments.account_payments(conn, sub.account)
    return web.render(request, "payments.html", sub=sub, payments=rows, note=THIRD_PARTY_NOTE)


def _card_payment(conn: Any, acc: str, payment: str) -> payments.CardPayment:
    if not payment.isdigit() or len(payment) > 18:
        raise web.not_found()
    p = payments.get(conn, int(payment))
    if p is None or p.account != acc:
        raise web.not_found()
    return p


@router.get("/accounts/{account}/payments/{payment}")
def payment_page(request: Request, user: CurrentUser, account: str, payment: str) -> Response:
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        # the payment's own row (its contact, its confirmation URL) is in card_payment, which only the
        # writing role reads: the pages' role sees the portal_card_payment view, without those columns
        with web.writer_db(request, conn) as wconn:
            p = _card_payment(wconn, sub.account, payment)
    provider = provider_of(request)
    if p.state in payments.OPEN and p.provider_payment_id and provider is not None:
        # the result page asks the provider, as the janitor would: a lost callback does not leave it pending
        try:
            remote = provider.status(p.provider_payment_id)
        except (payments.ProviderUnavailable, payments.ProviderRefused) as exc:
            log.info("card payment %d: no status from the provider for its result page: %s", p.id, exc)
        else:
            with web.writer_db(request) as conn:
                p, _ = payments.apply_status(conn, p.id, remote, via="reconcile", now=now_of(request),
                                             supplier=web.settings_of(request).payment_supplier)
    with web.db(request) as conn:
        receipt = payments.receipt_of(conn, sub.account, p.id)
    return web.render(request, "payment.html", sub=sub, p=p, receipt=receipt)


@router.get("/accounts/{account}/payments/{payment}/receipt.pdf")
def receipt_pdf(request: Request, user: CurrentUser, account: str, payment: str) -> Response:
    from portal.pdf import receipt_pdf as make

    with web.db(request) as conn:
        sub = _own(conn, user, account)
        receipt = payments.receipt_of(conn, sub.account, int(payment)) if payment.isdigit() and len(payment) < 19 \
            else None
    if receipt is None:
        raise web.not_found()
    return Response(make(receipt), media_type="application/pdf", headers={
        "Content-Disposition": f'inline; filename="receipt-{receipt.number:08d}.pdf"'})


@router.get("/accounts/{account}/pay")
def pay_form(request: Request, user: CurrentUser, account: str) -> Response:
    today = today_of(request)
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        bal = account_data.balance(conn, sub.account, today)
    return _pay_page(request, user, sub, bal, form={
        "energy": fmt.amount_field(max(bal["energy"], Decimal(0))),
        "penalty": fmt.amount_field(max(bal["penalty"], Decimal(0))),
        "email": user.email, "phone": "", "contact": "email"}, error=None)


def _pay_page(request: Request, user: PortalUser, sub: account_data.Subscriber, bal: dict[str, Decimal], *,
              form: dict[str, str], error: str | None, status_code: int = 200) -> Response:
    try:
        payments.check_break(now_of(request), web.settings_of(request).payment_break)
        in_break = None
    except payments.TechnicalBreak as exc:
        in_break = str(exc)
    window = payments.technical_break(web.settings_of(request).payment_break)
    return web.render(request, "pay.html", status_code=status_code, sub=sub, balance=bal, form=form, error=error,
                      in_break=in_break, window=window, note=OVERPAYMENT_NOTE, key=secrets.token_urlsafe(18),
                      available=provider_of(request) is not None)


def _amount(text: str, what: str) -> Decimal:
    clean = (text or "0").strip().replace("\u00a0", "").replace(" ", "").replace(",", ".") or "0"
    try:
        return Decimal(clean)
    except InvalidOperation:
        raise payments.PaymentRefused(f"Сумма оплаты {what} указана неверно: рубли и копейки, например 1234,56.") \
            from None


@router.post("/accounts/{account}/pay", dependencies=Csrf)
def start_payment(request: Request, user: CurrentUser, account: str,
                  energy: Annotated[str, Form(max_length=20)] = "0",
                  penalty: Annotated[str, Form(max_length=20)] = "0",
                  contact: Annotated[str, Form(max_length=10)] = "email",
                  email: Annotated[str, Form(max_length=254)] = "",
                  phone: Annotated[str, Form(max_length=32)] = "",
                  key: Annotated[str, Form(max_length=64)] = "") -> Response:
    today = today_of(request)
    form = {"energy": energy, "penalty": penalty, "email": email, "phone": phone, "contact": contact}
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        bal = account_data.balance(conn, sub.account, today)
    try:
        e, pn = _amount(energy, "за электроэнергию"), _amount(penalty, "пеней")
        with web.writer_db(request) as conn:
            p, new = payments.start_payment(
                conn, provider_of(request), web.settings_of(request), account=sub.account,
                key=f"portal:{user.id}:{key or secrets.token_urlsafe(18)}", energy=e, penalty=pn,
                email=email if contact != "phone" else None, phone=phone if contact == "phone" else None,
                now=now_of(request),
                return_url=f"{web.settings_of(request).portal_base_url.rstrip('/')}/accounts/{sub.account}/payments")
            web.audit(conn, user.id, "payment_started" if new else "payment_repeated",
                      {"account": sub.account, "payment": p.id, "energy": str(p.energy),
                       "penalty": str(p.penalty), "state": p.state}, request)
    except payments.PaymentRefused as exc:
        with web.db(request) as conn:
            web.audit(conn, user.id, "payment_refused", {"account": sub.account, "code": exc.code}, request)
        return _pay_page(request, user, sub, bal, form=form, error=str(exc), status_code=422)
    if p.state == "pending" and p.confirmation_url:
        return RedirectResponse(p.confirmation_url, status_code=303)
    return web.redirect(f"/accounts/{sub.account}/payments/{p.id}")


@router.post("/payments/callback")
async def payment_callback(request: Request) -> Response:
    """The provider's signed callback (no session, no CSRF: the HMAC over the body is its credential)."""
    from starlette.concurrency import run_in_threadpool

    body = await request.body()
    signed = request.headers.get(payments.SIGNATURE_HEADER)
    client = web.client_ip(request)

    def handle() -> tuple[int, dict[str, str]]:
        with web.writer_db(request) as conn:
            try:
                p, _ = payments.handle_callback(conn, body, signed, web.settings_of(request), now=now_of(request),
                                                client=client)
            except payments.CallbackRefused as exc:
                return exc.status, {"code": exc.code, "message": str(exc)}
        return 200, {"payment": str(p.id), "status": p.state}

    from fastapi.responses import JSONResponse

    status, data = await run_in_threadpool(handle)
    return JSONResponse(data, status)


# --- readings ("Заявить") ----------------------------------------------------------------------

def _readings_page(request: Request, conn: Any, sub: account_data.Subscriber, *, result: dict[str, Any] | None,
                   status_code: int = 200, values: dict[str, str] | None = None) -> Response:
    today = today_of(request)
    registers = account_data.entry_registers(conn, sub.account, sub.plan) if sub.metering == "manual" else []
    status = _readings_status(conn, sub, today)
    latest = {(m.meter_id, v.register): v for m in account_data.meters(conn, sub.account) for v in m.registers}
    return web.render(request, "readings.html", status_code=status_code, sub=sub, registers=registers,
                      latest=latest, status=status, result=result, values=values or {}, today=today)


@router.get("/accounts/{account}/readings")
def readings_form(request: Request, user: CurrentUser, account: str) -> Response:
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        return _readings_page(request, conn, sub, result=None)


@router.post("/accounts/{account}/readings", dependencies=Csrf)
async def enter_readings(request: Request, user: CurrentUser, account: str) -> Response:
    from starlette.concurrency import run_in_threadpool

    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    return await run_in_threadpool(_enter, request, user, account, fields)


def _enter(request: Request, user: PortalUser, account: str, fields: dict[str, str]) -> Response:
    settings = web.settings_of(request)
    now = now_of(request)
    with web.db(request) as conn:
        sub = _own(conn, user, account)
        if sub.metering != "manual":
            web.audit(conn, user.id, "reading_refused", {"account": sub.account, "code": "readings_entry_disabled"},
                      request)
            conn.commit()
            raise web.PortalError(409, "Показания передаются автоматически", account_data.ENTRY_DISABLED)
        meter_id = fields.get("meter", "")
        allowed = dict(account_data.entry_registers(conn, sub.account, sub.plan))
        if meter_id not in allowed:
            return _readings_page(request, conn, sub, status_code=422, values=fields, result={
                "ok": False, "reason": reject_text("unknown_meter")})
        when = fields.get("date", "")
        try:
            day = date.fromisoformat(when) if when else now.astimezone(fmt.MOSCOW).date()
        except ValueError:
            return _readings_page(request, conn, sub, status_code=422, values=fields,
                                  result={"ok": False, "reason": reject_text("invalid_time")})
        today = now.astimezone(fmt.MOSCOW).date()
        ts = now if day == today else datetime.combine(day, time(12), fmt.MOSCOW)
        items = []
        for reg in allowed[meter_id]:
            text = fields.get(f"value_{reg}", "").strip().replace(",", ".").replace(" ", "")
            if not text:
                continue
            try:
                value = Decimal(text)
                if not value.is_finite() or value < 0 or value > Decimal("1e12"):
                    raise InvalidOperation
            except InvalidOperation:
                return _readings_page(request, conn, sub, status_code=422, values=fields, result={
                    "ok": False, "reason": f"тариф {reg}: {reject_text('not_numeric')}"})
            items.append(account_data.ManualReading(meter_id, reg, ts, value))
        if not items:
            return _readings_page(request, conn, sub, status_code=422, values=fields, result={
                "ok": False, "reason": "введите показание хотя бы одного тарифа"})
        try:
            with web.writer_db(request, conn) as writer:
                counts = account_data.enter_readings(writer, sub.account, items, settings, source="portal",
                                                     now=now)
        except account_data.ReadingRefused as exc:
            conn.rollback()
            reason = reject_texts(exc.reject_codes) if exc.reject_codes else reject_text(exc.code)
            detail = str(exc) if exc.code in ("reading_below_last", "reading_implausible") else ""
            web.audit(conn, user.id, "reading_refused", {"account": sub.account, "meter": meter_id,
                                                         "code": exc.code}, request)
            conn.commit()
            return _readings_page(request, conn, sub, status_code=422, values=fields, result={
                "ok": False, "reason": reason, "detail": detail.split(": ", 1)[-1] if detail else ""})
        month = ts.astimezone(fmt.MOSCOW).date().replace(day=1)
        rebill = bool(account_data.bill_versions(conn, sub.account, month))
        web.audit(conn, user.id, "reading_entered", {"account": sub.account, "meter": meter_id,
                                                     "registers": ",".join(i.register for i in items),
                                                     "accepted": counts["accepted"]}, request)
        conn.commit()
        return _readings_page(request, conn, sub, values={}, result={
            "ok": True, "counts": counts, "month": month, "rebill": rebill, "items": items})
