"""Our SPODES simulator and codecs against an independent implementation: gurux-dlms.

gurux-dlms (GPL-2.0, a dev dependency only: nothing at runtime imports it)
builds and parses every frame itself; we only move its bytes over the real
pseudo-terminal and TCP socket. If our simulator and our client shared a
misunderstanding of the standard, gurux would not: association with a
password (LLS), the registers and their scaler_unit, the clock, the load
profile read by range with block transfer and HDLC segmentation, over
HDLC at a physical address and over the IEC 62056-47 wrapper, and a wrong
password rejected. The other way round, our decoders read the AARQ and
GET-Request bytes gurux produces.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import serial
from gurux_dlms import GXByteBuffer, GXDateTime, GXDLMSClient, GXDLMSException, GXReplyData
from gurux_dlms.enums import Authentication, InterfaceType
from gurux_dlms.objects import GXDLMSClock, GXDLMSProfileGeneric, GXDLMSRegister

from adapters import cosem, hdlc
from simulators.dlms_sim import HdlcMeterLine, SimMeter, WrapperMeter

NOW = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)


def _now() -> datetime:
    return NOW


class GuruxLink:
    """Moves gurux's bytes over a real port; gurux frames and parses everything."""

    def __init__(self, client: GXDLMSClient, write: Callable[[bytes], object], read: Callable[[], bytes]):
        self.client, self.write, self.read = client, write, read

    def packet(self, data: bytes, reply: GXReplyData) -> None:
        notify = GXReplyData()
        self.write(bytes(data))
        rd = GXByteBuffer()
        end = time.monotonic() + 5
        while not self.client.getData(rd, reply, notify):
            chunk = self.read()
            if chunk:
                rd.set(chunk)
            if time.monotonic() > end:
                raise TimeoutError("gurux got no complete answer")
        if reply.error != 0:
            raise RuntimeError(f"gurux reply error {reply.error}")

    def block(self, data: bytes | list[bytes], reply: GXReplyData) -> None:
        if isinstance(data, list):
            for it in data:
                reply.clear()
                self.block(it, reply)
            return
        self.packet(data, reply)
        while reply.isMoreData():
            self.packet(self.client.receiverReady(reply), reply)

    def open(self) -> None:
        r = GXReplyData()
        snrm = self.client.snrmRequest()
        if snrm:
            self.packet(snrm, r)
            self.client.parseUAResponse(r.data)
            r.clear()
        self.block(self.client.aarqRequest(), r)
        self.client.parseAareResponse(r.data)

    def read_attr(self, obj: object, attr: int) -> object:
        r = GXReplyData()
        self.block(self.client.read(obj, attr), r)
        return self.client.updateValue(obj, attr, r.value)


def _hdlc_client(password: bytes) -> GXDLMSClient:
    return GXDLMSClient(True, 0x20, GXDLMSClient.getServerAddress(1, 17), Authentication.LOW, password,
                        InterfaceType.HDLC)


@pytest.fixture
def meter() -> SimMeter:
    return SimMeter(17, "12345678", seed=5, now=_now)


@pytest.fixture
def hdlc_line(meter: SimMeter):
    with HdlcMeterLine([meter], 9600) as line:
        yield line


def _serial_link(client: GXDLMSClient, device: str) -> tuple[GuruxLink, serial.Serial]:
    ser = serial.Serial(device, 9600, timeout=0.2)
    return GuruxLink(client, ser.write, lambda: ser.read(max(1, ser.in_waiting))), ser


def test_gurux_reads_registers_clock_and_profile_over_hdlc(meter: SimMeter, hdlc_line: HdlcMeterLine) -> None:
    link, ser = _serial_link(_hdlc_client(b"12345678"), hdlc_line.device)
    try:
        link.open()
        assert meter.associations == 1
        for obis, reg in (("1.0.1.8.0.255", "1.8.0"), ("1.0.1.8.2.255", "1.8.2")):
            r = GXDLMSRegister(obis)
            link.read_attr(r, 3)
            link.read_attr(r, 2)
            assert r.unit == 30 and r.scaler == 10  # gurux gives the factor 10**scaler
            assert round(r.value) == meter.register_wh(reg, NOW) // 10 * 10  # Wh, in steps of 10 Wh
        clock = GXDLMSClock("0.0.1.0.0.255")
        link.read_attr(clock, 2)
        assert clock.time.value == NOW  # gurux reads our date-time (deviation -180) as the same instant
        pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
        link.read_attr(pg, 3)
        assert [c[0].logicalName for c in pg.captureObjects] == ["0.0.1.0.0.255", "1.0.1.29.0.255"]
        link.read_attr(pg, 4)
        assert pg.capturePeriod == 1800
        r = GXReplyData()
        # six hours of slots (13 records stamped 03:00..09:00 UTC inclusive): several data blocks,
        # each in several HDLC segments
        link.block(link.client.readRowsByRange(pg, GXDateTime(datetime(2026, 3, 1, 3, 0, tzinfo=UTC)),
                                               GXDateTime(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))), r)
        link.client.updateValue(pg, 2, r.value)
        stamps = [row[0].value for row in pg.buffer]
        assert stamps == [datetime(2026, 3, 1, 3, 0, tzinfo=UTC) + timedelta(minutes=30 * i) for i in range(13)]
        assert [row[1] for row in pg.buffer] == [meter.slot_wh(t - timedelta(minutes=30)) for t in stamps]
        link.packet(link.client.disconnectRequest(), GXReplyData())
    finally:
        ser.close()


def test_gurux_sees_the_wrong_password_rejected(meter: SimMeter, hdlc_line: HdlcMeterLine) -> None:
    link, ser = _serial_link(_hdlc_client(b"00000000"), hdlc_line.device)
    try:
        with pytest.raises(GXDLMSException) as exc:
            link.open()
        # gurux reads our AARE as "permanently rejected, authentication failure"
        assert "Authentication failure" in str(exc.value) and "rejected" in str(exc.value)
        assert meter.rejected == 1 and meter.associations == 0
    finally:
        ser.close()


def test_gurux_over_the_tcp_wrapper() -> None:
    sim = SimMeter(None, "12345678", seed=9, now=_now)
    with WrapperMeter(sim) as w:
        sock = socket.create_connection((w.host, w.port), timeout=5)
        sock.settimeout(0.2)

        def recv() -> bytes:
            try:
                return sock.recv(4096)
            except TimeoutError:
                return b""

        client = GXDLMSClient(True, 0x20, 1, Authentication.LOW, b"12345678", InterfaceType.WRAPPER)
        link = GuruxLink(client, sock.sendall, recv)
        try:
            link.open()
            r = GXDLMSRegister("1.0.1.8.1.255")
            link.read_attr(r, 3)
            link.read_attr(r, 2)
            assert round(r.value) == sim.register_wh("1.8.1", NOW) // 10 * 10
            clock = GXDLMSClock("0.0.1.0.0.255")
            link.read_attr(clock, 2)
            assert clock.time.value == NOW
        finally:
            sock.close()


def test_our_decoders_read_the_bytes_gurux_produces() -> None:
    client = _hdlc_client(b"12345678")
    # gurux's SNRM for logical 1 / physical 17 from client 0x20 equals ours
    snrm = bytes(client.snrmRequest())
    assert snrm == hdlc.encode_frame(hdlc.encode_server_address(1, 17), hdlc.encode_client_address(0x20), hdlc.SNRM)
    # gurux's AARQ (in its I-frame) carries our LLS password and a logical-name context
    client.parseUAResponse(GXByteBuffer(hdlc.encode_parameters(hdlc.LinkParameters())))
    frames = client.aarqRequest()
    frame = hdlc.decode_frame(bytes(frames[0]))
    assert frame.is_information and frame.info[:3] == hdlc.LLC_REQUEST
    aarq = cosem.decode_aarq(frame.info[3:])
    assert aarq.password == b"12345678" and aarq.context == cosem.LN_NO_CIPHERING
    assert aarq.mechanism == cosem.MECHANISM_LLS
    # a gurux wrapper GET for a register's value decodes to the same request as ours
    wclient = GXDLMSClient(True, 0x20, 1, Authentication.NONE, None, InterfaceType.WRAPPER)
    raw = bytes(wclient.read(GXDLMSRegister("1.0.1.8.0.255"), 2)[0])
    assert cosem.unwrap_header(raw[:8]) == (0x20, 1, len(raw) - 8)
    req = cosem.decode_get_request(raw[8:])
    assert (req.class_id, cosem.obis_text(req.obis), req.attribute) == (3, "1.0.1.8.0.255", 2)
    assert raw[8:11] == bytes((cosem.GET_REQUEST, cosem.NORMAL, raw[10]))
    assert raw[11:] == cosem.encode_get_request(3, cosem.obis_bytes("1.0.1.8.0.255"), 2, invoke=raw[10])[3:]
