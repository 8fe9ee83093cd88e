"""Back-fill from a SPODES meter's load profile (1.0.99.1.0.255), end to end (issue 16).

The gateway's scheduler runs in-process against a simulated SPODES meter on a
paced pseudo-terminal (HDLC at 9600 baud), into the real ingestion path and
PostgreSQL. The meter falls silent for six hours; when it answers again the
gateway reads the missed half-hours from its load profile by range, five per
cycle, and the stored intervals equal the simulator's profile to the
watt-hour, flagged `from_profile`, with no estimated placement left. And the
opt-in clock correction moves the meter's clock by at most the daily step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.dlms import DAILY_CLOCK_STEP_S, DlmsAdapter
from adapters.reading import Reading, Rejected
from amr import metrics
from amr.settings import Settings
from collector.gateway.scheduler import Scheduler
from collector.ingest.ingestor import Ingestor
from collector.inventory import parse_inventory, upsert_inventory
from simulators.dlms_sim import HdlcMeterLine, SimMeter

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


def _inventory(device: str, **extra: Any) -> Any:
    return parse_inventory({
        "subscriber": [{"account": "1"}],
        "meter": [{"id": "sp1", "account": "1", "adapter": "dlms", "port": device, "baudrate": 9600,
                   "physical_address": 17, "password": "12345678", "registers": ["1.8.0"], "interval": "30m",
                   "timeout": 1.0} | extra],
    })


def test_six_missed_hours_are_read_back_from_the_load_profile(conn) -> None:
    clock = Frozen(T0)
    adapter = DlmsAdapter(Settings(), now=clock.now)
    sm = SimMeter(17, "12345678", seed=21, now=clock.now)
    try:
        with HdlcMeterLine([sm], 9600) as line:
            inv = _inventory(line.device, backfill_slots=5)
            upsert_inventory(conn, inv)
            conn.commit()
            meter = inv.meters["sp1"]
            sink = DbSink(Ingestor(conn, Settings()))
            sched = Scheduler([meter], lambda m: adapter, sink, jitter_s=0, retry_delay_s=3600, now=clock.now)
            filled = metrics.BACKFILL_SLOTS.labels("dlms", meter.bus_name, "filled")
            before = filled._value.get()

            async def slot(t: datetime) -> None:
                clock.t = t
                await sched.run_slot([meter], t, HALF)

            async def scenario() -> None:
                await slot(T0)
                await slot(T0 + HALF)
                sm.faults.add("silent")  # the link dies
                await slot(T0 + 2 * HALF)
                sm.faults.discard("silent")  # six hours after the last good read, it answers again
                await slot(T0 + 13 * HALF)
                await slot(T0 + 14 * HALF)
                await slot(T0 + 15 * HALF)

            asyncio.run(scenario())
            assert sched.reports[2].missed and "timeout" in sched.reports[2].missed["sp1"]
            assert filled._value.get() - before == 11  # every missed boundary, five a cycle
        truth = [(T0 + HALF * k, T0 + HALF * (k + 1), sm.slot_wh(T0 + HALF * k)) for k in range(1, 13)]
        rows = conn.execute(
            "SELECT start_ts, end_ts, kwh, estimated FROM interval_usage WHERE meter_id = 'sp1'"
            " AND register = '1.8.0' AND start_ts >= %s AND end_ts <= %s ORDER BY start_ts",
            (T0 + HALF, T0 + 13 * HALF),
        ).fetchall()
        assert [(r[0], r[1]) for r in rows] == [(s, e) for s, e, _ in truth]
        assert [r[2] * 1000 for r in rows] == [wh for _, _, wh in truth]  # to the watt-hour, exactly
        assert not any(r[3] for r in rows)
        flagged = conn.execute(
            "SELECT ts FROM reading WHERE meter_id = 'sp1' AND 'from_profile' = ANY(quality) ORDER BY ts"
        ).fetchall()
        assert [r[0] for r in flagged] == [T0 + k * HALF for k in range(2, 13)]
        left = conn.execute(
            "SELECT coalesce(sum(estimated_kwh), 0) FROM daily_zone_usage WHERE meter_id = 'sp1'").fetchone()[0]
        assert left == 0
    finally:
        adapter.close_blocking()


def test_clock_correction_is_opt_in_and_within_the_daily_step() -> None:
    clock = Frozen(T0)
    adapter = DlmsAdapter(Settings(), now=clock.now, clock_tolerance_s=30)
    on = SimMeter(17, "12345678", seed=1, clock_offset_s=-100, now=clock.now)
    off = SimMeter(18, "12345678", seed=2, clock_offset_s=-100, now=clock.now)
    try:
        with HdlcMeterLine([on, off], 9600) as line:
            inv = parse_inventory({"subscriber": [{"account": "1"}], "meter": [
                {"id": f"c{sm.physical_address}", "account": "1", "adapter": "dlms", "port": line.device,
                 "physical_address": sm.physical_address, "password": "12345678", "registers": ["1.8.0"],
                 **({"clock_correction": True} if sm is on else {})} for sm in (on, off)]})
            meters = list(inv.meters.values())
            items: list[Any] = []

            class Sink:
                def put(self, got: list[Any]) -> None:
                    items.extend(got)

            sched = Scheduler(meters, lambda m: adapter, Sink(), jitter_s=0, retry_delay_s=3600, now=clock.now)
            ok = metrics.CLOCK_CORRECTIONS.labels("dlms", line.device, "ok")
            before = ok._value.get()

            async def run() -> None:
                for k in range(3):  # three slots of one day: one correction only
                    clock.t = T0 + k * HALF
                    await sched.run_slot(meters, clock.t, HALF)

            asyncio.run(run())
        assert on.clock_shifts == [DAILY_CLOCK_STEP_S] and on.clock_offset_s == -100 + DAILY_CLOCK_STEP_S
        assert off.clock_shifts == [] and off.clock_offset_s == -100
        assert ok._value.get() - before == 1
        assert items and all(isinstance(r, Reading) for r in items)
    finally:
        adapter.close_blocking()
