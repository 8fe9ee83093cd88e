"""DLMS/COSEM meters with the SPODES profile (`adapter = "dlms"`): HDLC on a serial
line (RS-485, optical probe) or through a TCP converter, or the TCP wrapper.

Library decision. The reader is our own thin client on the small codecs in
`adapters.hdlc` and `adapters.cosem` (about a thousand lines together):

- `gurux-dlms` is GPL-2.0: an Apache-2.0 project cannot ship it as a runtime
  dependency. It is a dev dependency only, as the independent implementation
  the tests talk to our simulator with (tests/test_dlms_gurux.py);
- `dlms-cosem` changed to the Business Source License from 24.1 (not open
  source; "competing use" excluded); 21.3.2, the last MIT release, is
  unmaintained since 2021 and would be ours to fix anyway;
- a household reader needs little of DLMS: HDLC frames and segmentation,
  A-XDR, AARQ/AARE with a password (LLS), GET with block transfer and
  selective access by range, one ACTION and one SET for the clock. No
  ciphering (HLS) yet: SPODES reader access (client 32) is LLS.

The exchange, per poll: SNRM/UA (HDLC only), AARQ/AARE, then GETs: each
register's value (attribute 2) and scaler_unit (attribute 3, cached per meter),
the clock (0.0.1.0.0.255), and for back-fill the load profile's buffer by
range; then DISC (HDLC) or closing the socket (wrapper). The objects are data
(`adapters/schemas/dlms-spodes.toml`).

Faults are `PollError`s naming the meter, the bus and the reason: silence
("timeout"), a frame still arriving at its deadline ("deadline"), a bad
HCS/FCS ("crc"), bytes that are no frame ("garbage"), a rejected association
("refused", and the message says "password" when the meter says so), an
access error in place of a value ("exception"), a value that is no number
or no energy ("decode"). Nothing of a failed poll is returned.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import serial

from adapters import cosem, hdlc, quality
from adapters.base import AdapterSettings, PollError, ProfileSlot
from adapters.reading import Reading

SPEC_PATH = Path(__file__).parent / "schemas" / "dlms-spodes.toml"
TRANSPORTS = ("hdlc", "wrapper")
DEFAULT_BAUD = 9600
DEFAULT_TCP_PORT = 4059  # IANA dlms/cosem
CLASS_DATA, CLASS_REGISTER, CLASS_PROFILE, CLASS_CLOCK = 1, 3, 7, 8
SHIFT_TIME_LIMIT_S = 900  # clock method 6 shifts by at most ±900 s
# the gateway's daily correction step for SPODES meters (clock_correction = true): a reader's
# shift_time of at most 30 s a day, the limit Russian supplier practice quotes for a synchronisation
# without a configurator session (unverified against the standard's text)
DAILY_CLOCK_STEP_S = 30.0


@dataclass(frozen=True)
class Spec:
    """The SPODES object table: which logical name holds what."""

    clock: bytes
    serial_number: bytes
    registers: dict[str, tuple[bytes, int]]  # our register -> (logical name, class)
    profiles: dict[str, bytes]  # load, daily, monthly -> logical name
    interval_columns: dict[bytes, str]  # a load-profile column -> the register it adds to


def load_spec(path: Path = SPEC_PATH) -> Spec:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return Spec(
        clock=cosem.obis_bytes(data["clock"]),
        serial_number=cosem.obis_bytes(data["serial_number"]),
        registers={k: (cosem.obis_bytes(v["obis"]), int(v["class"])) for k, v in data["registers"].items()},
        profiles={k: cosem.obis_bytes(v["obis"]) for k, v in data["profiles"].items()},
        interval_columns={cosem.obis_bytes(k): v for k, v in data["interval_columns"].items()},
    )


SPEC = load_spec()


class DlmsMeter(Protocol):
    """What this adapter reads of a meter besides the keys every polled meter has.

    The DLMS keys (`transport`, `client_address`, `server_address`,
    `physical_address`, `tcp_port`) are read with defaults when a meter
    object lacks them, so the scheduler's `AnyMeter` fits as it is.
    """

    @property
    def id(self) -> str: ...
    @property
    def bus_name(self) -> str: ...
    @property
    def port(self) -> int | str | None: ...
    @property
    def host(self) -> str | None: ...
    @property
    def baudrate(self) -> int | None: ...
    @property
    def timeout(self) -> float: ...
    @property
    def registers(self) -> Sequence[str]: ...
    @property
    def password(self) -> str | None: ...


def _key(meter: Any, name: str, default: Any = None) -> Any:
    return getattr(meter, name, default)


def transport_of(meter: DlmsMeter) -> str:
    return _key(meter, "transport") or "hdlc"


def client_of(meter: DlmsMeter) -> int:
    got = _key(meter, "client_address")
    if got is not None:
        return int(got)
    return hdlc.CLIENT_READER if meter.password else hdlc.CLIENT_PUBLIC


def check_meter(meter: DlmsMeter) -> list[str]:
    """Problems with a dlms meter's inventory keys (each names the key), for refusal at start-up."""
    problems = []
    kind = transport_of(meter)
    if kind not in TRANSPORTS:
        problems.append(f"key 'transport': one of {', '.join(TRANSPORTS)} (got {kind!r})")
    over_tcp = bool(meter.host)
    if kind == "wrapper" and not over_tcp:
        problems.append("key 'host': the TCP wrapper needs the meter's or modem's host (and `tcp_port`, default 4059)")
    if not over_tcp and not (isinstance(meter.port, str) and meter.port.startswith("/")):
        problems.append(f"key 'port': a serial device path like /dev/ttyUSB0 is needed, or `host` and `tcp_port` "
                        f"(got {meter.port!r})")
    client = _key(meter, "client_address")
    if client is not None and not 1 <= int(client) <= 0x7F:
        problems.append(f"key 'client_address': 1..127 (16 public, 32 reader, 48 configurator; got {client})")
    logical = _key(meter, "server_address")
    if logical is not None and not 0 <= int(logical) <= 0x3FFF:
        problems.append(f"key 'server_address': the logical device, 0..16383 (usually 1; got {logical})")
    phys = _key(meter, "physical_address")
    if phys is not None and not 0 <= int(phys) <= 0x3FFF:
        problems.append(f"key 'physical_address': 0..16383 (got {phys})")
    for reg in meter.registers:
        if reg not in SPEC.registers:
            problems.append(f"key 'registers': {reg!r} is not a register this adapter reads "
                            f"({', '.join(SPEC.registers)})")
    if meter.password is not None and len(meter.password.encode("latin-1", "replace")) > 64:
        problems.append("key 'password': at most 64 characters")
    return problems


# --- byte streams ------------------------------------------------------------------------


class _Stream(Protocol):
    def write(self, data: bytes) -> None: ...
    def read(self, timeout: float) -> bytes: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...
    @property
    def baudrate(self) -> int | None: ...


class SerialStream:
    """A serial port, 8N1 (HDLC's character format)."""

    def __init__(self, port: str, baudrate: int):
        self.ser = serial.Serial(port, baudrate, timeout=0.5, write_timeout=5.0)

    @property
    def baudrate(self) -> int | None:
        return int(self.ser.baudrate)

    def write(self, data: bytes) -> None:
        self.ser.write(data)
        self.ser.flush()

    def read(self, timeout: float) -> bytes:
        if self.ser.timeout != timeout:
            self.ser.timeout = timeout
        return bytes(self.ser.read(max(1, min(self.ser.in_waiting, 4096))))

    def reset(self) -> None:
        self.ser.reset_input_buffer()

    def close(self) -> None:
        self.ser.close()


class SocketStream:
    """A TCP connection: to a wrapper-speaking meter or modem, or a transparent converter."""

    def __init__(self, host: str, port: int, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=max(timeout, 1.0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def baudrate(self) -> int | None:
        return None

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float) -> bytes:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            got = self.sock.recv(4096)
        except TimeoutError:
            return b""
        if not got:
            raise ConnectionError("the meter closed the connection")
        return got

    def reset(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- sessions ------------------------------------------------------------------------------


class _Fail(Exception):
    """Inside a session: a failure with its outcome word; the adapter adds the meter."""

    def __init__(self, outcome: str, reason: str, raw: bytes | None = None):
        self.outcome = outcome
        self.raw = raw
        super().__init__(reason)


@dataclass
class Wire:
    """Bytes that crossed the line, for the benchmark's line bound."""

    sent: int = 0
    received: int = 0
    frames: int = 0


class HdlcSession:
    """One HDLC link to one meter: SNRM/UA, I-frames with segmentation, DISC."""

    def __init__(self, stream: _Stream, client: int, logical: int, physical: int | None, timeout: float,
                 address_size: int | None = None, wire: Wire | None = None):
        self.stream = stream
        self.client = hdlc.encode_client_address(client)
        self.server = hdlc.encode_server_address(logical, physical, address_size)
        self.timeout = timeout
        self.ns = self.nr = 0
        self.params = hdlc.LinkParameters()
        self.reader = hdlc.FrameReader()
        self.wire = wire or Wire()
        self.connected = False

    def _deadline(self, nbytes: int) -> float:
        baud = self.stream.baudrate
        line = nbytes * 10 / baud if baud else 0.0
        return self.timeout + 2 * line + 0.25

    def _send(self, control: int, info: bytes = b"", segmented: bool = False) -> None:
        raw = hdlc.encode_frame(self.server, self.client, control, info, segmented)
        self.stream.write(raw)
        self.wire.sent += len(raw)
        self.wire.frames += 1

    def _receive(self, what: str) -> hdlc.Frame:
        """The next frame from our meter to us; frames for others are skipped."""
        most = self.params.max_info_rx + 16
        end = time.monotonic() + self._deadline(most)
        got_any = False
        while True:
            for raw in self.reader.feed(b""):
                frame = self._take(raw, what)
                if frame is not None:
                    return frame
            left = end - time.monotonic()
            if left <= 0:
                raise _Fail("deadline" if got_any else "timeout",
                            f"{what} not complete within {self._deadline(most):.2f} s" if got_any
                            else f"no {what} within {self.timeout:g} s")
            chunk = self.stream.read(min(self.timeout, left))
            if not chunk:
                if got_any or self.reader.pending:
                    raise _Fail("garbage", f"incomplete {what}: {self.reader.pending} bytes then silence")
                raise _Fail("timeout", f"no {what} within {self.timeout:g} s")
            got_any = True
            self.wire.received += len(chunk)
            for raw in self.reader.feed(chunk):
                frame = self._take(raw, what)
                if frame is not None:
                    return frame
            if self.reader.junk > 64:
                raise _Fail("garbage", f"{self.reader.junk} bytes of no HDLC frame instead of the {what}")

    def _take(self, raw: bytes, what: str) -> hdlc.Frame | None:
        try:
            frame = hdlc.decode_frame(raw)
        except hdlc.HdlcError as exc:
            raise _Fail(exc.outcome, f"{what}: {exc}", raw) from None
        if frame.dest != self.client or frame.src != self.server:
            return None  # another meter's or client's frame on a shared line
        self.wire.frames += 1
        return frame

    def connect(self) -> None:
        self.stream.reset()
        self.reader = hdlc.FrameReader()
        self._send(hdlc.SNRM)
        frame = self._receive("UA to SNRM")
        if frame.control == hdlc.DM:
            raise _Fail("refused", "the meter answered SNRM with DM (disconnected mode: busy or wrong address)")
        if frame.control != hdlc.UA:
            raise _Fail("garbage", f"answer to SNRM is control {frame.control:#04x}, not UA")
        try:
            ua = hdlc.decode_parameters(frame.info)
        except hdlc.HdlcError as exc:
            raise _Fail("garbage", f"UA parameters: {exc}") from None
        # the meter's transmit length is what we receive, and the other way round
        self.params = hdlc.LinkParameters(ua.max_info_rx, ua.max_info_tx, 1, 1)
        self.ns = self.nr = 0
        self.connected = True

    def request(self, apdu: bytes) -> bytes:
        payload = hdlc.LLC_REQUEST + apdu
        parts = hdlc.segments(payload, self.params.max_info_tx)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            self._send(hdlc.i_control(self.ns, self.nr), part, segmented=not last)
            self.ns = (self.ns + 1) % 8
            if not last:
                ack = self._receive("RR to a request segment")
                if not ack.is_rr:
                    raise _Fail("garbage", f"expected RR between request segments, got {ack.control:#04x}")
        data = bytearray()
        while True:
            frame = self._receive("answer")
            if frame.control in (hdlc.DM, hdlc.FRMR):
                raise _Fail("refused", "the meter dropped the link (HDLC " + ("DM" if frame.control == hdlc.DM
                            else "FRMR") + ") instead of answering: another client on the line, or it restarted")
            if not frame.is_information:
                raise _Fail("garbage", f"expected an I-frame answer, got control {frame.control:#04x}")
            self.nr = (frame.send_seq + 1) % 8
            data += frame.info
            if not frame.segmented:
                break
            self._send(hdlc.rr_control(self.nr))
        if bytes(data[:3]) != hdlc.LLC_RESPONSE:
            raise _Fail("garbage", f"answer without the LLC header E6 E7 00: {bytes(data[:8]).hex(' ')}", bytes(data))
        return bytes(data[3:])

    def disconnect(self) -> None:
        if not self.connected:  # no link to close: a silent address costs one timeout, not two
            return
        self.connected = False
        try:
            self._send(hdlc.DISC)
            self._receive("UA to DISC")
        except (_Fail, OSError, serial.SerialException):
            pass


class WrapperSession:
    """The IEC 62056-47 wrapper: an 8-byte header before every APDU."""

    def __init__(self, stream: _Stream, client: int, logical: int, timeout: float, wire: Wire | None = None):
        self.stream = stream
        self.client = client
        self.logical = logical
        self.timeout = timeout
        self.buf = bytearray()
        self.wire = wire or Wire()

    def connect(self) -> None:
        pass

    def _read_exact(self, n: int, end: float, what: str) -> bytes:
        while len(self.buf) < n:
            left = end - time.monotonic()
            if left <= 0:
                raise _Fail("deadline" if self.buf else "timeout", f"no complete {what} in time")
            chunk = self.stream.read(min(self.timeout, left))
            if not chunk:
                if self.buf:
                    raise _Fail("garbage", f"incomplete {what}: {len(self.buf)} bytes then silence")
                raise _Fail("timeout", f"no {what} within {self.timeout:g} s")
            self.buf += chunk
            self.wire.received += len(chunk)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def request(self, apdu: bytes) -> bytes:
        raw = cosem.wrap(self.client, self.logical, apdu)
        self.stream.write(raw)
        self.wire.sent += len(raw)
        end = time.monotonic() + self.timeout + 5.0
        header = self._read_exact(cosem.WRAPPER_HEADER, end, "wrapper header")
        try:
            source, dest, length = cosem.unwrap_header(header)
        except cosem.CosemError as exc:
            raise _Fail(exc.outcome, str(exc), header) from None
        body = self._read_exact(length, end, "wrapper body")
        if dest != self.client or source != self.logical:
            raise _Fail("garbage", f"wrapper answer from wPort {source} to {dest}, expected {self.logical} to {self.client}")
        self.wire.frames += 1
        return body

    def disconnect(self) -> None:
        try:
            self.request(cosem.RLRQ)
        except (_Fail, OSError):
            pass


class Session(Protocol):
    def connect(self) -> None: ...
    def request(self, apdu: bytes) -> bytes: ...
    def disconnect(self) -> None: ...


class Client:
    """The COSEM services over a session: associate, get (with blocks), set, action."""

    def __init__(self, session: Session, tz: ZoneInfo):
        self.session = session
        self.tz = tz

    def associate(self, password: str | None) -> cosem.Aare:
        pw = None if password is None else password.encode("latin-1", "replace")
        answer = self.session.request(cosem.encode_aarq(pw))
        try:
            aare = cosem.decode_aare(answer)
        except cosem.CosemError as exc:
            raise _Fail(exc.outcome, f"AARE: {exc}", answer) from None
        if not aare.accepted:
            if aare.diagnostic in (11, 12, 13, 14):
                raise _Fail("refused", f"the meter rejected the password (AARE: {aare.reason}); "
                                       "check key 'password' and 'client_address'")
            raise _Fail("refused", f"the meter rejected the association (AARE: {aare.reason})")
        return aare

    def get(self, class_id: int, obis: bytes, attribute: int, access: bytes | None = None) -> Any:
        what = f"{cosem.obis_text(obis)} attribute {attribute}"
        answer = self.session.request(cosem.encode_get_request(class_id, obis, attribute, access))
        collected = bytearray()
        while True:
            try:
                resp = cosem.decode_get_response(answer)
            except cosem.CosemError as exc:
                raise _Fail(exc.outcome, f"{what}: {exc}", answer) from None
            if resp.error is not None:
                raise _Fail("exception", f"{what}: the meter answered {resp.error_text}", answer)
            assert resp.data is not None
            if resp.block is None:
                collected += resp.data
                break
            collected += resp.data
            if resp.last:
                break
            answer = self.session.request(cosem.encode_get_next(resp.block))
        try:
            return cosem.decode_value(bytes(collected))
        except cosem.CosemError as exc:
            raise _Fail(exc.outcome, f"{what}: {exc}", bytes(collected)) from None

    def set(self, class_id: int, obis: bytes, attribute: int, value: bytes) -> None:
        answer = self.session.request(cosem.encode_set_request(class_id, obis, attribute, value))
        result = self._result(answer, cosem.SET_RESPONSE, "SET")
        if result:
            raise _Fail("exception", f"SET {cosem.obis_text(obis)}/{attribute}: "
                                     f"{cosem.ACCESS_RESULTS.get(result, result)}")

    def action(self, class_id: int, obis: bytes, method: int, value: bytes | None) -> None:
        answer = self.session.request(cosem.encode_action_request(class_id, obis, method, value))
        result = self._result(answer, cosem.ACTION_RESPONSE, "ACTION")
        if result:
            raise _Fail("exception", f"ACTION {cosem.obis_text(obis)} method {method}: result {result}")

    @staticmethod
    def _result(answer: bytes, tag: int, what: str) -> int:
        try:
            return cosem.decode_result_response(answer, tag, what)
        except cosem.CosemError as exc:
            raise _Fail(exc.outcome, str(exc), answer) from None

    # objects

    def clock(self) -> datetime:
        raw = self.get(CLASS_CLOCK, SPEC.clock, 2)
        if not isinstance(raw, bytes):
            raise _Fail("decode", f"the clock is {type(raw).__name__}, not a date-time octet string")
        try:
            t = cosem.decode_datetime(raw, self.tz)
        except cosem.CosemError as exc:
            raise _Fail("decode", f"clock: {exc}", raw) from None
        if t is None:
            raise _Fail("decode", "the clock is not set (all fields unspecified)", raw)
        return t


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """One row of a daily or monthly profile: cumulative registers (kWh) at ts."""

    ts: datetime
    values: dict[str, Decimal]


@dataclass
class Poll:
    """One poll: what the meter said, and what crossed the line."""

    values: dict[str, Decimal]  # register -> kWh
    units: dict[str, str]
    meter_time: datetime
    polled_at: datetime
    wire: Wire = field(default_factory=Wire)


def energy_kwh(raw: Any, su: cosem.ScalerUnit, what: str) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _Fail("decode", f"{what}: value {raw!r} is not an integer")
    if su.unit not in cosem.ENERGY_UNITS:
        raise _Fail("decode", f"{what}: unit {su.unit_text!r} is not an energy unit (Wh, varh, VAh)")
    return su.apply(raw) / 1000


class DlmsAdapter:
    """Reads SPODES meters; one lock per serial port or TCP endpoint."""

    def __init__(self, settings: AdapterSettings, clock_tolerance_s: float | None = None,
                 now: Callable[[], datetime] | None = None) -> None:
        self._tz = ZoneInfo(settings.timezone)
        self._tolerance = timedelta(
            seconds=settings.clock_skew_tolerance_s if clock_tolerance_s is None else clock_tolerance_s)
        self._now = now or (lambda: datetime.now(UTC))
        self._ports: dict[str, SerialStream] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._scalers: dict[tuple[str, bytes], cosem.ScalerUnit] = {}
        self._columns: dict[tuple[str, bytes], tuple[list[tuple[bytes, int, int]], int]] = {}
        self.last_wire = Wire()  # the bytes of the latest exchange (benchmarks' line bound)
        self._offsets: dict[str, float] = {}

    # --- public interface ---------------------------------------------------------

    async def read(self, meter: DlmsMeter) -> list[Reading]:
        return await asyncio.to_thread(self.read_blocking, meter)

    async def read_profile(self, meter: DlmsMeter, start: datetime, end: datetime, limit: int) -> list[ProfileSlot]:
        return await asyncio.to_thread(self.read_profile_blocking, meter, start, end, limit)

    async def read_daily(self, meter: DlmsMeter, start: datetime, end: datetime) -> list[ProfileRecord]:
        return await asyncio.to_thread(self.read_billing_blocking, meter, "daily", start, end)

    async def read_monthly(self, meter: DlmsMeter, start: datetime, end: datetime) -> list[ProfileRecord]:
        return await asyncio.to_thread(self.read_billing_blocking, meter, "monthly", start, end)

    async def correct_clock(self, meter: DlmsMeter, delta_s: float) -> None:
        await asyncio.to_thread(self.correct_clock_blocking, meter, delta_s)

    async def close(self) -> None:
        self.close_blocking()

    def clock_offset(self, meter: DlmsMeter) -> float | None:
        """The meter's clock minus ours at its last read, in seconds (None: not read yet)."""
        return self._offsets.get(meter.id)

    def clock_step_limit(self, meter: DlmsMeter) -> float | None:
        """The largest correction the gateway makes in a day (`DAILY_CLOCK_STEP_S`)."""
        return DAILY_CLOCK_STEP_S

    def close_blocking(self) -> None:
        with self._guard:
            for s in self._ports.values():
                try:
                    s.close()
                except (OSError, serial.SerialException):
                    pass
            self._ports.clear()

    # --- polls --------------------------------------------------------------------

    def read_blocking(self, meter: DlmsMeter) -> list[Reading]:
        return self.readings(meter, self.poll(meter))

    def readings(self, meter: DlmsMeter, p: Poll) -> list[Reading]:
        flags: frozenset[str] = frozenset()
        ts = p.polled_at
        if abs(p.meter_time - p.polled_at) > self._tolerance:
            flags = frozenset({quality.CLOCK_SKEW})
        else:
            ts, flags = p.meter_time, frozenset({quality.METER_CLOCK})
        source = self.source(meter)
        return [Reading(meter.id, reg, ts, p.values[reg], flags, source) for reg in meter.registers]

    def source(self, meter: DlmsMeter) -> str:
        where = f"{meter.host}:{_key(meter, 'tcp_port') or DEFAULT_TCP_PORT}" if meter.host else str(meter.port)
        phys = _key(meter, "physical_address")
        return f"dlms:{where}" + (f"/{phys}" if phys is not None else "")

    def poll_available(self, meter: DlmsMeter, registers: Sequence[str]) -> Poll:
        """Like `poll`, leaving out the registers the meter answers with an access error (for `amr poll`)."""
        return self.poll(meter, registers, skip_missing=True)

    def poll(self, meter: DlmsMeter, registers: Sequence[str] | None = None, skip_missing: bool = False) -> Poll:
        """Association, each register with its scaler, the clock; PollError names what failed."""
        regs = list(meter.registers if registers is None else registers)
        with self.client(meter) as (client, wire):
            values: dict[str, Decimal] = {}
            units: dict[str, str] = {}
            for reg in regs:
                obis, class_id = SPEC.registers[reg]
                try:
                    su = self._scaler(meter, client, obis, class_id)
                    raw = client.get(class_id, obis, 2)
                except _Fail as exc:
                    if skip_missing and exc.outcome == "exception":
                        continue
                    raise
                values[reg] = energy_kwh(raw, su, f"register {reg} ({cosem.obis_text(obis)})")
                units[reg] = "k" + su.unit_text
            polled_at = self._now()
            meter_time = client.clock()
            self._offsets[meter.id] = (meter_time - polled_at).total_seconds()
        return Poll(values, units, meter_time, polled_at, wire)

    def read_profile_blocking(self, meter: DlmsMeter, start: datetime, end: datetime, limit: int) -> list[ProfileSlot]:
        """The load profile's slots starting in [start, end), oldest first, at most limit."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("read_profile needs aware datetimes")
        if limit <= 0 or end <= start:
            return []
        obis = SPEC.profiles["load"]
        with self.client(meter) as (client, _wire):
            columns, period = self._profile_columns(meter, client, obis)
            if period <= 0:
                raise _Fail("decode", f"load profile {cosem.obis_text(obis)} has no capture period")
            step = timedelta(seconds=period)
            last = min(end, start + step * limit)
            # records are stamped at their interval's end; the range is inclusive at both ends
            rows = self._rows(client, obis, start + step, last + step - timedelta(seconds=1), period)
            scalers = {col: self._scaler(meter, client, col, cls) for col, cls, _ in columns[1:]
                       if col in SPEC.interval_columns}
            out: list[ProfileSlot] = []
            for stamp, cells in rows:
                slot_start = stamp - step
                if not start <= slot_start < end:
                    continue
                for (col, _cls, _attr), cell in zip(columns[1:], cells[1:], strict=False):
                    reg = SPEC.interval_columns.get(col)
                    if reg is None:
                        continue
                    wh: int | None = None
                    if cell is not None:
                        kwh = energy_kwh(cell, scalers[col], f"load profile column {cosem.obis_text(col)}")
                        wh = int((kwh * 1000).to_integral_value(ROUND_HALF_EVEN))
                    out.append(ProfileSlot(slot_start, stamp, reg, wh))
        out.sort(key=lambda s: (s.start, s.register))
        slots = sorted({s.start for s in out})[:limit]
        keep = set(slots)
        return [s for s in out if s.start in keep]

    def read_billing_blocking(self, meter: DlmsMeter, which: str, start: datetime, end: datetime) -> list[ProfileRecord]:
        """Rows of the daily or monthly profile stamped in [start, end]: cumulative kWh per register."""
        obis = SPEC.profiles[which]
        reverse = {o: r for r, (o, _c) in SPEC.registers.items()}
        with self.client(meter) as (client, _wire):
            columns, period = self._profile_columns(meter, client, obis)
            rows = self._rows(client, obis, start, end, period)
            scalers = {col: self._scaler(meter, client, col, cls) for col, cls, _ in columns[1:] if col in reverse}
            out = []
            for stamp, cells in rows:
                values = {}
                for (col, _cls, _attr), cell in zip(columns[1:], cells[1:], strict=False):
                    if col in reverse and cell is not None:
                        values[reverse[col]] = energy_kwh(cell, scalers[col], f"{which} profile {cosem.obis_text(col)}")
                out.append(ProfileRecord(stamp, values))
        return out

    def correct_clock_blocking(self, meter: DlmsMeter, delta_s: float) -> None:
        """Shift the meter's clock by delta_s (positive = forward): method 6 up to ±900 s, else a SET."""
        with self.client(meter) as (client, _wire):
            if abs(delta_s) <= SHIFT_TIME_LIMIT_S and float(delta_s).is_integer():
                client.action(CLASS_CLOCK, SPEC.clock, 6, cosem.enc_i16(int(delta_s)))
            else:
                now = client.clock() + timedelta(seconds=delta_s)
                client.set(CLASS_CLOCK, SPEC.clock, 2, cosem.enc_octets(
                    cosem.encode_datetime(now.astimezone(self._tz))))

    def identify(self, meter: DlmsMeter) -> str | None:
        """The meter's serial number (0.0.96.1.0.255), for `amr scan`."""
        with self.client(meter) as (client, _wire):
            raw = client.get(CLASS_DATA, SPEC.serial_number, 2)
        if isinstance(raw, bytes):
            return raw.decode("cp1251", errors="replace")
        return None if raw is None else str(raw)

    # --- helpers --------------------------------------------------------------------

    def _scaler(self, meter: DlmsMeter, client: Client, obis: bytes, class_id: int) -> cosem.ScalerUnit:
        key = (meter.id, obis)
        got = self._scalers.get(key)
        if got is None:
            value = client.get(class_id, obis, 3)
            try:
                got = cosem.parse_scaler_unit(value)
            except cosem.CosemError as exc:
                raise _Fail("decode", f"{cosem.obis_text(obis)} attribute 3: {exc}") from None
            self._scalers[key] = got
        return got

    def _profile_columns(self, meter: DlmsMeter, client: Client, obis: bytes) -> tuple[list[tuple[bytes, int, int]], int]:
        key = (meter.id, obis)
        got = self._columns.get(key)
        if got is None:
            objects = client.get(CLASS_PROFILE, obis, 3)
            columns = []
            try:
                for item in objects:
                    class_id, ln, attr = int(item[0]), bytes(item[1]), int(item[2])
                    columns.append((ln, class_id, attr))
            except (TypeError, IndexError, ValueError):
                raise _Fail("decode", f"{cosem.obis_text(obis)} capture_objects is not a list of "
                                      f"(class, logical name, attribute, index): {objects!r}") from None
            if not columns or columns[0][0] != SPEC.clock:
                raise _Fail("decode", f"{cosem.obis_text(obis)}: the first column is not the clock")
            period = client.get(CLASS_PROFILE, obis, 4)
            if not isinstance(period, int) or period < 0:  # 0: captured on an event (billing profiles)
                raise _Fail("decode", f"{cosem.obis_text(obis)} capture_period {period!r} is not seconds")
            got = (columns, period)
            self._columns[key] = got
        return got

    def _rows(self, client: Client, obis: bytes, start: datetime, end: datetime, period: int) -> list[tuple[datetime, list[Any]]]:
        access = cosem.range_descriptor(start.astimezone(self._tz), end.astimezone(self._tz))
        buffer = client.get(CLASS_PROFILE, obis, 2, access)
        if not isinstance(buffer, list):
            raise _Fail("decode", f"{cosem.obis_text(obis)} buffer is not an array")
        rows: list[tuple[datetime, list[Any]]] = []
        previous: datetime | None = None
        for row in buffer:
            if not isinstance(row, cosem.Structure) or not row:
                raise _Fail("decode", f"{cosem.obis_text(obis)}: a buffer row is not a structure")
            cell = row[0]
            if cell is None and previous is not None:  # a compressed row: one period after the last
                stamp = previous + timedelta(seconds=period)
            elif isinstance(cell, bytes):
                try:
                    t = cosem.decode_datetime(cell, self._tz)
                except cosem.CosemError as exc:
                    raise _Fail("decode", f"{cosem.obis_text(obis)} row clock: {exc}") from None
                if t is None:
                    raise _Fail("decode", f"{cosem.obis_text(obis)}: a row without a time")
                stamp = t
            else:
                raise _Fail("decode", f"{cosem.obis_text(obis)}: row clock {cell!r} is no date-time")
            previous = stamp
            rows.append((stamp, list(row)))
        return rows

    @contextmanager
    def client(self, meter: DlmsMeter) -> Iterator[tuple[Client, Wire]]:
        """An associated client for the meter's exchange; failures become PollErrors."""
        where = self.where(meter)
        problems = check_meter(meter)
        if problems:
            raise PollError("refused", f"{where}: " + "; ".join(problems))
        key = self.source(meter)
        with self._lock(key.rsplit("/", 1)[0]):
            stream: _Stream | None = None
            own = False
            session: HdlcSession | WrapperSession | None = None
            try:
                if meter.host:
                    stream = SocketStream(meter.host, int(_key(meter, 'tcp_port') or DEFAULT_TCP_PORT), meter.timeout)
                    own = True
                else:
                    stream = self._serial(str(meter.port), int(meter.baudrate or DEFAULT_BAUD))
                wire = Wire()
                logical = int(_key(meter, "server_address") or 1)
                if transport_of(meter) == "wrapper":
                    session = WrapperSession(stream, client_of(meter), logical, meter.timeout, wire)
                else:
                    session = HdlcSession(stream, client_of(meter), logical, _key(meter, "physical_address"),
                                          meter.timeout, _key(meter, "server_address_size"), wire)
                self.last_wire = wire
                session.connect()
                client = Client(session, self._tz)
                client.associate(meter.password)
                yield client, wire
            except _Fail as exc:
                raise PollError(exc.outcome, f"{where}: {exc}", exc.raw, key if exc.raw else None) from None
            except (OSError, serial.SerialException, ConnectionError) as exc:
                if not own and meter.port is not None:
                    self._drop(str(meter.port))
                raise PollError("refused", f"{where}: {'connection' if own else 'serial port'} failed: {exc}") from None
            finally:
                if session is not None:
                    try:
                        session.disconnect()
                    except Exception:  # a failing goodbye must not hide the poll's result
                        pass
                if own and stream is not None:
                    stream.close()

    def where(self, meter: DlmsMeter) -> str:
        phys = _key(meter, "physical_address")
        return f"meter {meter.id} on {meter.bus_name}" + (f" (physical address {phys})" if phys is not None else "")

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _serial(self, port: str, baudrate: int) -> SerialStream:
        with self._guard:
            s = self._ports.get(port)
        if s is not None and s.ser.is_open:
            if s.ser.baudrate != baudrate:
                s.ser.baudrate = baudrate
            return s
        s = SerialStream(port, baudrate)
        with self._guard:
            self._ports[port] = s
        return s

    def _drop(self, port: str) -> None:
        with self._guard:
            s = self._ports.pop(port, None)
        if s is not None:
            try:
                s.close()
            except (OSError, serial.SerialException):
                pass


@dataclass(frozen=True)
class ScanMeter:
    """A meter as `amr scan` asks one address on a bus (public client, no password)."""

    id: str
    port: str | None
    host: str | None
    tcp_port: int | None
    physical_address: int | None
    baudrate: int | None = DEFAULT_BAUD
    timeout: float = 0.3
    transport: str | None = "hdlc"
    client_address: int | None = hdlc.CLIENT_PUBLIC
    server_address: int | None = 1
    password: str | None = None
    registers: tuple[str, ...] = ()

    @property
    def bus_name(self) -> str:
        return f"{self.host}:{self.tcp_port}" if self.host else str(self.port)


def scan(adapter: DlmsAdapter, *, device: str | None, host: str | None, tcp_port: int | None,
         baudrate: int, addresses: list[int], timeout: float) -> list[dict[str, Any]]:
    """Every physical address that answers SNRM and associates as the public client, with its serial."""
    found = []
    for phys in addresses:
        m = ScanMeter(f"scan-{phys}", device, host, tcp_port, phys, baudrate, timeout)
        try:
            serial_no = adapter.identify(m)
        except PollError as exc:
            if exc.outcome in ("timeout",):
                continue
            if exc.outcome == "refused" and "failed" in str(exc):
                raise
            found.append({"physical_address": phys, "serial": None, "note": str(exc)})
            continue
        found.append({"physical_address": phys, "serial": serial_no, "note": ""})
    return found
