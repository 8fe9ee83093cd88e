"""How a reading is kept in reading_data, the compact table behind the `reading` view.

Migration 023 has the layout and its reasons (bytes per reading): small integer
keys for (meter, register) and for the source text, quality flags and the
interval's kind, status, estimated, zone and day packed in one integer, the
interval's start as a span in microseconds. This module is the ingestor's half of
that encoding; the view and its triggers are the SQL half, and tests check that
the two agree (tests/test_compact_reading.py).

`Codes` caches the dictionary keys of one process. Dictionary rows are only ever
added, never changed or deleted, so a key once read stays true.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import NamedTuple

import psycopg

from adapters import quality
from amr.storage.db import array_literal

# the flags word (see 023_compact_reading.sql)
QUALITY_BITS = 18
QUALITY_MASK = (1 << QUALITY_BITS) - 1
KINDS = (None, "normal", "rollover", "reset", "gap")
STATUSES = (None, "ok", "suspect", "accepted", "rejected")
ESTIMATED = (None, False, True)
ZONES = (None, "night", "peak", "half_peak")
_KIND = {k: i for i, k in enumerate(KINDS)}
_STATUS = {s: i for i, s in enumerate(STATUSES)}
_ESTIMATED = {False: 1, True: 2, None: 0}
_ZONE = {z: i for i, z in enumerate(ZONES)}
_KIND_AT, _STATUS_AT, _ESTIMATED_AT, _ZONE_AT, _DAY_AT = 18, 21, 24, 26, 28

# an import's source names its line (`import:FILE#L12`): the line is kept apart, so the
# file is one dictionary entry, not one per line
_LINE = re.compile(r"^(.*)#L([1-9][0-9]{0,8})$", re.S)


def split_source(text: str) -> tuple[str, int | None]:
    """A source text as its prefix and the import line it names (`import:F#L12` -> ('import:F', 12))."""
    m = _LINE.match(text) if "#L" in text else None
    return (m.group(1), int(m.group(2))) if m else (text, None)

COLUMNS = "series, flags, ts, source, line, value, kwh, span"
# kwh and span go pre-encoded (numeric_field), hence bytea
TYPES = ["int4", "int4", "timestamptz", "int4", "int4", "numeric", "bytea", "bytea"]


class StoredInterval(NamedTuple):
    """The interval columns as the view shows them (start_ts, kwh, kind, status, estimated, day, zone)."""

    start: datetime | None
    kwh: Decimal
    kind: str | None
    status: str | None
    estimated: bool | None
    day: date | None
    zone: str | None


def interval_bits(kind: str | None, status: str | None, estimated: bool | None, day: date | None,
                  zone: str | None, ts: datetime) -> int:
    """The interval part of the flags word; `ts` is the reading's instant in UTC (day is kept
    as its distance from ts's UTC date). ValueError for a value that has no code."""
    try:
        bits = (_KIND[kind] << _KIND_AT) | (_STATUS[status] << _STATUS_AT) \
            | (_ESTIMATED[estimated] << _ESTIMATED_AT) | (_ZONE[zone] << _ZONE_AT)
    except KeyError as exc:
        raise ValueError(f"reading at {ts.isoformat()}: {exc.args[0]!r} has no code in reading_data.flags") from None
    if day is not None:
        d = (day - ts.date()).days + 4
        if not 1 <= d <= 7:
            raise ValueError(f"reading at {ts.isoformat()}: day {day} is more than 3 days from its UTC date")
        bits |= d << _DAY_AT
    return bits


@lru_cache(maxsize=4096)
def _info(info: int) -> tuple[str | None, str | None, bool | None, int, str | None]:
    return (KINDS[info & 7], STATUSES[(info >> 3) & 7], ESTIMATED[(info >> 6) & 3],
            (info >> 10) & 7, ZONES[(info >> 8) & 3])


_DAYS = [timedelta(days=d - 4) for d in range(8)]


def stored_interval(ts: datetime, flags: int, kwh: Decimal | None, span: Decimal | None) -> StoredInterval | None:
    """A stored row's interval, None when it closes none (kwh NULL, as interval_usage reads it)."""
    if kwh is None:
        return None
    kind, status, estimated, day_code, zone = _info(flags >> _KIND_AT)
    day: date | None = None
    if day_code:  # rows come back in the session's time zone
        day = (ts if ts.tzinfo is UTC else ts.astimezone(UTC)).date() + _DAYS[day_code]
    return StoredInterval(
        None if span is None else ts - timedelta(microseconds=int(span)), kwh, kind, status, estimated,
        day, zone)


@lru_cache(maxsize=65536)
def numeric_field(text: str) -> bytes:
    """A decimal (as str(Decimal), which keeps its scale) as a binary COPY numeric field.

    psycopg's numeric dumper takes about 2 µs a value, the costliest field of the
    row; interval energies and spans repeat (a household's half hours take a few
    thousand distinct values), so each is encoded once.
    """
    field = _NUMERIC_DUMPER.dump(Decimal(text))
    assert field is not None  # a dumper returns None for a NULL only
    return bytes(field)


_NUMERIC_DUMPER = psycopg.adapters.get_dumper_by_oid(
    psycopg.adapters.types["numeric"].oid, psycopg.pq.Format.BINARY)(Decimal, None)


@lru_cache(maxsize=4096)
def span_field(microseconds: int) -> bytes:
    return numeric_field(str(microseconds))


def span_of(start: datetime, ts: datetime) -> int:
    d = ts - start
    return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds


class Codes:
    """The dictionary keys of reading_data (series, sources, quality bits) one process knows."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], int] = {}
        self._sources: dict[str, int] = {"": 0}
        self._bits: dict[str, int] = {}
        self._masks: dict[frozenset[str], int] = {}
        self._names: dict[int, tuple[str, ...]] = {}
        self._made: list[tuple[str, object]] = []  # keys made in a transaction the caller may roll back

    # --- what a batch needs, made before its transaction ---

    def missing_sources(self, sources: Iterable[str]) -> set[str]:
        out = set()
        for s in sources:
            if s not in self._sources:
                prefix = split_source(s)[0]
                if prefix not in self._sources:
                    out.add(prefix)
        return out

    def ensure(self, conn: psycopg.Connection, keys: Iterable[tuple[str, str]], sources: set[str],
               flags: set[str]) -> None:
        """Make and learn the keys of these series, source texts (already split) and flags."""
        new_keys = [k for k in keys if k not in self.series]
        if not self._bits:
            self._load_bits(conn)
        new_flags = sorted(f for f in flags if f not in self._bits)
        if not (new_keys or sources or new_flags):
            return
        remember = conn.autocommit
        with conn.transaction():
            if new_keys:
                m = array_literal([k[0] for k in new_keys])
                r = array_literal([k[1] for k in new_keys])
                conn.execute("INSERT INTO reading_series (meter_id, register)"
                             " SELECT * FROM unnest(%s::text[], %s::text[]) ORDER BY 1, 2"
                             " ON CONFLICT (meter_id, register) DO NOTHING", (m, r))
                for sid, mid, reg in conn.execute(
                        "SELECT s.id, s.meter_id, s.register FROM reading_series s"
                        " JOIN unnest(%s::text[], %s::text[]) AS k(m, r) ON s.meter_id = k.m AND s.register = k.r",
                        (m, r)).fetchall():
                    self.series[(mid, reg)] = sid
                    if not remember:
                        self._made.append(("series", (mid, reg)))
            if sources:
                src = array_literal(sorted(sources))
                conn.execute("INSERT INTO reading_source (source) SELECT unnest(%s::text[]) ORDER BY 1"
                             " ON CONFLICT (source) DO NOTHING", (src,))
                for sid, text in conn.execute("SELECT id, source FROM reading_source WHERE source = ANY(%s::text[])",
                                              (src,)).fetchall():
                    self._sources[text] = sid
                    if not remember:
                        self._made.append(("source", text))
            if new_flags:
                conn.execute("SELECT amr_quality_bit(f) FROM unnest(%s::text[]) f", (array_literal(new_flags),))
                self._load_bits(conn)
                if not remember:
                    self._made.append(("bits", None))

    def forget_uncommitted(self) -> None:
        """Drop keys made inside a caller's transaction: it may roll them back (they are read again)."""
        for kind, key in self._made:
            if kind == "series":
                self.series.pop(key, None)  # type: ignore[call-overload]
            elif kind == "source":
                self._sources.pop(key, None)  # type: ignore[call-overload]
            else:
                self._bits.clear()
                self._masks.clear()
                self._names.clear()
        self._made.clear()

    def _load_bits(self, conn: psycopg.Connection) -> None:
        self._bits = {name: bit for bit, name in conn.execute("SELECT bit, name FROM quality_flag").fetchall()}
        self._masks.clear()
        self._names.clear()

    def load_flags(self, conn: psycopg.Connection) -> None:
        """Learn the quality bits, giving every flag of adapters/quality.py one (a flag added there later
        takes the next free bit the first time an ingestor starts)."""
        self._load_bits(conn)
        self.ensure(conn, (), set(), set(quality.ALL))

    # --- encoding, on the COPY path ---

    def source(self, text: str) -> tuple[int, int | None]:
        """The source key and the import line of a reading's source text (known by ensure)."""
        sid = self._sources.get(text)
        if sid is not None:
            return sid, None
        prefix, line = split_source(text)
        if line is None:
            raise KeyError(text)
        return self._sources[prefix], line

    def mask(self, flags: frozenset[str]) -> int:
        m = self._masks.get(flags)
        if m is None:
            bits = self._bits
            m = 0
            for f in flags:
                m |= 1 << bits[f]
            self._masks[flags] = m
        return m

    def names(self, mask: int) -> tuple[str, ...]:
        """The flags of a quality mask, sorted (as the view shows them)."""
        out = self._names.get(mask)
        if out is None:
            by_bit = {b: n for n, b in self._bits.items()}
            out = tuple(sorted(by_bit[b] for b in range(QUALITY_BITS) if mask & (1 << b)))
            self._names[mask] = out
        return out

    def knows(self, flags: Iterable[str]) -> bool:
        return all(f in self._bits for f in flags)
