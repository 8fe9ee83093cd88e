"""The Mercury codec (adapters/mercury.py) against byte sequences published by others.

Every frame below is copied as a fact from a named public source, never produced by our
own encoder first:

- WB: wirenboard/wb-mqtt-serial, test/TEMDeviceTest.Mercury230ReadEnergy.dat,
  test/TEMDeviceTest.Mercury230Exception.dat, test/TMercury230IntegrationTest.Poll.dat
  (v2 session, energy, an internal-error reply, parameter requests; the test publishes
  "Total consumption: 3196.2" and "Total reactive energy: 300.444" for the energy reply)
  and test/TMercury200Test.EnergyQuery.dat (v1 energy of the meter at address 123456).
- MB: webtoucher/mercury-base 1.6 (PyPI, BSD-3), mercury_base/mercury_v2/__init__.py
  `cache`: a v2 meter at address 0x30 (48) with password 123456.
- METERS: ../shared/METERS.md §1.3, the serial-number example `2B 48 54 38` -> 43728456
  (ivan12000user/astue-mps-replacement, src/Mercury230Driver.cs) and the factory-address
  rule (mercury-base prepare_address, ioBroker.mercury main.js).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from adapters import mercury as mc


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- CRC and framing -------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    "00 01 01 01 01 01 01 01 01 77 81",  # WB: open the channel, level 1, password 111111
    "00 00 01 B0",  # WB: status OK
    "00 05 00 00 10 25",  # WB: energy since reset, sum
    "00 30 00 28 C5 FF FF FF FF 04 00 9C 95 FF FF FF FF 44 AB",  # WB: its answer
    "00 08 11 12 0D BB",  # WB: read U2
    "00 02 80 71",  # WB: internal error
    "00 01 E2 40 27 F4 10",  # WB: v1 energy request
    "00 01 E2 40 27 00 06 21 42 00 02 08 34 00 01 11 11 00 02 22 22 32 42",  # WB: v1 answer
    "30 01 01 01 02 03 04 05 06 35 3B",  # MB: open, password 123456
    "30 08 00 76 0F", "30 28 44 00 30 16 01 14 0B 02",  # MB: serial number and its answer
    "30 08 02 F7 CE", "30 00 01 00 01 F4 04",  # MB: transformer ratios and the answer
    "30 08 12 F6 02", "30 B4 E3 C2 95 57 40 E7 35",  # MB: variant word
])
def test_crc16_modbus_matches_published_frames(frame: str) -> None:
    raw = h(frame)
    assert mc.crc16(raw[:-2]) == raw[-2:]


def test_requests_are_the_published_bytes() -> None:
    assert mc.open_request(0, "111111", "digits", 1) == h("00 01 01 01 01 01 01 01 01 77 81")  # WB
    assert mc.open_request(0x30, "123456", "digits", 1) == h("30 01 01 01 02 03 04 05 06 35 3B")  # MB
    assert mc.energy_request(0, tariff=0) == h("00 05 00 00 10 25")  # WB
    assert mc.test_request(0x30) == h("30 00 15 B0")  # MB (the meter echoes it as its OK)
    assert mc.read_param_request(0x30, "serial") == h("30 08 00 76 0F")  # MB
    assert mc.read_param_request(0x30, "transformer") == h("30 08 02 F7 CE")  # MB
    assert mc.read_param_request(0x30, "address") == h("30 08 05 B6 0C")  # MB
    assert mc.read_param_request(0x30, "variant") == h("30 08 12 F6 02")  # MB
    assert mc.v1_request(123456, "energy") == h("00 01 E2 40 27 F4 10")  # WB


def test_bad_crc_and_wrong_address_are_named() -> None:
    good = h("00 30 00 28 C5 FF FF FF FF 04 00 9C 95 FF FF FF FF 44 AB")
    with pytest.raises(mc.FrameError) as e:
        mc.check_frame(good[:-1] + b"\x00", b"\x00")
    assert e.value.outcome == "crc" and "CRC mismatch" in str(e.value)
    with pytest.raises(mc.FrameError) as e:
        mc.check_frame(good, b"\x05")
    assert e.value.outcome == "garbage" and "address" in str(e.value)
    with pytest.raises(mc.FrameError) as e:
        mc.check_frame(b"\x00\x01", b"\x00")
    assert e.value.outcome == "garbage"


# --- v2 energy: the word order and FFFFFFFF --------------------------------------------------


def test_energy_answer_decodes_to_the_published_values() -> None:
    """WB publishes 3196.2 kWh A+ and 300.444 kvarh R+ for this answer; A- and R- are FFFFFFFF."""
    raw = h("00 30 00 28 C5 FF FF FF FF 04 00 9C 95 FF FF FF FF 44 AB")
    e = mc.parse_energy(mc.check_frame(raw, b"\x00"), raw)
    assert e.values == (3_196_200, None, 300_444, None)
    assert mc.kwh(3_196_200) == Decimal("3196.2")
    # the second answer of the same dump: one Wh more in A+ and R+
    raw2 = h("00 30 00 29 C5 FF FF FF FF 04 00 9D 95 FF FF FF FF 45 BB")
    assert mc.parse_energy(mc.check_frame(raw2, b"\x00")).values == (3_196_201, None, 300_445, None)


def test_word_order_quirk_and_not_measured() -> None:
    assert mc.from_word_swapped(h("30 00 28 C5")) == 0x0030C528 == 3_196_200
    assert mc.from_word_swapped(h("FF FF FF FF")) is None  # never 4294967295 Wh
    assert mc.word_swapped(3_196_200) == h("30 00 28 C5")
    assert mc.from_word_swapped(h("FF FF FF FE")) == 0xFFFFFEFF  # only all-FF means "not measured"


def test_status_replies_are_named() -> None:
    raw = h("00 02 80 71")  # WB: the meter's answer to a parameter request it failed
    with pytest.raises(mc.StatusError) as e:
        mc.parse_energy(mc.check_frame(raw, b"\x00"), raw)
    assert e.value.code == 2 and "internal error" in str(e.value) and e.value.outcome == "exception"
    for code, word in ((1, "bad command"), (3, "access level"), (4, "already corrected"), (5, "channel not open")):
        with pytest.raises(mc.StatusError) as e:
            mc.parse_status(bytes((code,)))
        assert word in str(e.value)
    mc.parse_status(mc.check_frame(h("00 00 01 B0"), b"\x00"))  # WB: OK passes


# --- v2 parameters ---------------------------------------------------------------------------


def test_published_parameter_answers_decode() -> None:
    raw = h("30 00 01 00 01 F4 04")  # MB: transformer ratios of a direct-connected meter
    assert mc.parse_transformer(mc.check_frame(raw, b"\x30"), raw) == (1, 1)
    raw = h("30 28 44 00 30 16 01 14 0B 02")  # MB: serial number 40680048, made 22.01.20
    data = mc.check_frame(raw, b"\x30")
    assert mc.decimal_bytes(data[:4]) == 40680048
    assert mc.decimal_bytes(h("2B 48 54 38")) == 43728456  # METERS
    raw = h("30 00 30 71 DB")  # MB: the meter's address, 0x30
    assert mc.check_frame(raw, b"\x30") == b"\x00\x30"
    raw = h("30 B4 E3 C2 95 57 40 E7 35")  # MB: variant word: constant code 2 = 1250 imp/kWh
    v = mc.parse_variant(mc.check_frame(raw, b"\x30"), raw)
    assert v.constant == 1250 and not v.has_profile and v.one_direction


def test_factory_addresses_from_the_serial_number() -> None:
    # METERS: the last 3 digits, the last 2 when above 240, 0 -> 1
    assert mc.v2_factory_address("40680048") == 48
    assert mc.v2_factory_address("43728456") == 56
    assert mc.v2_factory_address("12345100") == 100
    assert mc.v2_factory_address("1000") == 1
    # v1: the serial's last 6 digits for a 200, 8 for a 203/206
    assert mc.v1_address_from_serial("0012345678", "200") == 345678
    assert mc.v1_address_from_serial("0012345678", "206") == 12345678


# --- passwords ---------------------------------------------------------------------------------


def test_password_encodings() -> None:
    assert mc.encode_password("111111", "digits") == h("01 01 01 01 01 01")  # WB
    assert mc.encode_password("123456", "digits") == h("01 02 03 04 05 06")  # MB
    assert mc.encode_password("111111", "ascii") == b"111111"  # the configurators' other setting
    with pytest.raises(ValueError, match="6 digits"):
        mc.encode_password("abcdef", "digits")
    with pytest.raises(ValueError, match="6 characters"):
        mc.encode_password("1111", "digits")
    with pytest.raises(ValueError, match="password_encoding"):
        mc.encode_password("111111", "hex")


# --- v1 ---------------------------------------------------------------------------------------------


def test_v1_energy_answer_is_bcd_per_tariff() -> None:
    raw = h("00 01 E2 40 27 00 06 21 42 00 02 08 34 00 01 11 11 00 02 22 22 32 42")  # WB
    data = mc.v1_payload(raw, 123456, "energy")
    assert mc.parse_v1_energy(data, raw) == (Decimal("621.42"), Decimal("208.34"), Decimal("111.11"), Decimal("222.22"))
    with pytest.raises(mc.FrameError) as e:
        mc.parse_v1_energy(h("00 06 2A 42") + data[4:], raw)
    assert e.value.outcome == "decode" and "BCD" in str(e.value)
    with pytest.raises(mc.FrameError):
        mc.v1_payload(raw, 123457, "energy")  # another meter's answer


def test_v1_clock_layout() -> None:
    """7 BCD bytes weekday hh mm ss dd MM yy (ioBroker.mercury lib/mercury.js readDateTime reads
    response[6..8] as the time and [9..11] as the date after the 4-byte address and the command)."""
    c = mc.parse_v1_clock(h("03 14 25 36 02 12 26"))
    assert c.local == datetime(2026, 12, 2, 14, 25, 36) and c.weekday == 3


# --- v2 clock, correction and profile layouts (one source each: see the schema's notes) ----------


def test_v2_clock_layout_and_correction_request() -> None:
    """`04 00` answers ss mm hh weekday dd MM yy season (ioBroker.mercury readCurrentTime,
    astue-mps-replacement TryParseClock8); `03 0D ss mm hh` corrects it (BCD)."""
    c = mc.parse_clock(h("36 25 14 03 02 12 26 01"))
    assert c.local == datetime(2026, 12, 2, 14, 25, 36) and c.winter
    req = mc.correct_clock_request(48, datetime(2026, 12, 2, 14, 27, 0))
    assert req[:5] == h("30 03 0D 00 27") and req[5] == 0x14 and mc.crc16(req[:-2]) == req[-2:]
    with pytest.raises(mc.FrameError) as e:
        mc.parse_clock(h("36 25 14 03 32 12 26 01"))  # 32 December
    assert e.value.outcome == "decode"


def test_profile_record_layout_and_energy() -> None:
    """15 bytes: status, hh mm dd MM yy (BCD), period, A+ A- R+ R- little-endian 16-bit; FFFF
    not measured; energy N / (2 A) kWh (astue-mps-replacement PublishPowerProfile)."""
    payload = h("00 14 30 02 12 26 1E D0 07 FF FF 58 02 FF FF")
    r = mc.parse_profile_record(payload)
    assert r is not None
    assert r.local == datetime(2026, 12, 2, 14, 30) and r.period_min == 30
    assert r.counts == (2000, None, 600, None)
    assert mc.pulses_wh(2000, 1000) == Decimal(1000)  # 2000 impulses at 2 x 1000 imp/kWh = 1 kWh
    assert mc.pulses_wh(2000, 5000) == Decimal(200)
    assert mc.parse_profile_record(b"\xff" * 15) is None  # memory never written
    # records beyond 0xFFFF are read from memory 0x83
    req = mc.profile_read_request(1, 5000)  # 5000 * 16 = 0x13880
    assert req[1:6] == h("06 83 38 80 0F")
    assert mc.parse_profile_request(req[1:-2]) == 5000
