"""Back-fill from the meter's own load profile, end to end (issue 16, "What must hold").

The scheduler runs in-process against a simulated IEC 62056-21 meter on a paced
pseudo-terminal, into the real ingestion path and PostgreSQL. The meter stops
answering for six hours; when it answers again the gateway reads the missed
half-hours from its P.01 profile, five per cycle, and the stored intervals
equal the simulator's profile to the watt-hour, flagged `from_profile`, with no
estimated placement left.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from adapters import quality
from adapters.base import ProfileSlot
from adapters.iec62056 import Iec62056Adapter
from adapters.reading import Reading, Rejected
from amr import metrics
from amr.settings import Settings
from collector.gateway.backfill import Gap, derive
from collector.gateway.scheduler import Scheduler
from collector.ingest.ingestor import Ingestor
from collector.inventory import parse_inventory, upsert_inventory
from simulators.iec62056_sim import IecLineSim, SimMeter

T0 = datetime(2026, 11, 10, 0, 0, tzinfo=UTC)
HALF = timedelta(minutes=30)


@dataclass
class Frozen:
    """One clock for the meter, the adapter and the scheduler, moved by the test."""

    t: datetime

    def now(self) -> datetime:
        return self.t


class DbSink:
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self.items: list[Reading | Rejected] = []

    def put(self, items: list[Reading | Rejected]) -> None:
        self.items += items
        self.ingestor.ingest(items)


def _inventory(device: str, backfill_slots: int) -> object:
    inv = parse_inventory({
        "subscriber": [{"account": "1"}],
        "meter": [{"id": "bf1", "account": "1", "adapter": "iec62056", "port": device, "baudrate": 9600,
                   "registers": ["1.8.0"], "interval": "30m", "timeout": 0.5, "backfill_slots": backfill_slots}],
    })
    return inv


def test_six_missed_hours_are_read_back_from_the_profile(conn) -> None:
    clock = Frozen(T0)
    adapter = Iec62056Adapter(Settings(), now=clock.now)
    sm = SimMeter(seed=11, in_wh=True)
    try:
        with IecLineSim([sm], baudrate=9600, clock=clock) as sim:
            inv = _inventory(sim.device, backfill_slots=5)
            upsert_inventory(conn, inv)  # type: ignore[arg-type]
            conn.commit()
            meter = inv.meters["bf1"]  # type: ignore[attr-defined]
            sink = DbSink(Ingestor(conn, Settings()))
            sched = Scheduler([meter], lambda m: adapter, sink, jitter_s=0, retry_delay_s=3600, now=clock.now)
            filled = metrics.BACKFILL_SLOTS.labels("iec62056", meter.bus_name, "filled")
            before = filled._value.get()

            async def slot(t: datetime) -> None:
                clock.t = t
                await sched.run_slot([meter], t, HALF)

            async def scenario() -> None:
                await slot(T0)
                await slot(T0 + HALF)
                sm.fault = "no_answer"  # the link dies
                await slot(T0 + 2 * HALF)
                sm.fault = None  # six hours after the last good read, it answers again
                await slot(T0 + 13 * HALF)

            asyncio.run(scenario())
            assert sched.reports[2].missed  # the dead slot was missed, counted
            # the first cycle read back five half-hours; the older part of the gap is still estimated
            est = conn.execute(
                "SELECT start_ts, end_ts FROM interval_usage WHERE meter_id = 'bf1' AND estimated").fetchall()
            assert est and est[0][0] == T0 + HALF and est[-1][1] == T0 + 8 * HALF
            assert filled._value.get() - before == 5

            asyncio.run(_later(slot))
            assert filled._value.get() - before == 11  # every missed boundary, in three cycles
            truth = sm.profile(T0 + HALF, T0 + 13 * HALF)
        rows = conn.execute(
            "SELECT start_ts, end_ts, kwh, estimated, kind FROM interval_usage WHERE meter_id = 'bf1'"
            " AND register = '1.8.0' AND start_ts >= %s AND end_ts <= %s ORDER BY start_ts",
            (T0 + HALF, T0 + 13 * HALF),
        ).fetchall()
        assert [(r[0], r[1]) for r in rows] == [(s.start, s.end) for s in truth]
        assert [int(r[2] * 1000) for r in rows] == [s.wh for s in truth]  # to the watt-hour
        assert all(r[2] * 1000 == int(r[2] * 1000) for r in rows)
        assert not any(r[3] for r in rows) and {r[4] for r in rows} == {"normal"}
        flagged = conn.execute(
            "SELECT ts FROM reading WHERE meter_id = 'bf1' AND 'from_profile' = ANY(quality) ORDER BY ts"
        ).fetchall()
        assert [r[0] for r in flagged] == [T0 + k * HALF for k in range(2, 13)]
        left = conn.execute(
            "SELECT coalesce(sum(estimated_kwh), 0) FROM daily_zone_usage WHERE meter_id = 'bf1'").fetchone()[0]
        assert left == 0  # no estimated placement left, in the daily totals either
    finally:
        adapter.close_blocking()


async def _later(slot) -> None:  # type: ignore[no-untyped-def]
    await slot(T0 + 14 * HALF)  # five more
    await slot(T0 + 15 * HALF)  # the last one: the gap is closed


# --- the derivation, pure -----------------------------------------------------------------


def _slots(start: datetime, whs: list[int | None]) -> list[ProfileSlot]:
    return [ProfileSlot(start + k * HALF, start + (k + 1) * HALF, "1.8.0", wh) for k, wh in enumerate(whs)]


def test_derive_anchors_back_from_the_reading_and_carries_a_rollover() -> None:
    end = T0 + 4 * HALF
    gap = Gap(T0, {"1.8.0": (end, Decimal("0.150")), "1.8.1": (end, Decimal("5"))})
    out = derive(gap, _slots(T0, [100, 200, 300, 50]), "m", "src", Decimal(100000))
    # 0.150 kWh now: 0.100 at 3 slots, then a wrap at 100000 kWh
    assert [(r.ts, r.value) for r in out] == [
        (T0 + 3 * HALF, Decimal("0.100")), (T0 + 2 * HALF, Decimal("99999.800")), (T0 + HALF, Decimal("99999.600"))]
    assert all(quality.FROM_PROFILE in r.quality for r in out)
    assert gap.done  # 1.8.0 reached the gap's start; 1.8.1 is not in the profile: left estimated


def test_derive_stops_at_an_invalid_slot_and_resumes_from_its_anchor() -> None:
    end = T0 + 6 * HALF
    gap = Gap(T0, {"1.8.0": (end, Decimal("10"))})
    out = derive(gap, _slots(T0 + 3 * HALF, [100, 100, 100]), "m", "src", Decimal(1000000))
    assert [r.ts for r in out] == [T0 + 5 * HALF, T0 + 4 * HALF, T0 + 3 * HALF]
    assert not gap.done and gap.anchors["1.8.0"] == (T0 + 3 * HALF, Decimal("9.7"))  # next cycle from here
    out = derive(gap, _slots(T0, [100, None, 100]), "m", "src", Decimal(1000000))
    assert [(r.ts, r.value) for r in out] == [(T0 + 2 * HALF, Decimal("9.6"))]
    assert gap.done and gap.invalid == 1  # the broken record ends it; before it stays estimated


# --- clock correction (off unless the inventory asks) ---------------------------------------


def test_clock_correction_is_opt_in_within_the_daily_step_and_logged(caplog) -> None:
    clock = Frozen(T0)
    adapter = Iec62056Adapter(Settings(), now=clock.now, clock_tolerance_s=30)
    on = SimMeter(address="00000001", seed=12, dialect="energomera", clock_offset_s=-100)
    off = SimMeter(address="00000002", seed=13, dialect="energomera", clock_offset_s=-100)
    try:
        with IecLineSim([on, off], baudrate=9600, clock=clock) as sim:
            inv = parse_inventory({"subscriber": [{"account": "1"}], "meter": [
                {"id": f"c{i}", "account": "1", "adapter": "iec62056", "port": sim.device, "baudrate": 9600,
                 "address": sm.address, "dialect": "energomera", "registers": ["1.8.0"],
                 **({"clock_correction": True} if sm is on else {})}
                for i, sm in enumerate((on, off))]})
            meters = list(inv.meters.values())
            assert [m.clock_correction for m in meters] == [True, False]  # off by default
            sink = ListSink()
            sched = Scheduler(meters, lambda m: adapter, sink, jitter_s=0, retry_delay_s=3600, now=clock.now)
            ok = metrics.CLOCK_CORRECTIONS.labels("iec62056", sim.device, "ok")
            before = ok._value.get()

            async def run() -> None:
                for k in range(3):  # three slots of one day: one correction only
                    clock.t = T0 + k * HALF
                    await sched.run_slot(meters, clock.t, HALF)

            with caplog.at_level("WARNING", logger="amr.scheduler"):
                asyncio.run(run())
        assert on.clock_corrections == [(T0, 29)] and on.clock_offset_s == -71  # +29 s: Energomera's daily step
        assert off.clock_corrections == [] and off.clock_offset_s == -100
        assert ok._value.get() - before == 1
        assert any("corrected the clock of meter c0" in r.getMessage() and "+29 s" in r.getMessage()
                   for r in caplog.records)
        assert all(quality.CLOCK_SKEW in r.quality for r in sink.items if isinstance(r, Reading))
    finally:
        adapter.close_blocking()


class ListSink:
    """A sink that keeps what it is given (the clock test needs no database)."""

    def __init__(self) -> None:
        self.items: list[Reading | Rejected] = []

    def put(self, items: list[Reading | Rejected]) -> None:
        self.items += items


def test_a_gateway_restart_is_back_filled_from_the_state_it_kept(tmp_path) -> None:
    """The gateway reboots during the outage: its new scheduler reads the last slot-grid
    reading from the state file and reads the missed half-hours back; a clock-skewed read
    anchors nothing (the profile would be placed by a wrong clock)."""
    clock = Frozen(T0)
    adapter = Iec62056Adapter(Settings(), now=clock.now, clock_tolerance_s=30)
    sm = SimMeter(seed=14, in_wh=True)
    state = tmp_path / "backfill-state.json"
    try:
        with IecLineSim([sm], baudrate=9600, clock=clock) as sim:
            meter = _inventory(sim.device, backfill_slots=48).meters["bf1"]  # type: ignore[attr-defined]

            async def slot(sched: Scheduler, t: datetime) -> None:
                clock.t = t
                await sched.run_slot([meter], t, HALF)

            first = Scheduler([meter], lambda m: adapter, ListSink(), jitter_s=0, retry_delay_s=3600,
                              now=clock.now, backfill_state=state)
            asyncio.run(slot(first, T0 + HALF))
            assert state.exists()
            sink = ListSink()
            again = Scheduler([meter], lambda m: adapter, sink, jitter_s=0, retry_delay_s=3600,
                              now=clock.now, backfill_state=state)  # after the reboot
            sm.clock_offset_s = 120  # first answer with a clock off: no back-fill yet
            asyncio.run(slot(again, T0 + 4 * HALF))
            assert not [r for r in sink.items if isinstance(r, Reading) and quality.FROM_PROFILE in r.quality]
            sm.clock_offset_s = 0
            asyncio.run(slot(again, T0 + 6 * HALF))
        back = sorted((r for r in sink.items if isinstance(r, Reading) and quality.FROM_PROFILE in r.quality),
                      key=lambda r: r.ts)
        assert [r.ts for r in back] == [T0 + k * HALF for k in range(2, 6)]
        assert [r.value for r in back] == [sm.values(r.ts)["1.8.0"] for r in back]  # the counters themselves
    finally:
        adapter.close_blocking()
