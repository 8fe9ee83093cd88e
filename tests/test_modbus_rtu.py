"""Modbus RTU: the adapter and scheduler against simulated meters on a paced pseudo-terminal."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from adapters.base import PollError
from adapters.modbus import ModbusAdapter
from adapters.reading import Reading, Rejected
from adapters.registermap import load_register_map
from amr.settings import Settings
from collector.gateway.scheduler import Scheduler
from collector.inventory import Meter
from simulators.consumption import SimClock
from simulators.modbus_sim import ModbusRtuBus, SimMeter

T0 = datetime(2026, 3, 1, 9, 15, tzinfo=UTC)
FROZEN = SimClock(T0, 0.0)


def rtu_meter(device: str, unit: int, preset: str = "eastron_sdm120", **kw) -> Meter:
    return Meter(
        id=kw.pop("id", f"r{unit}"), account="1", adapter="modbus_rtu", preset=preset, port=device,
        unit=unit, baudrate=9600, timeout=kw.pop("timeout", 1.0), registers=kw.pop("registers", ("1.8.0", "2.8.0")),
        **kw,
    )


@pytest.fixture
def bus():
    meters = [
        SimMeter(1, load_register_map("eastron_sdm120"), FROZEN, seed=1),
        SimMeter(2, load_register_map("eastron_sdm630"), FROZEN, seed=2),
        SimMeter(3, load_register_map("generic_counter"), FROZEN, seed=3),
    ]
    with ModbusRtuBus(meters, baudrate=9600) as b:
        yield b


def test_values_on_a_shared_bus_equal_the_model(bus: ModbusRtuBus) -> None:
    ms = [
        rtu_meter(bus.device, 1),
        rtu_meter(bus.device, 2, "eastron_sdm630"),
        rtu_meter(bus.device, 3, "generic_counter", registers=("1.8.0", "1.8.1", "1.8.2", "1.8.3")),
    ]

    async def go() -> list[list[Reading]]:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            return [await adapter.read(m) for m in ms]
        finally:
            await adapter.close()

    t = time.perf_counter()
    results = asyncio.run(go())
    elapsed = time.perf_counter() - t
    for m, readings in zip(ms, results, strict=True):
        model = bus.meters[m.unit].model
        for r in readings:
            expected = model.energy_kwh(T0, r.register)
            assert abs(r.value - expected) <= max(expected, Decimal(1)) * Decimal("1e-7"), (m.id, r.register)
        assert {r.register for r in readings} == set(m.registers)
    assert bus.frames_bad == 0  # the inter-frame gap kept every request a frame of its own
    # frames take their line time: three requests and answers at 9600 baud cannot be instant
    assert elapsed > 3 * (8 + 9) * 10 / 9600


@pytest.mark.parametrize(
    ("fault", "arg", "outcome", "words"),
    [
        ("bad_crc", None, "crc", "bad CRC"),
        ("garbage", None, "garbage", "unparseable answer"),
        ("no_answer", None, "timeout", "no answer within the timeout"),
        ("exception", 4, "exception", "Modbus exception 4 (server device failure)"),
    ],
)
def test_each_fault_is_named_and_the_bus_recovers(
    bus: ModbusRtuBus, fault: str, arg: float | None, outcome: str, words: str
) -> None:
    bus.meters[2].inject(fault, arg)

    async def go() -> tuple[PollError, list[Reading]]:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            with pytest.raises(PollError) as err:
                await adapter.read(rtu_meter(bus.device, 2, "eastron_sdm630", id="faulty", timeout=0.25))
            return err.value, await adapter.read(rtu_meter(bus.device, 1))
        finally:
            await adapter.close()

    err, good = asyncio.run(go())
    assert err.outcome == outcome, str(err)
    assert f"meter faulty on bus {bus.device} unit 2" in str(err) and words in str(err)
    expected = bus.meters[1].model.energy_kwh(T0, "1.8.0")
    assert abs(good[0].value - expected) <= expected * Decimal("1e-7")


class ListSink:
    def __init__(self) -> None:
        self.items: list[Reading | Rejected] = []

    def put(self, items: list[Reading | Rejected]) -> None:
        self.items.extend(items)


def test_a_dead_meter_costs_the_bus_only_its_timeout(bus: ModbusRtuBus) -> None:
    """Three slots of a 1 s interval: the live meters are read in every slot, the dead
    one is a missed slot each time and is backed off after its failures."""
    bus.meters[2].inject("no_answer")
    ms = [
        rtu_meter(bus.device, 1, interval="1s"),
        rtu_meter(bus.device, 2, "eastron_sdm630", interval="1s", id="dead", timeout=0.25),
        rtu_meter(bus.device, 3, "generic_counter", interval="1s"),
    ]
    sink = ListSink()
    adapter = ModbusAdapter(Settings(), clock_tolerance_s=10**9)

    async def go() -> Scheduler:
        sched = Scheduler(
            ms, lambda m: adapter, sink, jitter_s=0.0, retry_delay_s=0.1, backoff_after=2,
            backoff_base_s=5.0,
        )
        try:
            await sched.run(cycles=3)
        finally:
            await adapter.close()
        return sched

    sched = asyncio.run(go())
    assert len(sched.reports) == 3
    for report in sched.reports:
        assert sorted(report.read) == ["r1", "r3"]
        assert list(report.missed) == ["dead"]
        assert not report.overrun
    first = sched.reports[0]
    # the first pass read the live meters before any retry of the dead one
    assert all(e[0] == "dead" and e[1] == "timeout" for e in first.errors)
    assert 1 <= len(first.errors) <= 2  # then it backed off: no more of the bus's time
    assert "backed off" in sched.reports[-1].missed["dead"]
    assert sched.state["dead"].backoff_s == 5.0
    slots = {r.ts for r in sink.items}
    assert len(slots) == 3 and all(ts.microsecond == 0 for ts in slots)  # snapped to the slots
    assert {r.meter_id for r in sink.items} == {"r1", "r3"}
    assert all(s2 - s1 == timedelta(seconds=1) for s1, s2 in zip(sorted(slots), sorted(slots)[1:], strict=False))


def test_scan_on_a_serial_bus_lists_who_answers(bus: ModbusRtuBus) -> None:
    from collector.commands.poll import scan

    found = asyncio.run(scan(host=None, port=502, device=bus.device, baudrate=9600, units=[1, 2, 3, 4], timeout=0.2))
    assert [f["unit"] for f in found] == [1, 2, 3]
    assert [f["presets"][0] for f in found] == ["eastron_sdm120", "eastron_sdm630", "generic_counter"]
    # the silent unit costs one timeout, not one per preset probed (there are more than a dozen presets)
    t = time.perf_counter()
    assert asyncio.run(scan(host=None, port=502, device=bus.device, baudrate=9600, units=[4], timeout=0.2)) == []
    assert time.perf_counter() - t < 5 * 0.2


def test_the_simulator_cli_serves_an_rtu_bus_that_amr_poll_reads(tmp_path, capsys) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    from amr.cli import main

    inv = tmp_path / "inventory.toml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.modbus_sim", "--preset", "eastron_sdm630", "--inventory-out", str(inv),
         "--registers", "1.8.0,2.8.0", "--fault", "2:exception:6", "rtu", "--units", "1,2"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "modbus rtu bus: units [1, 2] at 9600 baud on /dev/" in line
        assert main(["poll", "sim-rtu-1", "--inventory", str(inv), "--json", "--readings"]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [r["register"] for r in rows] == ["1.8.0", "2.8.0"] and Decimal(rows[0]["value"]) > 0
        assert main(["poll", "sim-rtu-2", "--inventory", str(inv)]) == 2
        err = capsys.readouterr().err
        assert "exception: meter sim-rtu-2 on bus /dev/" in err and "server device busy" in err
    finally:
        proc.terminate()
        proc.wait(10)
