"""The polling scheduler: every meter read once per interval, on the wall clock.

Slots are aligned to the epoch (a 30-minute meter is read at :00 and :30 UTC,
which are :00 and :30 in Moscow too), with a small per-meter jitter so a
thousand meters do not hit one gateway in the same millisecond. Meters on a
network (Modbus TCP) are read concurrently up to a bound; meters on one
serial bus are read in turn by that bus's own worker, so a bus never carries
two requests at once and a dead meter costs the others only its timeout.

Before a wait of more than a few seconds the loop of each interval says
what it waits for, in the local time a person reads (`next slot at 12:30:00
MSK (in 14 min) for 40 meters every 30 min`): a gateway started at 12:16 is
otherwise silent for 14 minutes and looks hung. `first_now` reads every
meter at once, in the slot under way, before following the slots.

A failed read is retried later in the same interval; a slot with no good read
is a missed slot: counted and logged with meter, bus and reason, never
skipped in silence. A meter that keeps failing backs off exponentially (up
to `backoff_max_s`) and is probed once when its back-off ends, so a dead
meter does not eat a bus's time every cycle and a repaired one comes back on
its own.

A first-attempt read that completes within `snap_s` of its slot is stamped
with the slot instant, so 30-minute data lands on :00 and :30 and never
straddles a zone border (the few seconds' energy between slot and read fall
into the next interval; cumulative counters lose nothing). A retried read
keeps its real time and is flagged `retried` and `late`.

Readings leave through a `Sink` (the gateway spool, or the ingestion entry
point directly): one `put` per pass, never per value. A sink that fails
does not stop polling: the readings are kept in memory (bounded) and
offered again with the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prometheus_client.metrics import MetricWrapperBase

from adapters import quality
from adapters.base import AnyMeter, PollError, PollingAdapter
from adapters.reading import Reading, Rejected
from amr import metrics
from collector.gateway.backfill import BackfillStore, Gap, derive

log = logging.getLogger("amr.scheduler")

# meters on one serial line (or one converter's line: `bus_name` is its host:tcp_port) are read in turn,
# outside the TCP reads' concurrency bound; dlms too: HDLC meters share RS-485 lines like the others
SERIAL_ADAPTERS = ("modbus_rtu", "iec62056", "mercury230", "mercury200", "dlms")

# a wait shorter than this is not announced: a 2-second interval would say so every 2 seconds
ANNOUNCE_WAIT_S = 5.0

_Metric = TypeVar("_Metric", bound=MetricWrapperBase)


class ScheduledMeter(AnyMeter, Protocol):
    """A meter as the scheduler sees it: what its adapter reads, and how often.

    The inventory's `Meter` has it; `id` keys the scheduler's state, `bus_name`
    says which meters take turns, `timeout` and `pause` bound a pass.
    """

    @property
    def interval(self) -> timedelta: ...

    @property
    def backfill_slots(self) -> int:
        """At most this many missed slots read back from the meter's profile per cycle (0: off)."""
        ...

    @property
    def clock_correction(self) -> bool:
        """Correct the meter's clock within its protocol's daily limit (off unless set)."""
        ...

    @property
    def rollover(self) -> Decimal: ...


class Sink(Protocol):
    """Where a pass's readings go (spool, ingestion); must not lose what it accepts."""

    def put(self, items: list[Reading | Rejected]) -> None: ...


@dataclass
class MeterState:
    """What the scheduler remembers about one meter between slots."""

    failures: int = 0  # consecutive failed attempts
    backoff_s: float = 0.0  # current back-off; 0 when healthy
    backoff_until: float = 0.0  # monotonic time of the next probe
    last_ok: datetime | None = None
    last_error: str = ""
    missed: int = 0
    reads: int = 0
    last_read: datetime | None = None  # ts of the last reading on the slot grid (the back-fill's start)
    gaps: list[Gap] = field(default_factory=list)  # missed slots still to read back from the profile
    clock_corrected_at: datetime | None = None


@dataclass
class CycleReport:
    """One slot of one interval group: who was read, who was missed and why."""

    slot: datetime
    read: list[str] = field(default_factory=list)
    missed: dict[str, str] = field(default_factory=dict)  # meter id -> last reason
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (meter, outcome, message)
    retried: list[str] = field(default_factory=list)
    seconds: float = 0.0
    overrun: bool = False


def slot_start(now: datetime, interval: timedelta) -> datetime:
    """The start of the interval slot that contains now (aligned to the Unix epoch)."""
    step = interval.total_seconds()
    ts = now.timestamp()
    return datetime.fromtimestamp(ts - ts % step, UTC)


@dataclass
class _SlotRun:
    """One slot under way: its meters by lane, who has been read, what waits for the sink."""

    report: CycleReport
    endpoints: dict[str, list[ScheduledMeter]]  # TCP host:port -> its meters, read in turn
    buses: dict[str, list[ScheduledMeter]]  # serial port -> its meters, read in turn
    tcp_slots: asyncio.Semaphore  # TCP reads in flight, across endpoints
    done: set[str] = field(default_factory=set)  # ids of the meters read in this slot
    pending: list[Reading | Rejected] = field(default_factory=list)
    bus_done: dict[str, float] = field(default_factory=dict)  # bus -> when its last read ended (monotonic)


def duration_words(seconds: float) -> str:
    """A wait or an interval as a person says it: `45 s`, `14 min`, `2 h 5 min`, `1 day`."""
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    if s % 86400 == 0:
        return f"{s // 86400} day{'s' if s > 86400 else ''}"
    minutes = round(s / 60)
    h, m = divmod(minutes, 60)
    return f"{h} h {m} min" if m else f"{h} h"


def next_slot_line(now: datetime, slot: datetime, tz: tzinfo, meters: int, interval: timedelta) -> str:
    """What a loop says before it waits for a slot: the slot in local time, the wait, and for what.

    The date is added when the slot is not today (a daily interval), and the
    zone's abbreviation always, since the log line's own timestamp may be UTC.
    """
    local, today = slot.astimezone(tz), now.astimezone(tz).date()
    at = local.strftime("%H:%M:%S %Z") if local.date() == today else local.strftime("%Y-%m-%d %H:%M:%S %Z")
    wait = duration_words((slot - now).total_seconds())
    return (f"next slot at {at} (in {wait}) for {meters} meter{'s' if meters != 1 else ''} "
            f"every {duration_words(interval.total_seconds())}")


def _zone(tz: str | tzinfo) -> tzinfo:
    """The zone waits are told in; an unknown name must not stop polling, so it falls back to UTC, said once."""
    if not isinstance(tz, str):
        return tz
    try:
        return ZoneInfo(tz)
    except (ValueError, ZoneInfoNotFoundError):
        log.warning("timezone %r (AMR_TIMEZONE) is not a known zone like Europe/Moscow: the next slots "
                    "are told in UTC", tz)
        return UTC


def jitter_of(meter_id: str, jitter_s: float) -> float:
    """A stable per-meter offset in [0, jitter_s): the same meter keeps its place in a slot."""
    if jitter_s <= 0:
        return 0.0
    return (zlib.crc32(meter_id.encode()) % 10_000) / 10_000 * jitter_s


class Scheduler:
    """Reads the meters on their intervals and hands readings to a sink.

    adapter_for(meter) returns the adapter that reads it (one per protocol,
    shared). Times are wall-clock UTC for slots and monotonic for waiting;
    `timezone` is only how the waits are told to a person (the settings' zone).
    """

    def __init__(
        self,
        meters: Sequence[ScheduledMeter],
        adapter_for: Callable[[ScheduledMeter], PollingAdapter],
        sink: Sink,
        *,
        tcp_concurrency: int = 100,
        jitter_s: float = 2.0,
        retry_delay_s: float | None = None,
        backoff_after: int = 3,
        backoff_base_s: float = 30.0,
        backoff_max_s: float = 300.0,
        snap_s: float = 10.0,
        now: Callable[[], datetime] | None = None,
        timezone: str | tzinfo = UTC,
        backfill_state: Path | str | None = None,
    ) -> None:
        self.meters = list(meters)
        self.adapter_for = adapter_for
        self.sink = sink
        self.tcp_concurrency = tcp_concurrency
        self.jitter_s = jitter_s
        self.retry_delay_s = retry_delay_s
        self.backoff_after = backoff_after
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.snap_s = snap_s
        self.now = now or (lambda: datetime.now(UTC))
        self.tz = _zone(timezone)
        self.state: dict[str, MeterState] = defaultdict(MeterState)
        self.reports: list[CycleReport] = []
        self._sink_lock = asyncio.Lock()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._unsent: list[Reading | Rejected] = []
        self._refused: list[Rejected] = []  # undecodable answers, for rejected_reading
        self.max_unsent = 1_000_000
        self.clock_correct_above_s = 5.0  # a clock this close to ours is left alone
        # each meter's last slot-grid reading and open gaps, kept across restarts when given a file
        self._backfill_store = BackfillStore(Path(backfill_state)) if backfill_state is not None else None
        self._backfill_dirty = False
        if self._backfill_store is not None:
            for mid, (last, gaps) in self._backfill_store.load().items():
                self.state[mid].last_read, self.state[mid].gaps = last, gaps

    def _metric(self, metric: _Metric, *labels: str) -> _Metric:
        """A labelled child, looked up once: labels() is costly at a thousand reads a second."""
        key = (id(metric), labels)
        child: _Metric | None = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # --- one read ------------------------------------------------------------

    def _bus(self, meter: ScheduledMeter) -> str:
        return str(meter.bus_name)

    def _backed_off(self, meter: ScheduledMeter, mono: float) -> bool:
        st = self.state[meter.id]
        return st.backoff_s > 0 and mono < st.backoff_until

    async def _attempt(
        self, meter: ScheduledMeter, slot: datetime, retry: bool, report: CycleReport
    ) -> list[Reading] | None:
        """Read a meter once; on failure count it, log it, and move its back-off."""
        st = self.state[meter.id]
        bus = self._bus(meter)
        t0 = time.perf_counter()
        try:
            readings = await self.adapter_for(meter).read(meter)
        except PollError as exc:
            self._metric(metrics.POLLS, meter.adapter, bus, exc.outcome).inc()
            self._failed(meter, st, f"{exc.outcome}: {exc}")
            report.errors.append((meter.id, exc.outcome, str(exc)))
            log.warning("poll failed: %s", exc, extra={"meter": meter.id, "bus": bus, "outcome": exc.outcome})
            if exc.raw is not None:  # the meter answered, with something that is not a value: keep it
                source = exc.source if exc.source is not None else bus
                self._refused.append(Rejected(source, exc.raw, str(exc), exc.outcome, meter.id, None, self.now()))
            return None
        except Exception as exc:  # an adapter bug must not stop the daemon
            self._metric(metrics.POLLS, meter.adapter, bus, "decode").inc()
            msg = f"meter {meter.id} on bus {bus}: {type(exc).__name__}: {exc}"
            self._failed(meter, st, f"decode: {msg}")
            report.errors.append((meter.id, "decode", msg))
            log.exception("poll crashed: %s", msg, extra={"meter": meter.id, "bus": bus, "outcome": "decode"})
            return None
        self._metric(metrics.POLL_SECONDS, meter.adapter, bus).observe(time.perf_counter() - t0)
        self._metric(metrics.POLLS, meter.adapter, bus, "ok").inc()
        self._metric(metrics.BUS_LAST_SUCCESS, meter.adapter, bus).set_to_current_time()
        if st.backoff_s:
            log.info("meter %s on bus %s answers again after back-off", meter.id, bus,
                     extra={"meter": meter.id, "bus": bus})
        st.failures, st.backoff_s, st.backoff_until = 0, 0.0, 0.0
        st.last_ok, st.reads = self.now(), st.reads + 1
        return [self._stamp(r, slot, retry) for r in readings]

    def _stamp(self, r: Reading, slot: datetime, retry: bool) -> Reading:
        """Snap a prompt first read to its slot; flag a retried one."""
        if retry:
            return r.flagged(quality.RETRIED, quality.LATE)
        if abs((r.ts - slot).total_seconds()) <= self.snap_s and quality.METER_CLOCK not in r.quality:
            return Reading(r.meter_id, r.register, slot, r.value, r.quality, r.source)
        return r

    def _failed(self, meter: ScheduledMeter, st: MeterState, reason: str) -> None:
        st.failures += 1
        st.last_error = reason
        if st.failures >= self.backoff_after:
            was = st.backoff_s
            st.backoff_s = min(self.backoff_max_s, was * 2 if was else self.backoff_base_s)
            st.backoff_until = time.monotonic() + st.backoff_s
            log.warning(
                "meter %s on bus %s backs off for %.0f s after %d failures (%s)",
                meter.id, self._bus(meter), st.backoff_s, st.failures, reason,
                extra={"meter": meter.id, "bus": self._bus(meter)},
            )

    # --- one slot ------------------------------------------------------------

    async def _flush(self, items: list[Reading | Rejected]) -> None:
        """Hand readings to the sink; if it fails, keep them (bounded) and offer them again next time."""
        if not items and not self._unsent and not self._refused:
            return
        async with self._sink_lock:
            batch = self._unsent + self._refused + items
            self._unsent, self._refused = [], []
            items.clear()
            try:
                await asyncio.to_thread(self.sink.put, batch)
            except Exception as exc:  # the sink (database, spool) is down: polling goes on
                self._unsent = batch[-self.max_unsent :]
                lost = len(batch) - len(self._unsent)
                log.error(
                    "the sink refused %d readings (%s: %s); %d kept in memory to offer again%s",
                    len(batch), type(exc).__name__, exc, len(self._unsent),
                    f", {lost} oldest dropped" if lost else "",
                )

    async def run_slot(self, meters: Sequence[ScheduledMeter], slot: datetime, interval: timedelta) -> CycleReport:
        """Read every meter of one slot, retrying failures until the slot is nearly over."""
        t_start = time.monotonic()
        slot_end = t_start + max(0.0, (slot + interval - self.now()).total_seconds())
        endpoints, buses = self._lanes(meters)
        run = _SlotRun(CycleReport(slot), endpoints, buses, asyncio.Semaphore(self.tcp_concurrency))
        await self._pass(run, retry=False)
        await self._retry_within_slot(run, meters, interval, slot_end)
        self._record_misses(run, meters)
        self._update_backoff_gauge()
        run.report.seconds = time.monotonic() - t_start
        self._record_overrun(run, slot_end)
        self.reports.append(run.report)
        del self.reports[:-100]
        return run.report

    def _lanes(
        self, meters: Sequence[ScheduledMeter]
    ) -> tuple[dict[str, list[ScheduledMeter]], dict[str, list[ScheduledMeter]]]:
        """The meters by TCP endpoint (host:port) and by serial bus: each lane reads its meters in turn."""
        endpoints: dict[str, list[ScheduledMeter]] = defaultdict(list)
        buses: dict[str, list[ScheduledMeter]] = defaultdict(list)
        for m in meters:
            (buses if m.adapter in SERIAL_ADAPTERS else endpoints)[self._bus(m)].append(m)
        return endpoints, buses

    async def _pass(self, run: _SlotRun, retry: bool) -> None:
        """One pass over the lanes, all at once: each reads its meters not yet read nor
        backed off; then what was read goes to the sink."""
        mono = time.monotonic()
        endpoints = (self._due(run, lane, mono) for lane in run.endpoints.values())
        buses = (self._due(run, lane, mono) for lane in run.buses.values())
        tasks = [self._endpoint_turn(run, ms, retry) for ms in endpoints if ms]
        tasks += [self._bus_turn(run, ms, retry) for ms in buses if ms]
        if tasks:
            await asyncio.gather(*tasks)
        await self._flush(run.pending)
        self._save_backfill()

    def _due(self, run: _SlotRun, lane: list[ScheduledMeter], mono: float) -> list[ScheduledMeter]:
        return [m for m in lane if m.id not in run.done and not self._backed_off(m, mono)]

    async def _endpoint_turn(self, run: _SlotRun, ms: list[ScheduledMeter], retry: bool) -> None:
        # one TCP connection carries one request at a time: its meters go in turn,
        # endpoints in parallel, at most tcp_concurrency reads in flight overall
        if not retry and self.jitter_s:
            await asyncio.sleep(jitter_of(self._bus(ms[0]), self.jitter_s))
        for m in ms:
            async with run.tcp_slots:
                await self._read_in_slot(run, m, retry)

    async def _bus_turn(self, run: _SlotRun, ms: list[ScheduledMeter], retry: bool) -> None:
        if not retry and self.jitter_s:
            await asyncio.sleep(jitter_of(self._bus(ms[0]), self.jitter_s))
        for m in ms:
            await self._read_in_slot(run, m, retry)

    async def _read_in_slot(self, run: _SlotRun, m: ScheduledMeter, retry: bool) -> None:
        """Read one meter and note it in the slot; hand a large backlog to the sink at once."""
        got = await self._attempt(m, run.report.slot, retry, run.report)
        if got is not None:
            got += await self._backfill(m, got)
            await self._correct_clock(m)
        run.bus_done[self._bus(m)] = time.monotonic()
        if got is not None:
            run.done.add(m.id)
            run.pending.extend(got)
            run.report.read.append(m.id)
            if retry:
                run.report.retried.append(m.id)
            if len(run.pending) >= 5000:
                await self._flush(run.pending)

    # --- back-fill from the meter's load profile and clock correction -------------

    def _profile_adapter(self, meter: ScheduledMeter) -> Any | None:
        """The meter's adapter if it reads this meter's load profile (adapters.base.ProfileMeter)."""
        adapter = self.adapter_for(meter)
        if not hasattr(adapter, "read_profile"):
            return None
        has = getattr(adapter, "has_profile", None)  # an adapter whose meters differ says which have one
        return adapter if has is None or has(meter) else None

    async def _backfill(self, meter: ScheduledMeter, got: list[Reading]) -> list[Reading]:
        """Note a gap that this reading ends, then read back up to `backfill_slots` missed slots.

        Only a reading on the slot grid anchors a gap (a profile slot ends there); a
        later-stamped read (a retry) leaves the gap open until the next prompt one.
        """
        limit = int(getattr(meter, "backfill_slots", 0) or 0)
        if limit <= 0 or not got or (adapter := self._profile_adapter(meter)) is None:
            return []
        st = self.state[meter.id]
        ts = got[0].ts
        step = meter.interval.total_seconds()
        if quality.CLOCK_SKEW in got[0].quality:
            pass  # the profile is stamped by the meter's clock, which is off: its slots would land wrong
        elif ts.timestamp() % step == 0:
            self._backfill_dirty = True
            if st.last_read is not None and ts - st.last_read > meter.interval:
                st.gaps.append(Gap(st.last_read, {r.register: (r.ts, r.value) for r in got if r.ts == ts}))
                del st.gaps[:-16]  # a meter that keeps dropping out: its oldest gaps stay estimated
            st.last_read = ts
        out: list[Reading] = []
        bus = self._bus(meter)
        for gap in sorted(st.gaps, key=lambda g: g.until, reverse=True):
            left = limit - len({r.ts for r in out})
            if left <= 0:
                break
            until = gap.until
            start = max(gap.after, until - meter.interval * left)
            gap.attempts += 1
            try:
                slots = await adapter.read_profile(meter, start, until, left)
            except PollError as exc:
                self._metric(metrics.BACKFILL_SLOTS, meter.adapter, bus, "error").inc()
                log.warning("back-fill of meter %s on bus %s from %s failed: %s", meter.id, bus,
                            start.isoformat(), exc, extra={"meter": meter.id, "bus": bus, "outcome": exc.outcome})
                if gap.attempts >= 3:
                    gap.anchors.clear()  # the profile is not to be had: the gap stays estimated
                continue
            before_invalid = gap.invalid
            readings = derive(gap, slots, meter.id, f"{got[0].source}#profile", Decimal(meter.rollover))
            out += readings
            self._metric(metrics.BACKFILL_SLOTS, meter.adapter, bus, "filled").inc(len({r.ts for r in readings}))
            if gap.invalid > before_invalid:
                self._metric(metrics.BACKFILL_SLOTS, meter.adapter, bus, "invalid").inc(gap.invalid - before_invalid)
            log.info("back-filled %d slot(s) of meter %s on bus %s from its profile (%s to %s)%s",
                     len({r.ts for r in readings}), meter.id, bus, start.isoformat(), until.isoformat(),
                     "" if gap.done else "; more next cycle",
                     extra={"meter": meter.id, "bus": bus})
        st.gaps = [g for g in st.gaps if not g.done]
        if out:
            self._backfill_dirty = True
        return out

    def _save_backfill(self) -> None:
        """Keep the slot-grid positions and open gaps for a restart (once a pass, when they moved)."""
        if self._backfill_store is None or not self._backfill_dirty:
            return
        self._backfill_dirty = False
        self._backfill_store.save({mid: (st.last_read, st.gaps) for mid, st in self.state.items()})

    async def _correct_clock(self, meter: ScheduledMeter) -> None:
        """Move a meter's clock toward ours within its protocol's daily step, at most once a day.

        Off unless the meter says `clock_correction = true`; the adapter must be
        ClockSettable and tell the offset and its step (`clock_offset`,
        `clock_step_limit`). Every correction is logged and counted.
        """
        if not getattr(meter, "clock_correction", False):
            return
        adapter = self.adapter_for(meter)
        offset_of = getattr(adapter, "clock_offset", None)
        limit_of = getattr(adapter, "clock_step_limit", None)
        if not hasattr(adapter, "correct_clock") or offset_of is None or limit_of is None:
            return
        offset, limit = offset_of(meter), limit_of(meter)
        st, now, bus = self.state[meter.id], self.now(), self._bus(meter)
        if offset is None or limit is None or abs(offset) < self.clock_correct_above_s:
            return
        if st.clock_corrected_at is not None and now - st.clock_corrected_at < timedelta(days=1):
            return
        delta = max(-limit, min(limit, -offset))
        st.clock_corrected_at = now
        try:
            await adapter.correct_clock(meter, delta)
        except PollError as exc:
            self._metric(metrics.CLOCK_CORRECTIONS, meter.adapter, bus, "refused").inc()
            log.warning("clock correction of meter %s on bus %s by %+.0f s failed: %s", meter.id, bus, delta, exc,
                        extra={"meter": meter.id, "bus": bus, "outcome": exc.outcome})
            return
        self._metric(metrics.CLOCK_CORRECTIONS, meter.adapter, bus, "ok").inc()
        log.warning("corrected the clock of meter %s on bus %s by %+.0f s (it was %+.0f s off; at most %g s a day)",
                    meter.id, bus, delta, offset, limit, extra={"meter": meter.id, "bus": bus})

    async def _retry_within_slot(
        self, run: _SlotRun, meters: Sequence[ScheduledMeter], interval: timedelta, slot_end: float
    ) -> None:
        """Retry passes over the meters not read yet, as long as a whole retry pass still fits
        before the slot ends (slot_end is monotonic)."""
        margin = min(interval.total_seconds() * 0.05, 5.0)
        retry_delay = self.retry_delay_s if self.retry_delay_s is not None else min(interval.total_seconds() / 10, 60.0)
        while True:
            left = [m for m in meters if m.id not in run.done and not self._backed_off(m, time.monotonic())]
            if not left or time.monotonic() + retry_delay + self._pass_time(left) + margin >= slot_end:
                break
            await asyncio.sleep(retry_delay)
            await self._pass(run, retry=True)

    def _record_misses(self, run: _SlotRun, meters: Sequence[ScheduledMeter]) -> None:
        """Every meter not read in the slot is a missed slot: counted, logged and reported with its reason."""
        report = run.report
        for m in meters:
            if m.id in run.done:
                continue
            st = self.state[m.id]
            st.missed += 1
            why = st.last_error or "not read"
            if self._backed_off(m, time.monotonic()) and not any(e[0] == m.id for e in report.errors):
                why = f"backed off for {st.backoff_s:.0f} s after: {st.last_error}"
            report.missed[m.id] = why
            self._metric(metrics.MISSED_SLOTS, m.adapter, self._bus(m)).inc()
            log.warning(
                "missed slot %s of meter %s on bus %s: %s", report.slot.isoformat(), m.id, self._bus(m), why,
                extra={"meter": m.id, "bus": self._bus(m)},
            )

    def _record_overrun(self, run: _SlotRun, slot_end: float) -> None:
        """A slot whose reads went on past its end overran: counted per bus that was still reading."""
        late = sorted(bus for bus, t in run.bus_done.items() if t > slot_end)
        if late or time.monotonic() > slot_end:
            run.report.overrun = True
            for bus in late:
                self._metric(metrics.CYCLE_OVERRUNS, bus).inc()

    def _pass_time(self, meters: Sequence[ScheduledMeter]) -> float:
        """The longest a pass over these meters can take if every one of them times out:
        buses in parallel, the meters of one bus (a serial port, or one TCP endpoint's
        connection) one after another."""
        per_bus: dict[str, float] = defaultdict(float)
        for m in meters:
            per_bus[self._bus(m)] += float(m.timeout) + float(m.pause)
        return max(per_bus.values(), default=0.0)

    def _update_backoff_gauge(self) -> None:
        counts: dict[str, int] = defaultdict(int)
        for m in self.meters:
            counts[self._bus(m)] += 1 if self.state[m.id].backoff_s > 0 else 0
        for bus, n in counts.items():
            metrics.METERS_BACKED_OFF.labels(bus).set(n)

    # --- the daemon loop -------------------------------------------------------

    async def _group_loop(
        self, interval: timedelta, stop: asyncio.Event, cycles: int | None, first_now: bool = False
    ) -> None:
        ran = 0
        last: datetime | None = None
        while not stop.is_set() and (cycles is None or ran < cycles):
            now = self.now()
            n = sum(1 for m in self.meters if m.interval == interval)
            every = duration_words(interval.total_seconds())
            if first_now:  # the slot under way, read at once (a read far from its start keeps its time)
                first_now = False
                slot = slot_start(now, interval)
                log.info("first pass now over %d meter%s every %s, then on their slots",
                         n, "s" if n != 1 else "", every)
            else:
                slot = slot_start(now, interval) + interval
                wait = (slot - now).total_seconds()
                if wait >= ANNOUNCE_WAIT_S:
                    log.info("%s", next_slot_line(now, slot, self.tz, n, interval),
                             extra={"slot": slot.isoformat(), "wait_s": round(wait, 1)})
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    return
                except TimeoutError:
                    pass
            meters = [m for m in self.meters if m.interval == interval]
            if not meters:  # a reload took this interval's meters away
                last = None
                continue
            if last is not None and slot - last > interval:
                self._skipped(meters, int((slot - last) / interval) - 1, last + interval)
            report = await self.run_slot(meters, slot, interval)
            last = slot
            ran += 1
            log.info(
                "slot %s: read %d of %d meters in %.2f s (%d on a retry), %d missed",
                slot.isoformat(), len(report.read), len(meters), report.seconds, len(report.retried),
                len(report.missed), extra={"slot": slot.isoformat(), "missed": len(report.missed)},
            )
            if report.overrun:
                log.warning("slot %s of the %s meters overran its interval", slot.isoformat(), interval)

    def _skipped(self, meters: Sequence[ScheduledMeter], n: int, first: datetime) -> None:
        """Slots that an overrun (or a suspended process) left no time for: counted, never silent."""
        for m in meters:
            self.state[m.id].missed += n
            self._metric(metrics.MISSED_SLOTS, m.adapter, self._bus(m)).inc(n)
        log.warning(
            "%d slot(s) from %s skipped for %d meters: the previous slot overran or the process stalled",
            n, first.isoformat(), len(meters),
        )

    async def run(
        self, stop: asyncio.Event | None = None, cycles: int | None = None, *, first_now: bool = False
    ) -> None:
        """Poll until stop is set (or `cycles` slots per interval group have run).

        `first_now`: the meters of the start are read at once, in the slot under
        way (the pass counts as one of the `cycles`), then on their slots; a
        first poll need not wait up to a whole interval to show that it works.

        One loop per distinct interval; a reload that brings a new interval gets
        its loop within a second, and a loop that died of a bug is logged and
        started again rather than silently leaving its meters unread.
        """
        stop = stop or asyncio.Event()
        tasks: dict[timedelta, asyncio.Task[None]] = {}
        finished: set[timedelta] = set()
        at_start = True
        try:
            while not stop.is_set():
                for iv in sorted({m.interval for m in self.meters} - tasks.keys() - finished):
                    tasks[iv] = asyncio.create_task(self._group_loop(iv, stop, cycles, first_now and at_start),
                                                    name=f"slots {iv}")
                at_start = False
                for iv, task in list(tasks.items()):
                    if not task.done():
                        continue
                    del tasks[iv]
                    if task.cancelled() or task.exception() is None:
                        finished.add(iv)  # ran its cycles
                    else:
                        log.error("the %s polling loop failed and restarts: %r", iv, task.exception())
                if cycles is not None and not tasks:
                    break
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
        finally:
            for task in tasks.values():
                if stop.is_set():
                    await asyncio.gather(task, return_exceptions=True)
                else:
                    task.cancel()

    def replace_meters(self, meters: Sequence[ScheduledMeter]) -> None:
        """Take a reloaded inventory: new meters from the next slot; state kept by id."""
        self.meters = list(meters)
        ids = {m.id for m in self.meters}
        for mid in [k for k in self.state if k not in ids]:
            del self.state[mid]
