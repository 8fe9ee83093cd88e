"""IEC 62056-21 (IEC 61107) mode C readout over a serial line.

The exchange, at the meter's initial rate (300 baud unless configured):

    -> /?<address>!CRLF               sign-on (address empty on a point-to-point line)
    <- /XXXZ<ident>CRLF               identification; Z proposes the readout rate
    -> ACK 0 Z 0 CRLF                 option select: normal protocol, rate Z, data readout
    <- STX <data block> ! CRLF ETX BCC   at the new rate; BCC = XOR from after STX to ETX

Meter families that depart from this are described as data in `DIALECTS`:
the Energomera dialect asks for programming mode (option select Y = 1),
sends a password (`SOH P1 STX (password) ETX BCC`), reads values by command
(`SOH R1 STX ET0PE() ETX BCC`), ends with a break (`SOH B0 ETX BCC`) and sums
its block check instead of XOR-ing it.

Characters are 7 data bits with even parity (7E1). The port is opened as
8N1 and the parity bit is made and checked here: on the wire that is the
same bit sequence, and it works on every UART, USB adapter and
pseudo-terminal, some of which refuse 7-bit character formats.

The framing below is shared with the simulator (`simulators.iec62056_sim`),
so both ends speak from one definition. pyserial is blocking; `read` runs
the exchange in a worker thread so the asyncio scheduler keeps running, and
one lock per port keeps two exchanges off one line.

Two clocks bound every message we receive (the identification, the data
message, each programming-mode answer):

- the idle timeout (the meter's `timeout`, inter-byte): how long the line may
  stay silent, which also bounds the wait for the first byte (the meter's
  reaction time, at most 1.5 s in the standard);
- an overall deadline (`message_deadline`): the idle timeout, plus twice the
  time the largest plausible message of its kind needs on the wire at the
  current rate, plus a quarter second for scheduling; never more than the
  ceiling `AMR_IEC_MESSAGE_DEADLINE_S` (120 s by default).

The idle timeout alone lets a device that drips a byte just faster than it
hold a poll, and the whole line with it, for as long as it drips (a byte every
0.8 s held one for 71 s). The deadline ends that: a message that has not
completed when it expires is a `PollError` with outcome "deadline", naming the
meter, the bus and what was being received.

The largest plausible messages: an identification is at most 25 bytes by the
standard (`/`, three letters of manufacturer, the rate character, an optional
`\\W` pair, up to 16 characters of identification, CR LF); a data readout of a
household or commercial meter lists 20-100 data lines of 15-40 characters,
a few hundred bytes to 3 KB, so 4 KB (`READOUT_MAX`) leaves room for the long
ones; a programming-mode answer is one command's values (`ET0PE` gives six, 80
bytes), 512 bytes (`REPLY_MAX`). Twice the line time absorbs USB adapters that
deliver in bursts and UARTs that pause between characters, and still cuts a
drip early: at 9600 baud a 4 KB readout needs 4.3 s on the wire and gets
about 9.8 s with a 1 s idle timeout. At 300 baud the same readout would need
137 s, past the ceiling: a meter that proposes no faster rate and sends more
than about 1.7 KB needs a higher ceiling.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import serial

from adapters import quality
from adapters.base import AdapterSettings, IecMeter, PollError
from adapters.obis import OBIS, DataSet, ObisError, energy_kwh, parse_data_block
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

# the largest plausible message of each kind, in bytes (see the module docstring)
IDENT_MAX = 1 + 3 + 1 + 2 + 16 + 2  # / XXX Z \W ident CR LF
READOUT_MAX = 4096
REPLY_MAX = 512
_BITS_PER_CHAR = 1 + BYTESIZE + 1 + STOPBITS  # start, 7 data, parity, stop


def message_deadline(idle_s: float, baudrate: int, most_bytes: int, ceiling_s: float) -> float:
    """Seconds a message of at most most_bytes may take from our request to its last byte.

    The idle timeout (the wait for the first byte), plus twice the line time of
    most_bytes at baudrate, plus 0.25 s for scheduling; at most ceiling_s.
    """
    line = most_bytes * _BITS_PER_CHAR / baudrate
    return min(ceiling_s, idle_s + 2 * line + 0.25)

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


def bcc_sum7(data: bytes) -> bytes:
    """Energomera's block check: the sum of the same bytes, modulo 128."""
    return bytes((sum(data) & 0x7F,))


BccRule = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class Dialect:
    """How a meter family departs from the standard readout.

    mode is the option select's Y: "0" a data readout, "1" programming mode,
    where the values are asked for by command (`R1 CMD()`) after a password
    (`P1 (password)`). commands maps each command to the registers its values
    fill, in order; clock names the commands that give the date and the time.
    """

    bcc: BccRule
    mode: str
    default_password: str | None
    commands: tuple[tuple[str, tuple[str, ...]], ...]
    clock: tuple[str, str] | None


DIALECTS: dict[str, Dialect] = {
    "standard": Dialect(bcc, "0", None, (), None),
    # Energomera CE102M/CE301/CE303: ET0PE() gives the total then tariffs T1..T5 (kWh);
    # DATE_() gives "weekday.dd.mm.yy", TIME_() "hh:mm:ss"; factory password 777777
    "energomera": Dialect(
        bcc_sum7, "1", "777777",
        (("ET0PE", ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "1.8.4", "1.8.5")),),
        ("DATE_", "TIME_"),
    ),
}


def sign_on(address: str = "") -> bytes:
    if not _ADDRESS.match(address):
        raise ValueError(f"device address must be up to 32 letters or digits, got {address!r}")
    return b"/?" + address.encode("ascii") + b"!" + CRLF


def identification(manufacturer: str, baud_char: str, ident: str) -> bytes:
    return b"/" + manufacturer.encode("ascii") + baud_char.encode("ascii") + ident.encode("ascii") + CRLF


def option_select(baud_char: str, mode: str = "0", protocol: str = "0") -> bytes:
    """ACK V Z Y CRLF: mode '0' is data readout, '1' programming."""
    return ACK + protocol.encode("ascii") + baud_char.encode("ascii") + mode.encode("ascii") + CRLF


def data_message(block: str, rule: BccRule = bcc) -> bytes:
    body = block.encode("ascii") + b"!" + CRLF + ETX
    return STX + body + rule(body)


def command_message(command: str, data: str | None = None, rule: BccRule = bcc) -> bytes:
    """SOH C D [STX data] ETX BCC: password (P1), read (R1) and break (B0) messages."""
    body = command.encode("ascii") + (STX + data.encode("ascii") if data is not None else b"") + ETX
    return SOH + body + rule(body)


def answer_message(data: str, rule: BccRule = bcc) -> bytes:
    """STX data ETX BCC: a meter's answer in programming mode."""
    body = data.encode("ascii") + ETX
    return STX + body + rule(body)


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


def parse_frame(msg: bytes, rule: BccRule = bcc) -> tuple[str, str]:
    """(command, data) of `SOH cmd [STX data] ETX BCC` or `STX data ETX BCC`, checked.

    The command is "" for an STX frame. FrameError says what is wrong.
    """
    if msg[:1] not in (STX, SOH):
        raise FrameError("garbage", f"message does not start with STX or SOH: {msg[:24]!r}")
    end = msg.find(ETX)
    if end < 0 or end + 2 != len(msg):
        raise FrameError("garbage", f"message not closed by ETX and BCC ({len(msg)} bytes)")
    body = msg[1 : end + 1]
    if rule(body) != msg[end + 1 : end + 2]:
        raise FrameError(
            "crc", f"BCC mismatch: computed {rule(body).hex()}, received {msg[end + 1 : end + 2].hex()}"
        )
    try:
        text = body[:-1].decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("garbage", "message holds non-ASCII bytes despite a good BCC") from None
    if msg[:1] == STX:
        return "", text
    command, _, data = text.partition("\x02")
    return command, data


def parse_data_message(msg: bytes, rule: BccRule = bcc) -> str:
    """The data block of a readout's `STX ... ! CRLF ETX BCC`, checked."""
    if msg[:1] != STX:
        raise FrameError("garbage", f"data message does not start with STX: {msg[:24]!r}")
    _, text = parse_frame(msg, rule)
    return text.removesuffix("\r\n").removesuffix("!").rstrip("\r\n")


_VALUES = re.compile(r"\(([^()]*)\)")


def command_values(data: str) -> list[str]:
    """The values of a programming-mode answer: 'ET0PE(1.5)\r\n(0.5)' -> ['1.5', '0.5']."""
    return _VALUES.findall(data)


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


def check_meter(meter: IecMeter) -> list[str]:
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
    dialect = DIALECTS.get(meter.dialect or "standard")
    if dialect is None or not dialect.commands:
        energies = sorted(k for k, e in OBIS.items() if e.kind == "energy")
    else:
        energies = sorted({r for _, regs in dialect.commands for r in regs})
    for reg in meter.registers:
        if reg not in energies:
            problems.append(
                f"key 'registers': {reg!r} is not an energy register this meter gives ({', '.join(energies)})"
            )
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


class _Overdue(_NoAnswer):
    """The message was still arriving when its deadline expired."""


class Iec62056Adapter:
    """Reads IEC 62056-21 meters; one open port and one lock per serial device."""

    def __init__(
        self, settings: AdapterSettings, clock_tolerance_s: float | None = None,
        now: Callable[[], datetime] | None = None, message_deadline_s: float | None = None,
    ) -> None:
        """settings are given, never looked up: the meters' time zone, the clock skew
        tolerance and the message deadline ceiling come from them unless
        clock_tolerance_s or message_deadline_s stand for the last two.

        now is our reference clock (UTC); a simulation passes its own simulated clock.
        """
        self._tz = ZoneInfo(settings.timezone)
        self._tolerance = timedelta(
            seconds=settings.clock_skew_tolerance_s if clock_tolerance_s is None else clock_tolerance_s
        )
        if message_deadline_s is None:
            message_deadline_s = settings.iec_message_deadline_s
        if not message_deadline_s > 0:
            raise ValueError(f"the IEC message deadline must be positive, not {message_deadline_s!r}")
        self._ceiling = float(message_deadline_s)
        self._now = now or (lambda: datetime.now(UTC))
        self._ports: dict[str, serial.Serial] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # public interface (adapters.base.PollingAdapter)

    async def read(self, meter: IecMeter) -> list[Reading]:
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

    def read_blocking(self, meter: IecMeter) -> list[Reading]:
        ro = self.readout(meter)
        return self.readings(meter, ro)

    def readings(self, meter: IecMeter, ro: Readout) -> list[Reading]:
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

    def readout(self, meter: IecMeter) -> Readout:
        """One complete mode C exchange with the meter; PollError names what failed."""
        where = f"meter {meter.id} on {meter.bus_name}" + (
            f" (address {meter.address})" if meter.address else ""
        )
        problems = check_meter(meter)
        if problems:  # normally refused at start-up; a daemon must still not crash on them
            raise PollError("refused", f"{where}: " + "; ".join(problems))
        port = str(meter.port)
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

    def _exchange(self, ser: serial.Serial, meter: IecMeter, where: str) -> Readout:
        dialect = DIALECTS[meter.dialect or "standard"]
        initial = int(meter.baudrate or DEFAULT_INITIAL_BAUD)
        timeout = float(meter.timeout)
        wire: list[tuple[int, int]] = []
        if ser.baudrate != initial:
            ser.baudrate = initial
        ser.reset_input_buffer()
        self._send(ser, sign_on(meter.address or ""), wire)
        line = self._receive(
            ser, lambda b: b.endswith(CRLF), timeout, "identification", where, wire, IDENT_MAX
        )
        try:
            ident = parse_identification(line)
        except ValueError as exc:
            raise PollError("garbage", f"{where}: {exc}") from None
        rate = ident.baudrate
        if rate is None:
            raise PollError(
                "decode", f"{where}: identification proposes unknown rate character {ident.baud_char!r}"
            )
        self._send(ser, option_select(ident.baud_char, dialect.mode), wire)
        polled_at = self._now()
        if rate != initial:
            ser.baudrate = rate
        if dialect.mode == "0":
            msg = self._receive(ser, _message_complete, timeout, "data message", where, wire, READOUT_MAX)
            try:
                sets = parse_data_block(parse_data_message(msg, dialect.bcc))
            except FrameError as exc:
                raise PollError(exc.outcome, f"{where}: {exc}") from None
            except ObisError as exc:
                raise PollError("decode", f"{where}: {exc}") from None
        else:
            try:
                polled_at, sets = self._programming(ser, meter, dialect, timeout, where, wire)
            finally:  # leave programming mode whatever happened, so the meter is free again
                try:
                    self._send(ser, command_message("B0", None, dialect.bcc), wire)
                except (OSError, serial.SerialException):
                    pass
        try:
            clock = meter_clock(sets, self._tz)
        except ObisError as exc:
            raise PollError("decode", f"{where}: {exc}") from None
        return Readout(ident, sets, polled_at, clock, rate, wire)

    def _programming(
        self, ser: serial.Serial, meter: IecMeter, dialect: Dialect, timeout: float, where: str,
        wire: list[tuple[int, int]],
    ) -> tuple[datetime, dict[str, DataSet]]:
        """Password, then one read command per group of wanted registers, then the clock."""
        self._frame(ser, dialect, timeout, "password request (P0)", where, wire, expect="P0")
        password = meter.password or dialect.default_password or ""
        self._send(ser, command_message("P1", f"({password})", dialect.bcc), wire)
        answer = self._receive(
            ser, lambda b: b[:1] in (ACK, NAK) or _frame_complete(b), timeout,
            "password answer", where, wire, REPLY_MAX,
        )
        if answer[:1] == NAK:
            raise PollError("refused", f"{where}: the meter refused the password (key 'password')")
        if answer[:1] != ACK:
            raise PollError("garbage", f"{where}: password answer is neither ACK nor NAK: {answer[:24]!r}")
        polled_at = self._now()
        sets: dict[str, DataSet] = {}
        wanted = set(meter.registers)
        for command, registers in dialect.commands:
            if not wanted & set(registers):
                continue
            values = self._command(ser, dialect, command, timeout, where, wire)
            for reg, raw in zip(registers, values, strict=False):
                try:
                    sets[reg] = DataSet(reg, "energy", energy_kwh(reg, raw, "kWh"), "kWh")
                except ObisError as exc:
                    raise PollError("decode", f"{where}: {command}(): {exc}") from None
        if dialect.clock:
            date_cmd, time_cmd = dialect.clock
            date_v = self._command(ser, dialect, date_cmd, timeout, where, wire)[:1]
            time_v = self._command(ser, dialect, time_cmd, timeout, where, wire)[:1]
            parts = date_v[0].split(".") if date_v else []
            if len(parts) == 4 and time_v:  # weekday.dd.mm.yy
                sets["0.9.2"] = DataSet("0.9.2", "date", f"{parts[3]}-{parts[2]}-{parts[1]}", None)
                sets["0.9.1"] = DataSet("0.9.1", "time", time_v[0], None)
            else:
                raise PollError("decode", f"{where}: clock answers {date_v!r} {time_v!r} are not dd.dd.mm.yy / hh:mm:ss")
        return polled_at, sets

    def _command(
        self, ser: serial.Serial, dialect: Dialect, command: str, timeout: float, where: str,
        wire: list[tuple[int, int]],
    ) -> list[str]:
        self._send(ser, command_message("R1", f"{command}()", dialect.bcc), wire)
        data = self._frame(ser, dialect, timeout, f"answer to {command}()", where, wire, expect="")
        values = command_values(data)
        if not values or values[0].startswith("ERR"):
            raise PollError("exception", f"{where}: the meter answered {data.strip()!r} to {command}()")
        return values

    def _frame(
        self, ser: serial.Serial, dialect: Dialect, timeout: float, what: str, where: str,
        wire: list[tuple[int, int]], expect: str,
    ) -> str:
        msg = self._receive(ser, _frame_complete, timeout, what, where, wire, REPLY_MAX)
        try:
            command, data = parse_frame(msg, dialect.bcc)
        except FrameError as exc:
            raise PollError(exc.outcome, f"{where}: {what}: {exc}") from None
        if command != expect:
            raise PollError("garbage", f"{where}: expected the {what}, got a {command or 'data'} message")
        return data

    def _send(self, ser: serial.Serial, data: bytes, wire: list[tuple[int, int]]) -> None:
        ser.write(to_line(data))
        ser.flush()  # tcdrain: an option select must leave at the old rate before we switch
        wire.append((len(data), ser.baudrate))

    def _receive(
        self, ser: serial.Serial, done: Callable[[bytearray], bool], timeout: float, what: str, where: str,
        wire: list[tuple[int, int]], most: int,
    ) -> bytes:
        """One message as 7-bit characters; PollError for silence, garbage, parity errors or
        a message still arriving at its deadline (most is its largest plausible size in bytes)."""
        limit = message_deadline(timeout, ser.baudrate, most, self._ceiling)
        try:
            raw = self._read_until(ser, done, timeout, limit)
        except _Overdue as od:
            raise PollError(
                "deadline",
                f"{where}: {what} not complete within its deadline of {limit:.2f} s "
                f"(up to {most} bytes at {ser.baudrate} baud); {len(od.got)} bytes came: {od.got[:32]!r}",
            ) from None
        except _NoAnswer as na:
            if na.got:
                raise PollError(
                    "garbage", f"{where}: incomplete {what}, {len(na.got)} bytes: {na.got[:32]!r}"
                ) from None
            raise PollError("timeout", f"{where}: no {what} within {timeout:g} s") from None
        wire.append((len(raw), ser.baudrate))
        msg, parity_errors = from_line(raw)
        # a message that does not even start right is reported as garbage by its parser
        if parity_errors and msg[:1] in (b"/", STX, SOH, ACK, NAK):
            raise PollError("crc", f"{where}: parity error in {parity_errors} byte(s) of the {what}")
        return msg

    @staticmethod
    def _read_until(
        ser: serial.Serial, done: Callable[[bytearray], bool], idle: float, limit: float
    ) -> bytes:
        """Raw bytes until done(7-bit characters).

        Gives up after `idle` s without a byte (_NoAnswer), or when `limit` s have
        passed since the call however the bytes trickle in (_Overdue). The port's
        timeout changes only for the last wait before the deadline: setting it
        reconfigures the port (tcsetattr), which is not done once a byte.
        """
        buf = bytearray()
        end = time.monotonic() + limit
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise _Overdue(bytes(buf).translate(_STRIP))
            wait = idle if left >= idle else left
            if ser.timeout != wait:
                ser.timeout = wait
            chunk = ser.read(max(1, min(ser.in_waiting, MAX_MESSAGE)))
            if not chunk:
                if wait < idle:
                    raise _Overdue(bytes(buf).translate(_STRIP))
                raise _NoAnswer(bytes(buf).translate(_STRIP))
            buf += chunk
            if done(bytearray(buf.translate(_STRIP))):
                return bytes(buf)
            if len(buf) > MAX_MESSAGE:
                raise _NoAnswer(bytes(buf).translate(_STRIP))

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


def _frame_complete(buf: bytearray) -> bool:
    """An STX/SOH frame is complete one byte (the BCC) after its ETX; garbage at a line end."""
    if buf[:1] not in (STX, SOH):
        return buf.endswith(CRLF) or len(buf) >= 64
    end = buf.find(ETX)
    return end >= 0 and len(buf) >= end + 2


def _message_complete(buf: bytearray) -> bool:
    """A data message is complete one byte (the BCC) after its ETX.

    A stream that does not begin with STX is cut short at its first line end,
    so garbage is reported at once instead of after the idle timeout.
    """
    if buf[:1] != STX:
        return buf.endswith(CRLF) or len(buf) >= 64
    end = buf.find(ETX)
    return end >= 0 and len(buf) >= end + 2
