"""The account's pure parts: Russian formats, the zone chart's SVG, reject reasons, the last-payment rule."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import pairwise

import pytest

from adapters.reading import REJECT_CODES
from portal import charts, linking
from portal import formatting as fmt
from portal.reasons import REJECT_TEXT, reject_text, reject_texts

NB = "\u00a0"
SVG = "{http://www.w3.org/2000/svg}"


def test_money_with_no_break_spaces_and_a_comma() -> None:
    assert fmt.money(Decimal("1234.56")) == f"1{NB}234,56{NB}₽"
    assert fmt.money(Decimal("1234567.5")) == f"1{NB}234{NB}567,50{NB}₽"
    assert fmt.money(Decimal("0")) == f"0,00{NB}₽"
    assert fmt.money(None) == "—"


def test_dates_and_times_in_moscow() -> None:
    assert fmt.day(date(2026, 12, 1)) == "01.12.2026"
    # 21:30 UTC on 30 November is already 1 December in Moscow (UTC+3)
    assert fmt.day(datetime(2026, 11, 30, 21, 30, tzinfo=UTC)) == "01.12.2026"
    assert fmt.moment(datetime(2026, 11, 30, 21, 30, tzinfo=UTC)) == "01.12.2026 00:30 (МСК)"
    with pytest.raises(ValueError, match="naive"):
        fmt.moment(datetime(2026, 1, 1))
    assert fmt.month("2026-10") == "октябрь 2026"
    assert fmt.month_short("2026-03") == "03.2026"


def test_energy_and_zones() -> None:
    assert fmt.kwh(Decimal("12345.678")) == f"12{NB}345,7{NB}кВт·ч"
    assert fmt.number(Decimal("0.05"), 1) == "0,1"  # rounded half-up, as a person rounds
    assert fmt.number(Decimal("-1234.5"), 0) == f"-1{NB}235"
    assert [fmt.zone(z) for z in ("night", "peak", "half_peak")] == ["ночь", "пик", "полупик"]
    assert fmt.zone("unknown") == "unknown"


def test_every_reject_code_has_a_russian_reason() -> None:
    missing = sorted(REJECT_CODES - set(REJECT_TEXT))
    assert not missing, f"no Russian reason for {missing}"
    for code in REJECT_CODES:
        assert any("а" <= ch <= "я" for ch in REJECT_TEXT[code].lower()), code
    assert reject_text("no-such-code") == REJECT_TEXT["other"]
    assert reject_texts(["negative", "negative", "future_ts"]) == (
        "показание не может быть отрицательным; дата показания ещё не наступила")


def test_nice_steps() -> None:
    assert charts.nice_step(Decimal(93)) == Decimal(20)
    assert charts.nice_step(Decimal(5)) == Decimal(1)
    assert charts.nice_step(Decimal("0.4")) == Decimal("0.1")
    assert charts.nice_step(Decimal(0)) == Decimal(1)


def test_chart_is_valid_svg_with_title_desc_and_stacked_zones() -> None:
    bars = [charts.Bar("10.2026", {"night": Decimal(10), "peak": Decimal(2), "half_peak": Decimal(3)}),
            charts.Bar("11.2026", {"night": Decimal(5)})]
    svg = charts.stacked_bars(bars, chart_id="c1", title="Потребление", desc=charts.describe(bars, "Тест"))
    root = ET.fromstring(svg)
    assert root.get("role") == "img" and root.get("aria-labelledby") == "c1-title c1-desc"
    assert root.find(f"{SVG}title").text == "Потребление"
    assert "всего 20,0 кВт·ч" in root.find(f"{SVG}desc").text
    rects = [r for r in root.iter(f"{SVG}rect") if (r.get("class") or "").startswith("zone-")]
    assert [r.get("class") for r in rects] == ["zone-night", "zone-half_peak", "zone-peak", "zone-night"]
    first = rects[:3]
    # stacked: each zone's rectangle sits on the one below it
    for lower, upper in pairwise(first):
        assert float(upper.get("y")) + float(upper.get("height")) == pytest.approx(float(lower.get("y")), abs=0.11)
    # the tallest bar (15 kWh) reaches the axis top: steps of 5 up to 15
    heights = sum(float(r.get("height")) for r in first)
    assert heights / (charts.HEIGHT - charts.TOP - charts.BOTTOM) == pytest.approx(1, abs=0.01)
    assert float(rects[3].get("height")) / heights == pytest.approx(5 / 15, abs=0.01)
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "10.2026" in labels and "ночь" in labels


def test_chart_of_nothing() -> None:
    svg = charts.stacked_bars([], chart_id="e", title="t", desc=charts.describe([], "Пусто"))
    assert ET.fromstring(svg).find(f"{SVG}desc").text == "Пусто: данных о потреблении нет."


P = linking.ProofPayment


def test_the_last_payment_is_the_proof() -> None:
    today = date(2026, 12, 2)
    own = P(date(2026, 11, 20), Decimal("100.00"), False)
    bank_old = P(date(2026, 11, 18), Decimal("50.00"), True)  # 14 days: no longer recent
    bank_new = P(date(2026, 11, 19), Decimal("70.00"), True)  # 13 days
    assert linking.expected_payment([own, bank_new], today) is own
    assert linking.expected_payment([bank_new, own], today) is own
    assert linking.expected_payment([bank_old, own], today) is bank_old
    assert linking.expected_payment([bank_new], today) is None
    assert linking.expected_payment([], today) is None


def test_proof_fields() -> None:
    assert linking.parse_account(" 000 123 ") == "123"
    with pytest.raises(linking.ProofFormError):
        linking.parse_account("12a")
    assert linking.parse_amount(f"1{NB}234,56 ₽") == Decimal("1234.56")
    assert linking.parse_amount("1234.5") == Decimal("1234.5")
    assert linking.parse_amount("1 500") == Decimal("1500")
    for bad in ("", "0", "-5", "1,234", "12.345", "abc", "1e3"):
        with pytest.raises(linking.ProofFormError):
            linking.parse_amount(bad)
    assert linking.parse_day("05.11.2026") == linking.parse_day("2026-11-05") == date(2026, 11, 5)
    with pytest.raises(linking.ProofFormError):
        linking.parse_day("31.02.2026")
