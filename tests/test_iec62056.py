"""IEC 62056-21 mode C: the adapter against simulated meters on paced pseudo-terminals."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import quality
from adapters.base import PollError
from adapters.iec62056 import (
    ACK,
    ETX,
    IDENT_MAX,
    READOUT_MAX,
    STX,
    FrameError,
    Iec62056Adapter,
    bcc,
    bcc_sum7,
    check_meter,
    command_message,
    data_message,
    from_line,
    identification,
    message_deadline,
    parse_data_message,
    parse_frame,
    to_line,
)
from adapters.obis import ObisError, normalise, parse_data_block
from amr.settings import Settings
from collector.inventory import Meter, parse_inventory, upsert_inventory
from simulators.consumption import SimClock
from simulators.iec62056_sim import REGISTERS, IecLineSim, SimMeter
from tests.conftest import ROOT

ALL = REGISTERS


def _meter(sim: IecLineSim, mid: str = "m1", address: str = "", **kw: object) -> Meter:
    fields: dict[str, object] = {
        "id": mid, "account": "1", "adapter": "iec62056", "port": sim.device,
        "baudrate": sim.baudrate, "registers": ALL, "timeout": 1.0,  # generous: CI is loaded
    }
    if address:
        fields["address"] = address
    fields.update(kw)
    return Meter.model_validate(fields)


@pytest.fixture
def adapter():
    a = Iec62056Adapter(Settings())
    yield a
    a.close_blocking()


def _values(readings):
    return {r.register: r.value for r in readings}


# --- framing and OBIS (pure) ---------------------------------------------------------


def test_bcc_and_data_message_roundtrip() -> None:
    msg = data_message("1.8.0(000123.45*kWh)\r\n")
    assert msg[:1] == STX and msg[-2:-1] == ETX
    assert bcc(msg[1:-1]) == msg[-1:]
    assert "1.8.0(000123.45*kWh)" in parse_data_message(msg)
    with pytest.raises(FrameError) as e:
        parse_data_message(msg[:-1] + bytes((msg[-1] ^ 1,)))
    assert e.value.outcome == "crc"
    with pytest.raises(FrameError) as e:
        parse_data_message(b"xx" + msg)
    assert e.value.outcome == "garbage"


@settings(max_examples=200, deadline=None)
@given(
    command=st.sampled_from(["P1", "R1", "W1"]),
    data=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    rule=st.sampled_from([bcc, bcc_sum7]),
    flip=st.integers(min_value=0),
)
def test_frames_roundtrip_and_single_bit_errors_are_caught(command, data, rule, flip) -> None:
    msg = command_message(command, data, rule)
    assert parse_frame(msg, rule) == (command, data)
    # flip one of the 7 data bits of one byte after SOH up to ETX: both rules catch it
    body_len = len(msg) - 2
    pos, bit = 1 + flip % body_len, (flip // body_len) % 7
    bad = bytearray(msg)
    bad[pos] ^= 1 << bit
    with pytest.raises(FrameError):
        parse_frame(bytes(bad), rule)


def test_parity_bit_is_even_and_checked() -> None:
    line = to_line(b"/?!\r\n")
    assert all(bin(b).count("1") % 2 == 0 for b in line)
    assert from_line(line) == (b"/?!\r\n", 0)
    assert from_line(bytes((line[0] ^ 0x80,)) + line[1:])[1] == 1


def test_obis_units_prefixes_and_errors() -> None:
    sets = parse_data_block(
        "1-0:1.8.0*255(0012345.678*kWh)\r\n1.8.1(4000500*Wh)2.8.0(0.5*MWh)\r\n99.9.9(7)\r\n"
    )
    assert sets["1.8.0"].value == Decimal("12345.678")
    assert sets["1.8.1"].value == Decimal("4000.500")
    assert sets["2.8.0"].value == Decimal("500.0")
    assert "99.9.9" not in sets
    assert normalise("1-0:1.8.2&01") == "1.8.2"
    with pytest.raises(ObisError, match=r"1\.8\.0.*unit"):
        parse_data_block("1.8.0(12.5*kW)")
    with pytest.raises(ObisError, match="not a decimal"):
        parse_data_block("1.8.0(12,5*kWh)")


# --- against the simulator --------------------------------------------------------------


def test_readout_with_baud_change_equals_simulator_state(adapter: Iec62056Adapter) -> None:
    with IecLineSim([SimMeter(seed=7)], baudrate=300) as sim:
        m = _meter(sim)
        t0 = time.perf_counter()
        ro = adapter.readout(m)
        elapsed = time.perf_counter() - t0
        readings = adapter.readings(m, ro)
        truth = sim.meters[0].last
        assert truth is not None
        assert ro.baudrate == 9600
        assert [b for _, b in ro.line_bytes] == [300, 300, 300, 9600]
        # the line's timing is real: the exchange cannot beat the bytes it moved
        assert elapsed >= ro.line_seconds() * 0.98
        assert _values(readings) == truth.values
        assert truth.values["1.8.0"] > 1000
        for r in readings:
            assert r.ts == truth.clock and r.ts.tzinfo is not None
            assert r.quality == frozenset({quality.METER_CLOCK})
            assert r.meter_id == "m1" and r.source.startswith("iec62056:")


def test_meter_proposing_a_lower_rate_is_read_at_that_rate(adapter: Iec62056Adapter) -> None:
    # an addressed sign-on at 300 baud outlasts the simulator's idle poll: it must still be heard
    meter = SimMeter(address="12345678", seed=2, max_baud=2400, in_wh=True)
    with IecLineSim([meter], baudrate=300) as sim:
        m = _meter(sim, address="12345678")
        ro = adapter.readout(m)
        assert ro.baudrate == 2400
        truth = sim.meters[0].last
        assert _values(adapter.readings(m, ro)) == truth.values  # Wh converted to kWh


def test_multidrop_each_address_reads_its_own_meter(adapter: Iec62056Adapter) -> None:
    meters = [SimMeter(address=f"{i:08d}", serial_number=f"S{i}", seed=10 + i) for i in (1, 2, 3)]
    with IecLineSim(meters, baudrate=9600) as sim:
        for sm in meters:
            readings = adapter.read_blocking(_meter(sim, f"m{sm.address}", sm.address))
            assert sm.last is not None and sm.readouts == 1
            assert _values(readings) == sm.last.values
        got = [sm.last.values["1.8.0"] for sm in meters if sm.last]
        assert len(set(got)) == 3  # three different meters, not one answering thrice
        # a bare sign-on on a shared line makes every meter answer: a collision
        with pytest.raises(PollError) as e:
            adapter.read_blocking(_meter(sim, "bare"))
        assert e.value.outcome in ("garbage", "crc")


def test_async_read_does_not_block_the_event_loop(adapter: Iec62056Adapter) -> None:
    async def run(sim: IecLineSim) -> tuple[int, list]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        readings = await asyncio.wait_for(adapter.read(_meter(sim)), timeout=10)
        stop.set()
        await task
        return ticks, readings

    with IecLineSim([SimMeter(seed=4)], baudrate=300) as sim:
        ticks, readings = asyncio.run(run(sim))
        assert _values(readings) == sim.meters[0].last.values
        assert ticks >= 30  # the readout takes > 1 s at 300 baud; the loop kept ticking


@pytest.mark.parametrize(
    "fault,outcome",
    [("no_answer", "timeout"), ("slow", "timeout"), ("bad_bcc", "crc"), ("garbage", "garbage")],
)
def test_fault_gives_named_error_and_no_reading(
    adapter: Iec62056Adapter, fault: str, outcome: str
) -> None:
    # slow: later than the standard's 1.5 s reaction time, which the identification is awaited for
    faulty = SimMeter(address="00000002", seed=2, fault=fault, slow_s=1.8)
    good = SimMeter(address="00000001", seed=1)
    with IecLineSim([good, faulty], baudrate=9600) as sim:
        m = _meter(sim, "bad-meter", "00000002", timeout=0.3)
        with pytest.raises(PollError) as e:
            adapter.read_blocking(m)
        assert e.value.outcome == outcome
        assert "bad-meter" in str(e.value) and sim.device in str(e.value)
        if fault == "slow":
            time.sleep(1.8)  # let the late answer pass before the next poll
        # the other meter on the line still reads, and the faulty one recovers when fixed
        assert _values(adapter.read_blocking(_meter(sim, "ok", "00000001"))) == good.last.values
        faulty.fault = None
        recovered = adapter.read_blocking(m.model_copy(update={"timeout": 1.0}))
        assert _values(recovered) == faulty.last.values


def test_slow_answer_within_timeout_is_read(adapter: Iec62056Adapter) -> None:
    with IecLineSim([SimMeter(seed=5, fault="slow", slow_s=0.2)], baudrate=9600) as sim:
        readings = adapter.read_blocking(_meter(sim, timeout=0.6))
        assert _values(readings) == sim.meters[0].last.values


def test_clock_drift_is_flagged_and_our_time_kept(adapter: Iec62056Adapter) -> None:
    with IecLineSim([SimMeter(seed=6, fault="clock_drift", clock_drift_s=600)], baudrate=9600) as sim:
        before = datetime.now(UTC)
        readings = adapter.read_blocking(_meter(sim))
        after = datetime.now(UTC)
        truth = sim.meters[0].last
        assert truth.clock - truth.t > timedelta(seconds=590)
        for r in readings:
            assert quality.CLOCK_SKEW in r.quality and quality.METER_CLOCK not in r.quality
            assert before <= r.ts <= after
        assert _values(readings) == truth.values


def test_missing_register_and_missing_port_are_named(adapter: Iec62056Adapter) -> None:
    with IecLineSim([SimMeter(seed=6)], baudrate=9600) as sim:
        with pytest.raises(PollError) as e:
            adapter.read_blocking(_meter(sim, registers=("1.8.0", "1.8.4")))
        assert e.value.outcome == "decode" and "1.8.4" in str(e.value)
    m = Meter(id="gone", account="1", adapter="iec62056", port="/dev/nonexistent-tty", timeout=0.2)
    with pytest.raises(PollError) as e:
        adapter.read_blocking(m)
    assert e.value.outcome == "refused" and "gone" in str(e.value)


def test_check_meter_names_each_bad_key() -> None:
    ok = Meter(id="a", account="1", adapter="iec62056", port="/dev/ttyUSB0", baudrate=300,
               address="12345678", registers=("1.8.0", "1.8.2"))
    assert check_meter(ok) == []
    bad = Meter(id="b", account="1", adapter="iec62056", port=502, baudrate=57600,
                address="no/slash", registers=("1.8.0", "32.7.0"))
    problems = check_meter(bad)
    assert [p.split(":")[0] for p in problems] == [
        "key 'port'", "key 'baudrate'", "key 'address'", "key 'registers'"
    ]
    assert "32.7.0" in problems[-1]


def _inventory(conn, rollover: Decimal) -> None:
    inv = parse_inventory({
        "subscriber": [{"account": "1"}],
        "meter": [{
            "id": "m1", "account": "1", "adapter": "iec62056", "port": "/dev/null",
            "rollover": str(rollover), "max_power_kw": "30", "interval": "30m",
        }],
    })
    upsert_inventory(conn, inv)
    conn.commit()


@pytest.mark.parametrize("fault,flag", [("counter_reset", quality.RESET), ("rollover", quality.ROLLOVER)])
def test_counter_reset_and_rollover_reach_validation_flagged(conn, fault: str, flag: str) -> None:
    from collector.ingest.ingestor import Ingestor

    # a day of simulated time per wall second, starting two days ago, so that the
    # counters move between two polls and the meter's clock stays in the past
    clock = SimClock(datetime.now(UTC) - timedelta(days=2), scale=86400)
    adapter = Iec62056Adapter(Settings(), clock_tolerance_s=10 * 86400)
    try:
        with IecLineSim([SimMeter(seed=8)], baudrate=9600, clock=clock) as sim:
            meter = _meter(sim, registers=("1.8.0",))
            first = adapter.read_blocking(meter)
            v1 = first[0].value
            sm = sim.meters[0]
            if fault == "rollover":
                sm.rollover_at = v1.to_integral_value() + 1
                _inventory(conn, sm.rollover_at)
            else:
                _inventory(conn, Decimal(1_000_000))
            sm.set_fault(fault, clock.now())
            time.sleep(0.3)
            second = adapter.read_blocking(meter)
        assert second[0].value < v1  # the counter went backwards on the wire
        assert second[0].value == sm.last.values["1.8.0"]
        result = Ingestor(conn, Settings()).ingest(first + second)
        assert result.accepted == 2
        rows = conn.execute(
            "SELECT value, quality FROM reading WHERE meter_id = 'm1' ORDER BY ts"
        ).fetchall()
        assert [r[0] for r in rows] == [v1, second[0].value]
        assert flag in rows[1][1]
        negative = conn.execute("SELECT count(*) FROM interval_usage WHERE kwh < 0").fetchone()[0]
        assert negative == 0
        kinds = {r[0] for r in conn.execute("SELECT kind FROM interval_usage").fetchall()}
        assert kinds <= {"rollover", "reset", "normal", "gap"} and kinds & {flag}
    finally:
        adapter.close_blocking()


def test_simulator_command_line_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "simulators.iec62056_sim", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "--fault" in out and "no_answer" in out and "--baud" in out


def test_example_inventory_is_valid() -> None:
    from collector.inventory import load_inventory

    inv = load_inventory(ROOT / "deploy" / "examples" / "inventory-iec62056.toml")
    iec = [m for m in inv.meters.values() if m.adapter == "iec62056"]
    assert len(iec) == 3
    assert all(check_meter(m) == [] for m in iec)
    assert len({m.bus_name for m in iec}) == 2  # two meters share a line, read in turn


# --- the Energomera dialect -------------------------------------------------------------

TARIFFS = ("1.8.0", "1.8.1", "1.8.2", "1.8.3")


def _energomera(**kw: object) -> SimMeter:
    return SimMeter(address="1234", seed=21, dialect="energomera", manufacturer="EKT", **kw)


def test_energomera_programming_mode_read_equals_simulator(adapter: Iec62056Adapter) -> None:
    with IecLineSim([_energomera()], baudrate=9600) as sim:
        m = _meter(sim, address="1234", dialect="energomera", registers=TARIFFS)
        assert check_meter(m) == []
        readings = adapter.read_blocking(m)
        truth = sim.meters[0].last
        assert {r: truth.values[r] for r in TARIFFS} == _values(readings)
        for r in readings:
            assert r.quality == frozenset({quality.METER_CLOCK})
            assert abs(r.ts - truth.clock) <= timedelta(seconds=1)
        # the meter left programming mode (B0): a second read works the same way
        assert _values(adapter.read_blocking(m)) == {r: sim.meters[0].last.values[r] for r in TARIFFS}


def test_energomera_wrong_password_is_refused_then_right_one_reads(adapter: Iec62056Adapter) -> None:
    with IecLineSim([_energomera(password="111111")], baudrate=9600) as sim:
        m = _meter(sim, address="1234", dialect="energomera", registers=TARIFFS)
        with pytest.raises(PollError) as e:
            adapter.read_blocking(m)
        assert e.value.outcome == "refused" and "password" in str(e.value)
        assert sim.meters[0].readouts == 0
        good = m.model_copy(update={"password": "111111"})
        assert _values(adapter.read_blocking(good)) == {r: sim.meters[0].last.values[r] for r in TARIFFS}


def test_energomera_bcc_rule_differs_from_the_standard(adapter: Iec62056Adapter) -> None:
    # time stands still: the readout is the same bytes every run, so its two check characters
    # differ every run (on a running clock, about one readout in 128 has them equal)
    clock = SimClock(datetime(2026, 11, 2, 9, 15, tzinfo=UTC), scale=0.0)
    with IecLineSim([_energomera()], baudrate=9600, clock=clock) as sim:
        # read as a standard meter, its sum-mod-128 check character fails the XOR check
        with pytest.raises(PollError) as e:
            adapter.read_blocking(_meter(sim, address="1234", registers=TARIFFS))
        assert e.value.outcome == "crc"
        sim.meters[0].fault = "bad_bcc"
        with pytest.raises(PollError) as e:
            adapter.read_blocking(_meter(sim, address="1234", dialect="energomera", registers=TARIFFS))
        assert e.value.outcome == "crc"
        assert check_meter(_meter(sim, dialect="energomera", registers=("2.8.0",)))


# --- through the scheduler into the database -----------------------------------------------


def test_gateway_reads_a_line_with_a_dead_meter_into_the_database(db_url: str, conn) -> None:
    from amr import metrics
    from collector.gateway.daemon import Adapters, IngestSink
    from collector.gateway.scheduler import Scheduler, slot_start

    sims = [SimMeter(address=f"{i:08d}", seed=30 + i) for i in (1, 2, 3)]
    sims[1].fault = "no_answer"
    with IecLineSim(sims, baudrate=9600) as sim:
        meters = [
            _meter(sim, f"iec-{sm.address}", sm.address, timeout=0.3 if sm.fault else 1.0, interval="60s")
            for sm in sims
        ]
        upsert_inventory(conn, parse_inventory({
            "subscriber": [{"account": "1"}],
            "meter": [m.model_dump(mode="json", exclude_none=True) | {"interval": "60s"} for m in meters],
        }))
        conn.commit()
        adapters = Adapters(Settings())
        sink = IngestSink(db_url, Settings())
        sched = Scheduler(meters, adapters, sink, jitter_s=0, retry_delay_s=0.2, backoff_after=100)
        bus = meters[0].bus_name
        timeouts = metrics.POLLS.labels("iec62056", bus, "timeout")
        before = timeouts._value.get()

        async def one_slot():
            try:
                slot = slot_start(datetime.now(UTC), timedelta(seconds=60))
                return await asyncio.wait_for(
                    sched.run_slot(meters, slot, timedelta(seconds=3)), timeout=30
                )
            finally:
                await adapters.close()

        report = asyncio.run(one_slot())
        sink.close()
    assert sorted(report.read) == ["iec-00000001", "iec-00000003"]
    assert list(report.missed) == ["iec-00000002"]
    assert "timeout" in report.missed["iec-00000002"] and bus in report.missed["iec-00000002"]
    assert timeouts._value.get() - before >= 1
    rows = conn.execute("SELECT meter_id, register, value FROM reading ORDER BY meter_id, register").fetchall()
    assert {r[0] for r in rows} == {"iec-00000001", "iec-00000003"}
    for sm in (sims[0], sims[2]):
        stored = {r[1]: r[2] for r in rows if r[0] == f"iec-{sm.address}"}
        assert stored == sm.last.values


def test_reference_clock_can_be_simulated() -> None:
    """Against a simulated month, the meter's clock is compared with the simulated clock."""
    clock = SimClock(datetime(2026, 3, 1, tzinfo=UTC), scale=1.0)
    adapter = Iec62056Adapter(Settings(), now=clock.now)
    try:
        with IecLineSim([SimMeter(seed=9)], baudrate=9600, clock=clock) as sim:
            readings = adapter.read_blocking(_meter(sim))
        assert all(r.quality == frozenset({quality.METER_CLOCK}) for r in readings)
        assert readings[0].ts == sim.meters[0].last.clock
        assert readings[0].ts.date() == datetime(2026, 3, 1).date()
    finally:
        adapter.close_blocking()


def test_simulator_command_prints_an_inventory_that_reads(adapter: Iec62056Adapter, tmp_path) -> None:
    import select
    import tomllib

    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.iec62056_sim", "--meters", "2", "--baud", "9600",
         "--fault", "00000002=bad_bcc", "--link", str(tmp_path / "line")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out = b""
        deadline = time.monotonic() + 20
        while out.count(b"\nregisters") < 2:
            assert time.monotonic() < deadline, out
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, proc.stderr.read()
                out += chunk
        inv = parse_inventory(tomllib.loads(out.decode()))
        m1, m2 = inv.meters["iec-0001"], inv.meters["iec-0002"]
        assert check_meter(m1) == [] and m1.port == str(tmp_path / "line")
        assert {r.register for r in adapter.read_blocking(m1)} == set(ALL)
        with pytest.raises(PollError) as e:
            adapter.read_blocking(m2)
        assert e.value.outcome == "crc"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert not (tmp_path / "line").exists()  # the link is removed on exit


# --- a device that drips: the overall deadline per message ----------------------------------


@dataclass
class _DrippingLine(IecLineSim):
    """The simulated line with a hostile device of this test's own at `drip_address`.

    It answers its sign-on (stage "identification") or, after a proper
    identification and option select, its readout (stage "data") with bytes
    that keep coming one every `drip_s` seconds, faster than any idle timeout
    notices and without end, until the poller speaks on the line again (as a
    meter that restarts on a new sign-on). The healthy meters are the simulator's.
    """

    drip_address: str = "00000009"
    drip_s: float = 0.5
    stage: str = "identification"
    dripped: int = 0

    def _answer(self, address: str) -> None:
        if address != self.drip_address:
            super()._answer(address)
            return
        if self.stage == "identification":
            self._drip(b"/AMR5", b"X")  # an identification that never reaches its CR LF
            return
        self.line.write(to_line(identification("AMR", "5", "DRIP")))
        ack = self._read_line(2.0)
        if ack is None or ACK not in ack:
            return
        self._drip(STX + b"1.8.0(", b"0")  # a data block that never reaches its ETX

    def _drip(self, head: bytes, filler: bytes) -> None:
        for b in itertools.chain(head, itertools.repeat(filler[0])):
            if self._stop.is_set():
                return
            self.line.write(to_line(bytes((b,))))
            self.dripped += 1
            heard = self.line.read(1, self.drip_s)  # the pause between drips; anything heard ends it
            if heard:
                self._pending = from_line(heard)[0]
                return


def _poll_within(adapter: Iec62056Adapter, m: Meter, sim: IecLineSim, bound: float) -> tuple[object, float]:
    """adapter.read_blocking(m) in a thread: (its result or exception, seconds), failing past bound.

    Without a deadline the poll would never return: the line is closed then,
    which ends it, and the test fails.
    """
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = adapter.read_blocking(m)
        except Exception as exc:
            out["result"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(bound)
    elapsed = time.monotonic() - t0
    if worker.is_alive():
        sim.stop()
        worker.join(10)
        pytest.fail(f"the poll of {m.id} still ran after {elapsed:.1f} s (bound {bound:.1f} s)")
    return out["result"], elapsed


def test_message_deadline_is_the_idle_timeout_plus_twice_the_line_time_capped() -> None:
    # 25 bytes at 9600 baud, 10 bits each: 26 ms on the wire
    assert message_deadline(1.0, 9600, IDENT_MAX, 120) == pytest.approx(1.0 + 2 * 0.026042 + 0.25, abs=1e-4)
    assert message_deadline(1.0, 9600, READOUT_MAX, 120) == pytest.approx(9.78, abs=0.01)
    assert message_deadline(1.0, 300, READOUT_MAX, 120) == 120  # 137 s on the wire: the ceiling
    assert message_deadline(1.0, 300, READOUT_MAX, 5) == 5


@pytest.mark.parametrize("stage,ceiling", [("identification", None), ("data", 2.0)])
def test_a_dripping_device_fails_at_its_deadline_and_its_neighbour_reads(stage: str, ceiling: float | None) -> None:
    """A byte every 0.5 s never lets a 1.5 s idle timeout fire; the deadline ends the poll.

    The identification's deadline is derived (25 bytes at 9600 baud: 1.8 s with
    a 1.5 s idle timeout); the data message's would be 10.3 s, here capped by
    AMR_IEC_MESSAGE_DEADLINE_S=2.
    """
    settings_ = Settings(iec_message_deadline_s=ceiling) if ceiling else Settings()
    adapter = Iec62056Adapter(settings_)
    good = SimMeter(address="00000001", seed=41)
    try:
        with _DrippingLine([good], baudrate=9600, stage=stage) as sim:
            hostile = _meter(sim, "drip", sim.drip_address, timeout=1.5)
            # worked out here, not asked of the code under test: 1.5 + 2 * 25 * 10 / 9600 + 0.25
            limit = 1.802 if stage == "identification" else 2.0
            result, elapsed = _poll_within(adapter, hostile, sim, limit + 2.0)
            assert isinstance(result, PollError), result
            assert result.outcome == "deadline"
            text = str(result)
            assert "meter drip" in text and sim.device in text and "deadline" in text
            assert stage in text or "data message" in text
            assert limit * 0.95 <= elapsed <= limit + 2.0
            assert sim.dripped >= 3  # it was dripping, not silent
            # the healthy meter on the same line is read as soon as the poll gave up
            readings, _ = _poll_within(adapter, _meter(sim, "ok", "00000001"), sim, 5.0)
            assert not isinstance(readings, Exception), readings
            assert _values(readings) == good.last.values
    finally:
        adapter.close_blocking()


def test_scheduler_reads_the_healthy_meter_every_slot_beside_a_dripping_one() -> None:
    """The field case: a dripping meter held its bus for 71 s; its neighbour missed five slots."""
    from amr import metrics
    from collector.gateway.scheduler import Scheduler

    class ListSink:
        def __init__(self) -> None:
            self.items: list = []

        def put(self, items: list) -> None:
            self.items.extend(items)

    good = SimMeter(address="00000001", seed=42)
    adapter = Iec62056Adapter(Settings())
    sink = ListSink()
    with _DrippingLine([good], baudrate=9600) as sim:
        meters = [_meter(sim, "drip", sim.drip_address, timeout=1.5, interval="60s"),
                  _meter(sim, "ok", "00000001", timeout=1.5, interval="60s")]
        sched = Scheduler(meters, lambda m: adapter, sink, jitter_s=0, retry_delay_s=0.2, backoff_after=100)
        deadlines = metrics.POLLS.labels("iec62056", meters[0].bus_name, "deadline")
        before = deadlines._value.get()
        limit = 1.802  # the identification's deadline: 1.5 + 2 * 25 * 10 / 9600 + 0.25

        async def slots(n: int) -> list:
            reports = []
            try:
                for k in range(n):  # past slots: one pass each, no retries
                    slot = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1, minutes=k)
                    reports.append(await asyncio.wait_for(
                        sched.run_slot(meters, slot, timedelta(seconds=60)), timeout=limit + 5.0
                    ))
            except TimeoutError:
                sim.stop()  # unblocks the poll in its thread, so the loop can close
                pytest.fail(f"slot {len(reports)} did not finish within {limit + 5.0:.1f} s")
            finally:
                await adapter.close()
            return reports

        t0 = time.monotonic()
        reports = asyncio.run(slots(3))
        elapsed = time.monotonic() - t0
    assert [r.read for r in reports] == [["ok"]] * 3
    assert all("deadline" in r.missed["drip"] and sim.device in r.missed["drip"] for r in reports)
    assert deadlines._value.get() - before == 3
    assert elapsed <= 3 * (limit + 2.0)
    assert sorted({r.meter_id for r in sink.items if hasattr(r, "register")}) == ["ok"]
