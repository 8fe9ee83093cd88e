"""Penalties (Housing Code art. 155 p. 14) against the real ledger, each case worked by hand.

Charges and payments are posted with billing.ledger directly (no bill is
needed to owe money). The rules are the shipped catalogues: due on the 10th
of the next month (the 15th from the February 2026 period); nothing for days
1-30 after the due date, 1/300 of the rate a day for days 31-90, 1/130 from
day 91; a payment's own day still counts; the rate each day after the 2020
suspension and the 9.5 % caps; rounded half-up once per charge.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amr.cli import main
from amr.settings import get_settings
from billing import ledger
from billing.penalties import (
    PenaltyRulesError,
    UncheckedRates,
    _Account,
    _account_penalties,
    accrue,
    default_rules,
    load_rules,
    penalties,
    penalties_many,
)
from tests.test_billing import add_subscriber

D = Decimal
ACCOUNT = "42"


def charge(conn: psycopg.Connection, period: date, amount: str, account: str = ACCOUNT) -> None:
    ledger.post(conn, account, "energy", "charge", D(amount), period + timedelta(days=35), reason="test bill",
                author="test", key=f"bill:{account}:{period:%Y-%m}:v1", period=period)


def pay(conn: psycopg.Connection, day: date, amount: str, account: str = ACCOUNT, period: date | None = None,
        ) -> None:
    ledger.book_payment(conn, account, day, energy=D(amount), key=f"pay:{account}:{day}:{amount}",
                        source="test", reason="test payment", author="test", period=period)


@pytest.fixture
def acct(conn: psycopg.Connection) -> psycopg.Connection:
    add_subscriber(conn, ACCOUNT, "single")
    return conn


def only(conn: psycopg.Connection, on: date) -> tuple[Decimal, int]:
    [c] = penalties(conn, ACCOUNT, on)
    return c.penalty, c.days


# Period 2022-09, due 2022-10-10. From 23.09.2022 the rate is the lower of 9.5 %
# and the key rate, and the key rate is 7.50 % from 19.09.2022 to 23.07.2023:
# every day below is at 7.50 %. 1000.00 x 7.50 % = 75.00 a year's "rate amount".
SEP22 = date(2022, 9, 1)
DUE = date(2022, 10, 10)


@pytest.mark.parametrize(("day", "expected"), [
    # day 30 = 2022-11-09: still inside the 30 days that accrue nothing
    (30, "0.00"),
    # day 31 = 2022-11-10: one day at 1/300: 75.00 / 300 = 0.25
    (31, "0.25"),
    # day 90 = 2023-01-08: days 31-90 are 60 days at 1/300: 75.00 x 60 / 300 = 15.00
    (90, "15.00"),
    # day 91 = 2023-01-09: 15.00 + one day at 1/130: 75.00 / 130 = 0.576923...; 15.576923 -> 15.58
    (91, "15.58"),
    # day 200 = 2023-04-28: 15.00 + 110 days at 1/130: 75.00 x 110 / 130 = 63.461538...; 78.461538 -> 78.46
    (200, "78.46"),
])
def test_a_debt_paid_on_day_n(acct: psycopg.Connection, day: int, expected: str) -> None:
    charge(acct, SEP22, "1000.00")
    paid_on = DUE + timedelta(days=day)
    assert paid_on == {30: date(2022, 11, 9), 31: date(2022, 11, 10), 90: date(2023, 1, 8),
                       91: date(2023, 1, 9), 200: date(2023, 4, 28)}[day]
    pay(acct, paid_on, "1000.00")
    # the day of payment counts, and nothing accrues after it: the same later
    for on in (paid_on, paid_on + timedelta(days=400)):
        [c] = penalties(acct, ACCOUNT, on)
        assert (c.penalty, c.days, c.unpaid, c.due) == (D(expected), day, D("0.00"), DUE)
    # unpaid instead, counted up to the --on date: the same days, the same penalty
    assert penalties(acct, ACCOUNT, paid_on - timedelta(days=1))[0].days == day - 1


def test_unpaid_counts_up_to_the_on_date(acct: psycopg.Connection) -> None:
    charge(acct, SEP22, "1000.00")
    assert only(acct, DUE + timedelta(days=91)) == (D("15.58"), 91)
    assert only(acct, DUE + timedelta(days=200)) == (D("78.46"), 200)


def test_across_a_key_rate_change_rounded_once(acct: psycopg.Connection) -> None:
    # Period 2021-01, due 2021-02-10; no suspension or cap in 2021. Day 31 is
    # 2021-03-13. The key rate is 4.25 % to 21.03.2021 and 4.50 % from 22.03.2021.
    # Paid 2021-03-31, day 49: days 31-49 = 9 days at 4.25 % + 10 days at 4.50 %.
    #   123.45 x 4.25 % x 9 / 300  = 5.246625 x 9 / 300 = 0.15739875
    #   123.45 x 4.50 % x 10 / 300 = 5.55525 x 10 / 300 = 0.185175
    #   sum 0.34257375 -> 0.34 (rounding each part first would give 0.16 + 0.19 = 0.35)
    charge(acct, date(2021, 1, 1), "123.45")
    pay(acct, date(2021, 3, 31), "123.45")
    [c] = penalties(acct, ACCOUNT, date(2021, 6, 1))
    assert (c.due, c.days, c.penalty) == (date(2021, 2, 10), 49, D("0.34"))
    accruing = [(r.start, r.end, r.days, r.key_rate, r.rate, r.fraction, r.penalty) for r in c.ranges
                if r.fraction != "0"]
    assert accruing == [
        (date(2021, 3, 13), date(2021, 3, 21), 9, D("4.25"), D("4.25"), "1/300", D("0.1574")),
        (date(2021, 3, 22), date(2021, 3, 31), 10, D("4.50"), D("4.50"), "1/300", D("0.1852")),
    ]
    # the first 30 days are shown too, at fraction 0
    assert (c.ranges[0].start, c.ranges[0].end, c.ranges[0].fraction) == (date(2021, 2, 11), date(2021, 3, 12), "0")


def test_inside_the_2020_suspension(acct: psycopg.Connection) -> None:
    # Period 2020-01, due 2020-02-10; day 31 = 2020-03-12. Penalties are
    # suspended from 06.04.2020 to 31.12.2020 (Decree 424). Key rate 6.00 %
    # from 10.02.2020. Paid 2020-06-30: only 2020-03-12..2020-04-05 accrue,
    # 25 days at 1/300: 1000.00 x 6 % x 25 / 300 = 60 x 25 / 300 = 5.00.
    charge(acct, date(2020, 1, 1), "1000.00")
    pay(acct, date(2020, 6, 30), "1000.00")
    assert only(acct, date(2020, 7, 1)) == (D("5.00"), 141)


def test_suspended_days_still_count_as_days_overdue(acct: psycopg.Connection) -> None:
    # Period 2020-05, due 2020-06-10, unpaid. Every day to 31.12.2020 is
    # suspended: nothing. 2021-01-01 is day 205 (20 + 31 + 31 + 30 + 31 + 30 + 31 + 1),
    # so 1/130 already: on 2021-01-10, 10 days at the key rate 4.25 %:
    # 1000.00 x 4.25 % x 10 / 130 = 425 / 130 = 3.269230... -> 3.27.
    charge(acct, date(2020, 5, 1), "1000.00")
    assert only(acct, date(2020, 12, 31)) == (D("0.00"), 204)
    assert only(acct, date(2021, 1, 10)) == (D("3.27"), 214)


def test_under_the_9_5_percent_cap(acct: psycopg.Connection) -> None:
    # Period 2023-12, due 2024-01-10. Key rate 16 % (from 18.12.2023 to
    # 28.07.2024); from 23.09.2022 the rate is the lower of 9.5 % and the key
    # rate: 9.5 %. Paid 2024-04-19, day 100 (21 + 29 + 31 + 19; 2024 is a leap year):
    #   days 31-90:  1000.00 x 9.5 % x 60 / 300 = 95 x 60 / 300 = 19.00
    #   days 91-100: 1000.00 x 9.5 % x 10 / 130 = 950 / 130 = 7.307692...
    #   26.307692 -> 26.31
    charge(acct, date(2023, 12, 1), "1000.00")
    pay(acct, date(2024, 4, 19), "1000.00")
    [c] = penalties(acct, ACCOUNT, date(2024, 12, 31))
    assert (c.days, c.penalty) == (100, D("26.31"))
    assert {(r.key_rate, r.rate) for r in c.ranges} == {(D("16.00"), D("9.50"))}


def test_fixed_at_9_5_from_february_2022(acct: psycopg.Connection) -> None:
    # Period 2022-01, due 2022-02-10, day 31 = 2022-03-13. The key rate is
    # 20 % from 28.02.2022, but Decree 474 fixes 9.5 % from that day. Paid
    # 2022-03-22, day 40: 10 days at 1/300: 1000.00 x 9.5 % x 10 / 300 = 3.1666... -> 3.17.
    charge(acct, date(2022, 1, 1), "1000.00")
    pay(acct, date(2022, 3, 22), "1000.00")
    [c] = penalties(acct, ACCOUNT, date(2022, 4, 1))
    assert (c.days, c.penalty) == (40, D("3.17"))
    assert [(r.key_rate, r.rate) for r in c.ranges if r.fraction == "1/300"] == [(D("20.00"), D("9.50"))]


def test_payments_pay_the_oldest_period_first(acct: psycopg.Connection) -> None:
    # 2023-10: 500.00 due 2023-11-10; 2023-11: 300.00 due 2023-12-10. One payment
    # of 600.00 on 2023-12-20 that names 2023-11 pays 2023-10 first (its day 40),
    # then 100.00 of 2023-11 (its day 10), leaving 200.00 of it unpaid. Rate 9.5 % (cap).
    #   2023-10: days 31-40, 500.00 x 9.5 % x 10 / 300 = 47.5 x 10 / 300 = 1.5833 -> 1.58
    #   2023-11 on 2024-02-29 (day 21 + 31 + 29 = 81): days 31-81 = 51 days on 200.00:
    #            200.00 x 9.5 % x 51 / 300 = 19 x 51 / 300 = 3.23
    charge(acct, date(2023, 10, 1), "500.00")
    charge(acct, date(2023, 11, 1), "300.00")
    pay(acct, date(2023, 12, 20), "600.00", period=date(2023, 11, 1))
    oct_, nov = penalties(acct, ACCOUNT, date(2024, 2, 29))
    assert (oct_.period, oct_.days, oct_.unpaid, oct_.penalty) == (date(2023, 10, 1), 40, D("0.00"), D("1.58"))
    assert (nov.period, nov.days, nov.unpaid, nov.penalty) == (date(2023, 11, 1), 81, D("200.00"), D("3.23"))
    # an energy payment never pays penalties, a penalty payment never pays energy
    ledger.book_payment(acct, ACCOUNT, date(2024, 2, 29), penalty=D("1.58"), key="pay-pen", source="test",
                        reason="penalty paid", author="test")
    assert [c.penalty for c in penalties(acct, ACCOUNT, date(2024, 2, 29))] == [D("1.58"), D("3.23")]


def test_a_reversed_payment_opens_the_debt_again(acct: psycopg.Connection) -> None:
    # Period 2023-12, due 2024-01-10, paid 2024-01-15 (day 5: nothing), and that
    # payment reversed 2024-02-20: owed again from 2024-02-21. On 2024-03-20
    # (day 70): days 31-70, 2024-02-10..2024-03-20; the reversal's own day
    # 2024-02-20 still counts as paid, so 2024-02-21..2024-03-20 = 29 days:
    #   1000.00 x 9.5 % x 29 / 300 = 95 x 29 / 300 = 9.1833 -> 9.18
    charge(acct, date(2023, 12, 1), "1000.00")
    pay(acct, date(2024, 1, 15), "1000.00")
    [entry] = [e for e in ledger.entries(acct, ACCOUNT) if e.kind == "payment"]
    ledger.reverse(acct, entry.id, reason="bank recalled it", author="test", booked_on=date(2024, 2, 20))
    assert only(acct, date(2024, 3, 20)) == (D("9.18"), 70)


def test_due_dates_are_a_dated_rule() -> None:
    rules = default_rules()
    assert rules.due(date(2026, 1, 1)) == date(2026, 2, 10)
    assert rules.due(date(2026, 2, 1)) == date(2026, 3, 15)  # the first period due on the 15th
    assert rules.due(date(2025, 12, 1)) == date(2026, 1, 10)


def test_many_accounts_at_once_match_one_by_one(conn: psycopg.Connection) -> None:
    for i, (period, paid_on) in enumerate([(SEP22, DUE + timedelta(days=91)), (date(2023, 12, 1), None),
                                           (date(2021, 1, 1), date(2021, 3, 31))]):
        account = str(100 + i)
        add_subscriber(conn, account, "single")
        charge(conn, period, "1000.00", account)
        if paid_on:
            pay(conn, paid_on, "1000.00", account)
    on = date(2024, 4, 19)
    many = penalties_many(conn, on)
    assert sorted(many) == ["100", "101", "102"]
    for account, charges in many.items():
        assert [(c.period, c.penalty, c.days) for c in charges] == [
            (c.period, c.penalty, c.days) for c in penalties(conn, account, on)]
    assert many["101"][0].penalty == D("26.31")  # the cap case, unpaid up to its day 100


def test_accrue_posts_the_increase_once_per_month(acct: psycopg.Connection) -> None:
    # 2023-12, 1000.00 due 2024-01-10, unpaid (9.5 %). On 2024-03-31 (day 81):
    # days 31-81, 51 days: 95 x 51 / 300 = 16.15. On 2024-04-19 (day 100): 26.31.
    charge(acct, date(2023, 12, 1), "1000.00")
    first = accrue(acct, date(2024, 3, 31))
    assert (first.posted, first.amount) == (1, D("16.15"))
    again = accrue(acct, date(2024, 3, 31))
    assert (again.posted, again.unchanged) == (0, 1)
    later_same_month = accrue(acct, date(2024, 3, 31))
    assert later_same_month.posted == 0
    april = accrue(acct, date(2024, 4, 19))
    assert (april.posted, april.amount) == (1, D("26.31") - D("16.15"))
    acct.commit()
    rows = acct.execute("SELECT amount, booked_on, period, idempotency_key FROM ledger_entry"
                        " WHERE component = 'penalty' ORDER BY id").fetchall()
    assert rows == [(D("16.15"), date(2024, 3, 31), date(2023, 12, 1), "penalty:42:2023-12:2024-03"),
                    (D("10.16"), date(2024, 4, 19), date(2023, 12, 1), "penalty:42:2023-12:2024-04")]
    assert ledger.balance(acct, ACCOUNT)["penalty"] == D("26.31")
    assert accrue(acct, date(2024, 4, 19)).posted == 0


def test_accrue_refuses_unchecked_key_rates(acct: psycopg.Connection) -> None:
    # 2025-12 due 2026-01-10; by 2026-04-30 its days 31.. run past the file's checked_through
    charge(acct, date(2025, 12, 1), "1000.00")
    [c] = penalties(acct, ACCOUNT, date(2026, 4, 30))
    assert c.provisional and c.penalty > 0
    with pytest.raises(UncheckedRates, match="checked through"):
        accrue(acct, date(2026, 4, 30))
    assert acct.execute("SELECT count(*) FROM ledger_entry WHERE component = 'penalty'").fetchone() == (0,)
    assert accrue(acct, date(2026, 4, 30), allow_provisional=True).posted == 1


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AMR_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def amr(*argv: str) -> int:
    get_settings.cache_clear()
    return main(list(argv))


def test_cli_json_shape(acct: psycopg.Connection, env: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    charge(acct, date(2023, 12, 1), "1000.00")  # unpaid: on 2024-04-19 it is day 100, 26.31 (the cap case)
    charge(acct, date(2024, 3, 1), "250.00")  # due 2024-04-10: 9 days late, nothing yet
    acct.commit()
    assert amr("penalties", "--account", "0042", "--on", "2024-04-19", "--json") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[-1] == {"total": "26.31"}
    assert [{k: c[k] for k in ("period", "amount", "due", "days", "penalty")} for c in lines[:-1]] == [
        {"period": "2023-12", "amount": "1000.00", "due": "2024-01-10", "days": 100, "penalty": "26.31"},
        {"period": "2024-03", "amount": "250.00", "due": "2024-04-10", "days": 9, "penalty": "0.00"},
    ]
    assert [r["fraction"] for r in lines[0]["ranges"]] == ["0", "1/300", "1/130"]
    # the text form says the same
    assert amr("penalties", "--account", "42", "--on", "2024-04-19") == 0
    out = capsys.readouterr().out
    assert "2023-12: charge 1000.00, due 2024-01-10, 100 days overdue" in out
    assert out.rstrip().endswith("total penalty 26.31")


def test_cli_accrue_twice_posts_once(acct: psycopg.Connection, env: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    charge(acct, date(2023, 12, 1), "1000.00")
    acct.commit()
    assert amr("penalties", "--accrue", "--on", "2024-04-19") == 0
    assert "posted 1 accruals, 26.31 in all" in capsys.readouterr().out
    assert amr("penalties", "--accrue", "--on", "2024-04-19", "--json") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (summary["posted"], summary["unchanged"]) == (0, 1)
    assert acct.execute("SELECT sum(amount) FROM ledger_entry WHERE component = 'penalty'").fetchone() == (
        D("26.31"),)


def test_cli_errors(acct: psycopg.Connection, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert amr("penalties", "--account", "777", "--on", "2024-04-19") == 2
    assert "no account 777" in capsys.readouterr().err
    assert amr("penalties", "--on", "2024-04-19") == 2
    assert "--account N" in capsys.readouterr().err


def test_a_bad_rules_file_is_refused_with_every_problem(tmp_path: Path) -> None:
    rates = tmp_path / "rates.toml"
    rates.write_text('rates = [ { from = 2020-01-01, rate = "6.005" }, { from = 2019-01-01, rate = "-1" } ]\n')
    rules = tmp_path / "rules.toml"
    rules.write_text('[[stage]]\nfrom_day = 1\nfraction = "0"\n'
                     '[[due_date]]\nperiods_from = 2020-01-15\nday = 31\n'
                     '[[rule]]\nfrom = 2020-04-06\nuntil = 2021-01-01\nkind = "pause"\nsource = "x"\n')
    with pytest.raises(PenaltyRulesError) as err:
        load_rules(rates, rules)
    text = err.value.describe()
    for expected in ("key 'checked_through': missing", "rates[0]: at most two decimals",
                     "rates[1]: a rate is a positive percent", "due_date[0]: key 'periods_from': a billing month",
                     "due_date[0]: key 'day': a day of the month 1-28", "rule[0]: key 'kind': 'pause'"):
        assert expected in text, expected
    assert text.startswith("6 problem(s) in the penalty rules")


def _by_hand(acc_charges: list[tuple[date, int]], acc_pays: list[tuple[date, int]], on: date,
             ) -> dict[date, Decimal]:
    """The law read literally, one day at a time in exact fractions: the reference for the fast paths."""
    rules = default_rules()

    def rate(day: date) -> Fraction:
        key = Fraction(str([r for d, r in rules.key_rates if d <= day][-1]))
        for r in rules.rules:
            if r.start <= day < r.until:
                if r.kind == "suspended" or r.rate is None:
                    return Fraction(0)
                cap = Fraction(str(r.rate))
                return cap if r.kind == "fixed" else min(key, cap)
        return key

    def fraction(n: int) -> Fraction:
        return Fraction(0) if n <= 30 else Fraction(1, 300) if n <= 90 else Fraction(1, 130)

    nets: dict[date, int] = {}
    for period, kop in acc_charges:
        nets[period] = nets.get(period, 0) + kop
    payments = list(acc_pays) + [(rules.due(p), -k) for p, k in nets.items() if k < 0 and rules.due(p) <= on]
    out = {}
    upto = 0
    for period in sorted(p for p, k in nets.items() if k > 0):
        amount = nets[period]
        upto += amount
        due = rules.due(period)
        total = Fraction(0)
        day = due + timedelta(days=1)
        while day <= on:
            paid = sum(k for d, k in payments if d < day)
            owed = min(amount, max(0, upto - paid))
            total += Fraction(owed, 100) * rate(day) / 100 * fraction((day - due).days)
            day += timedelta(days=1)
        out[period] = Decimal(total.numerator) / Decimal(total.denominator)
    return {p: v.quantize(D("0.01"), rounding="ROUND_HALF_UP") for p, v in out.items()}


_periods = st.dates(date(2019, 6, 1), date(2023, 6, 1)).map(lambda d: d.replace(day=1))
_days = st.dates(date(2019, 6, 1), date(2024, 6, 30))


@settings(max_examples=60, deadline=None)
@given(charges=st.lists(st.tuples(_periods, st.integers(-20000, 200000)), min_size=1, max_size=4),
       pays=st.lists(st.tuples(_days, st.integers(-50000, 200000).filter(bool)), max_size=5),
       on=st.dates(date(2020, 1, 1), date(2024, 6, 30)))
def test_fast_paths_agree_with_the_law_read_day_by_day(charges, pays, on) -> None:
    pays = [(d, k) for d, k in pays if d <= on]
    charges = sorted(charges)
    acc = _Account([p.toordinal() for p, _ in charges], [k for _, k in charges],
                   [d.toordinal() for d, _ in sorted(pays)], [k for _, k in sorted(pays)])
    expected = _by_hand(charges, pays, on)
    for detail in (True, False):
        got = {c.period: c.penalty for c in _account_penalties("1", acc, on, default_rules(), detail)}
        for period, penalty in expected.items():
            assert got.get(period, D("0.00")) == penalty, (detail, period)
