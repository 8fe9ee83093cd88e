"""Modbus RTU over TCP: meters on an RS-485 line behind a transparent RS-485-to-Ethernet converter.

The converter is the test's own: a TCP server whose bytes go, unchanged, to the RTU simulator's
paced pseudo-terminal and back (what a USR-TCP232 or a Moxa NPort in "TCP server / raw" mode
does). The adapter speaks RTU frames with their CRC over the socket (mbmd's `--rtu`), so the
simulator on the line answers it as it answers a serial port.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from adapters.base import PollError
from adapters.modbus import ModbusAdapter
from adapters.registermap import check_modbus_meters, load_register_map
from amr.settings import Settings
from collector.inventory import Meter
from simulators.consumption import SimClock
from simulators.modbus_sim import ModbusRtuBus, SimMeter, crc16
from tests.converter import TcpToPty

FROZEN = SimClock(datetime(2026, 3, 1, 9, 15, tzinfo=UTC), 0.0)


@contextmanager
def line_behind_converter(sims: list[SimMeter]) -> Iterator[tuple[ModbusRtuBus, TcpToPty]]:
    with ModbusRtuBus(sims, baudrate=9600) as bus, TcpToPty(bus.device) as conv:
        yield bus, conv


def converter_meter(port: int, unit: int, preset: str, **kw) -> Meter:
    return Meter(
        id=kw.pop("id", f"c{unit}"), account="1", adapter="modbus_rtu", preset=preset, host="127.0.0.1",
        tcp_port=port, unit=unit, baudrate=9600, timeout=kw.pop("timeout", 1.0), **kw,
    )


def test_values_through_the_converter_are_rtu_frames_with_crc() -> None:
    abb = load_register_map("abb_b23")
    fixed = {"1.8.0": Decimal("12345.67"), "energy_net": Decimal("-42.5"), "power_total": Decimal("-1234.56")}
    sims = [SimMeter(1, load_register_map("eastron_sdm120"), FROZEN, seed=1), SimMeter(2, abb, FROZEN, fixed=fixed)]

    async def go(port: int) -> tuple[list, list]:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            sdm = await adapter.read(converter_meter(port, 1, "eastron_sdm120", registers=("1.8.0", "2.8.0")))
            b23 = await adapter.read_values(converter_meter(port, 2, "abb_b23"))
            return sdm, b23
        finally:
            await adapter.close()

    with line_behind_converter(sims) as (_bus, conv):
        sdm, b23 = asyncio.run(go(conv.port))
        sent = bytes(conv.sent)
    expected = sims[0].energy(FROZEN.now())
    assert {r.register: r.value for r in sdm} == {k: expected[k] for k in ("1.8.0", "2.8.0")}
    assert {r.source for r in sdm} == {f"modbus_rtu:127.0.0.1:{conv.port}/1"}
    got = {v.key: v.value for v in b23}
    assert {k: got[k] for k in fixed} == fixed
    # the first request on the wire: unit 1, function 04, 4 registers from 0x0048, then its CRC
    # (low byte first) -- an RTU frame, no MBAP header
    first = sent[:8]
    assert first[:6] == bytes([1, 4, 0x00, 0x48, 0x00, 0x04])
    assert crc16(first[:6]) == int.from_bytes(first[6:8], "little")


def test_a_bad_crc_and_a_silent_unit_are_named_and_the_next_meter_still_answers() -> None:
    sims = [SimMeter(u, load_register_map("eastron_sdm120"), FROZEN, seed=u) for u in (1, 2, 3)]
    sims[1].inject("bad_crc")
    sims[2].inject("no_answer")

    async def go(port: int) -> tuple[str, str, list]:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        outcomes = []
        try:
            for unit in (2, 3):
                with pytest.raises(PollError) as err:
                    await adapter.read(converter_meter(port, unit, "eastron_sdm120", timeout=0.3))
                outcomes.append(err.value.outcome)
                assert f"on bus 127.0.0.1:{port} unit {unit}" in str(err.value)
            return outcomes[0], outcomes[1], await adapter.read(converter_meter(port, 1, "eastron_sdm120"))
        finally:
            await adapter.close()

    with line_behind_converter(sims) as (_bus, conv):
        crc, silent, after = asyncio.run(go(conv.port))
    assert (crc, silent) == ("crc", "timeout")
    assert [r.value for r in after] == [sims[0].energy(FROZEN.now())["1.8.0"]]


def test_amr_scan_and_poll_through_the_converter(tmp_path: Path, capsys) -> None:
    from amr.cli import main

    names = ["eastron_sdm120", "abb_b21", "orno_we514"]
    sims = [SimMeter(u, load_register_map(n), FROZEN, seed=u) for u, n in enumerate(names, start=1)]
    with line_behind_converter(sims) as (_bus, conv):
        assert main(["scan", "--host", "127.0.0.1", "--port", str(conv.port), "--rtu", "--units", "1-4",
                     "--timeout", "0.3", "--json"]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        inv = tmp_path / "inventory.toml"
        inv.write_text(
            '[[subscriber]]\naccount = "1"\n\n[[meter]]\nid = "orno"\naccount = "1"\nadapter = "modbus_rtu"\n'
            f'preset = "orno_we514"\nhost = "127.0.0.1"\ntcp_port = {conv.port}\nunit = 3\n'
            'registers = ["1.8.0", "1.8.1", "1.8.2"]\n'
        )
        assert main(["poll", "orno", "--inventory", str(inv), "--json", "--readings"]) == 0
        readings = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["unit"], r["preset"]) for r in rows] == list(enumerate(names, start=1))
    assert all(r["bus"] == f"127.0.0.1:{conv.port} (RTU over TCP)" for r in rows)
    energy = sims[2].energy(FROZEN.now())
    # the ORNO counts in 0.01 kWh: what the simulator's model holds, cut to the register's step
    assert [(r["register"], Decimal(r["value"])) for r in readings] == [
        (k, (energy[k] / Decimal("0.01")).to_integral_value(rounding="ROUND_DOWN") * Decimal("0.01"))
        for k in ("1.8.0", "1.8.1", "1.8.2")
    ]


def test_the_inventory_check_wants_host_and_tcp_port_or_a_serial_port() -> None:
    def meter(**kw) -> Meter:
        return Meter.model_validate({"id": "x", "account": "1", "adapter": "modbus_rtu", "preset": "abb_b21",
                                     "unit": 1, **kw})

    assert check_modbus_meters([meter(host="10.0.0.5", tcp_port=4001)]) == []
    assert check_modbus_meters([meter(port="/dev/ttyUSB0")]) == []
    (only_host,) = check_modbus_meters([meter(host="10.0.0.5")])
    assert "keys 'host' and 'tcp_port'" in only_host and "needs both" in only_host
    (both,) = check_modbus_meters([meter(host="10.0.0.5", tcp_port=4001, port="/dev/ttyUSB0")])
    assert "not both" in both
    (neither,) = check_modbus_meters([meter()])
    assert "serial device path" in neither and "tcp_port" in neither
    # two meters behind one converter are one bus: one unit id each
    (dup,) = check_modbus_meters([meter(host="10.0.0.5", tcp_port=4001),
                                  meter(id="y", host="10.0.0.5", tcp_port=4001)])
    assert "unit 1 on bus 10.0.0.5:4001 is already meter 'x'" in dup


def test_the_gateway_scheduler_reads_a_converter_line_as_one_bus() -> None:
    from datetime import timedelta

    from collector.gateway.scheduler import Scheduler

    class Sink:
        def __init__(self) -> None:
            self.items: list = []

        def put(self, items: list) -> None:
            self.items.extend(items)

    names = ["eastron_sdm630", "carlo_gavazzi_em340", "schneider_iem3x5x"]
    sims = [SimMeter(u, load_register_map(n), FROZEN, seed=u) for u, n in enumerate(names, start=1)]
    with line_behind_converter(sims) as (_bus, conv):
        ms = [converter_meter(conv.port, u, n, interval="30s", registers=("1.8.0",))
              for u, n in enumerate(names, start=1)]
        sink = Sink()

        async def go() -> Scheduler:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=1e9)
            sched = Scheduler(ms, lambda m: adapter, sink, jitter_s=0)
            await sched.run_slot(ms, datetime.now(UTC), timedelta(seconds=30))
            await adapter.close()
            return sched

        sched = asyncio.run(go())
    assert sorted(sched.reports[0].read) == ["c1", "c2", "c3"] and not sched.reports[0].missed
    energy = {m.id: s.energy(FROZEN.now())["1.8.0"] for m, s in zip(ms, sims, strict=True)}
    got = {r.meter_id: r.value for r in sink.items}
    # each counter as its register holds it: float32 (SDM630), 0.1 kWh INT32 (EM340), Wh INT64 (iEM)
    assert abs(got["c1"] - energy["c1"]) <= energy["c1"] * Decimal("1e-7")
    assert got["c2"] == (energy["c2"] * 10).to_integral_value(rounding="ROUND_DOWN") / 10
    assert got["c3"] == (energy["c3"] * 1000).to_integral_value(rounding="ROUND_DOWN") / 1000
    assert {m.bus_name for m in ms} == {f"127.0.0.1:{conv.port}"}  # one line, one bus: read one after the other


def test_scan_rtu_without_a_converter_host_is_a_clear_refusal(capsys) -> None:
    from amr.cli import main

    assert main(["scan", "--device", "/dev/ttyUSB9", "--rtu"]) == 2
    err = capsys.readouterr().err
    assert "--rtu: give the converter's --host" in err
