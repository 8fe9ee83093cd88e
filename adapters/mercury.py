"""Incotex "Меркурий" binary protocols: the pure frame codec (no I/O).

Two families share the framing `[address][command][data...][CRC-16/MODBUS, low byte first]`:

- **v2** (three-phase 230/231/233/234/236/238 and 203.2TD/204/208): a 1-byte
  address (1..240, 0 = broadcast), a session (open the channel with an access
  level and a 6-byte password, close it), energy arrays whose 32-bit values
  come as two 16-bit words, high word first, each word little-endian, the
  clock in BCD, and the 30-minute average-power profile in physical memory.
- **v1** (single-phase 200/201/203/206): a 4-byte address taken from the
  serial number, no session, BCD energy per tariff and a BCD clock.

Command codes, parameter numbers, status codes and timing are data in
`adapters/schemas/mercury.toml` (`PROTOCOL`); this module turns them into bytes
and back. Transports and the adapter are in `adapters.mercury_adapter`; the
simulator (`simulators.mercury_sim`) builds its answers with the same codec,
which is why the codec's own tests use byte sequences published by others.

Every decoding failure is a `FrameError` with an outcome word of
`adapters.base.OUTCOMES` ("crc", "garbage", "decode", "exception"), so the
adapter can raise it as a counted `PollError` without guessing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from pymodbus.framer import FramerRTU

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "mercury.toml"


def _load() -> dict[str, Any]:
    with SCHEMA_PATH.open("rb") as f:
        return tomllib.load(f)


PROTOCOL: dict[str, Any] = _load()
V2: dict[str, Any] = PROTOCOL["v2"]
V1: dict[str, Any] = PROTOCOL["v1"]
LINE: dict[str, Any] = PROTOCOL["line"]
CMD: dict[str, int] = V2["commands"]
RPARAM: dict[str, int] = V2["read_params"]
WPARAM: dict[str, int] = V2["write_params"]
PROFILE: dict[str, Any] = V2["profile"]
STATUS: dict[int, str] = {int(k): v for k, v in V2["status"].items()}
METER_CONSTANTS: dict[int, int] = {int(k): v for k, v in V2["meter_constants"].items()}
ACCESS_LEVELS: dict[int, str] = {int(k): v for k, v in V2["access_levels"].items()}
DEFAULT_PASSWORD: str = V2["default_password"]
BROADCAST: int = V2["broadcast_address"]
NOT_MEASURED_32 = 0xFFFFFFFF
PASSWORD_ENCODINGS = ("digits", "ascii")
STATUS_CHANNEL_NOT_OPEN = 5

# the energy registers of one 05 answer, in order, and their OBIS C field
DIRECTIONS: tuple[tuple[str, str], ...] = (("A+", "1"), ("A-", "2"), ("R+", "3"), ("R-", "4"))
# OBIS register -> (direction index, tariff 0 = sum, 1..4)
ENERGY_REGISTERS: dict[str, tuple[int, int]] = {
    f"{c}.8.{t}": (i, t) for i, (_, c) in enumerate(DIRECTIONS) for t in range(5)
}
V1_REGISTERS: dict[str, int] = {f"1.8.{t}": t for t in range(5)}  # v1: import active only


class FrameError(ValueError):
    """A frame that is not a good answer; `outcome` is the PollError word."""

    def __init__(self, outcome: str, reason: str, raw: bytes = b""):
        self.outcome = outcome
        self.raw = raw
        super().__init__(reason)


class StatusError(FrameError):
    """The meter answered with a status code other than 0 (named in `STATUS`)."""

    def __init__(self, code: int, raw: bytes = b""):
        self.code = code
        name = STATUS.get(code, f"unknown status code {code}")
        super().__init__("exception", f"the meter answered status {code}: {name}", raw)


# --- framing -----------------------------------------------------------------


def crc16(data: bytes) -> bytes:
    """CRC-16/MODBUS of data, as the two bytes on the wire (low byte first).

    pymodbus's table-driven CRC returns the value byte-swapped for exactly
    this purpose, so big-endian bytes of it are the wire order.
    """
    return FramerRTU.compute_CRC(data).to_bytes(2, "big")


def frame(address: bytes, *payload: int | bytes) -> bytes:
    """address + payload + CRC; address is 1 byte (v2) or 4 bytes (v1)."""
    body = bytearray(address)
    for p in payload:
        if isinstance(p, int):
            body.append(p)
        else:
            body += p
    return bytes(body) + crc16(bytes(body))


def check_frame(raw: bytes, address: bytes) -> bytes:
    """The payload after the address of a received frame, its CRC and address checked."""
    n = len(address)
    if len(raw) < n + 3:
        raise FrameError("garbage", f"answer too short ({len(raw)} bytes): {raw.hex(' ')}", raw)
    if raw[:n] != address:  # noise, or another meter's answer: not a damaged frame of ours
        raise FrameError("garbage", f"answer from address {raw[:n].hex()}, not {address.hex()}: {raw[:24].hex(' ')}", raw)
    if crc16(raw[:-2]) != raw[-2:]:
        raise FrameError(
            "crc", f"CRC mismatch: computed {crc16(raw[:-2]).hex(' ')}, received {raw[-2:].hex(' ')} "
            f"in {len(raw)} bytes", raw,
        )
    return raw[n:-2]


def v2_address(address: int) -> bytes:
    if not 0 <= address <= V2["max_address"]:
        raise ValueError(f"a Mercury v2 address is 1..{V2['max_address']} (0 = broadcast), not {address}")
    return bytes((address,))


def v1_address(address: int) -> bytes:
    if not 0 <= address <= V1["max_address"]:
        raise ValueError(f"a Mercury v1 address is 4 bytes (0..{V1['max_address']}), not {address}")
    return address.to_bytes(4, "big")


def v1_address_from_serial(serial: str, model: str = "206") -> int:
    """The v1 address a meter answers to: the serial's last 6 digits (200) or 8 (203, 206)."""
    digits = serial.strip()
    if not digits.isdigit():
        raise ValueError(f"a Mercury serial number is digits, not {serial!r}")
    return int(digits[-6:] if model.startswith("200") else digits[-8:])


def v2_factory_address(serial: str) -> int:
    """A v2 meter's factory address: the serial's last 3 digits, the last 2 when above 240, 0 -> 1."""
    digits = serial.strip()
    if not digits.isdigit():
        raise ValueError(f"a Mercury serial number is digits, not {serial!r}")
    a = int(digits[-3:])
    if a > V2["max_address"]:
        a = int(digits[-2:])
    return a or 1


# --- BCD -----------------------------------------------------------------------


def bcd(value: int) -> int:
    """One byte of two decimal digits."""
    if not 0 <= value <= 99:
        raise ValueError(f"BCD byte holds 0..99, not {value}")
    return (value // 10) << 4 | value % 10


def from_bcd(b: int) -> int:
    hi, lo = b >> 4, b & 0x0F
    if hi > 9 or lo > 9:
        raise FrameError("decode", f"byte {b:02x} is not BCD")
    return hi * 10 + lo


def from_bcd_bytes(data: bytes) -> int:
    """Big-endian BCD digits: 00 06 21 42 -> 62142."""
    v = 0
    for b in data:
        v = v * 100 + from_bcd(b)
    return v


def to_bcd_bytes(value: int, n: int) -> bytes:
    if not 0 <= value < 10 ** (2 * n):
        raise ValueError(f"{value} does not fit {n} BCD bytes")
    return bytes(bcd(value // 100 ** (n - 1 - i) % 100) for i in range(n))


# --- v2 session ------------------------------------------------------------------


def encode_password(password: str, encoding: str) -> bytes:
    """The 6 password bytes: "digits" sends each digit's value (1 -> 0x01), "ascii" its character.

    A wrong encoding is the most common reason a Mercury refuses the channel
    (it answers status 1, or nothing): meters are set either way by their
    configurators.
    """
    if encoding not in PASSWORD_ENCODINGS:
        raise ValueError(f"password_encoding must be one of {PASSWORD_ENCODINGS}, not {encoding!r}")
    if len(password) != 6:
        raise ValueError("a Mercury password has 6 characters")
    if encoding == "digits":
        if not password.isdigit() or not password.isascii():
            raise ValueError("password_encoding 'digits' needs a password of 6 digits")
        return bytes(int(c) for c in password)
    try:
        return password.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("password_encoding 'ascii' needs an ASCII password") from None


def open_request(address: int, password: str, encoding: str = "digits", level: int = 1) -> bytes:
    if level not in ACCESS_LEVELS:
        raise ValueError(f"access_level must be one of {sorted(ACCESS_LEVELS)}, not {level}")
    return frame(v2_address(address), CMD["open"], level, encode_password(password, encoding))


def close_request(address: int) -> bytes:
    return frame(v2_address(address), CMD["close"])


def test_request(address: int) -> bytes:
    return frame(v2_address(address), CMD["test"])


def status_reply(address: int, code: int = 0) -> bytes:
    return frame(v2_address(address), code)


def parse_status(payload: bytes, raw: bytes = b"") -> None:
    """A status answer (one byte): returns for 0, raises StatusError otherwise."""
    if len(payload) != 1:
        raise FrameError("garbage", f"expected a status answer, got {len(payload)} data bytes", raw)
    code = payload[0] & 0x0F
    if code:
        raise StatusError(code, raw)


def status_of(payload: bytes) -> int | None:
    """The status code when payload is a status answer, else None."""
    return payload[0] & 0x0F if len(payload) == 1 else None


# --- v2 energy -------------------------------------------------------------------


def energy_request(address: int, tariff: int = 0, array: int = 0, month: int = 0) -> bytes:
    """05 <array << 4 | month> <tariff>: array 0 is energy since reset; tariff 0 the sum, 1..4 T1..T4."""
    if not 0 <= tariff <= 4:
        raise ValueError(f"tariff is 0 (sum) or 1..4, not {tariff}")
    if not 0 <= array <= 15 or not 0 <= month <= 12:
        raise ValueError(f"bad energy array {array} / month {month}")
    return frame(v2_address(address), CMD["energy"], array << 4 | month, tariff)


def word_swapped(value: int) -> bytes:
    """The 4 bytes of a 32-bit value as a v2 meter sends it: high word first, each word little-endian."""
    b = value.to_bytes(4, "big")
    return bytes((b[1], b[0], b[3], b[2]))


def from_word_swapped(p: bytes) -> int | None:
    """`30 00 28 C5` -> 0x0030C528; FF FF FF FF (not measured) -> None, never a huge value."""
    if len(p) != 4:
        raise FrameError("decode", f"an energy value has 4 bytes, not {len(p)}")
    if p == b"\xff\xff\xff\xff":
        return None
    return p[1] << 24 | p[0] << 16 | p[3] << 8 | p[2]


@dataclass(frozen=True, slots=True)
class Energy:
    """One 05 answer: A+, A-, R+, R- in Wh (varh), None where the meter does not measure."""

    values: tuple[int | None, int | None, int | None, int | None]

    def wh(self, direction: int) -> int | None:
        return self.values[direction]


def energy_reply(address: int, values: tuple[int | None, ...]) -> bytes:
    data = b"".join(b"\xff" * 4 if v is None else word_swapped(v) for v in values)
    return frame(v2_address(address), data)


def parse_energy(payload: bytes, raw: bytes = b"") -> Energy:
    code = status_of(payload)
    if code is not None:
        parse_status(payload, raw)
        raise FrameError("garbage", "status 0 where energy values were expected", raw)
    if len(payload) != 16:
        raise FrameError("decode", f"an energy answer has 16 data bytes, not {len(payload)}", raw)
    v = tuple(from_word_swapped(payload[i : i + 4]) for i in range(0, 16, 4))
    return Energy((v[0], v[1], v[2], v[3]))


def kwh(wh: int) -> Decimal:
    """Wh as exact kWh."""
    return Decimal(wh).scaleb(-3)


# --- v2 clock --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeterClock:
    """The meter's local wall-clock time (naive: the meter knows no zone) and its season flag."""

    local: datetime
    weekday: int
    winter: bool


def clock_request(address: int) -> bytes:
    return frame(v2_address(address), CMD["read_time"], V2["read_time"]["clock"])


def _local(year2: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime:
    try:
        return datetime(2000 + year2, month, day, hour, minute, second)
    except ValueError as exc:
        raise FrameError("decode", f"not a valid time: {exc}") from None


def clock_reply(address: int, local: datetime, winter: bool = True) -> bytes:
    data = bytes((
        bcd(local.second), bcd(local.minute), bcd(local.hour), bcd(local.isoweekday() % 7),
        bcd(local.day), bcd(local.month), bcd(local.year % 100), 1 if winter else 0,
    ))
    return frame(v2_address(address), data)


def parse_clock(payload: bytes, raw: bytes = b"") -> MeterClock:
    """8 bytes BCD: ss mm hh weekday dd MM yy season (1 = winter)."""
    if status_of(payload) is not None:
        parse_status(payload, raw)
    if len(payload) != 8:
        raise FrameError("decode", f"a clock answer has 8 data bytes, not {len(payload)}", raw)
    ss, mm, hh, wd, dd, mo, yy = (from_bcd(b) for b in payload[:7])
    return MeterClock(_local(yy, mo, dd, hh, mm, ss), wd, payload[7] == 1)


def correct_clock_request(address: int, local: datetime) -> bytes:
    """03 0D ss mm hh: set the time of day to `local` (within +-4 minutes of the meter's, once a day)."""
    return frame(
        v2_address(address), CMD["write"], WPARAM["correct_clock"],
        bcd(local.second), bcd(local.minute), bcd(local.hour),
    )


# --- v2 parameters ------------------------------------------------------------------


def read_param_request(address: int, param: str, *extra: int) -> bytes:
    return frame(v2_address(address), CMD["read"], RPARAM[param], *extra)


def decimal_bytes(data: bytes) -> int:
    """Bytes that each hold two decimal digits in binary, as Mercury writes serial numbers:
    `28 44 00 30` -> 40680048 (webtoucher/mercury-base dec_str)."""
    if any(b > 99 for b in data):
        raise FrameError("decode", f"bytes {data.hex(' ')} do not each hold two decimal digits")
    return int("".join(f"{b:02d}" for b in data))


def to_decimal_bytes(value: int, n: int) -> bytes:
    if not 0 <= value < 100**n:
        raise ValueError(f"{value} does not fit {n} bytes of two decimal digits")
    return bytes(value // 100 ** (n - 1 - i) % 100 for i in range(n))


def transformer_reply(address: int, ku: int, ki: int) -> bytes:
    return frame(v2_address(address), to_decimal_bytes(ku, 2) + to_decimal_bytes(ki, 2))


def parse_transformer(payload: bytes, raw: bytes = b"") -> tuple[int, int]:
    """(voltage ratio, current ratio) from 08 02: 2 bytes each of two decimal digits a byte
    (webtoucher/mercury-base get_transformation_ratios; a ratio of 1 is `00 01`)."""
    if status_of(payload) is not None:
        parse_status(payload, raw)
    if len(payload) != 4:
        raise FrameError("decode", f"a transformer-ratio answer has 4 data bytes, not {len(payload)}", raw)
    try:
        return decimal_bytes(payload[:2]), decimal_bytes(payload[2:])
    except FrameError as exc:
        raise FrameError("decode", f"transformer ratios: {exc}", raw) from None


@dataclass(frozen=True, slots=True)
class Variant:
    constant: int  # impulses per kWh
    has_profile: bool
    single_phase: bool
    one_direction: bool


def variant_reply(address: int, constant: int, has_profile: bool = True) -> bytes:
    code = next(c for c, v in METER_CONSTANTS.items() if v == constant)
    b2 = code | (0x20 if has_profile else 0)
    return frame(v2_address(address), bytes((0x00, 0x00, b2, 0x00, 0x00, 0x00)))


def parse_variant(payload: bytes, raw: bytes = b"") -> Variant:
    """The 08 12 variant word: byte 2's low nibble is the meter constant code, bit 5 the
    power profile, bit 4 single-phase, bit 7 one direction (unverified beyond one source)."""
    if status_of(payload) is not None:
        parse_status(payload, raw)
    if len(payload) < 3:
        raise FrameError("decode", f"a variant answer has at least 3 data bytes, not {len(payload)}", raw)
    b2 = payload[2]
    constant = METER_CONSTANTS.get(b2 & 0x0F)
    if constant is None:
        raise FrameError("decode", f"unknown meter constant code {b2 & 0x0F}", raw)
    return Variant(constant, bool(b2 & 0x20), bool(b2 & 0x10), bool(b2 & 0x80))


# --- v2 average-power profile ---------------------------------------------------------


RECORD_SIZE: int = PROFILE["record_size"]
READ_LENGTH: int = PROFILE["read_length"]
NOT_MEASURED_16: int = PROFILE["not_measured"]
RECORDS: int = PROFILE["address_space"] // RECORD_SIZE


@dataclass(frozen=True, slots=True)
class ProfilePointer:
    """08 13: the number of the last record written, its status and time, the averaging period."""

    last: int
    status: int
    local: datetime
    period_min: int


def profile_pointer_reply(address: int, p: ProfilePointer) -> bytes:
    t = p.local
    data = p.last.to_bytes(2, "big") + bytes((
        p.status, bcd(t.hour), bcd(t.minute), bcd(t.day), bcd(t.month), bcd(t.year % 100), p.period_min,
    ))
    return frame(v2_address(address), data)


def parse_profile_pointer(payload: bytes, raw: bytes = b"") -> ProfilePointer:
    if status_of(payload) is not None:
        parse_status(payload, raw)
    if len(payload) != 9:
        raise FrameError("decode", f"a profile-pointer answer has 9 data bytes, not {len(payload)}", raw)
    hh, mm, dd, mo, yy = (from_bcd(b) for b in payload[3:8])
    period = payload[8]
    if not period:
        raise FrameError("decode", "the profile's averaging period is 0 minutes", raw)
    return ProfilePointer(int.from_bytes(payload[:2], "big") % RECORDS, payload[2], _local(yy, mo, dd, hh, mm, 0), period)


def record_address(record: int) -> int:
    """The physical address of record number `record` (wrapping over the array)."""
    return (record % RECORDS) * RECORD_SIZE


def profile_read_request(address: int, record: int) -> bytes:
    """06 <memory> <addr hi> <addr lo> 0F: the 15 bytes of one profile record."""
    phys = record_address(record)
    mem = PROFILE["memory_high"] if phys > 0xFFFF else PROFILE["memory"]
    return frame(v2_address(address), CMD["memory"], mem, (phys >> 8) & 0xFF, phys & 0xFF, READ_LENGTH)


def parse_profile_request(payload: bytes) -> int:
    """The record number a 06 request asks for (the simulator's side)."""
    if len(payload) != 5 or payload[0] != CMD["memory"]:
        raise FrameError("garbage", f"not a memory read: {payload.hex(' ')}")
    phys = (0x10000 if payload[1] == PROFILE["memory_high"] else 0) | payload[2] << 8 | payload[3]
    return phys // RECORD_SIZE


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """One average-power record: its slot, the pulse counts of A+, A-, R+, R- (None: not measured)."""

    status: int
    local: datetime  # the slot's start in the meter's local time (PROFILE["record_time"])
    period_min: int
    counts: tuple[int | None, int | None, int | None, int | None]

    @property
    def slot(self) -> tuple[datetime, datetime]:
        return self.local, self.local + timedelta(minutes=self.period_min)


def profile_record_reply(address: int, r: ProfileRecord) -> bytes:
    t = r.local
    data = bytes((r.status, bcd(t.hour), bcd(t.minute), bcd(t.day), bcd(t.month), bcd(t.year % 100), r.period_min))
    data += b"".join(
        (NOT_MEASURED_16 if c is None else c).to_bytes(2, "little") for c in r.counts
    )
    return frame(v2_address(address), data)


def empty_record_reply(address: int) -> bytes:
    """Memory never written: all bytes FF."""
    return frame(v2_address(address), b"\xff" * READ_LENGTH)


def parse_profile_record(payload: bytes, raw: bytes = b"") -> ProfileRecord | None:
    """A record, or None for memory never written (all FF)."""
    if status_of(payload) is not None:
        parse_status(payload, raw)
    if len(payload) != READ_LENGTH:
        raise FrameError("decode", f"a profile record has {PROFILE['read_length']} data bytes, not {len(payload)}", raw)
    if payload == b"\xff" * len(payload):
        return None
    hh, mm, dd, mo, yy = (from_bcd(b) for b in payload[1:6])
    nm = NOT_MEASURED_16
    c = tuple(None if (v := int.from_bytes(payload[7 + 2 * i : 9 + 2 * i], "little")) == nm else v for i in range(4))
    if not payload[6]:
        raise FrameError("decode", "a profile record with an averaging period of 0 minutes", raw)
    return ProfileRecord(payload[0], _local(yy, mo, dd, hh, mm, 0), payload[6], (c[0], c[1], c[2], c[3]))


def pulses_wh(count: int, constant: int) -> Decimal:
    """Energy of a slot from its pulse count: N / (2 A) kWh, A the meter constant (imp/kWh).

    The array counts at twice the meter constant (P = N * (60 / T) / (2 A) kW,
    astue-mps-replacement), so a slot's energy does not depend on its length.
    """
    return Decimal(count * 500) / Decimal(constant)


def wh_pulses(wh: int, constant: int) -> int:
    """The pulse count of wh at a meter constant (the simulator's side); exact when 500 divides wh * A."""
    return round(wh * constant / 500)


# --- v1 (200/201/203/206) ----------------------------------------------------------------


def v1_request(address: int, command: str) -> bytes:
    return frame(v1_address(address), V1["commands"][command])


def v1_reply(address: int, command: str, data: bytes) -> bytes:
    """A v1 answer echoes the address and the command before its data."""
    return frame(v1_address(address), V1["commands"][command], data)


def v1_payload(raw: bytes, address: int, command: str) -> bytes:
    payload = check_frame(raw, v1_address(address))
    if payload[:1] != bytes((V1["commands"][command],)):
        raise FrameError("garbage", f"answer to command {payload[:1].hex()}, not {V1['commands'][command]:02x}", raw)
    return payload[1:]


def v1_energy_reply(address: int, centi_kwh: tuple[int, int, int, int]) -> bytes:
    return v1_reply(address, "energy", b"".join(to_bcd_bytes(v, 4) for v in centi_kwh))


def parse_v1_energy(data: bytes, raw: bytes = b"") -> tuple[Decimal, Decimal, Decimal, Decimal]:
    """T1..T4 in kWh from 4 x 4 bytes BCD in units of 0.01 kWh."""
    if len(data) != 16:
        raise FrameError("decode", f"a v1 energy answer has 16 data bytes, not {len(data)}", raw)
    try:
        v = [Decimal(from_bcd_bytes(data[i : i + 4])).scaleb(-2) for i in range(0, 16, 4)]
    except FrameError as exc:
        raise FrameError("decode", f"v1 energy: {exc}", raw) from None
    return v[0], v[1], v[2], v[3]


def v1_clock_reply(address: int, local: datetime) -> bytes:
    data = bytes((
        bcd(local.isoweekday() % 7), bcd(local.hour), bcd(local.minute), bcd(local.second),
        bcd(local.day), bcd(local.month), bcd(local.year % 100),
    ))
    return v1_reply(address, "clock", data)


def parse_v1_clock(data: bytes, raw: bytes = b"") -> MeterClock:
    """7 bytes BCD: weekday hh mm ss dd MM yy."""
    if len(data) != 7:
        raise FrameError("decode", f"a v1 clock answer has 7 data bytes, not {len(data)}", raw)
    wd, hh, mm, ss, dd, mo, yy = (from_bcd(b) for b in data)
    return MeterClock(_local(yy, mo, dd, hh, mm, ss), wd, True)


# --- sizes, for timing and the benchmark's line bound -----------------------------------------


def reply_size(request: bytes, family: str = "v2") -> int:
    """The length of a good answer to request (a status answer is 4 bytes in v2)."""
    if family == "v1":
        cmd = request[4]
        data = {V1["commands"]["energy"]: 16, V1["commands"]["clock"]: 7}.get(cmd, 0)
        return 4 + 1 + data + 2
    cmd = request[1]
    if cmd in (CMD["open"], CMD["close"], CMD["test"], CMD["write"]):
        return 4
    if cmd == CMD["energy"]:
        return 1 + 16 + 2
    if cmd == CMD["read_time"]:
        return 1 + 8 + 2
    if cmd == CMD["memory"]:
        return 1 + request[5] + 2
    if cmd == CMD["read"]:
        return 1 + {RPARAM["transformer"]: 4, RPARAM["variant"]: 6, RPARAM["profile_pointer"]: 9,
                    RPARAM["serial"]: 7, RPARAM["address"]: 2}.get(request[2], 0) + 2
    return 4
