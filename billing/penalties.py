"""Late-payment penalties (пени, Housing Code art. 155 p. 14) from the ledger.

What the law says (DOMAIN.md "Billing rules"): per unpaid charge, nothing for
the first 30 days after the due date, then 1/300 of the central bank key rate
a day from day 31 to day 90 and 1/130 from day 91, simple interest on the
unpaid amount. The key rate history, the due-date rule, the day stages and the
2020 suspension and 9.5 % caps are data (billing/catalogues/key_rates.toml and
penalty_rules.toml), loaded and checked whole by `load_rules`.

The choices made here, each one a rule a supplier may want to confirm:

- A charge is a billing period's energy: the net of its ledger entries that
  are not payments (bill charges, their re-billing differences, adjustments
  and reversals of those), as booked on or before the day computed. A
  re-billing difference therefore counts from the period's due date, as if the
  corrected bill had been the first. An entry without a period belongs to the
  month it was booked in. A period whose net is negative is a credit, used
  like a payment made on that period's due date.
- Energy payments (kind 'payment', less their reversals) pay the oldest unpaid
  period first, whatever period a payment names: the debt of period k on a day
  is min(its amount, max(0, charges of periods up to k - payments so far)). So
  a payment made before a bill (an advance) pays it, and a reversed payment
  opens the debt again from the reversal's day. Penalty payments never touch
  energy, and energy payments never pay penalties.
- Days are counted from the day after the due date; a payment counts as
  unpaid on its own day (days run "up to and including the day of payment"),
  so an amount paid on day 31 carries one day at 1/300.
- The rate is taken per day: each day at the key rate in force that day, after
  that day's suspension or cap. DOMAIN.md (and the law's wording) says "the key
  rate in force on the day of payment"; the issue says "the rate is the one in
  force on that day". We follow the issue; a single rate on the day of payment
  would be a change in `_calendar` only. Days inside the 2020 suspension still
  count as days overdue; they just accrue nothing.
- The due date is not moved off a weekend or holiday (Civil Code art. 193
  would move it to the next working day): a supplier's setting to add.
- Money: each range contributes amount x rate x days x fraction exactly (in
  integers: kopecks, hundredths of a percent, and the stages' common
  denominator), and a charge's penalty is rounded half-up to the kopeck once.

Key rates after the file's `checked_through` date are not known to be right:
days after it use the last value and mark the result provisional; `accrue`
refuses to post provisional penalties unless told to.

`accrue` is the monthly run: per account and period it posts the increase of
the penalty since the accruals already posted (component 'penalty', kind
'accrual', key `penalty:ACCOUNT:PERIOD:MONTH`), so a second run in the same
month posts nothing. A penalty lower than what was accrued (a bill corrected
down) is reported, not credited: that is an adjustment a person posts.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Any

from amr.errors import ProblemsError, UserError
from amr.tomlfile import TomlFileError, read_toml
from billing.money import KOPECK

CATALOGUES = Path(__file__).resolve().parent / "catalogues"
KEY_RATES_FILE = CATALOGUES / "key_rates.toml"
RULES_FILE = CATALOGUES / "penalty_rules.toml"
RULE_KINDS = ("suspended", "fixed", "cap")
HUNDREDTHS = 100  # rates are kept as integer hundredths of a percent
ZERO = Decimal("0.00")


class PenaltyRulesError(ProblemsError):
    """The key rates or the penalty rules refused whole, every problem named."""

    what = "the penalty rules"


class UncheckedRates(UserError):
    """A penalty to post depends on key rates after the file's `checked_through` date."""


@dataclass(frozen=True)
class Stage:
    from_day: int
    fraction: Fraction

    @property
    def label(self) -> str:
        return "0" if self.fraction == 0 else f"{self.fraction.numerator}/{self.fraction.denominator}"


@dataclass(frozen=True)
class DueRule:
    periods_from: date
    day: int
    source: str = ""


@dataclass(frozen=True)
class Rule:
    start: date
    until: date
    kind: str
    rate: Decimal | None
    source: str

    def label(self) -> str:
        rate = f" {self.rate} %" if self.rate is not None else ""
        return f"{self.kind}{rate} ({self.source})"


@dataclass(frozen=True)
class _Segment:
    start: int  # date ordinal
    key_h: int | None  # key rate, hundredths of a percent (None: before the history)
    applied_h: int | None  # after the day's rule; None: no key rate known
    rule: str | None
    provisional: bool


@dataclass(frozen=True)
class PenaltyRules:
    """The loaded key rates and rules; `due(period)` and the per-day calendar come from it."""

    key_rates: tuple[tuple[date, Decimal], ...]
    checked_through: date
    stages: tuple[Stage, ...]
    due_dates: tuple[DueRule, ...]
    rules: tuple[Rule, ...]
    _cal: tuple[_Segment, ...] = field(default=(), compare=False, repr=False)
    _cal_starts: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # the calendar with neighbours of the same applied rate merged: for sums without ranges
    _sum_starts: tuple[int, ...] = field(default=(), compare=False, repr=False)
    _sum_rates: tuple[tuple[int | None, bool], ...] = field(default=(), compare=False, repr=False)
    _lcm: int = field(default=1, compare=False, repr=False)
    _denominator: int = field(default=1, compare=False, repr=False)
    _mults: tuple[tuple[int, int, str], ...] = field(default=(), compare=False, repr=False)
    _grace: int = field(default=0, compare=False, repr=False)
    _dues: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        cal = _calendar(self)
        object.__setattr__(self, "_cal", cal)
        object.__setattr__(self, "_cal_starts", tuple(s.start for s in cal))
        merged = [seg for k, seg in enumerate(cal)
                  if k == 0 or (seg.applied_h, seg.provisional) != (cal[k - 1].applied_h, cal[k - 1].provisional)]
        object.__setattr__(self, "_sum_starts", tuple(s.start for s in merged))
        object.__setattr__(self, "_sum_rates", tuple((s.applied_h, s.provisional) for s in merged))
        lcm = math.lcm(*[s.fraction.denominator for s in self.stages])
        object.__setattr__(self, "_lcm", lcm)
        # a penalty in kopecks is kopecks x rate in hundredths of a percent x days x mult / this
        object.__setattr__(self, "_denominator", HUNDREDTHS * 100 * lcm)
        object.__setattr__(self, "_mults", tuple(
            (s.from_day, s.fraction.numerator * lcm // s.fraction.denominator, s.label) for s in self.stages))
        # the days after the due date that accrue nothing whatever the rate
        nonzero = [s.from_day for s in self.stages if s.fraction != 0]
        object.__setattr__(self, "_grace", (nonzero[0] - 1) if nonzero else 10**9)

    def _due_ordinal(self, period: int) -> int:
        due = self._dues.get(period)
        if due is None:
            due = self._dues[period] = self.due(date.fromordinal(period)).toordinal()
        return due

    def due(self, period: date) -> date:
        """The last day to pay the bill of `period` (a month) without being late."""
        period = period.replace(day=1)
        rule = None
        for r in self.due_dates:
            if r.periods_from <= period:
                rule = r
        if rule is None:
            raise UserError(f"no due-date rule covers the period {period:%Y-%m}: "
                            f"add a [[due_date]] with periods_from on or before it to {RULES_FILE.name}")
        nxt = (period + timedelta(days=32)).replace(day=1)
        return nxt.replace(day=rule.day)

    def key_rate(self, day: date) -> Decimal:
        i = bisect_right([d for d, _ in self.key_rates], day) - 1
        if i < 0:
            raise UserError(f"no key rate for {day}: {KEY_RATES_FILE.name} starts on {self.key_rates[0][0]}")
        return self.key_rates[i][1]

    def _segment(self, ordinal: int) -> _Segment:
        return self._cal[bisect_right(self._cal_starts, ordinal) - 1]

    def stage(self, day_number: int) -> Stage:
        found = self.stages[0]
        for s in self.stages:
            if s.from_day <= day_number:
                found = s
        return found


def _calendar(rules: PenaltyRules) -> tuple[_Segment, ...]:
    """Days cut where the key rate, a rule, or the checked_through date changes."""
    bounds = {date.min.toordinal()} | {d.toordinal() for d, _ in rules.key_rates}
    for r in rules.rules:
        bounds |= {r.start.toordinal(), r.until.toordinal()}
    bounds.add(rules.checked_through.toordinal() + 1)
    starts = [d for d, _ in rules.key_rates]
    out = []
    for b in sorted(bounds):
        day = date.fromordinal(b)
        i = bisect_right(starts, day) - 1
        key_h = None if i < 0 else int(rules.key_rates[i][1] * HUNDREDTHS)
        rule = next((r for r in rules.rules if r.start <= day < r.until), None)
        applied_h = key_h
        if rule is not None:
            if rule.kind == "suspended":
                applied_h = 0
            elif rule.kind == "fixed":
                applied_h = int(rule.rate * HUNDREDTHS) if rule.rate is not None else None
            elif key_h is not None and rule.rate is not None:
                applied_h = min(key_h, int(rule.rate * HUNDREDTHS))
        out.append(_Segment(b, key_h, applied_h, rule.label() if rule else None, day > rules.checked_through))
    return tuple(out)


# ---------------------------------------------------------------- loading


def _rate(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"not a rate like \"9.50\": {value!r}")
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"not a rate like \"9.50\": {value!r}") from None
    if not d.is_finite() or d <= 0:
        raise ValueError(f"a rate is a positive percent: {value!r}")
    if d != d.quantize(KOPECK):
        raise ValueError(f"at most two decimals (hundredths of a percent): {value!r}")
    return d


def _day(value: Any) -> date:
    if isinstance(value, date) and not hasattr(value, "hour"):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"not a date like 2026-02-16: {value!r}") from None


def _fraction(value: Any) -> Fraction:
    text = str(value).strip()
    if text == "0":
        return Fraction(0)
    num, sep, den = text.partition("/")
    if sep and num.isdigit() and den.isdigit() and int(den) > 0:
        return Fraction(int(num), int(den))
    raise ValueError(f"not a fraction like \"1/300\" (or \"0\"): {value!r}")


def _check_keys(entry: Any, where: str, known: set[str], problems: list[str]) -> bool:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a table")
        return False
    for key in sorted(set(entry) - known):
        problems.append(f"{where}: key {key!r}: unknown (known: {', '.join(sorted(known))})")
    return True


def parse_key_rates(doc: dict[str, Any], where: str) -> tuple[tuple[tuple[date, Decimal], ...], date | None,
                                                                list[str]]:
    problems: list[str] = []
    for key in sorted(set(doc) - {"checked_through", "rates"}):
        problems.append(f"{where}: key {key!r}: unknown (known: checked_through, rates)")
    checked = None
    try:
        checked = _day(doc["checked_through"])
    except KeyError:
        problems.append(f"{where}: key 'checked_through': missing (the last date the history was checked)")
    except ValueError as exc:
        problems.append(f"{where}: key 'checked_through': {exc}")
    raw = doc.get("rates")
    out: list[tuple[date, Decimal]] = []
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: key 'rates': missing or empty (a list of {{ from = 2026-02-16, rate = \"15.50\" }})")
        return (), checked, problems
    for i, entry in enumerate(raw):
        at = f"{where}: rates[{i}]"
        if not _check_keys(entry, at, {"from", "rate"}, problems):
            continue
        try:
            day = _day(entry["from"])
            rate = _rate(entry["rate"])
        except KeyError as exc:
            problems.append(f"{at}: key {exc.args[0]!r}: missing")
            continue
        except ValueError as exc:
            problems.append(f"{at}: {exc}")
            continue
        if out and day <= out[-1][0]:
            problems.append(f"{at}: {day} is not after the entry before it ({out[-1][0]}): list changes in date order")
        out.append((day, rate))
    if checked is not None and out and checked < out[-1][0]:
        problems.append(f"{where}: key 'checked_through': {checked} is before the last change {out[-1][0]}")
    return tuple(out), checked, problems


def parse_rules(doc: dict[str, Any], where: str) -> tuple[tuple[Stage, ...], tuple[DueRule, ...],
                                                          tuple[Rule, ...], list[str]]:
    problems: list[str] = []
    for key in sorted(set(doc) - {"stage", "due_date", "rule"}):
        problems.append(f"{where}: key {key!r}: unknown (known: stage, due_date, rule)")
    stages: list[Stage] = []
    for i, entry in enumerate(doc.get("stage") or []):
        at = f"{where}: stage[{i}]"
        if not _check_keys(entry, at, {"from_day", "fraction"}, problems):
            continue
        fd = entry.get("from_day")
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 1:
            problems.append(f"{at}: key 'from_day': a day number from 1, got {fd!r}")
            continue
        try:
            stages.append(Stage(fd, _fraction(entry.get("fraction"))))
        except ValueError as exc:
            problems.append(f"{at}: key 'fraction': {exc}")
    if not doc.get("stage"):
        problems.append(f"{where}: no [[stage]]: the days after the due date need their fractions")
    elif (stages and stages[0].from_day != 1) or any(b.from_day <= a.from_day for a, b in pairwise(stages)):
        problems.append(f"{where}: stages must start at from_day = 1 and go up")
    dues: list[DueRule] = []
    for i, entry in enumerate(doc.get("due_date") or []):
        at = f"{where}: due_date[{i}]"
        if not _check_keys(entry, at, {"periods_from", "day", "source"}, problems):
            continue
        try:
            pf = _day(entry.get("periods_from"))
        except ValueError as exc:
            problems.append(f"{at}: key 'periods_from': {exc}")
            continue
        day = entry.get("day")
        if pf.day != 1:
            problems.append(f"{at}: key 'periods_from': a billing month starts on the 1st, got {pf}")
        if not isinstance(day, int) or isinstance(day, bool) or not 1 <= day <= 28:
            problems.append(f"{at}: key 'day': a day of the month 1-28, got {day!r}")
            continue
        if dues and pf <= dues[-1].periods_from:
            problems.append(f"{at}: periods_from {pf} is not after the entry before it: list them in date order")
        dues.append(DueRule(pf, day, str(entry.get("source", ""))))
    if not doc.get("due_date"):
        problems.append(f"{where}: no [[due_date]]: the due date is a dated rule and needs at least one entry")
    rules: list[Rule] = []
    for i, entry in enumerate(doc.get("rule") or []):
        at = f"{where}: rule[{i}]"
        if not _check_keys(entry, at, {"from", "until", "kind", "rate", "source"}, problems):
            continue
        try:
            start, until = _day(entry.get("from")), _day(entry.get("until"))
        except ValueError as exc:
            problems.append(f"{at}: {exc}")
            continue
        kind = entry.get("kind")
        if kind not in RULE_KINDS:
            problems.append(f"{at}: key 'kind': {kind!r} is not one of {', '.join(RULE_KINDS)}")
            continue
        rate = None
        if kind == "suspended":
            if "rate" in entry:
                problems.append(f"{at}: key 'rate': a suspension has no rate")
        else:
            try:
                rate = _rate(entry.get("rate"))
            except ValueError as exc:
                problems.append(f"{at}: key 'rate': {exc}")
                continue
        if until <= start:
            problems.append(f"{at}: key 'until': {until} is not after 'from' {start}")
            continue
        if not entry.get("source"):
            problems.append(f"{at}: key 'source': missing (the decree the rule comes from)")
        for j, other in enumerate(rules):
            if start < other.until and other.start < until:
                problems.append(f"{at}: {start}..{until} overlaps rule[{j}] {other.start}..{other.until}")
        rules.append(Rule(start, until, kind, rate, str(entry.get("source", ""))))
    return tuple(stages), tuple(dues), tuple(rules), problems


def load_rules(key_rates: Path | str = KEY_RATES_FILE, rules: Path | str = RULES_FILE) -> PenaltyRules:
    """Both files, checked whole: any problem refuses them with every problem listed."""
    problems: list[str] = []
    docs = []
    for path in (key_rates, rules):
        try:
            docs.append(read_toml(path))
        except TomlFileError as exc:
            problems.append(str(exc))
            docs.append({})
    if problems:
        raise PenaltyRulesError(problems)
    rates, checked, p1 = parse_key_rates(docs[0], str(key_rates))
    stages, dues, rule_list, p2 = parse_rules(docs[1], str(rules))
    if p1 or p2 or checked is None:
        raise PenaltyRulesError(p1 + p2)
    return PenaltyRules(rates, checked, stages, dues, rule_list)


_DEFAULT: PenaltyRules | None = None


def default_rules() -> PenaltyRules:
    """The shipped catalogues, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_rules()
    return _DEFAULT


# ---------------------------------------------------------------- computing


@dataclass(frozen=True)
class DayRange:
    """Days of one charge with the same unpaid amount, rate and fraction."""

    start: date
    end: date
    unpaid: Decimal
    key_rate: Decimal | None
    rate: Decimal  # applied, after the day's suspension or cap
    fraction: str  # "0", "1/300", "1/130"
    rule: str | None
    penalty: Decimal  # this range's part, to 1/100 of a kopeck (the charge is rounded once)
    provisional: bool = False  # the key rate is past the file's checked_through date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.start.isoformat(), "to": self.end.isoformat(), "days": self.days,
                "unpaid": str(self.unpaid), "key_rate": None if self.key_rate is None else str(self.key_rate),
                "rate": str(self.rate), "fraction": self.fraction, "rule": self.rule, "penalty": str(self.penalty),
                "provisional": self.provisional}


@dataclass(frozen=True)
class ChargePenalty:
    """The penalty of one period's energy charge of one account, as of a day."""

    account: str
    period: date
    amount: Decimal  # the period's charge
    due: date
    days: int  # days overdue: from the day after `due` to the last day any of it was unpaid
    unpaid: Decimal  # still unpaid at the end of the day computed
    penalty: Decimal  # rounded half-up to the kopeck, once
    provisional: bool  # depends on key rates after the file's checked_through date
    ranges: tuple[DayRange, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"period": self.period.strftime("%Y-%m"), "amount": str(self.amount), "due": self.due.isoformat(),
                "days": self.days, "penalty": str(self.penalty), "unpaid": str(self.unpaid),
                "provisional": self.provisional, "ranges": [r.as_dict() for r in self.ranges]}


@dataclass
class _Account:
    charge_days: list[int]  # period (first of month) ordinals, oldest first
    charge_kop: list[int]  # kopecks of each entry (a period may have several)
    pay_days: list[int]  # day ordinals, in order
    pay_kop: list[int]  # kopecks paid by each entry (a payment's reversal: negative)


# where the ledger is read from: the table, or the customer account's view of it (the
# API's role may read only portal_* views); both have the columns read here
LEDGER_SOURCES = ("ledger_entry", "portal_ledger_entry")


def _load(conn: Any, on: date, accounts: Sequence[str] | None,
          ledger: str = "ledger_entry") -> dict[str, _Account]:
    """Energy charges (by period) and energy payments (by day) of each account, in one query.

    Amounts come as integer kopecks and days as ordinals, gathered into arrays
    per account (entries of the same period or day stay apart; the arithmetic
    adds them up), so a many-account run parses few, cheap values. A reversal
    is a payment when what it reverses is one (joined through the unique index
    on `reverses`, so the common rows need no lookup).
    """
    if ledger not in LEDGER_SOURCES:
        raise ValueError(f"ledger source {ledger!r}: expected one of {', '.join(LEDGER_SOURCES)}")
    day = ("CASE WHEN {paid} THEN e.booked_on ELSE coalesce(e.period, date_trunc('month', e.booked_on)::date)"
           " END - date '0001-01-01' + 1")  # a Python date ordinal
    where = "e.component = 'energy' AND e.booked_on <= %(on)s AND (%(acc)s::text[] IS NULL OR e.account = ANY(%(acc)s))"
    rows = conn.execute(
        f"""WITH e AS (
               SELECT e.account, e.kind = 'payment' AS paid, {day.format(paid="e.kind = 'payment'")} AS day,
                      (e.amount * 100)::bigint AS kop
               FROM {ledger} e WHERE e.reverses IS NULL AND {where}
               UNION ALL
               SELECT e.account, r.kind = 'payment', {day.format(paid="r.kind = 'payment'")},
                      (e.amount * 100)::bigint
               FROM {ledger} e JOIN {ledger} r ON r.id = e.reverses
               WHERE e.reverses IS NOT NULL AND {where})
           SELECT account,
                  coalesce(array_agg(day ORDER BY day) FILTER (WHERE NOT paid), '{{}}'),
                  coalesce(array_agg(kop ORDER BY day) FILTER (WHERE NOT paid), '{{}}'),
                  coalesce(array_agg(day ORDER BY day) FILTER (WHERE paid), '{{}}'),
                  coalesce(array_agg(-kop ORDER BY day) FILTER (WHERE paid), '{{}}')
           FROM e GROUP BY account""",
        {"on": on, "acc": list(accounts) if accounts is not None else None})
    return {r[0]: _Account(r[1], r[2], r[3], r[4]) for r in rows}


def _kopecks(k: int) -> Decimal:
    return Decimal(k).scaleb(-2)


def _round_half_up(num: int, den: int) -> int:
    """num / den (both >= 0) rounded half-up to an integer."""
    return (2 * num + den) // (2 * den)


def _account_penalties(account: str, acc: _Account, on: date, rules: PenaltyRules,
                       detail: bool) -> list[ChargePenalty]:
    denominator = rules._denominator
    mults = rules._mults
    grace = rules._grace
    due_of = rules._due_ordinal
    end = on.toordinal()

    # a period whose net is negative is a credit: paid on that period's due date
    charges: list[tuple[int, int, int]] = []  # (period ordinal, kopecks, due ordinal)
    pay_days, pay_kop = acc.pay_days, acc.pay_kop
    credits = []
    nets: list[list[int]] = []  # [period, kopecks]: entries of one period added up
    for period, kop in zip(acc.charge_days, acc.charge_kop, strict=True):
        if nets and nets[-1][0] == period:
            nets[-1][1] += kop
        else:
            nets.append([period, kop])
    for period, kop in nets:
        due = due_of(period)
        if kop > 0:
            charges.append((period, kop, due))
        elif kop < 0 and due <= end:
            credits.append((due, -kop))
    if credits:
        merged = sorted([*zip(pay_days, pay_kop, strict=True), *credits])
        pay_days, pay_kop = [d for d, _ in merged], [k for _, k in merged]
    pay_cum: list[int] = []
    days: list[int] = []
    running = 0
    monotonic = True
    for day, kop in zip(pay_days, pay_kop, strict=True):
        running += kop
        if kop < 0:
            monotonic = False
        if days and days[-1] == day:
            pay_cum[-1] = running
        else:
            days.append(day)
            pay_cum.append(running)
    pay_days = days
    paid_total = running

    def paid_through(day: int) -> int:  # payments booked on or before `day`
        i = bisect_right(pay_days, day) - 1
        return pay_cum[i] if i >= 0 else 0

    out: list[ChargePenalty] = []
    upto = 0  # charges of this and older periods
    for period, amount, due in charges:
        upto += amount
        if monotonic:
            if paid_total >= upto:
                settled = pay_days[bisect_left(pay_cum, upto)]  # the day the last of it was paid
                if settled <= due:
                    continue  # paid in time
                left = 0
                overdue = settled - due
            else:
                left = min(amount, upto - paid_total)
                overdue = end - due
            if overdue <= 0:
                out.append(ChargePenalty(account, date.fromordinal(period), _kopecks(amount),
                                         date.fromordinal(due), 0, _kopecks(left), ZERO, False))
                continue
            if overdue <= grace and not detail:
                out.append(ChargePenalty(account, date.fromordinal(period), _kopecks(amount),
                                         date.fromordinal(due), overdue, _kopecks(left), ZERO, False))
                continue

        def unpaid(day: int, upto: int = upto, amount: int = amount) -> int:  # owed during `day`
            return min(amount, max(0, upto - paid_through(day - 1)))

        if not monotonic:
            left = unpaid(end + 1)
            overdue = _last_unpaid_day(due, end, unpaid, pay_days) - due if due < end else 0
            if overdue <= 0 and not left:
                continue
        if overdue <= 0:
            out.append(ChargePenalty(account, date.fromordinal(period), _kopecks(amount), date.fromordinal(due),
                                     0, _kopecks(left), ZERO, False))
            continue
        if detail:
            num, provisional, ranges = _walk(due, end, unpaid, pay_days, rules, mults, denominator, True)
        else:
            num, provisional = _walk_sum(due, end, upto, amount, pay_days, pay_cum, rules)
            ranges = ()
        out.append(ChargePenalty(account, date.fromordinal(period), _kopecks(amount), date.fromordinal(due),
                                 overdue, _kopecks(left), _kopecks(_round_half_up(num, denominator)),
                                 provisional, ranges))
    return out


def _pay_cuts(pay_days: Sequence[int], first: int, end: int) -> list[int]:
    """Days in first+1..end on which the unpaid amount may change: the day after each payment."""
    lo = bisect_right(pay_days, first - 1)
    hi = bisect_right(pay_days, end - 1)
    return [d + 1 for d in pay_days[lo:hi]]


def _last_unpaid_day(due: int, end: int, unpaid: Any, pay_days: Sequence[int]) -> int:
    """The last day in due+1..end with anything unpaid, or `due` when there is none."""
    if unpaid(end):
        return end
    cuts = [due + 1, *_pay_cuts(pay_days, due + 1, end)]
    for k in range(len(cuts) - 1, -1, -1):
        if unpaid(cuts[k]):
            return (cuts[k + 1] - 1) if k + 1 < len(cuts) else end
    return due


def _walk(due: int, end: int, unpaid: Any, pay_days: Sequence[int], rules: PenaltyRules,
          mults: Sequence[tuple[int, int, str]], denominator: int, detail: bool,
          ) -> tuple[int, bool, tuple[DayRange, ...]]:
    """Sum amount x rate x days x fraction over the ranges in which none of them changes."""
    first = due + 1
    points = {first}
    points |= {due + fd for fd, _, _ in mults if first < due + fd <= end}
    starts = rules._cal_starts
    i = bisect_right(starts, first)
    while i < len(starts) and starts[i] <= end:
        points.add(starts[i])
        i += 1
    points.update(_pay_cuts(pay_days, first, end))
    cuts = sorted(points)
    num = 0
    provisional = False
    spans: list[list[Any]] = []  # [start, end, owed, key_h, applied, label, rule, provisional, part]
    for k, a in enumerate(cuts):
        b = cuts[k + 1] - 1 if k + 1 < len(cuts) else end
        owed = unpaid(a)
        n = a - due
        mult, label = 0, "0"
        for fd, m, lab in mults:
            if fd <= n:
                mult, label = m, lab
        seg = rules._segment(a)
        if seg.applied_h is None:
            if owed and mult:
                raise UserError(f"no key rate for {date.fromordinal(a)}: {KEY_RATES_FILE.name} starts on "
                                f"{rules.key_rates[0][0]}")
            applied = 0
        else:
            applied = seg.applied_h
        part = owed * applied * (b - a + 1) * mult
        if part and seg.provisional:
            provisional = True
        num += part
        if detail and owed:
            same = (owed, seg.key_h, applied, label, seg.rule, seg.provisional)
            if spans and spans[-1][1] == a - 1 and tuple(spans[-1][2:8]) == same:
                spans[-1][1] = b  # nothing the reader sees changed: one range
                spans[-1][8] += part
            else:
                spans.append([a, b, *same, part])
    ranges = tuple(
        DayRange(date.fromordinal(a), date.fromordinal(b), _kopecks(owed),
                 None if key_h is None else (Decimal(key_h) / HUNDREDTHS).quantize(KOPECK),
                 (Decimal(applied) / HUNDREDTHS).quantize(KOPECK), label, rule,
                 (Decimal(part) / (denominator * 100)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP), prov)
        for a, b, owed, key_h, applied, label, rule, prov, part in spans)
    return num, provisional, ranges


def _walk_sum(due: int, end: int, upto: int, amount: int, pay_days: Sequence[int], pay_cum: Sequence[int],
              rules: PenaltyRules) -> tuple[int, bool]:
    """`_walk` without the ranges, for the many-account run: the same sum over fewer, merged cuts."""
    mults = rules._mults
    first = due + rules._grace + 1  # the days before accrue nothing
    if first > end:
        return 0, False
    points = {first}
    points.update(due + fd for fd, _, _ in mults if first < due + fd <= end)
    starts = rules._sum_starts
    i = bisect_right(starts, first)
    n_starts = len(starts)
    while i < n_starts and starts[i] <= end:
        points.add(starts[i])
        i += 1
    lo = bisect_right(pay_days, first - 1)
    hi = bisect_right(pay_days, end - 1)
    points.update(d + 1 for d in pay_days[lo:hi])
    cuts = sorted(points)
    rates = rules._sum_rates
    num = 0
    provisional = False
    last = len(cuts) - 1
    for k, a in enumerate(cuts):
        j = bisect_right(pay_days, a - 1) - 1
        owed = upto - (pay_cum[j] if j >= 0 else 0)
        if owed <= 0:
            continue
        if owed > amount:
            owed = amount
        n = a - due
        mult = 0
        for fd, m, _ in mults:
            if fd <= n:
                mult = m
        applied, prov = rates[bisect_right(starts, a) - 1]
        if applied is None:
            raise UserError(f"no key rate for {date.fromordinal(a)}: {KEY_RATES_FILE.name} starts on "
                            f"{rules.key_rates[0][0]}")
        b = cuts[k + 1] - 1 if k < last else end
        part = owed * applied * (b - a + 1) * mult
        if part:
            num += part
            provisional = provisional or prov
    return num, provisional


def penalties_many(conn: Any, on: date, accounts: Sequence[str] | None = None, *,
                   rules: PenaltyRules | None = None, detail: bool = False,
                   ledger: str = "ledger_entry") -> dict[str, list[ChargePenalty]]:
    """Every account's charges that are or were overdue, with their penalty as of the end of `on`.

    One query over the ledger for all accounts (or those named), then the
    arithmetic per account in integers; `detail` adds the day ranges (for
    display; the monthly run and the benchmark leave them out).
    """
    rules = rules or default_rules()
    out: dict[str, list[ChargePenalty]] = {}
    for account, acc in _load(conn, on, accounts, ledger).items():
        found = _account_penalties(account, acc, on, rules, detail)
        if found:
            out[account] = found
    return out


def penalties(conn: Any, account: str, on: date, *, rules: PenaltyRules | None = None,
              ledger: str = "ledger_entry") -> list[ChargePenalty]:
    """One account's overdue or unpaid charges with their day ranges, oldest period first."""
    return penalties_many(conn, on, [account], rules=rules, detail=True, ledger=ledger).get(account, [])


def total(charges: Iterable[ChargePenalty]) -> Decimal:
    return sum((c.penalty for c in charges), Decimal("0.00"))


@dataclass
class AccrualSummary:
    """What one monthly run posted: entries, their sum, and what it left alone and why."""

    on: date
    posted: int = 0
    amount: Decimal = ZERO
    unchanged: int = 0  # charges whose penalty was accrued in full before
    already_this_month: int = 0  # an accrual for the account, period and month exists: a repeated run
    lower: list[tuple[str, date, Decimal, Decimal]] = field(default_factory=list)  # (account, period, now, accrued)


def accrual_key(account: str, period: date, on: date) -> str:
    return f"penalty:{account}:{period:%Y-%m}:{on:%Y-%m}"


def accrue(conn: Any, on: date, accounts: Sequence[str] | None = None, *, rules: PenaltyRules | None = None,
           author: str = "billing", allow_provisional: bool = False) -> AccrualSummary:
    """The monthly run: post each charge's penalty increase since the accruals before, booked on `on`.

    One entry per account and period and month of `on` (its idempotency key),
    so running it twice in a month posts once. A penalty that depends on key
    rates past the file's checked_through date is refused (nothing posted)
    unless `allow_provisional`. The caller commits.
    """
    rules = rules or default_rules()
    found = penalties_many(conn, on, accounts, rules=rules)
    acc = list(accounts) if accounts is not None else None
    accrued: dict[tuple[str, date], Decimal] = {
        (a, p): Decimal(t) for a, p, t in conn.execute(
            """SELECT e.account, e.period, sum(e.amount) FROM ledger_entry e
               WHERE e.component = 'penalty' AND e.period IS NOT NULL
                 AND (e.kind = 'accrual' OR (e.kind = 'reversal' AND EXISTS (
                      SELECT 1 FROM ledger_entry r WHERE r.id = e.reverses AND r.kind = 'accrual')))
                 AND (%(acc)s::text[] IS NULL OR e.account = ANY(%(acc)s))
               GROUP BY e.account, e.period""", {"acc": acc})}
    done = {k for (k,) in conn.execute(
        "SELECT idempotency_key FROM ledger_entry WHERE component = 'penalty' AND kind = 'accrual'"
        " AND idempotency_key LIKE %s", (f"penalty:%:{on:%Y-%m}",))}
    summary = AccrualSummary(on)
    rows = []
    unchecked = []
    for account, charges in found.items():
        for c in charges:
            before = accrued.get((account, c.period), ZERO)
            key = accrual_key(account, c.period, on)
            if c.penalty == before:
                summary.unchanged += c.penalty > 0
                continue
            if key in done:
                summary.already_this_month += 1
                continue
            if c.penalty < before:
                summary.lower.append((account, c.period, c.penalty, before))
                continue
            if c.provisional:
                unchecked.append(f"{account} {c.period:%Y-%m}")
            delta = c.penalty - before
            reason = (f"penalty for {c.period:%Y-%m} as of {on} (Housing Code art. 155 p. 14): "
                      f"{c.penalty} in all, {before} accrued before")
            rows.append((account, delta, on, c.period, reason, author, key))
    if unchecked and not allow_provisional:
        raise UncheckedRates(
            f"{len(unchecked)} penalties (first: account {unchecked[0]}) use key rates after "
            f"{rules.checked_through}, the date {KEY_RATES_FILE.name} was checked through: add the key rate "
            "changes since then and move checked_through, or accrue with --allow-unchecked-rates; nothing posted")
    if rows:
        # COPY into a scratch table, then one INSERT: a row per statement is ten times as slow
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE penalty_accrual_in (account text, amount numeric(14, 2),"
                        " booked_on date, period date, reason text, author text, idempotency_key text)")
            try:
                with cur.copy("COPY penalty_accrual_in FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                posted, amount = cur.execute(
                    """WITH ins AS (
                           INSERT INTO ledger_entry (account, component, kind, amount, booked_on, period, source,
                                                     reason, author, idempotency_key)
                           SELECT account, 'penalty', 'accrual', amount, booked_on, period, 'penalties', reason,
                                  author, idempotency_key FROM penalty_accrual_in
                           ON CONFLICT (idempotency_key) DO NOTHING RETURNING amount)
                       SELECT count(*), coalesce(sum(amount), 0) FROM ins""").fetchone()
            finally:
                cur.execute("DROP TABLE IF EXISTS penalty_accrual_in")
        summary.posted = int(posted)
        summary.amount = Decimal(amount).quantize(KOPECK)
    return summary
