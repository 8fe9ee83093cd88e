"""The customer account API's money side: balance and debt per component, the ledger, penalties.

Read-only, through the `portal_*` views like the rest of the API (migration
019 adds `portal_ledger_entry`). Balances are derived from the ledger at the
date asked, never stored; energy and penalties are shown apart, because a
payment says which one it pays.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from billing import account_data
from billing.api import ERRORS, AccountNo, AppSettings, Database, Tokens, own, subscriber
from billing.ledger import ZERO

router = APIRouter()


class ComponentBalance(BaseModel):
    balance: Decimal = Field(description="charges minus payments: above zero owed, below zero overpaid")
    debt: Decimal = Field(description="what is owed (zero when nothing is)")
    overpaid: Decimal = Field(description="what was paid beyond the charges (zero when nothing was)")


class Balance(BaseModel):
    account: str
    on: date = Field(description="the balance at the end of this day (Moscow time)")
    energy: ComponentBalance
    penalty: ComponentBalance


class LedgerEntryOut(BaseModel):
    id: int
    component: str = Field(description="energy or penalty")
    kind: str = Field(description="charge, payment, accrual, adjustment or reversal")
    amount: Decimal = Field(description="above zero adds to what is owed, below zero takes from it")
    booked_on: date
    period: str | None = Field(description="the billing month it belongs to, like 2026-10")
    source: str | None
    reverses: int | None = Field(description="the entry this one cancels")
    reason: str


class PenaltyDays(BaseModel):
    date_from: date
    date_to: date
    days: int
    unpaid: Decimal
    key_rate: Decimal | None = Field(description="the Bank of Russia key rate those days, percent")
    rate: Decimal = Field(description="the rate applied after that day's suspension or cap, percent")
    fraction: str = Field(description="0 for the first 30 days, 1/300 to day 90, 1/130 from day 91")
    penalty: Decimal


class ChargePenaltyOut(BaseModel):
    period: str = Field(description="the billing month, like 2026-10")
    amount: Decimal = Field(description="the month's energy charge")
    due: date
    days: int = Field(description="days overdue")
    unpaid: Decimal
    penalty: Decimal
    provisional: bool = Field(description="counts days whose key rate is not confirmed yet")
    ranges: list[PenaltyDays]


class Penalties(BaseModel):
    account: str
    on: date
    charges: list[ChargePenaltyOut]
    total: Decimal


class Ledger(BaseModel):
    account: str
    entries: list[LedgerEntryOut]


def _on(text: date | None, tz: str) -> date:
    return text if text is not None else datetime.now(ZoneInfo(tz)).date()


@router.get("/accounts/{account}/balance", response_model=Balance, responses=ERRORS,
            summary="balance and debt per component (energy, penalty) at a date")
def balance(account: AccountNo, allowed: Tokens, db: Database, settings: AppSettings,
            on: Annotated[date | None, Query(description="the day, like 2026-11-30; default today")] = None,
            ) -> Balance:
    acc = own(account, allowed)
    day = _on(on, settings.timezone)
    with db.connection() as conn:
        subscriber(conn, acc)
        sums = account_data.balance(conn, acc, day)

    def part(b: Decimal) -> ComponentBalance:
        return ComponentBalance(balance=b, debt=max(b, ZERO), overpaid=max(-b, ZERO))

    return Balance(account=acc, on=day, energy=part(sums["energy"]), penalty=part(sums["penalty"]))


@router.get("/accounts/{account}/ledger", response_model=Ledger, responses=ERRORS,
            summary="every charge, payment, penalty accrual and correction, in booking order")
def ledger(account: AccountNo, allowed: Tokens, db: Database,
           component: Annotated[str | None, Query(pattern="^(energy|penalty)$",
                                                  description="only this component")] = None,
           ) -> Ledger:
    acc = own(account, allowed)
    with db.connection() as conn:
        subscriber(conn, acc)
        rows = account_data.ledger_rows(conn, acc, component)
    return Ledger(account=acc, entries=[LedgerEntryOut(
        id=r.id, component=r.component, kind=r.kind, amount=r.amount, booked_on=r.booked_on, period=r.period,
        source=r.source, reverses=r.reverses, reason=r.reason) for r in rows])


@router.get("/accounts/{account}/penalties", response_model=Penalties, responses=ERRORS,
            summary="late-payment penalties (пени) per overdue month at a date, with their day ranges")
def penalties(account: AccountNo, allowed: Tokens, db: Database, settings: AppSettings,
              on: Annotated[date | None, Query(description="the day, like 2026-11-30; default today")] = None,
              ) -> Penalties:
    from billing import penalties as pen

    acc = own(account, allowed)
    day = _on(on, settings.timezone)
    with db.connection() as conn:
        subscriber(conn, acc)
        found = pen.penalties(conn, acc, day, ledger="portal_ledger_entry")
    return Penalties(account=acc, on=day, total=pen.total(found), charges=[ChargePenaltyOut(
        period=c.period.strftime("%Y-%m"), amount=c.amount, due=c.due, days=c.days, unpaid=c.unpaid,
        penalty=c.penalty, provisional=c.provisional, ranges=[PenaltyDays(
            date_from=r.start, date_to=r.end, days=r.days, unpaid=r.unpaid, key_rate=r.key_rate, rate=r.rate,
            fraction=r.fraction, penalty=r.penalty) for r in c.ranges]) for c in found])
