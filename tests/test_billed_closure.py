"""A billed month changes only through a visible decision; a dip never moves a billed month.

The field case: readings 100 (1 Oct), 200 (1 Nov), 195 (15 Nov), 300 (1 Dec). Both 200
and 195 used to be judged glitches, so October's energy moved into November and
October's bill was re-issued on its own. Against the real PostgreSQL; the commands a
billing clerk runs (`amr bill`, `amr suspect list`, `amr suspect accept`) as subprocesses.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

from adapters.reading import Reading
from billing.closure import decide_period, open_changes
from billing.engine import bill_period, bills_of
from billing.tariffs import load_catalogue_file, store_catalogue
from collector.ingest.ingestor import Ingestor
from tests.helpers import add_meters
from tests.test_billing import CATALOGUES
from tests.test_ingest_cli import amr

MSK = timezone(timedelta(hours=3))
OCT, NOV = date(2025, 10, 1), date(2025, 11, 1)


def at(y: int, m: int, d: int) -> datetime:
    return datetime(y, m, d, tzinfo=MSK)


def setup(conn, meter: str, account: str) -> Ingestor:
    add_meters(conn, meter, account=account, plan="single", installed="2025-01-01T00:00:00+03:00")
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    conn.commit()
    return Ingestor(conn)


def month_kwh(conn, account: str, period: date) -> Decimal:
    return bills_of(conn, account, period)[-1]["kwh"]


def test_a_dip_keeps_its_correct_neighbour_and_the_billed_month(conn) -> None:
    ing = setup(conn, "dip", "5001")
    r = lambda ts, v: Reading("dip", "1.8.0", ts, Decimal(v))  # noqa: E731
    ing.ingest([r(at(2025, 10, 1), 100), r(at(2025, 11, 1), 200)])
    assert bill_period(conn, OCT).billed == 1
    before = bills_of(conn, "5001", OCT)
    assert before[-1]["kwh"] == Decimal(100)

    ing.ingest([r(at(2025, 11, 15), 195)])  # the mistyped dip arrives, alone at the end
    ing.ingest([r(at(2025, 12, 1), 300)])
    flags = dict(conn.execute("SELECT value, quality FROM reading WHERE meter_id = 'dip'").fetchall())
    assert "glitch" in flags[Decimal(195)] and "glitch" not in flags[Decimal(200)]
    # October keeps its bill and its energy: nothing changed there, nothing waits
    again = bill_period(conn, OCT)
    assert (again.unchanged, again.new_versions, again.held_back) == (1, 0, [])
    assert bills_of(conn, "5001", OCT) == before
    assert open_changes(conn) == []
    # November gets the 100 kWh from 200 to 300
    assert bill_period(conn, NOV).billed == 1
    assert month_kwh(conn, "5001", NOV) == Decimal(100)


def test_a_spike_is_still_the_one_out_of_line(conn) -> None:
    ing = setup(conn, "spk", "5002")
    ing.ingest([Reading("spk", "1.8.0", at(2025, 10, 1 + k), Decimal(v))
                for k, v in enumerate([100, 101, 9999, 103, 104])])
    flags = [q for (q,) in conn.execute("SELECT quality FROM reading WHERE meter_id = 'spk' ORDER BY ts")]
    assert ["glitch" in q for q in flags] == [False, False, True, False, False]


def test_a_late_reading_holds_the_billed_month_until_accepted(db_url, conn) -> None:
    ing = setup(conn, "late", "5003")
    r = lambda ts, v: Reading("late", "1.8.0", ts, Decimal(v))  # noqa: E731
    # a gap from 1 Oct to 20 Nov: its energy is placed by time, October gets 31/50 of it
    ing.ingest([r(at(2025, 9, 1), 0), r(at(2025, 10, 1), 100), r(at(2025, 11, 20), 600)])
    assert bill_period(conn, OCT).billed == 1
    v1 = bills_of(conn, "5003", OCT)
    assert abs(v1[-1]["kwh"] - Decimal(310)) < Decimal("0.001")  # zone parts are kept to the Wh

    ing.ingest([r(at(2025, 11, 1), 300)])  # the reading of 1 Nov arrives late: October was 200
    assert conn.execute("SELECT count(*) FROM reading WHERE meter_id = 'late'").fetchone()[0] == 4
    # the data is stored (the portal's daily totals follow it) but the bill is held, visibly
    res = amr(db_url, "bill", "--period", "2025-10", "--json")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    held = [x for x in lines if x["kind"] == "held_back"]
    assert len(held) == 1 and "changes billed period 2025-10" in held[0]["reason"], lines
    assert bills_of(conn, "5003", OCT) == v1

    listed = amr(db_url, "suspect", "list", "--account", "5003", "--json")
    changes = [json.loads(x) for x in listed.stdout.splitlines()]
    change = next(c for c in changes if c["kind"] == "billed_period")
    assert change["period"] == "2025-10" and change["version"] == 1
    assert change["reason"] == "changes billed period 2025-10"
    assert Decimal(change["billed_total"]) == v1[-1]["total"]
    rate = v1[-1]["lines"][0].rate
    assert abs(Decimal(change["delta"]) - Decimal(-110) * rate) < Decimal("0.01")
    assert {i["meter_id"] for i in change["intervals"]} == {"late"}
    text = amr(db_url, "suspect", "list", "--account", "5003").stdout
    assert "changes billed period 2025-10" in text and "amr suspect accept --account 5003 --period 2025-10" in text

    res = amr(db_url, "suspect", "accept", "--account", "5003", "--period", "2025-10", "--by", "clerk")
    assert res.returncode == 0, res.stderr
    assert "new version 2" in res.stdout and "accepted by clerk" in res.stdout
    v2 = bills_of(conn, "5003", OCT)[-1]
    assert v2["version"] == 2 and v2["kwh"] == Decimal(200)
    assert "accepted by clerk" in v2["reason"] and v2["diff"]["total_delta"] == change["delta"]
    assert v2["total"] - v1[-1]["total"] == Decimal(change["delta"])
    assert open_changes(conn) == []


def test_rejected_changes_keep_the_billed_version(conn) -> None:
    ing = setup(conn, "rej", "5004")
    r = lambda ts, v: Reading("rej", "1.8.0", ts, Decimal(v))  # noqa: E731
    ing.ingest([r(at(2025, 9, 1), 0), r(at(2025, 10, 1), 100), r(at(2025, 11, 20), 600)])
    bill_period(conn, OCT)
    ing.ingest([r(at(2025, 11, 1), 300)])
    n, run = decide_period(conn, "5004", OCT, "rejected", "clerk", "a typo on the card")
    assert n >= 1 and run is None
    again = bill_period(conn, OCT)
    assert again.new_versions == 0 and "stays at version 1" in again.held_back[0].reason
    assert [b["version"] for b in bills_of(conn, "5004", OCT)] == [1]


def test_a_new_month_is_not_held(conn) -> None:
    """Appending readings of a month nobody billed yet records nothing."""
    ing = setup(conn, "cur", "5005")
    ing.ingest([Reading("cur", "1.8.0", at(2025, 10, 1) + timedelta(minutes=30 * k), Decimal(k))
                for k in range(48)])
    bill_period(conn, date(2025, 9, 1))  # an earlier month: held back (no data), but no bill
    ing.ingest([Reading("cur", "1.8.0", at(2025, 10, 2) + timedelta(minutes=30 * k), Decimal(48 + k))
                for k in range(48)])
    assert conn.execute("SELECT count(*) FROM billed_change").fetchone()[0] == 0
    assert datetime.now(UTC) > at(2025, 10, 3)
