"""IEC 62056-21 (IEC 61107) mode C readout over a serial line.

The exchange, at the meter's initial rate (300 baud unless configured):

    -> /?<address>!CRLF               sign-on (address empty on a point-to-point line)
    <- /XXXZ<ident>CRLF               identification; Z proposes the readout rate
    -> ACK 0 Z 0 CRLF                 option select: normal protocol, rate Z, data readout
    <- STX <data block> ! CRLF ETX BCC   at the new rate; BCC = XOR from after STX to ETX

Characters are 7 data bits with even parity (7E1). The port is opened as
8N1 and the parity bit is made and checked here: on the wire that is the
same bit sequence, and it works on every UART, USB adapter and
pseudo-terminal, some of which refuse 7-bit character formats.

The framing below is shared with the simulator (`simulators.iec62056_sim`),
so both ends speak from one definition. pyserial is blocking; `read` runs
the exchange in a worker thread so the asyncio scheduler keeps running, and
one lock per port keeps two exchanges off one line.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import serial

from adapters import quality
from adapters.base import PollError
from adapters.obis import OBIS, DataSet, ObisError, parse_data_block
from adapters.reading import Reading

SOH, STX, ETX, ACK, NAK = b"\x01", b"\x02", b"\x03", b"\x06", b"\x15"
CRLF = b"\r\n"

# the rate character of the identification and option select messages (mode C)
BAUD_OF_CHAR: dict[str, int] = {
    "0": 300, "1": 600, "2": 1200, "3": 2400, "4": 4800, "5": 9600, "6": 19200,
}
CHAR_OF_BAUD: dict[int, str] = {b: c for c, b in BAUD_OF_CHAR.items()}

# the standard's character format: 7 data bits, even parity, 1 stop bit
BYTESIZE, PARITY, STOPBITS = 7, "E", 1
# ...sent as 8N1 with bit 7 carrying the even parity of bits 0-6
_WITH_PARITY = bytes(
    (b & 0x7F) | (0x80 if bin(b & 0x7F).count("1") % 2 else 0) for b in range(256)
)
_STRIP = bytes(b & 0x7F for b in range(256))
DEFAULT_INITIAL_BAUD = 300
MAX_MESSAGE = 16384  # bytes: a stream longer than this is not a readout

_IDENT = re.compile(rb"^/([A-Za-z]{3})([0-9A-Z])(\\[0-9])?([\x20-\x7e]{1,16})\r\n$")
_ADDRESS = re.compile(r"^[0-9A-Za-z ]{0,32}$")


# --- framing, shared with the simulator ---------------------------------------


def to_line(data: bytes) -> bytes:
    """7-bit characters with their even parity bit, ready for an 8N1 port."""
    return data.translate(_WITH_PARITY)


def from_line(raw: bytes) -> tuple[bytes, int]:
    """The 7-bit characters of raw line bytes and how many had a wrong parity bit."""
    errors = sum(1 for b in raw if _WITH_PARITY[b] != b)
    return raw.translate(_STRIP), errors


def bcc(data: bytes) -> bytes:
    """Block check character: XOR of every byte after STX/SOH up to and including ETX."""
    x = 0
    for b in data:
        x ^= b
    return bytes((x,))


def sign_on(address: str = "") -> bytes:
    if not _ADDRESS.match(address):
        raise ValueError(f"device address must be up to 32 letters or digits, got {address!r}")
    return b"/?" + address.encode("ascii") + b"!" + CRLF


def identification(manufacturer: str, baud_char: str, ident: str) -> bytes:
    return b"/" + manufacturer.encode("ascii") + baud_char.encode("ascii") + ident.encode("ascii") + CRLF


def option_select(baud_char: str, mode: str = "0", protocol: str = "0") -> bytes:
    """ACK V Z Y CRLF: mode '0' is data readout, '1' programming."""
    return ACK + protocol.encode("ascii") + baud_char.encode("ascii") + mode.encode("ascii") + CRLF


def data_message(block: str) -> bytes:
    body = block.encode("ascii") + b"!" + CRLF + ETX
    return STX + body + bcc(body)


@dataclass(frozen=True, slots=True)
class Identification:
    manufacturer: str
    baud_char: str
    ident: str

    @property
    def baudrate(self) -> int | None:
        return BAUD_OF_CHAR.get(self.baud_char)


def parse_identification(line: bytes) -> Identification:
    m = _IDENT.match(line)
    if not m:
        raise ValueError(f"not an identification message: {line[:40]!r}")
    return Identification(m.group(1).decode(), m.group(2).decode(), m.group(4).decode().strip())


class FrameError(ValueError):
    def __init__(self, outcome: str, reason: str):
        self.outcome = outcome
        super().__init__(reason)


def parse_data_message(msg: bytes) -> str:
    """The data block of `STX ... ETX BCC`, checked; FrameError says what is wrong."""
    if not msg.startswith(STX):
        raise FrameError("garbage", f"data message does not start with STX: {msg[:24]!r}")
    end = msg.find(ETX)
    if end < 0 or end + 2 != len(msg):
        raise FrameError("garbage", f"data message not closed by ETX and BCC ({len(msg)} bytes)")
    body = msg[1 : end + 1]
    if bcc(body) != msg[end + 1 : end + 2]:
        raise FrameError(
            "crc", f"BCC mismatch: computed {bcc(body).hex()}, received {msg[end + 1 : end + 2].hex()}"
        )
    try:
        text = body[:-1].decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("garbage", "data block holds non-ASCII bytes despite a good BCC") from None
    return text.removesuffix("\r\n").removesuffix("!").rstrip("\r\n")


# --- the meter's clock -----------------------------------------------------------


def meter_clock(sets: dict[str, DataSet], tz: ZoneInfo) -> datetime | None:
    """The instant of 0.9.2 (date) + 0.9.1 (time) in the meter's local time, as UTC.

    Meters print the date as YYMMDD, YY-MM-DD or with a leading century digit
    (1YYMMDD); the time as hhmmss or hh:mm:ss.
    """
    d, t = sets.get("0.9.2"), sets.get("0.9.1")
    if d is None or t is None:
        return None
    ds = re.sub(r"\D", "", str(d.value))
    ts = re.sub(r"\D", "", str(t.value))
    if len(ds) == 7:
        ds = ds[1:]
    if len(ds) != 6 or len(ts) != 6:
        raise ObisError("0.9.2/0.9.1", f"{d.value} {t.value}", "clock is not YYMMDD hhmmss")
    try:
        local = datetime(
            2000 + int(ds[:2]), int(ds[2:4]), int(ds[4:6]),
            int(ts[:2]), int(ts[2:4]), int(ts[4:6]), tzinfo=tz,
        )
    except ValueError as exc:
        raise ObisError("0.9.2/0.9.1", f"{d.value} {t.value}", f"clock is not a valid instant: {exc}") from None
    return local.astimezone(UTC)


# --- the adapter -------------------------------------------------------------------


def check_meter(meter: Any) -> list[str]:
    """Problems with an iec62056 meter's inventory keys, for refusal at start-up.

    Each names the key and the reason; the caller adds the file and the meter.
    """
    problems = []
    if not isinstance(meter.port, str) or not meter.port.startswith("/"):
        problems.append(f"key 'port': a serial device path is needed, like /dev/ttyUSB0 (got {meter.port!r})")
    if meter.baudrate is not None and meter.baudrate not in CHAR_OF_BAUD:
        problems.append(f"key 'baudrate': IEC 62056-21 rates are {sorted(CHAR_OF_BAUD)} (got {meter.baudrate})")
    if meter.address is not None and not _ADDRESS.match(meter.address):
        problems.append(f"key 'address': up to 32 letters or digits (got {meter.address!r})")
    for reg in meter.registers:
        entry = OBIS.get(reg)
        if entry is None or entry.kind != "energy":
            energies = sorted(k for k, e in OBIS.items() if e.kind == "energy")
            problems.append(f"key 'registers': {reg!r} is not an energy register of the readout ({', '.join(energies)})")
    return problems



@dataclass
class Readout:
    """One exchange: what the meter said and what crossed the line at which rate."""

    identification: Identification
    data: dict[str, DataSet]
    polled_at: datetime  # our clock when the option select was sent
    meter_time: datetime | None
    baudrate: int  # the readout rate
    line_bytes: list[tuple[int, int]] = field(default_factory=list)  # (bytes, baud) per message

    def line_seconds(self, bits_per_char: float = 1 + BYTESIZE + 1 + STOPBITS) -> float:
        """The time the exchanged bytes need on the wire: the line's lower bound."""
        return sum(n * bits_per_char / b for n, b in self.line_bytes)


class _NoAnswer(Exception):
    def __init__(self, got: bytes):
        self.got = got


class Iec62056Adapter:
    """Reads IEC 62056-21 meters; one open port and one lock per serial device."""

    def __init__(self, settings: Any = None, clock_tolerance_s: float | None = None) -> None:
        if settings is None:
            from collector.settings import get_settings

            settings = get_settings()
        self._tz = ZoneInfo(settings.timezone)
        self._tolerance = timedelta(
            seconds=settings.clock_skew_tolerance_s if clock_tolerance_s is None else clock_tolerance_s
        )
        self._ports: dict[str, serial.Serial] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # public interface (adapters.base.PollingAdapter)

    async def read(self, meter: Any) -> list[Reading]:
        """Read the meter's configured registers once, off the event loop."""
        return await asyncio.to_thread(self.read_blocking, meter)

    async def close(self) -> None:
        self.close_blocking()

    def close_blocking(self) -> None:
        with self._guard:
            for ser in self._ports.values():
                try:
                    ser.close()
                except (OSError, serial.SerialException):
                    pass
            self._ports.clear()

    def read_blocking(self, meter: Any) -> list[Reading]:
        ro = self.readout(meter)
        return self.readings(meter, ro)

    def readings(self, meter: Any, ro: Readout) -> list[Reading]:
        """The configured registers of a readout as Readings, with clock quality flags."""
        flags: frozenset[str] = frozenset()
        ts = ro.polled_at
        if ro.meter_time is not None:
            if abs(ro.meter_time - ro.polled_at) > self._tolerance:
                flags = frozenset({quality.CLOCK_SKEW})  # keep our time: the meter's is wrong
            else:
                ts, flags = ro.meter_time, frozenset({quality.METER_CLOCK})
        source = f"iec62056:{meter.port}" + (f"/{meter.address}" if meter.address else "")
        out: list[Reading] = []
        missing = []
        for reg in meter.registers:
            ds = ro.data.get(reg)
            if ds is None or ds.kind != "energy":
                missing.append(reg)
                continue
            assert isinstance(ds.value, Decimal)
            out.append(Reading(meter.id, reg, ts, ds.value, flags, source))
        if missing:
            have = ", ".join(sorted(ro.data)) or "nothing"
            raise PollError(
                "decode",
                f"meter {meter.id} on {meter.bus_name}: readout has no register "
                f"{', '.join(missing)} (it gives {have})",
            )
        return out

    def readout(self, meter: Any) -> Readout:
        """One complete mode C exchange with the meter; PollError names what failed."""
        where = f"meter {meter.id} on {meter.bus_name}" + (
            f" (address {meter.address})" if meter.address else ""
        )
        port = str(meter.port or "")
        if not port:
            raise PollError("refused", f"{where}: no serial port configured (key 'port')")
        with self._port_lock(port):
            ser = self._open(port, where)
            try:
                return self._exchange(ser, meter, where)
            except PollError:
                raise
            except (OSError, serial.SerialException) as exc:
                self._drop(port)
                raise PollError("refused", f"{where}: serial port {port} failed: {exc}") from None

    # the exchange

    def _exchange(self, ser: serial.Serial, meter: Any, where: str) -> Readout:
        initial = int(meter.baudrate or DEFAULT_INITIAL_BAUD)
        timeout = float(meter.timeout)
        if ser.baudrate != initial:
            ser.baudrate = initial
        ser.reset_input_buffer()
        request = sign_on(meter.address or "")
        ser.write(to_line(request))
        ser.flush()
        try:
            line = self._read_until(ser, lambda b: b.endswith(CRLF), timeout)
        except _NoAnswer as na:
            if na.got:
                raise PollError(
                    "garbage", f"{where}: incomplete identification, {len(na.got)} bytes: {na.got[:32]!r}"
                ) from None
            raise PollError("timeout", f"{where}: no identification within {timeout:g} s") from None
        line, parity_errors = from_line(line)
        try:
            ident = parse_identification(line)
        except ValueError as exc:
            raise PollError("garbage", f"{where}: {exc}") from None
        if parity_errors:
            raise PollError("crc", f"{where}: parity error in {parity_errors} byte(s) of the identification")
        rate = ident.baudrate
        if rate is None:
            raise PollError(
                "decode", f"{where}: identification proposes unknown rate character {ident.baud_char!r}"
            )
        ack = option_select(ident.baud_char)
        ser.write(to_line(ack))
        ser.flush()  # tcdrain: the ACK must leave at the old rate before we switch
        polled_at = datetime.now(UTC)
        if rate != initial:
            ser.baudrate = rate
        try:
            msg = self._read_until(ser, _message_complete, timeout)
        except _NoAnswer as na:
            if na.got:
                raise PollError(
                    "garbage", f"{where}: incomplete data message, {len(na.got)} bytes: {na.got[:32]!r}"
                ) from None
            raise PollError("timeout", f"{where}: no data message within {timeout:g} s") from None
        msg, parity_errors = from_line(msg)
        try:
            block = parse_data_message(msg)
        except FrameError as exc:
            raise PollError(exc.outcome, f"{where}: {exc}") from None
        if parity_errors:
            raise PollError("crc", f"{where}: parity error in {parity_errors} byte(s) of the data message")
        try:
            sets = parse_data_block(block)
            clock = meter_clock(sets, self._tz)
        except ObisError as exc:
            raise PollError("decode", f"{where}: {exc}") from None
        return Readout(
            ident, sets, polled_at, clock, rate,
            [(len(request), initial), (len(line), initial), (len(ack), initial), (len(msg), rate)],
        )

    @staticmethod
    def _read_until(ser: serial.Serial, done: Any, idle: float) -> bytes:
        """Raw bytes until done(7-bit characters); gives up after `idle` s without a byte."""
        buf = bytearray()
        if ser.timeout != idle:
            ser.timeout = idle
        while True:
            chunk = ser.read(max(1, min(ser.in_waiting, MAX_MESSAGE)))
            if not chunk:
                raise _NoAnswer(bytes(buf).translate(_STRIP))
            buf += chunk
            if done(bytearray(buf.translate(_STRIP))):
                return bytes(buf)
            if len(buf) > MAX_MESSAGE:
                raise _NoAnswer(bytes(buf))

    # ports

    def _port_lock(self, port: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(port, threading.Lock())

    def _open(self, port: str, where: str) -> serial.Serial:
        with self._guard:
            ser = self._ports.get(port)
        if ser is not None and ser.is_open:
            return ser
        try:
            ser = serial.Serial(port, DEFAULT_INITIAL_BAUD, timeout=1.0, write_timeout=5.0)
        except (OSError, serial.SerialException) as exc:
            raise PollError("refused", f"{where}: cannot open serial port {port}: {exc}") from None
        with self._guard:
            self._ports[port] = ser
        return ser

    def _drop(self, port: str) -> None:
        with self._guard:
            ser = self._ports.pop(port, None)
        if ser is not None:
            try:
                ser.close()
            except (OSError, serial.SerialException):
                pass


def _message_complete(buf: bytearray) -> bool:
    """A data message is complete one byte (the BCC) after its ETX.

    A stream that does not begin with STX is cut short at its first line end,
    so garbage is reported at once instead of after the idle timeout.
    """
    if buf[:1] != STX:
        return buf.endswith(CRLF) or len(buf) >= 64
    end = buf.find(ETX)
    return end >= 0 and len(buf) >= end + 2
