"""The ingestion entry point every adapter, decoder and import uses.

One call takes a batch of readings (and inputs already refused upstream),
validates each with collector.vee, stores the accepted ones with COPY,
idempotently, derives interval energy around them, splits it into zones and
keeps daily_zone_usage current, in one transaction. A batch either lands
whole or not at all, so a caller that keeps its batch until `ingest` returns
(the gateway spool, the MQTT consumer) never loses or doubles a reading.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from adapters import quality
from adapters.reading import Reading, Rejected
from collector import metrics, vee
from collector.intervals import Interval, between, glitches
from collector.settings import Settings, get_settings
from collector.storage.timeseries import Partitions
from collector.vee import BILLED_REGISTER, MeterRules
from collector.zones import ZoneCalendar, default_calendar

# readings loaded on each side of new ones, so that every reading whose
# classification could change is re-judged with both of its neighbours
CONTEXT = 6
_COUNTED = ("ok", "accepted")
_DERIVED_FLAGS = frozenset({quality.GLITCH, quality.ROLLOVER, quality.RESET})

_STAGE_TYPES = ["text", "text", "timestamptz", "numeric", "text[]", "text"]
_SEGMENT_TYPES = [
    "text", "text", "timestamptz", "timestamptz", "timestamptz", "timestamptz",
    "date", "text", "numeric", "bool", "text", "text",
]


@dataclass
class IngestResult:
    accepted: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected: int = 0
    rejects_by_code: dict[str, int] = field(default_factory=dict)

    def __iadd__(self, other: IngestResult) -> IngestResult:
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
) -> tuple:
    if not isinstance(ts, datetime) or ts.utcoffset() is None:
        ts = None
    else:
        ts = ts.astimezone(UTC)  # PostgreSQL refuses offsets beyond 15:59 that Python allows
    return (kind, _text(source), code, _text(meter_id), _text(register), ts,
            None if value is None else _text(str(value)), _text(reason), raw)


def _text(value: Any) -> str | None:
    """Text PostgreSQL can store: a NUL byte becomes a visible escape (the raw bytes keep it)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _raw_of(r: Reading) -> bytes:
    ts = r.ts.isoformat() if isinstance(r.ts, datetime) else str(r.ts)
    return f"{r.meter_id},{r.register},{ts},{r.value}".encode("utf-8", "backslashreplace")


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
    ):
        if not conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.autocommit = True
        self.conn = conn
        self.settings = settings or get_settings()
        self.calendar = calendar or default_calendar()
        self.clock = clock or (lambda: datetime.now(UTC))
        self._meters: dict[str, MeterRules] = {}
        self._partitions = Partitions()
        self._stage_ready = False
        self._expect_duplicates = False

    # --- meters ---

    def forget_meters(self) -> None:
        """Drop cached meter rules (after an inventory reload)."""
        self._meters.clear()

    def _meter_rules(self, ids: set[str]) -> dict[str, MeterRules]:
        missing = [i for i in ids if i not in self._meters and vee.plausible_id(i)]
        if missing:
            rows = self.conn.execute(
                "SELECT id, multiplier, rollover, max_power_kw, interval_s, installed, removed"
                " FROM meter WHERE id = ANY(%s)",
                (missing,),
            ).fetchall()
            for mid, mult, roll, pmax, ival, inst, rem in rows:
                self._meters[mid] = MeterRules(mid, mult, roll, pmax, timedelta(seconds=ival), inst, rem)
        return self._meters

    # --- the entry point ---

    def ingest(self, items: Iterable[Reading | Rejected]) -> IngestResult:
        """Validate and store a batch; returns what happened to each input."""
        started = time.perf_counter()
        items = list(items)
        result = IngestResult()
        if not items:
            return result
        now = self.clock()
        tolerance = timedelta(seconds=self.settings.future_tolerance_s)
        rejects: list[tuple] = []
        good: dict[tuple[str, str, datetime], Reading] = {}
        conflicts_in_batch: list[tuple[Reading, Decimal]] = []
        meters = self._meter_rules({r.meter_id for r in items if isinstance(r, Reading)})

        for item in items:
            if isinstance(item, Rejected):
                rejects.append(_reject_row("invalid", item.source, item.code, item.reason, item.raw,
                                           item.meter_id, item.register, item.ts))
                continue
            refusal = vee.check(item, meters.get(item.meter_id), now, tolerance)
            if refusal is not None:
                rejects.append(_reject_row("invalid", item.source, refusal.code, refusal.reason,
                                           _raw_of(item), item.meter_id, item.register, item.ts, item.value))
                continue
            ts = item.ts.astimezone(UTC)
            key = (item.meter_id, item.register, ts)
            first = good.get(key)
            if first is None:
                good[key] = item
            elif first.value == item.value:
                result.duplicate += 1
            else:
                conflicts_in_batch.append((item, first.value))

        for item, stored in conflicts_in_batch:
            rejects.append(self._conflict_row(item, stored))
        result.conflict += len(conflicts_in_batch)

        if good:
            lo = min(k[2] for k in good)
            hi = max(k[2] for k in good)
            with self.conn.transaction():
                self._partitions.ensure(self.conn, lo, hi)
        with self.conn.transaction():
            if good:
                stored = self._store(good, meters, result, rejects)
                result.accepted += stored
            if rejects:
                self._write_rejects(rejects)
        result.rejected += len(rejects) - result.conflict
        for row in rejects:
            if row[0] == "invalid":
                result.rejects_by_code[row[2]] = result.rejects_by_code.get(row[2], 0) + 1
        self._count(result, len(items), time.perf_counter() - started)
        return result

    def _conflict_row(self, item: Reading, stored: Decimal) -> tuple:
        reason = (
            f"meter {item.meter_id!r} register {item.register!r}: a value {stored} is already stored "
            f"for ts {item.ts.astimezone(UTC).isoformat()}; the different value {item.value} "
            "was kept here, not written over it"
        )
        return _reject_row("conflict", item.source, "conflict", reason, _raw_of(item),
                           item.meter_id, item.register, item.ts, item.value)

    def _count(self, result: IngestResult, n: int, seconds: float) -> None:
        metrics.READINGS.labels("accepted").inc(result.accepted)
        metrics.READINGS.labels("duplicate").inc(result.duplicate)
        metrics.READINGS.labels("conflict").inc(result.conflict)
        metrics.READINGS.labels("rejected").inc(result.rejected)
        for code, k in result.rejects_by_code.items():
            metrics.REJECTS.labels(code).inc(k)
        metrics.DB_BATCH_SIZE.observe(n)
        metrics.DB_WRITE_SECONDS.observe(seconds)

    # --- storage ---

    def _ensure_stage(self) -> None:
        if not self._stage_ready:
            self.conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS amr_stage (meter_id text, register text,"
                " ts timestamptz, value numeric, quality text[], source text) ON COMMIT DELETE ROWS"
            )
            self._stage_ready = True

    def _store(
        self,
        good: dict[tuple[str, str, datetime], Reading],
        meters: dict[str, MeterRules],
        result: IngestResult,
        rejects: list[tuple],
    ) -> int:
        conn = self.conn
        # one writer per meter at a time: concurrent collectors see each other's readings
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(m, 7217)) FROM"
            " (SELECT DISTINCT unnest(%s::text[]) AS m ORDER BY 1) x",
            (sorted({k[0] for k in good}),),
        )
        spans = None
        if not self._expect_duplicates:
            spans = self._copy_new(good)
        if spans is None:
            spans = self._insert_staged(good, result, rejects)
        inserted = sum(s[4] for s in spans)
        # a batch with repeats (redelivery, re-import) is likely followed by more
        self._expect_duplicates = inserted < len(good)
        if spans:
            self._derive(spans, meters)
        return inserted

    def _copy_new(self, good: dict[tuple[str, str, datetime], Reading]) -> list[tuple] | None:
        """COPY straight into `reading`; None when a row was already there."""
        try:
            with self.conn.transaction(), self.conn.cursor() as cur, cur.copy(
                "COPY reading (meter_id, register, ts, value, quality, source) FROM STDIN (FORMAT BINARY)"
            ) as cp:
                cp.set_types(_STAGE_TYPES)
                for (mid, reg, ts), r in good.items():
                    cp.write_row((mid, reg, ts, r.value, sorted(r.quality), r.source))
        except psycopg.errors.UniqueViolation:
            return None
        ranges: dict[tuple[str, str], list] = {}
        for mid, reg, ts in good:
            span = ranges.get((mid, reg))
            if span is None:
                ranges[(mid, reg)] = [ts, ts, 1]
            else:
                if ts < span[0]:
                    span[0] = ts
                elif ts > span[1]:
                    span[1] = ts
                span[2] += 1
        return [(mid, reg, lo, hi, n) for (mid, reg), (lo, hi, n) in ranges.items()]

    def _insert_staged(
        self, good: dict[tuple[str, str, datetime], Reading], result: IngestResult, rejects: list[tuple]
    ) -> list[tuple]:
        """Stage, insert what is new, and sort the rest into duplicates and conflicts."""
        self._ensure_stage()
        with self.conn.cursor() as cur:
            with cur.copy(
                "COPY amr_stage (meter_id, register, ts, value, quality, source) FROM STDIN (FORMAT BINARY)"
            ) as cp:
                cp.set_types(_STAGE_TYPES)
                for (mid, reg, ts), r in good.items():
                    cp.write_row((mid, reg, ts, r.value, sorted(r.quality), r.source))
            cur.execute(
                "WITH ins AS (INSERT INTO reading (meter_id, register, ts, value, quality, source)"
                " SELECT meter_id, register, ts, value, quality, source FROM amr_stage"
                " ON CONFLICT (meter_id, register, ts) DO NOTHING RETURNING meter_id, register, ts)"
                " SELECT meter_id, register, min(ts), max(ts), count(*) FROM ins GROUP BY 1, 2"
            )
            spans = cur.fetchall()
            inserted = sum(s[4] for s in spans)
            if inserted < len(good):
                cur.execute(
                    "SELECT s.meter_id, s.register, s.ts, s.value, r.value FROM amr_stage s"
                    " JOIN reading r USING (meter_id, register, ts) WHERE r.value <> s.value"
                )
                clashes = cur.fetchall()
                for mid, reg, ts, _offered, stored in clashes:
                    rejects.append(self._conflict_row(good[(mid, reg, ts)], stored))
                result.conflict += len(clashes)
                result.duplicate += len(good) - inserted - len(clashes)
        return spans

    def _write_rejects(self, rows: list[tuple]) -> None:
        with self.conn.cursor() as cur, cur.copy(
            "COPY rejected_reading (kind, source, code, meter_id, register, ts, value, reason, raw)"
            " FROM STDIN"
        ) as cp:
            for row in rows:
                cp.write_row(row)

    # --- derivation ---

    def _derive(self, spans: Sequence[tuple], meters: dict[str, MeterRules]) -> None:
        """Re-derive the intervals around newly stored readings of each register."""
        conn = self.conn
        keys = [(s[0], s[1]) for s in spans]
        rows = conn.execute(
            """SELECT k.i, x.ts, x.value, x.quality FROM
                 unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
                   WITH ORDINALITY AS k(m, r, lo, hi, i)
               CROSS JOIN LATERAL (
                 (SELECT ts, value, quality FROM reading WHERE meter_id = k.m AND register = k.r
                    AND ts < k.lo ORDER BY ts DESC LIMIT %s)
                 UNION ALL
                 (SELECT ts, value, quality FROM reading WHERE meter_id = k.m AND register = k.r
                    AND ts >= k.lo AND ts <= k.hi)
                 UNION ALL
                 (SELECT ts, value, quality FROM reading WHERE meter_id = k.m AND register = k.r
                    AND ts > k.hi ORDER BY ts LIMIT %s)
               ) x""",
            ([s[0] for s in spans], [s[1] for s in spans], [s[2] for s in spans],
             [s[3] for s in spans], CONTEXT, CONTEXT),
        ).fetchall()
        windows: dict[int, list[tuple[datetime, Decimal, list[str]]]] = defaultdict(list)
        for i, ts, value, flags in rows:
            windows[i - 1].append((ts, value, flags))
        decisions = self._decisions({k[0] for k in keys})

        del_m: list[str] = []
        del_r: list[str] = []
        del_lo: list[datetime] = []
        del_hi: list[datetime | None] = []
        new_rows: list[tuple] = []
        flag_updates: list[tuple[str, str, datetime, list[str]]] = []
        for i, (mid, reg, lo, hi, _n) in enumerate(spans):
            pts = sorted(windows[i], key=lambda p: p[0])
            meter = meters[mid]
            start_i, end_i, intervals, bad = self._window(pts, lo, hi, meter)
            del_m.append(mid)
            del_r.append(reg)
            del_lo.append(pts[start_i][0])
            del_hi.append(None if end_i is None else pts[end_i][0])
            for iv in intervals:
                new_rows.extend(self._segments(mid, reg, iv, decisions))
            # keep the derived flags on readings in step with their classification
            last = len(pts) - 1 if end_i is None else end_i
            kinds = {iv.end: iv.kind for iv in intervals if iv.kind in ("rollover", "reset")}
            for j in range(start_i, last + 1):
                ts, _v, flags = pts[j]
                if not flags and not bad[j] and ts not in kinds:
                    continue  # the common case: nothing to flag, nothing flagged
                want = set(flags) - _DERIVED_FLAGS
                if bad[j]:
                    want.add(quality.GLITCH)
                elif ts in kinds:
                    want.add(kinds[ts])
                if want != set(flags):
                    flag_updates.append((mid, reg, ts, sorted(want)))

        with conn.cursor() as cur:
            cur.execute(
                """DELETE FROM interval_usage u
                   USING unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[]) AS k(m, r, lo, hi)
                   WHERE u.meter_id = k.m AND u.register = k.r AND u.seg_start >= k.lo
                     AND u.start_ts >= k.lo AND (k.hi IS NULL OR u.start_ts < k.hi)
                     -- an interval that starts before the span's end also ends by it, so
                     -- this bounds the index scan without changing what is deleted
                     AND (k.hi IS NULL OR u.seg_start < k.hi)
                   RETURNING u.meter_id, u.register, u.day, u.zone, u.kwh, u.estimated, u.status""",
                (del_m, del_r, del_lo, del_hi),
            )
            removed = cur.fetchall()
            if new_rows:
                with cur.copy(
                    "COPY interval_usage (meter_id, register, start_ts, end_ts, seg_start, seg_end,"
                    " day, zone, kwh, estimated, kind, status) FROM STDIN (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(_SEGMENT_TYPES)
                    for row in new_rows:
                        cp.write_row(row)
            if flag_updates:
                cur.executemany(
                    "UPDATE reading SET quality = %s WHERE meter_id = %s AND register = %s AND ts = %s",
                    [(f, m, r, t) for m, r, t, f in flag_updates],
                )
        apply_daily_changes(
            conn,
            removed=[(m, d, z, k, e, s) for m, r, d, z, k, e, s in removed if r == BILLED_REGISTER],
            added=[(r[0], r[6], r[7], r[8], r[9], r[11]) for r in new_rows if r[1] == BILLED_REGISTER],
        )

    @staticmethod
    def _window(
        pts: list[tuple[datetime, Decimal, list[str]]], lo: datetime, hi: datetime, meter: MeterRules
    ) -> tuple[int, int | None, list[Interval], list[bool]]:
        """Which part of a loaded window can be re-derived exactly, and its intervals.

        A reading's class depends on its two neighbours, so only readings with
        both neighbours loaded and at least two places from a new reading keep
        a class that cannot have changed. The re-derived span runs from the
        last such valid reading before the new ones to the first after them
        (or to the true ends of the series).
        """
        n = len(pts)
        times = [p[0] for p in pts]
        first_new = bisect.bisect_left(times, lo)
        last_new = bisect.bisect_right(times, hi) - 1
        true_start = first_new < CONTEXT
        true_end = n - 1 - last_new < CONTEXT
        bad = glitches([p[1] for p in pts])
        before = [j for j in range(0 if true_start else 1, first_new - 1) if not bad[j]]
        start_i = before[-1] if before else 0
        after = [j for j in range(last_new + 2, n if true_end else n - 1) if not bad[j]]
        end_i: int | None = after[0] if after else (None if true_end else n - 1)
        stop = n if end_i is None else end_i + 1
        intervals: list[Interval] = []
        prev: tuple[datetime, Decimal] | None = None
        for j in range(start_i, stop):
            if bad[j]:
                continue
            ts, v, _ = pts[j]
            if prev is not None:
                intervals.append(between(prev[0], prev[1], ts, v, meter))
            prev = (ts, v)
        return start_i, end_i, intervals, bad

    def _segments(
        self, mid: str, reg: str, iv: Interval, decisions: dict[tuple, str]
    ) -> list[tuple]:
        segs = self.calendar.split(iv.start, iv.end, iv.kwh)
        estimated = iv.estimated or len(segs) > 1
        status = decisions.get((mid, reg, iv.start, iv.end)) or ("suspect" if iv.suspect else "ok")
        return [
            (mid, reg, iv.start, iv.end, s.start, s.end, s.day, s.zone, s.kwh, estimated, iv.kind, status)
            for s in segs
        ]

    def _decisions(self, meter_ids: set[str]) -> dict[tuple, str]:
        rows = self.conn.execute(
            "SELECT meter_id, register, start_ts, end_ts, decision FROM interval_decision"
            " WHERE meter_id = ANY(%s)",
            (list(meter_ids),),
        ).fetchall()
        return {(m, r, s, e): d for m, r, s, e, d in rows}


def apply_daily_changes(
    conn: psycopg.Connection,
    removed: Iterable[tuple[str, date, str, Decimal, bool, str]],
    added: Iterable[tuple[str, date, str, Decimal, bool, str]],
) -> None:
    """Keep daily_zone_usage equal to the sum of its interval segments.

    Takes the segments taken out of and put into interval_usage, as
    (meter_id, day, zone, kwh, estimated, status), and applies the net change.
    The one place that decides what a daily total counts: ok and accepted
    energy in kwh, the estimated part of it in estimated_kwh, suspect energy
    apart in suspect_kwh; rejected energy nowhere.
    """
    delta: dict[tuple[str, date, str], list[Decimal]] = defaultdict(
        lambda: [Decimal(0), Decimal(0), Decimal(0)]
    )
    for sign, rows in ((-1, removed), (1, added)):
        for mid, day, zone, kwh, est, status in rows:
            d = delta[(mid, day, zone)]
            if status in _COUNTED:
                d[0] += sign * kwh
                if est:
                    d[1] += sign * kwh
            elif status == "suspect":
                d[2] += sign * kwh
    # zero changes are written too: a day with no energy still has its rows
    items = list(delta.items())
    if not items:
        return
    conn.execute(
        """INSERT INTO daily_zone_usage (meter_id, day, zone, kwh, estimated_kwh, suspect_kwh)
           SELECT * FROM unnest(%s::text[], %s::date[], %s::text[], %s::numeric[], %s::numeric[], %s::numeric[])
           ON CONFLICT (meter_id, day, zone) DO UPDATE SET
             kwh = daily_zone_usage.kwh + EXCLUDED.kwh,
             estimated_kwh = daily_zone_usage.estimated_kwh + EXCLUDED.estimated_kwh,
             suspect_kwh = daily_zone_usage.suspect_kwh + EXCLUDED.suspect_kwh""",
        (
            [k[0] for k, _ in items], [k[1] for k, _ in items], [k[2] for k, _ in items],
            [v[0] for _, v in items], [v[1] for _, v in items], [v[2] for _, v in items],
        ),
    )


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
            " AND seg_start >= %s AND status <> %s FOR UPDATE",
            (meter_id, register, start_ts, end_ts, start_ts, decision),
        ).fetchall()
        conn.execute(
            "UPDATE interval_usage SET status = %s WHERE meter_id = %s AND register = %s"
            " AND start_ts = %s AND end_ts = %s AND seg_start >= %s",
            (decision, meter_id, register, start_ts, end_ts, start_ts),
        )
        if register == BILLED_REGISTER:
            apply_daily_changes(conn, removed=rows, added=[(*r[:5], decision) for r in rows])
    return len(rows)
