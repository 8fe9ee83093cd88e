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
  or rejects it (`amr suspect`); so do days without a tariff and volume bands
  whose catalogue names no rule for sharing zone volumes between bands;
- a meter replaced mid-month: every meter of the account counts, each only
  for the local days between its installation and removal;
- volume bands (`allocation = "proportional"`, see `split_bands`): the month's
  total volume decides the bands, marginal steps on it; each band's volume is
  shared across the month's (run of days, zone) pieces in proportion to their
  energy, so a month with a rate change inside it shares the bands between its
  runs in proportion to their energy; one line per run, band and zone. A month
  whose band thresholds or rule change inside it, or whose bands begin or end
  inside it, is held back;
- a manual-metering month without readings (Government Decree 354 p. 59-60):
  the average of the last fully read months (`average_months`, 3 by default),
  for at most that many months in a row after the last reading, then the
  consumption norm (`billing.tariffs.Norms`), priced at the single-rate plan;
  the bill records its method. A reading that arrives later makes the month's
  next run a new version by readings (see `Month.estimate`).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from amr import metrics
from billing import money
from billing.tariffs import PROPORTIONAL, Catalogue, Tariff, load_db_catalogue, load_db_norms
from collector.inventory import normalize_account
from collector.rules.vocabulary import FOLD, HALF_PEAK, PLAN_ZONES, SINGLE, STORED_ZONES

ZERO = Decimal(0)
MILLI = Decimal("0.001")  # the finest kWh a split or an average is carried to, unless the data is finer
# how a bill's volume was found (bill.method)
READINGS = "readings"  # the stored energy of the meters
AVERAGE = "average"  # no readings: the average of past months (Decree 354 p. 59)
NORM = "norm"  # no readings for longer, or none before: the consumption norm (Decree 354 p. 60)
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
    band: int | None = None  # the volume band of a banded bill's line; None: the tariff has none

    def as_dict(self) -> dict[str, str]:
        out = {"zone": self.zone, "date_from": self.date_from.isoformat(),
               "date_to": self.date_to.isoformat(), "kwh": _num(self.kwh),
               "estimated_kwh": _num(self.estimated_kwh), "rate": _num(self.rate),
               "amount": str(self.amount)}
        if self.band is not None:
            out["band"] = str(self.band)
        return out

    def canonical(self) -> str:
        """Quantities normalised: 1.500000 and 1.5 kWh are the same line.

        Only for fingerprints, so it favours speed over looks (days as ordinals,
        decimals possibly in exponent form); a city's run makes 300,000 of them.
        """
        text = (f"{self.zone},{self.date_from.toordinal()},{self.date_to.toordinal()},"
                f"{self.kwh.normalize()},{self.estimated_kwh.normalize()},{self.rate},{self.amount}")
        return text if self.band is None else f"{text},b{self.band}"


@dataclass(frozen=True)
class Bill:
    account: str
    period: date
    plan: str
    category: str
    area: str
    lines: tuple[Line, ...]
    method: str = READINGS
    note: str = field(default="", compare=False)  # how an estimated volume was found, for the reason

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
        if self.method != READINGS:  # readings bills keep the fingerprints they always had
            text += f";{self.method}"
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


class Band(NamedTuple):
    """One volume band of a run of days: its number, its share of the month's volume, its rates."""

    number: int
    lo: Decimal
    hi: Decimal | None  # None: no upper bound (the last band)
    rates: dict[str, Decimal]


class PlanSegment(NamedTuple):
    """A run of days with one rate for a plan: its rates and the pieces of the month it spans.

    A banded tariff gives the run its bands (the rates are then band 1's)."""

    date_from: date
    date_to: date
    rates: dict[str, Decimal]
    pieces: list[int]
    bands: tuple[Band, ...] = ()


PlanMemo = dict[tuple[str, str, str], list[PlanSegment] | str]


def price(account: str, period: date, plan: str, category: str, area: str,
          pieces: Sequence[tuple[date, date]], usage: Usage,
          catalogue: Catalogue, memo: PlanMemo | None = None, *,
          method: str = READINGS, note: str = "") -> Bill | Held:
    """One account's bill from its energy per (piece of the month, stored zone).

    `pieces` cut the month at every date where any tariff changes, so each
    run of days with one rate is a union of whole pieces. `memo` keeps the
    plan's segments between accounts of one run. `method` and `note` say how
    the energy was found (readings, or an estimate handed in as `usage`).
    """
    key = (plan, category, area)
    plan_segs = memo.get(key) if memo is not None else None
    if plan_segs is None:
        plan_segs = _plan_segments(period, plan, category, area, pieces, catalogue)
        if memo is not None:
            memo[key] = plan_segs
    if isinstance(plan_segs, str):
        return Held(account, plan_segs)
    if plan_segs and plan_segs[0].bands:
        return Bill(account, period, plan, category, area, _banded_lines(plan, plan_segs, usage),
                    method, note)
    lines: list[Line] = []
    for seg in plan_segs:
        stored_kwh, stored_est = _stored_energy(usage, seg.pieces)
        kwh, est = fold(stored_kwh, plan), fold(stored_est, plan)
        for pz in PLAN_ZONES[plan]:
            rate = seg.rates[pz]
            lines.append(Line(pz, seg.date_from, seg.date_to, kwh[pz], est[pz], rate,
                              money.line_amount(kwh[pz], rate)))
    return Bill(account, period, plan, category, area, tuple(lines), method, note)


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


def _band_volumes(total: Decimal, bands: Sequence[Band]) -> list[Decimal]:
    """Marginal steps on the month's total: the part of it within each band."""
    out = []
    for b in bands:
        top = total if b.hi is None else min(total, b.hi)
        out.append(max(top - b.lo, ZERO))
    return out


def _quantum(values: Iterable[Decimal]) -> Decimal:
    """The grid a split is carried on: 0.001 kWh, or the finest digit the values have."""
    exp = -3
    for v in values:
        e = v.as_tuple().exponent
        if isinstance(e, int) and e < exp:
            exp = e
    return Decimal(1).scaleb(exp)


def split_bands(bands: Sequence[Decimal], cells: Sequence[Decimal], quantum: Decimal = MILLI
                ) -> list[list[Decimal]]:
    """The proportional rule: band b's share of cell c is bands[b] x cells[c] / total.

    `cells` are the month's (run of days, zone) energies, `bands` the month's
    band volumes; both sum to the same total and lie on the `quantum` grid. Each
    share is carried to the quantum so that every cell's shares sum exactly to the
    cell's energy and every band's to the band's volume: each share is first its
    exact value rounded down to the quantum; the quanta then left over (fewer
    than the number of cells in a band, of bands in a cell) are handed out cell
    by cell (the one with most left first, then in order), at most one to each
    band of the cell: to the bands with most left to place (then the larger
    dropped fraction, then the lower band). So no share is more than one quantum from its exact value,
    none is negative, and the worked example (4,500 kWh; day 3,000, night 1,500;
    bands 1,200 / 2,700 / 600) comes out exact: day 800 / 1,800 / 400, night
    400 / 900 / 200.
    """
    k = -int(quantum.as_tuple().exponent)
    e = [_units(c, k) for c in cells]
    b = [_units(v, k) for v in bands]
    total = sum(e)
    if total != sum(b):
        raise ValueError(f"split_bands: the bands sum to {sum(bands)}, the cells to {sum(cells)}")
    if total == 0:
        return [[ZERO for _ in cells] for _ in bands]
    share = [[bv * ev // total for ev in e] for bv in b]
    frac = [[bv * ev % total for ev in e] for bv in b]
    row_left = [bv - sum(row) for bv, row in zip(b, share, strict=True)]
    col_left = [ev - sum(share[i][j] for i in range(len(b))) for j, ev in enumerate(e)]
    for j in sorted(range(len(e)), key=lambda j: -col_left[j]):
        # at most one quantum per share: the cell's left-over quanta go to distinct bands, those
        # with most left first (Ryser's construction, which finds a way whenever one exists, and
        # one does: the dropped fractions are one)
        rows = sorted((i for i in range(len(b)) if row_left[i] > 0),
                      key=lambda i: (-row_left[i], -frac[i][j], i))[:col_left[j]]
        if len(rows) < col_left[j]:  # pragma: no cover - impossible by the argument above
            raise ArithmeticError("split_bands: the left-over quanta could not be placed")
        for i in rows:
            share[i][j] += 1
            row_left[i] -= 1
    return [[Decimal(x).scaleb(-k) for x in row] for row in share]


def _units(value: Decimal, k: int) -> int:
    """A quantity as a whole number of 10**-k units; refused when it is not one."""
    scaled = value.scaleb(k)
    units = int(scaled)
    if units != scaled:
        raise ValueError(f"split_bands: {value} does not lie on the grid of {Decimal(1).scaleb(-k)}")
    return units


def _apportion(amount: Decimal, weights: Sequence[Decimal], quantum: Decimal) -> list[Decimal]:
    """`amount` split in proportion to `weights`, on the quantum grid, summing exactly."""
    units = int(amount / quantum)
    w = [int(x / quantum) for x in weights]
    total = sum(w)
    if total == 0 or units == 0:
        return [ZERO] * len(weights)
    parts = [units * x // total for x in w]
    left = units - sum(parts)
    for i in sorted(range(len(w)), key=lambda i: (-(units * w[i] % total), i))[:left]:
        parts[i] += 1
    return [Decimal(x) * quantum for x in parts]


def _banded_lines(plan: str, segs: Sequence[PlanSegment], usage: Usage) -> tuple[Line, ...]:
    """Lines per run of days, band and zone, by the proportional rule (`split_bands`).

    The month's total decides the band volumes; each band is shared across the
    month's (run, zone) cells in proportion to their energy; each piece is priced
    at its run's band rate and rounded half-up to the kopeck. A cell's estimated
    energy is shared across the bands as its energy is. Bands above the month's
    volume give no lines; band 1 always does, so a bill of nothing still has lines.
    """
    zones = PLAN_ZONES[plan]
    cells: list[tuple[int, str, Decimal, Decimal]] = []
    for s, seg in enumerate(segs):
        stored_kwh, stored_est = _stored_energy(usage, seg.pieces)
        kwh, est = fold(stored_kwh, plan), fold(stored_est, plan)
        cells.extend((s, pz, kwh[pz], est[pz]) for pz in zones)
    bands = segs[0].bands
    total = sum((c[2] for c in cells), ZERO)
    volumes = _band_volumes(total, bands)
    if not any(volumes[1:]):  # the month within band 1, as most homes: nothing to split
        shares = [[c[2] for c in cells], *([ZERO] * len(cells) for _ in bands[1:])]
        est_shares = [[c[3], *[ZERO] * (len(bands) - 1)] for c in cells]
    else:
        q = _quantum([*(c[2] for c in cells), *(c[3] for c in cells),
                      *(b.lo for b in bands), *(b.hi for b in bands if b.hi is not None)])
        shares = split_bands(volumes, [c[2] for c in cells], q)
        est_shares = [_apportion(c[3], [shares[i][j] for i in range(len(bands))], q) if c[3]
                      else [ZERO] * len(bands) for j, c in enumerate(cells)]
    lines = []
    for s, seg in enumerate(segs):
        for i, band in enumerate(seg.bands):
            if i and not volumes[i]:
                continue
            for j, (cs, pz, _, _) in enumerate(cells):
                if cs != s:
                    continue
                part, rate = shares[i][j], band.rates[pz]
                lines.append(Line(pz, seg.date_from, seg.date_to, part, est_shares[j][i], rate,
                                  money.line_amount(part, rate), band.number))
    return tuple(lines)


def _bands_of(tariffs: list[Tariff], what: str) -> tuple[Band, ...] | str:
    """A run's band entries as bands, or why they cannot be priced."""
    rules = {t.allocation for t in tariffs}
    if None in rules:
        return (f"volume bands in the tariff for {what}: how zone volumes share bands is not "
                "confirmed yet (the catalogue names no rule: allocation = \"proportional\" on every "
                "band entry chooses one)")
    if len(rules) > 1:
        return f"volume bands in the tariff for {what} name different rules: {', '.join(sorted(map(str, rules)))}"
    if rules != {PROPORTIONAL}:  # pragma: no cover - the catalogue refuses any other name
        return f"volume bands in the tariff for {what}: unknown rule {rules}"
    lo = ZERO
    out = []
    for n, t in enumerate(tariffs, start=1):
        if t.band != n or t.band_from_kwh != lo or (t.band_to_kwh is None) != (n == len(tariffs)):
            return (f"volume bands in the tariff for {what} do not join up: band {t.band} from "
                    f"{t.band_from_kwh} kWh to {t.band_to_kwh if t.band_to_kwh is not None else 'no limit'}"
                    f" (bands 1, 2, ... from 0 kWh, each from where the one before ends, the last without limit)")
        out.append(Band(t.band, t.band_from_kwh, t.band_to_kwh, dict(t.rates)))
        lo = t.band_to_kwh if t.band_to_kwh is not None else lo
    return tuple(out)


def _plan_segments(period: date, plan: str, category: str, area: str,
                   pieces: Sequence[tuple[date, date]], catalogue: Catalogue) -> list[PlanSegment] | str:
    """The runs of days with one rate for a plan, with their rates and pieces; or why none."""
    first, last = month_days(period)
    out = []
    for seg_from, seg_to, tariffs in catalogue.segments(category, area, plan, first, last):
        if tariffs is None:
            return f"no tariff for {category}/{area}/{plan} on {seg_from}..{seg_to}"
        bands: tuple[Band, ...] = ()
        if len(tariffs) > 1 or tariffs[0].band_to_kwh is not None:
            got = _bands_of(tariffs, f"{category}/{area}/{plan} from {seg_from}")
            if isinstance(got, str):
                return got
            bands = got
        ids = [i for i, (p_from, p_to) in enumerate(pieces, start=1)
               if seg_from <= p_from and p_to <= seg_to]
        out.append(PlanSegment(seg_from, seg_to, dict(tariffs[0].rates), ids, bands))
    if any(seg.bands for seg in out):
        if not all(seg.bands for seg in out):
            return (f"volume bands of {category}/{area}/{plan} begin or end inside {period:%Y-%m}: "
                    "the month's volume decides the bands, so they must cover the whole month")
        shape = {tuple((b.lo, b.hi) for b in seg.bands) for seg in out}
        if len(shape) > 1:
            return (f"volume band thresholds of {category}/{area}/{plan} change inside {period:%Y-%m}: "
                    "the month's volume decides the bands, so one set must hold for the whole month")
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


def describe_change(old_lines: list[Line], new: Bill, old_total: Decimal,
                    old_method: str = READINGS) -> tuple[str, dict]:
    """The reason and the difference a new version carries, for a person and for machines."""
    old_by = {(ln.zone, ln.date_from, ln.band): ln for ln in old_lines}
    new_by = {(ln.zone, ln.date_from, ln.band): ln for ln in new.lines}
    what = set()
    diff_lines = []
    for key in sorted(set(old_by) | set(new_by), key=lambda k: (k[1], k[2] or 0, k[0])):
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
            "zone": key[0], "date_from": key[1].isoformat(), **({"band": key[2]} if key[2] else {}),
            "kwh_old": _num(o.kwh) if o else None, "kwh_new": _num(n.kwh) if n else None,
            "rate_old": _num(o.rate) if o else None, "rate_new": _num(n.rate) if n else None,
            "amount_old": str(o.amount) if o else None, "amount_new": str(n.amount) if n else None,
        })
    delta = new.total - old_total
    reason = (f"{' and '.join(sorted(what)) or 'content'} changed: total {old_total} -> "
              f"{new.total} ({'+' if delta >= 0 else ''}{delta})")
    out = {"total_old": str(old_total), "total_new": str(new.total),
           "total_delta": str(delta), "lines": diff_lines}
    if old_method != new.method:
        reason += f"; billed by {new.method}, was by {old_method}"
        out.update(method_old=old_method, method_new=new.method)
    return reason, out


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
    method: str = READINGS


# what a run decides for an account's priced bill (or it holds the bill back: a `Held`)
FIRST = "first"  # no bill for the period yet: version 1
UNCHANGED = "unchanged"  # same content as the latest version: nothing is written
SETTLED = "settled"  # unchanged, and the changes awaiting a decision turn out to change nothing
NEW_VERSION = "new_version"  # the content changed: a new version with the reason and the difference
RECALCULATED = "recalculated"  # an estimated bill's month now has readings: a new version by them

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
    memo: PlanMemo = field(default_factory=dict)
    # manual-metering accounts without readings in the month: how their volume is estimated, or why not
    estimates: dict[str, Estimate | Held] = field(default_factory=dict)
    recalculated: list[str] = field(default_factory=list)  # estimated bills replaced by readings ones

    def price_one(self, account: str, plan: str, category: str, area: str) -> Bill | Held:
        """One account's bill on the month's data: its stored energy, or its estimate."""
        est = self.estimates.get(account)
        if est is None:
            return price(account, self.period, plan, category, area, self.pieces,
                         self.usage.get(account, {}), self.catalogue, self.memo)
        if isinstance(est, Held):
            return est
        return price(account, self.period, est.plan, category, area, self.pieces, est.usage,
                     self.catalogue, self.memo, method=est.method, note=est.note)

    def judge(self, account: str, plan: str, category: str, area: str) -> tuple[str, Bill] | Held:
        """One account: held back before pricing, held by its price or its billed month, or a decision."""
        if account in self.suspect:
            return Held(account, (f"{_num(self.suspect[account])} kWh of suspect energy awaits a decision "
                                  f"(amr suspect list --account {account})"))
        if account not in self.usage and account not in self.estimates:
            return Held(account, "no energy data for the period")
        got = self.price_one(account, plan, category, area)
        if isinstance(got, Held):
            return got
        decision = decide(got, self.latest.get(account), self.closure)
        return decision if isinstance(decision, Held) else (decision, got)


def decide(bill: Bill, prev: Latest | None, closure: Mapping[str, tuple[bool, bool]]) -> str | Held:
    """What becomes of a priced bill: FIRST, UNCHANGED, SETTLED, NEW_VERSION, RECALCULATED, or held.

    A month billed by an estimate is recalculated when readings cover it (Decree 354
    p. 61): the readings' changes to it need no person's decision, unless one was
    already taken to reject them. Any other change to a billed month waits
    (`_closed_hold`).
    """
    if prev is None:
        return FIRST
    if prev.fingerprint == bill.fingerprint():
        return SETTLED if closure.get(bill.account, _OPEN_NONE)[0] else UNCHANGED
    if prev.method != READINGS and bill.method == READINGS and not closure.get(bill.account, _OPEN_NONE)[1]:
        return RECALCULATED
    held = _closed_hold(bill.account, bill.period, prev, bill, closure)
    return NEW_VERSION if held is None else held


class Estimate(NamedTuple):
    """A manual-metering month's volume without readings: how found, the plan it is priced at, the energy."""

    method: str  # AVERAGE or NORM
    plan: str
    usage: ZoneUsage  # every kWh of it estimated
    note: str


def _month_start(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, 1, tzinfo=tz)


def _add_months(day: date, n: int) -> date:
    k = day.year * 12 + day.month - 1 + n
    return date(k // 12, k % 12 + 1, 1)


def _months_between(a: date, b: date) -> int:
    """Months from the month of a to the month of b (b later: positive)."""
    return (b.year - a.year) * 12 + b.month - a.month


def _first_month_from(ts: datetime, tz: ZoneInfo) -> date:
    """The first month starting at or after the instant ts (local time)."""
    local = ts.astimezone(tz)
    month = local.date().replace(day=1)
    return month if local == _month_start(month, tz) else _add_months(month, 1)


def _spread(volumes: Mapping[str, Decimal], pieces: Sequence[tuple[date, date]]) -> ZoneUsage:
    """A month's estimated volume per stored zone over the pieces of the month, by their days."""
    days = [Decimal((b - a).days + 1) for a, b in pieces]
    out: ZoneUsage = {}
    for zone, v in volumes.items():
        q = _quantum([v])
        for i, part in enumerate(_apportion(v, days, q) if len(pieces) > 1 else [v], start=1):
            out[(i, zone)] = (part, part)
    return out


def _estimates(conn: Any, period: date, subscribers: Sequence[tuple[str, str, str, str]],
               wanted: list[str] | None, pieces: Sequence[tuple[date, date]], tz: str,
               average_months: int) -> dict[str, Estimate | Held]:
    """Manual-metering accounts whose month has no readings, with their estimated volume.

    A month is billed by readings when the account's readings (register 1.8.0, all
    its meters) reach into it: one before its end and one after its start. Otherwise,
    counting the months since the last reading (the first month starting after it
    is month 1): up to `average_months` months are billed by the average of the last
    `average_months` months wholly between two readings (per stored zone, to
    0.001 kWh half-up), then the norm. With no reading before the month at all, or
    no month wholly read, the norm. The norm is a volume without time of day, so
    it is priced at the single-rate plan of the account's category (the project's
    choice: no source found says otherwise).
    """
    zone = ZoneInfo(tz)
    start = _month_start(period, zone)
    end = _month_start(_add_months(period, 1), zone)
    rows = conn.execute(
        "SELECT s.account, s.category, s.rooms, s.residents, min(r.ts), max(r.ts)"
        " FROM subscriber s LEFT JOIN meter m ON m.account = s.account"
        " LEFT JOIN reading r ON r.meter_id = m.id AND r.register = '1.8.0'"
        " WHERE s.metering = 'manual' AND (%(a)s::text[] IS NULL OR s.account = ANY(%(a)s))"
        " GROUP BY 1, 2, 3, 4", {"a": wanted}).fetchall()
    if not rows:
        return {}
    plan_of = {s[0]: s[1] for s in subscribers}
    out: dict[str, Estimate | Held] = {}
    averages: dict[str, tuple[date, date]] = {}  # account: first and last month averaged
    norm_wanted: dict[str, tuple[str, int | None, int | None, str]] = {}
    for account, category, rooms, residents, lo, hi in rows:
        if account not in plan_of:
            continue
        if lo is not None and hi > start and lo < end:
            continue  # readings reach into the month: billed by them
        if lo is None or lo >= end:
            norm_wanted[account] = (category, rooms, residents, "no reading before the month")
            continue
        gap = _months_between(_first_month_from(hi, zone), period) + 1  # months without readings, this one too
        last_full = _add_months(hi.astimezone(zone).date().replace(day=1), -1)  # the last ending by hi
        first_full = _first_month_from(lo, zone)
        if gap > average_months:
            norm_wanted[account] = (category, rooms, residents,
                                    f"no readings for {gap} months, more than {average_months}")
        elif first_full > last_full:
            norm_wanted[account] = (category, rooms, residents, "no month wholly between two readings yet")
        else:
            averages[account] = (max(first_full, _add_months(last_full, 1 - average_months)), last_full)
    if averages:
        lo_day = min(a for a, _ in averages.values())
        hi_day = month_days(max(b for _, b in averages.values()))[1]
        got = conn.execute(
            "SELECT m.account, date_trunc('month', d.day)::date, d.zone, sum(d.kwh)"
            " FROM daily_zone_usage d JOIN meter m ON m.id = d.meter_id"
            " WHERE m.account = ANY(%(a)s) AND d.day BETWEEN %(lo)s AND %(hi)s"
            " AND (m.installed IS NULL OR d.day >= (m.installed AT TIME ZONE %(tz)s)::date)"
            " AND (m.removed IS NULL OR d.day <= (m.removed AT TIME ZONE %(tz)s)::date)"
            " GROUP BY 1, 2, 3", {"a": sorted(averages), "lo": lo_day, "hi": hi_day, "tz": tz}).fetchall()
        sums: dict[str, dict[str, Decimal]] = {}
        for account, month, z, kwh in got:
            a, b = averages[account]
            if a <= month <= b:
                per = sums.setdefault(account, dict.fromkeys(STORED_ZONES, ZERO))
                per[z] += kwh
        for account, (a, b) in averages.items():
            n = _months_between(a, b) + 1
            volumes = {z: (v / n).quantize(MILLI, rounding=ROUND_HALF_UP)
                       for z, v in sums.get(account, dict.fromkeys(STORED_ZONES, ZERO)).items()}
            span = f"{a:%Y-%m}" if a == b else f"{a:%Y-%m}..{b:%Y-%m}"
            out[account] = Estimate(AVERAGE, plan_of[account], _spread(volumes, pieces),
                                    f"no readings: by the average of {n} month(s) {span} "
                                    f"({_num(sum(volumes.values(), ZERO))} kWh; Decree 354 p. 59)")
    if norm_wanted:
        norms = load_db_norms(conn)
        first, last = month_days(period)
        for account, (category, rooms, residents, why) in norm_wanted.items():
            vol = norms.volume(category, rooms, residents, first, last)
            if isinstance(vol, str):
                out[account] = Held(account, f"no readings ({why}), and {vol}")
                continue
            kwh, how = vol
            out[account] = Estimate(NORM, SINGLE, _spread({HALF_PEAK: kwh}, pieces),
                                    f"no readings ({why}): by the consumption {how} = {_num(kwh)} kWh, "
                                    "at the single-rate plan (Decree 354 p. 60)")
    return out


def gather(conn: Any, period: date, wanted: list[str] | None, catalogue: Catalogue | None,
           tz: str, average_months: int = 3) -> Month:
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
    month = Month(period, cat, pieces, subs, usage, suspect)
    month.estimates = _estimates(conn, period, subs, wanted, pieces, tz, average_months)
    return month


def billed_so_far(conn: Any, month: Month, wanted: list[str] | None) -> None:
    """Each account's latest version for the month, and the changes recorded to billed months."""
    month.latest = {r[0]: Latest(*r[1:]) for r in conn.execute(
        "SELECT DISTINCT ON (account) account, version, fingerprint, total, method FROM bill"
        " WHERE period = %s ORDER BY account, version DESC", (month.period,)).fetchall()}
    month.closure = _closure(conn, month.period, wanted) if month.latest else {}


def bill_period(conn: Any, period: date, accounts: Iterable[str] | None = None, *,
                catalogue: Catalogue | None = None, tz: str = "Europe/Moscow",
                reason: str | None = None, progress: Progress | None = None,
                average_months: int | None = None) -> RunSummary:
    """Bill every subscriber (or `accounts`) for the month starting `period`; commits.

    `average_months` (default: the setting AMR_AVERAGE_MONTHS) bounds the average
    that bills a manual-metering month without readings (see `_estimates`).
    """
    started = time.perf_counter()
    if average_months is None:
        from amr.settings import get_settings

        average_months = get_settings().average_months
    period = period.replace(day=1)
    summary = RunSummary(period)
    wanted = sorted({normalize_account(a) for a in accounts}) if accounts is not None else None
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7217010, %s)", (period.year * 100 + period.month,))
        # one big aggregate: keep it in memory and skip JIT compilation, which costs more than it saves
        conn.execute("SET LOCAL work_mem = '256MB'")
        conn.execute("SET LOCAL jit = off")
        month = gather(conn, period, wanted, catalogue, tz, average_months)
        summary.phases["aggregate"] = time.perf_counter() - started
        billed_so_far(conn, month, wanted)
        new_bills, changed, settled = _price_all(conn, month, reason, summary, progress)
        new_bills.extend(_write_new_versions(conn, period, changed, reason))
        _settle(conn, period, settled)
        _accept_recalculated(conn, period, month.recalculated)
        summary.phases["priced"] = time.perf_counter() - started
        _write_lines(conn, new_bills)
        if new_bills:  # each new version posts its difference to the one before to the ledger
            from billing.ledger import copy_bill_charges

            before = {b.account: prev.total for b, prev in changed}
            copy_bill_charges(conn, period, ((b.account, version, b.total - before.get(b.account, ZERO), why)
                                             for b, version, why, _ in new_bills), tz=tz)
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
                why = reason or "first bill for the period"
                new = (bill, 1, f"{why}; {bill.note}" if bill.note else why, None)
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
                if decision == RECALCULATED:
                    month.recalculated.append(account)
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
        why, diff = describe_change(old_lines.get(bill.account, []), bill, prev.total, prev.method)
        if bill.note:
            why = f"{why}; {bill.note}"
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


def _accept_recalculated(conn: Any, period: date, accounts: list[str]) -> None:
    """The readings that replaced estimated bills are accepted by the run that did it, with why."""
    if accounts:
        conn.execute(
            "UPDATE billed_change SET decision = 'accepted', decided_by = 'amr bill', decided_at = now(),"
            " note = 'readings replace a bill estimated without them (Government Decree 354 p. 61)'"
            " WHERE decision IS NULL AND period = %s"
            " AND meter_id IN (SELECT id FROM meter WHERE account = ANY(%s))", (period, accounts))


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
    version, total = prev.version, prev.total
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
            tz: str = "Europe/Moscow", average_months: int = 3) -> Bill | Held:
    """What one account's bill for the month would be on the stored data now; writes nothing."""
    period = period.replace(day=1)
    account = normalize_account(account)
    month = gather(conn, period, [account], catalogue, tz, average_months)
    _, plan, category, area = month.subscribers[0]
    return month.price_one(account, plan, category, area)


def _lines_of(conn: Any, period: date, keys: list[tuple[str, int]]) -> dict[str, list[Line]]:
    rows = conn.execute(
        "SELECT l.account, l.zone, l.date_from, l.date_to, l.kwh, l.estimated_kwh, l.rate, l.amount, l.band"
        " FROM bill_line l JOIN unnest(%s::text[], %s::int[]) AS k(account, version)"
        " ON l.account = k.account AND l.version = k.version"
        " WHERE l.period = %s ORDER BY l.account, l.line_no",
        ([k[0] for k in keys], [k[1] for k in keys], period)).fetchall()
    out: dict[str, list[Line]] = {}
    for account, *rest in rows:
        out.setdefault(account, []).append(Line(*rest))
    return out


_BILL_COPY = ("COPY bill (account, period, version, total, kwh, estimated_kwh, plan, category,"
              " area, reason, diff, fingerprint, method) FROM STDIN")
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
            f"{b.plan}\t{b.category}\t{b.area}\t{_copy_text(why)}\t{diff_text}\t{b.fingerprint()}\t"
            f"{b.method}\n")


_NULL = "\\N"  # COPY text's NULL: the band of an unbanded bill's line


def _write_lines(conn: Any, bills: list[NewBill]) -> None:
    """Lines as COPY text built here: every field is digits, dates or zone names, so nothing
    needs escaping, and a city's 300,000 lines go out several times faster than row by row."""
    if not bills:
        return
    with conn.cursor() as cur, cur.copy(
            "COPY bill_line (account, period, version, line_no, zone, date_from, date_to, kwh,"
            " estimated_kwh, rate, amount, band) FROM STDIN") as cp:
        chunk: list[str] = []
        for b, version, _, _ in bills:
            head = f"{b.account}\t{b.period}\t{version}\t"
            for i, ln in enumerate(b.lines, start=1):
                chunk.append(f"{head}{i}\t{ln.zone}\t{ln.date_from}\t{ln.date_to}\t{ln.kwh}\t"
                             f"{ln.estimated_kwh}\t{ln.rate}\t{ln.amount}\t"
                             f"{_NULL if ln.band is None else ln.band}\n")
            if len(chunk) >= 5000:
                cp.write("".join(chunk))
                chunk.clear()
        if chunk:
            cp.write("".join(chunk))


def bills_of(conn: Any, account: str, period: date) -> list[dict[str, Any]]:
    """Every version of one account's bill for a month, oldest first, with lines."""
    account = normalize_account(account)
    bills = conn.execute(
        "SELECT version, total, kwh, estimated_kwh, plan, reason, diff, created_at, method FROM bill"
        " WHERE account = %s AND period = %s ORDER BY version", (account, period)).fetchall()
    lines = conn.execute(
        "SELECT version, zone, date_from, date_to, kwh, estimated_kwh, rate, amount, band FROM bill_line"
        " WHERE account = %s AND period = %s ORDER BY version, line_no", (account, period)).fetchall()
    out = []
    for version, total, kwh, est, plan, why, diff, created, method in bills:
        out.append({"account": account, "period": period, "version": version, "total": total,
                    "kwh": kwh, "estimated_kwh": est, "plan": plan, "reason": why, "diff": diff,
                    "created_at": created, "method": method,
                    "lines": [Line(*r[1:]) for r in lines if r[0] == version]})
    return out
