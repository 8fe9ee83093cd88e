"""Simulated Modbus meters: a TCP fleet and RTU buses on pseudo-terminals.

Every simulated meter answers from `simulators.consumption.ConsumptionModel`,
encoded through the same register map (`adapters.registermap`) a poller
decodes with, so a test knows exactly what a poller should read. Faults are
injected per meter at run time: no answer, slow answer, bad CRC, garbage
bytes, a Modbus exception code, a counter reset, a register rollover and a
drifting clock. The RTU side runs on `simulators.serial_line.PtyLine`, so
frames take the time they take on a real line at the configured baud rate.

    python -m simulators.modbus_sim tcp --meters 100 --units-per-port 10
    python -m simulators.modbus_sim rtu --units 1,2,3 --baudrate 9600
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import struct
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

from adapters.registermap import RegisterMap, RegisterSpec, load_register_map
from simulators.consumption import (
    _MSK,
    EPOCH,
    SLOT,
    SLOTS_PER_DAY,
    Clock,
    ConsumptionModel,
    SimClock,
)
from simulators.serial_line import PtyLine

FAULTS = ("none", "no_answer", "slow", "bad_crc", "garbage", "exception", "reset", "rollover", "clock_drift")
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE = 1, 2, 3
GATEWAY_TARGET_FAILED = 0x0B
ENERGY_REGISTERS = ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "2.8.0")


# --- CRC-16/MODBUS ---------------------------------------------------------

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC[(crc ^ b) & 0xFF]
    return crc


def with_crc(frame: bytes) -> bytes:
    return frame + crc16(frame).to_bytes(2, "little")


# --- one simulated meter ---------------------------------------------------


@dataclass
class Faults:
    """What a meter does wrong right now; set through `SimMeter.inject`."""

    no_answer: bool = False
    slow_s: float = 0.0
    bad_crc: bool = False
    garbage: bool = False
    exception: int | None = None
    counter_offset: dict[str, Decimal] = field(default_factory=dict)  # per energy register (reset, rollover)
    clock_drift_s: float = 0.0


@dataclass
class SimMeter:
    """One meter behind a unit id: values from the consumption model, faults on demand."""

    unit: int
    rmap: RegisterMap
    clock: Clock
    seed: int = 1
    model: ConsumptionModel | None = None  # shared between meters of one load profile, or own
    faults: Faults = field(default_factory=Faults)
    fixed: dict[str, Decimal] = field(default_factory=dict)  # register key -> a value set by hand
    requests: int = 0  # requests answered or refused, for tests and benchmarks

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = ConsumptionModel(self.seed)
        self._snap_t: int | None = None
        self._snap: dict[str, Decimal] = {}
        # a real meter answers its identification registers too: the preset's probes that no
        # register covers (a meter code, a type designation) are served with their `min`
        probes = [p.as_register() for p in self.rmap.probes]
        self._served: tuple[RegisterSpec, ...] = self.rmap.registers + tuple(
            p for p in probes
            if not any(r.function == p.function and r.address < p.end and p.address < r.end for r in self.rmap.registers)
        )

    @property
    def _model(self) -> ConsumptionModel:
        """The consumption model, never None after __post_init__ (the field is None to ask for one)."""
        assert self.model is not None
        return self.model

    def inject(self, fault: str, value: float | int | None = None) -> None:
        """Turn a fault on ('none' clears all). value: seconds, exception code or kWh."""
        f = self.faults
        if fault == "none":
            self.faults = Faults()
        elif fault == "no_answer":
            f.no_answer = True
        elif fault == "slow":
            f.slow_s = float(value if value is not None else 2.0)
        elif fault == "bad_crc":
            f.bad_crc = True
        elif fault == "garbage":
            f.garbage = True
        elif fault == "exception":
            f.exception = int(value if value is not None else 4)
        elif fault == "reset":  # the counters start again from zero now
            now = self.clock.now()
            f.counter_offset = {r: -self.true_energy(r, now) for r in ENERGY_REGISTERS}
        elif fault == "rollover":  # the counters sit value kWh below the register's wrap
            spec = self._counter_spec()
            if spec is None:
                raise ValueError("rollover needs an integer 1.8.0 register in the preset")
            bits = {"u16": 16, "u32": 32, "u64": 64, "i16": 15, "i32": 31, "i64": 63}[spec.type]
            wrap = Decimal(1 << bits) * spec.scale
            below = Decimal(str(value if value is not None else 0.05))
            now = self.clock.now()
            f.counter_offset = {r: wrap - below - self.true_energy(r, now) for r in ENERGY_REGISTERS}
        elif fault == "clock_drift":
            f.clock_drift_s = float(value if value is not None else 600)
        else:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")

    def _counter_spec(self) -> RegisterSpec | None:
        spec = self.rmap.get("1.8.0")
        return spec if spec is not None and not spec.type.startswith("f") else None

    def true_energy(self, register: str, t: datetime) -> Decimal:
        return self._model.energy_kwh(t, register)

    def energy(self, t: datetime) -> dict[str, Decimal]:
        """Every energy register at t in one pass, equal to `model.energy_kwh(t, register)` each.

        A meter answers many registers from one instant; asking the model once per
        register would walk the day's slots five times per request. Like a real
        meter, the registers are refreshed once a (simulated) second.
        """
        second = int(t.timestamp())
        if self._snap_t == second:
            return self._snap
        model = self._model
        t = datetime.fromtimestamp(second, UTC)
        local = t.astimezone(_MSK)
        n = (local.date() - EPOCH).days
        acc = dict(model._cumulative_before_day(n))
        slots = model._day_slots(n)
        tariff = model.tariff_of_hour
        seconds = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        whole, frac = divmod(seconds, SLOT.total_seconds())
        for i in range(int(whole)):
            acc["1.8.0"] += slots[i]
            acc[tariff[i // 4]] += slots[i]
        if int(whole) < SLOTS_PER_DAY:
            part = slots[int(whole)] * frac / SLOT.total_seconds()
            acc["1.8.0"] += part
            acc[tariff[int(whole) // 4]] += part
        out = {"2.8.0": Decimal(0)}
        for reg in ("1.8.0", "1.8.1", "1.8.2", "1.8.3"):
            base = model.start_kwh if reg == "1.8.0" else Decimal(0)
            out[reg] = (base + Decimal(repr(acc[reg]))).quantize(model.resolution, rounding=ROUND_DOWN)
        out["2.8.0"] = out["2.8.0"].quantize(model.resolution)
        self._snap_t, self._snap = second, out
        return out

    def value(self, spec: RegisterSpec, t: datetime) -> Decimal:
        """What the meter shows for a register at t (faults included)."""
        if spec.key in self.fixed:
            return self.fixed[spec.key]
        if spec.obis:
            if spec.obis in ENERGY_REGISTERS:
                return self.energy(t)[spec.obis] + self.faults.counter_offset.get(spec.obis, 0)
            return Decimal(0)
        name = spec.name or ""
        kw = self._model.power_kw(t)
        if name.startswith("voltage"):
            return Decimal("230.1")
        if name.startswith("current"):
            return Decimal(str(round(kw * 1000 / 230, 3)))
        if name.startswith("power"):
            return Decimal(str(round(kw * (1000 if spec.unit == "W" else 1), 3)))
        if name == "frequency":
            return Decimal("50.0")
        if name == "clock":
            return Decimal(int(t.timestamp() + self.faults.clock_drift_s))
        if name == "import_wh_total":
            return self.energy(t)["1.8.0"] + self.faults.counter_offset.get("1.8.0", 0)
        for probe in self.rmap.probes:
            if probe.name == name:
                return probe.min
        return Decimal(0)

    def read(self, function: str, address: int, count: int) -> list[int] | int:
        """Register words for a read request, or a Modbus exception code."""
        self.requests += 1
        if self.faults.exception is not None:
            return self.faults.exception
        if not 1 <= count <= 125:
            return ILLEGAL_VALUE
        end = address + count
        words = [0] * count
        hit = False
        t = self.clock.now()
        for spec in self._served:
            if spec.function != function or spec.end <= address or spec.address >= end:
                continue
            if spec.address < address or spec.end > end:
                return ILLEGAL_ADDRESS  # a request that splits a value
            hit = True
            words[spec.address - address : spec.end - address] = spec.encode(self.value(spec, t))
        return words if hit else ILLEGAL_ADDRESS


def _pdu_for(meter: SimMeter | None, pdu: bytes) -> bytes | None:
    """The response PDU for a request PDU; None means stay silent."""
    if meter is None:
        return None
    fn = pdu[0]
    if fn not in (3, 4) or len(pdu) != 5:
        return bytes([fn | 0x80, ILLEGAL_FUNCTION])
    address, count = struct.unpack(">HH", pdu[1:5])
    got = meter.read("holding" if fn == 3 else "input", address, count)
    if isinstance(got, int):
        return bytes([fn | 0x80, got])
    return bytes([fn, 2 * count]) + struct.pack(f">{count}H", *got)


# --- the TCP fleet ---------------------------------------------------------


class ModbusTcpFleet:
    """Many meters behind unit ids on one or more TCP ports, served from one thread.

    Start it with `start()` (a background thread with its own event loop, for
    tests) or `serve_forever()` (the CLI). Meters are keyed by (port, unit).
    """

    def __init__(self, meters: dict[tuple[int, int], SimMeter], host: str = "127.0.0.1"):
        self.meters = meters
        self.host = host
        self.ports = sorted({p for p, _ in meters})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()

    async def _handle(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _pid, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                meter = self.meters.get((port, unit))
                if meter is None:
                    resp: bytes | None = bytes([pdu[0] | 0x80, GATEWAY_TARGET_FAILED])
                else:
                    f = meter.faults
                    if f.no_answer:
                        meter.requests += 1
                        continue
                    if f.slow_s:
                        await asyncio.sleep(f.slow_s)
                    if f.garbage or f.bad_crc:  # TCP has no CRC: a corrupt frame stands for both
                        meter.requests += 1
                        writer.write(bytes(random.getrandbits(8) for _ in range(9)))
                        await writer.drain()
                        continue
                    resp = _pdu_for(meter, pdu)
                if resp is None:
                    continue
                writer.write(struct.pack(">HHHB", tid, 0, len(resp) + 1, unit) + resp)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _serve(self, announce: str | None = None) -> None:
        self._stop = asyncio.Event()
        servers = []
        for port in self.ports:
            servers.append(
                await asyncio.start_server(
                    functools.partial(self._handle, port), self.host, port, backlog=1024
                )
            )
        self._ready.set()
        if announce:
            print(announce, flush=True)  # only once every port listens
        await self._stop.wait()
        for s in servers:
            s.close()
        for t in list(self._tasks):  # end open connections before the loop goes away
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in servers:
            await s.wait_closed()

    def start(self) -> ModbusTcpFleet:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="modbus-tcp-fleet", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Modbus TCP fleet did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(5)

    def serve_forever(self, announce: str | None = None) -> None:
        asyncio.run(self._serve(announce))

    def __enter__(self) -> ModbusTcpFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- an RTU bus on a pseudo-terminal ----------------------------------------


class ModbusRtuBus:
    """Meters sharing one RS-485 line (a PtyLine), answering like RTU slaves.

    A request frame ends after 3.5 character times of silence; a frame with a
    bad CRC or for an absent unit gets no answer, as on a real bus.
    """

    def __init__(
        self, meters: Iterable[SimMeter], baudrate: int = 9600, parity: str = "N",
        stopbits: float = 1, turnaround_s: float = 0.0,
    ):
        self.meters = {m.unit: m for m in meters}
        self.line = PtyLine(baudrate=baudrate, parity=parity, stopbits=stopbits)
        self.device = self.line.device
        self.turnaround_s = turnaround_s
        self.frames_bad = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def gap_s(self) -> float:
        """Modbus RTU t3.5 (fixed 1.75 ms above 19200 baud)."""
        return 3.5 * self.line.char_time if self.line.baudrate <= 19200 else 0.00175

    def _serve(self) -> None:
        while not self._stop.is_set():
            frame = self.line.read_until_silence(self.gap_s, timeout=0.1)
            if not frame:
                continue
            if len(frame) < 4 or crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                self.frames_bad += 1
                continue
            unit, pdu = frame[0], frame[1:-2]
            meter = self.meters.get(unit)
            if meter is None:
                continue
            f = meter.faults
            if f.no_answer:
                meter.requests += 1
                continue
            delay = self.turnaround_s + f.slow_s
            if delay:
                time.sleep(delay)
            if f.garbage:
                meter.requests += 1
                self.line.write(bytes(random.getrandbits(8) for _ in range(7)))
                continue
            resp = _pdu_for(meter, pdu)
            if resp is None:
                continue
            out = with_crc(bytes([unit]) + resp)
            if f.bad_crc:
                out = out[:-2] + bytes([out[-2] ^ 0xFF, out[-1]])
            self.line.write(out)

    def start(self) -> ModbusRtuBus:
        self._thread = threading.Thread(target=self._serve, name="modbus-rtu-bus", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.line.close()

    def __enter__(self) -> ModbusRtuBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- fleets and their inventories --------------------------------------------


def build_tcp_fleet(
    meters: int, units_per_port: int, base_port: int, preset: str = "generic_counter",
    seed: int = 1, clock: SimClock | None = None, profiles: int = 0,
) -> ModbusTcpFleet:
    """meters spread over ports base_port.. with units 1..units_per_port on each.

    profiles > 0 shares that many load profiles round-robin between the meters:
    a model builds its counters' history from 2024 on first use (a tenth of a
    second each), which a thousand-meter benchmark need not pay a thousand times.
    """
    rmap = load_register_map(preset)
    clock = clock or SimClock(datetime.now(UTC), 1.0)
    shared = [ConsumptionModel(seed + k) for k in range(profiles)]
    fleet: dict[tuple[int, int], SimMeter] = {}
    for i in range(meters):
        port, unit = base_port + i // units_per_port, 1 + i % units_per_port
        model = shared[i % profiles] if profiles else None
        fleet[(port, unit)] = SimMeter(unit, rmap, clock, seed=seed + (i % profiles if profiles else i), model=model)
    return ModbusTcpFleet(fleet)


def inventory_toml(
    fleet: dict[tuple[int, int], SimMeter], preset: str, host: str = "127.0.0.1",
    registers: Iterable[str] = ("1.8.0",), interval: str = "30m", timeout: float = 1.0,
    adapter: str = "modbus_tcp", device: str | None = None,
) -> str:
    """An inventory for a simulated fleet: one subscriber per meter."""
    regs = ", ".join(f'"{r}"' for r in registers)
    out = []
    for n, (port, unit) in enumerate(sorted(fleet), start=1):
        mid = f"sim-{port}-{unit}" if adapter == "modbus_tcp" else f"sim-rtu-{unit}"
        where = f'host = "{host}"\nport = {port}' if adapter == "modbus_tcp" else f'port = "{device}"'
        out.append(
            f'[[subscriber]]\naccount = "{900000 + n}"\nplan = "three_zone"\n\n'
            f'[[meter]]\nid = "{mid}"\naccount = "{900000 + n}"\nadapter = "{adapter}"\n'
            f'preset = "{preset}"\n{where}\nunit = {unit}\ninterval = "{interval}"\n'
            f"timeout = {timeout}\nregisters = [{regs}]\n"
        )
    return "\n".join(out)


def _parse_fault(text: str) -> tuple[int, str, float | None]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"fault {text!r}: use UNIT:KIND or UNIT:KIND:VALUE")
    value = float(parts[2]) if len(parts) == 3 else None
    if parts[1] not in FAULTS:
        raise argparse.ArgumentTypeError(f"fault {text!r}: kind must be one of {', '.join(FAULTS)}")
    return int(parts[0]), parts[1], value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.modbus_sim",
        description=(
            "Simulated Modbus meters driven by the household consumption model: a TCP fleet "
            "(many meters behind unit ids and ports) or an RTU bus on a pseudo-terminal with "
            "real line timing. Faults are injected per unit with --fault UNIT:KIND[:VALUE]; "
            f"kinds: {', '.join(FAULTS)}."
        ),
    )
    parser.add_argument("--preset", default="generic_counter", help="register map of every meter")
    parser.add_argument("--seed", type=int, default=1, help="consumption model seed of the first meter")
    parser.add_argument("--scale", type=float, default=1.0, help="simulated seconds per wall second")
    parser.add_argument("--fault", action="append", type=_parse_fault, default=[],
                        help="UNIT:KIND[:VALUE], e.g. 3:no_answer, 2:exception:4, 5:slow:1.5")
    parser.add_argument("--inventory-out", type=Path, help="write an inventory TOML for these meters")
    parser.add_argument("--registers", default="1.8.0", help="comma-separated OBIS registers for the inventory")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    tcp = sub.add_parser("tcp", help="a Modbus TCP fleet")
    tcp.add_argument("--host", default="127.0.0.1")
    tcp.add_argument("--base-port", type=int, default=15020)
    tcp.add_argument("--meters", type=int, default=10)
    tcp.add_argument("--units-per-port", type=int, default=10)
    tcp.add_argument("--profiles", type=int, default=0,
                     help="share this many load profiles between the meters (0: one each); starts faster")
    rtu = sub.add_parser("rtu", help="an RTU bus on a pseudo-terminal (prints the device path)")
    rtu.add_argument("--units", default="1", help="comma-separated unit ids on the bus")
    rtu.add_argument("--baudrate", type=int, default=9600)
    args = parser.parse_args(argv)

    clock = SimClock(datetime.now(UTC), args.scale)
    regs = [r.strip() for r in args.registers.split(",") if r.strip()]
    if args.mode == "tcp":
        fleet = build_tcp_fleet(
            args.meters, args.units_per_port, args.base_port, args.preset, args.seed, clock, args.profiles
        )
        for unit, kind, value in args.fault:
            for (_p, u), m in fleet.meters.items():
                if u == unit:
                    m.inject(kind, value)
        if args.inventory_out:
            args.inventory_out.write_text(inventory_toml(fleet.meters, args.preset, args.host, regs))
        try:
            fleet.serve_forever(f"modbus tcp fleet: {args.meters} meters on {args.host}:{fleet.ports[0]}..{fleet.ports[-1]}")
        except KeyboardInterrupt:
            pass
        return 0
    rmap = load_register_map(args.preset)
    units = [int(u) for u in args.units.split(",")]
    meters = [SimMeter(u, rmap, clock, seed=args.seed + i) for i, u in enumerate(units)]
    for unit, kind, value in args.fault:
        for m in meters:
            if m.unit == unit:
                m.inject(kind, value)
    bus = ModbusRtuBus(meters, baudrate=args.baudrate)
    if args.inventory_out:
        args.inventory_out.write_text(
            inventory_toml({(0, m.unit): m for m in meters}, args.preset, registers=regs,
                           adapter="modbus_rtu", device=bus.device)
        )
    print(f"modbus rtu bus: units {units} at {args.baudrate} baud on {bus.device}", flush=True)
    bus.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    bus.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
