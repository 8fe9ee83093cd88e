"""The Mercury adapter against the simulator on a paced pty and over TCP, an independent
client against the simulator, the adapter against a published frame dump, faults, the
load profile back to the watt-hour, clock correction, `amr poll`, `amr scan --mercury`
and the gateway's back-fill of six missed hours (issue 16, "What must hold").
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import ClassVar

import pytest

from adapters import mercury as mc
from adapters import quality
from adapters.base import PollError
from adapters.mercury_adapter import LineMeter, MercuryAdapter, check_meter
from adapters.reading import Reading, Rejected
from amr import metrics
from amr.settings import Settings
from collector.gateway.scheduler import Scheduler
from collector.ingest.ingestor import Ingestor
from collector.inventory import Meter, parse_inventory, upsert_inventory
from simulators.mercury_sim import MercuryBus, MercuryLineSim, MercurySimMeter, MercuryTcpSim
from simulators.serial_line import PtyLine

T0 = datetime(2026, 11, 10, 0, 0, tzinfo=UTC)
HALF = timedelta(minutes=30)
V2_REGS = ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "1.8.4", "3.8.0")


@dataclass
class Frozen:
    """One clock for the meters, the adapter and the scheduler, moved by the test."""

    t: datetime

    def now(self) -> datetime:
        return self.t


def meter(port: str | None = None, **kw: object) -> Meter:
    keys: dict[str, object] = {"id": "mc1", "account": "1", "adapter": "mercury230", "port": port, "address": "5",
                               "registers": V2_REGS, "timeout": 0.3}
    keys.update(kw)
    return Meter.model_validate(keys)


@pytest.fixture
def clock() -> Frozen:
    return Frozen(T0 + timedelta(minutes=7, seconds=13))


@pytest.fixture
def adapter(clock: Frozen):  # type: ignore[no-untyped-def]
    a = MercuryAdapter(Settings(), now=clock.now)
    yield a
    a.close_blocking()


def _expect_v2(sm: MercurySimMeter, t: datetime) -> dict[str, Decimal]:
    out = {f"1.8.{k}": mc.kwh(sm.energy(t, k)[0] or 0) for k in range(5)}
    out["3.8.0"] = mc.kwh(sm.energy(t, 0)[2] or 0)
    return out


# --- reading over a pty and over TCP ---------------------------------------------------------


def test_v2_over_a_paced_pty_reads_the_simulators_counters(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(5, seed=3)
    with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
        readings = adapter.read_blocking(meter(sim.device))
    assert {r.register: r.value for r in readings} == _expect_v2(sm, clock.t)
    assert all(r.ts == clock.t and r.quality == frozenset({quality.METER_CLOCK}) for r in readings)
    assert all(r.source == f"mercury230:{sim.device}/5" for r in readings)
    assert sm.opens == 1 and sm.channel_level == 0  # the channel was opened and closed again


def test_v2_over_a_transparent_tcp_converter(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(7, seed=4)
    with MercuryTcpSim(MercuryBus([sm], now=clock.now)) as tcp:
        m = meter(None, host=tcp.host, tcp_port=tcp.port, address="7")
        assert check_meter(m) == [] and m.bus_name == f"{tcp.host}:{tcp.port}"
        first = adapter.read_blocking(m)
        second = adapter.read_blocking(m)
        assert tcp.connections == 1  # one connection per converter, kept
    assert {r.register: r.value for r in first} == _expect_v2(sm, clock.t) == {r.register: r.value for r in second}


def test_v1_over_pty_and_tcp(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(12345678, family="v1", seed=5)
    bus = MercuryBus([sm], now=clock.now)
    t1, t2, t3, t4 = (Decimal(v).scaleb(-2) for v in sm.v1_energy(clock.t))
    want = {"1.8.0": t1 + t2 + t3 + t4, "1.8.1": t1, "1.8.2": t2, "1.8.3": t3, "1.8.4": t4}
    with MercuryLineSim(bus) as sim, MercuryTcpSim(bus) as tcp:
        for m in (meter(sim.device, adapter="mercury200", address="12345678", registers=tuple(want)),
                  meter(None, adapter="mercury200", address="12345678", registers=tuple(want),
                        host=tcp.host, tcp_port=tcp.port)):
            readings = adapter.read_blocking(m)
            assert {r.register: r.value for r in readings} == want
            assert all(r.ts == clock.t for r in readings)


def test_v1_and_v2_share_one_line(adapter: MercuryAdapter, clock: Frozen) -> None:
    v2, v1 = MercurySimMeter(5, seed=6), MercurySimMeter(30000001, family="v1", seed=7)
    with MercuryLineSim(MercuryBus([v2, v1], now=clock.now)) as sim:
        a = adapter.read_blocking(meter(sim.device))
        b = adapter.read_blocking(meter(sim.device, id="mc2", adapter="mercury200", address="30000001",
                                        registers=("1.8.0",)))
    assert a[0].value == _expect_v2(v2, clock.t)["1.8.0"]
    assert b[0].value == sum(Decimal(v).scaleb(-2) for v in v1.v1_energy(clock.t))


# --- an independent implementation --------------------------------------------------------------


def test_mercury_base_reads_the_v1_simulator(clock: Frozen) -> None:
    """webtoucher/mercury-base 1.6 (BSD-3), a client written from the Incotex document by someone
    else, reads our v1 simulator over a pty and over TCP: serial number, model, energy T1..T4."""
    mb = pytest.importorskip("mercury_base")  # a dev dependency (pyproject [dev])
    sm = MercurySimMeter(12345678, family="v1", serial="12345678", seed=8)
    bus = MercuryBus([sm], now=clock.now)
    want = [v / 100 for v in sm.v1_energy(clock.t)]
    with MercuryLineSim(bus) as sim, MercuryTcpSim(bus) as tcp:
        for transport in (mb.SerialDataTransport(sim.device), mb.TcpDataTransport(tcp.host, tcp.port)):
            try:
                m = mb.Meter(12345678, transport)
                assert m.serial_number == 12345678 and m.model == "206"
                assert m.command("get_energy_accumulators") == want
            finally:
                # its TCP transport's socket thread spins until told to disconnect, and is not a daemon:
                # left running it takes a core and keeps the test process from ever exiting
                client = getattr(transport, "_TcpDataTransport__connection", None)
                if client is not None:
                    client.disconnect()


class _Replay(threading.Thread):
    """A line that answers the published frames of wirenboard/wb-mqtt-serial's
    test/TEMDeviceTest.Mercury230ReadEnergy.dat and Mercury230Exception.dat, and keeps what it got."""

    ANSWERS: ClassVar[dict[bytes, bytes]] = {
        bytes.fromhex("00 01 01 01 01 01 01 01 01 77 81"): bytes.fromhex("00 00 01 B0"),
        bytes.fromhex("00 05 00 00 10 25"): bytes.fromhex("00 30 00 28 C5 FF FF FF FF 04 00 9C 95 FF FF FF FF 44 AB"),
    }
    INTERNAL_ERROR: ClassVar[bytes] = bytes.fromhex("00 02 80 71")

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.line = PtyLine(9600)
        self.got: list[bytes] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            req = self.line.read_until_silence(0.006, 0.2)
            if req:
                self.got.append(req)
                self.line.write(self.ANSWERS.get(req, self.INTERNAL_ERROR))


def test_adapter_sends_and_reads_the_published_wb_dump(adapter: MercuryAdapter) -> None:
    """Our requests are byte for byte those of wb-mqtt-serial's dump for address 0 with the factory
    password; its energy answer decodes to 3196.2 kWh; its internal-error answer to our clock
    request fails the poll, named."""
    replay = _Replay()
    replay.start()
    try:
        m = LineMeter(port=replay.line.device, timeout=0.3)  # address 0, the factory password in digits

        def exchange(link):  # type: ignore[no-untyped-def]
            energy = adapter._ask(m, link, mc.energy_request(0), mc.parse_energy, "energy")
            with pytest.raises(PollError) as e:
                adapter._ask(m, link, mc.clock_request(0), mc.parse_clock, "clock")
            assert e.value.outcome == "exception" and "clock" in str(e.value) and "internal error" in str(e.value)
            return energy

        got = adapter._with_link(m, lambda link: adapter._session(m, link, lambda: exchange(link)))
        assert replay.got[:2] == list(_Replay.ANSWERS)
        assert got.values == (3_196_200, None, 300_444, None)
    finally:
        replay.stop.set()
        replay.join(2)
        replay.line.close()


# --- faults: counted, named, no reading --------------------------------------------------------


def test_wrong_password_says_password(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(5, password="654321")
    with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
        with pytest.raises(PollError) as e:
            adapter.read_blocking(meter(sim.device))
        assert e.value.outcome == "refused" and "password" in str(e.value) and "mc1" in str(e.value)
        assert "654321" not in str(e.value) and "111111" not in str(e.value)  # no secret in the message
        assert sim.device in str(e.value) and sm.refused_opens == 1
        # the right password in the other encoding is refused too, and the message says which to try
        sm.password, sm.password_encoding = "111111", "ascii"
        with pytest.raises(PollError) as e:
            adapter.read_blocking(meter(sim.device))
        assert "password_encoding" in str(e.value) and "try ascii" in str(e.value)
        assert adapter.read_blocking(meter(sim.device, password_encoding="ascii"))


def test_not_measured_is_an_error_never_a_huge_reading(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(5, one_direction=True)
    with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
        with pytest.raises(PollError) as e:
            adapter.read_blocking(meter(sim.device, registers=("1.8.0", "2.8.0")))
        assert e.value.outcome == "decode" and "2.8.0" in str(e.value) and "FFFFFFFF" in str(e.value)
        sm.one_direction = False
        got = {r.register: r.value for r in adapter.read_blocking(meter(sim.device, registers=("1.8.0", "2.8.0")))}
        assert got["2.8.0"] == mc.kwh(sm.energy(clock.t, 0)[1] or 0) < 10_000


@pytest.mark.parametrize(("fault", "outcome", "words"), [
    ("silent", "timeout", "no answer to the channel open"),
    ("bad_crc", "crc", "CRC mismatch"),
    ("garbage", "garbage", "channel open"),
    ("channel_timeout", "exception", "channel not open"),
    ("slow", "timeout", "no answer"),
])
def test_faults_are_named_poll_errors(adapter: MercuryAdapter, clock: Frozen, fault: str, outcome: str,
                                      words: str) -> None:
    sm = MercurySimMeter(5, fault=fault)
    with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
        with pytest.raises(PollError) as e:
            adapter.read_blocking(meter(sim.device))
        assert e.value.outcome == outcome and words in str(e.value)
        assert f"meter mc1 on {sim.device} (address 5)" in str(e.value)
        sm.fault = None  # the line is usable again at once: no stale answer is taken for the next one
        if fault == "slow":
            import time

            # its late answer (2 s after the request) is gone before the next read: the protocol numbers
            # no frames, so an answer arriving inside the next exchange would pass for that one's, and a
            # busy machine delays the simulator's write
            time.sleep(3.0)
        assert len(adapter.read_blocking(meter(sim.device))) == len(V2_REGS)


def test_a_clock_far_off_is_flagged_and_our_time_kept(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(5, fault="clock_far")
    with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
        readings = adapter.read_blocking(meter(sim.device))
    assert all(r.ts == clock.t and quality.CLOCK_SKEW in r.quality for r in readings)
    assert adapter.clock_offset(meter()) == pytest.approx(7200, abs=1)


def test_bad_inventory_keys_are_refused_with_the_key() -> None:
    problems = check_meter(meter("/dev/ttyUSB0", address="241", password="12"))
    assert any("'address'" in p and "1..240" in p for p in problems)
    assert any("password" in p for p in problems) and not any("12'" in p for p in problems)
    assert any("'port'" in p for p in check_meter(meter(None)))
    assert any("'registers'" in p for p in check_meter(meter("/dev/x", registers=("9.9.9",))))


# --- the load profile and the clock ------------------------------------------------------------------


def test_profile_read_back_equals_the_simulator_to_the_wh(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(5, seed=9, profile_from=T0 - timedelta(days=100))  # records past 0xFFFF (memory 0x83)
    sm.missing_profile = {T0 - 4 * HALF}  # the meter was off for that half-hour: no record
    with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
        m = meter(sim.device, registers=("1.8.0",))
        slots = adapter.read_profile_blocking(m, T0 - 12 * HALF, T0 + HALF, 48)
        capped = adapter.read_profile_blocking(m, T0 - 12 * HALF, T0, 5)
    assert [s.start for s in slots] == [T0 - k * HALF for k in range(12, 0, -1)]  # the last complete one ends at T0
    assert all(s.end - s.start == HALF and s.register == "1.8.0" for s in slots)
    assert [s.wh for s in slots] == [sm.slot_wh(s.start) for s in slots]  # None where no record
    assert slots[8].wh is None and all(s.wh is not None and s.wh > 0 for s in slots if s.start != T0 - 4 * HALF)
    assert [s.start for s in capped] == [T0 - k * HALF for k in range(12, 7, -1)]  # the oldest first, at most 5
    assert sm.profile_reads <= 12 + 5 + 2


def test_clock_correction_within_four_minutes_once_a_day(adapter: MercuryAdapter, clock: Frozen) -> None:
    sm = MercurySimMeter(5, clock_offset_s=-100)
    with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
        m = meter(sim.device)
        with pytest.raises(PollError, match=r"beyond the meter's \+-240 s"):
            adapter.correct_clock_blocking(m, 300)
        adapter.correct_clock_blocking(m, 100)
        assert sm.clock_offset_s == 0 and len(sm.corrections) == 1
        with pytest.raises(PollError, match="already corrected today"):
            adapter.correct_clock_blocking(m, 10)
    assert adapter.clock_step_limit(m) == 240 and adapter.has_profile(m)


# --- amr scan --mercury and amr poll -------------------------------------------------------------------


def test_scan_finds_a_single_meter_and_says_when_several_collide(clock: Frozen, capsys) -> None:
    from amr.cli import main

    one = MercurySimMeter(56, serial="43728456")
    with MercuryLineSim(MercuryBus([one], now=clock.now)) as sim:
        assert main(["scan", "--mercury", "--device", sim.device, "--json"]) == 0
        out = capsys.readouterr().out
        assert '"address": 56' in out and '"serial": "43728456"' in out
    two = [MercurySimMeter(56, serial="43728456"), MercurySimMeter(48, serial="40680048")]
    with MercuryLineSim(MercuryBus(two, now=clock.now)) as sim:
        assert main(["scan", "--mercury", "--device", sim.device]) == 2
        err = capsys.readouterr().err
        assert "collide" in err and "single meter" in err


def test_amr_poll_reads_a_mercury_once(tmp_path, clock: Frozen, capsys) -> None:
    from amr.cli import main

    sm = MercurySimMeter(5, seed=10, one_direction=True, transformer=(100, 40))
    with MercuryLineSim(MercuryBus([sm])) as sim:
        inv = tmp_path / "inv.toml"
        inv.write_text(
            '[[subscriber]]\naccount = "1"\n\n[[meter]]\nid = "mc1"\naccount = "1"\nadapter = "mercury230"\n'
            f'port = "{sim.device}"\naddress = "5"\nregisters = ["1.8.0", "1.8.1"]\n', encoding="utf-8")
        assert main(["poll", "mc1", "--inventory", str(inv)]) == 0
    out = capsys.readouterr().out
    assert "mercury230" in out and "address 5" in out and "meter clock" in out
    assert "2.8.0" in out and "not measured" in out  # A- of a one-direction meter, shown, not a number
    assert "transformer_ratio_u" in out and " 100" in out and " 40" in out
    assert "111111" not in out


# --- the gateway: six missed hours read back from the profile -----------------------------------------


class DbSink:
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self.items: list[Reading | Rejected] = []

    def put(self, items: list[Reading | Rejected]) -> None:
        self.items += items
        self.ingestor.ingest(items)


def test_gateway_reads_six_missed_hours_back_from_the_mercury_profile(conn) -> None:
    clock = Frozen(T0)
    adapter = MercuryAdapter(Settings(), now=clock.now)
    sm = MercurySimMeter(5, seed=11)
    try:
        with MercuryLineSim(MercuryBus([sm], now=clock.now)) as sim:
            inv = parse_inventory({
                "subscriber": [{"account": "1"}],
                "meter": [{"id": "mbf", "account": "1", "adapter": "mercury230", "port": sim.device,
                           "address": "5", "registers": ["1.8.0"], "interval": "30m", "timeout": 0.3,
                           "backfill_slots": 48}],
            })
            upsert_inventory(conn, inv)
            conn.commit()
            m = inv.meters["mbf"]
            sink = DbSink(Ingestor(conn, Settings()))
            sched = Scheduler([m], lambda _: adapter, sink, jitter_s=0, retry_delay_s=3600, now=clock.now)
            filled = metrics.BACKFILL_SLOTS.labels("mercury230", m.bus_name, "filled")
            before = filled._value.get()

            async def scenario() -> None:
                for k, fault in ((0, None), (1, None), (2, "silent"), (13, None)):
                    sm.fault = fault
                    clock.t = T0 + k * HALF
                    await sched.run_slot([m], clock.t, HALF)

            asyncio.run(scenario())
            assert sched.reports[2].missed
            assert filled._value.get() - before == 11
        rows = conn.execute(
            "SELECT start_ts, end_ts, kwh, estimated FROM interval_usage WHERE meter_id = 'mbf'"
            " AND register = '1.8.0' AND start_ts >= %s AND end_ts <= %s ORDER BY start_ts",
            (T0 + HALF, T0 + 13 * HALF),
        ).fetchall()
        assert [(r[0], r[1]) for r in rows] == [(T0 + k * HALF, T0 + (k + 1) * HALF) for k in range(1, 13)]
        assert [int(r[2] * 1000) for r in rows] == [sm.slot_wh(T0 + k * HALF) for k in range(1, 13)]
        assert not any(r[3] for r in rows)
        flagged = conn.execute(
            "SELECT count(*) FROM reading WHERE meter_id = 'mbf' AND 'from_profile' = ANY(quality)").fetchone()[0]
        assert flagged == 11
    finally:
        adapter.close_blocking()


def test_simulator_command_line_help() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "simulators.mercury_sim", "--help"], capture_output=True,
                         text=True, timeout=30, check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert "--tcp" in out and "--password-encoding" in out
