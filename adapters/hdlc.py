"""HDLC for DLMS/COSEM (IEC 62056-46), as a pure codec: bytes in, frames out.

Frame format type 3, between two 0x7E flags:

    7E | A0LL | dest | src | control | HCS | information | FCS | 7E

- the format field is 0xA000 + the segmentation bit 0x0800 + an 11-bit length
  that counts every byte between the flags;
- addresses are 1, 2 or 4 bytes, 7 bits in each, the low bit set on the last
  byte: the client's is one byte (SAP 0x10 public, 0x20 reader, 0x30
  configurator in SPODES), the server's is the logical device (1 =
  management) and, for a meter on a multi-drop bus, its physical address;
- HCS (over format..control) and FCS (over everything before it) are
  CRC-16/X.25, sent low byte first; a frame without information has no HCS;
- control: I-frames carry N(S), N(R) and the poll/final bit; RR acknowledges
  a segment; SNRM/UA open the link (UA may carry the negotiated maximum
  information lengths and window sizes), DISC/UA or DM close it;
- an information field carries the LLC header (E6 E6 00 to the meter,
  E6 E7 00 from it) before the first segment of each APDU.

Only the codec lives here (the session's state machine is
`adapters.dlms`, which moves the bytes), so the simulator
(`simulators.dlms_sim`) and the client share one definition and the tests
feed it bytes published by others.
"""

from __future__ import annotations

from dataclasses import dataclass

FLAG = 0x7E
LLC_REQUEST = b"\xe6\xe6\x00"
LLC_RESPONSE = b"\xe6\xe7\x00"

# unnumbered and supervisory control bytes, with the poll/final bit set
SNRM, UA, DISC, DM, FRMR, UI = 0x93, 0x73, 0x53, 0x1F, 0x97, 0x13
RR_BASE, RNR_BASE = 0x11, 0x15  # | N(R) << 5

CLIENT_PUBLIC, CLIENT_READER, CLIENT_CONFIGURATOR = 0x10, 0x20, 0x30
DEFAULT_MAX_INFO = 128  # the standard's default maximum information field length

_MAX_LENGTH = 0x7FF


class HdlcError(ValueError):
    """A frame that cannot be taken: `outcome` is a poll outcome word ("crc" or "garbage")."""

    def __init__(self, outcome: str, reason: str):
        self.outcome = outcome
        super().__init__(reason)


def crc16_x25(data: bytes) -> int:
    """CRC-16/X.25 (reflected 0x1021, init 0xFFFF, final XOR 0xFFFF): HDLC's HCS and FCS."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def _fcs(data: bytes) -> bytes:
    return crc16_x25(data).to_bytes(2, "little")


# --- addresses -------------------------------------------------------------------


def encode_client_address(sap: int) -> bytes:
    """A client SAP (0..127) as its one-byte HDLC address."""
    if not 0 <= sap <= 0x7F:
        raise ValueError(f"client address must be 0..127, got {sap}")
    return bytes(((sap << 1) | 1,))


def _seven_bit(value: int, nbytes: int) -> list[int]:
    """value in 7-bit groups, most significant first, each shifted left by one."""
    return [((value >> (7 * (nbytes - 1 - i))) & 0x7F) << 1 for i in range(nbytes)]


def encode_server_address(logical: int, physical: int | None = None, size: int | None = None) -> bytes:
    """The server address: logical device and, on a multi-drop line, physical address.

    size is 1 (logical only), 2 (one byte each, 0..127) or 4 (two bytes each,
    0..16383); None picks the smallest that fits.
    """
    if size is None:
        size = 1 if physical is None else 2 if logical < 0x80 and physical < 0x80 else 4
    if size == 1:
        if physical is not None:
            raise ValueError("a one-byte server address has no physical part")
        if not 0 <= logical <= 0x7F:
            raise ValueError(f"logical address must be 0..127 in one byte, got {logical}")
        groups = _seven_bit(logical, 1)
    elif size in (2, 4):
        half = size // 2
        top = 1 << (7 * half)
        phys = 0 if physical is None else physical
        if not (0 <= logical < top and 0 <= phys < top):
            raise ValueError(f"server address {logical}/{phys} does not fit in {size} bytes")
        groups = _seven_bit(logical, half) + _seven_bit(phys, half)
    else:
        raise ValueError(f"server address size must be 1, 2 or 4 bytes, got {size}")
    groups[-1] |= 1
    return bytes(groups)


def split_address(raw: bytes) -> tuple[int, int | None]:
    """(upper, lower) of an encoded address; lower is None for a one-byte address."""
    groups = [b >> 1 for b in raw]
    if len(groups) == 1:
        return groups[0], None
    half = len(groups) // 2
    upper = lower = 0
    for g in groups[:half]:
        upper = (upper << 7) | g
    for g in groups[half:]:
        lower = (lower << 7) | g
    return upper, lower


def _take_address(buf: bytes, pos: int) -> int:
    """The end of the address starting at pos (the byte with the low bit set, inclusive)."""
    for i in range(pos, min(pos + 4, len(buf))):
        if buf[i] & 1:
            if i - pos + 1 not in (1, 2, 4):
                raise HdlcError("garbage", f"address of {i - pos + 1} bytes (1, 2 or 4 allowed)")
            return i + 1
    raise HdlcError("garbage", "address not terminated within 4 bytes")


# --- frames -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One HDLC frame; addresses are kept encoded (compare with the encode_* helpers)."""

    dest: bytes
    src: bytes
    control: int
    info: bytes = b""
    segmented: bool = False

    @property
    def is_information(self) -> bool:
        return self.control & 1 == 0

    @property
    def send_seq(self) -> int:
        return (self.control >> 1) & 7

    @property
    def recv_seq(self) -> int:
        return (self.control >> 5) & 7

    @property
    def is_rr(self) -> bool:
        return self.control & 0x0F == 0x01

    @property
    def kind(self) -> int:
        """The control byte without sequence numbers (I-frames: 0; RR: 0x11) for unnumbered frames."""
        if self.is_information:
            return 0
        if self.control & 3 == 1:
            return self.control & 0x1F
        return self.control


def encode_frame(dest: bytes, src: bytes, control: int, info: bytes = b"", segmented: bool = False) -> bytes:
    """A complete frame with flags, HCS (when there is information) and FCS."""
    length = 2 + len(dest) + len(src) + 1 + 2 + (len(info) + 2 if info else 0)
    if length > _MAX_LENGTH:
        raise ValueError(f"frame of {length} bytes exceeds the 11-bit length field")
    head = (0xA000 | (0x0800 if segmented else 0) | length).to_bytes(2, "big") + dest + src + bytes((control,))
    body = head + (_fcs(head) + info if info else b"")
    return bytes((FLAG,)) + body + _fcs(body) + bytes((FLAG,))


def decode_frame(raw: bytes) -> Frame:
    """A frame from its bytes with both flags; HdlcError says what is wrong."""
    if len(raw) < 9 or raw[0] != FLAG or raw[-1] != FLAG:
        raise HdlcError("garbage", f"not an HDLC frame between 7E flags: {raw[:16].hex(' ')}")
    fmt = int.from_bytes(raw[1:3], "big")
    if fmt & 0xF000 != 0xA000:
        raise HdlcError("garbage", f"frame format {fmt >> 12:X} is not type 3 (A)")
    length = fmt & _MAX_LENGTH
    if length != len(raw) - 2:
        raise HdlcError("garbage", f"length field says {length} bytes, frame has {len(raw) - 2}")
    body = raw[1:-1]
    if _fcs(body[:-2]) != body[-2:]:
        raise HdlcError("crc", f"FCS mismatch: computed {_fcs(body[:-2]).hex()}, received {body[-2:].hex()}")
    d_end = _take_address(body, 2)
    s_end = _take_address(body, d_end)
    if s_end >= len(body) - 2:
        raise HdlcError("garbage", "frame ends inside its addresses")
    control = body[s_end]
    rest = body[s_end + 1 : -2]
    info = b""
    if rest:
        if len(rest) < 2 or _fcs(body[: s_end + 1]) != rest[:2]:
            raise HdlcError("crc", "HCS mismatch")
        info = rest[2:]
    return Frame(body[2:d_end], body[d_end:s_end], control, info, bool(fmt & 0x0800))


class FrameReader:
    """Cuts a byte stream into frames: feed bytes, take complete frames.

    Bytes before a flag that do not start a frame are dropped and counted
    (`junk`), so line noise is reported instead of stalling the reader.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.junk = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            start = self._buf.find(FLAG)
            if start < 0:
                self.junk += len(self._buf)
                self._buf.clear()
                return out
            if start:
                self.junk += start
                del self._buf[:start]
            # skip repeated flags (a closing flag may double as the next opening one)
            while len(self._buf) >= 2 and self._buf[1] == FLAG:
                del self._buf[0]
            if len(self._buf) < 3:
                return out
            fmt = int.from_bytes(self._buf[1:3], "big")
            if fmt & 0xF000 != 0xA000:
                self.junk += 1
                del self._buf[0]
                continue
            total = (fmt & _MAX_LENGTH) + 2
            if len(self._buf) < total:
                return out
            out.append(bytes(self._buf[:total]))
            del self._buf[:total]

    @property
    def pending(self) -> int:
        return len(self._buf)


# --- link parameters (SNRM/UA information field) -----------------------------------


@dataclass(frozen=True, slots=True)
class LinkParameters:
    max_info_tx: int = DEFAULT_MAX_INFO
    max_info_rx: int = DEFAULT_MAX_INFO
    window_tx: int = 1
    window_rx: int = 1


def encode_parameters(p: LinkParameters) -> bytes:
    """81 80 LL then (id, length, value) for ids 5..8 (information lengths, windows)."""

    def item(ident: int, value: int, width: int) -> bytes:
        if width == 0:
            width = 1 if value < 0x100 else 2
        return bytes((ident, width)) + value.to_bytes(width, "big")

    body = item(5, p.max_info_tx, 0) + item(6, p.max_info_rx, 0) + item(7, p.window_tx, 4) + item(8, p.window_rx, 4)
    return b"\x81\x80" + bytes((len(body),)) + body


def decode_parameters(info: bytes, default: LinkParameters | None = None) -> LinkParameters:
    """The parameters of a UA (or SNRM) information field; missing ones keep their default."""
    got = default or LinkParameters()
    if not info:
        return got
    if len(info) < 3 or info[0] != 0x81 or info[1] != 0x80:
        raise HdlcError("garbage", f"HDLC parameter field does not start 81 80: {info[:8].hex(' ')}")
    end = 3 + info[2]
    pos = 3
    values = {5: got.max_info_tx, 6: got.max_info_rx, 7: got.window_tx, 8: got.window_rx}
    while pos + 2 <= min(end, len(info)):
        ident, n = info[pos], info[pos + 1]
        if pos + 2 + n > len(info):
            raise HdlcError("garbage", "HDLC parameter runs past the field")
        if ident in values:
            values[ident] = int.from_bytes(info[pos + 2 : pos + 2 + n], "big")
        pos += 2 + n
    return LinkParameters(values[5], values[6], values[7], values[8])


def i_control(send_seq: int, recv_seq: int, final: bool = True) -> int:
    return ((recv_seq & 7) << 5) | (0x10 if final else 0) | ((send_seq & 7) << 1)


def rr_control(recv_seq: int) -> int:
    return ((recv_seq & 7) << 5) | RR_BASE


def segments(payload: bytes, max_info: int) -> list[bytes]:
    """payload cut into information fields of at most max_info bytes (at least one)."""
    if max_info < 1:
        raise ValueError("max_info must be positive")
    return [payload[i : i + max_info] for i in range(0, len(payload), max_info)] or [b""]


def frame_overhead(dest_len: int, src_len: int) -> int:
    """Bytes a frame with information adds to it: flags, format, addresses, control, HCS, FCS."""
    return 2 + 2 + dest_len + src_len + 1 + 2 + 2
