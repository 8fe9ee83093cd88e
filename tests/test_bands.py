"""Volume bands: the proportional rule to the kopeck, holds without a rule, a month split by a rate change."""

from __future__ import annotations

import tomllib
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.engine import bill_period, bills_of, split_bands
from billing.tariffs import TariffError, load_catalogue_file, parse_catalogue, store_catalogue
from tests.test_billing import add_subscriber, add_usage

CATALOGUES = Path(__file__).resolve().parent.parent / "billing" / "catalogues"
D = Decimal
OCT25 = date(2025, 10, 1)


def kwh(d: Decimal) -> str:
    return format(d.normalize(), "f")


def lines_of(conn, account: str, period: date = OCT25):
    b = bills_of(conn, account, period)[-1]
    return [(ln.band, ln.zone, kwh(ln.kwh), str(ln.rate), str(ln.amount)) for ln in b["lines"]], b


@pytest.fixture
def banded_db(conn):
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example-banded.toml"))
    return conn


def test_worked_example_to_the_kopeck(banded_db) -> None:
    # 4,500 kWh: day 3,000 (peak 1,000 + half-peak 2,000), night 1,500; bands 1,200 / 2,700 / 600
    add_subscriber(banded_db, "7", "two_zone")
    add_usage(banded_db, "m-7", date(2025, 10, 3), night="1500", peak="1000", half_peak="2000")
    s = bill_period(banded_db, OCT25)
    assert (s.billed, s.held_back) == (1, [])
    got, bill = lines_of(banded_db, "7")
    assert got == [
        (1, "day", "800", "7.05", "5640.00"),     # 800 x 7.05
        (1, "night", "400", "3.77", "1508.00"),   # 400 x 3.77
        (2, "day", "1800", "8.46", "15228.00"),   # 1,800 x 8.46
        (2, "night", "900", "4.52", "4068.00"),   # 900 x 4.52
        (3, "day", "400", "12.69", "5076.00"),    # 400 x 12.69
        (3, "night", "200", "6.79", "1358.00"),   # 200 x 6.79
    ]
    assert bill["total"] == D("32878.00") and bill["kwh"] == D("4500") and bill["method"] == "readings"
    # the customer account reads the band beside each line
    rows = banded_db.execute("SELECT band, zone, kwh FROM portal_bill_line WHERE account = '7'"
                             " ORDER BY line_no").fetchall()
    assert [(b, z, k.normalize()) for b, z, k in rows][:2] == [(1, "day", D("800")), (1, "night", D("400"))]
    # a second run finds nothing changed
    assert bill_period(banded_db, OCT25).unchanged == 1


def test_kwh_that_do_not_divide_evenly_keep_every_zone_and_band_exact(banded_db) -> None:
    # 1,300.5 kWh: day 867.3, night 433.2; bands 1,200 / 100.5 / 0. Exact shares:
    # band 1 day 1200 x 867.3 / 1300.5 = 800.27682..., night 399.72318...;
    # band 2 day 100.5 x 867.3 / 1300.5 = 67.02322..., night 33.47678...
    # Rounded down to 0.001: 800.276 + 399.723 = 1199.999 and 67.023 + 33.476 = 100.499: one
    # Wh left in each band, and one in each zone. The day's goes to band 1 (tied on what is
    # left, the larger dropped fraction .768 against .232), the night's to band 2, the one left.
    add_subscriber(banded_db, "8", "two_zone")
    add_usage(banded_db, "m-8", date(2025, 10, 9), night="433.2", peak="400.1", half_peak="467.2")
    bill_period(banded_db, OCT25)
    got, bill = lines_of(banded_db, "8")
    assert got == [
        (1, "day", "800.277", "7.05", "5641.95"),     # 5641.95285
        (1, "night", "399.723", "3.77", "1506.96"),   # 1506.95571
        (2, "day", "67.023", "8.46", "567.01"),       # 567.01458
        (2, "night", "33.477", "4.52", "151.32"),     # 151.31604
    ]  # no band 3 lines: the month's volume does not reach it
    assert bill["total"] == D("7867.24")
    assert sum(D(k) for _, z, k, _, _ in got if z == "day") == D("867.3")
    assert sum(D(k) for _, z, k, _, _ in got if z == "night") == D("433.2")


def test_a_small_month_stays_in_band_one(banded_db) -> None:
    add_subscriber(banded_db, "9", "single")
    add_usage(banded_db, "m-9", date(2025, 10, 9), night="100", peak="50.5", half_peak="60")
    bill_period(banded_db, OCT25)
    got, bill = lines_of(banded_db, "9")
    assert got == [(1, "all", "210.5", "6.41", "1349.31")]  # 210.5 x 6.41 = 1349.305 -> 1349.31 half-up
    assert bill["total"] == D("1349.31")


BANDS = """
[[tariff]]
from = "{f}"
to = "{t}"
category = "gas_stove"
area = "urban"
plan = "two_zone"
band = 1
band_to_kwh = "{b1}"
{rule}
rates = {{ day = "{d1}", night = "{n1}" }}
[[tariff]]
from = "{f}"
to = "{t}"
category = "gas_stove"
area = "urban"
plan = "two_zone"
band = 2
band_from_kwh = "{b1}"
band_to_kwh = "3900"
{rule}
rates = {{ day = "{d2}", night = "{n2}" }}
[[tariff]]
from = "{f}"
to = "{t}"
category = "gas_stove"
area = "urban"
plan = "two_zone"
band = 3
band_from_kwh = "3900"
{rule}
rates = {{ day = "{d3}", night = "{n3}" }}
"""
RULE = 'allocation = "proportional"'
RATES_1 = dict(d1="7.00", n1="3.50", d2="8.00", n2="4.00", d3="12.00", n3="6.00")
RATES_2 = dict(d1="7.70", n1="3.85", d2="8.80", n2="4.40", d3="13.20", n3="6.60")


def _catalogue(conn, *parts: str) -> None:
    store_catalogue(conn, parse_catalogue(tomllib.loads("".join(parts)), "bands.toml"))


def test_a_catalogue_without_a_rule_holds_the_bill_back(conn) -> None:
    _catalogue(conn, BANDS.format(f="2025-07-01", t="2025-12-31", b1="1200", rule="", **RATES_1))
    add_subscriber(conn, "10", "two_zone")
    add_usage(conn, "m-10", date(2025, 10, 3), night="1500", peak="1000", half_peak="2000")
    s = bill_period(conn, OCT25)
    assert s.billed == 0
    [held] = s.held_back
    assert held.account == "10"
    assert held.reason.startswith("volume bands in the tariff for gas_stove/urban/two_zone from 2025-10-01: "
                                  "how zone volumes share bands is not confirmed yet")
    assert 'allocation = "proportional"' in held.reason
    assert bills_of(conn, "10", OCT25) == []


def test_a_rate_change_inside_the_month_shares_the_bands_by_energy(conn) -> None:
    # rates change on 16 October; the thresholds stay. The month's 4,500 kWh decides the bands
    # (1,200 / 2,700 / 600); each run of days has half the energy (day 1,500, night 750), so
    # each band goes 1/3 : 1/6 : 1/3 : 1/6 to run 1 day, night, run 2 day, night.
    _catalogue(conn, BANDS.format(f="2025-07-01", t="2025-10-15", b1="1200", rule=RULE, **RATES_1),
               BANDS.format(f="2025-10-16", t="2025-12-31", b1="1200", rule=RULE, **RATES_2))
    add_subscriber(conn, "11", "two_zone")
    add_usage(conn, "m-11", date(2025, 10, 5), night="750", peak="500", half_peak="1000")
    add_usage(conn, "m-11", date(2025, 10, 20), night="750", peak="500", half_peak="1000")
    bill_period(conn, OCT25)
    b = bills_of(conn, "11", OCT25)[-1]
    got = [(ln.date_from.day, ln.band, ln.zone, kwh(ln.kwh), str(ln.amount)) for ln in b["lines"]]
    assert got == [
        (1, 1, "day", "400", "2800.00"), (1, 1, "night", "200", "700.00"),      # x 7.00, 3.50
        (1, 2, "day", "900", "7200.00"), (1, 2, "night", "450", "1800.00"),     # x 8.00, 4.00
        (1, 3, "day", "200", "2400.00"), (1, 3, "night", "100", "600.00"),      # x 12.00, 6.00
        (16, 1, "day", "400", "3080.00"), (16, 1, "night", "200", "770.00"),    # x 7.70, 3.85
        (16, 2, "day", "900", "7920.00"), (16, 2, "night", "450", "1980.00"),   # x 8.80, 4.40
        (16, 3, "day", "200", "2640.00"), (16, 3, "night", "100", "660.00"),    # x 13.20, 6.60
    ]
    assert b["total"] == D("32550.00")  # 15,500.00 + 17,050.00


def test_thresholds_changing_inside_the_month_hold_the_bill_back(conn) -> None:
    _catalogue(conn, BANDS.format(f="2025-07-01", t="2025-10-15", b1="1200", rule=RULE, **RATES_1),
               BANDS.format(f="2025-10-16", t="2025-12-31", b1="1300", rule=RULE, **RATES_2))
    add_subscriber(conn, "12", "two_zone")
    add_usage(conn, "m-12", date(2025, 10, 5), night="750", peak="500", half_peak="1000")
    [held] = bill_period(conn, OCT25).held_back
    assert held.reason.startswith("volume band thresholds of gas_stove/urban/two_zone change inside 2025-10")


def test_bands_beginning_inside_the_month_hold_the_bill_back(conn) -> None:
    _catalogue(conn, """
[[tariff]]
from = "2025-07-01"
to = "2025-10-15"
category = "gas_stove"
area = "urban"
plan = "two_zone"
rates = { day = "7.00", night = "3.50" }
""", BANDS.format(f="2025-10-16", t="2025-12-31", b1="1200", rule=RULE, **RATES_2))
    add_subscriber(conn, "13", "two_zone")
    add_usage(conn, "m-13", date(2025, 10, 5), night="750", peak="500", half_peak="1000")
    [held] = bill_period(conn, OCT25).held_back
    assert "begin or end inside 2025-10" in held.reason


def test_bands_that_do_not_join_up_hold_the_bill_back(conn) -> None:
    text = BANDS.format(f="2025-07-01", t="2025-12-31", b1="1200", rule=RULE, **RATES_1)
    _catalogue(conn, text.replace('band_from_kwh = "1200"', 'band_from_kwh = "1000"'))
    add_subscriber(conn, "14", "two_zone")
    add_usage(conn, "m-14", date(2025, 10, 5), night="750")
    [held] = bill_period(conn, OCT25).held_back
    assert "do not join up: band 2 from 1000 kWh" in held.reason


def test_an_unknown_rule_is_refused_with_the_entry_named() -> None:
    text = BANDS.format(f="2025-07-01", t="2025-12-31", b1="1200", rule='allocation = "by_day"', **RATES_1)
    with pytest.raises(TariffError, match=r"tariff\[0\].*key 'allocation': 'by_day' is not one of proportional"):
        parse_catalogue(tomllib.loads(text), "bands.toml")


@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=6),
       st.lists(st.integers(1, 10**6), min_size=1, max_size=3))
def test_split_bands_is_exact_both_ways_and_within_a_quantum(cells_wh: list[int], widths_wh: list[int]) -> None:
    q = D("0.001")
    cells = [D(c) * q for c in cells_wh]
    total = sum(cells, D(0))
    bands, lo = [], D(0)
    for w in widths_wh:  # marginal steps on the total; the last band takes the rest
        part = min(max(total - lo, D(0)), D(w) * q)
        bands.append(part)
        lo += D(w) * q
    bands.append(total - sum(bands, D(0)))
    shares = split_bands(bands, cells, q)
    for i, b in enumerate(bands):
        assert sum(shares[i], D(0)) == b
    for j, c in enumerate(cells):
        assert sum((row[j] for row in shares), D(0)) == c
        for i, b in enumerate(bands):
            assert shares[i][j] >= 0
            if total:
                assert abs(shares[i][j] - b * c / total) < q
