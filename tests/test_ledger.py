"""The account ledger: append-only, idempotent, two components, balances derived from entries.

The property test drives the real ledger in PostgreSQL with any sequence of
bill versions, payments (in any order, with repeats) and reversals, against a
model kept beside it in the test: the balance is charges minus payments per
component, a repeated key books nothing, and no energy payment ever moves the
penalty balance.
"""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amr.settings import Settings
from billing import ledger
from billing.api import TokenStore, create_app
from billing.engine import bill_period
from billing.tariffs import load_catalogue_file, store_catalogue
from tests.test_billing import CATALOGUES, add_subscriber, add_usage

OCT = date(2026, 10, 1)


@pytest.fixture
def acct(conn) -> str:
    conn.execute("INSERT INTO subscriber (account, metering, plan, category, area) VALUES"
                 " ('501', 'amr', 'single', 'gas_stove', 'urban')")
    conn.commit()
    return "501"


def add_bill(conn, account: str, period: date, version: int, total: str) -> None:
    """A bill version as billing writes it (only the columns the ledger reads matter here)."""
    conn.execute(
        "INSERT INTO bill (account, period, version, total, kwh, plan, category, area, reason, fingerprint)"
        " VALUES (%s, %s, %s, %s, 0, 'single', 'gas_stove', 'urban', %s, %s)",
        (account, period, version, Decimal(total), f"version {version}", f"fp-{version}"))


def test_a_repeated_key_books_once_and_a_clash_is_refused(conn, acct) -> None:
    first = ledger.book_payment(conn, acct, OCT, energy=Decimal("100.00"), key="registry:sber:42",
                                source="registry sber", reason="payment", author="import")
    again = ledger.book_payment(conn, acct, OCT, energy=Decimal("100.00"), key="registry:sber:42",
                                source="registry sber", reason="payment", author="import")
    assert first["energy"][1] is True and again["energy"] == (first["energy"][0], False)
    assert ledger.balance(conn, acct) == {"energy": Decimal("-100.00"), "penalty": Decimal("0.00")}
    with pytest.raises(ledger.LedgerError, match=r"registry:sber:42:energy.*was posted before"):
        ledger.book_payment(conn, acct, OCT, energy=Decimal("99.00"), key="registry:sber:42",
                            source="registry sber", reason="payment", author="import")


@pytest.mark.parametrize(("amount", "why"), [("0", "non-zero"), ("1.005", "whole kopecks")])
def test_amounts_are_whole_nonzero_kopecks(conn, acct, amount: str, why: str) -> None:
    with pytest.raises(ledger.LedgerError, match=why):
        ledger.post(conn, acct, "energy", "adjustment", Decimal(amount), OCT, reason="r", author="a", key="k")


def test_entries_are_never_updated_or_deleted(conn, acct) -> None:
    eid, _ = ledger.post(conn, acct, "energy", "charge", Decimal("10.00"), OCT, reason="r", author="a", key="k1")
    conn.commit()
    for sql in ("UPDATE ledger_entry SET amount = 1 WHERE id = %s", "DELETE FROM ledger_entry WHERE id = %s"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(sql, (eid,))
        conn.rollback()
    rev, created = ledger.reverse(conn, eid, reason="posted twice by mistake", author="ops", booked_on=OCT)
    assert created and ledger.reverse(conn, eid, reason="again", author="ops", booked_on=OCT) == (rev, False)
    assert ledger.balance(conn, acct)["energy"] == Decimal("0.00")
    assert [(e.kind, e.amount, e.reverses) for e in ledger.entries(conn, acct)] == [
        ("charge", Decimal("10.00"), None), ("reversal", Decimal("-10.00"), eid)]


def test_each_bill_version_posts_its_difference(conn, acct) -> None:
    add_bill(conn, acct, OCT, 1, "1000.00")
    assert ledger.post_bill_charges(conn, OCT) == 1
    add_bill(conn, acct, OCT, 2, "950.50")  # late data lowered the bill
    add_bill(conn, acct, OCT, 3, "950.50")  # a version equal to the one before posts nothing
    assert ledger.post_bill_charges(conn, OCT) == 1
    assert ledger.post_bill_charges(conn, OCT) == 0  # re-running posts nothing
    charges = [(e.kind, e.amount, e.period) for e in ledger.entries(conn, acct)]
    assert charges == [("charge", Decimal("1000.00"), OCT), ("charge", Decimal("-49.50"), OCT)]
    assert ledger.balance(conn, acct)["energy"] == Decimal("950.50")


def test_balance_at_a_date_counts_what_was_booked_by_then(conn, acct) -> None:
    ledger.post(conn, acct, "energy", "charge", Decimal("300.00"), date(2026, 11, 1), reason="bill", author="b",
                key="c")
    ledger.book_payment(conn, acct, date(2026, 11, 20), energy=Decimal("100.00"), penalty=Decimal("5.00"),
                        key="p", source="card", reason="card", author="portal")
    assert ledger.balance(conn, acct, date(2026, 11, 19))["energy"] == Decimal("300.00")
    assert ledger.balance(conn, acct, date(2026, 11, 20)) == {"energy": Decimal("200.00"),
                                                              "penalty": Decimal("-5.00")}
    assert ledger.balances(conn, date(2026, 11, 20))[acct] == ledger.balance(conn, acct, date(2026, 11, 20))


money = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99999.99"), places=2)
op = st.one_of(
    st.tuples(st.just("bill"), st.integers(0, 2), money),                   # a new version of month k
    st.tuples(st.just("pay"), st.integers(0, 5), money, st.sampled_from(["energy", "penalty", "both"])),
    st.tuples(st.just("accrue"), st.integers(0, 2), money),                 # a penalty accrual
    st.tuples(st.just("reverse"), st.integers(0, 50), st.just(None)),       # reverse the n-th entry
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25))
def test_balance_is_charges_minus_payments_per_component(conn, acct, ops) -> None:
    """Any sequence, repeats included: the ledger agrees with the model, and energy payments
    never reduce the penalty balance."""
    with conn.transaction(force_rollback=True):
        versions: dict[int, int] = {}
        latest: dict[int, Decimal] = {}
        paid: dict[str, Decimal] = {"energy": Decimal(0), "penalty": Decimal(0)}
        accrued = Decimal(0)
        payments: dict[int, tuple[Decimal, str]] = {}  # payment number -> (amount, split): a repeat has the same
        reversed_: dict[str, Decimal] = {"energy": Decimal(0), "penalty": Decimal(0)}
        for i, o in enumerate(ops):
            kind, k, amount = o[0], o[1], o[2]
            if kind == "bill":
                period = date(2026, 1 + k, 1)
                versions[k] = versions.get(k, 0) + 1
                add_bill(conn, acct, period, versions[k], str(amount))
                ledger.post_bill_charges(conn, period)
                latest[k] = amount
            elif kind == "pay":
                amount, split = payments.setdefault(k, (amount, o[3]))  # the same payment again: a repeat
                energy = amount if split in ("energy", "both") else Decimal(0)
                penalty = amount if split in ("penalty", "both") else Decimal(0)
                before = ledger.balance(conn, acct)
                got = ledger.book_payment(conn, acct, OCT, energy=energy, penalty=penalty, key=f"pay:{k}",
                                          source="test", reason="payment", author="test")
                after = ledger.balance(conn, acct)
                if split == "energy":
                    assert after["penalty"] == before["penalty"]  # an energy payment never pays penalties
                if all(created for _, created in got.values()):
                    paid["energy"] += energy
                    paid["penalty"] += penalty
                else:
                    assert after == before  # a repeat books nothing
            elif kind == "accrue":
                accrued += amount
                ledger.post(conn, acct, "penalty", "accrual", amount, OCT + timedelta(days=k), reason="penalty",
                            author="test", key=f"accrual:{i}")
            else:
                rows = ledger.entries(conn, acct)
                cancellable = [e for e in rows if e.kind != "reversal"]
                if cancellable:
                    e = cancellable[k % len(cancellable)]
                    _, created = ledger.reverse(conn, e.id, reason="test", author="test", booked_on=OCT)
                    if created:
                        reversed_[e.component] += e.amount
        want = {
            "energy": sum(latest.values(), Decimal(0)) - paid["energy"] - reversed_["energy"],
            "penalty": accrued - paid["penalty"] - reversed_["penalty"],
        }
        assert ledger.balance(conn, acct) == want


@pytest.fixture
def api(db_url, conn):
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    add_subscriber(conn, "123", "single")
    add_usage(conn, "m-123", OCT, night="10", peak="2", half_peak="3")
    conn.commit()
    bill_period(conn, OCT)
    ledger.book_payment(conn, "123", date(2026, 11, 12), energy=Decimal("20.00"), penalty=Decimal("1.50"),
                        key="registry:test:1", source="registry test", reason="payment by registry",
                        author="import")
    conn.commit()
    app = create_app(Settings(database_url=db_url),
                     TokenStore.from_toml('[[token]]\nname = "a"\ntoken = "tok-a"\naccounts = ["123"]\n', "t.toml"))
    with TestClient(app) as client:
        yield client


def test_the_api_shows_balance_and_debt_per_component_and_the_ledger(api, conn) -> None:
    h = {"Authorization": "Bearer tok-a"}
    [bill_total] = conn.execute("SELECT total FROM bill WHERE account = '123'").fetchone()
    r = api.get("/accounts/0123/balance", headers=h)  # today: the bill was issued today
    assert r.status_code == 200, r.text
    body = r.json()
    assert Decimal(body["energy"]["balance"]) == bill_total - Decimal("20.00")
    assert Decimal(body["energy"]["debt"]) == bill_total - Decimal("20.00")
    assert (Decimal(body["penalty"]["balance"]), Decimal(body["penalty"]["overpaid"])) == (Decimal("-1.50"),
                                                                                          Decimal("1.50"))
    # at a date: what was booked by the end of that day
    early = api.get("/accounts/123/balance", params={"on": "2026-11-11"}, headers=h).json()
    assert Decimal(early["energy"]["balance"]) == 0
    paid = api.get("/accounts/123/balance", params={"on": "2026-11-12"}, headers=h).json()
    assert (Decimal(paid["energy"]["balance"]), Decimal(paid["energy"]["overpaid"])) == (Decimal("-20.00"),
                                                                                        Decimal("20.00"))
    entries = api.get("/accounts/123/ledger", headers=h).json()["entries"]
    assert [(e["kind"], e["component"]) for e in entries] == [
        ("payment", "energy"), ("payment", "penalty"), ("charge", "energy")]  # booking order
    assert "author" not in entries[0]  # the supplier's staff are not shown
    assert api.get("/accounts/456/balance", headers=h).status_code == 404  # not this token's


def test_the_api_shows_penalties_as_the_library_computes_them(api, conn) -> None:
    from billing import penalties as pen

    # January's 1,000.00, due on 10 February, unpaid: on 30 April it is 79 days overdue
    ledger.post(conn, "123", "energy", "charge", Decimal("1000.00"), date(2026, 2, 1), reason="bill for 2026-01",
                author="test", key="jan", period=date(2026, 1, 1))
    conn.commit()
    on = date(2026, 4, 30)
    want = pen.penalties(conn, "123", on)
    assert want and want == pen.penalties(conn, "123", on, ledger="portal_ledger_entry")
    r = api.get("/accounts/123/penalties", params={"on": on.isoformat()}, headers={"Authorization": "Bearer tok-a"})
    assert r.status_code == 200, r.text
    body = r.json()
    jan = next(c for c in body["charges"] if c["period"] == "2026-01")
    assert (jan["due"], jan["days"]) == ("2026-02-10", 79)
    assert Decimal(jan["penalty"]) == next(c.penalty for c in want if c.period == date(2026, 1, 1)) > 0
    fractions = [x["fraction"] for x in jan["ranges"]]
    stages = [f for i, f in enumerate(fractions) if i == 0 or fractions[i - 1] != f]
    assert stages == ["0", "1/300"]  # 30 days free, then 1/300 to day 79
    assert sum(x["days"] for x in jan["ranges"]) == 79
    assert Decimal(body["total"]) == pen.total(want)


def test_a_billing_run_posts_each_new_version_once(conn) -> None:
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    for acc in ("601", "602"):
        add_subscriber(conn, acc, "single")
        add_usage(conn, f"m-{acc}", OCT, night="10", peak="2", half_peak="3")
    conn.commit()
    bill_period(conn, OCT)
    for acc in ("601", "602"):  # late data: a second version of each
        add_usage(conn, f"m-{acc}", date(2026, 10, 2), night="7")
    conn.commit()
    bill_period(conn, OCT)
    bill_period(conn, OCT)  # unchanged: posts nothing
    for acc in ("601", "602"):
        totals = [t for (t,) in conn.execute("SELECT total FROM bill WHERE account = %s ORDER BY version",
                                             (acc,))]
        charges = [e for e in ledger.entries(conn, acc) if e.kind == "charge"]
        assert len(totals) == 2 and len(charges) == 2
        assert sum(e.amount for e in charges) == totals[-1]


def test_a_key_taken_by_hand_does_not_stop_a_billing_run(conn) -> None:
    """The fast path (COPY) meets a key posted by hand: the run falls back and posts the rest."""
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    for acc in ("611", "612"):
        add_subscriber(conn, acc, "single")
        add_usage(conn, f"m-{acc}", OCT, night="10", peak="2", half_peak="3")
    conn.commit()
    ledger.post(conn, "611", "energy", "adjustment", Decimal("1.00"), OCT, reason="by hand", author="ops",
                key="bill:611:2026-10:v1")
    conn.commit()
    s = bill_period(conn, OCT)
    assert s.billed == 2
    [(total,)] = conn.execute("SELECT total FROM bill WHERE account = '612'").fetchall()
    assert [(e.kind, e.amount) for e in ledger.entries(conn, "612")] == [("charge", total)]
    assert [(e.kind, e.amount) for e in ledger.entries(conn, "611")] == [("adjustment", Decimal("1.00"))]
