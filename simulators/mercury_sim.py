"""Simulated Incotex Mercury meters (v2 and v1) on a paced pseudo-terminal or over TCP.

A `MercuryBus` is the meters of one RS-485 line: each answers the frames
addressed to it (v2: its 1-byte address or the broadcast 0, where every v2
meter answers at once and the answers collide; v1: its 4-byte address). The
meters' counters come from the shared `ConsumptionModel`, so a test knows what
a poller should read at any instant; their average-power profile is the same
counter cut into half-hours, so a profile read back agrees with the counters to
the watt-hour.

Front-ends: `MercuryLineSim` serves the bus on a `PtyLine` paced at the line's
rate (a frame ends after `frame_gap_chars` of silence, as on the wire), and
`MercuryTcpSim` serves it as a transparent RS-485-to-Ethernet converter would:
the same bytes over a TCP connection.

Faults (`MercurySimMeter.fault`): "silent" (no answer), "bad_crc" (answers
with a wrong CRC), "garbage" (answers noise), "channel_timeout" (the channel
closes itself right after opening: every request gets status 5), "clock_far"
(the clock 2 hours off), "slow" (answers after 2 s). A wrong password is not a
fault: give the meter another `password` or `password_encoding` than the
inventory. Missing profile records: put slot starts in `missing_profile`.

What a real meter answers to a wrong password is not in the open sources we
read; the simulator answers status 1 (bad command or parameter), which the
adapter reports as a refused channel naming the password.

Run `python -m simulators.mercury_sim --meters 3` for a line on a pty (the
device is printed), or `--tcp 4001` for a converter on TCP port 4001.
"""

from __future__ import annotations

import argparse
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from adapters import mercury as mc
from simulators.consumption import ConsumptionModel
from simulators.serial_line import PtyLine

SLOT = timedelta(minutes=30)
FAULTS = ("silent", "bad_crc", "garbage", "channel_timeout", "clock_far", "slow")
CLOCK_FAR_S = 7200.0
_MSK = ZoneInfo("Europe/Moscow")


def _real_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class MercurySimMeter:
    """One simulated meter; its fields may be changed while the line runs."""

    address: int
    family: str = "v2"  # v2 (230...) or v1 (200...)
    serial: str = "43728456"
    seed: int = 1
    password: str = mc.DEFAULT_PASSWORD  # level 1
    admin_password: str = "222222"  # level 2
    password_encoding: str = "digits"
    constant: int = 1000  # impulses per kWh
    one_direction: bool = True  # A- and R- not measured (FFFFFFFF)
    transformer: tuple[int, int] = (1, 1)
    fault: str | None = None
    clock_offset_s: float = 0.0
    profile_from: datetime | None = None  # records exist from this slot (default: 10 days back)
    missing_profile: set[datetime] = field(default_factory=set)  # slot starts (UTC) with no record
    tz: ZoneInfo = _MSK
    model: ConsumptionModel | None = None
    # what happened, for tests
    opens: int = 0
    refused_opens: int = 0
    requests: int = 0
    profile_reads: int = 0
    corrections: list[tuple[date, int]] = field(default_factory=list)
    channel_level: int = 0  # 0 = closed

    def __post_init__(self) -> None:
        if self.family not in ("v1", "v2"):
            raise ValueError(f"family is v1 or v2, not {self.family!r}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")
        if self.model is None:
            self.model = ConsumptionModel(self.seed)

    # --- the truth a test compares with -----------------------------------------------

    def wh(self, t: datetime, register: str = "1.8.0") -> int:
        """The A+ counter (or its tariff register) in Wh at instant t."""
        assert self.model is not None
        return int(self.model.energy_kwh(t, register) * 1000)

    def energy(self, t: datetime, tariff: int) -> tuple[int | None, int | None, int | None, int | None]:
        """A+, A-, R+, R- (Wh) of tariff 0 (sum) or 1..4 at t, as the meter answers 05 00 <tariff>."""
        a = self.wh(t, "1.8.0") if tariff == 0 else self.wh(t, f"1.8.{tariff}") if tariff <= 3 else 0
        minus = None if self.one_direction else a // 50
        return a, minus, a * 3 // 10, minus

    def clock(self, t: datetime) -> datetime:
        """The meter's clock as its local wall time, whole seconds."""
        off = self.clock_offset_s + (CLOCK_FAR_S if self.fault == "clock_far" else 0.0)
        return (t + timedelta(seconds=off)).astimezone(self.tz).replace(tzinfo=None, microsecond=0)

    def v1_energy(self, t: datetime) -> tuple[int, int, int, int]:
        """T1..T4 in 0.01 kWh, as a v1 meter counts."""
        assert self.model is not None
        t1, t2, t3 = (int(self.model.energy_kwh(t, f"1.8.{i}") * 100) for i in (1, 2, 3))
        return t1, t2, t3, 0

    def slot_wh(self, start: datetime) -> int | None:
        """The A+ energy of the half-hour starting at start (UTC) as the profile holds it."""
        if start in self.missing_profile:
            return None
        return self.wh(start + SLOT) - self.wh(start)

    def rplus_slot_wh(self, start: datetime) -> int:
        """The R+ energy (varh) of the half-hour at start: the R+ counter's step."""
        return (self.wh(start + SLOT) * 3 // 10) - (self.wh(start) * 3 // 10)

    def profile_slots(self, t: datetime) -> list[datetime]:
        """Slot starts (UTC) with a record, oldest first, up to the last slot complete at t."""
        last = _floor(t) - SLOT
        first = self.profile_from or last - timedelta(days=10)
        first = max(first, last - SLOT * (mc.RECORDS - 1))
        out = []
        s = first
        while s <= last:
            if s not in self.missing_profile:
                out.append(s)
            s += SLOT
        return out


def _floor(t: datetime) -> datetime:
    ts = t.timestamp()
    return datetime.fromtimestamp(ts - ts % SLOT.total_seconds(), UTC)


@dataclass
class MercuryBus:
    """The meters of one line and the protocol logic: a request frame in, the answer out."""

    meters: list[MercurySimMeter]
    now: Callable[[], datetime] = _real_now
    frames: int = 0
    _profile_cache: dict[int, tuple[tuple[datetime, int], list[datetime]]] = field(default_factory=dict)

    def meter(self, address: int) -> MercurySimMeter:
        return next(m for m in self.meters if m.address == address)

    def answer(self, request: bytes) -> tuple[bytes | None, float]:
        """The bytes the line carries back (None: silence) and a delay before them."""
        self.frames += 1
        if len(request) < 3 or mc.crc16(request[:-2]) != request[-2:]:
            return None, 0.0  # a meter ignores a frame with a bad CRC
        v1 = [m for m in self.meters if m.family == "v1" and len(request) >= 7
              and request[:4] == m.address.to_bytes(4, "big")]
        if v1:
            return self._faulted(v1[0], self._v1(v1[0], request))
        addr = request[0]
        v2 = [m for m in self.meters if m.family == "v2" and (m.address == addr or addr == mc.BROADCAST)]
        if not v2:
            return None, 0.0
        answers = [self._faulted(m, self._v2(m, request)) for m in v2]
        if len(answers) == 1:
            return answers[0]
        # several meters talk at once: the line carries their bits ORed together
        got = [a for a, _ in answers if a]
        if not got:
            return None, 0.0
        n = max(len(a) for a in got)
        mixed = bytearray(n)
        for a in got:
            for i, b in enumerate(a):
                mixed[i] |= b
        return bytes(mixed), 0.0

    def _faulted(self, m: MercurySimMeter, reply: bytes | None) -> tuple[bytes | None, float]:
        if reply is None or m.fault == "silent":
            return None, 0.0
        if m.fault == "bad_crc":
            return reply[:-1] + bytes(((reply[-1] + 1) & 0xFF,)), 0.0
        if m.fault == "garbage":
            return b"\x13\x37\xfe\xed\x00\x42\x99", 0.0
        if m.fault == "slow":
            return reply, 2.0
        return reply, 0.0

    # --- v2 -----------------------------------------------------------------------

    def _v2(self, m: MercurySimMeter, req: bytes) -> bytes | None:
        m.requests += 1
        a = req[0]  # answers carry the address the request used (0 when broadcast)
        p = req[1:-2]
        cmd = p[0]
        ok = mc.status_reply(a, 0)
        if cmd == mc.CMD["test"]:
            return ok
        if cmd == mc.CMD["open"]:
            if len(p) != 8 or p[1] not in mc.ACCESS_LEVELS:
                return mc.status_reply(a, 1)
            pw = m.password if p[1] == 1 else m.admin_password
            if p[2:8] != mc.encode_password(pw, m.password_encoding):
                m.refused_opens += 1
                return mc.status_reply(a, 1)
            m.opens += 1
            m.channel_level = p[1]
            return ok
        if cmd == mc.CMD["close"]:
            m.channel_level = 0
            return ok
        if not m.channel_level or m.fault == "channel_timeout":
            return mc.status_reply(a, mc.STATUS_CHANNEL_NOT_OPEN)
        t = self.now()
        if cmd == mc.CMD["energy"] and len(p) == 3:
            array, tariff = p[1] >> 4, p[2]
            if array != mc.V2["energy_arrays"]["since_reset"] or tariff > 4:
                return mc.status_reply(a, 1)
            return mc.energy_reply(a, m.energy(t, tariff))
        if cmd == mc.CMD["read_time"] and p[1:] == bytes((mc.V2["read_time"]["clock"],)):
            return mc.clock_reply(a, m.clock(t))
        if cmd == mc.CMD["write"] and len(p) == 5 and p[1] == mc.WPARAM["correct_clock"]:
            return self._correct(m, a, p, t)
        if cmd == mc.CMD["read"] and len(p) >= 2:
            param = p[1]
            if param == mc.RPARAM["serial"]:
                return mc.frame(bytes((a,)), mc.to_decimal_bytes(int(m.serial[-8:]), 4), b"\x01\x01\x18")
            if param == mc.RPARAM["transformer"]:
                return mc.transformer_reply(a, *m.transformer)
            if param == mc.RPARAM["address"]:
                return mc.frame(bytes((a,)), bytes((0, m.address)))
            if param == mc.RPARAM["variant"]:
                return mc.variant_reply(a, m.constant)
            if param == mc.RPARAM["profile_pointer"]:
                slots = self._slots(m, t)
                if not slots:
                    return mc.status_reply(a, 2)
                last = len(slots) - 1
                local = slots[-1].astimezone(m.tz).replace(tzinfo=None)
                return mc.profile_pointer_reply(a, mc.ProfilePointer(self._number(slots, last), 0, local, 30))
        if cmd == mc.CMD["memory"] and len(p) == 5:
            m.profile_reads += 1
            number = mc.parse_profile_request(p)
            slots = self._slots(m, t)
            j = self._index(slots, number)
            if j is None:
                return mc.empty_record_reply(a)
            start = slots[j]
            wh = m.slot_wh(start)
            n = None if wh is None else mc.wh_pulses(wh, m.constant)
            r = None if wh is None else mc.wh_pulses(m.rplus_slot_wh(start), m.constant)
            counts = (n, None if m.one_direction else 0, r, None if m.one_direction else 0)
            local = start.astimezone(m.tz).replace(tzinfo=None)
            return mc.profile_record_reply(a, mc.ProfileRecord(0, local, 30, counts))
        return mc.status_reply(a, 1)

    def _correct(self, m: MercurySimMeter, a: int, p: bytes, t: datetime) -> bytes:
        now_local = m.clock(t)
        try:
            hh, mm, ss = mc.from_bcd(p[4]), mc.from_bcd(p[3]), mc.from_bcd(p[2])
            target = now_local.replace(hour=hh, minute=mm, second=ss)
        except (mc.FrameError, ValueError):
            return mc.status_reply(a, 1)
        delta = int((target - now_local).total_seconds())
        if abs(delta) > mc.WPARAM["max_correction_s"]:
            return mc.status_reply(a, 1)
        if any(d == now_local.date() for d, _ in m.corrections):
            return mc.status_reply(a, 4)
        m.clock_offset_s += delta
        m.corrections.append((now_local.date(), delta))
        return mc.status_reply(a, 0)

    def _slots(self, m: MercurySimMeter, t: datetime) -> list[datetime]:
        key = (_floor(t), len(m.missing_profile))
        got = self._profile_cache.get(id(m))
        if got is None or got[0] != key:
            got = self._profile_cache[id(m)] = (key, m.profile_slots(t))
        return got[1]

    @staticmethod
    def _number(slots: list[datetime], j: int) -> int:
        """The record number of slots[j]: records count on from the first one, wrapping."""
        return j % mc.RECORDS

    @staticmethod
    def _index(slots: list[datetime], number: int) -> int | None:
        j = number % mc.RECORDS
        return j if j < len(slots) else None

    # --- v1 -----------------------------------------------------------------------

    def _v1(self, m: MercurySimMeter, req: bytes) -> bytes | None:
        m.requests += 1
        cmd = req[4]
        t = self.now()
        if cmd == mc.V1["commands"]["energy"]:
            return mc.v1_energy_reply(m.address, m.v1_energy(t))
        if cmd == mc.V1["commands"]["clock"]:
            return mc.v1_clock_reply(m.address, m.clock(t))
        if cmd == mc.V1["commands"]["serial"]:
            return mc.v1_reply(m.address, "serial", int(m.serial[-8:]).to_bytes(4, "big"))
        if cmd == mc.V1["commands"]["version"]:
            return mc.v1_reply(m.address, "version", bytes((0x00, 0x08, 0x01)))  # a 206 with RS-485
        return None


# --- front-ends ------------------------------------------------------------------------


class MercuryLineSim:
    """The bus on a pseudo-terminal paced at baudrate; `.device` is the port to open."""

    def __init__(self, bus: MercuryBus, baudrate: int = 9600):
        self.bus = bus
        self.baudrate = baudrate
        self.line = PtyLine(baudrate)
        self.device = self.line.device
        self.gap = float(mc.LINE["frame_gap_chars"]) * self.line.char_time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MercuryLineSim:
        self._thread = threading.Thread(target=self._serve, name=f"mercury-sim {self.device}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.line.close()

    def __enter__(self) -> MercuryLineSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                req = self.line.read_until_silence(self.gap, 0.2)
            except OSError:
                return
            if not req:
                continue
            reply, delay = self.bus.answer(req)
            if reply is None:
                continue
            if delay:
                self._stop.wait(delay)
            try:
                self.line.write(reply)
            except OSError:
                return


class MercuryTcpSim:
    """The bus behind a transparent RS-485-to-Ethernet converter: the same bytes over TCP."""

    def __init__(self, bus: MercuryBus, host: str = "127.0.0.1", port: int = 0, gap_s: float = 0.004):
        self.bus = bus
        self.gap = gap_s
        self._srv = socket.create_server((host, port))
        self.host, self.port = self._srv.getsockname()[:2]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0

    def start(self) -> MercuryTcpSim:
        t = threading.Thread(target=self._accept, name=f"mercury-tcp {self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._srv.close()
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> MercuryTcpSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        self._srv.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = bytearray()
            while not self._stop.is_set():
                ready = select.select([conn], [], [], self.gap if buf else 0.2)[0]
                if ready:
                    try:
                        chunk = conn.recv(4096)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                    continue
                if not buf:
                    continue
                reply, delay = self.bus.answer(bytes(buf))
                buf.clear()
                if reply is None:
                    continue
                if delay:
                    time.sleep(delay)
                try:
                    conn.sendall(reply)
                except OSError:
                    return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Simulated Mercury meters on a pty or a TCP port")
    ap.add_argument("--meters", type=int, default=1, help="v2 meters at addresses 1..N")
    ap.add_argument("--v1", type=int, default=0, help="v1 meters at addresses 10000001..")
    ap.add_argument("--baudrate", type=int, default=9600)
    ap.add_argument("--tcp", type=int, help="serve on this TCP port instead of a pty")
    ap.add_argument("--password-encoding", choices=mc.PASSWORD_ENCODINGS, default="digits")
    args = ap.parse_args(argv)
    meters = [MercurySimMeter(i, seed=i, password_encoding=args.password_encoding) for i in range(1, args.meters + 1)]
    meters += [MercurySimMeter(10_000_001 + i, family="v1", seed=100 + i) for i in range(args.v1)]
    bus = MercuryBus(meters)
    front: MercuryLineSim | MercuryTcpSim
    if args.tcp is not None:
        front = MercuryTcpSim(bus, port=args.tcp).start()
        print(f"mercury simulator on 127.0.0.1:{front.port}", flush=True)
    else:
        front = MercuryLineSim(bus, args.baudrate).start()
        print(f"mercury simulator on {front.device} at {args.baudrate} baud", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        front.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
