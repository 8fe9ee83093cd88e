"""How the account writes money, dates, energy and tariff zones for a Russian reader.

One place for each: `1 234,56 ₽` (the thousands separator and the space
before the sign are no-break spaces, U+00A0, the same as the printable
receipt of billing/payments.py, whose `rub` this reuses), dates `01.12.2026`,
times in Moscow time (a person in St. Petersburg reads them), kWh with a
decimal comma, zones by their Russian names. Jinja filters are registered from
`FILTERS`.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from billing.payments import rub

MOSCOW = ZoneInfo("Europe/Moscow")
NBSP = "\u00a0"

ZONE_NAMES = {"night": "ночь", "peak": "пик", "half_peak": "полупик", "day": "день", "all": "круглосуточно"}
# what the chart and tables show, in this order (stacked bottom-up in the chart)
CHART_ZONES = ("night", "half_peak", "peak")
MONTHS = ("январь", "февраль", "март", "апрель", "май", "июнь", "июль", "август", "сентябрь", "октябрь",
          "ноябрь", "декабрь")
MONTHS_GENITIVE = ("января", "февраля", "марта", "апреля", "мая", "июня", "июля", "августа", "сентября",
                   "октября", "ноября", "декабря")
METERING = {"amr": "автоматизированный учёт (показания передаёт прибор учёта)",
            "manual": "ручной учёт (показания передаёте вы)"}
PLANS = {"single": "однотарифный", "two_zone": "двухзонный (день, ночь)",
         "three_zone": "трёхзонный (пик, полупик, ночь)"}
BILL_METHODS = {"readings": "по показаниям", "average": "по среднему потреблению (показаний не было)",
                "norm": "по нормативу (показаний не было)"}
PAYMENT_STATES = {"created": "создан", "pending": "ожидает оплаты", "succeeded": "оплачен",
                  "failed": "отклонён", "unknown": "уточняется у банка"}
PAYMENT_SOURCES = {"card": "картой в личном кабинете", "registry": "через банк или платёжного агента",
                   "other": "в кассе или другим способом"}
LEDGER_KINDS = {"charge": "начисление", "payment": "оплата", "accrual": "начисление пеней",
                "adjustment": "корректировка", "reversal": "сторно"}
COMPONENTS = {"energy": "электроэнергия", "penalty": "пени"}


def money(amount: Decimal | int | str | None) -> str:
    """1234.5 as «1 234,50 ₽»; None as a dash."""
    if amount is None:
        return "—"
    return rub(Decimal(amount))


def amount_field(amount: Decimal | None) -> str:
    """A sum as a form field's value: «1234.50», which the form reads back (a comma is accepted too)."""
    return f"{Decimal(amount or 0).quantize(Decimal('0.01'))}"


def kwh(value: Decimal | int | str | None, places: int = 1) -> str:
    """12345.678 as «12 345,7 кВт·ч» (rounded for reading; the bill keeps the exact value)."""
    if value is None:
        return "—"
    return f"{number(value, places)}{NBSP}кВт·ч"


def number(value: Decimal | int | str, places: int = 1) -> str:
    """A decimal with no-break thousands and a decimal comma: 12345.678 -> «12 345,7»."""
    q = Decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    whole, _, frac = f"{q:,.{places}f}".partition(".")
    whole = whole.replace(",", NBSP)
    return f"{whole},{frac}" if places else whole


def day(value: date | datetime | None) -> str:
    """01.12.2026; an aware datetime is shown as its Moscow date."""
    if value is None:
        return "—"
    if isinstance(value, datetime):
        value = _moscow(value).date()
    return f"{value:%d.%m.%Y}"


def moment(value: datetime | None) -> str:
    """01.12.2026 14:05 (МСК): when something happened, in Moscow time."""
    if value is None:
        return "—"
    return f"{_moscow(value):%d.%m.%Y %H:%M} (МСК)"


def month(value: date | str) -> str:
    """2026-12 or date(2026, 12, 1) as «декабрь 2026»."""
    if isinstance(value, str):
        y, m = value.split("-")[:2]
        value = date(int(y), int(m), 1)
    return f"{MONTHS[value.month - 1]} {value.year}"


def month_short(value: date | str) -> str:
    """2026-12 as «12.2026», for chart axes."""
    if isinstance(value, str):
        y, m = value.split("-")[:2]
        return f"{m}.{y}"
    return f"{value:%m.%Y}"


def zone(name: str) -> str:
    """night -> «ночь»; an unknown zone is shown as it is stored."""
    return ZONE_NAMES.get(name, name)


def label(table: dict[str, str], key: Any) -> str:
    return table.get(str(key), str(key))


def _moscow(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("a naive datetime cannot be shown in Moscow time: times are aware UTC")
    return value.astimezone(MOSCOW)


FILTERS = {
    "money": money, "kwh": kwh, "number": number, "day": day, "moment": moment, "month": month,
    "zone": zone, "amount_field": amount_field, "iso_day": lambda v: day(date.fromisoformat(v)) if v else "—",
    "metering": lambda v: label(METERING, v), "plan": lambda v: label(PLANS, v),
    "bill_method": lambda v: label(BILL_METHODS, v), "payment_state": lambda v: label(PAYMENT_STATES, v),
    "payment_source": lambda v: label(PAYMENT_SOURCES, v), "ledger_kind": lambda v: label(LEDGER_KINDS, v),
    "component": lambda v: label(COMPONENTS, v),
}
