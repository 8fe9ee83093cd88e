"""Simulated IEC 62056-21 mode C meters on one serial line (a paced pseudo-terminal).

Each meter's counters come from `simulators.consumption.ConsumptionModel`, so
a test can compute what a poll must read. Several meters may share the line
(multi-drop) and answer only to their device address; the line runs at the
real character time of the current rate, and the readout rate switches after
the option select exactly as the standard orders it.

Faults (set `SimMeter.fault`, or `--fault ADDRESS=FAULT` on the command line):

    no_answer      ignore the sign-on
    slow           answer after `slow_s` seconds (beyond a poller's timeout)
    bad_bcc        corrupt the block check character of the data message
    garbage        answer the sign-on with random bytes
    counter_reset  counters restart from zero at the moment the fault is set
    rollover       counters wrap at `rollover_at` kWh
    clock_drift    the meter's clock runs `clock_drift_s` seconds off

Beside the faults, `clock_offset_s` is where the meter's clock stands (a clock far
off), moved by Energomera's `W1 CTIME(±s)` at most 29 s once a day, and
`missing_profile` the slot starts whose load-profile record is broken (empty).

Dialects: `standard` (data readout; `R5 P.01(from;to)` load profile in programming
mode, 30-minute energy from the consumption model), `energomera` (`ET0PE()`),
`energomera_spodes` (`ET0PE()` is ERR12, `EMD01(0.0,n)` the day-start archive) and
`neva` (XOR check, `0F0880FF()` answering `(total,T1,T2,T3,T4)` in one bracket,
`000902FF()`/`000901FF()` date and time).

Run `python -m simulators.iec62056_sim --help`.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from adapters.base import ProfileSlot
from adapters.iec62056 import (
    ACK,
    BAUD_OF_CHAR,
    BYTESIZE,
    CHAR_OF_BAUD,
    CRLF,
    DIALECTS,
    ETX,
    NAK,
    PARITY,
    SOH,
    STOPBITS,
    STX,
    answer_message,
    command_message,
    data_message,
    from_line,
    identification,
    parse_frame,
    profile_text,
    to_line,
)
from simulators.consumption import Clock, ConsumptionModel, SimClock
from simulators.serial_line import PtyLine

FAULTS = ("no_answer", "slow", "bad_bcc", "garbage", "counter_reset", "rollover", "clock_drift")
REGISTERS = ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "2.8.0")
_SIGN_ON = re.compile(rb"/\?([0-9A-Za-z ]{0,32})!\r\n")
_MSK = ZoneInfo("Europe/Moscow")
PROFILE_PERIOD = timedelta(minutes=30)
CLOCK_STEP_S = 29  # Energomera: at most this much clock correction a day
_P01_RANGE = re.compile(r"P\.01\(\d(\d{10});\d?(\d{10})?\)")


@dataclass
class SimReadout:
    """What the meter sent in its last readout: the truth a test compares with."""

    t: datetime  # simulated instant the counters were latched
    values: dict[str, Decimal]  # kWh, as printed (after faults)
    clock: datetime  # the meter's own clock as printed (may drift)


@dataclass
class SimMeter:
    """One simulated meter; fields may be changed while the line runs."""

    address: str = ""
    serial_number: str = "00000001"
    seed: int = 1
    manufacturer: str = "AMR"
    max_baud: int = 9600
    in_wh: bool = False  # print energies in Wh instead of kWh
    with_clock: bool = True
    fault: str | None = None
    slow_s: float = 2.0
    clock_drift_s: float = 600.0
    rollover_at: Decimal = Decimal(10000)
    dialect: str = "standard"  # or "energomera": programming mode, password, ET0PE()
    password: str | None = None  # default: the dialect's factory password
    model: ConsumptionModel | None = None
    reset_at: datetime | None = None
    last: SimReadout | None = None
    readouts: int = 0
    clock_offset_s: float = 0.0  # where the meter's clock stands against true time
    missing_profile: set[datetime] = field(default_factory=set)  # slot starts with a broken record
    clock_corrections: list[tuple[datetime, int]] = field(default_factory=list)  # (when, seconds)
    profile_reads: int = 0

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = ConsumptionModel(self.seed)
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")
        if self.dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {self.dialect!r}; known: {', '.join(DIALECTS)}")
        if self.password is None:
            self.password = DIALECTS[self.dialect].default_password or "777777"
        if self.max_baud not in CHAR_OF_BAUD:
            raise ValueError(f"max_baud must be one of {sorted(CHAR_OF_BAUD)}")

    def set_fault(self, fault: str | None, now: datetime) -> None:
        """Inject (or clear) a fault; a counter reset starts from the counters at `now`."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        self.fault = fault
        if fault == "counter_reset":
            self.reset_at = now

    def values(self, t: datetime) -> dict[str, Decimal]:
        """The registers as the meter would print them at simulated instant t."""
        assert self.model is not None
        out = {r: self.model.energy_kwh(t, r) for r in REGISTERS}
        if self.fault == "counter_reset" and self.reset_at is not None:
            base = {r: self.model.energy_kwh(self.reset_at, r) for r in REGISTERS}
            out = {r: max(Decimal(0), out[r] - base[r]) for r in REGISTERS}
        elif self.fault == "rollover":
            out = {r: out[r] % self.rollover_at for r in REGISTERS}
        if self.in_wh:  # the meter's resolution is then 1 Wh
            out = {r: Decimal(int(v * 1000)) / 1000 for r, v in out.items()}
        return out

    def clock(self, t: datetime) -> datetime:
        """The meter's clock, whole seconds (drifted under the clock_drift fault)."""
        drift = self.clock_offset_s + (self.clock_drift_s if self.fault == "clock_drift" else 0.0)
        return (t + timedelta(seconds=drift)).replace(microsecond=0)

    def profile(self, start: datetime, end: datetime) -> list[ProfileSlot]:
        """The 30-minute import slots starting in [start, end): Wh of the counters' steps.

        Each slot's Wh is the difference of the 1.8.0 counter (at its resolution)
        at the slot's ends, so a poller's cumulative values anchored to a reading
        agree with the counters to the watt-hour. A slot in `missing_profile` is
        broken (wh None).
        """
        step = PROFILE_PERIOD.total_seconds()
        ts = start.timestamp()
        t = datetime.fromtimestamp(ts - ts % step + (step if ts % step else 0), UTC)
        out = []
        while t < end:
            e = t + PROFILE_PERIOD
            wh = None if t in self.missing_profile else int(
                (self.values(e)["1.8.0"] - self.values(t)["1.8.0"]) * 1000
            )
            out.append(ProfileSlot(t, e, "1.8.0", wh))
            t = e
        return out

    def profile_answer(self, request: str, now: datetime) -> str:
        """The answer to `P.01(0YYMMDDhhmm;0YYMMDDhhmm)`: records whose period ends in the range
        (the meter's local time), up to the last complete period before now."""
        m = _P01_RANGE.search(request)
        if m is None:
            return "(ERROR)\r\n"
        lo = datetime.strptime(m.group(1), "%y%m%d%H%M").replace(tzinfo=_MSK)
        hi = datetime.strptime(m.group(2), "%y%m%d%H%M").replace(tzinfo=_MSK) if m.group(2) else now
        hi = min(hi.astimezone(UTC), now)
        slots = [sl for sl in self.profile(lo - PROFILE_PERIOD, hi) if lo <= sl.end <= hi]
        self.profile_reads += 1
        return profile_text(slots, int(PROFILE_PERIOD.total_seconds() // 60), _MSK)

    def correct_clock(self, request: str, now: datetime) -> bool:
        """`CTIME(±s)`: move the clock by at most 29 s, once a day; False when refused."""
        m = re.fullmatch(r"CTIME\(([+-]?\d+)\)", request)
        if m is None:
            return False
        step = int(m.group(1))
        if abs(step) > CLOCK_STEP_S or any(now - when < timedelta(days=1) for when, _ in self.clock_corrections):
            return False
        self.clock_offset_s += step
        self.clock_corrections.append((now, step))
        return True

    def data_block(self, t: datetime) -> str:
        values = self.values(t)
        lines = [f"0.0.0({self.address or self.serial_number})", f"C.1.0({self.serial_number})"]
        for reg in REGISTERS:
            v = values[reg]
            lines.append(f"{reg}({int(v * 1000):08d}*Wh)" if self.in_wh else f"{reg}({v:09.2f}*kWh)")
        clock = self.clock(t)
        if self.with_clock:
            local = clock.astimezone(_MSK)
            lines.append(f"0.9.1({local:%H:%M:%S})")
            lines.append(f"0.9.2({local:%y-%m-%d})")
        lines.append("F.F(00000000)")
        self.last = SimReadout(t, values, clock)
        self.readouts += 1
        return "\r\n".join(lines) + "\r\n"

    def command_answer(self, request: str, t: datetime) -> str:
        """The data of the answer to an Energomera read command, like `ET0PE()`."""
        name = request.partition("(")[0]
        if self.dialect == "neva":
            return self._neva_answer(name, t)
        if name == "EMD01" and self.dialect == "energomera_spodes":
            # the counters at the start of the meter's local day: (dd.mm.yy,total)(T1)..(T4)
            day = self.clock(t).astimezone(_MSK).replace(hour=0, minute=0, second=0)
            values = self.values(day.astimezone(UTC))
            self.last = SimReadout(day.astimezone(UTC), values, self.clock(t))
            self.readouts += 1
            tariffs = [values[r] for r in ("1.8.1", "1.8.2", "1.8.3")] + [Decimal(0)]
            return f"EMD01({day:%d.%m.%y},{values['1.8.0']})\r\n" + "".join(f"({v})\r\n" for v in tariffs)
        if name == "ET0PE" and self.dialect == "energomera_spodes":
            return "(ERR12)"
        if name == "ET0PE":
            values = self.values(t)
            self.last = SimReadout(t, values, self.clock(t))
            self.readouts += 1
            tariffs = [values[r] for r in ("1.8.0", "1.8.1", "1.8.2", "1.8.3")] + [Decimal(0)] * 2
            return "ET0PE" + "\r\n".join(f"({v:.2f})" for v in tariffs) + "\r\n"
        local = self.clock(t).astimezone(_MSK)
        if name == "DATE_" and self.dialect == "energomera_spodes":  # CE207: one weekday digit
            return f"DATE_({local.isoweekday() % 7}.{local:%d.%m.%y})\r\n"
        if name == "DATE_":
            return f"DATE_({local.isoweekday() % 7:02d}.{local:%d.%m.%y})\r\n"
        if name == "TIME_":
            return f"TIME_({local:%H:%M:%S})\r\n"
        return "(ERR12)"

    def _neva_answer(self, name: str, t: datetime) -> str:
        """Neva MT: OBIS C.D.E.F as 8 hex digits; several values in one pair of brackets."""
        if name == "0F0880FF":
            values = self.values(t)
            self.last = SimReadout(t, values, self.clock(t))
            self.readouts += 1
            regs = ("1.8.0", "1.8.1", "1.8.2", "1.8.3")
            return "0F0880FF(" + ",".join(f"{values[r]:.2f}" for r in regs) + ",0.00)\r\n"
        local = self.clock(t).astimezone(_MSK)
        if name == "000902FF":
            return f"000902FF({local:%y%m%d})\r\n"
        if name == "000901FF":
            return f"000901FF({local:%H%M%S})\r\n"
        return "(ERR12)"

    def ident(self) -> str:
        return f"SIM{self.serial_number}"[:16]


@dataclass
class IecLineSim:
    """Meters on one paced serial line; `device` is the path a poller opens."""

    meters: list[SimMeter]
    baudrate: int = 300  # the initial rate of every sign-on
    clock: Clock = field(default_factory=lambda: SimClock(datetime.now(UTC)))
    reaction_s: float = 0.0  # the meter's reaction time before each answer
    sign_on_reaction_s: float | None = None  # before the identification only, if set (a slow wake-up)
    seed: int = 0

    def __post_init__(self) -> None:
        addresses = [m.address for m in self.meters]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"two meters share a device address on one line: {addresses}")
        self.line = PtyLine(self.baudrate, BYTESIZE, PARITY, STOPBITS)
        self.device = self.line.device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random(self.seed)
        self._pending = b""
        self.sign_ons = 0

    def start(self) -> IecLineSim:
        self._thread = threading.Thread(target=self._serve, name=f"iec-sim {self.device}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.line.close()

    def __enter__(self) -> IecLineSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def meter(self, address: str) -> SimMeter:
        return next(m for m in self.meters if m.address == address)

    # the meter side of the protocol

    def _read_line(self, timeout: float) -> bytes | None:
        """Bytes up to CRLF, or None when the line stayed quiet (or we are stopping)."""
        return self._read_until(lambda b: b.endswith(CRLF), timeout)

    def _read_frame(self, timeout: float) -> bytes | None:
        """A SOH/STX frame up to its BCC (a sign-on line also ends the wait)."""

        def done(b: bytearray) -> bool:
            end = b.find(ETX)
            return (end >= 0 and len(b) >= end + 2) or bool(_SIGN_ON.search(b))

        return self._read_until(done, timeout)

    def _read_until(self, done: Callable[[bytearray], bool], timeout: float) -> bytes | None:
        buf = bytearray(self._pending)
        self._pending = b""
        deadline = time.monotonic() + timeout
        while not done(buf):
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                self._pending = bytes(buf)  # a message still arriving is kept for the next call
                return None
            buf += from_line(self.line.read(1, min(left, 0.1)))[0]
            if len(buf) > 256:
                del buf[:-64]
        return bytes(buf)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.line.set_baudrate(self.baudrate)
            msg = self._read_line(0.2)
            if msg is None:
                continue
            m = _SIGN_ON.search(msg)
            if m is None:
                continue  # noise on the line: a meter waits for a proper sign-on
            self.sign_ons += 1
            try:
                self._answer(m.group(1).decode("ascii"))
            except OSError:
                if self._stop.is_set():
                    return
                raise

    def _answer(self, address: str) -> None:
        chosen = [m for m in self.meters if m.address == address or address == ""]
        if not chosen:
            return
        if len(chosen) > 1:  # everyone answers a bare sign-on on a multi-drop line: collision
            self.line.write(bytes(self._rng.randrange(256) for _ in range(24)))  # raw noise
            return
        meter = chosen[0]
        if meter.fault == "no_answer":
            return
        first = self.reaction_s if self.sign_on_reaction_s is None else self.sign_on_reaction_s
        self._sleep(first + (meter.slow_s if meter.fault == "slow" else 0.0))
        if meter.fault == "garbage":
            self.line.write(bytes(self._rng.randrange(256) for _ in range(40)))
            return
        ident = identification(meter.manufacturer, CHAR_OF_BAUD[meter.max_baud], meter.ident())
        self.line.write(to_line(ident))
        ack = self._read_line(2.0)
        if ack is None:
            return
        if _SIGN_ON.search(ack):  # the poller gave up on us and signs on again
            self._pending = ack
            return
        at = ack.find(ACK)
        if at < 0 or len(ack) < at + 4:
            return
        rate = BAUD_OF_CHAR.get(chr(ack[at + 2]))
        mode = chr(ack[at + 3])
        if rate is None or rate > meter.max_baud or mode not in ("0", "1"):
            return  # not an option select this meter accepts: back to idle
        self.line.set_baudrate(rate)
        self._sleep(self.reaction_s)
        rule = DIALECTS[meter.dialect].bcc
        if mode == "1":
            self._programming(meter, rule)
            return
        self._send(meter, data_message(meter.data_block(self.clock.now()), rule))

    def _send(self, meter: SimMeter, msg: bytes) -> None:
        if meter.fault == "bad_bcc" and msg[:1] in (STX, SOH):
            msg = msg[:-1] + bytes((msg[-1] ^ 0x5A,))
        self.line.write(to_line(msg))

    def _programming(self, meter: SimMeter, rule: Callable[[bytes], bytes]) -> None:
        """Energomera programming mode: P0, password, read commands until B0 or silence."""
        self._send(meter, command_message("P0", f"({meter.serial_number})", rule))
        authorised = False
        while True:
            frame = self._read_frame(2.0)
            if frame is None or _SIGN_ON.search(frame):
                self._pending = frame or b""
                return
            try:
                command, data = parse_frame(frame, rule)
            except ValueError:
                self.line.write(to_line(NAK))
                continue
            self._sleep(self.reaction_s)
            if command == "B0":
                return
            if command == "P1":
                authorised = data == f"({meter.password})"
                self.line.write(to_line(ACK if authorised else NAK))
            elif command == "R1" and authorised:
                self._send(meter, answer_message(meter.command_answer(data, self.clock.now()), rule))
            elif command == "R5" and data.startswith("P.01") and meter.dialect == "standard":
                # the load profile is readable without a password (a data-readout level read)
                self._send(meter, answer_message(meter.profile_answer(data, self.clock.now()), rule))
            elif command == "W1" and authorised and meter.dialect.startswith("energomera"):
                self.line.write(to_line(ACK if meter.correct_clock(data, self.clock.now()) else NAK))
            else:
                self._send(meter, answer_message("(ERR12)", rule))


# --- command line ---------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simulators.iec62056_sim",
        description=(
            "Simulated IEC 62056-21 mode C meters on one pseudo-terminal serial line with the "
            "line's real timing. Prints the device path and an inventory for `amr`, then serves "
            "until interrupted."
        ),
    )
    p.add_argument("--meters", type=int, default=1, help="meters on the line (default 1)")
    p.add_argument(
        "--addresses", default="",
        help="comma-separated device addresses (default: none for one meter, 00000001.. for several)",
    )
    p.add_argument("--baud", type=int, default=300, help="initial rate of the sign-on (default 300)")
    p.add_argument("--max-baud", type=int, default=9600, help="readout rate the meters propose")
    p.add_argument("--seed", type=int, default=1, help="seed of the first meter's consumption model")
    p.add_argument("--scale", type=float, default=1.0, help="simulated seconds per wall second")
    p.add_argument("--start", default="", help="simulated start instant, ISO 8601 (default now)")
    p.add_argument("--reaction", type=float, default=0.02, help="meter reaction time in seconds")
    p.add_argument("--wh", action="store_true", help="print energies in Wh instead of kWh")
    p.add_argument(
        "--dialect", choices=sorted(DIALECTS), default="standard",
        help="energomera: programming mode with password 777777 and ET0PE()/DATE_()/TIME_(); "
        "energomera_spodes: EMD01 day-start archive; neva: hex OBIS commands, XOR check",
    )
    p.add_argument("--clock-offset", type=float, default=0.0, metavar="SECONDS",
                   help="the meters' clocks stand this far from true time (Energomera: CTIME corrects it)")
    p.add_argument("--missing-profile", action="append", default=[], metavar="ISO",
                   help="a 30-minute load-profile slot (its start) whose record is broken; repeatable")
    p.add_argument(
        "--fault", action="append", default=[], metavar="ADDRESS=FAULT",
        help=f"inject a fault into one meter; faults: {', '.join(FAULTS)}",
    )
    p.add_argument("--link", type=Path, help="also make this symlink to the device (a stable path)")
    p.add_argument("--account", default="1", help="account number used in the printed inventory")
    return p.parse_args(argv)


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.addresses:
        addresses = [a.strip() for a in args.addresses.split(",")]
    else:
        addresses = [""] if args.meters == 1 else [f"{i + 1:08d}" for i in range(args.meters)]
    start = datetime.fromisoformat(args.start) if args.start else datetime.now(UTC)
    meters = [
        SimMeter(address=a, serial_number=f"{i + 1:08d}", seed=args.seed + i,
                 max_baud=args.max_baud, in_wh=args.wh, dialect=args.dialect,
                 manufacturer="EKT" if args.dialect.startswith("energomera") else "AMR",
                 clock_offset_s=args.clock_offset,
                 missing_profile={datetime.fromisoformat(t).astimezone(UTC) for t in args.missing_profile})
        for i, a in enumerate(addresses)
    ]
    sim = IecLineSim(meters, args.baud, SimClock(start, args.scale), args.reaction)
    for spec in args.fault:
        addr, _, fault = spec.partition("=")
        try:
            sim.meter(addr).set_fault(fault, sim.clock.now())
        except StopIteration:
            print(f"--fault {spec}: no meter with address {addr!r}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"--fault {spec}: {exc}", file=sys.stderr)
            return 2
    device = sim.device
    if args.link:
        if args.link.is_symlink():
            args.link.unlink()
        os.symlink(device, args.link)
        device = str(args.link)
    print(f"# IEC 62056-21 line on {device} ({args.baud} baud initial, {len(meters)} meter(s))")
    print(f'[[subscriber]]\naccount = "{args.account}"\n')
    for i, m in enumerate(meters):
        print(
            f'[[meter]]\nid = "iec-{i + 1:04d}"\naccount = "{args.account}"\nadapter = "iec62056"\n'
            f'port = "{device}"\nbaudrate = {args.baud}\n'
            + (f'address = "{m.address}"\n' if m.address else "")
            + (f'dialect = "{m.dialect}"\n' if m.dialect != "standard" else "")
            + f"registers = {_toml_list(REGISTERS if m.dialect == 'standard' else REGISTERS[:4])}\n"
        )
    sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with sim:
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    if args.link and args.link.is_symlink():
        args.link.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
