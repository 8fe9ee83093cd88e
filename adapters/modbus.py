"""Modbus TCP and RTU meter reading on pymodbus (async), driven by register maps.

One link per TCP endpoint (host:port), serial port, or RS-485-to-Ethernet
converter (a `modbus_rtu` meter with `host` and `tcp_port`: RTU frames with
their CRC over a TCP socket, what mbmd calls `--rtu`), shared by every meter
behind it; requests on a link go one at a time, and on a serial link the
inter-frame gap (t3.5) and the meter's pause are kept between requests.
A failed request becomes a `PollError` whose outcome word says what went
wrong on the wire (timeout, crc, garbage, exception, decode, refused) and
whose message names the meter, the bus, the unit and the register block, so
an operator reading one log line knows where to look.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from adapters import quality
from adapters.base import AdapterSettings, ModbusMeter, PollError
from adapters.reading import Reading
from adapters.registermap import (
    DecodeError,
    RegisterMap,
    RegisterMapError,
    RegisterSpec,
    Request,
    load_register_map,
    plan_requests,
)
from amr import metrics

log = logging.getLogger(__name__)
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we report every failure ourselves

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge", 6: "server device busy",
    8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def _crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


async def _until(deadline: float) -> None:
    """Wait until a monotonic instant to within a few tens of microseconds.

    The event loop's timers wake up to a millisecond late (epoll rounds up),
    which at 9600 baud is a tenth of a short frame exchange per request; the
    last millisecond is spent yielding to the loop instead.
    """
    left = deadline - time.monotonic()
    if left > 0.0015:
        await asyncio.sleep(left - 0.0015)
    while time.monotonic() < deadline:
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class Value:
    """One decoded value, for `amr poll` and for readings."""

    key: str  # OBIS register or name
    value: Decimal
    unit: str
    ts: datetime  # when the answer arrived (our clock, UTC)
    obis: bool


@dataclass
class _Link:
    """One TCP connection or serial port and the one-at-a-time discipline on it."""

    kind: str  # tcp | rtu | rtu_tcp (RTU frames through a TCP converter)
    bus: str
    client: Any
    gap_s: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rx: bytearray = field(default_factory=bytearray)
    quiet_at: float = 0.0  # monotonic time before which no request may start
    rx_at: float = 0.0  # when the last bytes arrived
    requests: Any = None  # the bus's request counter
    connected: bool = False

    def trace(self, sending: bool, data: bytes) -> bytes:
        # the transport hands over its whole unconsumed buffer each time: keep the longest
        if not sending:
            self.rx_at = time.monotonic()
            if len(data) > len(self.rx):
                self.rx[:] = data
        return data


def rtu_converter(meter: ModbusMeter) -> tuple[str, int] | None:
    """(host, tcp_port) of a Modbus RTU meter behind a transparent RS-485-to-Ethernet converter,
    or None for one on a serial port.

    The inventory's convention for every serial protocol (IEC 62056-21, DLMS too): `host` and
    `tcp_port` instead of a serial `port`. Read by name: a meter on a serial port need not have them.
    """
    host, tcp_port = getattr(meter, "host", None), getattr(meter, "tcp_port", None)
    return (str(host), int(tcp_port)) if meter.adapter == "modbus_rtu" and host and tcp_port is not None else None


def _serial_settings(meter: ModbusMeter) -> tuple[int, str, int]:
    """Baud rate, parity and stop bits of a meter's serial line (8 data bits; 8N1 by default)."""
    return int(meter.baudrate or 9600), meter.parity or "N", 1


class ModbusAdapter:
    """Reads meters whose adapter is modbus_tcp or modbus_rtu.

    settings are given, never looked up: clock_tolerance_s, when given, stands
    for their clock_skew_tolerance_s. base_dir resolves preset paths written
    relative to the inventory file.
    """

    def __init__(
        self,
        settings: AdapterSettings,
        base_dir: Path | None = None,
        now: Callable[[], datetime] | None = None,
        clock_tolerance_s: float | None = None,
    ) -> None:
        if clock_tolerance_s is None:
            clock_tolerance_s = float(settings.clock_skew_tolerance_s)
        self.clock_tolerance_s = clock_tolerance_s
        self.base_dir = base_dir
        self.now = now or (lambda: datetime.now(UTC))
        self._maps: dict[str, RegisterMap] = {}
        # (preset, keys or None for all, max_request) -> the requests that read them
        self._plans: dict[tuple[str | None, tuple[str, ...] | None, int], list[Request]] = {}
        # ("tcp", host, port) or ("rtu", serial port) -> the link
        self._links: dict[tuple[str | int | None, ...], _Link] = {}

    # --- register maps ---------------------------------------------------

    def register_map(self, meter: ModbusMeter) -> RegisterMap:
        ref = meter.preset or ""
        rmap = self._maps.get(ref)
        if rmap is None:
            rmap = self._maps[ref] = load_register_map(ref, self.base_dir)
        return rmap

    def plan(self, meter: ModbusMeter, keys: Iterable[str] | None = None) -> list[Request]:
        """The requests that read the meter's registers (keys None: every value of the map)."""
        ck = (meter.preset, None if keys is None else tuple(keys), meter.max_request)
        got = self._plans.get(ck)
        if got is None:
            got = self._plans[ck] = self._plan(meter, keys)
        return got

    def _plan(self, meter: ModbusMeter, keys: Iterable[str] | None) -> list[Request]:
        rmap = self.register_map(meter)
        specs = rmap.select(keys)
        clock = rmap.get("clock")  # read along to flag clock skew
        if clock is not None and clock not in specs:
            specs = (*specs, clock)
        return plan_requests(specs, min(meter.max_request, rmap.max_request), rmap.max_gap)

    def forget_maps(self) -> None:
        """Drop cached presets and request plans (after a reload: the files may have changed)."""
        self._maps.clear()
        self._plans.clear()

    def use_maps(self, maps: Mapping[str, RegisterMap]) -> None:
        """Take the presets the daemon loaded (once, with the inventory) instead of reading
        their files again; request plans are made afresh from them."""
        self._maps = dict(maps)
        self._plans.clear()

    # --- links -----------------------------------------------------------

    def _link(self, meter: ModbusMeter) -> _Link:
        key: tuple[str | int | None, ...]
        if meter.adapter == "modbus_tcp":
            key = ("tcp", meter.host, int(meter.port or 502))
        elif meter.adapter == "modbus_rtu":
            conv = rtu_converter(meter)
            key = ("rtu_tcp", *conv) if conv else ("rtu", str(meter.port))
        else:
            raise ValueError(f"meter {meter.id}: adapter {meter.adapter!r} is not Modbus")
        link = self._links.get(key)
        if link is not None:
            return link
        if meter.adapter == "modbus_tcp":
            if not meter.host:  # the inventory check refuses such a meter before any poll
                raise PollError("refused", f"meter {meter.id}: key 'host': a Modbus TCP meter needs a host")
            link = _Link("tcp", meter.bus_name, None)
            link.client = AsyncModbusTcpClient(
                meter.host, port=int(meter.port or 502), timeout=meter.timeout, retries=0, reconnect_delay=0,
                trace_packet=link.trace,
            )
        elif (conv := rtu_converter(meter)) is not None:
            # the converter puts the frames on its line as they come: the t3.5 gap between a
            # request and the previous answer is still ours to keep, at the line's rate
            baud, parity, stop = _serial_settings(meter)
            char = (1 + 8 + (parity != "N") + stop) / baud
            link = _Link("rtu_tcp", meter.bus_name, None, gap_s=3.5 * char if baud <= 19200 else 0.00175)
            link.client = AsyncModbusTcpClient(
                conv[0], port=conv[1], framer=FramerType.RTU, timeout=meter.timeout, retries=0, reconnect_delay=0,
                trace_packet=link.trace,
            )
        else:
            baud, parity, stop = _serial_settings(meter)
            char = (1 + 8 + (parity != "N") + stop) / baud
            link = _Link("rtu", meter.bus_name, None, gap_s=3.5 * char if baud <= 19200 else 0.00175)
            link.client = AsyncModbusSerialClient(
                str(meter.port), baudrate=baud, parity=parity, stopbits=stop, bytesize=8, timeout=meter.timeout,
                retries=0, reconnect_delay=0, trace_packet=link.trace,
            )
        link.requests = metrics.MODBUS_REQUESTS.labels(link.bus)
        self._links[key] = link
        return link

    async def _drop(self, link: _Link) -> None:
        link.client.close()
        link.connected = False

    async def _connect(self, link: _Link, meter: ModbusMeter) -> None:
        if link.connected and link.client.connected:
            return
        link.client.comm_params.timeout_connect = meter.timeout
        try:
            ok = await asyncio.wait_for(link.client.connect(), meter.timeout + 1)
        except (TimeoutError, OSError, ConnectionException):
            ok = False
        if not ok:
            link.client.close()
            where = "open serial port" if link.kind == "rtu" else "connect"
            raise PollError("refused", f"meter {meter.id} on bus {link.bus}: cannot {where}")
        link.connected = True

    async def request(
        self, meter: ModbusMeter, function: str, address: int, count: int, unit: int | None = None
    ) -> list[int]:
        """One read request on the meter's link; raises PollError naming what failed."""
        link = self._link(meter)
        unit = meter.unit if unit is None else unit
        where = f"meter {meter.id} on bus {link.bus} unit {unit}: {function} {address}+{count}"
        async with link.lock:
            await self._connect(link, meter)
            await _until(link.quiet_at)
            link.rx.clear()
            link.client.ctx.comm_params.timeout_connect = meter.timeout
            read = (
                link.client.read_input_registers if function == "input" else link.client.read_holding_registers
            )
            link.requests.inc()
            try:
                async with asyncio.timeout(meter.timeout + 0.5):  # pymodbus times out first; this is a backstop
                    resp = await read(address, count=count, device_id=unit)
            except (TimeoutError, ModbusException, OSError) as exc:
                outcome, why = self._classify(link, exc, unit, 4 if function == "input" else 3)
                if link.kind != "rtu" and outcome in ("timeout", "garbage", "refused"):
                    await self._drop(link)  # a late or corrupt answer must not reach the next request
                raise PollError(outcome, f"{where}: {why}") from None
            finally:
                # t3.5 counts from the end of the answer (or from now, when none came)
                last = link.rx_at if link.rx else time.monotonic()
                link.quiet_at = last + link.gap_s + float(meter.pause)
        if resp.isError():
            code = getattr(resp, "exception_code", 0)
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise PollError("exception", f"{where}: Modbus exception {code} ({name})")
        regs = list(resp.registers)
        if len(regs) != count:
            # A longer block is not "the registers and some more": the meter (or a gateway
            # in between) answered another request, or its firmware lays the map out
            # differently, and which words hold our values is a guess. Refused like any
            # undecodable answer, with the words as they came.
            raise PollError(
                "decode",
                f"meter {meter.id} on bus {link.bus} unit {unit}: asked {function} "
                f"{address}..{address + count - 1} ({count} registers), got {len(regs)}",
                raw=b"".join((w & 0xFFFF).to_bytes(2, "big") for w in regs),
                source=f"{meter.adapter}:{link.bus}/{unit}",
            )
        return regs

    def _classify(self, link: _Link, exc: BaseException, unit: int | None, fn: int) -> tuple[str, str]:
        """Name a failed request by what arrived: nothing, a frame with a bad CRC, or noise."""
        if isinstance(exc, ConnectionException) or (isinstance(exc, OSError) and not link.rx):
            return "refused", f"connection lost ({exc})"
        rx = bytes(link.rx)
        if not rx:
            return "timeout", "no answer within the timeout"
        if link.kind in ("rtu", "rtu_tcp") and len(rx) >= 5 and rx[0] == unit:
            size = 5 + rx[2] if rx[1] == fn else 5 if rx[1] == fn | 0x80 else 0
            if size and len(rx) >= size and _crc16(rx[: size - 2]) != int.from_bytes(rx[size - 2 : size], "little"):
                return "crc", f"bad CRC in a {size}-byte answer {rx[:size].hex()}"
        return "garbage", f"unparseable answer {rx[:16].hex()} ({len(rx)} bytes)"

    # --- reading a meter ---------------------------------------------------

    async def read_values(self, meter: ModbusMeter, keys: Iterable[str] | None = None) -> list[Value]:
        """Every value of the selected registers, decoded; raises PollError on any failure."""
        try:
            requests = self.plan(meter, keys)
        except RegisterMapError as exc:
            raise PollError("decode", f"meter {meter.id}: preset {meter.preset!r}: {exc}") from None
        except KeyError as exc:
            raise PollError("decode", f"meter {meter.id}: preset {meter.preset!r} has no register {exc}") from None
        out: list[Value] = []
        for req in requests:
            words = await self.request(meter, req.function, req.address, req.count)
            ts = self.now()
            try:
                decoded = req.values(words)
            except DecodeError as exc:
                bus = self._link(meter).bus
                raise PollError(
                    "decode", f"meter {meter.id} on bus {bus} unit {meter.unit}: {exc}",
                    # the words as received, so the refusal can be kept with its raw bytes
                    raw=b"".join(w.to_bytes(2, "big") for w in words),
                    source=f"{meter.adapter}:{bus}/{meter.unit}",
                ) from None
            for spec in req.registers:
                out.append(Value(spec.key, decoded[spec.key], spec.unit, ts, spec.obis is not None))
        return out

    async def read(self, meter: ModbusMeter) -> list[Reading]:
        """The meter's configured OBIS registers as readings (cumulative kWh)."""
        rmap = self.register_map(meter)
        wanted = [k for k in meter.registers if rmap.get(k) is not None]
        if not wanted:
            raise PollError("decode", f"meter {meter.id}: preset {meter.preset!r} has none of {list(meter.registers)}")
        values = await self.read_values(meter, wanted)
        flags: set[str] = set()
        clock = next((v for v in values if v.key == "clock"), None)
        if clock is not None:
            skew = float(clock.value) - clock.ts.timestamp()
            if abs(skew) > self.clock_tolerance_s:
                flags.add(quality.CLOCK_SKEW)
        source = f"{meter.adapter}:{self._link(meter).bus}/{meter.unit}"
        return [
            Reading(meter.id, v.key, v.ts, v.value, frozenset(flags), source)
            for v in values
            if v.obis and v.key in wanted
        ]

    async def probe(self, meter: ModbusMeter, spec: RegisterSpec, unit: int) -> Decimal:
        """One value at a unit id (for `amr scan`)."""
        words = await self.request(meter, spec.function, spec.address, spec.words, unit=unit)
        try:
            return spec.decode(words[: spec.words])
        except DecodeError as exc:
            raise PollError("decode", f"unit {unit}: {exc}") from None

    async def close(self) -> None:
        for link in self._links.values():
            link.client.close()
        self._links.clear()
