"""Billing: worked bills to the kopeck, tariff changes, meter replacement, versions, holds."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import money
from billing.engine import bill_period, bills_of, fold, parse_period, price
from billing.tariffs import Catalogue, load_catalogue_file, parse_catalogue, store_catalogue

CATALOGUES = Path(__file__).resolve().parent.parent / "billing" / "catalogues"
EXAMPLE = Catalogue(load_catalogue_file(CATALOGUES / "example.toml"))
D = Decimal
OCT = date(2026, 10, 1)


def add_subscriber(conn, account: str, plan: str, category: str = "gas_stove", area: str = "urban",
                   meters: tuple[tuple[str, str | None, str | None], ...] | None = None) -> None:
    conn.execute("INSERT INTO subscriber (account, metering, plan, category, area) VALUES"
                 " (%s, 'amr', %s, %s, %s)", (account, plan, category, area))
    for mid, installed, removed in meters or ((f"m-{account}", None, None),):
        conn.execute("INSERT INTO meter (id, account, adapter, installed, removed) VALUES"
                     " (%s, %s, 'modbus_tcp', %s, %s)", (mid, account, installed, removed))
    conn.commit()


def add_usage(conn, meter: str, day: date, night="0", peak="0", half_peak="0",
              estimated: dict | None = None, suspect: dict | None = None) -> None:
    for zone, kwh in (("night", night), ("peak", peak), ("half_peak", half_peak)):
        conn.execute(
            "INSERT INTO daily_zone_usage (meter_id, day, zone, kwh, estimated_kwh, suspect_kwh)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (meter_id, day, zone) DO UPDATE"
            " SET kwh = EXCLUDED.kwh, estimated_kwh = EXCLUDED.estimated_kwh,"
            " suspect_kwh = EXCLUDED.suspect_kwh",
            (meter, day, zone, D(kwh), D((estimated or {}).get(zone, "0")),
             D((suspect or {}).get(zone, "0"))))
    conn.commit()


def spread(conn, meter: str, period: date, night: str, peak: str, half_peak: str) -> None:
    """Put a month's zone totals on two days, so the sum is exact and days differ."""
    for z, total in (("night", night), ("peak", peak), ("half_peak", half_peak)):
        first = (D(total) / 3).quantize(D("0.001"))
        add_one(conn, meter, period, z, first)
        add_one(conn, meter, period + timedelta(days=17), z, D(total) - first)


def add_one(conn, meter: str, day: date, zone: str, kwh: Decimal) -> None:
    conn.execute("INSERT INTO daily_zone_usage (meter_id, day, zone, kwh) VALUES (%s, %s, %s, %s)",
                 (meter, day, zone, kwh))
    conn.commit()


def lines(conn, account: str, period: date = OCT, version: int | None = None):
    bills = bills_of(conn, account, period)
    b = bills[-1] if version is None else bills[version - 1]
    return [(ln.zone, ln.kwh, ln.rate, ln.amount) for ln in b["lines"]], b["total"]


@pytest.fixture
def billing_db(conn):
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    return conn


# Worked bills, October 2026 (example catalogue, 2nd half of 2026), computed by hand:
WORKED = [
    # account, category, area, plan, (night, peak, half_peak), expected lines, total
    ("101", "gas_stove", "urban", "single", ("100.125", "50.5", "60"),
     # 210.625 kWh x 7.14 = 1503.8625 -> 1503.86
     [("all", "210.625", "7.14", "1503.86")], "1503.86"),
    ("102", "gas_stove", "urban", "two_zone", ("120.5", "40.25", "80.75"),
     # day 121 x 7.85 = 949.85; night 120.5 x 4.20 = 506.10
     [("day", "121", "7.85", "949.85"), ("night", "120.5", "4.20", "506.10")], "1455.95"),
    ("103", "gas_stove", "urban", "three_zone", ("33.3", "11.1", "22.2"),
     # 11.1 x 8.72 = 96.792; 22.2 x 7.14 = 158.508; 33.3 x 4.20 = 139.86
     [("peak", "11.1", "8.72", "96.79"), ("half_peak", "22.2", "7.14", "158.51"),
      ("night", "33.3", "4.20", "139.86")], "395.16"),
    ("201", "electric_stove", "urban", "single", ("5.001", "3", "2"),
     # 10.001 x 5.00 = 50.005 -> half-up 50.01 (banker's rounding would give 50.00)
     [("all", "10.001", "5.00", "50.01")], "50.01"),
    ("202", "electric_stove", "urban", "two_zone", ("200", "100", "150"),
     # day 250 x 5.50 = 1375.00; night 200 x 2.94 = 588.00
     [("day", "250", "5.50", "1375.00"), ("night", "200", "2.94", "588.00")], "1963.00"),
    ("203", "electric_stove", "urban", "three_zone", ("34.567", "12.345", "23.456"),
     # 12.345 x 6.10 = 75.3045; 23.456 x 5.00 = 117.28; 34.567 x 2.94 = 101.62698
     [("peak", "12.345", "6.10", "75.30"), ("half_peak", "23.456", "5.00", "117.28"),
      ("night", "34.567", "2.94", "101.63")], "294.21"),
    ("301", "gas_stove", "rural", "three_zone", ("30", "10", "20"),
     # rural category: 10 x 5.98 = 59.80; 20 x 4.90 = 98.00; 30 x 2.88 = 86.40
     [("peak", "10", "5.98", "59.80"), ("half_peak", "20", "4.90", "98.00"),
      ("night", "30", "2.88", "86.40")], "244.20"),
    ("302", "electric_stove", "rural", "two_zone", ("7.5", "2.5", "5"),
     # day 7.5 x 5.39 = 40.425 -> 40.43 (half-up); night 7.5 x 2.88 = 21.60
     [("day", "7.5", "5.39", "40.43"), ("night", "7.5", "2.88", "21.60")], "62.03"),
]


def test_worked_bills_for_every_plan_and_category_to_the_kopeck(billing_db) -> None:
    conn = billing_db
    for account, category, area, plan, (n, p, h), _, _ in WORKED:
        add_subscriber(conn, account, plan, category, area)
        spread(conn, f"m-{account}", OCT, n, p, h)
    summary = bill_period(conn, OCT)
    assert (summary.billed, summary.unchanged, summary.new_versions, summary.held_back) == (len(WORKED), 0, 0, [])
    for account, *_, expected, total in WORKED:
        got, got_total = lines(conn, account)
        assert got == [(z, D(k), D(r), D(a)) for z, k, r, a in expected], account
        assert got_total == D(total), account
        assert got_total == sum(a for *_, a in got)


def test_tariff_change_on_1_july_bills_june_and_july_at_their_rates(billing_db) -> None:
    conn = billing_db
    add_subscriber(conn, "7", "two_zone")
    for period in (date(2026, 6, 1), date(2026, 7, 1)):
        spread(conn, "m-7", period, "50", "30", "70")
        assert bill_period(conn, period).billed == 1
    # June: 100 x 7.05 = 705.00, 50 x 3.77 = 188.50; July: 100 x 7.85 = 785.00, 50 x 4.20 = 210.00
    assert lines(conn, "7", date(2026, 6, 1)) == (
        [("day", D(100), D("7.05"), D("705.00")), ("night", D(50), D("3.77"), D("188.50"))], D("893.50"))
    assert lines(conn, "7", date(2026, 7, 1)) == (
        [("day", D(100), D("7.85"), D("785.00")), ("night", D(50), D("4.20"), D("210.00"))], D("995.00"))


def test_tariff_change_inside_a_month_splits_it_by_day(conn) -> None:
    text = """
[[tariff]]
from = "2026-01-01"
to = "2026-10-15"
category = "gas_stove"
area = "urban"
plan = "single"
rates = { all = "5.00" }
[[tariff]]
from = "2026-10-16"
to = "2026-12-31"
category = "gas_stove"
area = "urban"
plan = "single"
rates = { all = "6.00" }
"""
    import tomllib
    store_catalogue(conn, parse_catalogue(tomllib.loads(text), "mid.toml"))
    add_subscriber(conn, "55", "single")
    for day in range(1, 32):
        add_usage(conn, "m-55", date(2026, 10, day), night="7", peak="1", half_peak="2")
    bill_period(conn, OCT)
    b = bills_of(conn, "55", OCT)[-1]
    # 15 days x 10 kWh x 5.00 = 750.00; 16 days x 10 kWh x 6.00 = 960.00
    assert [(ln.date_from, ln.date_to, ln.kwh, ln.amount) for ln in b["lines"]] == [
        (date(2026, 10, 1), date(2026, 10, 15), D(150), D("750.00")),
        (date(2026, 10, 16), date(2026, 10, 31), D(160), D("960.00"))]
    assert b["total"] == D("1710.00")


def test_meter_replaced_mid_month_is_counted_once(billing_db) -> None:
    conn = billing_db
    add_subscriber(conn, "000088"[4:], "single", meters=(
        ("m-old", "2026-01-01T00:00+03:00", "2026-10-15T12:00+03:00"),
        ("m-new", "2026-10-15T12:00+03:00", None)))
    for day in range(1, 16):
        add_usage(conn, "m-old", date(2026, 10, day), night="5")
    # the removed meter keeps talking after it was taken out: not this account's energy
    add_usage(conn, "m-old", date(2026, 10, 20), night="99")
    for day in range(15, 32):
        add_usage(conn, "m-new", date(2026, 10, day), night="4")
    bill_period(conn, OCT, ["0088"])
    # 15 x 5 + 17 x 4 = 143 kWh x 7.14 = 1021.02
    assert lines(conn, "88") == ([("all", D(143), D("7.14"), D("1021.02"))], D("1021.02"))


def test_rebilling_same_data_is_a_noop_and_changed_data_makes_a_version(billing_db) -> None:
    conn = billing_db
    add_subscriber(conn, "9", "three_zone")
    add_usage(conn, "m-9", date(2026, 10, 3), night="10", peak="5", half_peak="5",
              estimated={"night": "2.5"})
    first = bill_period(conn, OCT)
    assert (first.billed, first.unchanged) == (1, 0)
    again = bill_period(conn, OCT)
    assert (again.billed, again.unchanged, again.new_versions) == (0, 1, 0)
    assert conn.execute("SELECT count(*) FROM bill").fetchone()[0] == 1
    # late data arrives for the night
    add_usage(conn, "m-9", date(2026, 10, 30), night="1.5")
    late = bill_period(conn, OCT)
    assert late.new_versions == 1
    v1, v2 = bills_of(conn, "9", OCT)
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["total"] == D("5.00") * D("8.72") + D("5.00") * D("7.14") + D("42.00")  # 121.30, kept
    assert v2["total"] - v1["total"] == D("6.30")  # 1.5 x 4.20
    assert v2["reason"] == "energy changed: total 121.30 -> 127.60 (+6.30)"
    assert v2["diff"]["lines"] == [{
        "zone": "night", "date_from": "2026-10-01", "kwh_old": "10", "kwh_new": "11.5",
        "rate_old": "4.2", "rate_new": "4.2", "amount_old": "42.00", "amount_new": "48.30"}]
    assert v2["estimated_kwh"] == D("2.5")
    assert bill_period(conn, OCT).unchanged == 1
    # a person's reason is kept as typed, whatever characters it holds
    add_usage(conn, "m-9", date(2026, 10, 31), night="1")
    why = "meter\tre-read\nby C:\\field team"
    assert bill_period(conn, OCT, reason=why).new_versions == 1
    assert bills_of(conn, "9", OCT)[-1]["reason"].startswith(why + ": energy changed")


def test_suspect_energy_holds_the_bill_back(billing_db) -> None:
    conn = billing_db
    add_subscriber(conn, "11", "single")
    add_subscriber(conn, "12", "single")
    add_usage(conn, "m-11", date(2026, 10, 5), night="10", suspect={"peak": "250"})
    add_usage(conn, "m-12", date(2026, 10, 5), night="10")
    s = bill_period(conn, OCT)
    assert s.billed == 1
    assert [(h.account, h.reason) for h in s.held_back] == [
        ("11", "250 kWh of suspect energy awaits a decision (amr suspect list --account 11)")]
    assert bills_of(conn, "11", OCT) == []
    add_usage(conn, "m-11", date(2026, 10, 5), night="10")  # someone rejected it
    assert bill_period(conn, OCT).billed == 1


def test_no_tariff_and_volume_bands_hold_back_with_a_reason(conn) -> None:
    import tomllib
    text = """
[[tariff]]
from = "2026-10-10"
to = "2026-12-31"
category = "gas_stove"
area = "urban"
plan = "single"
rates = { all = "5.00" }
[[tariff]]
from = "2026-01-01"
to = "2026-12-31"
category = "electric_stove"
area = "urban"
plan = "single"
rates = { all = "4.00" }
band = 1
band_to_kwh = "1200"
"""
    store_catalogue(conn, parse_catalogue(tomllib.loads(text), "x.toml"))
    add_subscriber(conn, "1", "single")
    add_subscriber(conn, "2", "single", "electric_stove")
    add_usage(conn, "m-1", date(2026, 10, 12), night="1")
    add_usage(conn, "m-2", date(2026, 10, 12), night="1")
    held = {h.account: h.reason for h in bill_period(conn, OCT).held_back}
    assert held["1"] == "no tariff for gas_stove/urban/single on 2026-10-01..2026-10-09"
    assert held["2"].startswith("volume bands in the tariff for electric_stove/urban/single")


def test_parse_period() -> None:
    assert parse_period("2026-10") == OCT
    with pytest.raises(ValueError, match="like 2026-10"):
        parse_period("October")


# --- properties -------------------------------------------------------------------

kwh = st.decimals(min_value=0, max_value=100000, places=6, allow_nan=False, allow_infinity=False)
zones = st.fixed_dictionaries({"night": kwh, "peak": kwh, "half_peak": kwh})
combos = st.sampled_from([(c, a) for c, a in (("gas_stove", "urban"), ("electric_stove", "urban"),
                                              ("gas_stove", "rural"))])
plans = st.sampled_from(["single", "two_zone", "three_zone"])


@given(zones, plans, combos)
def test_folding_to_any_plan_keeps_the_total(usage, plan, combo) -> None:
    folded = fold(usage, plan)
    assert sum(folded.values()) == sum(usage.values())
    assert fold(usage, "single")["all"] == sum(fold(usage, "three_zone").values())
    # and on the bill: the same energy whatever the plan, estimated part included
    pieces = [(OCT, date(2026, 10, 31))]
    data = {(1, z): (v, v / 2) for z, v in usage.items()}
    bills = [price("1", OCT, p, *combo, pieces, data, EXAMPLE) for p in ("single", "two_zone", "three_zone")]
    assert {b.kwh for b in bills} == {sum(usage.values())}
    assert {b.estimated_kwh for b in bills} == {sum(v / 2 for v in usage.values())}


@given(st.lists(zones, min_size=2, max_size=2), plans, combos,
       st.sampled_from([date(2026, 6, 1), date(2026, 7, 1), date(2025, 12, 1)]))
def test_total_is_the_sum_of_rounded_lines(usage, plan, combo, period) -> None:
    pieces = [(period, period.replace(day=28))]
    data = {(1, z): (v, D(0)) for z, v in usage[0].items()}
    bill = price("1", period, plan, *combo, pieces, data, EXAMPLE)
    assert bill.total == sum(ln.amount for ln in bill.lines)
    assert all(ln.amount == money.round_kopecks(ln.kwh * ln.rate) for ln in bill.lines)
    assert bill.kwh == sum(usage[0].values())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 31), st.sampled_from(["night", "peak", "half_peak"]),
                          st.decimals(min_value=0, max_value=500, places=3)), min_size=1, max_size=20),
       plans)
def test_rebilling_unchanged_data_is_a_noop(billing_db, days, plan) -> None:
    conn = billing_db
    conn.execute("TRUNCATE bill_line, bill, daily_zone_usage, meter, subscriber CASCADE")
    conn.commit()
    add_subscriber(conn, "5", plan)
    for day, zone, value in days:
        conn.execute("INSERT INTO daily_zone_usage (meter_id, day, zone, kwh) VALUES ('m-5', %s, %s, %s)"
                     " ON CONFLICT (meter_id, day, zone) DO UPDATE SET kwh = EXCLUDED.kwh",
                     (date(2026, 10, day), zone, value))
    conn.commit()
    assert bill_period(conn, OCT).billed == 1
    before = conn.execute("SELECT count(*), sum(total) FROM bill").fetchone()
    again = bill_period(conn, OCT)
    assert (again.billed, again.new_versions, again.unchanged) == (0, 0, 1)
    assert conn.execute("SELECT count(*), sum(total) FROM bill").fetchone() == before


def test_naming_an_unknown_account_bills_nobody(billing_db) -> None:
    from billing.engine import UnknownAccounts

    add_subscriber(billing_db, "1", "single")
    add_usage(billing_db, "m-1", date(2026, 10, 1), night="1")
    with pytest.raises(UnknownAccounts, match="no subscriber with account 404"):
        bill_period(billing_db, OCT, ["1", "0404"])
    assert billing_db.execute("SELECT count(*) FROM bill").fetchone()[0] == 0
