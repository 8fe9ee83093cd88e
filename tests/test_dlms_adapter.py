"""The dlms adapter against the SPODES simulator: over a paced pty (HDLC) and TCP (wrapper).

What must hold: registers per tariff read exactly (scaler applied in
Decimal), the meter's clock, the load profile equal to the simulator's to the
Wh, daily and monthly profiles, the clock shift, and every fault a named,
counted PollError (meter, bus, reason) with nothing of it stored; a wrong
password says "password".
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from adapters import quality
from adapters.base import PollError, ProfileSlot
from adapters.dlms import DlmsAdapter, check_meter, scan
from amr.settings import Settings
from collector.inventory import Meter, parse_inventory, upsert_inventory
from simulators.dlms_sim import HdlcMeterLine, SimMeter, WrapperMeter
from tests.converter import TcpToPty

NOW = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)
TARIFFS = ("1.8.0", "1.8.1", "1.8.2", "1.8.3")


def _now() -> datetime:
    return NOW


def _meter(**keys: Any) -> Meter:
    base: dict[str, Any] = {"id": "spodes-1", "account": "1", "adapter": "dlms", "password": "12345678",
                            "registers": TARIFFS, "timeout": 1.0}
    return Meter(**(base | keys))


@pytest.fixture
def adapter() -> Iterator[DlmsAdapter]:
    a = DlmsAdapter(Settings(), clock_tolerance_s=60, now=_now)
    yield a
    a.close_blocking()


@pytest.fixture
def sim() -> SimMeter:
    return SimMeter(17, "12345678", seed=3, now=_now)


@pytest.fixture
def line(sim: SimMeter) -> Iterator[HdlcMeterLine]:
    with HdlcMeterLine([sim], 9600) as ln:
        yield ln


def _expected(sim: SimMeter, at: datetime) -> dict[str, Decimal]:
    # the simulator's counter in units of 10 Wh, scaled back exactly: kWh with 2 decimals
    return {r: Decimal(sim.register_raw(r, at)) * 10 / 1000 for r in TARIFFS}


def test_registers_per_tariff_and_clock_over_hdlc(adapter: DlmsAdapter, sim: SimMeter, line: HdlcMeterLine) -> None:
    readings = adapter.read_blocking(_meter(port=line.device, physical_address=17))
    assert {r.register: r.value for r in readings} == _expected(sim, NOW)
    assert all(r.ts == NOW and r.quality == frozenset({quality.METER_CLOCK}) for r in readings)
    assert readings[0].source == f"dlms:{line.device}/17"
    assert sum(readings[i].value for i in (1, 2, 3)) <= readings[0].value  # T1..T3 within the total


def test_registers_over_the_tcp_wrapper(adapter: DlmsAdapter) -> None:
    sim = SimMeter(None, "12345678", seed=4, now=_now)
    with WrapperMeter(sim) as w:
        m = _meter(host=w.host, tcp_port=w.port, transport="wrapper")
        readings = adapter.read_blocking(m)
        assert {r.register: r.value for r in readings} == _expected(sim, NOW)
        assert readings[0].source == f"dlms:{w.host}:{w.port}"
        # and the public client (16) reads without a password
        pub = adapter.read_blocking(_meter(id="pub", host=w.host, tcp_port=w.port, transport="wrapper",
                                           password=None, registers=("1.8.0",)))
        assert pub[0].value == _expected(sim, NOW)["1.8.0"]


def test_hdlc_through_a_transparent_tcp_converter(adapter: DlmsAdapter, sim: SimMeter, line: HdlcMeterLine) -> None:
    with TcpToPty(line.device) as relay:
        m = _meter(host="127.0.0.1", tcp_port=relay.port, physical_address=17)  # transport hdlc by default
        assert check_meter(m) == []
        readings = adapter.read_blocking(m)
        assert {r.register: r.value for r in readings} == _expected(sim, NOW)
        assert readings[0].source == f"dlms:127.0.0.1:{relay.port}/17"


def test_wrong_password_says_password_and_reads_nothing(adapter: DlmsAdapter, sim: SimMeter,
                                                        line: HdlcMeterLine) -> None:
    with pytest.raises(PollError) as e:
        adapter.read_blocking(_meter(port=line.device, physical_address=17, password="87654321"))
    msg = str(e.value)
    assert e.value.outcome == "refused"
    assert "password" in msg and "spodes-1" in msg and line.device in msg
    assert "87654321" not in msg and "12345678" not in msg  # no secret in the message
    assert sim.rejected == 1 and sim.associations == 0
    # the same over the wrapper
    with WrapperMeter(SimMeter(None, "12345678", now=_now)) as w:
        with pytest.raises(PollError) as e2:
            adapter.read_blocking(_meter(host=w.host, tcp_port=w.port, transport="wrapper", password="x"))
    assert e2.value.outcome == "refused" and "password" in str(e2.value)


def test_load_profile_equals_the_simulators_to_the_wh(adapter: DlmsAdapter, sim: SimMeter,
                                                      line: HdlcMeterLine) -> None:
    m = _meter(port=line.device, physical_address=17)
    start, end = datetime(2026, 3, 1, 3, 0, tzinfo=UTC), datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    slots = asyncio.run(adapter.read_profile(m, start, end, 100))
    want = [ProfileSlot(start + timedelta(minutes=30 * i), start + timedelta(minutes=30 * (i + 1)), "1.8.0",
                        sim.slot_wh(start + timedelta(minutes=30 * i))) for i in range(12)]
    assert slots == want
    # six hours of slots add up to the register's increase, to the Wh
    assert sum(s.wh or 0 for s in slots) == sim.register_wh("1.8.0", end) - sim.register_wh("1.8.0", start)
    # a limit keeps the oldest
    assert adapter.read_profile_blocking(m, start, end, 5) == want[:5]


def test_a_missing_profile_record_is_absent_not_zero(adapter: DlmsAdapter, sim: SimMeter,
                                                     line: HdlcMeterLine) -> None:
    start = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
    gap = start + timedelta(hours=1)
    sim.faults.add("missing_profile")
    sim.missing_slots.add(gap)
    slots = adapter.read_profile_blocking(_meter(port=line.device, physical_address=17), start,
                                          start + timedelta(hours=3), 48)
    assert len(slots) == 5 and gap not in {s.start for s in slots}
    assert all(s.wh == sim.slot_wh(s.start) for s in slots)


def test_daily_and_monthly_profiles(adapter: DlmsAdapter, sim: SimMeter, line: HdlcMeterLine) -> None:
    m = _meter(port=line.device, physical_address=17)
    days = asyncio.run(adapter.read_daily(m, datetime(2026, 2, 25, tzinfo=UTC), NOW))
    midnights = [datetime(2026, 2, d, 21, 0, tzinfo=UTC) for d in (25, 26, 27, 28)]  # 00:00 Moscow
    assert [d.ts for d in days] == midnights
    for rec in days:
        assert rec.values == _expected(sim, rec.ts)
    months = asyncio.run(adapter.read_monthly(m, datetime(2026, 1, 1, tzinfo=UTC), NOW))
    assert [r.ts for r in months] == [datetime(2026, 1, 31, 21, 0, tzinfo=UTC), datetime(2026, 2, 28, 21, 0, tzinfo=UTC)]
    assert months[-1].values == days[-1].values


def test_clock_far_off_is_flagged_and_corrected(adapter: DlmsAdapter, sim: SimMeter, line: HdlcMeterLine) -> None:
    m = _meter(port=line.device, physical_address=17)
    sim.clock_offset_s = -40.0
    readings = adapter.read_blocking(m)
    assert all(r.quality == frozenset({quality.METER_CLOCK}) for r in readings)  # within 60 s
    sim.clock_offset_s = -3600.0
    readings = adapter.read_blocking(m)
    assert all(r.quality == frozenset({quality.CLOCK_SKEW}) and r.ts == NOW for r in readings)
    asyncio.run(adapter.correct_clock(m, 30))  # shift_time (method 6)
    assert sim.clock_shifts == [30.0] and sim.clock_offset_s == -3570.0
    asyncio.run(adapter.correct_clock(m, 3570))  # beyond shift_time's ±900 s: the time is set
    assert abs(sim.clock_offset_s) < 1.0


@pytest.mark.parametrize(("fault", "outcome"), [("bad_crc", "crc"), ("garbage", "garbage"), ("silent", "timeout")])
def test_faults_are_named_poll_errors(adapter: DlmsAdapter, sim: SimMeter, line: HdlcMeterLine,
                                      fault: str, outcome: str) -> None:
    sim.faults.add(fault)
    with pytest.raises(PollError) as e:
        adapter.read_blocking(_meter(port=line.device, physical_address=17, timeout=0.3))
    assert e.value.outcome == outcome
    assert "spodes-1" in str(e.value) and line.device in str(e.value) and "physical address 17" in str(e.value)


def test_a_bus_of_meters_and_scan(adapter: DlmsAdapter) -> None:
    sims = [SimMeter(17 + i, "12345678", seed=10 + i, serial=f"SN{i:06d}", now=_now) for i in range(3)]
    with HdlcMeterLine(sims, 9600) as ln:
        for s in sims:
            got = adapter.read_blocking(_meter(id=f"m{s.physical_address}", port=ln.device,
                                               physical_address=s.physical_address))
            assert {r.register: r.value for r in got} == _expected(s, NOW)
        found = scan(adapter, device=ln.device, host=None, tcp_port=None, baudrate=9600,
                     addresses=[16, 17, 18, 19, 20], timeout=0.2)
    assert [(f["physical_address"], f["serial"]) for f in found] == [(17, "SN000000"), (18, "SN000001"),
                                                                      (19, "SN000002")]


def test_inventory_keys_are_checked() -> None:
    assert check_meter(_meter(port="/dev/ttyUSB0")) == []
    assert check_meter(_meter(host="10.0.0.5", tcp_port=4059, transport="wrapper")) == []
    problems = check_meter(_meter(port=None, transport="wrapper", registers=("9.9.9",)))
    assert any("'host'" in p for p in problems) and any("'registers'" in p for p in problems)
    assert any("'port'" in p for p in problems)


def test_gateway_stores_good_meters_and_counts_the_refused_one(db_url: str, conn) -> None:
    from amr import metrics
    from collector.gateway.daemon import Adapters, IngestSink
    from collector.gateway.scheduler import Scheduler, slot_start

    t0 = datetime.now(UTC).replace(microsecond=0)
    sims = [SimMeter(17 + i, "12345678", seed=20 + i, now=lambda: t0) for i in range(3)]
    with HdlcMeterLine(sims, 9600) as ln:
        meters = [_meter(id=f"dlms-{s.physical_address}", port=ln.device, physical_address=s.physical_address,
                         interval="60s", password="wrong-one" if i == 1 else "12345678")
                  for i, s in enumerate(sims)]
        upsert_inventory(conn, parse_inventory({
            "subscriber": [{"account": "1"}],
            "meter": [m.model_dump(mode="json", exclude_none=True) | {"interval": "60s"} for m in meters],
        }))
        conn.commit()
        adapters = Adapters(Settings())
        sink = IngestSink(db_url, Settings())
        sched = Scheduler(meters, adapters, sink, jitter_s=0, retry_delay_s=0.2, backoff_after=100)
        refused = metrics.POLLS.labels("dlms", ln.device, "refused")
        before = refused._value.get()

        async def one_slot() -> Any:
            try:
                slot = slot_start(datetime.now(UTC), timedelta(seconds=60))
                return await asyncio.wait_for(sched.run_slot(meters, slot, timedelta(seconds=3)), timeout=30)
            finally:
                await adapters.close()

        report = asyncio.run(one_slot())
        sink.close()
    assert sorted(report.read) == ["dlms-17", "dlms-19"]
    assert "password" in report.missed["dlms-18"] and ln.device in report.missed["dlms-18"]
    assert refused._value.get() - before >= 1
    rows = conn.execute("SELECT meter_id, register, value, ts FROM reading ORDER BY meter_id, register").fetchall()
    assert {r[0] for r in rows} == {"dlms-17", "dlms-19"}
    for s in (sims[0], sims[2]):
        stored = {r[1]: r[2] for r in rows if r[0] == f"dlms-{s.physical_address}"}
        assert stored == _expected(s, t0)


def test_the_example_inventory_passes_the_gateway_check() -> None:
    from pathlib import Path

    from collector.gateway.daemon import check_inventory

    inv = check_inventory(Path(__file__).resolve().parent.parent / "deploy" / "examples" / "inventory-dlms.toml")
    assert {m.adapter for m in inv.meters.values()} == {"dlms"}
    assert inv.meters["spodes-0003"].transport == "wrapper"
    assert inv.meters["spodes-0001"].physical_address == 17


def test_a_dropped_link_is_named(sim: SimMeter, line: HdlcMeterLine) -> None:
    from adapters.dlms import HdlcSession, SerialStream, _Fail

    stream = SerialStream(line.device, 9600)
    try:
        session = HdlcSession(stream, 32, 1, 17, 1.0)  # no SNRM: the meter is in disconnected mode
        with pytest.raises(_Fail) as e:
            session.request(b"\xc0\x01\xc1\x00\x08\x00\x00\x01\x00\x00\xff\x02\x00")
        assert e.value.outcome == "refused" and "DM" in str(e.value)
    finally:
        stream.close()


def test_a_small_negotiated_frame_size_segments_both_ways(adapter: DlmsAdapter) -> None:
    sim = SimMeter(17, "12345678", seed=6, now=_now)
    with HdlcMeterLine([sim], 9600, max_info=32) as ln:  # the UA says 32 bytes: the AARQ goes in three frames
        m = _meter(port=ln.device, physical_address=17)
        readings = adapter.read_blocking(m)
        assert {r.register: r.value for r in readings} == _expected(sim, NOW)
        start = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
        slots = adapter.read_profile_blocking(m, start, start + timedelta(hours=2), 48)
        assert [s.wh for s in slots] == [sim.slot_wh(start + timedelta(minutes=30 * k)) for k in range(4)]
        assert adapter.last_wire.frames > 20
