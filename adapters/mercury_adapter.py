"""Reading Incotex Mercury meters: transports and the adapter over `adapters.mercury`.

`adapter = "mercury230"` speaks the v2 protocol (three-phase 230/231/233/234/
236/238 and 203.2TD/204/208): open the channel with the access level and the
password, read energy since reset per tariff, read the clock, close.
`adapter = "mercury200"` speaks v1 (200/201/203/206): no session, energy T1..T4
in BCD and the clock. One `MercuryAdapter` reads both, so meters of the two
families may share a line and its one open port.

The bytes go over a serial port (pyserial) or a transparent RS-485-to-Ethernet
converter (`host` + `tcp_port`: the same bytes, no header). pyserial and sockets
are blocking here: every exchange runs in a worker thread (`asyncio.to_thread`)
and one lock per link keeps two exchanges off one line.

Timing on the line (`adapters/schemas/mercury.toml`, `[line]`):
- a frame ends with `frame_gap_chars` character times of silence; we leave that
  much quiet after every answer before the next request, so every meter on the
  line sees where one frame ends;
- the answer's length is known from the request (`mercury.reply_size`), so a
  good answer is taken the moment its last byte arrives; a 4-byte frame with a
  good CRC is a status answer (an error, or the OK of a session command);
  anything else ends at the first silence of 50 ms (not the frame gap: USB
  adapters deliver bytes in bursts) and is refused by its CRC or length;
- the meter's `timeout` bounds the wait for the first byte; an answer that
  keeps trickling in is cut at twice its line time past the first byte.

Every failure is a `PollError` whose message names the meter, the bus, the
address and the reason; a refused channel says "password" and names the keys
to check (`password`, `password_encoding`), since a wrong encoding is the most
common reason a Mercury will not talk. A register the meter does not measure
(FFFFFFFF) fails the poll ("decode") instead of becoming a huge reading.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN
from typing import TypeVar
from zoneinfo import ZoneInfo

import serial

from adapters import mercury as mc
from adapters import quality
from adapters.base import AdapterSettings, MercuryMeter, PollError, ProfileSlot
from adapters.reading import Reading

ADAPTERS = ("mercury230", "mercury200")
MAX_FRAME = 512
RX_GAP_S = 0.05  # silence inside an answer that ends it (see _Link)
BITS_PER_CHAR = 10  # 8N1
_T = TypeVar("_T")
PROFILE_REGISTERS = {"1.8.0": 0, "2.8.0": 1, "3.8.0": 2, "4.8.0": 3}  # channel of the average-power array


def char_time(baudrate: int) -> float:
    return BITS_PER_CHAR / baudrate


def frame_gap(baudrate: int) -> float:
    """The silence that ends a frame at baudrate (seconds)."""
    return float(mc.LINE["frame_gap_chars"]) * char_time(baudrate)


# --- links ---------------------------------------------------------------------------


class _Link:
    """One serial port or one TCP connection to a converter, and the quiet between frames."""

    def __init__(self, name: str, baudrate: int):
        self.name = name
        self.lock = threading.Lock()
        self.baudrate = baudrate
        self.gap = frame_gap(baudrate)
        # inside an answer we wait longer than the frame gap before calling it ended: USB
        # adapters and busy hosts deliver bytes in bursts (an FTDI's latency timer is 16 ms), and
        # a good answer ends by its known length anyway, so the longer wait only costs on faults
        self.rx_gap = max(self.gap, RX_GAP_S)
        self.quiet_at = 0.0
        self.exchanges = 0
        self.bytes = 0

    # transport primitives
    def fileno(self) -> int:
        raise NotImplementedError

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _recv(self) -> bytes:
        raise NotImplementedError

    def _drain(self) -> None:
        while select.select([self.fileno()], [], [], 0)[0]:
            if not self._recv():
                break

    def close(self) -> None:
        raise NotImplementedError

    def exchange(self, request: bytes, expect: int, timeout: float) -> bytes:
        """Send request, return what came back (maybe nothing); the caller checks it."""
        left = self.quiet_at - time.monotonic()
        if left > 0:
            time.sleep(left)
        self._drain()  # a late answer to an earlier request must not be taken for this one's
        self._send(request)
        sent_at = time.monotonic()
        ct = char_time(self.baudrate)
        # the first byte: the request's own line time (a converter or a slow UART still
        # sending it), then the meter's timeout
        first_by = sent_at + len(request) * ct + timeout
        buf = bytearray()
        overall = first_by
        while True:
            now = time.monotonic()
            wait = (first_by - now) if not buf else min(self.rx_gap, overall - now)
            if wait <= 0:
                break
            if not select.select([self.fileno()], [], [], wait)[0]:
                break  # silence: the meter said nothing, or its frame has ended
            chunk = self._recv()
            if not chunk:
                break
            if not buf:
                overall = time.monotonic() + 2 * expect * ct + self.rx_gap + 0.1
            buf += chunk
            if len(buf) >= expect or len(buf) >= MAX_FRAME:
                break
            if len(buf) == 4 and mc.crc16(bytes(buf[:2])) == bytes(buf[2:4]):
                break  # a status answer
        self.quiet_at = time.monotonic() + self.gap
        self.exchanges += 1
        self.bytes += len(request) + len(buf)
        return bytes(buf)


class _SerialLink(_Link):
    def __init__(self, port: str, baudrate: int):
        super().__init__(port, baudrate)
        self.ser = serial.Serial(port, baudrate, bytesize=8, parity="N", stopbits=1, timeout=0, write_timeout=5.0)

    def fileno(self) -> int:
        return int(self.ser.fileno())

    def _send(self, data: bytes) -> None:
        self.ser.write(data)
        self.ser.flush()

    def _recv(self) -> bytes:
        return os.read(self.fileno(), 4096)

    def close(self) -> None:
        try:
            self.ser.close()
        except (OSError, serial.SerialException):
            pass


class _TcpLink(_Link):
    def __init__(self, host: str, port: int, baudrate: int, timeout: float):
        super().__init__(f"{host}:{port}", baudrate)
        self.rx_gap = max(self.rx_gap, 0.1)  # a converter forwards in packets: allow for the network
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        data = self.sock.recv(4096)
        if not data:
            raise ConnectionResetError("the converter closed the connection")
        return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- what one poll gave ----------------------------------------------------------------


@dataclass
class MercuryPoll:
    """One poll's values (Wh, None where not measured), the meter's clock and what crossed the line."""

    energy: dict[str, int | None]  # OBIS register -> Wh (v1: 10 Wh steps)
    polled_at: datetime
    meter_time: datetime | None
    transformer: tuple[int, int] | None = None
    exchanges: list[tuple[int, int]] = field(default_factory=list)  # (request bytes, answer bytes)


def check_meter(meter: MercuryMeter) -> list[str]:
    """Problems with a Mercury meter's inventory keys, for refusal at start-up (each names its key)."""
    problems: list[str] = []
    v2 = meter.adapter == "mercury230"
    if meter.host or meter.tcp_port is not None:
        if not meter.host or meter.tcp_port is None:
            problems.append("keys 'host' and 'tcp_port': a meter behind a TCP converter needs both")
    elif not isinstance(meter.port, str) or not meter.port.startswith("/"):
        problems.append(
            f"key 'port': a serial device path like /dev/ttyUSB0, or 'host' and 'tcp_port' of a converter "
            f"(got {meter.port!r})"
        )
    try:
        address_of(meter)
    except ValueError as exc:
        problems.append(f"key 'address': {exc}")
    if v2:
        try:
            mc.encode_password(meter.password or mc.DEFAULT_PASSWORD, meter.password_encoding or "digits")
        except ValueError as exc:  # the message never holds the password itself
            problems.append(f"keys 'password'/'password_encoding': {exc}")
        known = mc.ENERGY_REGISTERS
    else:
        known = {r: (0, t) for r, t in mc.V1_REGISTERS.items()}
    for reg in meter.registers:
        if reg not in known:
            problems.append(f"key 'registers': {reg!r} is not an energy register of {meter.adapter} ({', '.join(known)})")
    return problems


def address_of(meter: MercuryMeter) -> int:
    text = (meter.address or "").strip()
    if not text.isdigit():
        raise ValueError(
            "a Mercury needs its address: 1..240 for mercury230, the serial-derived number for mercury200 "
            f"(got {meter.address!r})"
        )
    a = int(text)
    if meter.adapter == "mercury230" and not 1 <= a <= mc.V2["max_address"]:
        raise ValueError(f"mercury230 addresses are 1..{mc.V2['max_address']} (0 is broadcast; got {a})")
    if meter.adapter == "mercury200" and not 0 < a <= 99_999_999:
        raise ValueError(f"mercury200 addresses are the serial's last 6 or 8 digits (got {a})")
    return a


class MercuryAdapter:
    """Reads mercury230 (v2) and mercury200 (v1) meters; one link per serial port or converter."""

    def __init__(
        self, settings: AdapterSettings, now: Callable[[], datetime] | None = None,
        clock_tolerance_s: float | None = None,
    ) -> None:
        self._tz = ZoneInfo(settings.timezone)
        self._tolerance = timedelta(
            seconds=settings.clock_skew_tolerance_s if clock_tolerance_s is None else clock_tolerance_s
        )
        self._now = now or (lambda: datetime.now(UTC))
        self._links: dict[str, _Link] = {}
        self._guard = threading.Lock()
        self._constants: dict[str, int] = {}  # meter id -> impulses per kWh (variant word)
        self._offsets: dict[str, float] = {}  # meter id -> its clock minus ours at the last read, s

    # --- adapters.base.PollingAdapter ---------------------------------------------------

    async def read(self, meter: MercuryMeter) -> list[Reading]:
        return await asyncio.to_thread(self.read_blocking, meter)

    async def close(self) -> None:
        self.close_blocking()

    def close_blocking(self) -> None:
        with self._guard:
            for link in self._links.values():
                link.close()
            self._links.clear()

    def read_blocking(self, meter: MercuryMeter) -> list[Reading]:
        return self.readings(meter, self.poll(meter))

    def readings(self, meter: MercuryMeter, p: MercuryPoll) -> list[Reading]:
        """The configured registers as Readings (kWh), with the clock's quality flags."""
        where = self._where(meter)
        flags: frozenset[str] = frozenset()
        ts = p.polled_at
        if p.meter_time is not None:
            self._offsets[meter.id] = (p.meter_time - p.polled_at).total_seconds()
            if abs(p.meter_time - p.polled_at) > self._tolerance:
                flags = frozenset({quality.CLOCK_SKEW})
            else:
                ts, flags = p.meter_time, frozenset({quality.METER_CLOCK})
        out = []
        for reg in meter.registers:
            wh = p.energy.get(reg)
            if wh is None:
                raise PollError(
                    "decode",
                    f"{where}: register {reg} is not measured by this meter (it answers FFFFFFFF); "
                    f"remove it from key 'registers'",
                    source=self._source(meter),
                )
            out.append(Reading(meter.id, reg, ts, mc.kwh(wh), flags, self._source(meter)))
        return out

    # --- one poll -------------------------------------------------------------------------

    def poll(self, meter: MercuryMeter, extras: bool = False) -> MercuryPoll:
        """One exchange of the meter's energy registers and clock; PollError names what failed.

        extras also reads the transformer ratios (v2), for `amr poll`.
        """
        where = self._where(meter)
        problems = check_meter(meter)
        if problems:  # normally refused at start-up; a daemon must still not crash on them
            raise PollError("refused", f"{where}: " + "; ".join(problems))
        if meter.adapter == "mercury200":
            return self._with_link(meter, lambda link: self._poll_v1(meter, link))
        return self._with_link(meter, lambda link: self._session(meter, link, lambda: self._poll_v2(meter, link, extras)))

    def _poll_v2(self, meter: MercuryMeter, link: _Link, extras: bool) -> MercuryPoll:
        addr = address_of(meter)
        tariffs = sorted({mc.ENERGY_REGISTERS[r][1] for r in meter.registers})
        energy: dict[str, int | None] = {}
        polled_at = self._now()
        for t in tariffs:
            e = self._ask(meter, link, mc.energy_request(addr, t), mc.parse_energy, f"energy T{t or 'sum'}")
            for i, (_, c) in enumerate(mc.DIRECTIONS):
                energy[f"{c}.8.{t}"] = e.values[i]
        clock = self._ask(meter, link, mc.clock_request(addr), mc.parse_clock, "clock")
        transformer = None
        if extras:
            try:
                transformer = self._ask(
                    meter, link, mc.read_param_request(addr, "transformer"), mc.parse_transformer, "transformer ratios"
                )
            except PollError as exc:
                if exc.outcome != "exception":  # a meter without ratios says so by a status
                    raise
        return MercuryPoll(energy, polled_at, self._utc(clock.local), transformer)

    def _poll_v1(self, meter: MercuryMeter, link: _Link) -> MercuryPoll:
        addr = address_of(meter)
        polled_at = self._now()
        t = self._ask_v1(meter, link, addr, "energy", mc.parse_v1_energy)
        energy: dict[str, int | None] = {f"1.8.{i + 1}": int(v * 1000) for i, v in enumerate(t)}
        energy["1.8.0"] = int(sum(t) * 1000)
        clock = self._ask_v1(meter, link, addr, "clock", mc.parse_v1_clock)
        return MercuryPoll(energy, polled_at, self._utc(clock.local))

    # --- profile and clock (adapters.base.ProfileMeter, ClockSettable) -------------------------

    async def read_profile(
        self, meter: MercuryMeter, start: datetime, end: datetime, limit: int
    ) -> list[ProfileSlot]:
        """The average-power array's half-hours starting in [start, end), oldest first, at most limit."""
        return await asyncio.to_thread(self.read_profile_blocking, meter, start, end, limit)

    def read_profile_blocking(self, meter: MercuryMeter, start: datetime, end: datetime, limit: int) -> list[ProfileSlot]:
        where = self._where(meter)
        if meter.adapter != "mercury230":
            raise PollError("refused", f"{where}: the {meter.adapter} protocol has no load profile")
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("read_profile needs aware datetimes")
        problems = check_meter(meter)
        if problems:
            raise PollError("refused", f"{where}: " + "; ".join(problems))
        regs = [r for r in meter.registers if r in PROFILE_REGISTERS]
        if not regs or limit <= 0 or start >= end:
            return []
        records = limit  # slots (half-hours); each gives one ProfileSlot per register
        return self._with_link(
            meter, lambda link: self._session(meter, link, lambda: self._profile(meter, link, start, end, records, regs))
        )

    def _profile(
        self, meter: MercuryMeter, link: _Link, start: datetime, end: datetime, most: int, regs: list[str]
    ) -> list[ProfileSlot]:
        addr = address_of(meter)
        constant = self._constants.get(meter.id)
        if constant is None:
            variant = self._ask(meter, link, mc.read_param_request(addr, "variant"), mc.parse_variant, "variant word")
            if not variant.has_profile:
                raise PollError("refused", f"{self._where(meter)}: this meter variant keeps no power profile")
            constant = self._constants[meter.id] = variant.constant
        ptr = self._ask(meter, link, mc.read_param_request(addr, "profile_pointer"), mc.parse_profile_pointer,
                        "profile pointer")
        step = timedelta(minutes=ptr.period_min)
        last_local = ptr.local
        # the first slot at or after start, on the meter's grid, in its local time
        s = self._local(start)
        grid = datetime(s.year, s.month, s.day)
        offset = (s - grid) // step
        slot = grid + offset * step
        if slot < s:
            slot += step
        end_local = self._local(end)
        out: list[ProfileSlot] = []
        if slot > last_local:
            return out
        cap = most * len(regs)
        d = min(int((last_local - slot) / step), mc.RECORDS - 1)  # records back from the last
        reads = 0
        while d >= 0 and slot < end_local and len(out) < cap and reads < 3 * most + 10:
            record = self._ask(
                meter, link, mc.profile_read_request(addr, ptr.last - d), mc.parse_profile_record,
                f"profile record {(ptr.last - d) % mc.RECORDS}",
            )
            reads += 1
            d -= 1
            if record is None or record.local < slot:
                continue  # memory never written, or older (slots were missing since): look later
            while record.local > slot and slot < end_local and len(out) < cap:
                self._missing(out, slot, step, regs)  # no record: the meter was off, or it is lost
                slot += step
            if record.local == slot and slot < end_local and len(out) < cap:
                a, b = self._utc(slot), self._utc(slot + step)
                for reg in regs:
                    n = record.counts[PROFILE_REGISTERS[reg]]
                    wh = None if n is None else int(mc.pulses_wh(n, constant).to_integral_value(ROUND_HALF_EVEN))
                    out.append(ProfileSlot(a, b, reg, wh))
                slot += step
        return out

    def has_profile(self, meter: MercuryMeter) -> bool:
        """Whether the meter keeps an average-power array (v2 only)."""
        return meter.adapter == "mercury230"

    def clock_offset(self, meter: MercuryMeter) -> float | None:
        """The meter's clock minus ours at its last read, in seconds (None: not read yet)."""
        return self._offsets.get(meter.id)

    def clock_step_limit(self, meter: MercuryMeter) -> float | None:
        """The largest correction a day: +-4 minutes for v2; v1 is not corrected (None)."""
        return float(mc.WPARAM["max_correction_s"]) if meter.adapter == "mercury230" else None

    def _missing(self, out: list[ProfileSlot], slot: datetime, step: timedelta, regs: list[str]) -> None:
        a, b = self._utc(slot), self._utc(slot + step)
        out.extend(ProfileSlot(a, b, reg, None) for reg in regs)

    async def correct_clock(self, meter: MercuryMeter, delta_s: float) -> None:
        """Move the meter's clock by delta_s (v2: within +-240 s, once a day; command 03 0D)."""
        await asyncio.to_thread(self.correct_clock_blocking, meter, delta_s)

    def correct_clock_blocking(self, meter: MercuryMeter, delta_s: float) -> None:
        where = self._where(meter)
        if meter.adapter != "mercury230":
            raise PollError("refused", f"{where}: clock correction is implemented for mercury230 only")
        limit = float(mc.WPARAM["max_correction_s"])
        if abs(delta_s) > limit:
            raise PollError("refused", f"{where}: a correction of {delta_s:+.0f} s is beyond the meter's +-{limit:.0f} s a day")
        problems = check_meter(meter)
        if problems:
            raise PollError("refused", f"{where}: " + "; ".join(problems))

        def run(link: _Link) -> None:
            addr = address_of(meter)
            clock = self._ask(meter, link, mc.clock_request(addr), mc.parse_clock, "clock")
            target = clock.local + timedelta(seconds=round(delta_s))
            if target.date() != clock.local.date():
                raise PollError("refused", f"{where}: the correction would cross midnight of the meter's day; try later")
            try:
                self._ask(meter, link, mc.correct_clock_request(addr, target), mc.parse_status, "clock correction")
            except PollError as exc:
                if "status 4" in str(exc):
                    raise PollError("refused", f"{where}: the meter's clock was already corrected today "
                                    "(Mercury allows one correction a day)") from None
                raise

        self._with_link(meter, lambda link: self._session(meter, link, lambda: run(link)))

    # --- finding a single meter ---------------------------------------------------------------

    def find_single(self, meter: MercuryMeter) -> dict[str, object]:
        """The address (and serial) of the only v2 meter on a line, asked at the broadcast address.

        Every meter answers address 0, so with two or more on the line the answers
        collide (a CRC error or garbage) and this says so.
        """
        probe = meter

        def run(link: _Link) -> dict[str, object]:
            got = self._ask(probe, link, mc.read_param_request(mc.BROADCAST, "address"), _parse_address, "address")
            serial_no = None
            try:
                serial_no = self._ask(probe, link, mc.read_param_request(mc.BROADCAST, "serial"), _parse_serial, "serial")
            except PollError:
                pass
            return {"address": got, "serial": serial_no}

        try:
            return self._with_link(probe, lambda link: self._session(probe, link, lambda: run(link)))
        except PollError as exc:
            if exc.outcome in ("crc", "garbage"):
                raise PollError(exc.outcome, f"{exc}; with more than one meter on the line the broadcast "
                                "answers collide: scan finds a single meter only") from None
            raise

    # --- exchanges ------------------------------------------------------------------------

    def _session(self, meter: MercuryMeter, link: _Link, body: Callable[[], _T]) -> _T:
        """Open the channel, run body, close the channel (whatever happened)."""
        self._open(meter, link)
        try:
            return body()
        finally:
            try:
                link.exchange(mc.close_request(int(meter.address or 0)), 4, float(meter.timeout))
            except OSError:
                pass

    def _open(self, meter: MercuryMeter, link: _Link) -> None:
        where = self._where(meter)
        encoding = meter.password_encoding or "digits"
        level = meter.access_level or 1
        request = mc.open_request(int(meter.address or 0), meter.password or mc.DEFAULT_PASSWORD, encoding, level)
        raw = self._exchange(meter, link, request, 4)
        other = "ascii" if encoding == "digits" else "digits"
        if not raw:
            raise PollError(
                "timeout",
                f"{where}: no answer to the channel open within {meter.timeout:g} s: check the address, the "
                f"baudrate ({link.baudrate}) and the password encoding (key 'password_encoding' is {encoding}; "
                f"some meters want {other})",
            )
        try:
            payload = mc.check_frame(raw, bytes((int(meter.address or 0),)))
            mc.parse_status(payload, raw)
        except mc.StatusError as exc:
            raise PollError(
                "refused",
                f"{where}: the meter refused the channel at access level {level}: wrong password or password "
                f"encoding (keys 'password', 'password_encoding' = {encoding}; try {other}) - {exc}",
                raw=raw, source=self._source(meter),
            ) from None
        except mc.FrameError as exc:
            raise PollError(exc.outcome, f"{where}: channel open: {exc}", raw=raw, source=self._source(meter)) from None

    def _exchange(self, meter: MercuryMeter, link: _Link, request: bytes, expect: int) -> bytes:
        try:
            return link.exchange(request, expect, float(meter.timeout))
        except (OSError, serial.SerialException) as exc:
            self._drop(link)
            raise PollError("refused", f"{self._where(meter)}: link {link.name} failed: {exc}") from None

    def _ask(
        self, meter: MercuryMeter, link: _Link, request: bytes, parse: Callable[[bytes, bytes], _T], what: str,
        retried: bool = False,
    ) -> _T:
        where = self._where(meter)
        raw = self._exchange(meter, link, request, mc.reply_size(request))
        if not raw:
            raise PollError("timeout", f"{where}: no answer to the {what} request within {meter.timeout:g} s")
        try:
            payload = mc.check_frame(raw, request[:1])
            return parse(payload, raw)
        except mc.StatusError as exc:
            if exc.code == mc.STATUS_CHANNEL_NOT_OPEN and not retried:  # the channel timed out: open it again
                self._open(meter, link)
                return self._ask(meter, link, request, parse, what, retried=True)
            raise PollError("exception", f"{where}: {what}: {exc}", raw=raw, source=self._source(meter)) from None
        except mc.FrameError as exc:
            raise PollError(exc.outcome, f"{where}: {what}: {exc}", raw=raw, source=self._source(meter)) from None

    def _ask_v1(
        self, meter: MercuryMeter, link: _Link, addr: int, command: str, parse: Callable[[bytes, bytes], _T]
    ) -> _T:
        where = self._where(meter)
        request = mc.v1_request(addr, command)
        raw = self._exchange(meter, link, request, mc.reply_size(request, "v1"))
        if not raw:
            raise PollError("timeout", f"{where}: no answer to the {command} request within {meter.timeout:g} s "
                            "(check the address: the serial's last 6 digits for a 200, 8 for a 203/206)")
        try:
            return parse(mc.v1_payload(raw, addr, command), raw)
        except mc.FrameError as exc:
            raise PollError(exc.outcome, f"{where}: {command}: {exc}", raw=raw, source=self._source(meter)) from None

    # --- links --------------------------------------------------------------------------

    def _with_link(self, meter: MercuryMeter, body: Callable[[_Link], _T]) -> _T:
        link = self._link(meter)
        with link.lock:
            return body(link)

    def _link(self, meter: MercuryMeter) -> _Link:
        baud = int(meter.baudrate or mc.LINE["baudrate"])
        if meter.host:
            key = f"tcp:{meter.host}:{meter.tcp_port}"
        else:
            key = f"serial:{meter.port}"
        with self._guard:
            link = self._links.get(key)
            if link is not None and link.baudrate == baud:
                return link
            if link is not None:
                link.close()
            try:
                if meter.host:
                    link = _TcpLink(meter.host, int(meter.tcp_port or 0), baud, float(meter.timeout))
                else:
                    link = _SerialLink(str(meter.port), baud)
            except (OSError, serial.SerialException) as exc:
                what = f"connect to {meter.host}:{meter.tcp_port}" if meter.host else f"open serial port {meter.port}"
                raise PollError("refused", f"{self._where(meter)}: cannot {what}: {exc}") from None
            self._links[key] = link
            return link

    def _drop(self, link: _Link) -> None:
        with self._guard:
            for k, v in list(self._links.items()):
                if v is link:
                    del self._links[k]
        link.close()

    def link_stats(self) -> list[tuple[str, int, int]]:
        """(link, exchanges, bytes) per open link, for benchmarks."""
        return [(k.name, k.exchanges, k.bytes) for k in self._links.values()]

    # --- names and times ---------------------------------------------------------------------

    def _where(self, meter: MercuryMeter) -> str:
        return f"meter {meter.id} on {meter.bus_name} (address {meter.address})"

    def _source(self, meter: MercuryMeter) -> str:
        return f"{meter.adapter}:{meter.bus_name}/{meter.address}"

    def _utc(self, local: datetime) -> datetime:
        return local.replace(tzinfo=self._tz).astimezone(UTC)

    def _local(self, t: datetime) -> datetime:
        return t.astimezone(self._tz).replace(tzinfo=None)


@dataclass(frozen=True)
class LineMeter:
    """A meter-shaped value for a whole line at the broadcast address (`amr scan`)."""

    port: int | str | None = None
    host: str | None = None
    tcp_port: int | None = None
    baudrate: int | None = 9600
    timeout: float = 0.5
    password: str | None = None
    password_encoding: str | None = None
    access_level: int | None = None
    address: str | None = str(mc.BROADCAST)
    id: str = "scan"
    adapter: str = "mercury230"
    registers: tuple[str, ...] = ("1.8.0",)

    @property
    def bus_name(self) -> str:
        return f"{self.host}:{self.tcp_port}" if self.host else str(self.port)


def _parse_address(payload: bytes, raw: bytes) -> int:
    if mc.status_of(payload) is not None:
        mc.parse_status(payload, raw)
    if len(payload) != 2:
        raise mc.FrameError("decode", f"an address answer has 2 data bytes, not {len(payload)}", raw)
    return payload[1]


def _parse_serial(payload: bytes, raw: bytes) -> str:
    if mc.status_of(payload) is not None:
        mc.parse_status(payload, raw)
    if len(payload) < 4:
        raise mc.FrameError("decode", "a serial-number answer has at least 4 data bytes", raw)
    return str(mc.decimal_bytes(payload[:4]))

