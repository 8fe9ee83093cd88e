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
from typing import TypeVar
from zoneinfo import ZoneInfo

import serial

from adapters import quality
from adapters.base import AdapterSettings, IecMeter, PollError, ProfileSlot
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
# the standard's reaction time: a meter may take up to 1.5 s to answer a sign-on, so
# the identification is awaited at least this long whatever the meter's `timeout`
REACTION_MAX_S = 1.5
PROFILE_RECORD_BYTES = 16  # one P.01 value line, `(0.123)` CR LF, with room for a wider value


def message_deadline(idle_s: float, baudrate: int, most_bytes: int, ceiling_s: float) -> float:
    """Seconds a message of at most most_bytes may take from our request to its last byte.

    The idle timeout (the wait for the first byte), plus twice the line time of
    most_bytes at baudrate, plus 0.25 s for scheduling; at most ceiling_s.
    """
    line = most_bytes * _BITS_PER_CHAR / baudrate
    return min(ceiling_s, idle_s + 2 * line + 0.25)

_T = TypeVar("_T")

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


def values_per_bracket(data: str) -> tuple[list[str], str | None]:
    """One value per pair of brackets (Energomera `ET0PE`): `ET0PE(1.5)\r\n(0.5)` -> ['1.5', '0.5']."""
    return command_values(data), None


def values_in_one_bracket(data: str) -> tuple[list[str], str | None]:
    """Several values, comma-separated, in one pair of brackets (Neva MT: `(total,T1,T2,T3,T4)`)."""
    values = command_values(data)
    return (values[0].split(",") if values else []), None


def values_of_archive(data: str) -> tuple[list[str], str | None]:
    """An Energomera archive answer: `EMD01(dd.mm.yy,total)(T1)...`: the values and the record's date.

    The date is the day whose start the archive holds (dd.mm.yy), so the values
    are the counters at that local midnight, not now.
    """
    values = command_values(data)
    if not values:
        return [], None
    date, _, first = values[0].partition(",")
    if not first:  # no date in the first bracket: a plain list
        return values, None
    return [first, *values[1:]], date


AnswerRule = Callable[[str], tuple[list[str], str | None]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """How a meter family departs from the standard readout.

    mode is the option select's Y: "0" a data readout, "1" programming mode,
    where the values are asked for by command (`R1 CMD()`) after a password
    (`P1 (password)`). commands maps each command (the whole request, like
    `ET0PE()` or `0F0880FF()`) to the registers its values fill, in order;
    answer splits a command's answer into those values (and an archive date);
    clock names the commands that give the date and the time.

    profile says the meter family answers the standard's load-profile readout
    (`R5 P.01(from;to)`) in programming mode; clock_step_s is the largest
    clock correction the family takes in a day (`W1 CTIME(±s)`), None when we
    do not correct its clock.
    """

    bcc: BccRule
    mode: str
    default_password: str | None
    commands: tuple[tuple[str, tuple[str, ...]], ...]
    clock: tuple[str, str] | None
    answer: AnswerRule = values_per_bracket
    profile: bool = False
    clock_step_s: float | None = None


_TARIFFS5 = ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "1.8.4", "1.8.5")

DIALECTS: dict[str, Dialect] = {
    # the standard's data readout; P.01 load profile in programming mode
    "standard": Dialect(bcc, "0", None, (), None, profile=True),
    # Energomera CE102M/CE301/CE303: ET0PE() gives the total then tariffs T1..T5 (kWh);
    # DATE_() gives "weekday.dd.mm.yy", TIME_() "hh:mm:ss"; factory password 777777;
    # W1 CTIME(±s) moves the clock by at most 29 s a day (../shared/METERS.md §3)
    "energomera": Dialect(
        bcc_sum7, "1", "777777", (("ET0PE()", _TARIFFS5),), ("DATE_", "TIME_"), clock_step_s=29.0,
    ),
    # Energomera SPODES models (CE207/208/307/308 SPds) in IEC mode: ET0PE() is ERR12; the
    # day-start archive EMD01(0.0,n) gives (dd.mm.yy,total)(T1)...(Tn), the counters at the
    # start of that day (latonita/esphome-energomera-iec issue #1, a CE307 R34); the date
    # may print its weekday as one digit (w.dd.mm.yy)
    "energomera_spodes": Dialect(
        bcc_sum7, "1", "777777", (("EMD01(0.0,4)", _TARIFFS5[:5]),), ("DATE_", "TIME_"),
        answer=values_of_archive, clock_step_s=29.0,
    ),
    # Neva MT 1xx/3xx (Taipit): the standard's XOR check; a command is the OBIS code C.D.E.F as
    # 8 hex digits, 0F0880FF = 15.8.0*255 total active energy, answering (total,T1,T2,T3,T4) in one
    # pair of brackets; 000902FF the date, 000901FF the time; password 00000000 (METERS.md §3,
    # after wirenboard/wb-mqtt-serial neva_device.cpp, facts only; frames as in nnemirovsky/pyneva's
    # tests). The date and time answers' layout is not confirmed by a Neva dump: YYMMDD and
    # hhmmss (with or without separators) are taken, as the standard prints 0.9.2 and 0.9.1
    "neva": Dialect(
        bcc, "1", "00000000", (("0F0880FF()", _TARIFFS5[:5]),), ("000902FF", "000901FF"),
        answer=values_in_one_bracket,
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
    host, tcp_port = converter_of(meter)
    if tcp_port is not None or (host is not None and meter.port is None):
        if not host or tcp_port is None:
            problems.append("keys 'host' and 'tcp_port': a TCP converter needs both (got "
                            f"host {host!r}, tcp_port {tcp_port!r})")
        if meter.port is not None:
            problems.append(f"key 'port': give either a serial 'port' or 'host' and 'tcp_port', not both "
                            f"(got port {meter.port!r})")
    elif not isinstance(meter.port, str) or not meter.port.startswith("/"):
        problems.append(f"key 'port': a serial device path is needed, like /dev/ttyUSB0, or 'host' and "
                        f"'tcp_port' of a TCP converter (got {meter.port!r})")
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


def converter_of(meter: IecMeter) -> tuple[str | None, int | None]:
    """(host, tcp_port) of a meter behind a transparent RS-485-to-Ethernet converter.

    Read by name, not through `IecMeter`: a meter on a serial port need not have them.
    """
    host = getattr(meter, "host", None)
    tcp_port = getattr(meter, "tcp_port", None)
    return (str(host) if host else None), (int(tcp_port) if tcp_port is not None else None)


def line_of(meter: IecMeter) -> str:
    """The line a meter is on: its serial device, or `host:tcp_port` of its converter."""
    host, tcp_port = converter_of(meter)
    return f"{host}:{tcp_port}" if tcp_port is not None else str(meter.port)


def parse_meter_date(text: str) -> tuple[int, int, int]:
    """(year, month, day) of a programming-mode date answer, in the forms meters print.

    `ww.dd.mm.yy` (Energomera DATE_), `w.dd.mm.yy` (Energomera SPODES), `dd.mm.yy`
    (Energomera archives), and IEC's `YYMMDD` / `YY-MM-DD` (Neva's 000902FF; unverified
    against a Neva dump).
    """
    parts = text.strip().split(".")
    if len(parts) in (3, 4) and all(p.isdigit() for p in parts):
        dd, mm, yy = parts[-3:]
        return 2000 + int(yy), int(mm), int(dd)
    digits = re.sub(r"\D", "", text)
    if len(digits) == 7:
        digits = digits[1:]
    if len(digits) == 6:
        return 2000 + int(digits[:2]), int(digits[2:4]), int(digits[4:6])
    raise ValueError(f"date {text!r} is not ww.dd.mm.yy, dd.mm.yy or YYMMDD")


# --- the load profile (IEC 62056-21 P.01 readout) ----------------------------------


def profile_request(start: datetime, end: datetime, tz: ZoneInfo) -> str:
    """The data of `R5 P.01(0YYMMDDhhmm;0YYMMDDhhmm)`: records from start to end, in the meter's
    local time; the leading digit is the season (0: no daylight saving, as in Russia)."""
    a, b = start.astimezone(tz), end.astimezone(tz)
    return f"P.01(0{a:%y%m%d%H%M};0{b:%y%m%d%H%M})"


_P01_HEADER = re.compile(r"^P\.01\((\d{13})\)\(([0-9A-Fa-f]*)\)\((\d+)\)\((\d+)\)((?:\([^()]*\)\([^()]*\))*)$")
_CHANNEL = re.compile(r"^(?:\d+-(\d+):)?(\d+)\.(\d+)(?:\.\d+)?$")


def _channel_register(obis: str) -> str | None:
    """The energy register a profile channel feeds: C=1 import (1.8.0), C=2 export (2.8.0).

    A channel is average power over the period (`1.5`, `1-0:1.5.0`) or energy in it
    (`1.9`, `1-1:1.29`); reactive channels (C=3..8) feed none we bill.
    """
    m = _CHANNEL.match(obis.strip())
    if m is None or m.group(1) not in (None, "0", "1"):  # B=2, 3...: other measuring channels
        return None
    return {"1": "1.8.0", "2": "2.8.0"}.get(m.group(2))


def _slot_wh(raw: str, unit: str, period_min: int) -> int | None:
    """The Wh of one profile value: energy (kWh, Wh) or average power (kW, W) over the period."""
    if raw.strip() == "":
        return None  # the meter left the record empty: invalid
    v = Decimal(raw)
    factor = {"kwh": Decimal(1000), "wh": Decimal(1), "kw": Decimal(1000) * period_min / 60,
              "w": Decimal(period_min) / 60}.get(unit.strip().lower())
    if factor is None:
        raise ValueError(f"profile unit {unit!r} is not kWh, Wh, kW or W")
    return int((v * factor).to_integral_value())


def parse_profile(data: str, tz: ZoneInfo) -> list[ProfileSlot]:
    """The slots of a P.01 answer, oldest first, as ProfileSlots of the energy registers.

    The answer is one or more blocks: a header `P.01(ZYYMMDDhhmmss)(status)(period min)(n)`
    followed by n pairs `(channel)(unit)`, then one line of n values per period. The
    header's time stamp ends the block's first period (the VDEW convention; the
    standard's examples agree); each following line is one period later. A new header
    starts where the meter's record was broken (power failure, clock set). An empty
    value `()` is an invalid record: its slot has wh None.
    """
    slots: list[ProfileSlot] = []
    channels: list[tuple[str | None, str]] = []
    end: datetime | None = None
    period = timedelta(0)
    period_min = 0
    for line in data.replace("\r", "").split("\n"):
        line = line.strip()
        if not line:
            continue
        if line.startswith("P.01"):
            m = _P01_HEADER.match(line)
            if m is None:
                raise ValueError(f"not a P.01 header: {line[:60]!r}")
            stamp, _status, per, n, pairs = m.groups()
            period_min = int(per)
            if not 0 < period_min <= 1440:
                raise ValueError(f"P.01 period {per!r} is not 1..1440 minutes")
            period = timedelta(minutes=period_min)
            found = re.findall(r"\(([^()]*)\)", pairs)
            channels = [(_channel_register(found[i]), found[i + 1]) for i in range(0, len(found), 2)]
            if len(channels) != int(n):
                raise ValueError(f"P.01 header names {len(channels)} channels, says {n}")
            s = stamp[1:]
            end = datetime(2000 + int(s[:2]), int(s[2:4]), int(s[4:6]), int(s[6:8]), int(s[8:10]),
                           int(s[10:12]), tzinfo=tz).astimezone(UTC)
            continue
        if end is None:
            raise ValueError(f"P.01 values before any header: {line[:60]!r}")
        values = re.findall(r"\(([^()]*)\)", line)
        if len(values) != len(channels):
            raise ValueError(f"P.01 record has {len(values)} values for {len(channels)} channels: {line[:60]!r}")
        for (register, unit), raw in zip(channels, values, strict=True):
            if register is not None:
                slots.append(ProfileSlot(end - period, end, register, _slot_wh(raw, unit, period_min)))
        end += period
    return slots


def profile_text(slots: list[ProfileSlot], period_min: int, tz: ZoneInfo, unit: str = "kWh") -> str:
    """A P.01 answer for consecutive slots of the import register (the simulator's side)."""
    if not slots:
        return "(ERROR)\r\n"
    first = slots[0].end.astimezone(tz)
    lines = [f"P.01(0{first:%y%m%d%H%M%S})(00)({period_min})(1)(1.9)({unit})"]
    for sl in slots:
        lines.append("()" if sl.wh is None else f"({Decimal(sl.wh) / 1000:.3f})" if unit == "kWh" else f"({sl.wh})")
    return "\r\n".join(lines) + "\r\n"


@dataclass
class Readout:
    """One exchange: what the meter said and what crossed the line at which rate."""

    identification: Identification
    data: dict[str, DataSet]
    polled_at: datetime  # our clock when the option select was sent
    meter_time: datetime | None
    baudrate: int  # the readout rate
    line_bytes: list[tuple[int, int]] = field(default_factory=list)  # (bytes, baud) per message
    values_at: datetime | None = None  # an archive's instant (the day start it holds), else None

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
        self._offsets: dict[str, float] = {}  # meter id -> its clock minus ours at the last read, s
        self._tcp_lines: set[int] = set()  # id() of the open lines that are TCP converters
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
            self._tcp_lines.clear()

    def read_blocking(self, meter: IecMeter) -> list[Reading]:
        ro = self.readout(meter)
        return self.readings(meter, ro)

    def readings(self, meter: IecMeter, ro: Readout) -> list[Reading]:
        """The configured registers of a readout as Readings, with clock quality flags."""
        flags: frozenset[str] = frozenset()
        ts = ro.polled_at
        if ro.meter_time is not None:
            self._offsets[meter.id] = (ro.meter_time - ro.polled_at).total_seconds()
            if abs(ro.meter_time - ro.polled_at) > self._tolerance:
                flags = frozenset({quality.CLOCK_SKEW})  # keep our time: the meter's is wrong
            else:
                ts, flags = ro.meter_time, frozenset({quality.METER_CLOCK})
        if ro.values_at is not None:  # an archive's counters belong to the instant it names
            ts, flags = ro.values_at, flags | {quality.METER_CLOCK}
        source = f"iec62056:{line_of(meter)}" + (f"/{meter.address}" if meter.address else "")
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
        return self._session(meter, lambda ser, w: self._exchange(ser, meter, w))

    def _where(self, meter: IecMeter) -> str:
        return f"meter {meter.id} on {meter.bus_name}" + (f" (address {meter.address})" if meter.address else "")

    def _session(self, meter: IecMeter, exchange: Callable[[serial.Serial, str], _T]) -> _T:
        """Run one exchange on the meter's line (serial port or TCP converter) under its lock."""
        where = self._where(meter)
        problems = check_meter(meter)
        if problems:  # normally refused at start-up; a daemon must still not crash on them
            raise PollError("refused", f"{where}: " + "; ".join(problems))
        port = line_of(meter)
        kind = "serial port" if converter_of(meter)[1] is None else "TCP converter"
        with self._port_lock(port):
            ser = self._open(port, where, converter_of(meter)[1] is not None)
            try:
                return exchange(ser, where)
            except PollError:
                raise
            except (OSError, serial.SerialException) as exc:
                self._drop(port)
                raise PollError("refused", f"{where}: {kind} {port} failed: {exc}") from None

    # the exchange

    def _sign_on(
        self, ser: serial.Serial, meter: IecMeter, mode: str, where: str, wire: list[tuple[int, int]]
    ) -> tuple[Identification, int, datetime]:
        """Sign-on, identification and option select; (identification, rate, our time at the select).

        The identification is awaited for the standard's reaction time (1.5 s) at
        least. Behind a TCP converter the line rate is the converter's, so the option
        select asks the meter to stay at the initial rate instead of switching.
        """
        initial = int(meter.baudrate or DEFAULT_INITIAL_BAUD)
        timeout = float(meter.timeout)
        if ser.baudrate != initial:
            ser.baudrate = initial
        ser.reset_input_buffer()
        self._send(ser, sign_on(meter.address or ""), wire)
        line = self._receive(
            ser, lambda b: b.endswith(CRLF), max(timeout, REACTION_MAX_S), "identification", where, wire,
            IDENT_MAX,
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
        char = ident.baud_char
        if converter_of(meter)[1] is not None and initial in CHAR_OF_BAUD:
            rate, char = initial, CHAR_OF_BAUD[initial]  # a transparent converter cannot switch rates
        self._send(ser, option_select(char, mode), wire)
        polled_at = self._now()
        if rate != initial:
            ser.baudrate = rate
        return ident, rate, polled_at

    def _exchange(self, ser: serial.Serial, meter: IecMeter, where: str) -> Readout:
        dialect = DIALECTS[meter.dialect or "standard"]
        timeout = float(meter.timeout)
        wire: list[tuple[int, int]] = []
        ident, rate, polled_at = self._sign_on(ser, meter, dialect.mode, where, wire)
        values_at: datetime | None = None
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
                polled_at, sets, values_at = self._programming(ser, meter, dialect, timeout, where, wire)
            finally:  # leave programming mode whatever happened, so the meter is free again
                self._break(ser, dialect, wire)
        try:
            clock = meter_clock(sets, self._tz)
        except ObisError as exc:
            raise PollError("decode", f"{where}: {exc}") from None
        return Readout(ident, sets, polled_at, clock, rate, wire, values_at)

    def _break(self, ser: serial.Serial, dialect: Dialect, wire: list[tuple[int, int]]) -> None:
        try:
            self._send(ser, command_message("B0", None, dialect.bcc), wire)
        except (OSError, serial.SerialException):
            pass

    def _password(
        self, ser: serial.Serial, meter: IecMeter, dialect: Dialect, timeout: float, where: str,
        wire: list[tuple[int, int]], required: bool = True,
    ) -> None:
        """Wait for the meter's P0, then send the password (P1) and expect ACK.

        Not required (the standard's profile readout) and no password configured:
        only the P0 is awaited.
        """
        self._frame(ser, dialect, timeout, "password request (P0)", where, wire, expect="P0")
        password = meter.password or dialect.default_password
        if password is None and not required:
            return
        self._send(ser, command_message("P1", f"({password or ''})", dialect.bcc), wire)
        answer = self._receive(
            ser, lambda b: b[:1] in (ACK, NAK) or _frame_complete(b), timeout,
            "password answer", where, wire, REPLY_MAX,
        )
        if answer[:1] == NAK:
            raise PollError("refused", f"{where}: the meter refused the password (key 'password')")
        if answer[:1] != ACK:
            raise PollError("garbage", f"{where}: password answer is neither ACK nor NAK: {answer[:24]!r}")

    def _programming(
        self, ser: serial.Serial, meter: IecMeter, dialect: Dialect, timeout: float, where: str,
        wire: list[tuple[int, int]],
    ) -> tuple[datetime, dict[str, DataSet], datetime | None]:
        """Password, then one read command per group of wanted registers, then the clock.

        The third element is the instant an archive's values belong to (None: now).
        """
        self._password(ser, meter, dialect, timeout, where, wire)
        polled_at = self._now()
        sets: dict[str, DataSet] = {}
        values_at: datetime | None = None
        wanted = set(meter.registers)
        for command, registers in dialect.commands:
            if not wanted & set(registers):
                continue
            values, archive_date = self._command(ser, dialect, command, timeout, where, wire)
            if archive_date is not None:
                try:
                    y, mo, d = parse_meter_date(archive_date)
                    values_at = datetime(y, mo, d, tzinfo=self._tz).astimezone(UTC)
                except ValueError as exc:
                    raise PollError("decode", f"{where}: {command}: archive date: {exc}") from None
            for reg, raw in zip(registers, values, strict=False):
                try:
                    sets[reg] = DataSet(reg, "energy", energy_kwh(reg, raw, "kWh"), "kWh")
                except ObisError as exc:
                    raise PollError("decode", f"{where}: {command}: {exc}") from None
        if dialect.clock:
            date_cmd, time_cmd = dialect.clock
            date_v = self._command(ser, dialect, f"{date_cmd}()", timeout, where, wire)[0][:1]
            time_v = self._command(ser, dialect, f"{time_cmd}()", timeout, where, wire)[0][:1]
            try:
                y, mo, d = parse_meter_date(date_v[0]) if date_v else (0, 0, 0)
            except ValueError:
                y = 0
            if y and time_v:
                sets["0.9.2"] = DataSet("0.9.2", "date", f"{y % 100:02d}-{mo:02d}-{d:02d}", None)
                sets["0.9.1"] = DataSet("0.9.1", "time", time_v[0], None)
            else:
                raise PollError(
                    "decode", f"{where}: clock answers {date_v!r} {time_v!r} are not (w)w.dd.mm.yy / hh:mm:ss"
                )
        return polled_at, sets, values_at

    def _command(
        self, ser: serial.Serial, dialect: Dialect, command: str, timeout: float, where: str,
        wire: list[tuple[int, int]],
    ) -> tuple[list[str], str | None]:
        """Send `R1 command`; the answer's values (by the dialect's rule) and an archive date."""
        self._send(ser, command_message("R1", command, dialect.bcc), wire)
        data = self._frame(ser, dialect, timeout, f"answer to {command}", where, wire, expect="")
        raw = command_values(data)
        if not raw or raw[0].startswith("ERR"):
            raise PollError("exception", f"{where}: the meter answered {data.strip()!r} to {command}")
        values, date = dialect.answer(data)
        if not values:
            raise PollError("decode", f"{where}: no values in the answer {data.strip()[:60]!r} to {command}")
        return values, date

    def _frame(
        self, ser: serial.Serial, dialect: Dialect, timeout: float, what: str, where: str,
        wire: list[tuple[int, int]], expect: str, most: int = REPLY_MAX,
    ) -> str:
        msg = self._receive(ser, _frame_complete, timeout, what, where, wire, most)
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
        if parity_errors and id(ser) in self._tcp_lines and not any(b & 0x80 for b in raw):
            # a converter whose serial side is set to 7E1 checks the parity itself and hands
            # over 7-bit characters; one at 8N1 passes the parity bit, which is checked here
            parity_errors = 0
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

    # the load profile and the clock (adapters.base.ProfileMeter, ClockSettable)

    def has_profile(self, meter: IecMeter) -> bool:
        """Whether this meter's dialect answers the P.01 load-profile readout."""
        return DIALECTS[meter.dialect or "standard"].profile

    def clock_offset(self, meter: IecMeter) -> float | None:
        """The meter's clock minus ours at its last read, in seconds (None: not read yet)."""
        return self._offsets.get(meter.id)

    def clock_step_limit(self, meter: IecMeter) -> float | None:
        """The largest correction this meter's dialect takes in a day, s (None: not corrected)."""
        return DIALECTS[meter.dialect or "standard"].clock_step_s

    async def read_profile(
        self, meter: IecMeter, start: datetime, end: datetime, limit: int
    ) -> list[ProfileSlot]:
        """The load-profile slots starting in [start, end), oldest first, at most limit."""
        return await asyncio.to_thread(self.read_profile_blocking, meter, start, end, limit)

    def read_profile_blocking(
        self, meter: IecMeter, start: datetime, end: datetime, limit: int
    ) -> list[ProfileSlot]:
        dialect = DIALECTS[meter.dialect or "standard"]
        if not dialect.profile:
            raise PollError("refused", f"{self._where(meter)}: dialect {meter.dialect!r} has no P.01 load profile")

        def exchange(ser: serial.Serial, where: str) -> list[ProfileSlot]:
            wire: list[tuple[int, int]] = []
            timeout = float(meter.timeout)
            self._sign_on(ser, meter, "1", where, wire)
            try:
                self._password(ser, meter, dialect, timeout, where, wire, required=False)
                # the meter names records by the end of their period: ask from the first end after start
                self._send(ser, command_message("R5", profile_request(start, end, self._tz), dialect.bcc), wire)
                most = 256 + PROFILE_RECORD_BYTES * max(1, limit) * 2
                data = self._frame(ser, dialect, timeout, "load profile (P.01)", where, wire, expect="", most=most)
            finally:
                self._break(ser, dialect, wire)
            if data.strip().startswith("(ERR"):
                return []  # no records in that range
            try:
                slots = parse_profile(data, self._tz)
            except (ValueError, ArithmeticError) as exc:
                raise PollError("decode", f"{where}: load profile: {exc}") from None
            wanted = [sl for sl in slots if start <= sl.start < end]
            return wanted[:limit]

        return self._session(meter, exchange)

    async def correct_clock(self, meter: IecMeter, delta_s: float) -> None:
        """Move the meter's clock by delta_s seconds: Energomera's `W1 CTIME(±s)`, within its daily step."""
        await asyncio.to_thread(self.correct_clock_blocking, meter, delta_s)

    def correct_clock_blocking(self, meter: IecMeter, delta_s: float) -> None:
        dialect = DIALECTS[meter.dialect or "standard"]
        where = self._where(meter)
        if dialect.clock_step_s is None:
            raise PollError("refused", f"{where}: dialect {meter.dialect!r} has no clock correction here")
        step = round(delta_s)
        if step == 0 or abs(step) > dialect.clock_step_s:
            raise PollError(
                "refused", f"{where}: a clock correction of {delta_s:+.0f} s is outside 1..{dialect.clock_step_s:g} s"
            )

        def exchange(ser: serial.Serial, where: str) -> None:
            wire: list[tuple[int, int]] = []
            timeout = float(meter.timeout)
            self._sign_on(ser, meter, dialect.mode, where, wire)
            try:
                self._password(ser, meter, dialect, timeout, where, wire)
                self._send(ser, command_message("W1", f"CTIME({step:+d})", dialect.bcc), wire)
                answer = self._receive(
                    ser, lambda b: b[:1] in (ACK, NAK) or _frame_complete(b), timeout,
                    "clock correction answer", where, wire, REPLY_MAX,
                )
            finally:
                self._break(ser, dialect, wire)
            if answer[:1] != ACK:
                raise PollError("exception", f"{where}: the meter did not accept CTIME({step:+d}): {answer[:32]!r}")
            self._offsets.pop(meter.id, None)  # known again at the next read

        self._session(meter, exchange)

    # ports

    def _port_lock(self, port: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(port, threading.Lock())

    def _open(self, port: str, where: str, tcp: bool = False) -> serial.Serial:
        """The open line: a serial port, or (tcp) a TCP connection to `host:port` of a
        transparent converter through pyserial's socket:// handler, which reads and
        writes like a port (its rate settings are no-ops)."""
        with self._guard:
            ser = self._ports.get(port)
        if ser is not None and ser.is_open:
            return ser
        try:
            if tcp:
                ser = serial.serial_for_url(f"socket://{port}", timeout=1.0, write_timeout=5.0)
                self._tcp_lines.add(id(ser))
            else:
                ser = serial.Serial(port, DEFAULT_INITIAL_BAUD, timeout=1.0, write_timeout=5.0)
        except (OSError, serial.SerialException) as exc:
            what = "connect to the TCP converter" if tcp else "open serial port"
            raise PollError("refused", f"{where}: cannot {what} {port}: {exc}") from None
        with self._guard:
            self._ports[port] = ser
        return ser

    def _drop(self, port: str) -> None:
        with self._guard:
            ser = self._ports.pop(port, None)
        if ser is not None:
            self._tcp_lines.discard(id(ser))
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
