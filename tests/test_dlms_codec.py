"""The DLMS/COSEM codecs (adapters/hdlc.py, adapters/cosem.py) against bytes published by others.

Every byte string below was taken from a named public source, not produced by
our encoder:

- KMETHY: Gyozo Kmethy, "Examples for DLMS/COSEM information exchange",
  DLMS User Association FAQ (mirrored at
  jacobs-master.ru/view/articles/dlmsua/dlmscosem_gyozo_kmethy_example_origin
  and scribd.com/document/478055301): SNRM/UA with parameter negotiation and
  the AARQ I-frame, server logical 1 / physical 17 in a 4-byte address.
- GURUX: the classic SNRM `7E A0 07 03 21 93 0F 01 7E` of the Gurux
  documentation, also the fixture of Gurux/gxdlms-go `Test_Hex`.
- DLMS_COSEM: u9n/dlms-cosem tests (MIT, the 21.x test fixtures; the AARQ
  and AARE encodings are quoted there from the DLMS UA Green Book v10, p. 444):
  tests/test_hdlc/test_hdlc.py, tests/test_asce/test_aarq.py and test_aare.py,
  tests/test_xdlms/test_get.py and test_selective_access.py.
- AMSREADER: UtilitechAS/amsreader-firmware frames/austria.raw (a real
  meter's push frame): register values with scaler_unit and a date-time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from adapters import cosem, hdlc
from adapters.cosem import CosemError, Structure
from adapters.hdlc import HdlcError

# --- HDLC -------------------------------------------------------------------------------

KMETHY_SNRM = bytes.fromhex("7EA00A00020023219318717E")
KMETHY_UA = bytes.fromhex("7EA023210002002373F6C58180140502008006020080070400000001080400000001CE6A7E")
KMETHY_AARQ_FRAME = bytes.fromhex(
    "7EA02E0002002321107ECBE6E600601DA109060760857405080101BE10040E01000000065F1F040000301DFFFFD4C57E"
)
GURUX_SNRM = bytes.fromhex("7EA0070321930F017E")
DLMS_COSEM_SNRM = bytes.fromhex("7ea00802232193bd647e")
DLMS_COSEM_UA = bytes.fromhex("7EA01F21022373E6C781801205019A06019A070400000001080400000001CCA27E")
DLMS_COSEM_AARQ_FRAME = bytes.fromhex(
    "7EA02C02232110AF9FE6E600601DA109060760857405080101BE10040E01000000065F1F0400001E1DFFFFC5E47E"
)
DLMS_COSEM_AARE_FRAME = bytes.fromhex(
    "7EA0382102233034E7E6E7006129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F0400001E1D04C80007B86A7E"
)
DLMS_COSEM_SEGMENTED = bytes.fromhex(
    "7ea87e210396a4090f01160002020f02160002020f03160002020f04160002020f05160002020f0616000204120017110009060000160000"
    "ff0202010902030f0116010002030f0216010002030f0316010002030f0416010002030f0516010002030f0616010002030f0716010002030f"
    "0816010002030f09160100016ff37e"
)


def test_crc_x25_of_published_hcs() -> None:
    # DLMS_COSEM test_hdlc.py TestCrc: the HCS of 03 3F is 5B EC (sent low byte first)
    assert hdlc.crc16_x25(bytes.fromhex("033f")).to_bytes(2, "little") == bytes.fromhex("5bec")


@pytest.mark.parametrize(
    ("frame", "server", "client"),
    [
        (GURUX_SNRM, hdlc.encode_server_address(1), hdlc.encode_client_address(0x10)),
        (DLMS_COSEM_SNRM, hdlc.encode_server_address(1, 17), hdlc.encode_client_address(0x10)),
        (KMETHY_SNRM, hdlc.encode_server_address(1, 17, size=4), hdlc.encode_client_address(0x10)),
    ],
    ids=["gurux-1-byte", "dlms-cosem-2-byte", "kmethy-4-byte"],
)
def test_snrm_encodes_to_the_published_frame(frame: bytes, server: bytes, client: bytes) -> None:
    assert hdlc.encode_frame(server, client, hdlc.SNRM) == frame
    got = hdlc.decode_frame(frame)
    assert (got.dest, got.src, got.control, got.info) == (server, client, hdlc.SNRM, b"")


def test_addresses_split_like_the_published_ones() -> None:
    # KMETHY: 00 02 00 23 is "upper HDLC address 0x0001, lower 0x0011"
    assert hdlc.split_address(bytes.fromhex("00020023")) == (1, 17)
    assert hdlc.split_address(bytes.fromhex("0223")) == (1, 17)  # DLMS_COSEM ((1, 17, server) -> 02 23)
    assert hdlc.split_address(b"\x03") == (1, None)
    assert hdlc.encode_server_address(0b1001010) == b"\x95"  # DLMS_COSEM address table
    assert hdlc.encode_client_address(0b0100101) == b"\x4b"


def test_ua_parameters_of_kmethy_and_dlms_cosem() -> None:
    ua = hdlc.decode_frame(KMETHY_UA)
    assert ua.control == hdlc.UA
    assert hdlc.split_address(ua.src) == (1, 17)
    assert hdlc.decode_parameters(ua.info) == hdlc.LinkParameters(128, 128, 1, 1)
    ua2 = hdlc.decode_frame(DLMS_COSEM_UA)
    assert hdlc.decode_parameters(ua2.info) == hdlc.LinkParameters(0x9A, 0x9A, 1, 1)
    # and our encoder writes that parameter field byte for byte
    assert hdlc.encode_parameters(hdlc.LinkParameters(0x9A, 0x9A, 1, 1)) == ua2.info
    assert hdlc.encode_frame(ua2.dest, ua2.src, hdlc.UA, ua2.info) == DLMS_COSEM_UA


@pytest.mark.parametrize("frame", [KMETHY_AARQ_FRAME, DLMS_COSEM_AARQ_FRAME, DLMS_COSEM_AARE_FRAME])
def test_information_frames_round_trip(frame: bytes) -> None:
    f = hdlc.decode_frame(frame)
    assert f.is_information and not f.segmented
    assert hdlc.encode_frame(f.dest, f.src, f.control, f.info) == frame


def test_information_frame_sequence_numbers_and_llc() -> None:
    req = hdlc.decode_frame(DLMS_COSEM_AARQ_FRAME)
    assert (req.send_seq, req.recv_seq, req.control) == (0, 0, hdlc.i_control(0, 0))
    assert req.info[:3] == hdlc.LLC_REQUEST
    resp = hdlc.decode_frame(DLMS_COSEM_AARE_FRAME)
    assert (resp.send_seq, resp.recv_seq) == (0, 1)  # control 0x30 in DLMS_COSEM TestInformationControlField
    assert resp.info[:3] == hdlc.LLC_RESPONSE


def test_segmented_frame_is_recognised() -> None:
    f = hdlc.decode_frame(DLMS_COSEM_SEGMENTED)
    assert f.segmented
    assert (f.dest, f.src) == (b"\x21", b"\x03")
    assert len(DLMS_COSEM_SEGMENTED) == 0x7E + 2


def test_bad_fcs_hcs_and_noise_are_named() -> None:
    bad_fcs = bytearray(KMETHY_UA)
    bad_fcs[-2] ^= 0x01
    with pytest.raises(HdlcError) as e:
        hdlc.decode_frame(bytes(bad_fcs))
    assert e.value.outcome == "crc" and "FCS" in str(e.value)
    # a wrong HCS with a (recomputed) right FCS
    bad_hcs = bytearray(DLMS_COSEM_AARQ_FRAME[1:-3])
    bad_hcs[7] ^= 0x01
    framed = b"\x7e" + bytes(bad_hcs) + hdlc.crc16_x25(bytes(bad_hcs)).to_bytes(2, "little") + b"\x7e"
    with pytest.raises(HdlcError) as e:
        hdlc.decode_frame(framed)
    assert e.value.outcome == "crc" and "HCS" in str(e.value)
    with pytest.raises(HdlcError) as e:
        hdlc.decode_frame(b"\x7e\x01\x02\x03\x04\x05\x06\x07\x7e")
    assert e.value.outcome == "garbage"


def test_frame_reader_cuts_a_stream_with_noise() -> None:
    r = hdlc.FrameReader()
    stream = b"\x00\xff" + KMETHY_UA + DLMS_COSEM_AARE_FRAME
    got = []
    for i in range(0, len(stream), 7):  # in pieces, as a serial port delivers
        got += r.feed(stream[i : i + 7])
    assert got == [KMETHY_UA, DLMS_COSEM_AARE_FRAME]
    assert r.junk == 2


def test_segments_cut_at_the_negotiated_length() -> None:
    payload = bytes(range(256)) * 2
    parts = hdlc.segments(payload, 128)
    assert [len(p) for p in parts] == [128, 128, 128, 128]
    assert b"".join(parts) == payload


# --- association ---------------------------------------------------------------------------

DLMS_COSEM_AARQ_LLS = (
    b"`6\xa1\t\x06\x07`\x85t\x05\x08\x01\x01\x8a\x02\x07\x80\x8b\x07`\x85t\x05\x08\x02\x01\xac\n\x80\x0812345678"
    b"\xbe\x10\x04\x0e\x01\x00\x00\x00\x06_\x1f\x04\x00\x00~\x1f\x04\xb0"
)
GREEN_BOOK_AARE_ACCEPTED = bytes.fromhex(
    "6129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F040000501F01F40007")
GREEN_BOOK_AARE_REJECTED = bytes.fromhex(
    "6129A109060760857405080101A203020101A305A103020102BE10040E0800065F1F040000501F01F40007")


def test_aarq_without_security_matches_kmethy_and_dlms_cosem() -> None:
    kmethy_aarq = hdlc.decode_frame(KMETHY_AARQ_FRAME).info[3:]
    assert cosem.encode_aarq(None, conformance=0x00301D, max_pdu=0xFFFF) == kmethy_aarq
    assert cosem.encode_aarq(None, conformance=0x001E1D, max_pdu=0xFFFF) == bytes.fromhex(
        "601DA109060760857405080101BE10040E01000000065F1F0400001E1DFFFF")


def test_aarq_with_low_level_security_matches_the_green_book() -> None:
    assert cosem.encode_aarq(b"12345678", conformance=0x007E1F, max_pdu=1200) == DLMS_COSEM_AARQ_LLS
    got = cosem.decode_aarq(DLMS_COSEM_AARQ_LLS)
    assert got.password == b"12345678"
    assert got.mechanism == cosem.MECHANISM_LLS
    assert (got.conformance, got.max_pdu) == (0x007E1F, 1200)


def test_aare_accepted_and_rejected() -> None:
    ok = cosem.decode_aare(GREEN_BOOK_AARE_ACCEPTED)
    assert ok.accepted and (ok.conformance, ok.max_pdu) == (0x00501F, 500)
    no = cosem.decode_aare(GREEN_BOOK_AARE_REJECTED)
    assert not no.accepted and no.result == 1 and no.diagnostic == 2
    assert "context" in no.reason
    # our server-side encoder writes the Green Book's accepted AARE byte for byte
    assert cosem.encode_aare(0, 0, 0x00501F, 500) == GREEN_BOOK_AARE_ACCEPTED
    assert cosem.encode_aare(1, 2, 0x00501F, 500) == GREEN_BOOK_AARE_REJECTED


# --- GET ----------------------------------------------------------------------------------------


def test_get_request_normal_and_next() -> None:
    obis = cosem.obis_bytes("0.0.43.1.0.255")
    assert cosem.encode_get_request(1, obis, 2) == b"\xc0\x01\xc1\x00\x01\x00\x00+\x01\x00\xff\x02\x00"
    assert cosem.encode_get_next(1) == b"\xc0\x02\xc1\x00\x00\x00\x01"
    assert cosem.encode_get_next(3) == b"\xc0\x02\xc1\x00\x00\x00\x03"
    req = cosem.decode_get_request(b"\xc0\x01\xc1\x00\x01\x00\x00+\x01\x00\xff\x02\x00")
    assert (req.class_id, req.obis, req.attribute, req.access_selector) == (1, obis, 2, None)


def test_get_response_value_error_and_block() -> None:
    r = cosem.decode_get_response(b"\xc4\x01\xc1\x00\x06\x00\x00\x13\x91")
    assert r.error is None and cosem.decode_value(r.data or b"") == 5009
    e = cosem.decode_get_response(b"\xc4\x01\xc1\x01\x01")
    assert e.error == 1 and e.error_text == "hardware-fault"
    # DLMS_COSEM TestGetResponseWithBlock: not last, block 1, raw data of 0x049e bytes
    head = b"\xc4\x02\xc1\x00\x00\x00\x00\x01\x00\x82\x04\x9e"
    b = cosem.decode_get_response(head + bytes(0x049E))
    assert (b.block, b.last, len(b.data or b"")) == (1, False, 0x049E)
    with pytest.raises(CosemError):
        cosem.decode_get_response(head + bytes(10))  # the block is shorter than it says


DLMS_COSEM_RANGE_REQUEST = (
    b"\xc0\x01\xc1\x00\x07\x01\x00c\x01\x00\xff\x02\x01\x01\x02\x04\x02\x04\x12\x00\x08\t\x06\x00\x00\x01\x00\x00"
    b"\xff\x0f\x02\x12\x00\x00\t\x0c\x07\xe1\n\x01\x07\x00\x00\x00\x00\xff\xc4\x80\t\x0c\x07\xe1\n\x01\x07\x01\x00"
    b"\x00\x00\xff\xc4\x80\x01\x00"
)


def test_selective_access_by_range() -> None:
    req = cosem.decode_get_request(DLMS_COSEM_RANGE_REQUEST)
    assert (req.class_id, cosem.obis_text(req.obis), req.attribute, req.access_selector) == (7, "1.0.99.1.0.255", 2, 1)
    restricting, lo, hi, columns = req.access
    assert restricting == Structure((8, cosem.obis_bytes("0.0.1.0.0.255"), 2, 0))
    # 2017-10-01 00:00 and 01:00 local, deviation -60 minutes: UTC = local + deviation
    assert cosem.decode_datetime(lo) == datetime(2017, 9, 30, 23, 0, tzinfo=UTC)
    assert cosem.decode_datetime(hi) == datetime(2017, 10, 1, 0, 0, tzinfo=UTC)
    assert columns == []
    # DLMS_COSEM test_range_descriptor_to_bytes: from 2020-01-01T00:03+02:00 to 2020-01-06T00:03+01:00
    assert cosem.range_descriptor(
        datetime(2020, 1, 1, 0, 3, tzinfo=timezone(timedelta(hours=2))),
        datetime(2020, 1, 6, 0, 3, tzinfo=timezone(timedelta(hours=1))),
    ) == (b"\x01\x02\x04\x02\x04\x12\x00\x08\t\x06\x00\x00\x01\x00\x00\xff\x0f\x02\x12\x00\x00\t\x0c\x07\xe4\x01\x01"
          b"\xff\x00\x03\x00\x00\xff\x88\x00\t\x0c\x07\xe4\x01\x06\xff\x00\x03\x00\x00\xff\xc4\x00\x01\x00")


def test_capture_object_definition() -> None:
    # DLMS_COSEM test_capture_object_definition: the clock column of a profile
    assert cosem.enc_struct(cosem.enc_u16(8), cosem.enc_octets(cosem.obis_bytes("0.0.1.0.0.255")),
                            cosem.enc_i8(2), cosem.enc_u16(0)) == (
        b"\x02\x04\x12\x00\x08\t\x06\x00\x00\x01\x00\x00\xff\x0f\x02\x12\x00\x00")


# --- A-XDR values of a real meter -------------------------------------------------------------


def test_register_with_scaler_unit_from_a_real_meter() -> None:
    # AMSREADER austria.raw: OBIS 1.0.1.8.0.255, double-long-unsigned 0x00433D0A, {scaler 0, unit 30 = Wh}
    entry = bytes.fromhex("0906010001 0800FF 0600433D0A 02020F00161E".replace(" ", ""))
    obis, pos = cosem.decode_data(entry)
    value, pos = cosem.decode_data(entry, pos)
    su_raw, pos = cosem.decode_data(entry, pos)
    assert pos == len(entry)
    assert cosem.obis_text(obis) == "1.0.1.8.0.255"
    su = cosem.parse_scaler_unit(su_raw)
    assert (su.scaler, su.unit_text) == (0, "Wh")
    assert su.apply(value) / 1000 == Decimal("4406.538")
    # voltage 0x0934 with scaler -1 (0F FF) and unit 35 = V: 235.6 V exactly
    volt = bytes.fromhex("120934 02020FFF1623")
    v, p = cosem.decode_data(volt)
    su2 = cosem.parse_scaler_unit(cosem.decode_data(volt, p)[0])
    assert (su2.apply(v), su2.unit_text) == (Decimal("235.6"), "V")


def test_datetime_from_a_real_meter() -> None:
    # AMSREADER austria.raw meter timestamp: 2021-12-27 (Monday) 14:00:45, deviation 0xFFC4 (-60), status 02
    raw = bytes.fromhex("07E50C1B010E002D00FFC402")
    assert cosem.decode_datetime(raw) == datetime(2021, 12, 27, 13, 0, 45, tzinfo=UTC)
    # and back: the same bytes from the same instant at UTC+1 with that status
    again = cosem.encode_datetime(datetime(2021, 12, 27, 14, 0, 45, tzinfo=timezone(timedelta(hours=1))), status=2)
    assert again == raw


def test_datetime_without_deviation_takes_the_meters_zone() -> None:
    from zoneinfo import ZoneInfo

    raw = bytes.fromhex("07EA030F070C000000800000")  # 2026-03-15 12:00 local, deviation not specified
    assert cosem.decode_datetime(raw, ZoneInfo("Europe/Moscow")) == datetime(2026, 3, 15, 9, 0, tzinfo=UTC)
    with pytest.raises(CosemError):
        cosem.decode_datetime(bytes.fromhex("07EA03FF070C000000800000"))  # day unspecified


def test_wrapper_header() -> None:
    # IEC 62056-47: version 1, source wPort (client 0x10), destination wPort (1), length
    assert cosem.wrap(0x10, 1, b"\xc0\x01") == bytes.fromhex("0001001000010002c001")
    assert cosem.unwrap_header(bytes.fromhex("0001000100100002")) == (1, 0x10, 2)
    with pytest.raises(CosemError):
        cosem.unwrap_header(bytes.fromhex("0002000100100002"))
