"""DLMS meters on one serial port are one bus of the scheduler, like Modbus RTU, IEC and Mercury.

Meters sharing an RS-485 line must be read one after another, and a serial
bus must not wait for the TCP reads' concurrency bound (`tcp_concurrency`),
which is about sockets in flight, not about lines. A DLMS meter behind a TCP
converter (`host` + `tcp_port`) is grouped by its converter, the same rule as
a Mercury behind one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from adapters.dlms import DlmsAdapter
from adapters.modbus import ModbusAdapter
from adapters.reading import Reading, Rejected
from amr.settings import Settings
from collector.gateway.scheduler import Scheduler
from collector.inventory import Meter
from simulators.dlms_sim import HdlcMeterLine, SimMeter

T0 = datetime(2026, 11, 10, 0, 0, tzinfo=UTC)
HALF = timedelta(minutes=30)
TARIFFS = ("1.8.0", "1.8.1")


@dataclass
class Frozen:
    t: datetime

    def now(self) -> datetime:
        return self.t


class ListSink:
    def __init__(self) -> None:
        self.items: list[Reading | Rejected] = []

    def put(self, items: list[Reading | Rejected]) -> None:
        self.items.extend(items)


def _dlms(meter_id: str, **keys: Any) -> Meter:
    base: dict[str, Any] = {"id": meter_id, "account": "1", "adapter": "dlms", "password": "12345678",
                            "registers": TARIFFS, "timeout": 1.0, "interval": "30m"}
    return Meter(**(base | keys))


class HoldingEndpoint:
    """A Modbus TCP endpoint that answers its first request only when `release` is true (or after 15 s),
    and then with an exception, so the meter is missed.

    While it holds the only TCP read slot, it notes whether `release` came true:
    that is, whether the serial bus went on without a TCP slot.
    """

    def __init__(self, release: Any) -> None:
        self.release = release
        self.released_while_held: bool | None = None
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._srv.settimeout(15)
        try:
            conn, _ = self._srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(15)
            try:
                request = conn.recv(260)
            except OSError:
                return
            deadline = time.monotonic() + 15
            while not self.release() and time.monotonic() < deadline and not self._done.is_set():
                self._done.wait(0.05)
            self.released_while_held = bool(self.release())
            if len(request) >= 8:  # a Modbus exception (illegal data address) ends the held read at once
                try:
                    conn.sendall(request[:4] + b"\x00\x03" + request[6:7] + bytes((request[7] | 0x80, 0x02)))
                    conn.recv(260)
                except OSError:
                    pass
        self._srv.close()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=20)
        try:
            self._srv.close()
        except OSError:
            pass


def test_two_dlms_meters_on_one_line_are_one_bus_not_held_by_the_tcp_bound() -> None:
    clock = Frozen(T0 + HALF - timedelta(seconds=3))  # the slot is nearly over: no retries in the test
    sims = [SimMeter(17, "12345678", seed=31, now=clock.now), SimMeter(18, "12345678", seed=32, now=clock.now)]
    dlms = DlmsAdapter(Settings(), clock_tolerance_s=60, now=clock.now)
    modbus = ModbusAdapter(Settings(), clock_tolerance_s=60)
    sched: Scheduler | None = None

    def both_read() -> bool:
        return sched is not None and all(sched.state[f"d{s.physical_address}"].reads >= 1 for s in sims)

    holder = HoldingEndpoint(both_read)
    try:
        with HdlcMeterLine(sims, 9600) as line:
            tcp = Meter(id="tcp1", account="1", adapter="modbus_tcp", preset="generic_counter", host="127.0.0.1",
                        port=holder.port, unit=1, timeout=20.0, interval="30m")
            meters = [tcp] + [_dlms(f"d{s.physical_address}", port=line.device, physical_address=s.physical_address)
                              for s in sims]
            sink = ListSink()
            sched = Scheduler(meters, lambda m: dlms if m.adapter == "dlms" else modbus, sink, jitter_s=0,
                              tcp_concurrency=1, retry_delay_s=3600, now=clock.now)
            # the TCP meter is first: it takes the only TCP slot and holds it until both DLMS meters are read
            endpoints, buses = sched._lanes(meters)
            assert buses == {line.device: meters[1:]} and list(endpoints) == [f"127.0.0.1:{holder.port}"]

            async def slot() -> Any:
                try:
                    return await sched.run_slot(meters, T0, HALF)
                finally:
                    await modbus.close()

            report = asyncio.run(slot())
        holder.stop()
        assert holder.released_while_held is True, "the DLMS line waited for the TCP read slot"
        assert sorted(report.read) == ["d17", "d18"] and "tcp1" in report.missed
        got = {(r.meter_id, r.register): r.value for r in sink.items if isinstance(r, Reading)}
        want = {(f"d{s.physical_address}", reg): Decimal(s.register_raw(reg, clock.t)) * 10 / 1000
                for s in sims for reg in TARIFFS}
        assert got == want  # each meter answered for itself: no mixed-up frames on the shared line
        assert want[("d17", "1.8.0")] != want[("d18", "1.8.0")]
    finally:
        holder.stop()
        dlms.close_blocking()


def test_dlms_behind_a_converter_is_grouped_by_the_converter_like_mercury() -> None:
    conv = {"host": "10.0.0.5", "tcp_port": 4001}
    meters = [
        _dlms("a", physical_address=17, **conv),
        _dlms("b", physical_address=18, **conv),
        Meter(id="m", account="1", adapter="mercury230", address="5", registers=("1.8.0",), **conv),
        _dlms("c", physical_address=17, port="/dev/ttyUSB1"),
        _dlms("d", physical_address=18, port="/dev/ttyUSB1"),
    ]
    sched = Scheduler(meters, lambda m: DlmsAdapter(Settings()), ListSink(), jitter_s=0)
    endpoints, buses = sched._lanes(meters)
    assert endpoints == {}
    assert {k: [m.id for m in v] for k, v in buses.items()} == {"10.0.0.5:4001": ["a", "b", "m"],
                                                               "/dev/ttyUSB1": ["c", "d"]}


def test_dlms_over_the_tcp_wrapper_without_a_port_is_a_bus_per_host() -> None:
    """No tcp_port: the adapter connects to 4059, so meters on two hosts are two lines, each named by it."""
    meters = [_dlms("e", physical_address=17, host="10.0.0.7"), _dlms("f", physical_address=17, host="10.0.0.8"),
              _dlms("g", physical_address=18, host="10.0.0.8", tcp_port=4059)]
    sched = Scheduler(meters, lambda m: DlmsAdapter(Settings()), ListSink(), jitter_s=0)
    _, buses = sched._lanes(meters)
    assert {k: [m.id for m in v] for k, v in buses.items()} == {"10.0.0.7:4059": ["e"], "10.0.0.8:4059": ["f", "g"]}
