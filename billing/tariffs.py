"""The tariff catalogue: effective-dated rates per category, area and plan.

Rates change twice a year by order of the Committee on Tariffs, so they are
data (TOML files, then the `tariff` table), never code. A catalogue is refused
as a whole when any entry is wrong, and every problem names the entry and the
key, because the person reading it has the order and the file side by side.

Volume bands (St. Petersburg since 01.07.2024: the rate depends on the
account's monthly volume) fit the same shape: an entry carries `band` (1, 2,
3...) with the monthly volume range `band_from_kwh`..`band_to_kwh` it applies
to, and the overlap rule is per band. How zone volumes are shared between
bands is not published anywhere, so it is a named choice of the catalogue:
`allocation = "proportional"` on the band entries (each band's volume split
across the zones in the month's zone shares; see `billing.engine`). A banded
tariff whose entries name no rule is held back by the engine instead of being
guessed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from amr.errors import ProblemsError
from amr.tomlfile import TomlFileError, read_toml
from collector.rules.vocabulary import ALL, AREAS, CATEGORIES, PLAN_ZONES, RURAL, RURAL_AREA

_KEYS = {"from", "to", "category", "area", "plan", "rates", "band", "band_from_kwh", "band_to_kwh",
         "allocation", "note"}
# how the zone volumes of a month share its volume bands: named in the catalogue, never assumed
PROPORTIONAL = "proportional"
ALLOCATIONS = (PROPORTIONAL,)


class TariffError(ProblemsError):
    """A refused catalogue; `problems` lists every one, `str()` one per line."""

    what = "the tariffs"


@dataclass(frozen=True)
class Tariff:
    """One entry of an order: rates of one plan for one category and area, dates inclusive."""

    valid_from: date
    valid_to: date
    category: str
    area: str
    plan: str
    rates: tuple[tuple[str, Decimal], ...]  # (zone, RUB/kWh with VAT), sorted by zone
    band: int = 1
    band_from_kwh: Decimal = Decimal(0)
    band_to_kwh: Decimal | None = None
    allocation: str | None = None  # the rule sharing zone volumes between bands; None: none named
    source: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, str, str, int]:
        """Entries with the same key must not overlap in time."""
        return (self.category, self.area, self.plan, self.band)

    def rate(self, zone: str) -> Decimal:
        return dict(self.rates)[zone]

    def covers(self, day: date) -> bool:
        return self.valid_from <= day <= self.valid_to

    def rates_json(self) -> str:
        return json.dumps({z: str(r) for z, r in self.rates})

    def describe(self) -> str:
        band = f" band {self.band}" if self.band != 1 else ""
        return (f"{self.category}/{self.area}/{self.plan}{band} "
                f"{self.valid_from}..{self.valid_to}" + (f" ({self.source})" if self.source else ""))


def rate_items(rates: Mapping[str, Decimal]) -> tuple[tuple[str, Decimal], ...]:
    """Rates in the hashable, ordered form a `Tariff` keeps."""
    return tuple(sorted(rates.items()))


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError("not a number")
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"not a decimal number: {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return d


def _date(value: Any) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"not a date like 2026-07-01: {value!r}") from None


def parse_entry(entry: Any, where: str) -> tuple[Tariff | None, list[str]]:
    """One [[tariff]] table to a `Tariff`, or the list of what is wrong with it."""
    problems: list[str] = []
    if not isinstance(entry, dict):
        return None, [f"{where}: must be a table ([[tariff]])"]
    for key in sorted(set(entry) - _KEYS):
        problems.append(f"{where}: key {key!r}: unknown key (known: {', '.join(sorted(_KEYS))})")
    values: dict[str, Any] = {}
    for key in ("from", "to"):
        if key not in entry:
            problems.append(f"{where}: key {key!r}: missing")
            continue
        try:
            values[key] = _date(entry[key])
        except ValueError as exc:
            problems.append(f"{where}: key {key!r}: {exc}")
    for key, allowed in (("category", CATEGORIES), ("area", AREAS), ("plan", tuple(PLAN_ZONES))):
        v = entry.get(key)
        if v is None:
            problems.append(f"{where}: key {key!r}: missing (one of {', '.join(allowed)})")
        elif v not in allowed:
            problems.append(f"{where}: key {key!r}: {v!r} is not one of {', '.join(allowed)}")
        else:
            values[key] = v
    if values.get("category") == RURAL and values.get("area") not in (None, RURAL_AREA):
        problems.append(f"{where}: key 'area': category {RURAL!r} needs area {RURAL_AREA!r}")
    if "from" in values and "to" in values and values["to"] < values["from"]:
        problems.append(f"{where}: key 'to': {values['to']} is before 'from' {values['from']}")
    rates: dict[str, Decimal] = {}
    raw_rates = entry.get("rates")
    if not isinstance(raw_rates, dict):
        problems.append(f"{where}: key 'rates': missing or not a table like {{ {ALL} = \"3.39\" }}")
    else:
        zones = PLAN_ZONES.get(values.get("plan", ""), ())
        for zone, raw in raw_rates.items():
            if zones and zone not in zones:
                problems.append(
                    f"{where}: key 'rates.{zone}': plan {values['plan']!r} has no zone {zone!r} "
                    f"(zones: {', '.join(zones)})")
                continue
            try:
                rate = _decimal(raw)
            except ValueError as exc:
                problems.append(f"{where}: key 'rates.{zone}': {exc}")
                continue
            if rate <= 0:
                problems.append(f"{where}: key 'rates.{zone}': rate must be positive, got {rate}")
            else:
                rates[zone] = rate
        for zone in zones:
            if zone not in raw_rates:
                problems.append(f"{where}: key 'rates.{zone}': missing: every zone of plan "
                                f"{values['plan']!r} needs a rate")
    band = entry.get("band", 1)
    if not isinstance(band, int) or isinstance(band, bool) or band < 1:
        problems.append(f"{where}: key 'band': must be a whole number from 1, got {band!r}")
        band = 1
    lo, hi = Decimal(0), None
    try:
        lo = _decimal(entry.get("band_from_kwh", 0))
        if lo < 0:
            problems.append(f"{where}: key 'band_from_kwh': must not be negative")
    except ValueError as exc:
        problems.append(f"{where}: key 'band_from_kwh': {exc}")
    if entry.get("band_to_kwh") is not None:
        try:
            hi = _decimal(entry["band_to_kwh"])
            if hi <= lo:
                problems.append(f"{where}: key 'band_to_kwh': must be above band_from_kwh {lo}")
        except ValueError as exc:
            problems.append(f"{where}: key 'band_to_kwh': {exc}")
    allocation = entry.get("allocation")
    if allocation is not None and allocation not in ALLOCATIONS:
        problems.append(f"{where}: key 'allocation': {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if problems:
        return None, problems
    return Tariff(values["from"], values["to"], values["category"], values["area"], values["plan"],
                  rate_items(rates), band, lo, hi, allocation, source=where), []


def overlaps(tariffs: Iterable[Tariff]) -> list[str]:
    """Every pair of entries with the same category, area, plan and band whose dates overlap."""
    by_key: dict[tuple, list[Tariff]] = {}
    for t in tariffs:
        by_key.setdefault(t.key, []).append(t)
    problems = []
    for group in by_key.values():
        group.sort(key=lambda t: (t.valid_from, t.valid_to))
        a = group[0]  # the entry reaching furthest so far
        for b in group[1:]:
            if b.valid_from <= a.valid_to:
                problems.append(
                    f"{b.source}: key 'from': {b.valid_from} overlaps {a.source or 'an entry'} "
                    f"({a.category}/{a.area}/{a.plan}, {a.valid_from}..{a.valid_to})")
            if b.valid_to > a.valid_to:
                a = b
    return problems


class Catalogue:
    """A validated set of tariffs with the lookups billing needs."""

    def __init__(self, tariffs: Iterable[Tariff]):
        self.tariffs = sorted(tariffs, key=lambda t: (t.key, t.valid_from))
        problems = overlaps(self.tariffs)
        if problems:
            raise TariffError(problems)
        self._memo: dict[tuple, list] = {}

    def __len__(self) -> int:
        return len(self.tariffs)

    def candidates(self, category: str, area: str, plan: str) -> list[Tariff]:
        """Entries for a subscriber: its own category first, the rural category for rural homes."""
        own = [t for t in self.tariffs if (t.category, t.area, t.plan) == (category, area, plan)]
        if own or area != RURAL_AREA:
            return own
        return [t for t in self.tariffs if (t.category, t.area, t.plan) == (RURAL, RURAL_AREA, plan)]

    def segments(self, category: str, area: str, plan: str, first: date, last: date
                 ) -> list[tuple[date, date, list[Tariff] | None]]:
        """[first, last] cut into runs of days with the same tariff (bands together).

        A run without any tariff comes back with None, so the caller can say
        which days are unpriced instead of billing them at nothing.
        """
        memo_key = (category, area, plan, first, last)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._segments(category, area, plan, first, last)
        return self._memo[memo_key]

    def _segments(self, category: str, area: str, plan: str, first: date, last: date
                  ) -> list[tuple[date, date, list[Tariff] | None]]:
        cands = self.candidates(category, area, plan)
        out: list[tuple[date, date, list[Tariff] | None]] = []
        day = first
        while day <= last:
            here = [t for t in cands if t.covers(day)] or None
            if here:
                end = min(min(t.valid_to for t in here), last)
                # a band starting later inside the run cuts it too
                later = [t.valid_from - timedelta(days=1) for t in cands if day < t.valid_from <= end]
                end = min([end, *later])
            else:
                nxt = [t.valid_from for t in cands if t.valid_from > day]
                end = min(min(nxt) - timedelta(days=1), last) if nxt else last
            out.append((day, end, sorted(here, key=lambda t: t.band) if here else None))
            day = end + timedelta(days=1)
        return out


def parse_catalogue(data: dict[str, Any], source: str = "<tariffs>") -> list[Tariff]:
    """Validate a parsed TOML document; every problem is collected before refusing."""
    problems: list[str] = []
    for key in sorted(set(data) - {"tariff"}):
        problems.append(f"{source}: unknown section {key!r} (expected [[tariff]])")
    entries = data.get("tariff", [])
    if not isinstance(entries, list) or not entries:
        problems.append(f"{source}: no [[tariff]] entries")
        entries = []
    tariffs = []
    for i, entry in enumerate(entries):
        desc = ""
        if isinstance(entry, dict):
            desc = " (" + "/".join(str(entry.get(k, "?")) for k in ("category", "area", "plan")) \
                + f" from {entry.get('from', '?')})"
        t, errs = parse_entry(entry, f"{source}: tariff[{i}]{desc}")
        problems.extend(errs)
        if t:
            tariffs.append(t)
    problems.extend(overlaps(tariffs))
    if problems:
        raise TariffError(problems)
    return tariffs


def load_catalogue_file(path: Path | str) -> list[Tariff]:
    """Read and validate a tariff file; raise `TariffError` naming each problem."""
    path = Path(path)
    try:
        data = read_toml(path)
    except TomlFileError as exc:
        raise TariffError([str(exc)]) from None
    return parse_catalogue(data, str(path))


# --- the database side -------------------------------------------------------------

def _row_to_tariff(row: tuple) -> Tariff:
    vf, vt, cat, area, plan, band, lo, hi, rates, allocation, source = row
    return Tariff(vf, vt, cat, area, plan, rate_items({z: Decimal(r) for z, r in rates.items()}),
                  band, lo, hi, allocation, source=source)


def load_db_catalogue(conn: Any) -> Catalogue:
    """Every tariff stored in the database, as one validated catalogue."""
    rows = conn.execute(
        "SELECT valid_from, valid_to, category, area, plan, band, band_from_kwh, band_to_kwh,"
        " rates, allocation, source FROM tariff ORDER BY id").fetchall()
    return Catalogue(_row_to_tariff(r) for r in rows)


def store_catalogue(conn: Any, tariffs: list[Tariff]) -> tuple[int, int]:
    """Add tariffs to the database; returns (added, already there).

    An entry identical to a stored one is skipped, so loading a file twice is
    harmless; an entry overlapping a different stored one is refused with both
    named. Everything is checked before anything is written.
    """
    with conn.transaction():
        conn.execute("LOCK TABLE tariff IN SHARE ROW EXCLUSIVE MODE")
        stored = load_db_catalogue(conn).tariffs
        have = set(stored)
        new = [t for t in tariffs if t not in have]
        problems = overlaps([*stored, *new])
        if problems:
            raise TariffError(problems)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO tariff (valid_from, valid_to, category, area, plan, band,"
                " band_from_kwh, band_to_kwh, rates, allocation, source)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s)",
                [(t.valid_from, t.valid_to, t.category, t.area, t.plan, t.band, t.band_from_kwh,
                  t.band_to_kwh, t.rates_json(), t.allocation, t.source) for t in new])
    return len(new), len(tariffs) - len(new)


# --- consumption norms -------------------------------------------------------------
# A manual-metering month without readings is billed by the average of past months
# and then by the norm (Government Decree 354 p. 59-60): kWh per resident and month,
# per category and the rooms and residents of the home, set by the region's order.
# Data, like the tariffs; a norms file is refused whole with every problem named.

NORM_CATEGORIES = ("gas_stove", "electric_stove")
_NORM_KEYS = {"from", "to", "category", "rooms", "kwh_per_person", "note"}


@dataclass(frozen=True)
class Norm:
    """One cell of a norm table: kWh per resident a month for a category, rooms and residents."""

    valid_from: date
    valid_to: date
    category: str
    rooms: int
    residents: int
    kwh_per_person: Decimal
    source: str = field(default="", compare=False)


class Norms:
    """A validated set of norm cells with the one lookup billing needs."""

    def __init__(self, norms: Iterable[Norm]):
        self.norms = sorted(norms, key=lambda n: (n.category, n.valid_from, n.rooms, n.residents))
        problems = norm_overlaps(self.norms)
        if problems:
            raise TariffError(problems)

    def __len__(self) -> int:
        return len(self.norms)

    def volume(self, category: str, rooms: int | None, residents: int | None, first: date, last: date
               ) -> tuple[Decimal, str] | str:
        """The month's norm volume and how it was found, or why there is none.

        One table must be in force for the whole month. The highest rooms (and
        residents) value of that table also covers more rooms (residents).
        """
        if rooms is None or residents is None:
            return ("the consumption norm needs the home's rooms and residents, which the inventory "
                    "does not give (keys rooms and residents of the [[subscriber]])")
        here = [n for n in self.norms if n.category == category
                and n.valid_from <= first and last <= n.valid_to]
        if not here:
            return f"no consumption norm for {category} in force for all of {first:%Y-%m}"
        r = max((n.rooms for n in here if n.rooms <= rooms), default=None)
        if r is None:
            return f"no consumption norm for {category} homes of {rooms} room(s)"
        cells = [n for n in here if n.rooms == r]
        p = max((n.residents for n in cells if n.residents <= residents), default=None)
        if p is None:
            return f"no consumption norm for {category}, {r} room(s), {residents} resident(s)"
        cell = next(n for n in cells if n.residents == p)
        kwh = cell.kwh_per_person * residents
        return kwh, (f"norm {category}, {rooms} room(s), {residents} resident(s): "
                     f"{residents} x {cell.kwh_per_person} kWh")


def norm_overlaps(norms: Iterable[Norm]) -> list[str]:
    """Cells of the same category, rooms and residents whose dates overlap."""
    by_key: dict[tuple[str, int, int], list[Norm]] = {}
    for n in norms:
        by_key.setdefault((n.category, n.rooms, n.residents), []).append(n)
    problems = []
    for group in by_key.values():
        group.sort(key=lambda n: n.valid_from)
        for a, b in itertools.pairwise(group):
            if b.valid_from <= a.valid_to:
                problems.append(f"{b.source}: key 'from': {b.valid_from} overlaps {a.source or 'an entry'} "
                                f"({a.category}, {a.rooms} room(s), {a.valid_from}..{a.valid_to})")
    return problems


def _whole(value: Any, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a whole number from 1, got {value!r}")
    return value


def parse_norms(data: dict[str, Any], source: str = "<norms>") -> list[Norm]:
    """Validate a parsed norms document ([[norm]] tables); every problem is collected first."""
    problems: list[str] = []
    for key in sorted(set(data) - {"norm"}):
        problems.append(f"{source}: unknown section {key!r} (expected [[norm]])")
    entries = data.get("norm", [])
    if not isinstance(entries, list) or not entries:
        problems.append(f"{source}: no [[norm]] entries")
        entries = []
    norms: list[Norm] = []
    for i, entry in enumerate(entries):
        where = f"{source}: norm[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table ([[norm]])")
            continue
        where += f" ({entry.get('category', '?')}, rooms {entry.get('rooms', '?')})"
        for key in sorted(set(entry) - _NORM_KEYS):
            problems.append(f"{where}: key {key!r}: unknown key (known: {', '.join(sorted(_NORM_KEYS))})")
        got: dict[str, Any] = {}
        for key in ("from", "to"):
            try:
                got[key] = _date(entry[key]) if key in entry else None
                if got[key] is None:
                    problems.append(f"{where}: key {key!r}: missing")
            except ValueError as exc:
                problems.append(f"{where}: key {key!r}: {exc}")
        if got.get("from") and got.get("to") and got["to"] < got["from"]:
            problems.append(f"{where}: key 'to': {got['to']} is before 'from' {got['from']}")
        if entry.get("category") not in NORM_CATEGORIES:
            problems.append(f"{where}: key 'category': {entry.get('category')!r} is not one of "
                            f"{', '.join(NORM_CATEGORIES)}")
        try:
            rooms = _whole(entry.get("rooms"), "rooms")
        except ValueError as exc:
            problems.append(f"{where}: key 'rooms': {exc}")
            rooms = 0
        table = entry.get("kwh_per_person")
        if not isinstance(table, dict) or not table:
            problems.append(f"{where}: key 'kwh_per_person': missing or not a table of residents to kWh "
                            "like { 1 = \"100\", 2 = \"62\" }")
            table = {}
        cells = []
        for people, raw in table.items():
            try:
                residents = _whole(people, "residents")
                kwh = _decimal(raw)
                if kwh <= 0:
                    raise ValueError(f"must be positive, got {kwh}")
            except ValueError as exc:
                problems.append(f"{where}: key 'kwh_per_person.{people}': {exc}")
                continue
            cells.append((residents, kwh))
        if not problems and got.get("from") and got.get("to") and rooms:
            norms.extend(Norm(got["from"], got["to"], entry["category"], rooms, r, k, where) for r, k in cells)
    problems.extend(norm_overlaps(norms))
    if problems:
        raise TariffError(problems)
    return norms


def load_norms_file(path: Path | str) -> list[Norm]:
    """Read and validate a norms file; raise `TariffError` naming each problem."""
    path = Path(path)
    try:
        data = read_toml(path)
    except TomlFileError as exc:
        raise TariffError([str(exc)]) from None
    return parse_norms(data, str(path))


def load_db_norms(conn: Any) -> Norms:
    """Every consumption norm stored in the database."""
    rows = conn.execute("SELECT valid_from, valid_to, category, rooms, residents, kwh_per_person, source"
                        " FROM consumption_norm ORDER BY id").fetchall()
    return Norms(Norm(*r) for r in rows)


def store_norms(conn: Any, norms: list[Norm]) -> tuple[int, int]:
    """Add norm cells to the database; returns (added, already there). Checked whole first."""
    with conn.transaction():
        conn.execute("LOCK TABLE consumption_norm IN SHARE ROW EXCLUSIVE MODE")
        stored = load_db_norms(conn).norms
        have = set(stored)
        new = [n for n in norms if n not in have]
        problems = norm_overlaps([*stored, *new])
        if problems:
            raise TariffError(problems)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO consumption_norm (valid_from, valid_to, category, rooms, residents,"
                " kwh_per_person, source) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(n.valid_from, n.valid_to, n.category, n.rooms, n.residents, n.kwh_per_person, n.source)
                 for n in new])
    return len(new), len(norms) - len(new)
