"""COSEM application layer for DLMS/COSEM meters (SPODES), as a pure codec.

What a household meter's reader needs of IEC 62056-5-3 / -6-2, and no more:

- A-XDR data (`decode_data`, and `enc_*` to build values): arrays,
  structures, integers of every width, octet and visible strings, enums,
  date-time octet strings;
- association: AARQ with low-level security (LLS, a password) and the AARE
  that accepts or rejects it (`encode_aarq`, `decode_aare`; the simulator
  uses the other two);
- GET-Request-Normal with optional selective access (by range, for
  profiles), GET-Request-Next, GET-Response-Normal and -With-Datablock;
  SET-Request-Normal and ACTION-Request-Normal for the clock;
- the IEC 62056-47 TCP wrapper header (version 1, source and destination
  wPort, length).

COSEM date-time (12 bytes): year (2), month, day, weekday, hour, minute,
second, hundredths, deviation (2, signed minutes) and clock status.
Deviation follows the Blue Book: minutes from local time to UTC, so
UTC+03:00 (Moscow) is -180 (0xFF4C) and UTC = local + deviation; 0x8000
means "not specified" and the meter's configured time zone is used.

Everything here is bytes in, values out; errors are `CosemError` with a
poll outcome word, so the adapter turns them into named poll errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any

# --- errors -------------------------------------------------------------------------


class CosemError(ValueError):
    """An APDU or value that cannot be taken; `outcome` is a poll outcome word."""

    def __init__(self, outcome: str, reason: str):
        self.outcome = outcome
        super().__init__(reason)


# data-access-result (IEC 62056-5-3): what a meter says instead of a value
ACCESS_RESULTS: dict[int, str] = {
    0: "success", 1: "hardware-fault", 2: "temporary-failure", 3: "read-write-denied",
    4: "object-undefined", 9: "object-class-inconsistent", 11: "object-unavailable",
    12: "type-unmatched", 13: "scope-of-access-violated", 14: "data-block-unavailable",
    15: "long-get-aborted", 16: "no-long-get-in-progress", 17: "long-set-aborted",
    18: "no-long-set-in-progress", 19: "data-block-number-invalid", 250: "other-reason",
}

# acse-service-user diagnostics of a rejected association
ACSE_DIAGNOSTICS: dict[int, str] = {
    0: "null", 1: "no reason given", 2: "application context name not supported",
    11: "authentication mechanism name not recognised", 12: "authentication mechanism name required",
    13: "authentication failure (wrong password)", 14: "authentication required",
}

# --- OBIS -------------------------------------------------------------------------


def obis_bytes(text: str) -> bytes:
    """'1.0.1.8.0.255' (or '1-0:1.8.0.255') -> six bytes."""
    parts = text.replace("-", ".").replace(":", ".").split(".")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"OBIS code {text!r} is not six numbers like 1.0.1.8.0.255") from None
    if len(values) != 6 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"OBIS code {text!r} is not six numbers 0..255 like 1.0.1.8.0.255")
    return bytes(values)


def obis_text(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


# --- A-XDR data ---------------------------------------------------------------------

NULL, ARRAY, STRUCTURE, BOOLEAN, BIT_STRING = 0, 1, 2, 3, 4
DOUBLE_LONG, DOUBLE_LONG_UNSIGNED, OCTET_STRING, VISIBLE_STRING, UTF8_STRING = 5, 6, 9, 10, 12
BCD, INTEGER, LONG, UNSIGNED, LONG_UNSIGNED = 13, 15, 16, 17, 18
LONG64, LONG64_UNSIGNED, ENUM, FLOAT32, FLOAT64 = 20, 21, 22, 23, 24
DATE_TIME, DATE, TIME = 25, 26, 27

_FIXED: dict[int, tuple[int, bool]] = {  # tag -> (bytes, signed)
    BOOLEAN: (1, False), DOUBLE_LONG: (4, True), DOUBLE_LONG_UNSIGNED: (4, False), BCD: (1, False),
    INTEGER: (1, True), LONG: (2, True), UNSIGNED: (1, False), LONG_UNSIGNED: (2, False),
    LONG64: (8, True), LONG64_UNSIGNED: (8, False), ENUM: (1, False),
}


class Enum(int):
    """An A-XDR enum value (a unit, a result): an int that remembers its tag."""


class Structure(tuple[Any, ...]):
    """An A-XDR structure (arrays decode as lists)."""


def encode_length(n: int) -> bytes:
    """A-XDR/BER length: one byte below 128, else 0x8N and N bytes."""
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def decode_length(buf: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise CosemError("decode", "data ends where a length was expected")
    first = buf[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    if n == 0 or n > 4 or pos + 1 + n > len(buf):
        raise CosemError("decode", f"bad length prefix {first:#04x}")
    return int.from_bytes(buf[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def decode_data(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """One A-XDR value at pos: (value, position after it).

    Integers are int (enum: `Enum`), octet strings bytes, visible strings str
    (cp1251, as SPODES meters send Cyrillic), arrays list, structures
    `Structure`, null None, floats float, date-time the 12 raw bytes.
    """
    if pos >= len(buf):
        raise CosemError("decode", "data ends where a value was expected")
    tag = buf[pos]
    pos += 1
    if tag == NULL:
        return None, pos
    if tag in (ARRAY, STRUCTURE):
        n, pos = decode_length(buf, pos)
        items = []
        for _ in range(n):
            item, pos = decode_data(buf, pos)
            items.append(item)
        return (items if tag == ARRAY else Structure(items)), pos
    if tag in _FIXED:
        width, signed = _FIXED[tag]
        if pos + width > len(buf):
            raise CosemError("decode", f"value of type {tag} cut short")
        value = int.from_bytes(buf[pos : pos + width], "big", signed=signed)
        if tag == BOOLEAN:
            return bool(value), pos + width
        return (Enum(value) if tag == ENUM else value), pos + width
    if tag in (OCTET_STRING, VISIBLE_STRING, UTF8_STRING):
        n, pos = decode_length(buf, pos)
        if pos + n > len(buf):
            raise CosemError("decode", "string runs past the data")
        raw = buf[pos : pos + n]
        if tag == OCTET_STRING:
            return raw, pos + n
        return raw.decode("utf-8" if tag == UTF8_STRING else "cp1251", errors="replace"), pos + n
    if tag == BIT_STRING:
        n, pos = decode_length(buf, pos)
        nbytes = (n + 7) // 8
        return buf[pos : pos + nbytes], pos + nbytes
    if tag in (FLOAT32, FLOAT64):
        import struct

        width = 4 if tag == FLOAT32 else 8
        return struct.unpack(">f" if width == 4 else ">d", buf[pos : pos + width])[0], pos + width
    if tag in (DATE_TIME, DATE, TIME):
        width = {DATE_TIME: 12, DATE: 5, TIME: 4}[tag]
        return buf[pos : pos + width], pos + width
    raise CosemError("decode", f"A-XDR type tag {tag} is not supported")


def decode_value(buf: bytes) -> Any:
    """The one value that buf holds, refusing trailing bytes."""
    value, end = decode_data(buf, 0)
    if end != len(buf):
        raise CosemError("decode", f"{len(buf) - end} bytes after the value")
    return value


def enc_int(tag: int, value: int) -> bytes:
    width, signed = _FIXED[tag]
    return bytes((tag,)) + int(value).to_bytes(width, "big", signed=signed)


def enc_u8(v: int) -> bytes:
    return enc_int(UNSIGNED, v)


def enc_i8(v: int) -> bytes:
    return enc_int(INTEGER, v)


def enc_u16(v: int) -> bytes:
    return enc_int(LONG_UNSIGNED, v)


def enc_i16(v: int) -> bytes:
    return enc_int(LONG, v)


def enc_u32(v: int) -> bytes:
    return enc_int(DOUBLE_LONG_UNSIGNED, v)


def enc_i32(v: int) -> bytes:
    return enc_int(DOUBLE_LONG, v)


def enc_u64(v: int) -> bytes:
    return enc_int(LONG64_UNSIGNED, v)


def enc_enum(v: int) -> bytes:
    return enc_int(ENUM, v)


def enc_octets(raw: bytes) -> bytes:
    return bytes((OCTET_STRING,)) + encode_length(len(raw)) + raw


def enc_visible(text: str) -> bytes:
    raw = text.encode("cp1251")
    return bytes((VISIBLE_STRING,)) + encode_length(len(raw)) + raw


def enc_struct(*items: bytes) -> bytes:
    return bytes((STRUCTURE,)) + encode_length(len(items)) + b"".join(items)


def enc_array(items: list[bytes]) -> bytes:
    return bytes((ARRAY,)) + encode_length(len(items)) + b"".join(items)


ENC_NULL = b"\x00"


# --- units and scalers --------------------------------------------------------------

# unit enum (IEC 62056-6-2) of the quantities a household meter stores
UNITS: dict[int, str] = {
    27: "W", 28: "VA", 29: "var", 30: "Wh", 31: "VAh", 32: "varh", 33: "A", 35: "V", 44: "Hz", 255: "",
}
ENERGY_UNITS = {30: "Wh", 31: "VAh", 32: "varh"}


@dataclass(frozen=True, slots=True)
class ScalerUnit:
    scaler: int
    unit: int

    @property
    def unit_text(self) -> str:
        return UNITS.get(self.unit, f"unit {self.unit}")

    def apply(self, raw: int) -> Decimal:
        """raw * 10**scaler in the unit, exactly."""
        return Decimal(raw).scaleb(self.scaler)


def parse_scaler_unit(value: Any) -> ScalerUnit:
    """Attribute 3 of a register: structure {integer scaler, enum unit}."""
    if not (isinstance(value, Structure) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise CosemError("decode", f"scaler_unit is not a structure of two integers: {value!r}")
    return ScalerUnit(int(value[0]), int(value[1]))


# --- date-time ----------------------------------------------------------------------

DEVIATION_UNSPECIFIED = -0x8000


def encode_datetime(t: datetime, deviation_minutes: int | None = None, status: int = 0,
                    weekday: bool = True) -> bytes:
    """The 12-byte COSEM date-time of aware t, in local time t's offset (or the given deviation).

    weekday=False leaves the day of the week unspecified (0xFF), as range
    descriptors usually do.
    """
    if t.tzinfo is None:
        raise ValueError("a COSEM date-time needs an aware datetime")
    if deviation_minutes is None:
        offset = t.utcoffset() or timedelta(0)
        deviation_minutes = -int(offset.total_seconds() // 60)
    local = t.astimezone(timezone(timedelta(minutes=-deviation_minutes)))
    return (
        local.year.to_bytes(2, "big")
        + bytes((local.month, local.day, local.isoweekday() if weekday else 0xFF, local.hour, local.minute, local.second,
                 local.microsecond // 10000))
        + deviation_minutes.to_bytes(2, "big", signed=True)
        + bytes((status,))
    )


def decode_datetime(raw: bytes, default_tz: tzinfo | None = None) -> datetime | None:
    """An aware UTC datetime from 12 COSEM bytes; None for an all-unspecified value.

    Without a deviation (0x8000) the meter's local time is taken in default_tz;
    a field left unspecified (0xFF) where a value is needed is a CosemError.
    """
    if len(raw) != 12:
        raise CosemError("decode", f"date-time is {len(raw)} bytes, not 12")
    year = int.from_bytes(raw[0:2], "big")
    month, day, _wd, hour, minute, second, hundredths = raw[2:9]
    deviation = int.from_bytes(raw[9:11], "big", signed=True)
    if year == 0xFFFF and month == 0xFF and day == 0xFF:
        return None
    if 0xFF in (month, day, hour, minute) or year == 0xFFFF:
        raise CosemError("decode", f"date-time with unspecified fields: {raw.hex(' ')}")
    second = 0 if second == 0xFF else second
    hundredths = 0 if hundredths == 0xFF else hundredths
    if deviation == DEVIATION_UNSPECIFIED:
        tz: tzinfo = default_tz or UTC
    else:
        tz = timezone(timedelta(minutes=-deviation))
    try:
        local = datetime(year, month, day, hour, minute, second, hundredths * 10000, tzinfo=tz)
    except ValueError as exc:
        raise CosemError("decode", f"date-time is not a valid instant ({exc}): {raw.hex(' ')}") from None
    return local.astimezone(UTC)


# --- association (ACSE) ----------------------------------------------------------------

LN_NO_CIPHERING = bytes.fromhex("60857405080101")
MECHANISM_LLS = bytes.fromhex("60857405080201")
# the conformance block a reader proposes: get, set, action, selective access, block transfer with get
CONFORMANCE_READER = 0x001E1D
DEFAULT_MAX_PDU = 0xFFFF


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + encode_length(len(value)) + value


def encode_initiate_request(conformance: int = CONFORMANCE_READER, max_pdu: int = DEFAULT_MAX_PDU) -> bytes:
    """xDLMS InitiateRequest: no dedicated key, response allowed default, no QoS, version 6."""
    return b"\x01\x00\x00\x00\x06\x5f\x1f\x04\x00" + conformance.to_bytes(3, "big") + max_pdu.to_bytes(2, "big")


def encode_aarq(password: bytes | None, conformance: int = CONFORMANCE_READER, max_pdu: int = DEFAULT_MAX_PDU) -> bytes:
    """AARQ for logical-name referencing without ciphering; LLS when a password is given."""
    body = _tlv(0xA1, _tlv(0x06, LN_NO_CIPHERING))
    if password is not None:
        body += b"\x8a\x02\x07\x80" + _tlv(0x8B, MECHANISM_LLS) + _tlv(0xAC, _tlv(0x80, password))
    body += _tlv(0xBE, _tlv(0x04, encode_initiate_request(conformance, max_pdu)))
    return _tlv(0x60, body)


def _tlvs(buf: bytes) -> dict[int, bytes]:
    """Top-level BER TLVs of buf by tag (one level; tags of one byte)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(buf):
        tag = buf[pos]
        n, pos = decode_length(buf, pos + 1)
        if pos + n > len(buf):
            raise CosemError("decode", f"BER element {tag:#04x} runs past its container")
        out[tag] = buf[pos : pos + n]
        pos += n
    return out


def _container(apdu: bytes, tag: int, what: str) -> bytes:
    if not apdu or apdu[0] != tag:
        raise CosemError("garbage", f"not an {what} (tag {apdu[:1].hex() or 'none'}, expected {tag:02x})")
    n, pos = decode_length(apdu, 1)
    if pos + n != len(apdu):
        raise CosemError("decode", f"{what} length {n} does not match its {len(apdu) - pos} bytes")
    return apdu[pos:]


@dataclass(frozen=True, slots=True)
class Aarq:
    context: bytes
    mechanism: bytes | None
    password: bytes | None
    conformance: int
    max_pdu: int


def decode_aarq(apdu: bytes) -> Aarq:
    """What a meter reads of an AARQ (the simulator's side)."""
    parts = _tlvs(_container(apdu, 0x60, "AARQ"))
    context = _tlvs(parts.get(0xA1, b"")).get(0x06, b"")
    password = None
    if 0xAC in parts:
        password = _tlvs(parts[0xAC]).get(0x80)
    conformance, max_pdu = 0, 0
    user = parts.get(0xBE)
    if user:
        init = _tlvs(user).get(0x04, b"")
        # 01 dedicated-key? response-allowed? qos? version 5F1F 04 00 conf(3) pdu(2)
        i = init.find(b"\x5f\x1f\x04")
        if init[:1] != b"\x01" or i < 0 or len(init) < i + 9:
            raise CosemError("decode", f"user-information is not an InitiateRequest: {init.hex()}")
        conformance = int.from_bytes(init[i + 4 : i + 7], "big")
        max_pdu = int.from_bytes(init[i + 7 : i + 9], "big")
    return Aarq(context, parts.get(0x8B), password, conformance, max_pdu)


@dataclass(frozen=True, slots=True)
class Aare:
    result: int  # 0 accepted, 1 rejected (permanent), 2 rejected (transient)
    diagnostic: int  # acse-service-user diagnostic
    conformance: int
    max_pdu: int

    @property
    def accepted(self) -> bool:
        return self.result == 0

    @property
    def reason(self) -> str:
        return ACSE_DIAGNOSTICS.get(self.diagnostic, f"diagnostic {self.diagnostic}")


def encode_aare(result: int, diagnostic: int, conformance: int = 0x00501F, max_pdu: int = 500,
                mechanism: bytes | None = None) -> bytes:
    """AARE (the simulator's side): result, acse-service-user diagnostic, InitiateResponse."""
    body = _tlv(0xA1, _tlv(0x06, LN_NO_CIPHERING))
    body += _tlv(0xA2, _tlv(0x02, bytes((result,))))
    body += _tlv(0xA3, _tlv(0xA1, _tlv(0x02, bytes((diagnostic,)))))
    if mechanism is not None:
        body += b"\x88\x02\x07\x80" + _tlv(0x89, mechanism)
    initiate = b"\x08\x00\x06\x5f\x1f\x04\x00" + conformance.to_bytes(3, "big") + max_pdu.to_bytes(2, "big") + b"\x00\x07"
    body += _tlv(0xBE, _tlv(0x04, initiate))
    return _tlv(0x61, body)


def decode_aare(apdu: bytes) -> Aare:
    parts = _tlvs(_container(apdu, 0x61, "AARE"))
    result_raw = _tlvs(parts.get(0xA2, b"")).get(0x02)
    if result_raw is None:
        raise CosemError("decode", "AARE without an association result")
    diag = 0
    source = _tlvs(parts.get(0xA3, b""))
    for inner in source.values():
        got = _tlvs(inner).get(0x02)
        if got:
            diag = got[0]
    conformance, max_pdu = 0, 0
    init = _tlvs(parts.get(0xBE, b"")).get(0x04, b"") if 0xBE in parts else b""
    if init[:1] == b"\x08":
        i = init.find(b"\x5f\x1f\x04")
        if i >= 0 and len(init) >= i + 9:
            conformance = int.from_bytes(init[i + 4 : i + 7], "big")
            max_pdu = int.from_bytes(init[i + 7 : i + 9], "big")
    return Aare(int.from_bytes(result_raw, "big"), diag, conformance, max_pdu)


RLRQ = bytes.fromhex("6203800100")  # release request, reason normal
RLRE = bytes.fromhex("6303800100")

# --- xDLMS services -------------------------------------------------------------------

GET_REQUEST, SET_REQUEST, ACTION_REQUEST = 0xC0, 0xC1, 0xC3
GET_RESPONSE, SET_RESPONSE, ACTION_RESPONSE = 0xC4, 0xC5, 0xC7
EXCEPTION_RESPONSE, CONFIRMED_SERVICE_ERROR = 0xD8, 0x0E
NORMAL, NEXT, WITH_BLOCK = 1, 2, 2
INVOKE_ID = 0xC1  # invoke id 1, confirmed, high priority


def attribute_descriptor(class_id: int, obis: bytes, attribute: int) -> bytes:
    return class_id.to_bytes(2, "big") + obis + attribute.to_bytes(1, "big", signed=True)


def encode_get_request(class_id: int, obis: bytes, attribute: int, access: bytes | None = None,
                       invoke: int = INVOKE_ID) -> bytes:
    """GET-Request-Normal; access is (selector byte + parameters) for selective access."""
    sel = b"\x00" if access is None else b"\x01" + access
    return bytes((GET_REQUEST, NORMAL, invoke)) + attribute_descriptor(class_id, obis, attribute) + sel


def encode_get_next(block: int, invoke: int = INVOKE_ID) -> bytes:
    return bytes((GET_REQUEST, NEXT, invoke)) + block.to_bytes(4, "big")


def encode_set_request(class_id: int, obis: bytes, attribute: int, value: bytes, invoke: int = INVOKE_ID) -> bytes:
    return bytes((SET_REQUEST, NORMAL, invoke)) + attribute_descriptor(class_id, obis, attribute) + b"\x00" + value


def encode_action_request(class_id: int, obis: bytes, method: int, value: bytes | None,
                          invoke: int = INVOKE_ID) -> bytes:
    params = b"\x00" if value is None else b"\x01" + value
    return bytes((ACTION_REQUEST, NORMAL, invoke)) + class_id.to_bytes(2, "big") + obis + bytes((method,)) + params


def range_descriptor(start: datetime, end: datetime, deviation_minutes: int | None = None) -> bytes:
    """Selective access by range (selector 1) on the clock column, all columns."""
    restricting = enc_struct(enc_u16(8), enc_octets(obis_bytes("0.0.1.0.0.255")), enc_i8(2), enc_u16(0))
    return b"\x01" + enc_struct(
        restricting,
        enc_octets(encode_datetime(start, deviation_minutes, weekday=False)),
        enc_octets(encode_datetime(end, deviation_minutes, weekday=False)),
        enc_array([]),
    )


@dataclass(frozen=True, slots=True)
class GetRequest:
    kind: int  # NORMAL or NEXT
    invoke: int
    class_id: int = 0
    obis: bytes = b""
    attribute: int = 0
    access_selector: int | None = None
    access: Any = None  # the decoded access parameters
    block: int = 0


def decode_get_request(apdu: bytes) -> GetRequest:
    """The simulator's side of GET (normal and next)."""
    if len(apdu) < 3 or apdu[0] != GET_REQUEST:
        raise CosemError("garbage", f"not a GET-Request: {apdu[:4].hex()}")
    kind, invoke = apdu[1], apdu[2]
    if kind == NEXT:
        if len(apdu) != 7:
            raise CosemError("decode", "GET-Request-Next is not 7 bytes")
        return GetRequest(NEXT, invoke, block=int.from_bytes(apdu[3:7], "big"))
    if kind != NORMAL or len(apdu) < 13:
        raise CosemError("decode", f"GET-Request type {kind} is not supported")
    class_id = int.from_bytes(apdu[3:5], "big")
    obis, attribute = apdu[5:11], int.from_bytes(apdu[11:12], "big", signed=True)
    selector = access = None
    if apdu[12] == 1:
        selector = apdu[13]
        access = decode_value(apdu[14:])
    return GetRequest(NORMAL, invoke, class_id, obis, attribute, selector, access)


@dataclass(frozen=True, slots=True)
class GetResponse:
    """A GET answer: data (A-XDR bytes of the value, or of this block) or an access error."""

    invoke: int
    data: bytes | None
    error: int | None
    block: int | None = None  # block number when with-datablock
    last: bool = True

    @property
    def error_text(self) -> str:
        return ACCESS_RESULTS.get(self.error or 0, f"data-access-result {self.error}")


def decode_get_response(apdu: bytes) -> GetResponse:
    if len(apdu) >= 3 and apdu[0] == EXCEPTION_RESPONSE:
        raise CosemError("exception", f"the meter answered with an exception-response {apdu[1:3].hex()}")
    if len(apdu) >= 1 and apdu[0] == CONFIRMED_SERVICE_ERROR:
        raise CosemError("exception", f"the meter answered with a confirmed-service-error {apdu[1:].hex()}")
    if len(apdu) < 4 or apdu[0] != GET_RESPONSE:
        raise CosemError("garbage", f"not a GET-Response: {apdu[:4].hex()}")
    kind, invoke = apdu[1], apdu[2]
    if kind == NORMAL:
        if apdu[3] == 0:
            return GetResponse(invoke, apdu[4:], None)
        if apdu[3] == 1 and len(apdu) >= 5:
            return GetResponse(invoke, None, apdu[4])
        raise CosemError("decode", "GET-Response-Normal with neither data nor an error")
    if kind == WITH_BLOCK:
        if len(apdu) < 9:
            raise CosemError("decode", "GET-Response-With-Datablock cut short")
        last = bool(apdu[3])
        block = int.from_bytes(apdu[4:8], "big")
        if apdu[8] == 0:
            n, pos = decode_length(apdu, 9)
            if pos + n != len(apdu):
                raise CosemError("decode", f"data block says {n} bytes, has {len(apdu) - pos}")
            return GetResponse(invoke, apdu[pos:], None, block, last)
        return GetResponse(invoke, None, apdu[9] if len(apdu) > 9 else 250, block, last)
    raise CosemError("decode", f"GET-Response type {kind} is not supported")


def encode_get_response(data: bytes | None, error: int | None = None, invoke: int = INVOKE_ID) -> bytes:
    if error is not None:
        return bytes((GET_RESPONSE, NORMAL, invoke, 1, error))
    assert data is not None
    return bytes((GET_RESPONSE, NORMAL, invoke, 0)) + data


def encode_get_block(block: int, last: bool, raw: bytes, invoke: int = INVOKE_ID) -> bytes:
    return (bytes((GET_RESPONSE, WITH_BLOCK, invoke, 1 if last else 0)) + block.to_bytes(4, "big")
            + b"\x00" + encode_length(len(raw)) + raw)


def decode_result_response(apdu: bytes, tag: int, what: str) -> int:
    """The result byte of a SET- or ACTION-Response-Normal (0 = success)."""
    if len(apdu) >= 1 and apdu[0] in (EXCEPTION_RESPONSE, CONFIRMED_SERVICE_ERROR):
        raise CosemError("exception", f"the meter answered the {what} with an error {apdu.hex()}")
    if len(apdu) < 4 or apdu[0] != tag or apdu[1] != NORMAL:
        raise CosemError("garbage", f"not a {what} response: {apdu[:4].hex()}")
    return apdu[3]


# --- the TCP wrapper (IEC 62056-47) ---------------------------------------------------

WRAPPER_VERSION = 1
WRAPPER_HEADER = 8


def wrap(source: int, dest: int, apdu: bytes) -> bytes:
    """version (1), source wPort, destination wPort, length, then the APDU."""
    return (WRAPPER_VERSION.to_bytes(2, "big") + source.to_bytes(2, "big") + dest.to_bytes(2, "big")
            + len(apdu).to_bytes(2, "big") + apdu)


def unwrap_header(header: bytes) -> tuple[int, int, int]:
    """(source, dest, length) of an 8-byte wrapper header."""
    if len(header) != WRAPPER_HEADER:
        raise CosemError("garbage", f"wrapper header is {len(header)} bytes, not 8")
    version = int.from_bytes(header[0:2], "big")
    if version != WRAPPER_VERSION:
        raise CosemError("garbage", f"wrapper version {version}, expected 1: {header.hex(' ')}")
    return (int.from_bytes(header[2:4], "big"), int.from_bytes(header[4:6], "big"),
            int.from_bytes(header[6:8], "big"))
