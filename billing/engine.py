"""Billing runs: a calendar month of stored zone energy priced into versioned bills.

The run is set-based so that a whole city bills in seconds: one SQL aggregate
gives each account's energy per stored zone and per run of days with one
rate; Python folds it to the plan, prices and rounds each line (the one rule
in `billing.money`) and compares it with the latest stored version; new and
changed bills go back with COPY, all in one transaction.

Rules held here:
- a tariff change inside the month splits it by day: one line per plan zone
  and per run of days with one rate;
- a bill is never edited: changed data makes a new version with the reason and
  the difference, unchanged data makes nothing;
- energy marked suspect holds the account's bill back until a person accepts
  or rejects it (`amr suspect`); so do days without a tariff and volume bands,
  whose sharing rule is not confirmed;
- a meter replaced mid-month: every meter of the account counts, each only
  for the local days between its installation and removal.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from amr import metrics
from billing import money
from billing.tariffs import Catalogue, load_db_catalogue
from collector.inventory import normalize_account
from collector.rules.vocabulary import FOLD, PLAN_ZONES, STORED_ZONES

ZERO = Decimal(0)
Progress = Callable[[int, int], None]


class Line(NamedTuple):
    """One bill line: a plan zone over a run of days with one rate."""

    zone: str
    date_from: date
    date_to: date
    kwh: Decimal
    estimated_kwh: Decimal
    rate: Decimal
    amount: Decimal

    def as_dict(self) -> dict[str, str]:
        return {"zone": self.zone, "date_from": self.date_from.isoformat(),
                "date_to": self.date_to.isoformat(), "kwh": _num(self.kwh),
                "estimated_kwh": _num(self.estimated_kwh), "rate": _num(self.rate),
                "amount": str(self.amount)}

    def canonical(self) -> str:
        """Quantities normalised: 1.500000 and 1.5 kWh are the same line.

        Only for fingerprints, so it favours speed over looks (days as ordinals,
        decimals possibly in exponent form); a city's run makes 300,000 of them.
        """
        return (f"{self.zone},{self.date_from.toordinal()},{self.date_to.toordinal()},"
                f"{self.kwh.normalize()},{self.estimated_kwh.normalize()},{self.rate},{self.amount}")


@dataclass(frozen=True)
class Bill:
    account: str
    period: date
    plan: str
    category: str
    area: str
    lines: tuple[Line, ...]

    @property
    def total(self) -> Decimal:
        return money.total([ln.amount for ln in self.lines])

    @property
    def kwh(self) -> Decimal:
        return sum((ln.kwh for ln in self.lines), ZERO)

    @property
    def estimated_kwh(self) -> Decimal:
        return sum((ln.estimated_kwh for ln in self.lines), ZERO)

    def fingerprint(self) -> str:
        """Same content, same fingerprint: how a re-run knows nothing changed."""
        text = ";".join([self.plan, *(ln.canonical() for ln in self.lines)])
        return hashlib.sha256(text.encode()).hexdigest()


class UnknownAccounts(ValueError):
    """Accounts named for a run that are not in the database (a typo bills nobody)."""


@dataclass(frozen=True)
class Held:
    account: str
    reason: str


@dataclass
class RunSummary:
    period: date
    billed: int = 0  # first versions written
    unchanged: int = 0
    new_versions: int = 0
    held_back: list[Held] = field(default_factory=list)
    seconds: float = 0.0
    written: list[tuple[str, int, str]] = field(default_factory=list)  # account, version, reason
    phases: dict[str, float] = field(default_factory=dict)  # seconds since the start, per phase

    def as_dict(self) -> dict[str, Any]:
        return {"period": self.period.strftime("%Y-%m"), "billed": self.billed,
                "unchanged": self.unchanged, "new_versions": self.new_versions,
                "held_back": len(self.held_back), "seconds": round(self.seconds, 3)}


def _num(d: Decimal) -> str:
    """A canonical text for a quantity: 1.500000 and 1.5 are the same energy."""
    if d == 0:
        return "0"
    return format(d.normalize(), "f")


def parse_period(text: str) -> date:
    """'2026-10' (or a date inside the month) to the first day of the month."""
    try:
        if len(text) == 7:
            y, m = text.split("-")
            return date(int(y), int(m), 1)
        d = date.fromisoformat(text)
        return d.replace(day=1)
    except ValueError:
        raise ValueError(f"period must be a month like 2026-10, got {text!r}") from None


def month_days(period: date) -> tuple[date, date]:
    last = calendar.monthrange(period.year, period.month)[1]
    return period, period.replace(day=last)


def fold(zone_kwh: Mapping[str, Decimal], plan: str) -> dict[str, Decimal]:
    """Stored zones (night, peak, half_peak) to the zones of a plan; the sum is kept."""
    mapping = FOLD[plan]
    out = dict.fromkeys(PLAN_ZONES[plan], ZERO)
    for zone, kwh in zone_kwh.items():
        out[mapping[zone]] += kwh
    return out


# an account's energy per (piece of the month, from 1; stored zone): (kWh, of which estimated)
Usage = Mapping[tuple[int, str], tuple[Decimal, Decimal]]
ZoneUsage = dict[tuple[int, str], tuple[Decimal, Decimal]]  # the same, as `_usage` builds it


class PlanSegment(NamedTuple):
    """A run of days with one rate for a plan: its rates and the pieces of the month it spans."""

    date_from: date
    date_to: date
    rates: dict[str, Decimal]
    pieces: list[int]


def price(account: str, period: date, plan: str, category: str, area: str,
          pieces: Sequence[tuple[date, date]], usage: Usage,
          catalogue: Catalogue, memo: dict[tuple[str, str, str], list[PlanSegment] | str] | None = None,
          ) -> Bill | Held:
    """One account's bill from its energy per (piece of the month, stored zone).

    `pieces` cut the month at every date where any tariff changes, so each
    run of days with one rate is a union of whole pieces. `memo` keeps the
    plan's segments between accounts of one run.
    """
    key = (plan, category, area)
    plan_segs = memo.get(key) if memo is not None else None
    if plan_segs is None:
        plan_segs = _plan_segments(period, plan, category, area, pieces, catalogue)
        if memo is not None:
            memo[key] = plan_segs
    if isinstance(plan_segs, str):
        return Held(account, plan_segs)
    lines: list[Line] = []
    for seg in plan_segs:
        stored_kwh, stored_est = _stored_energy(usage, seg.pieces)
        kwh, est = fold(stored_kwh, plan), fold(stored_est, plan)
        for pz in PLAN_ZONES[plan]:
            rate = seg.rates[pz]
            lines.append(Line(pz, seg.date_from, seg.date_to, kwh[pz], est[pz], rate,
                              money.line_amount(kwh[pz], rate)))
    return Bill(account, period, plan, category, area, tuple(lines))


def _stored_energy(usage: Usage, piece_ids: Sequence[int]) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """Energy per stored zone over some pieces of the month, and its estimated part."""
    kwh: dict[str, Decimal] = {}
    est: dict[str, Decimal] = {}
    for zone in STORED_ZONES:
        k = e = ZERO
        for i in piece_ids:
            got = usage.get((i, zone))
            if got is not None:
                k += got[0]
                e += got[1]
        kwh[zone], est[zone] = k, e
    return kwh, est


def _plan_segments(period: date, plan: str, category: str, area: str,
                   pieces: Sequence[tuple[date, date]], catalogue: Catalogue) -> list[PlanSegment] | str:
    """The runs of days with one rate for a plan, with their rates and pieces; or why none."""
    first, last = month_days(period)
    out = []
    for seg_from, seg_to, tariffs in catalogue.segments(category, area, plan, first, last):
        if tariffs is None:
            return f"no tariff for {category}/{area}/{plan} on {seg_from}..{seg_to}"
        if len(tariffs) > 1 or tariffs[0].band_to_kwh is not None:
            return (f"volume bands in the tariff for {category}/{area}/{plan} from {seg_from}: "
                    "how zone volumes share bands is not confirmed yet")
        ids = [i for i, (p_from, p_to) in enumerate(pieces, start=1)
               if seg_from <= p_from and p_to <= seg_to]
        out.append(PlanSegment(seg_from, seg_to, dict(tariffs[0].rates), ids))
    return out


def _pieces(catalogue: Catalogue, first: date, last: date) -> list[tuple[date, date]]:
    cuts = {first}
    for t in catalogue.tariffs:
        for d in (t.valid_from, t.valid_to + timedelta(days=1)):
            if first < d <= last:
                cuts.add(d)
    starts = sorted(cuts)
    return [(s, (starts[i + 1] - timedelta(days=1)) if i + 1 < len(starts) else last)
            for i, s in enumerate(starts)]


def describe_change(old_lines: list[Line], new: Bill, old_total: Decimal) -> tuple[str, dict]:
    """The reason and the difference a new version carries, for a person and for machines."""
    old_by = {(ln.zone, ln.date_from): ln for ln in old_lines}
    new_by = {(ln.zone, ln.date_from): ln for ln in new.lines}
    what = set()
    diff_lines = []
    for key in sorted(set(old_by) | set(new_by), key=lambda k: (k[1], k[0])):
        o, n = old_by.get(key), new_by.get(key)
        if o and n and o == n:
            continue
        if not o or not n or o.kwh != n.kwh:
            what.add("energy")
        if o and n and o.rate != n.rate:
            what.add("rates")
        if o and n and o.estimated_kwh != n.estimated_kwh:
            what.add("estimates")
        diff_lines.append({
            "zone": key[0], "date_from": key[1].isoformat(),
            "kwh_old": _num(o.kwh) if o else None, "kwh_new": _num(n.kwh) if n else None,
            "rate_old": _num(o.rate) if o else None, "rate_new": _num(n.rate) if n else None,
            "amount_old": str(o.amount) if o else None, "amount_new": str(n.amount) if n else None,
        })
    delta = new.total - old_total
    reason = (f"{' and '.join(sorted(what)) or 'content'} changed: total {old_total} -> "
              f"{new.total} ({'+' if delta >= 0 else ''}{delta})")
    return reason, {"total_old": str(old_total), "total_new": str(new.total),
                    "total_delta": str(delta), "lines": diff_lines}


def _usage(conn: Any, pieces: Sequence[tuple[date, date]], first: date, last: date, tz: str,
           wanted: list[str] | None) -> tuple[dict[str, ZoneUsage], dict[str, Decimal]]:
    """Each account's energy per (piece of the month, stored zone), and its suspect energy.

    Energy of every meter in the month by one plain aggregate (the fast path for a whole
    city); then, for the few meters in service only part of the month, the energy of
    the days outside their service is taken off again, exactly, in Decimal.
    """
    params = {"bounds": [p[0] for p in pieces], "first": first, "last": last, "tz": tz,
              "accounts": wanted}
    piece = "width_bucket(d.day, %(bounds)s::date[])" if len(pieces) > 1 else "1"
    only = (" AND d.meter_id IN (SELECT id FROM meter WHERE account = ANY(%(accounts)s))"
            if wanted is not None else "")
    account_of = dict(conn.execute("SELECT id, account FROM meter").fetchall())
    per_meter = conn.execute(
        f"SELECT d.meter_id, {piece}, d.zone, sum(d.kwh), sum(d.estimated_kwh), sum(d.suspect_kwh)"
        " FROM daily_zone_usage d WHERE d.day BETWEEN %(first)s AND %(last)s" + only
        + " GROUP BY 1, 2, 3", params).fetchall()
    params["partial"] = [r[0] for r in conn.execute(
        "SELECT id FROM meter WHERE (installed AT TIME ZONE %(tz)s)::date > %(first)s"
        " OR (removed AT TIME ZONE %(tz)s)::date < %(last)s", params).fetchall()]
    outside = conn.execute(
        f"SELECT d.meter_id, {piece}, d.zone, sum(d.kwh), sum(d.estimated_kwh), sum(d.suspect_kwh)"
        " FROM daily_zone_usage d JOIN meter m ON m.id = d.meter_id"
        " WHERE d.meter_id = ANY(%(partial)s::text[]) AND d.day BETWEEN %(first)s AND %(last)s"
        " AND (d.day < (m.installed AT TIME ZONE %(tz)s)::date"
        "  OR d.day > (m.removed AT TIME ZONE %(tz)s)::date)" + only
        + " GROUP BY 1, 2, 3", params).fetchall() if params["partial"] else []
    # accounts with several meters (a replacement) add up here; subtractions come last
    usage: dict[str, ZoneUsage] = {}
    suspect: dict[str, Decimal] = {}
    for sign, rows in ((1, per_meter), (-1, outside)):
        for meter_id, i, zone, kwh, est, sus in rows:
            account = account_of.get(meter_id)
            if account is None:  # usage of a meter no longer in the inventory: nobody's bill
                continue
            acc = usage.setdefault(account, {})
            had = acc.get((i, zone))
            if sign < 0:
                kwh, est, sus = -kwh, -est, -sus
            acc[(i, zone)] = (kwh, est) if had is None else (had[0] + kwh, had[1] + est)
            if sus:
                suspect[account] = suspect.get(account, ZERO) + sus
    return usage, {a: v for a, v in suspect.items() if v}


# --- a billing run ------------------------------------------------------------------

NewBill = tuple[Bill, int, str, dict[str, Any] | None]  # a version to write: bill, version, reason, difference
_BATCH = 2000  # bills per COPY write, and accounts between progress reports


class Latest(NamedTuple):
    """An account's latest stored bill version for the period: what a new bill is compared with."""

    version: int
    fingerprint: str
    total: Decimal


# what a run decides for an account's priced bill (or it holds the bill back: a `Held`)
FIRST = "first"  # no bill for the period yet: version 1
UNCHANGED = "unchanged"  # same content as the latest version: nothing is written
SETTLED = "settled"  # unchanged, and the changes awaiting a decision turn out to change nothing
NEW_VERSION = "new_version"  # the content changed: a new version with the reason and the difference

_OPEN_NONE = (False, False)


@dataclass
class Month:
    """What a run gathers before pricing anyone: tariffs, subscribers, energy, bills so far."""

    period: date
    catalogue: Catalogue
    pieces: list[tuple[date, date]]
    subscribers: list[tuple[str, str, str, str]]  # account, plan, category, area; by account
    usage: dict[str, ZoneUsage]
    suspect: dict[str, Decimal]
    latest: dict[str, Latest] = field(default_factory=dict)
    closure: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    memo: dict[tuple[str, str, str], list[PlanSegment] | str] = field(default_factory=dict)

    def judge(self, account: str, plan: str, category: str, area: str) -> tuple[str, Bill] | Held:
        """One account: held back before pricing, held by its price or its billed month, or a decision."""
        if account in self.suspect:
            return Held(account, (f"{_num(self.suspect[account])} kWh of suspect energy awaits a decision "
                                  f"(amr suspect list --account {account})"))
        if account not in self.usage:
            return Held(account, "no energy data for the period")
        got = price(account, self.period, plan, category, area, self.pieces, self.usage[account],
                    self.catalogue, self.memo)
        if isinstance(got, Held):
            return got
        decision = decide(got, self.latest.get(account), self.closure)
        return decision if isinstance(decision, Held) else (decision, got)


def decide(bill: Bill, prev: Latest | None, closure: Mapping[str, tuple[bool, bool]]) -> str | Held:
    """What becomes of a priced bill: FIRST, UNCHANGED, SETTLED, NEW_VERSION, or held (`_closed_hold`)."""
    if prev is None:
        return FIRST
    if prev.fingerprint == bill.fingerprint():
        return SETTLED if closure.get(bill.account, _OPEN_NONE)[0] else UNCHANGED
    held = _closed_hold(bill.account, bill.period, prev, bill, closure)
    return NEW_VERSION if held is None else held


def gather(conn: Any, period: date, wanted: list[str] | None, catalogue: Catalogue | None,
           tz: str) -> Month:
    """The tariffs, the subscribers (all, or `wanted`: each must exist) and their energy of the month."""
    first, last = month_days(period)
    cat = catalogue if catalogue is not None else load_db_catalogue(conn)
    pieces = _pieces(cat, first, last)
    filt = " AND account = ANY(%(accounts)s)" if wanted is not None else ""
    subs = conn.execute(
        "SELECT account, plan, category, area FROM subscriber WHERE true" + filt
        + " ORDER BY account", {"accounts": wanted}).fetchall()
    if wanted is not None and len(subs) != len(wanted):
        unknown = sorted(set(wanted) - {s[0] for s in subs})
        raise UnknownAccounts(f"no subscriber with account {', '.join(unknown)}; nothing billed")
    usage, suspect = _usage(conn, pieces, first, last, tz, wanted)
    return Month(period, cat, pieces, subs, usage, suspect)


def billed_so_far(conn: Any, month: Month, wanted: list[str] | None) -> None:
    """Each account's latest version for the month, and the changes recorded to billed months."""
    month.latest = {r[0]: Latest(*r[1:]) for r in conn.execute(
        "SELECT DISTINCT ON (account) account, version, fingerprint, total FROM bill"
        " WHERE period = %s ORDER BY account, version DESC", (month.period,)).fetchall()}
    month.closure = _closure(conn, month.period, wanted) if month.latest else {}


def bill_period(conn: Any, period: date, accounts: Iterable[str] | None = None, *,
                catalogue: Catalogue | None = None, tz: str = "Europe/Moscow",
                reason: str | None = None, progress: Progress | None = None) -> RunSummary:
    """Bill every subscriber (or `accounts`) for the month starting `period`; commits."""
    started = time.perf_counter()
    period = period.replace(day=1)
    summary = RunSummary(period)
    wanted = sorted({normalize_account(a) for a in accounts}) if accounts is not None else None
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7217010, %s)", (period.year * 100 + period.month,))
        # one big aggregate: keep it in memory and skip JIT compilation, which costs more than it saves
        conn.execute("SET LOCAL work_mem = '256MB'")
        conn.execute("SET LOCAL jit = off")
        month = gather(conn, period, wanted, catalogue, tz)
        summary.phases["aggregate"] = time.perf_counter() - started
        billed_so_far(conn, month, wanted)
        new_bills, changed, settled = _price_all(conn, month, reason, summary, progress)
        new_bills.extend(_write_new_versions(conn, period, changed, reason))
        _settle(conn, period, settled)
        summary.phases["priced"] = time.perf_counter() - started
        _write_lines(conn, new_bills)
        if new_bills:  # each new version posts its difference to the one before to the ledger
            from billing.ledger import post_bill_charges

            post_bill_charges(conn, period, sorted({b.account for b, *_ in new_bills}), tz=tz)
        summary.phases["written"] = time.perf_counter() - started
        if progress:
            progress(len(month.subscribers), len(month.subscribers))
    for bill, version, why, _ in new_bills:
        summary.written.append((bill.account, version, why))
        if version == 1:
            summary.billed += 1
        else:
            summary.new_versions += 1
    summary.seconds = time.perf_counter() - started
    _observe(summary)
    return summary


def _price_all(conn: Any, month: Month, reason: str | None, summary: RunSummary, progress: Progress | None,
               ) -> tuple[list[NewBill], list[tuple[Bill, Latest]], list[str]]:
    """Every subscriber priced and decided: (first versions, written here; changed bills; settled accounts).

    First versions go to the server while the next accounts are priced (two
    cores busy); held-back and unchanged accounts are counted in `summary`.
    """
    firsts: list[NewBill] = []
    changed: list[tuple[Bill, Latest]] = []
    settled: list[str] = []  # accounts whose open changes left the bill as it was
    total_subs = len(month.subscribers)
    if progress:
        progress(0, total_subs)
    pending: list[str] = []
    with conn.cursor() as cur, cur.copy(_BILL_COPY) as cp:
        for n, (account, plan, category, area) in enumerate(month.subscribers, start=1):
            if progress and n % _BATCH == 0:
                progress(n, total_subs)
            judged = month.judge(account, plan, category, area)
            if isinstance(judged, Held):
                summary.held_back.append(judged)
                continue
            decision, bill = judged
            if decision == FIRST:
                new = (bill, 1, reason or "first bill for the period", None)
                pending.append(_bill_row(*new))
                if len(pending) >= _BATCH:
                    cp.write("".join(pending))
                    pending.clear()
                firsts.append(new)
            elif decision in (UNCHANGED, SETTLED):
                summary.unchanged += 1
                if decision == SETTLED:
                    settled.append(account)
            else:
                changed.append((bill, month.latest[account]))
        if pending:
            cp.write("".join(pending))
    return firsts, changed, settled


def _write_new_versions(conn: Any, period: date, changed: list[tuple[Bill, Latest]],
                        reason: str | None) -> list[NewBill]:
    """The next version of each changed bill, with the reason and the difference from the latest."""
    if not changed:
        return []
    old_lines = _lines_of(conn, period, [(b.account, prev.version) for b, prev in changed])
    versions: list[NewBill] = []
    for bill, prev in changed:
        why, diff = describe_change(old_lines.get(bill.account, []), bill, prev.total)
        versions.append((bill, prev.version + 1, f"{reason}: {why}" if reason else why, diff))
    with conn.cursor() as cur, cur.copy(_BILL_COPY) as cp:
        cp.write("".join(_bill_row(*new) for new in versions))
    return versions


def _settle(conn: Any, period: date, settled: list[str]) -> None:
    """Changes to a billed month that leave its bill as it was need no person: decided 'no_change'."""
    if settled:
        conn.execute(
            "UPDATE billed_change SET decision = 'no_change', decided_by = 'amr bill', decided_at = now()"
            " WHERE decision IS NULL AND period = %s"
            " AND meter_id IN (SELECT id FROM meter WHERE account = ANY(%s))", (period, settled))


def _observe(summary: RunSummary) -> None:
    """A finished run in the process's metrics."""
    metrics.BILLING_RUN_SECONDS.observe(summary.seconds)
    for outcome, count in (("billed", summary.billed), ("unchanged", summary.unchanged),
                           ("new_version", summary.new_versions),
                           ("held_back", len(summary.held_back))):
        if count:
            metrics.BILLS.labels(outcome).inc(count)


def _closure(conn: Any, period: date, wanted: list[str] | None) -> dict[str, tuple[bool, bool]]:
    """Per account, of the changes recorded to this billed month since its latest bill version:
    (any still awaiting a decision, any rejected). See migration 014 and `_closed_hold`."""
    rows = conn.execute(
        "SELECT m.account, bool_or(c.decision IS NULL), bool_or(c.decision = 'rejected')"
        " FROM billed_change c JOIN meter m ON m.id = c.meter_id"
        " WHERE c.period = %(p)s AND (%(a)s::text[] IS NULL OR m.account = ANY(%(a)s))"
        " AND (c.decision IS NULL OR (c.decision = 'rejected' AND c.decided_at >"
        "   (SELECT max(b.created_at) FROM bill b WHERE b.account = m.account AND b.period = c.period)))"
        " GROUP BY 1", {"p": period, "a": wanted}).fetchall()
    return {a: (bool(o), bool(r)) for a, o, r in rows}


def _closed_hold(account: str, period: date, prev: Latest, new: Bill,
                 closure: Mapping[str, tuple[bool, bool]]) -> Held | None:
    """A billed month is closed: data that changed it since waits for a person.

    Held while any recorded change to the month awaits a decision; kept as
    billed when the changes were rejected. Other changes (a corrected tariff,
    changes accepted) make a new version, as always.
    """
    waiting, rejected = closure.get(account, _OPEN_NONE)
    version, _, total = prev
    delta = new.total - total
    change = f"total {total} -> {new.total} ({'+' if delta >= 0 else ''}{delta})"
    if waiting:
        return Held(account, (
            f"changes billed period {period:%Y-%m}: data arrived after version {version} that would "
            f"change it ({change}); see `amr suspect list --account {account}`, then "
            f"`amr suspect accept --account {account} --period {period:%Y-%m}` to issue the new version"))
    if rejected:
        return Held(account, (
            f"billed period {period:%Y-%m} stays at version {version}: the changes since ({change}) "
            "were rejected"))
    return None


def preview(conn: Any, account: str, period: date, *, catalogue: Catalogue | None = None,
            tz: str = "Europe/Moscow") -> Bill | Held:
    """What one account's bill for the month would be on the stored data now; writes nothing."""
    period = period.replace(day=1)
    first, last = month_days(period)
    account = normalize_account(account)
    cat = catalogue if catalogue is not None else load_db_catalogue(conn)
    pieces = _pieces(cat, first, last)
    sub = conn.execute("SELECT plan, category, area FROM subscriber WHERE account = %s", (account,)).fetchone()
    if sub is None:
        raise UnknownAccounts(f"no subscriber with account {account}")
    usage = _usage(conn, pieces, first, last, tz, [account])[0].get(account, {})
    plan, category, area = sub
    return price(account, period, plan, category, area, pieces, usage, cat)


def _lines_of(conn: Any, period: date, keys: list[tuple[str, int]]) -> dict[str, list[Line]]:
    rows = conn.execute(
        "SELECT l.account, l.zone, l.date_from, l.date_to, l.kwh, l.estimated_kwh, l.rate, l.amount"
        " FROM bill_line l JOIN unnest(%s::text[], %s::int[]) AS k(account, version)"
        " ON l.account = k.account AND l.version = k.version"
        " WHERE l.period = %s ORDER BY l.account, l.line_no",
        ([k[0] for k in keys], [k[1] for k in keys], period)).fetchall()
    out: dict[str, list[Line]] = {}
    for account, *rest in rows:
        out.setdefault(account, []).append(Line(*rest))
    return out


_BILL_COPY = ("COPY bill (account, period, version, total, kwh, estimated_kwh, plan, category,"
              " area, reason, diff, fingerprint) FROM STDIN")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """A free-text field (reason, diff) made safe for COPY's text format."""
    return value.translate(_COPY_ESCAPES)


def _bill_row(b: Bill, version: int, why: str, diff: dict[str, Any] | None) -> str:
    """One bill as a COPY text line: built here because a city's run writes 100,000 of them."""
    kwh = est = ZERO
    amounts = []
    for ln in b.lines:
        kwh += ln.kwh
        est += ln.estimated_kwh
        amounts.append(ln.amount)
    diff_text = _copy_text(json.dumps(diff)) if diff is not None else "\\N"
    return (f"{b.account}\t{b.period}\t{version}\t{money.total(amounts)}\t{kwh}\t{est}\t"
            f"{b.plan}\t{b.category}\t{b.area}\t{_copy_text(why)}\t{diff_text}\t{b.fingerprint()}\n")


def _write_lines(conn: Any, bills: list[NewBill]) -> None:
    """Lines as COPY text built here: every field is digits, dates or zone names, so nothing
    needs escaping, and a city's 300,000 lines go out several times faster than row by row."""
    if not bills:
        return
    with conn.cursor() as cur, cur.copy(
            "COPY bill_line (account, period, version, line_no, zone, date_from, date_to, kwh,"
            " estimated_kwh, rate, amount) FROM STDIN") as cp:
        chunk: list[str] = []
        for b, version, _, _ in bills:
            head = f"{b.account}\t{b.period}\t{version}\t"
            for i, ln in enumerate(b.lines, start=1):
                chunk.append(f"{head}{i}\t{ln.zone}\t{ln.date_from}\t{ln.date_to}\t{ln.kwh}\t"
                             f"{ln.estimated_kwh}\t{ln.rate}\t{ln.amount}\n")
            if len(chunk) >= 5000:
                cp.write("".join(chunk))
                chunk.clear()
        if chunk:
            cp.write("".join(chunk))


def bills_of(conn: Any, account: str, period: date) -> list[dict[str, Any]]:
    """Every version of one account's bill for a month, oldest first, with lines."""
    account = normalize_account(account)
    bills = conn.execute(
        "SELECT version, total, kwh, estimated_kwh, plan, reason, diff, created_at FROM bill"
        " WHERE account = %s AND period = %s ORDER BY version", (account, period)).fetchall()
    lines = conn.execute(
        "SELECT version, zone, date_from, date_to, kwh, estimated_kwh, rate, amount FROM bill_line"
        " WHERE account = %s AND period = %s ORDER BY version, line_no", (account, period)).fetchall()
    out = []
    for version, total, kwh, est, plan, why, diff, created in bills:
        out.append({"account": account, "period": period, "version": version, "total": total,
                    "kwh": kwh, "estimated_kwh": est, "plan": plan, "reason": why, "diff": diff,
                    "created_at": created,
                    "lines": [Line(*r[1:]) for r in lines if r[0] == version]})
    return out
