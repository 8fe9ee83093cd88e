"""The ingestion entry point every adapter, decoder and import uses.

One call takes a batch of readings (and inputs already refused upstream),
validates each with collector.rules.vee, stores the accepted ones with COPY,
idempotently, derives interval energy around them, splits it into zones and
keeps daily_zone_usage current, in one transaction. A batch either lands
whole or not at all, so a caller that keeps its batch until `ingest` returns
(the gateway spool, the MQTT consumer) never loses or doubles a reading. A
batch naming more than METERS_PER_TRANSACTION meters is stored in several
transactions of whole meters (each meter is locked for its transaction, and
PostgreSQL's lock table is shared and small); a part stored before a failure
comes again as a repeat, told apart and counted as a duplicate, so nothing is
lost or doubled either.

Each stored reading carries the interval it closes, so the common case (a
reading appended after the last one) is one row written. Per register, the
stored readings just before the new ones are loaded first; repeats and
conflicts are told from them, and only stored readings whose derivation
changes (next to a late or out-of-order reading) are updated.
"""

from __future__ import annotations

import bisect
import hashlib
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from operator import lt
from typing import Any, NamedTuple, Self

import psycopg
from psycopg.types.string import BytesBinaryDumper

from adapters import quality
from adapters.reading import REJECT_CODES, Reading, Rejected
from amr import metrics
from amr.settings import Settings, get_settings
from amr.storage import retention
from amr.storage.db import array_literal
from amr.storage.timeseries import Partitions, next_month
from collector.ingest import layout
from collector.rules import vee
from collector.rules.intervals import between, glitches
from collector.rules.vee import BILLED_REGISTER, MeterRules
from collector.rules.zones import ZoneCalendar, default_calendar

# readings loaded on each side of new ones, so that every reading whose
# classification could change (collector.rules.intervals.glitches: from one before it to
# two after it) is re-judged with all it depends on; more are loaded for the rare
# register with a run of glitches beside new readings
CONTEXT = 4
_COUNTED = ("ok", "accepted")
_ZERO = Decimal(0)
_DERIVED_FLAGS = frozenset({quality.GLITCH, quality.ROLLOVER, quality.RESET})
_FLAGGED_KINDS = frozenset({quality.ROLLOVER, quality.RESET})  # interval kinds flagged on the reading

# the retention watermark (amr.storage.retention) is re-read this often for validation
_WATERMARK_TTL = timedelta(seconds=60)
# partitions made in one transaction at most (each takes locks until commit)
_PARTITIONS_PER_TRANSACTION = 24
# meters one transaction stores at most: it takes an advisory lock for each, and the lock
# table of the server (max_locks_per_transaction x max_connections, 6,400 by default) is
# shared by every session: a batch of 50,000 meters failed with "out of shared memory";
# two ingestion workers at this size take 4,000 of the default 6,400
METERS_PER_TRANSACTION = 2000
# the advisory lock `amr db maintain` holds while it drops; ingestion shares it
_RETENTION_LOCK = 7217002
# the first key of the session advisory lock (7217, token) an owner of series holds
# (migration 026); live owners are the tokens whose lock is held
_OWNER_LOCK = 7217
# series whose tail one process keeps at most (about 2 KB each: 400 MB); beyond it new
# series are read from the database each time. Not least-recently-used: a fleet larger
# than this, read round after round in the same order, would miss on every series.
TAIL_SERIES = 200_000
# the owner token of each connection that holds one, and the ingestor using it: one token
# a connection, so that ingestors made one after another on a pooled connection do not pile
# up session locks on it; the newest takes the token over, and the one before loses its tail
_TOKENS: weakref.WeakKeyDictionary[psycopg.Connection, tuple[int, weakref.ref[Ingestor]]] = (
    weakref.WeakKeyDictionary())
_LIVE_OWNERS = (
    "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = 7217 AND objsubid = 2"
    " AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


class _WatermarkMoved(Exception):
    """The retention watermark moved after the batch was validated: validate it again."""


# a reading and the interval it closes, as reading_data keeps them (collector.ingest.layout)
_READING_COLUMNS = layout.COLUMNS
_READING_TYPES = layout.TYPES
# a stored reading loaded beside new ones: flags hold its quality and its interval's codes
_STORED = "ts, value, flags, kwh, span"
_SEGMENT_TYPES = ["text", "text", "timestamptz", "timestamptz", "timestamptz", "date", "text", "numeric"]


class _Interval(NamedTuple):
    """The interval a reading closes, as the reading's row holds it (start_ts to zone).

    Derived ones and stored ones are compared whole: a stored reading whose
    re-derived interval equals the one it holds is left alone. day and zone
    are None when the interval crosses a local midnight or a zone border; its
    parts are then in interval_segment. A reading that closes no interval
    (the first of its series, a glitch) has None instead and all seven
    columns NULL: this module writes them together, so a stored row with kwh
    NULL closes none (as interval_usage reads it).
    """

    start: datetime
    kwh: Decimal
    kind: str
    status: str
    estimated: bool
    day: date | None
    zone: str | None


class _Stored(NamedTuple):
    """A stored reading loaded beside new ones (the columns of _STORED)."""

    ts: datetime
    value: Decimal
    quality: int  # the quality bits of its flags (layout.QUALITY_MASK), named only when re-derived
    interval: _Interval | None


# A reading in time order among its register's stored and new ones: (ts, value,
# stored row, new reading), exactly one of the last two set. A plain tuple: one
# is made per reading ingested, and a NamedTuple takes several times as long to
# make; _emit names the fields as it unpacks them.
_Point = tuple[datetime, Decimal, _Stored | None, Reading | None]


class _Span(NamedTuple):
    """The points of a register that are re-derived, [start, stop), and which are glitches."""

    start: int
    stop: int
    glitch: list[bool]  # one per point, collector.rules.intervals.glitches


class _Plan(NamedTuple):
    """A register's new readings told from repeats, with what to re-derive (see Ingestor._plan)."""

    points: list[_Point]
    span: _Span | None  # None: nothing is new
    duplicates: int
    conflicts: list[tuple[Reading, Decimal]]  # a new reading and the different value stored
    to_the_end: bool  # the points reach the series' newest reading: their last ones are its tail


class _Update(NamedTuple):
    """A stored reading's re-derived columns (its value is never changed)."""

    meter_id: str
    register: str
    ts: datetime
    quality: Sequence[str]
    interval: _Interval | None


class _OldParts(NamedTuple):
    """A stored reading whose old interval had parts in interval_segment, to delete them."""

    meter_id: str
    register: str
    ts: datetime  # the parts' end_ts
    status: str  # the old interval's, to take its energy out of the daily totals


class _Held(NamedTuple):
    """An interval added, changed or taken away in a billed month: billing holds that bill."""

    meter_id: str
    register: str
    start: datetime
    end: datetime
    period: date  # the billed month (first day)


class _Refused(NamedTuple):
    """A refused input as rejected_reading records it (its fingerprint and count aside)."""

    kind: str  # invalid or conflict
    source: str | None
    code: str
    meter_id: str | None
    register: str | None
    ts: datetime | None
    value: str | None
    reason: str | None
    raw: bytes | None


# a person's decision on an interval is kept by (meter_id, register, start_ts, end_ts)
_DecisionKey = tuple[str, str, datetime, datetime]
# an interval_segment row as COPYed: meter_id, register, end_ts, seg_start, seg_end, day, zone, kwh
_SegmentRow = tuple[str, str, datetime, datetime, datetime, date, str, Decimal]
# a daily total's part in one batch: day, zone, estimated, status
_DailyKey = tuple[date, str, bool, str]


class RefusedInput(NamedTuple):
    """One refused input as a caller reports it: its source (an import's says the line), why."""

    source: str | None
    code: str
    reason: str | None
    raw: bytes | None


@dataclass
class IngestResult:
    accepted: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected: int = 0
    rejects_by_code: dict[str, int] = field(default_factory=dict)
    # the inputs this one call refused (conflicts too), in input order where known, for a
    # caller that reports them line by line (`amr ingest --rejects`); `+=` does not carry
    # them, so a running total stays small
    refused: list[RefusedInput] = field(default_factory=list, compare=False, repr=False)

    def __iadd__(self, other: IngestResult) -> Self:
        self.accepted += other.accepted
        self.duplicate += other.duplicate
        self.conflict += other.conflict
        self.rejected += other.rejected
        for code, n in other.rejects_by_code.items():
            self.rejects_by_code[code] = self.rejects_by_code.get(code, 0) + n
        return self

    @property
    def total(self) -> int:
        return self.accepted + self.duplicate + self.conflict + self.rejected

    def as_dict(self) -> dict[str, int]:
        return {
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "conflict": self.conflict,
            "rejected": self.rejected,
        }


def _reject_row(
    kind: str, source: str, code: str, reason: str, raw: bytes | None,
    meter_id: str | None = None, register: str | None = None, ts: Any = None, value: Any = None,
) -> _Refused:
    if not isinstance(ts, datetime) or ts.utcoffset() is None:
        ts = None
    else:
        try:
            ts = ts.astimezone(UTC)  # PostgreSQL refuses offsets beyond 15:59 that Python allows
        except OverflowError:  # year 1 east of UTC, year 9999 west of it: the raw bytes keep it
            ts = None
    return _Refused(kind, _text(source), code, _text(meter_id), _text(register), ts,
                    None if value is None else _text(str(value)), _text(reason), raw)


def _text(value: Any) -> str | None:
    """Text PostgreSQL can store: a NUL byte becomes a visible escape (the raw bytes keep it)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _fingerprint(row: _Refused) -> bytes:
    """The identity of a refused input: every field of its row but the reason (see _write_rejects)."""
    h = hashlib.sha256()
    ts = row.ts.isoformat() if row.ts is not None else None
    for part in (row.kind, row.source, row.code, row.meter_id, row.register, ts, row.value):
        h.update(b"\x00" if part is None else b"\x01" + part.encode("utf-8", "surrogatepass") + b"\x00")
    h.update(row.raw or b"")
    return h.digest()


def _raw_of(r: Reading) -> bytes:
    ts = r.ts.isoformat() if isinstance(r.ts, datetime) else str(r.ts)
    return f"{r.meter_id},{r.register},{ts},{r.value}".encode("utf-8", "backslashreplace")


def record_metrics(result: Any, n: int, seconds: float) -> None:
    """Count one stored batch (an IngestResult, or anything with its counts) in the metrics."""
    metrics.READINGS.labels("accepted").inc(result.accepted)
    metrics.READINGS.labels("duplicate").inc(result.duplicate)
    metrics.READINGS.labels("conflict").inc(result.conflict)
    metrics.READINGS.labels("rejected").inc(result.rejected)
    for code, k in result.rejects_by_code.items():
        # labels only from the fixed set: a forwarded or unknown code cannot make new series
        metrics.REJECTS.labels(code if code in REJECT_CODES else "other").inc(k)
    metrics.DB_BATCH_SIZE.observe(n)
    metrics.DB_WRITE_SECONDS.observe(seconds)


class Ingestor:
    """Validates, stores and derives; one per database connection.

    Each `ingest` call is its own transaction and commits: the connection is
    switched to autocommit so that `transaction()` blocks are real
    transactions. A connection handed over inside an open transaction is left
    as it is; then the caller's commit decides. Not thread-safe: give each
    thread its own connection and Ingestor.
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        settings: Settings | None = None,
        calendar: ZoneCalendar | None = None,
        clock: Callable[[], datetime] | None = None,
        record_metrics: bool = True,
        tail: bool = True,
    ):
        if not conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.autocommit = True
        self.conn = conn
        self.settings = settings or get_settings()
        self.calendar = calendar or default_calendar()
        self.clock = clock or (lambda: datetime.now(UTC))
        self._meters: dict[str, MeterRules] = {}
        self._partitions = Partitions()
        self._codes = layout.Codes()
        self._codes_loaded = False
        self._record = record_metrics
        self._watermark_read: tuple[datetime, datetime | None] | None = None
        # The tail (migration 026): each owned series' newest CONTEXT readings as stored,
        # oldest first, so that an append needs no window probe. Only with commits of
        # our own: a caller's transaction may roll back what the tail would remember.
        self._tail_on = tail and conn.autocommit
        self._token: int | None = None  # this process's owner token, once it ingested
        self._gen: int | None = None  # its tail_owner.gen when last read
        self._owned: set[int] = set()  # series whose owner is this token (committed)
        self._tails: dict[int, list[_Stored]] = {}
        self.tail_hits = 0  # windows taken from the tail instead of the database
        self.tail_drops = 0  # times another writer made us forget every tail

    # --- meters ---

    def forget_meters(self) -> None:
        """Drop cached meter rules (after an inventory reload)."""
        self._meters.clear()

    def _meter_rules(self, ids: set[str]) -> dict[str, MeterRules]:
        missing = [i for i in ids if i not in self._meters and vee.plausible_id(i)]
        if missing:
            rows = self.conn.execute(
                "SELECT id, multiplier, rollover, max_power_kw, interval_s, installed, removed,"
                " adapter, config->'registers' FROM meter WHERE id = ANY(%s)",
                (missing,),
            ).fetchall()
            for mid, mult, roll, pmax, ival, inst, rem, adapter, regs in rows:
                self._meters[mid] = MeterRules(
                    mid, mult, roll, pmax, timedelta(seconds=ival), inst, rem,
                    vee.configured_registers(adapter, {"registers": regs}))
        return self._meters

    # --- the entry point ---

    def ingest(self, items: Iterable[Reading | Rejected]) -> IngestResult:
        """Validate and store a batch; returns what happened to each input."""
        started = time.perf_counter()
        items = list(items)
        if not items:
            return IngestResult()
        if self.conn.autocommit:  # our own transactions: a large batch goes in parts of whole meters
            parts = _by_meters(items, METERS_PER_TRANSACTION)
            if len(parts) > 1:
                total = IngestResult()
                for part in parts:
                    done = self.ingest(part)
                    total += done
                    total.refused.extend(done.refused)
                return total
        for _ in range(3):
            try:
                result = self._ingest(items)
                break
            except _WatermarkMoved:  # `amr db maintain` pruned meanwhile: judge the batch again
                continue
        else:
            raise RuntimeError("the retention watermark kept moving while this batch was stored")
        if not self.conn.autocommit:  # the caller's transaction decides: keys made in it may go
            self._codes.forget_uncommitted()
        if self._record:
            record_metrics(result, len(items), time.perf_counter() - started)
        return result

    def _time_window(self, now: datetime) -> vee.TimeWindow:
        """The plausibility window of this batch; the watermark is read at most once a minute
        here, and checked again under the retention lock inside each store transaction."""
        if self._watermark_read is None or now - self._watermark_read[0] > _WATERMARK_TTL:
            self._watermark_read = (now, retention.watermark(self.conn))
        return vee.TimeWindow.build(self.calendar.starts_at, now, self.settings.max_reading_age_years,
                                    self._watermark_read[1])

    def _ingest(self, items: list[Reading | Rejected]) -> IngestResult:
        result = IngestResult()
        now = self.clock()
        tolerance = timedelta(seconds=self.settings.future_tolerance_s)
        window = self._time_window(now)
        rejects: list[_Refused] = []
        # per register, the batch's readings by UTC instant: a repeat inside the batch
        # is told apart here, one against the database in _store
        good: dict[tuple[str, str], dict[datetime, Reading]] = {}
        conflicts_in_batch: list[tuple[Reading, Decimal]] = []
        meters = self._meter_rules({r.meter_id for r in items if isinstance(r, Reading)})
        check = vee.check

        for item in items:
            if isinstance(item, Rejected):
                rejects.append(_reject_row("invalid", item.source, item.code, item.reason, item.raw,
                                           item.meter_id, item.register, item.ts))
                continue
            refusal = check(item, meters.get(item.meter_id), now, tolerance, window)
            if refusal is not None:
                rejects.append(_reject_row("invalid", item.source, refusal.code, refusal.reason,
                                           _raw_of(item), item.meter_id, item.register, item.ts, item.value))
                continue
            ts = item.ts
            if ts.tzinfo is not UTC:
                ts = ts.astimezone(UTC)
            series = good.get((item.meter_id, item.register))
            if series is None:
                good[(item.meter_id, item.register)] = {ts: item}
                continue
            first = series.get(ts)
            if first is None:
                series[ts] = item
            elif first.value == item.value:
                result.duplicate += 1
            else:
                conflicts_in_batch.append((item, first.value))

        for item, stored in conflicts_in_batch:
            rejects.append(self._conflict_row(item, stored))
        result.conflict += len(conflicts_in_batch)

        by_key: dict[tuple[str, str], list[tuple[datetime, Reading]]] = {}
        if good:
            months: set[date] = set()
            for key, series in good.items():
                ordered = list(series.items())
                instants = list(series)
                if not all(map(lt, instants, instants[1:])):  # usually sent in order already
                    ordered.sort()  # instants are unique: no tie reaches the reading
                by_key[key] = ordered
                earliest, latest = ordered[0][0], ordered[-1][0]
                if (earliest.year, earliest.month) == (latest.year, latest.month):  # the common case
                    months.add(date(earliest.year, earliest.month, 1))
                else:
                    months.update(date(t.year, t.month, 1) for t in instants)
            self._ensure_partitions(months)
            self._ensure_codes(good)
        if by_key and self._tail_on and self._token is None:
            self._take_token()
        work: _Changes | None = None
        try:
            with self.conn.transaction():
                if by_key:
                    work = self._store(by_key, meters, result, rejects, window)
                    result.accepted += work.inserted
                if rejects:
                    self._write_rejects(rejects)
        except BaseException:
            for key in by_key:  # what they hold is not known to be what is stored: read it again
                sid = self._codes.series.get(key)
                if sid is not None:
                    self._tails.pop(sid, None)
            raise
        if work is not None and self._tail_on:
            self._keep_tails(work)
        result.rejected += len(rejects) - result.conflict
        result.refused = [RefusedInput(row.source, row.code, row.reason, row.raw) for row in rejects]
        for row in rejects:
            if row.kind == "invalid":
                result.rejects_by_code[row.code] = result.rejects_by_code.get(row.code, 0) + 1
        return result

    # --- the tail: owned series' newest readings in memory (migration 026) ---

    def _take_token(self) -> None:
        """Become an owner: a token and its session lock, held while the connection lives.

        A connection has one token: a later ingestor on it takes the token over (and
        the series it owns), and the earlier one, if still in use, goes on without a
        tail, telling the token's owner of its writes like any other writer.
        """
        conn = self.conn
        held = _TOKENS.get(conn)
        if held is not None:
            token, ref = held
            before = ref()
            if before is not None and before is not self:
                before._tail_on = False
                before._tails.clear()
                before._owned.clear()
            row = conn.execute("SELECT gen FROM tail_owner WHERE token = %s", (token,)).fetchone()
            self._token, self._gen = token, None if row is None else row[0]
            _TOKENS[conn] = (token, weakref.ref(self))
            return
        with conn.transaction():
            row = conn.execute("SELECT nextval('tail_owner_token')::int").fetchone()
            assert row is not None
            token = row[0]
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (_OWNER_LOCK, token))
            # owners whose process ended leave their row: nobody reads it again
            conn.execute(f"DELETE FROM tail_owner WHERE token::oid NOT IN ({_LIVE_OWNERS})")
            conn.execute("INSERT INTO tail_owner (token) VALUES (%s)", (token,))
        self._token, self._gen = token, 0
        _TOKENS[conn] = (token, weakref.ref(self))

    def _claim(self, sids: list[int]) -> set[int]:
        """Under the meters' locks: claim the series nobody live owns, tell the owners of the rest.

        Returns the series claimed (ours once the batch commits). Without a tail
        (tail=False, or in a caller's transaction) nothing is claimed and every
        owner of these series is told: we write them behind its back.
        """
        if not self._tail_on:
            self.conn.execute("SELECT amr_tail_stale(%s::int[])", (array_literal(sids),))
            return set()
        rows = self.conn.execute(
            f"""WITH claimed AS (
                 UPDATE reading_series SET owner = %(me)s WHERE id = ANY(%(ids)s::int[])
                   AND (owner IS NULL OR owner = %(me)s OR owner::oid NOT IN ({_LIVE_OWNERS}))
                 RETURNING id),
               told AS (
                 UPDATE tail_owner SET gen = gen + 1 WHERE token <> %(me)s AND token IN (
                   SELECT owner FROM reading_series WHERE id = ANY(%(ids)s::int[])
                     AND id NOT IN (SELECT id FROM claimed)))
               SELECT id FROM claimed""",
            {"me": self._token, "ids": array_literal(sids)},
        ).fetchall()
        return {r[0] for r in rows}

    def _keep_tails(self, work: _Changes) -> None:
        """After the batch committed: keep the new tails of the series we own, forget the others."""
        self._owned |= work.claimed
        tails, owned = self._tails, self._owned
        room = TAIL_SERIES - len(tails)
        for sid, tail in work.tails.items():
            if tail is None or sid not in owned:
                tails.pop(sid, None)
            elif sid in tails:
                tails[sid] = tail
            elif room > 0:
                tails[sid] = tail
                room -= 1

    def _ensure_partitions(self, months: set[date]) -> None:
        """Partitions for the months that hold accepted readings, a bounded number per transaction.

        Only those months: a batch with readings years apart makes two months'
        partitions, not every month between. At most _PARTITIONS_PER_TRANSACTION
        are made in one transaction, so a batch spanning the whole plausible
        window never runs the server out of lock slots.
        """
        missing = self._partitions.missing(self.conn, months)
        for i in range(0, len(missing), _PARTITIONS_PER_TRANSACTION):
            with self.conn.transaction():
                self._partitions.ensure_months(self.conn, missing[i:i + _PARTITIONS_PER_TRANSACTION])

    def _ensure_codes(self, good: dict[tuple[str, str], dict[datetime, Reading]]) -> None:
        """The dictionary keys (series, sources, quality bits) the batch's rows need, made first in a
        transaction of their own, so the store transaction only reads them (collector.ingest.layout)."""
        codes = self._codes
        if not self._codes_loaded:
            codes.load_flags(self.conn)
            self._codes_loaded = True
        sources = {r.source for series in good.values() for r in series.values()}
        flagsets = {r.quality for series in good.values() for r in series.values() if r.quality}
        flags = {f for fs in flagsets for f in fs}
        codes.ensure(self.conn, good.keys(), codes.missing_sources(sources),
                     flags if not codes.knows(flags) else set())

    def _conflict_row(self, item: Reading, stored: Decimal) -> _Refused:
        reason = (
            f"meter {item.meter_id!r} register {item.register!r}: a value {stored} is already stored "
            f"for ts {item.ts.astimezone(UTC).isoformat()}; the different value {item.value} "
            "was kept here, not written over it"
        )
        return _reject_row("conflict", item.source, "conflict", reason, _raw_of(item),
                           item.meter_id, item.register, item.ts, item.value)

    # --- storage ---

    def _store(
        self,
        by_key: dict[tuple[str, str], list[tuple[datetime, Reading]]],
        meters: dict[str, MeterRules],
        result: IngestResult,
        rejects: list[_Refused],
        window: vee.TimeWindow,
    ) -> _Changes:
        """Store what is new, each reading with the interval it closes, in one COPY.

        Takes each register's readings in time order. Duplicates and conflicts
        are told apart from the stored rows loaded for derivation, under
        per-meter locks, so no staging round trip is needed.
        """
        conn = self.conn
        keys = list(by_key)
        # the window query's cost estimate passes jit_above_cost on a large fleet, and
        # compiling it takes longer than running it, every batch
        conn.execute("SET LOCAL jit = off")
        # one writer per meter at a time: concurrent collectors see each other's readings;
        # and no retention run drops partitions while this batch is stored (it takes the
        # retention lock exclusively; this shares it, so writers never wait for each other)
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(m, 7217)) FROM"
            " (SELECT pg_advisory_xact_lock_shared(%s)) r,"
            " (SELECT DISTINCT unnest(%s::text[]) AS m ORDER BY 1) x",
            (_RETENTION_LOCK, array_literal(sorted({k[0] for k in keys})),),
        )
        los = [by_key[k][0][0] for k in keys]
        counts = [len(by_key[k]) for k in keys]
        series = self._codes.series
        sids = [series[k] for k in keys]
        work = _Changes()
        foreign = [s for s in sids if s not in self._owned]
        if foreign:
            work.claimed = self._claim(foreign)
        windows, cached = self._load_windows(keys, los, counts, CONTEXT, self._tail_on)
        since = self._earliest_month(windows, los)
        meter_ids = {k[0] for k in keys}
        decisions, mark, closed, gen = self._context(meter_ids, since)
        if mark != window.watermark:
            self._watermark_read = (self.clock(), mark)
            raise _WatermarkMoved
        if self._tail_on and gen != self._gen:
            # another process, a person or retention wrote a series we own: what we keep
            # may be behind; read this batch's windows from the database, and the rest later
            self._tails.clear()
            self.tail_drops += 1
            self._gen = gen
            if cached:
                windows, _ = self._load_windows(keys, los, counts, CONTEXT, False)
                since = self._earliest_month(windows, los)
                decisions, mark, closed, self._gen = self._context(meter_ids, since)
        else:
            self.tail_hits += cached
        todo = list(range(len(keys)))
        context: int | None = CONTEXT
        with conn.cursor() as cur:
            # bytes by oid default to the DB-API Binary dumper, written in Python
            cur.adapters.register_dumper(bytes, BytesBinaryDumper)
            while True:
                short: list[int] = []
                # planning and deriving run while the server stores the rows already sent
                with cur.copy(f"COPY reading_data ({_READING_COLUMNS}) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(_READING_TYPES)
                    for n, i in enumerate(todo):
                        key = keys[i]
                        plan = self._plan(by_key[key], windows.get(n, ()), context)
                        if plan is None:
                            short.append(i)
                            continue
                        if plan.duplicates:
                            result.duplicate += plan.duplicates
                        for r, stored in plan.conflicts:
                            rejects.append(self._conflict_row(r, stored))
                        result.conflict += len(plan.conflicts)
                        if plan.span is not None:
                            tail = self._emit(key, plan.points, plan.span, meters[key[0]], decisions,
                                              closed.get(key[0]) if key[1] == BILLED_REGISTER else None, cp,
                                              work, self._tail_on and plan.to_the_end)
                            work.tails[sids[i]] = tail
                if not short:
                    break
                # a run of glitches beside the new readings, or more stored readings among
                # them than the window held: load more around those registers
                context = context * 4 if context is not None and context < 1000 else None
                todo = short
                windows, _ = self._load_windows([keys[i] for i in todo], [los[i] for i in todo],
                                                [counts[i] for i in todo], context)
                wider = self._earliest_month(windows, [los[i] for i in todo])
                if wider < since:  # the wider window reaches months not asked about yet
                    for mid, periods in self._context({keys[i][0] for i in todo}, wider)[2].items():
                        closed.setdefault(mid, set()).update(periods)
                    since = wider
            self._apply(cur, work)
        return work

    def _write_rejects(self, rows: list[_Refused]) -> None:
        """Record refused inputs, each distinct one once: a repeat adds to its count.

        The same refused input from the same source (a file ingested again, a
        device repeating a bad message) is one row with `times` counting how
        often it came and `last_received_at` when it came last. The reason is
        left out of the identity, since it may name the time of the check.
        """
        merged: dict[bytes, list[Any]] = {}
        for row in rows:
            fp = _fingerprint(row)
            seen = merged.get(fp)
            if seen is None:
                merged[fp] = [*row, fp, 1]
            else:
                seen[-1] += 1
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rejected_reading (kind, source, code, meter_id, register, ts, value, reason,"
                " raw, fingerprint, times) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (fingerprint) DO UPDATE SET times = rejected_reading.times + EXCLUDED.times,"
                " last_received_at = now()",
                list(merged.values()),
            )

    def _load_windows(
        self, keys: list[tuple[str, str]], los: list[datetime], counts: list[int], context: int | None,
        tail: bool = False,
    ) -> tuple[dict[int, list[_Stored]], int]:
        """Stored readings around and among each register's new ones, with what was derived.

        `context` readings before lo, and from lo on as many as the batch has
        for the register plus `context`; all of them when context is None.
        Appends, the common case, take one index probe: the register's last
        `context` readings, all before lo, are the window; with `tail`, a series
        whose tail we keep takes none (the tail is those readings). Only a register
        with a stored reading from lo on takes the two-sided probe. Returns the
        windows and how many came from tails.
        """
        if context is None:
            return self._around(keys, los, counts, None), 0
        series = self._codes.series
        windows: dict[int, list[_Stored]] = {}
        probe: Sequence[int] = range(len(keys))
        if tail and self._tails:
            tails = self._tails
            missed = []
            for i, k in enumerate(keys):
                kept = tails.get(series[k])
                if kept is not None and kept[-1].ts < los[i]:
                    windows[i] = kept
                else:
                    missed.append(i)
            probe = missed
        cached = len(keys) - len(probe)
        if not probe:
            return windows, cached
        rows = self.conn.execute(
            f"""SELECT k.i, x.* FROM unnest(%s::int[]) WITH ORDINALITY AS k(s, i)
               CROSS JOIN LATERAL (SELECT {_STORED} FROM reading_data WHERE series = k.s
                 ORDER BY ts DESC LIMIT %s) x""",
            (array_literal([series[keys[i]] for i in probe]), context),
        ).fetchall()
        loaded = _by_register(rows)
        if cached:
            for j, i in enumerate(probe):
                if j in loaded:
                    windows[i] = loaded[j]
        else:
            windows = loaded
        late = [i for i in probe if (w := windows.get(i)) and w[0].ts >= los[i]]  # newest first
        if late:
            around = self._around([keys[i] for i in late], [los[i] for i in late], [counts[i] for i in late],
                                  context)
            for j, i in enumerate(late):
                windows[i] = around.get(j, [])
        return windows, cached

    def _around(
        self, keys: list[tuple[str, str]], los: list[datetime], counts: list[int], context: int | None
    ) -> dict[int, list[_Stored]]:
        """The two-sided window of _load_windows: two index probes per register."""
        series = self._codes.series
        rows = self.conn.execute(
            f"""SELECT k.i, x.* FROM
                 unnest(%s::int[], %s::timestamptz[], %s::int[]) WITH ORDINALITY AS k(s, lo, n, i)
               CROSS JOIN LATERAL (
                 (SELECT {_STORED} FROM reading_data WHERE series = k.s
                    AND ts < k.lo ORDER BY ts DESC LIMIT %s)
                 UNION ALL
                 (SELECT {_STORED} FROM reading_data WHERE series = k.s
                    AND ts >= k.lo ORDER BY ts LIMIT k.n + %s)
               ) x""",
            (array_literal([series[k] for k in keys]), array_literal(los), array_literal(counts),
             context, context),
        ).fetchall()
        return _by_register(rows)

    def _plan(
        self, items: list[tuple[datetime, Reading]], stored: Sequence[_Stored], context: int | None
    ) -> _Plan | None:
        """Tell repeats from new readings and find the span to re-derive around the new ones.

        None when the loaded context is too short to decide (a run of glitches
        beside the new readings, or more stored readings among the new ones
        than the window held).
        """
        dups = 0
        clashes: list[tuple[Reading, Decimal]] = []
        lo = items[0][0]
        dropped_old = False
        if stored and min(row.ts for row in stored) < self.calendar.starts_at:
            # a reading stored before the calendar's start (by a version without the
            # plausibility window) is no neighbour: an interval from it has no zones
            stored = [row for row in stored if row.ts >= self.calendar.starts_at]
            dropped_old = True
        pts: list[_Point]
        if not stored:
            new = items
            pts = [(ts, r.value, None, r) for ts, r in items]
            true_start = true_end = True
        else:
            before = [row for row in stored if row.ts < lo]
            # a side that returned fewer rows than asked for reaches the end of the series
            true_start = context is None or len(before) < context or dropped_old
            if len(before) == len(stored):  # appends, the common case: nothing stored from lo on
                new = items
                before.sort()  # stored instants are unique
                pts = [(row.ts, row.value, row, None) for row in before]
                pts += [(ts, r.value, None, r) for ts, r in items]
                true_end = True
            else:
                true_end = context is None or len(stored) - len(before) < len(items) + context
                at = {row.ts: row for row in stored}
                if not true_end and max(at) < items[-1][0]:
                    return None  # the window ends inside the batch: repeats beyond it unknown
                new = []
                for ts, r in items:
                    old = at.get(ts)
                    if old is None:
                        new.append((ts, r))
                    elif old.value == r.value:
                        dups += 1
                    else:
                        clashes.append((r, old.value))
                if not new:
                    return _Plan([], None, dups, clashes, False)
                pts = [(row.ts, row.value, row, None) for row in stored]
                pts += [(ts, r.value, None, r) for ts, r in new]
                pts.sort()  # new readings exclude stored instants: no ties
        span = _span(pts, new[0][0], new[-1][0], true_start, true_end)
        if span is None:
            return None
        return _Plan(pts, span, dups, clashes, true_end)

    def _emit(
        self,
        key: tuple[str, str],
        pts: list[_Point],
        span: _Span,
        meter: MeterRules,
        decisions: dict[_DecisionKey, str],
        closed: set[date] | None,
        cp: psycopg.Copy,
        work: _Changes,
        keep: bool = False,
    ) -> list[_Stored] | None:
        """Derive the span's intervals; COPY new readings, queue changes to stored ones.

        With `keep` (the points reach the series' newest reading), returns the
        series' tail as it is stored once this batch commits: its last CONTEXT
        points with what was derived for them; otherwise None.

        `closed`: the billed months of the meter's account (register 1.8.0 only);
        an interval added, changed or taken away in one of them is recorded in
        work.held, for billing to hold that month's bill until a person decides.
        Suspect energy is not: it already waits for its own decision (amr suspect).

        The common case, a new reading closing an interval of one part with
        nothing to flag, is handled here in full, since it is most of what is
        ingested; every other reading goes on to _restate (a stored one) and
        _count_in (an interval written).
        """
        mid, reg = key
        sid = self._codes.series[key]
        source_of = self._codes.source
        bits_of = layout.interval_bits
        glitch = span.glitch
        billed = reg == BILLED_REGISTER
        daily: dict[_DailyKey, Decimal] = {}
        write = cp.write_row
        cut = self.calendar.cut
        prev_ts: datetime | None = None
        prev_v = _ZERO
        inserted = 0
        # the points that end up in the tail, and the new state of those that change
        tail_from = len(pts) - CONTEXT if keep else len(pts)
        now: dict[int, _Stored] = {}
        for j in range(span.start, span.stop):
            ts, value, old, r = pts[j]
            interval: _Interval | None
            derived: str | None  # the flag derivation gives the reading: glitch, rollover, reset
            if glitch[j]:
                interval, derived = None, quality.GLITCH
            elif prev_ts is None:  # the span's first reading: its own interval lies outside
                prev_ts, prev_v = ts, value
                if old is not None:
                    continue
                interval, derived = None, None  # the first reading of the series
            elif old is not None and (was := old.interval) is not None and was.start == prev_ts:
                # a stored reading that closes its interval from the same reading as before:
                # everything it holds was derived from the same values (the common case for
                # the stored readings just before an append)
                prev_ts, prev_v = ts, value
                continue
            else:
                start = prev_ts
                kwh, kind, estimated, suspect = between(start, prev_v, ts, value, meter)
                prev_ts, prev_v = ts, value
                status = "suspect" if suspect else "ok"
                if decisions:
                    status = decisions.get((mid, reg, start, ts), status)
                pieces = cut(start, ts)
                if len(pieces) == 1:
                    day, zone = pieces[0][2], pieces[0][3]
                    if r is not None and not r.quality and kind not in _FLAGGED_KINDS:
                        # the common case: a new reading, one zone, nothing to flag
                        write((sid, bits_of(kind, status, estimated, day, zone, ts), ts, *source_of(r.source),
                               value, _kwh_field(str(kwh)), _span_field(start, ts)))
                        inserted += 1
                        if j >= tail_from:
                            now[j] = _Stored(ts, value, 0, _Interval(start, kwh, kind, status, estimated, day, zone))
                        if billed:
                            dkey = (day, zone, estimated, status)
                            daily[dkey] = daily.get(dkey, _ZERO) + kwh
                        if closed and status != "suspect" and (month := day.replace(day=1)) in closed:
                            work.held[_Held(mid, reg, start, ts, month)] = kwh
                        continue
                    interval = _Interval(start, kwh, kind, status, estimated, day, zone)
                else:  # its parts are counted by _count_in
                    interval = _Interval(start, kwh, kind, status, True, None, None)
                derived = kind if kind in _FLAGGED_KINDS else None
            if r is not None:
                flags = self._new_flags(r.quality, derived, interval, ts)
                write((sid, flags, ts, *source_of(r.source), value, *_interval_fields(interval, ts)))
                inserted += 1
                if j >= tail_from:
                    now[j] = _Stored(ts, value, flags & layout.QUALITY_MASK, interval)
            else:
                assert old is not None  # a point is a stored reading or a new one
                if not self._restate(work, key, ts, old, interval, derived, closed):
                    continue  # the common case for the stored readings before new ones
                if j >= tail_from:
                    bits = self._codes.mask(frozenset(work.updates[-1].quality)) & layout.QUALITY_MASK
                    now[j] = _Stored(ts, old.value, bits, interval)
            if interval is not None:
                self._count_in(work, daily, key, ts, interval, closed)
        work.inserted += inserted
        count = work.daily.count
        for (day, zone, est, status), kwh in daily.items():
            count(mid, day, zone, kwh, est, status)
        if not keep:
            return None
        # a point that did not change is as stored: loaded (old) or, outside the span, untouched
        tail: list[_Stored] = []
        for j in range(max(tail_from, 0), len(pts)):
            row = now.get(j) or pts[j][2]
            if row is None:  # a new reading not derived here: not known as stored
                return None
            tail.append(row)
        return tail

    def _new_flags(self, flags: frozenset[str], derived: str | None, interval: _Interval | None,
                   ts: datetime) -> int:
        """A new reading's flags word: the flags it came with, the derived one in place, its interval."""
        codes = self._codes
        if derived or flags & _DERIVED_FLAGS:
            flags = frozenset(_with_derived(flags, derived))
        return codes.mask(flags) | _interval_code(interval, ts)

    def _restate(
        self,
        work: _Changes,
        key: tuple[str, str],
        ts: datetime,
        old: _Stored,
        interval: _Interval | None,
        derived: str | None,
        closed: set[date] | None,
    ) -> bool:
        """Queue a stored reading's re-derived columns and take its old interval out.

        False when nothing changes: neither the interval it closes nor its
        derived flag. Otherwise the old interval's energy leaves the daily
        totals (or its parts interval_segment), and if the interval is gone
        from a closed month it is recorded in work.held.
        """
        old_flags = self._codes.names(old.quality)
        flags: Sequence[str] = old_flags
        if old_flags or derived:
            want = _with_derived(old_flags, derived)
            if want != set(old_flags):
                flags = sorted(want)
        if interval == old.interval and flags is old_flags:
            return False
        mid, reg = key
        work.updates.append(_Update(mid, reg, ts, flags, interval))
        was = old.interval
        if was is not None:  # it closed an interval: take that out
            day, zone = was.day, was.zone
            if day is None or zone is None:  # its parts are in interval_segment
                work.removed_split.append(_OldParts(mid, reg, ts, was.status))
            elif reg == BILLED_REGISTER:
                work.daily.count(mid, day, zone, was.kwh, was.estimated, was.status, -1)
            if closed and (interval is None or was.start != interval.start):
                # that interval is gone from a closed month
                months = self._months(was.start, ts) if day is None or zone is None else {day.replace(day=1)}
                for month in months & closed:
                    work.held.setdefault(_Held(mid, reg, was.start, ts, month), None)
        return True

    def _count_in(
        self,
        work: _Changes,
        daily: dict[_DailyKey, Decimal],
        key: tuple[str, str],
        ts: datetime,
        interval: _Interval,
        closed: set[date] | None,
    ) -> None:
        """Count an interval just written in: one part in `daily`, or its parts cut by the calendar.

        Its energy in a closed month is recorded in work.held; suspect energy
        is not, it waits for its own decision.
        """
        mid, reg = key
        billed = reg == BILLED_REGISTER
        day, zone = interval.day, interval.zone
        if day is not None and zone is not None:
            if closed and interval.status != "suspect" and (month := day.replace(day=1)) in closed:
                work.held[_Held(mid, reg, interval.start, ts, month)] = interval.kwh
            if billed:
                dkey = (day, zone, interval.estimated, interval.status)
                daily[dkey] = daily.get(dkey, _ZERO) + interval.kwh
            return
        parts = self.calendar.split(interval.start, ts, interval.kwh)
        if closed and interval.status != "suspect":
            for month in {sg.day.replace(day=1) for sg in parts} & closed:
                work.held[_Held(mid, reg, interval.start, ts, month)] = interval.kwh
        for sg in parts:
            work.segments.append((mid, reg, ts, sg.start, sg.end, sg.day, sg.zone, sg.kwh))
            if billed:
                dkey = (sg.day, sg.zone, True, interval.status)
                daily[dkey] = daily.get(dkey, _ZERO) + sg.kwh

    def _apply(self, cur: psycopg.Cursor[Any], work: _Changes) -> None:
        """Re-derived stored readings, interval parts and daily totals, after the COPY.

        Each list of records goes as one array per column, in the records' field order.
        """
        if work.updates:
            codes = self._codes
            updates = [(codes.series[(u.meter_id, u.register)], u.ts,
                        codes.mask(frozenset(u.quality)) | _interval_code(u.interval, u.ts),
                        None if u.interval is None else u.interval.kwh,
                        None if u.interval is None else layout.span_of(u.interval.start, u.ts))
                       for u in work.updates]
            cur.execute(
                """UPDATE reading_data r SET flags = k.f, kwh = k.kwh, span = k.span
                   FROM (SELECT * FROM unnest(%s::int[], %s::timestamptz[], %s::int[], %s::numeric[],
                     %s::numeric[])) AS k(s, ts, f, kwh, span)
                   WHERE r.series = k.s AND r.ts = k.ts""",
                tuple(array_literal(col) for col in zip(*updates, strict=True)),
            )
        if work.removed_split:
            cur.execute(
                """DELETE FROM interval_segment s
                   USING unnest(%s::text[], %s::text[], %s::timestamptz[], %s::text[])
                     AS k(m, r, ts, st)
                   WHERE s.meter_id = k.m AND s.register = k.r AND s.end_ts = k.ts
                   RETURNING s.meter_id, s.register, s.day, s.zone, s.kwh, k.st""",
                tuple(array_literal(col) for col in zip(*work.removed_split, strict=True)),
            )
            for m, r, d, z, k, st in cur.fetchall():
                if r == BILLED_REGISTER:  # a part of a cut interval is estimated
                    work.daily.count(m, d, z, k, True, st, -1)
        if work.segments:
            with cur.copy(
                "COPY interval_segment (meter_id, register, end_ts, seg_start, seg_end, day, zone, kwh)"
                " FROM STDIN (FORMAT BINARY)"
            ) as cp:
                cp.set_types(_SEGMENT_TYPES)
                for row in work.segments:
                    cp.write_row(row)
        work.daily.write(self.conn)
        if work.held:
            held = [(*k, kwh) for k, kwh in work.held.items()]
            cur.execute(
                """INSERT INTO billed_change (meter_id, register, start_ts, end_ts, period, kwh)
                   SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[],
                                        %s::date[], %s::numeric[])
                   ON CONFLICT (meter_id, register, start_ts, end_ts, period) WHERE decision IS NULL
                   DO UPDATE SET kwh = EXCLUDED.kwh, noticed_at = now()""",
                tuple(array_literal(col) for col in zip(*held, strict=True)),
            )

    def _earliest_month(self, windows: dict[int, list[_Stored]], los: list[datetime]) -> date:
        """The first local month any interval derived from these windows can touch."""
        first = min(los)
        for rows in windows.values():
            for row in rows:
                if row.ts < first:
                    first = row.ts
        return first.astimezone(self.calendar.tz).date().replace(day=1)

    def _context(self, meter_ids: set[str], since: date
                 ) -> tuple[dict[_DecisionKey, str], datetime | None, dict[str, set[date]], int | None]:
        """What a batch's derivation needs besides the readings, in one round trip, under the locks.

        The people's decisions on the meters' intervals; the retention watermark
        as it is now (validation used a copy up to a minute old); the months
        from `since` on that are billed for each meter's account, which are closed
        (a change to them is recorded in billed_change for a person to decide);
        and our owner token's gen (None without a token, or when its row is gone).
        """
        rows = self.conn.execute(
            "SELECT meter_id, register, start_ts, end_ts, decision FROM interval_decision"
            " WHERE meter_id = ANY(%(m)s)"
            " UNION ALL SELECT NULL, NULL, watermark, NULL, 'watermark' FROM retention_watermark"
            " WHERE name = 'readings'"
            " UNION ALL SELECT DISTINCT m.id, NULL::text, b.period::timestamp AT TIME ZONE 'UTC',"
            " NULL::timestamptz, 'closed'"
            " FROM meter m JOIN bill b ON b.account = m.account"
            " WHERE m.id = ANY(%(m)s) AND b.period >= %(since)s"
            " UNION ALL SELECT NULL, gen::text, NULL, NULL, 'gen' FROM tail_owner WHERE token = %(t)s",
            {"m": array_literal(meter_ids), "since": since, "t": self._token},
        ).fetchall()
        mark = None
        gen = None
        decisions: dict[_DecisionKey, str] = {}
        closed: dict[str, set[date]] = {}
        for m, r, s, e, d in rows:
            if d == "closed":
                closed.setdefault(m, set()).add(s.astimezone(UTC).date())
            elif d == "gen" and m is None:
                gen = int(r)
            elif m is None:
                mark = s
            else:
                decisions[(m, r, s, e)] = d
        return decisions, mark, closed, gen

    def _months(self, start: datetime, end: datetime) -> set[date]:
        """The local months [start, end) touches (first days)."""
        tz = self.calendar.tz
        month = start.astimezone(tz).date().replace(day=1)
        last = (end - timedelta(microseconds=1)).astimezone(tz).date().replace(day=1)
        out = {month}
        while month < last:
            month = next_month(month)
            out.add(month)
        return out


def _by_meters(items: list[Reading | Rejected], most: int) -> list[list[Reading | Rejected]]:
    """The items in parts naming at most `most` meters each, every meter's items in one part,
    in their order; inputs refused upstream without a meter go with the first part."""
    if len(items) <= most:
        return [items]
    part_of: dict[str | None, int] = {}
    parts: list[list[Reading | Rejected]] = [[]]
    for item in items:
        mid = item.meter_id if isinstance(item, Reading) else None
        k = part_of.get(mid)
        if k is None:
            k = 0 if mid is None else len(part_of) // most
            part_of[mid] = k
            if k == len(parts):
                parts.append([])
        parts[k].append(item)
    return parts


def _by_register(rows: list[tuple[Any, ...]]) -> dict[int, list[_Stored]]:
    """Window rows (ordinality, then _STORED) by the 0-based index of their register in the query."""
    windows: dict[int, list[_Stored]] = defaultdict(list)
    # a row: ordinality, ts, value, flags, kwh, span; _make, from a sequence, is the quicker
    # constructor (a few thousand rows a batch)
    stored, interval, decode, mask = _Stored._make, _Interval._make, layout.stored_interval, layout.QUALITY_MASK
    for i, ts, value, flags, kwh, span in rows:
        closes = None if kwh is None else interval(decode(ts, flags, kwh, span))  # type: ignore[arg-type]
        windows[i - 1].append(stored((ts, value, flags & mask, closes)))
    return windows


@dataclass
class _Changes:
    """What one batch's derivation does besides the rows it COPYs."""

    inserted: int = 0
    # per series written, its tail after the batch (None: not known, forget it); the series claimed
    tails: dict[int, list[_Stored] | None] = field(default_factory=dict)
    claimed: set[int] = field(default_factory=set)
    updates: list[_Update] = field(default_factory=list)  # stored readings whose derived columns change
    daily: DailyChanges = field(default_factory=lambda: DailyChanges())
    removed_split: list[_OldParts] = field(default_factory=list)
    segments: list[_SegmentRow] = field(default_factory=list)  # parts of new intervals
    # the intervals of billed months: kWh, or None for one taken away
    held: dict[_Held, Decimal | None] = field(default_factory=dict)


def _with_derived(flags: Iterable[str], derived: str | None) -> set[str]:
    """A reading's flags with the derived ones (glitch, rollover, reset) as derived now."""
    out = set(flags) - _DERIVED_FLAGS
    if derived:
        out.add(derived)
    return out


def _interval_fields(interval: _Interval | None, ts: datetime) -> tuple[Any, ...]:
    """The kwh and span fields of the reading that closes `interval` (see layout.TYPES)."""
    if interval is None:
        return (None, None)
    return (_kwh_field(str(interval.kwh)), _span_field(interval.start, ts))


def _interval_code(interval: _Interval | None, ts: datetime) -> int:
    """The interval part of a reading's flags word (0: it closes none)."""
    if interval is None:
        return 0
    return layout.interval_bits(interval.kind, interval.status, interval.estimated, interval.day,
                                interval.zone, ts)


_kwh_field = layout.numeric_field


def _span_field(start: datetime, ts: datetime) -> bytes:
    return layout.span_field(layout.span_of(start, ts))


def _span(
    pts: list[_Point], lo: datetime, hi: datetime, true_start: bool, true_end: bool
) -> _Span | None:
    """Which part of a loaded window can be re-derived exactly.

    A reading's class depends on the readings from one before it to two after
    it (see collector.rules.intervals.glitches), so only readings with those loaded,
    at least three places before or two after a new reading, keep a class that
    cannot have changed. The re-derived span runs from the last
    such valid reading before the new ones to the first after them (or to the
    true ends of the series). None when the window holds no such reading on a
    side that is not a true end: the caller loads more.
    """
    n = len(pts)
    times = [p[0] for p in pts]
    first_new = bisect.bisect_left(times, lo)
    last_new = bisect.bisect_right(times, hi) - 1
    bad = glitches([p[1] for p in pts])
    start_i = 0
    for j in range(first_new - 3, -1 if true_start else 0, -1):
        if not bad[j]:
            start_i = j
            break
    else:
        if not true_start:
            return None
    stop = n
    for j in range(last_new + 2, n if true_end else n - 2):
        if not bad[j]:
            stop = j + 1
            break
    else:
        if not true_end:
            return None
    return _Span(start_i, stop, bad)


class DailyChanges:
    """Net changes to daily_zone_usage from one transaction's interval changes.

    The one place that decides what a daily total counts: ok and accepted
    energy in kwh, the estimated part of it in estimated_kwh, suspect energy
    apart in suspect_kwh; rejected energy nowhere. Only register 1.8.0 counts.
    """

    def __init__(self) -> None:
        self._delta: dict[tuple[str, date, str], list[Decimal]] = {}

    def count(self, mid: str, day: date, zone: str, kwh: Decimal, estimated: bool, status: str,
              sign: int = 1) -> None:
        """Count one interval part in (sign 1) or out (sign -1) of its day and zone."""
        d = self._delta.get((mid, day, zone))
        if d is None:
            d = self._delta[(mid, day, zone)] = [_ZERO, _ZERO, _ZERO]
        if sign < 0:
            kwh = -kwh
        if status in _COUNTED:
            d[0] += kwh
            if estimated:
                d[1] += kwh
        elif status == "suspect":
            d[2] += kwh

    def write(self, conn: psycopg.Connection) -> None:
        # zero changes are written too: a day with no energy still has its rows
        items = list(self._delta.items())
        if not items:
            return
        conn.execute(
            """INSERT INTO daily_zone_usage (meter_id, day, zone, kwh, estimated_kwh, suspect_kwh)
               SELECT * FROM unnest(%s::text[], %s::date[], %s::text[], %s::numeric[], %s::numeric[],
                                    %s::numeric[])
               ON CONFLICT (meter_id, day, zone) DO UPDATE SET
                 kwh = daily_zone_usage.kwh + EXCLUDED.kwh,
                 estimated_kwh = daily_zone_usage.estimated_kwh + EXCLUDED.estimated_kwh,
                 suspect_kwh = daily_zone_usage.suspect_kwh + EXCLUDED.suspect_kwh""",
            (
                array_literal([k[0] for k, _ in items]), array_literal([k[1] for k, _ in items]),
                array_literal([k[2] for k, _ in items]), array_literal([v[0] for _, v in items]),
                array_literal([v[1] for _, v in items]), array_literal([v[2] for _, v in items]),
            ),
        )
        self._delta.clear()


def apply_daily_changes(
    conn: psycopg.Connection,
    removed: Iterable[tuple[str, date, str, Decimal, bool, str]],
    added: Iterable[tuple[str, date, str, Decimal, bool, str]],
) -> None:
    """Apply interval parts taken out and put in, as (meter_id, day, zone, kwh, estimated, status)."""
    daily = DailyChanges()
    for row in removed:
        daily.count(*row, sign=-1)
    for row in added:
        daily.count(*row)
    daily.write(conn)


def decide_interval(
    conn: psycopg.Connection, meter_id: str, register: str, start_ts: datetime, end_ts: datetime,
    decision: str, by: str, note: str | None = None,
) -> int:
    """Record a person's accept or reject of a suspect interval and apply it.

    Returns the number of segments whose status changed. The decision is kept
    in interval_decision, so a later re-derivation of the same interval keeps it.
    """
    if decision not in ("accepted", "rejected"):
        raise ValueError(f"decision must be 'accepted' or 'rejected', got {decision!r}")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7217))", (meter_id,))
        conn.execute(
            """INSERT INTO interval_decision (meter_id, register, start_ts, end_ts, decision, decided_by, note)
               VALUES (%s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (meter_id, register, start_ts, end_ts) DO UPDATE SET
                 decision = EXCLUDED.decision, decided_by = EXCLUDED.decided_by,
                 decided_at = now(), note = EXCLUDED.note""",
            (meter_id, register, start_ts, end_ts, decision, by, note),
        )
        rows = conn.execute(
            "SELECT meter_id, day, zone, kwh, estimated, status FROM interval_usage"
            " WHERE meter_id = %s AND register = %s AND start_ts = %s AND end_ts = %s"
            " AND status <> %s",
            (meter_id, register, start_ts, end_ts, decision),
        ).fetchall()
        # the interval's status lives in the reading that ends it
        conn.execute(
            "UPDATE reading SET status = %s WHERE meter_id = %s AND register = %s"
            " AND ts = %s AND start_ts = %s AND kwh IS NOT NULL",
            (decision, meter_id, register, end_ts, start_ts),
        )
        if register == BILLED_REGISTER:
            apply_daily_changes(conn, removed=rows, added=[(*r[:5], decision) for r in rows])
    return len(rows)
