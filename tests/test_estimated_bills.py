"""Manual-metering months without readings (Decree 354 p. 59-61): average, then norm, then readings again.

Readings go in through the one ingestion path, as the customer account sends them;
bills come from the real billing run against the real PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from adapters import quality
from adapters.reading import Reading
from amr.settings import Settings, get_settings
from billing.engine import bill_period, bills_of
from billing.tariffs import (
    TariffError,
    load_catalogue_file,
    load_norms_file,
    parse_norms,
    store_catalogue,
    store_norms,
)
from collector.ingest.ingestor import Ingestor
from collector.inventory import parse_inventory, upsert_inventory

CATALOGUES = Path(__file__).resolve().parent.parent / "billing" / "catalogues"
MSK = ZoneInfo("Europe/Moscow")
D = Decimal
JUN, JUL, AUG, SEP, OCT, NOV, DEC = (date(2026, m, 1) for m in range(6, 13))
RATE = D("7.14")  # example.toml, gas_stove/urban/single, 2nd half of 2026


def at(day: date) -> datetime:
    """Local midnight at the start of a day: a reading on the 1st closes the month before."""
    return datetime(day.year, day.month, day.day, tzinfo=MSK)


@pytest.fixture
def manual_db(conn):
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    store_norms(conn, load_norms_file(CATALOGUES / "norms-example.toml"))
    upsert_inventory(conn, parse_inventory({
        "subscriber": [
            {"account": "501", "metering": "manual", "plan": "single", "rooms": 2, "residents": 3},
            {"account": "502", "metering": "manual", "plan": "two_zone"},  # no rooms, no residents
        ],
        "meter": [{"id": "h-501", "account": "501", "adapter": "manual"},
                  {"id": "h-502", "account": "502", "adapter": "manual"}],
    }))
    conn.commit()
    return conn


def read(conn, meter: str, *values: tuple[date, str]) -> None:
    items = [Reading(meter, "1.8.0", at(m), D(v), frozenset({quality.MANUAL}), "portal") for m, v in values]
    result = Ingestor(conn, Settings(), record_metrics=False).ingest(items)
    assert result.rejected == 0, result


def latest(conn, account: str, period: date) -> dict:
    return bills_of(conn, account, period)[-1]


def three_months(conn) -> None:
    # June 300 kWh, July 360, August 420: three months wholly between readings
    read(conn, "h-501", (JUN, "1000"), (JUL, "1300"), (AUG, "1660"), (SEP, "2080"))


def test_readings_then_a_month_without_is_billed_by_the_average(manual_db) -> None:
    three_months(manual_db)
    assert bill_period(manual_db, AUG, ["501"], average_months=3).billed == 1
    assert latest(manual_db, "501", AUG)["method"] == "readings"
    assert latest(manual_db, "501", AUG)["kwh"] == D("420")
    s = bill_period(manual_db, SEP, ["501"], average_months=3)
    assert (s.billed, s.held_back) == (1, [])
    b = latest(manual_db, "501", SEP)
    # (300 + 360 + 420) / 3 = 360 kWh x 7.14 = 2570.40, all of it estimated
    assert b["method"] == "average"
    assert (b["kwh"], b["estimated_kwh"], b["total"]) == (D("360"), D("360"), D("2570.40"))
    assert "average of 3 month(s) 2026-06..2026-08" in b["reason"]
    assert [(ln.zone, ln.kwh, ln.rate, ln.amount) for ln in b["lines"]] == [("all", D("360"), RATE, D("2570.40"))]
    # the customer account sees the method
    assert manual_db.execute("SELECT method FROM portal_bill WHERE account = '501' AND period = %s",
                             (SEP,)).fetchone() == ("average",)
    # the same estimate on the same data: a re-run writes nothing
    assert bill_period(manual_db, SEP, ["501"], average_months=3).unchanged == 1


def test_a_month_read_only_in_part_is_not_averaged(manual_db) -> None:
    three_months(manual_db)
    read(manual_db, "h-501", (date(2026, 9, 16), "2280"))  # September read up to the 16th only
    bill_period(manual_db, OCT, ["501"], average_months=3)
    b = latest(manual_db, "501", OCT)
    # October is the first month after the last reading; the months wholly read are June to
    # August (September's 200 kWh cover half of it): (300 + 360 + 420) / 3 = 360
    assert (b["method"], b["kwh"]) == ("average", D("360"))
    assert "2026-06..2026-08" in b["reason"]


def test_the_average_takes_at_most_the_setting_months(manual_db) -> None:
    three_months(manual_db)
    bill_period(manual_db, SEP, ["501"], average_months=2)
    b = latest(manual_db, "501", SEP)
    assert (b["method"], b["kwh"]) == ("average", D("390"))  # July and August: (360 + 420) / 2
    assert b["total"] == D("2784.60")  # 390 x 7.14


def test_more_months_without_readings_than_the_setting_are_billed_by_the_norm(manual_db) -> None:
    three_months(manual_db)
    # September, October and November: months 1, 2, 3 without readings: the average
    for month in (SEP, OCT, NOV):
        bill_period(manual_db, month, ["501"], average_months=3)
        assert latest(manual_db, "501", month)["method"] == "average"
    # December is the fourth: the norm, 2 rooms, 3 residents: 3 x 74 = 222 kWh x 7.14 = 1585.08
    bill_period(manual_db, DEC, ["501"], average_months=3)
    b = latest(manual_db, "501", DEC)
    assert (b["method"], b["kwh"], b["total"]) == ("norm", D("222"), D("1585.08"))
    assert "no readings for 4 months, more than 3" in b["reason"] and "3 x 74 kWh" in b["reason"]


def test_the_setting_decides_when_the_run_is_not_told(manual_db, monkeypatch) -> None:
    three_months(manual_db)
    monkeypatch.setenv("AMR_AVERAGE_MONTHS", "1")
    get_settings.cache_clear()
    try:
        bill_period(manual_db, OCT, ["501"])  # the second month without readings: more than 1
    finally:
        get_settings.cache_clear()
    b = latest(manual_db, "501", OCT)
    assert (b["method"], b["kwh"]) == ("norm", D("222"))


def test_a_reading_that_arrives_makes_a_new_version_by_readings(manual_db) -> None:
    three_months(manual_db)
    bill_period(manual_db, SEP, ["501"], average_months=3)
    assert latest(manual_db, "501", SEP)["total"] == D("2570.40")  # 360 kWh by the average
    # the customer sends the reading of 1 October late: September was 390 kWh
    read(manual_db, "h-501", (OCT, "2470"))
    s = bill_period(manual_db, SEP, ["501"], average_months=3)
    assert (s.new_versions, s.held_back) == (1, [])
    v1, v2 = bills_of(manual_db, "501", SEP)
    assert (v1["method"], v1["total"]) == ("average", D("2570.40"))  # kept as issued
    assert (v2["method"], v2["kwh"], v2["total"]) == ("readings", D("390"), D("2784.60"))  # 390 x 7.14
    assert v2["diff"]["total_delta"] == "214.20" and v2["diff"]["method_old"] == "average"
    assert "billed by readings, was by average" in v2["reason"]
    # the readings' change to the billed month was accepted by the run that used it, with why
    assert manual_db.execute("SELECT DISTINCT decision, decided_by FROM billed_change WHERE period = %s",
                             (SEP,)).fetchall() == [("accepted", "amr bill")]
    # the ledger carries the charge of v1 and the difference of v2: the latest bill in sum
    assert manual_db.execute("SELECT sum(amount) FROM ledger_entry WHERE account = '501' AND period = %s",
                             (SEP,)).fetchone()[0] == D("2784.60")
    # nothing changed since: a re-run writes nothing
    assert bill_period(manual_db, SEP, ["501"], average_months=3).unchanged == 1


def test_a_changed_readings_month_still_waits_for_a_person(manual_db) -> None:
    # only estimated bills are recalculated without a decision; a readings bill stays closed
    three_months(manual_db)
    read(manual_db, "h-501", (date(2026, 9, 16), "2280"))  # September read up to the 16th
    bill_period(manual_db, SEP, ["501"], average_months=3)
    b = latest(manual_db, "501", SEP)
    assert (b["method"], b["kwh"]) == ("readings", D("200"))
    read(manual_db, "h-501", (OCT, "2470"))  # the rest of September arrives
    [held] = bill_period(manual_db, SEP, ["501"], average_months=3).held_back
    assert held.reason.startswith("changes billed period 2026-09")


def test_no_readings_ever_and_no_rooms_holds_the_bill_back_with_why(manual_db) -> None:
    [held] = bill_period(manual_db, SEP, ["502"], average_months=3).held_back
    assert held.reason.startswith("no readings (no reading before the month)")
    assert "rooms and residents" in held.reason


def test_no_readings_yet_is_billed_by_the_norm(manual_db) -> None:
    bill_period(manual_db, SEP, ["501"], average_months=3)
    b = latest(manual_db, "501", SEP)
    assert (b["method"], b["kwh"], b["total"]) == ("norm", D("222"), D("1585.08"))


def test_amr_bill_json_says_the_method(manual_db, db_url, monkeypatch, capsys) -> None:
    import argparse

    from billing import commands

    three_months(manual_db)
    monkeypatch.setenv("AMR_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        parser = argparse.ArgumentParser(prog="amr")
        commands.register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["bill", "--period", "2026-09", "--account", "501", "--json"])
        assert args.func(args) == 0
    finally:
        get_settings.cache_clear()
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["kind"] == "bill" and "no readings: by the average of 3 month(s)" in first["reason"]


def test_a_norms_file_with_a_bad_cell_is_refused_whole() -> None:
    with pytest.raises(TariffError) as exc:
        parse_norms({"norm": [{"from": "2026-01-01", "to": "2026-12-31", "category": "gas_stove",
                               "rooms": 0, "kwh_per_person": {"1": "-5"}}]}, "n.toml")
    text = str(exc.value)
    assert "key 'rooms': rooms must be a whole number from 1" in text
    assert "key 'kwh_per_person.1': must be positive" in text
