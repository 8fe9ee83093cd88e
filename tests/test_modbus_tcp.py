"""The Modbus adapter against the simulated TCP fleet over real sockets."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from adapters import quality
from adapters.base import PollError
from adapters.modbus import ModbusAdapter
from adapters.registermap import TYPES, load_register_map
from amr.settings import Settings
from collector.inventory import Meter
from simulators.consumption import SimClock
from simulators.modbus_sim import ModbusTcpFleet, SimMeter
from tests.conftest import free_port

T0 = datetime(2026, 3, 1, 9, 15, tzinfo=UTC)
FROZEN = SimClock(T0, 0.0)  # simulated time stands still: values are exact


def meter(port: int, unit: int, preset: str = "generic_counter", **kw) -> Meter:
    return Meter(
        id=kw.pop("id", f"m{unit}"), account="1", adapter="modbus_tcp", preset=preset,
        host="127.0.0.1", port=port, unit=unit, timeout=kw.pop("timeout", 0.3), **kw,
    )


def all_types_preset(path: Path) -> Path:
    """Every data type in every word and byte order, back to back (32 values)."""
    lines = ['model = "all types"', "max_gap = 0"]
    address = 0
    for typ in TYPES:
        for word in ("big", "little"):
            for byte in ("big", "little"):
                lines += [
                    "[[register]]", f'name = "{typ}_{word}_{byte}"', f"address = {address}",
                    'function = "holding"', f'type = "{typ}"', f'word_order = "{word}"',
                    f'byte_order = "{byte}"', 'unit = "x"',
                ]
                address += TYPES[typ][1] // 16
    path.write_text("\n".join(lines) + "\n")
    return path


def sample(typ: str, i: int) -> Decimal:
    _fmt, bits, signed, is_float = TYPES[typ]
    if is_float:
        return Decimal("-1234.5") - i if typ == "f32" else Decimal("-98765.4321") - i
    top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return Decimal(-(top - i) if signed else top - i)  # extreme values: sign and width errors show


def test_every_type_and_order_decodes_to_the_simulator_state(tmp_path: Path) -> None:
    preset = all_types_preset(tmp_path / "alltypes.toml")
    rmap = load_register_map(str(preset))
    port = free_port()
    sim = SimMeter(7, rmap, FROZEN)
    sim.fixed = {r.key: sample(r.type, i) for i, r in enumerate(rmap.registers)}
    m = meter(port, 7, str(preset))

    async def go() -> tuple[dict, dict]:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            batched = {v.key: v.value for v in await adapter.read_values(m)}
            requests = sim.requests
            one_by_one = {}
            for r in rmap.registers:
                words = await adapter.request(m, r.function, r.address, r.words)
                one_by_one[r.key] = r.decode(words)
            return batched, {"requests": requests, "values": one_by_one}
        finally:
            await adapter.close()

    with ModbusTcpFleet({(port, 7): sim}):
        batched, single = asyncio.run(go())
    assert batched == sim.fixed  # exact for integers of every width and sign, floats as sent
    assert single["values"] == batched
    assert single["requests"] == 1 < len(rmap.registers)


def test_energy_counters_equal_the_consumption_model() -> None:
    port = free_port()
    rmap = load_register_map("generic_counter")
    sims = {(port, u): SimMeter(u, rmap, FROZEN, seed=u) for u in (1, 2, 3)}

    async def go() -> list:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            out = []
            for u in (1, 2, 3):
                regs = ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "2.8.0")
                out.append(await adapter.read(meter(port, u, registers=regs)))
            return out
        finally:
            await adapter.close()

    with ModbusTcpFleet(sims):
        results = asyncio.run(go())
    for u, readings in zip((1, 2, 3), results, strict=True):
        model = sims[(port, u)].model
        assert {r.register: r.value for r in readings} == {
            reg: model.energy_kwh(T0, reg) for reg in ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "2.8.0")
        }
        assert all(r.meter_id == f"m{u}" and r.ts.tzinfo is not None for r in readings)
        # the simulated meter's clock stands at T0, ours is now: a skew to flag
        assert all(quality.CLOCK_SKEW in r.quality for r in readings)
    # five registers and the clock came in one request per meter
    assert [sims[(port, u)].requests for u in (1, 2, 3)] == [1, 1, 1]


def test_eastron_floats_read_as_published() -> None:
    port = free_port()
    sim = SimMeter(1, load_register_map("eastron_sdm630"), FROZEN, seed=4)

    async def go() -> list:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            return await adapter.read_values(meter(port, 1, "eastron_sdm630"))
        finally:
            await adapter.close()

    with ModbusTcpFleet({(port, 1): sim}):
        values = {v.key: v for v in asyncio.run(go())}
    expected = sim.model.energy_kwh(T0, "1.8.0")
    assert abs(values["1.8.0"].value - expected) <= expected * Decimal("1e-7")
    assert values["1.8.0"].unit == "kWh" and values["voltage_l1"].unit == "V"
    assert values["voltage_l1"].value == Decimal("230.1")
    assert sim.requests == 3  # 10 values: voltages+currents, total power, frequency+energies


@pytest.mark.parametrize(
    ("fault", "arg", "outcome", "words"),
    [
        ("no_answer", None, "timeout", "no answer within the timeout"),
        ("slow", 1.0, "timeout", "no answer"),
        ("garbage", None, "garbage", "unparseable answer"),
        ("exception", 2, "exception", "Modbus exception 2 (illegal data address)"),
        ("exception", 6, "exception", "server device busy"),
    ],
)
def test_each_fault_is_a_named_error_and_the_neighbour_still_reads(
    fault: str, arg: float | None, outcome: str, words: str
) -> None:
    port = free_port()
    rmap = load_register_map("generic_counter")
    sims = {(port, u): SimMeter(u, rmap, FROZEN, seed=u) for u in (1, 2)}
    sims[(port, 2)].inject(fault, arg)

    async def go() -> tuple[PollError, list]:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            with pytest.raises(PollError) as err:
                await adapter.read(meter(port, 2, id="bad"))
            good = await adapter.read(meter(port, 1, id="good"))
            return err.value, good
        finally:
            await adapter.close()

    with ModbusTcpFleet(sims):
        err, good = asyncio.run(go())
    assert err.outcome == outcome
    assert f"meter bad on bus 127.0.0.1:{port} unit 2" in str(err) and words in str(err)
    assert good and good[0].value == sims[(port, 1)].model.energy_kwh(T0, "1.8.0")


def test_nobody_listening_is_refused() -> None:
    async def go() -> PollError:
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            with pytest.raises(PollError) as err:
                await adapter.read(meter(free_port(), 1, id="gone"))
            return err.value
        finally:
            await adapter.close()

    err = asyncio.run(go())
    assert err.outcome == "refused" and "meter gone on bus 127.0.0.1:" in str(err)


def test_amr_poll_prints_one_json_object_per_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from amr.cli import main
    from simulators.modbus_sim import inventory_toml

    port = free_port()
    sims = {(port, 1): SimMeter(1, load_register_map("generic_counter"), FROZEN, seed=9)}
    inv = tmp_path / "inventory.toml"
    inv.write_text(inventory_toml(sims, "generic_counter"))
    with ModbusTcpFleet(sims):
        assert main(["poll", f"sim-{port}-1", "--inventory", str(inv), "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert main(["poll", f"sim-{port}-1", "--inventory", str(inv)]) == 0
        text = capsys.readouterr().out
    by = {r["register"]: r for r in rows}
    assert set(rows[0]) == {"register", "value", "unit", "ts"}
    assert Decimal(by["1.8.0"]["value"]) == sims[(port, 1)].model.energy_kwh(T0, "1.8.0")
    assert by["1.8.0"]["unit"] == "kWh" and by["power"]["unit"] == "kW"
    assert datetime.fromisoformat(by["1.8.0"]["ts"]) == T0  # the meter's own clock
    assert "1.8.0" in text and "kWh" in text and f"meter clock {T0.isoformat()}" in text
    # an unknown meter is a clear error, not a traceback
    assert main(["poll", "nope", "--inventory", str(inv)]) == 2
    assert "no meter 'nope'" in capsys.readouterr().err


def test_amr_scan_finds_the_answering_units_and_guesses_their_model(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from amr.cli import main

    port = free_port()
    sims = {
        (port, 1): SimMeter(1, load_register_map("eastron_sdm630"), FROZEN),
        (port, 2): SimMeter(2, load_register_map("eastron_sdm120"), FROZEN),
        (port, 5): SimMeter(5, load_register_map("generic_counter"), FROZEN),
    }
    with ModbusTcpFleet(sims):
        assert main(["scan", "--host", "127.0.0.1", "--port", str(port), "--units", "1-6", "--json"]) == 0
    found = {r["unit"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert sorted(found) == [1, 2, 5]
    assert found[1]["preset"] == "eastron_sdm630"
    assert found[2]["preset"] == "eastron_sdm120" and "eastron_sdm630" not in found[2]["candidates"]
    assert found[5]["preset"] == "generic_counter"


def test_amr_poll_reads_a_good_meter_of_an_inventory_with_a_bad_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from amr.cli import main
    from simulators.modbus_sim import inventory_toml

    port = free_port()
    sims = {(port, 1): SimMeter(1, load_register_map("generic_counter"), FROZEN, seed=9)}
    inv = tmp_path / "inventory.toml"
    inv.write_text(
        inventory_toml(sims, "generic_counter")
        + '\n[[meter]]\nid = "broken"\naccount = "900001"\nadapter = "modbus_tcp"\npreset = "nope"\n'
        'host = "127.0.0.1"\nunit = 9\n'
    )
    with ModbusTcpFleet(sims):
        assert main(["poll", f"sim-{port}-1", "--inventory", str(inv), "--json"]) == 0
        out = capsys.readouterr()
        assert main(["poll", "broken", "--inventory", str(inv)]) == 2
        refused = capsys.readouterr().err
    assert '"register": "1.8.0"' in out.out
    assert "1 problem(s) with other meters" in out.err
    assert "meter 'broken': key 'preset': unknown preset 'nope'" in refused


async def _padding_server(port: int, sim: SimMeter, pad_units: set[int], registers: int = 125):
    """A Modbus TCP server of the test's own that answers units in pad_units with a longer block.

    The answer starts with the requested registers as the simulated meter holds
    them and goes on to `registers` words: a well-formed frame (MBAP length and
    byte count agree), only not the size asked for. Other units get honest answers.
    """
    import struct

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                tid, _pid, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                pdu = await reader.readexactly(length - 1)
                address, count = struct.unpack(">HH", pdu[1:5])
                words = sim.read("holding" if pdu[0] == 3 else "input", address, count)
                assert isinstance(words, list)
                if unit in pad_units:
                    words = words + [0x4141] * (registers - count)
                body = bytes([pdu[0], 2 * len(words)]) + struct.pack(f">{len(words)}H", *words)
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


def test_a_response_longer_than_the_request_is_a_decode_error() -> None:
    port = free_port()
    sim = SimMeter(1, load_register_map("generic_counter"), FROZEN, seed=3)
    regs = ("1.8.0", "1.8.1", "1.8.2", "1.8.3", "2.8.0")

    async def go() -> tuple[PollError, list, int]:
        server = await _padding_server(port, sim, pad_units={2})
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        try:
            (req,) = adapter.plan(meter(port, 2), regs)
            with pytest.raises(PollError) as err:
                await adapter.read(meter(port, 2, id="long", registers=regs))
            good = await adapter.read(meter(port, 1, id="honest", registers=regs))  # same connection
            return err.value, good, req.count
        finally:
            await adapter.close()
            server.close()
            await server.wait_closed()

    err, good, count = asyncio.run(go())
    assert count < 125
    assert err.outcome == "decode"
    text = str(err)
    assert f"meter long on bus 127.0.0.1:{port} unit 2" in text
    assert f"holding {0}..{count - 1} ({count} registers)" in text and "got 125" in text
    assert len(err.raw) == 250 and err.source == f"modbus_tcp:127.0.0.1:{port}/2"  # kept as refused
    assert {r.register: r.value for r in good} == {r: sim.model.energy_kwh(T0, r) for r in regs}
