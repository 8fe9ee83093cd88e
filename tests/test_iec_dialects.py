"""IEC 62056-21 dialects (Neva MT, Energomera SPODES), the P.01 load profile, a TCP converter.

Codec tests use bytes published by others, each with its source named; the
simulator tests then run the adapter against `simulators.iec62056_sim` on a
paced pseudo-terminal, and through a TCP-to-pty bridge of this file's own for
the converter case.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from adapters import quality
from adapters.base import PollError
from adapters.iec62056 import (
    ACK,
    DIALECTS,
    REACTION_MAX_S,
    Iec62056Adapter,
    bcc,
    bcc_sum7,
    check_meter,
    command_message,
    from_line,
    parse_frame,
    parse_profile,
    values_in_one_bracket,
    values_of_archive,
)
from amr.settings import Settings
from collector.inventory import Meter
from simulators.consumption import SimClock
from simulators.iec62056_sim import IecLineSim, SimMeter
from tests.conftest import free_port
from tests.converter import TcpToPty

MSK = ZoneInfo("Europe/Moscow")


def _meter(sim: IecLineSim | None = None, **kw: object) -> Meter:
    fields: dict[str, object] = {"id": "m1", "account": "1", "adapter": "iec62056", "baudrate": 9600,
                                 "registers": ("1.8.0", "1.8.1", "1.8.2", "1.8.3"), "timeout": 1.0}
    if sim is not None:
        fields["port"] = sim.device
    fields.update(kw)
    return Meter.model_validate(fields)


# --- codecs against published bytes -------------------------------------------------


def test_energomera_spodes_session_bytes_from_a_published_ce307_dump() -> None:
    """A CE307 R34 (Energomera SPODES) in IEC mode, logged by its owner in
    latonita/esphome-energomera-iec issue #1 (2024-08-18, AdminTools log in decimal
    bytes, parity bit included): option select, the meter's P0, our password."""
    option_select = bytes([6, 48, 53, 177, 141, 10])
    assert from_line(option_select) == (ACK + b"051\r\n", 0)  # programming mode at 9600 (Z=5, Y=1)
    p0 = from_line(bytes([1, 80, 48, 2, 40, 56, 51, 66, 67, 50, 52, 57, 41, 3, 101]))[0]
    assert parse_frame(p0, bcc_sum7) == ("P0", "(83BC249)")  # sum-of-bytes BCC 'e' checks
    with pytest.raises(ValueError, match="BCC"):
        parse_frame(p0, bcc)  # the standard's XOR does not
    p1 = from_line(bytes([129, 80, 177, 130, 40, 183, 183, 183, 183, 183, 183, 169, 3, 33]))[0]
    assert p1 == command_message("P1", "(777777)", DIALECTS["energomera_spodes"].bcc)


def test_energomera_spodes_archive_request_and_answer_from_a_published_log() -> None:
    """The same issue (comment of 2024-08-21, ESPHome log): `EMD01(0.0,1)` and its answer,
    the day-start archive `(21.08.24,0.47107)(0.42458)` with BCC 0x09."""
    assert command_message("R1", "EMD01(0.0,1)", bcc_sum7) == b"\x01R1\x02EMD01(0.0,1)\x03{"
    answer = b"\x02EMD01(21.08.24,0.47107)\r\n(0.42458)\r\n\x03\x09"
    command, data = parse_frame(answer, bcc_sum7)
    assert command == ""
    assert values_of_archive(data) == (["0.47107", "0.42458"], "21.08.24")
    assert DIALECTS["energomera_spodes"].answer is values_of_archive


def test_neva_frames_published_by_an_independent_client() -> None:
    """Neva MT frames from nnemirovsky/pyneva tests/test_tools.py (a Neva MT 3xx library):
    a read of OBIS 60.01.00*FF as the hex command `600100FF()`, the password `(00000000)`,
    and the meter's answers, each with the standard's XOR block check."""
    neva = DIALECTS["neva"]
    assert command_message("R1", "600100FF()", neva.bcc) == b"\x01R1\x02600100FF()\x03d"
    assert command_message("P1", "(00000000)", neva.bcc) == b"\x01P1\x02(00000000)\x03a"
    assert command_message("P1", f"({neva.default_password})", neva.bcc) == b"\x01P1\x02(00000000)\x03a"
    _, data = parse_frame(b"\x020F0680FF(04.8190,04.8457,02.5359,00.0000,00.0000)\x03R", neva.bcc)
    assert neva.answer(data) == (["04.8190", "04.8457", "02.5359", "00.0000", "00.0000"], None)
    _, serial_no = parse_frame(b"\x02600100FF(60089784)\x03\x09", neva.bcc)
    assert neva.answer(serial_no) == (["60089784"], None)
    with pytest.raises(ValueError, match="BCC"):
        parse_frame(b"\x02600100FF(60089784)\x03\x09", bcc_sum7)  # not Energomera's sum


def test_neva_values_in_one_bracket() -> None:
    """Neva MT: `0F0880FF()` answers (total,T1,T2,T3,T4) in one pair of brackets
    (../shared/METERS.md §3, from wirenboard/wb-mqtt-serial neva_device.cpp; no published
    Neva byte dump was found, so this checks the layout, and the XOR check is the
    standard's, tested against published bytes in tests/test_iec62056.py)."""
    assert values_in_one_bracket("0F0880FF(16484.51,12896.28,3588.23,0.00,0.00)\r\n") == (
        ["16484.51", "12896.28", "3588.23", "0.00", "0.00"], None)
    assert DIALECTS["neva"].bcc is bcc
    assert DIALECTS["neva"].commands[0][0] == "0F0880FF()"


# P.01 answers of an EMH and a Metcom meter, the fixtures of a public Python IEC 62056-21
# parser's test file (package `iec6205621`, tests for EMH and Metcom; code-index id 28319626635)
EMH_ENERGY = (
    "P.01(1221005001500)(00000000)(15)(8)(1-1:1.29)(kWh)(1-1:2.29)(kWh)(1-1:5.29)(kvarh)(1-1:6.29)(kvarh)"
    "(1-1:7.29)(kvarh)(1-1:8.29)(kvarh)(1-2:1.29)(kWh)(1-3:2.29)(kWh)\r\n"
    "(0.00000)(0.04088)(0.00000)(0.00358)(0.00000)(0.00000)(0.00000)(0.00000)\r\n"
    "(0.00000)(0.03964)(0.00000)(0.00350)(0.00000)(0.00000)(0.00000)(0.00000)\r\n"
)
EMH_POWER = (
    "P.01(1220823161500)(00000000)(15)(6)(1.5)(kW)(2.5)(kW)(5.5)(kvar)(6.5)(kvar)(7.5)(kvar)(8.5)(kvar)\r\n"
    "(0.18374)(0.00078)(0.00000)(0.00006)(0.00087)(0.02431)\r\n"
    "(0.16832)(0.00000)(0.00000)(0.00000)(0.00000)(0.02686)"
)


def test_p01_energy_channels_of_a_published_emh_answer() -> None:
    tz = ZoneInfo("Europe/Berlin")
    slots = parse_profile(EMH_ENERGY, tz)
    first_end = datetime(2022, 10, 5, 0, 15, tzinfo=tz).astimezone(UTC)
    # channels 1-1:1.29 and 1-1:2.29 feed 1.8.0 and 2.8.0; 1-2:1.29 and 1-3:2.29 are other
    # measuring channels (B=2, 3) and the reactive ones feed nothing we bill
    assert sorted({s.register for s in slots}) == ["1.8.0", "2.8.0"] and len(slots) == 4
    export = [s for s in slots if s.register == "2.8.0"]
    assert [(s.start, s.end, s.wh) for s in export] == [
        (first_end - timedelta(minutes=15), first_end, 41),
        (first_end, first_end + timedelta(minutes=15), 40),
    ]


def test_p01_average_power_channels_become_wh() -> None:
    slots = parse_profile(EMH_POWER, ZoneInfo("Europe/Berlin"))
    imp = [s.wh for s in slots if s.register == "1.8.0"]
    assert imp == [46, 42]  # 0.18374 kW for 15 min = 45.9 Wh; 0.16832 kW = 42.1 Wh
    assert all(s.end - s.start == timedelta(minutes=15) for s in slots)


def test_p01_empty_value_is_an_invalid_slot_and_garbage_is_refused() -> None:
    text = "P.01(0261110003000)(00)(30)(1)(1.9)(kWh)\r\n(0.120)\r\n()\r\n"
    assert [s.wh for s in parse_profile(text, MSK)] == [120, None]
    with pytest.raises(ValueError, match="channels"):
        parse_profile("P.01(0261110003000)(00)(30)(1)(1.9)(kWh)\r\n(0.1)(0.2)\r\n", MSK)


# --- adapter against the simulator ----------------------------------------------------


def test_neva_reads_from_the_simulator() -> None:
    adapter = Iec62056Adapter(Settings())
    with IecLineSim([SimMeter(seed=3, dialect="neva", manufacturer="TPT")], baudrate=9600) as sim:
        m = _meter(sim, dialect="neva")
        readings = adapter.read_blocking(m)
        truth = sim.meters[0].last
        assert truth is not None
        assert {r.register: r.value for r in readings} == {
            r: truth.values[r].quantize(Decimal("0.01")) for r in ("1.8.0", "1.8.1", "1.8.2", "1.8.3")}
        assert quality.METER_CLOCK in readings[0].quality  # the 000902FF/000901FF clock was read


def test_energomera_spodes_reads_the_day_start_archive() -> None:
    """ET0PE is ERR12 on these models; the archive's values are stamped at the local
    day start they hold, not at the poll."""
    adapter = Iec62056Adapter(Settings())
    with IecLineSim([SimMeter(seed=4, dialect="energomera_spodes", manufacturer="EMR")], baudrate=9600) as sim:
        readings = adapter.read_blocking(_meter(sim, dialect="energomera_spodes"))
        truth = sim.meters[0].last
        assert truth is not None
        day_start = datetime.now(MSK).replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)
        assert {r.ts for r in readings} == {truth.t} and abs(truth.t - day_start) < timedelta(days=1, seconds=5)
        assert {r.register: r.value for r in readings} == {r: truth.values[r] for r in ("1.8.0", "1.8.1", "1.8.2", "1.8.3")}


def test_wrong_password_says_password() -> None:
    adapter = Iec62056Adapter(Settings())
    with IecLineSim([SimMeter(seed=4, dialect="neva", password="00000000")], baudrate=9600) as sim:
        with pytest.raises(PollError, match="password"):
            adapter.read_blocking(_meter(sim, dialect="neva", password="12345678"))


def test_identification_waits_for_the_standards_reaction_time() -> None:
    """A meter that takes 1.2 s to answer a sign-on is read even with a 0.3 s idle timeout."""
    adapter = Iec62056Adapter(Settings())
    assert REACTION_MAX_S == 1.5
    with IecLineSim([SimMeter(seed=5)], baudrate=9600, sign_on_reaction_s=1.2) as sim:
        readings = adapter.read_blocking(_meter(sim, registers=("1.8.0",), timeout=0.3))
        assert readings and readings[0].value == sim.meters[0].last.values["1.8.0"]  # type: ignore[union-attr]


def test_profile_and_clock_correction_against_the_simulator() -> None:
    t0 = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)
    clock = SimClock(t0, 1.0)
    adapter = Iec62056Adapter(Settings(), now=clock.now)
    std = SimMeter(address="00000001", seed=6, missing_profile={t0 - timedelta(hours=1)})
    emr = SimMeter(address="00000002", seed=7, dialect="energomera", clock_offset_s=-100)
    with IecLineSim([std, emr], baudrate=9600, clock=clock) as sim:
        m = _meter(sim, address="00000001", registers=("1.8.0",))
        slots = adapter.read_profile_blocking(m, t0 - timedelta(hours=3), t0, 48)
        assert [s.start for s in slots] == [t0 - timedelta(minutes=30 * k) for k in range(6, 0, -1)]
        assert slots == std.profile(t0 - timedelta(hours=3), t0)
        assert [s.wh is None for s in slots] == [False, False, False, False, True, False]
        assert adapter.read_profile_blocking(m, t0 - timedelta(hours=3), t0, 2) == slots[:2]
        e = _meter(sim, address="00000002", dialect="energomera")
        adapter.read_blocking(e)
        offset = adapter.clock_offset(e)
        assert offset is not None and -102 <= offset <= -98
        assert adapter.clock_step_limit(e) == 29
        adapter.correct_clock_blocking(e, 29)
        assert emr.clock_offset_s == -71 and len(emr.clock_corrections) == 1
        with pytest.raises(PollError, match="did not accept"):
            adapter.correct_clock_blocking(e, 29)  # the meter takes one correction a day
        with pytest.raises(PollError, match="outside"):
            adapter.correct_clock_blocking(e, 40)
        with pytest.raises(PollError, match=r"no P\.01"):
            adapter.read_profile_blocking(e, t0 - timedelta(hours=1), t0, 4)


# --- a TCP converter ------------------------------------------------------------------------


def test_iec_over_a_tcp_converter() -> None:
    adapter = Iec62056Adapter(Settings())
    # the converter's line runs at 9600; the meter proposes 19200, which a converter cannot follow
    with IecLineSim([SimMeter(seed=8, max_baud=19200, in_wh=True)], baudrate=9600) as sim:
        with TcpToPty(sim.device) as relay:
            tcp_port = relay.port
            m = Meter.model_validate({"id": "tcp1", "account": "1", "adapter": "iec62056", "host": "127.0.0.1",
                                      "tcp_port": tcp_port, "baudrate": 9600, "registers": ("1.8.0", "2.8.0")})
            assert check_meter(m) == []
            assert m.bus_name == f"127.0.0.1:{tcp_port}"
            for _ in range(2):  # the connection is kept and reused
                readings = adapter.read_blocking(m)
                truth = sim.meters[0].last
                assert truth is not None
                assert {r.register: r.value for r in readings} == {r: truth.values[r] for r in ("1.8.0", "2.8.0")}
            assert readings[0].source == f"iec62056:127.0.0.1:{tcp_port}"
        adapter.close_blocking()
    refused = Meter.model_validate({"id": "tcp2", "account": "1", "adapter": "iec62056", "host": "127.0.0.1",
                                    "tcp_port": free_port(), "registers": ("1.8.0",)})
    with pytest.raises(PollError, match="TCP converter") as e:
        adapter.read_blocking(refused)
    assert e.value.outcome == "refused" and "tcp2" in str(e.value)


def test_converter_keys_are_checked() -> None:
    both = Meter.model_validate({"id": "x", "account": "1", "adapter": "iec62056", "host": "h", "tcp_port": 4001,
                                 "port": "/dev/ttyUSB0"})
    assert any("not both" in p for p in check_meter(both))
    half = Meter.model_validate({"id": "y", "account": "1", "adapter": "iec62056", "tcp_port": 4001})
    assert any("needs both" in p for p in check_meter(half))


def test_iec_over_a_7e1_converter_which_strips_the_parity_bit() -> None:
    adapter = Iec62056Adapter(Settings())
    with IecLineSim([SimMeter(seed=9, dialect="energomera", manufacturer="EKT")], baudrate=9600) as sim:
        with TcpToPty(sim.device, seven_bit=True) as relay:
            tcp_port = relay.port
            m = Meter.model_validate({"id": "t7", "account": "1", "adapter": "iec62056", "host": "127.0.0.1",
                                      "tcp_port": tcp_port, "baudrate": 9600, "dialect": "energomera",
                                      "registers": ("1.8.0", "1.8.1")})
            readings = adapter.read_blocking(m)
            truth = sim.meters[0].last
            assert truth is not None
            assert {r.register: r.value for r in readings} == {r: truth.values[r] for r in ("1.8.0", "1.8.1")}
        adapter.close_blocking()


def test_simulator_answers_an_independent_client() -> None:
    """pwitab's iec62056-21 (BSD-3, a client written apart from ours) reads the simulator's
    standard readout through a 7E1 converter: the simulator's framing and BCC are not only
    our own understanding."""
    from iec62056_21.client import Iec6205621Client

    with IecLineSim([SimMeter(seed=10)], baudrate=9600, reaction_s=0.25) as sim:
        with TcpToPty(sim.device, seven_bit=True) as relay:
            tcp_port = relay.port
            client = Iec6205621Client.with_tcp_transport(("127.0.0.1", tcp_port), device_address="")
            client.connect()
            try:
                answer = client.standard_readout()
            finally:
                client.disconnect()
        truth = sim.meters[0].last
        assert truth is not None
        got = {ds.address: ds.value for line in answer.data_block.data_lines for ds in line.data_sets}
        assert answer.data_block.data_lines  # the client checked the BCC and parsed the block
        assert Decimal(got["1.8.0"]) == truth.values["1.8.0"].quantize(Decimal("0.01"))
        assert Decimal(got["2.8.0"]) == truth.values["2.8.0"].quantize(Decimal("0.01"))
