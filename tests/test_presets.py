"""The meter presets against their published register maps.

Three checks per model:
- published words: registers laid out as the manufacturer's table says (type, word order,
  scale), built here with `struct` and not with the register map's own encoder, decode to
  the value the table means;
- `amr poll` over real TCP: the simulator serves every register of the preset with a known
  value chosen to expose width, sign and scale errors, and `amr poll --json` prints exactly
  those values with the preset's units;
- `amr scan`: one simulated meter of every model behind its own unit id, and each unit's
  first guess is its own preset, told apart by the probe registers.

Sources of the tables: each preset names its own (`source` and the header comment).
"""

from __future__ import annotations

import asyncio
import json
import struct
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from adapters.registermap import TYPES, RegisterSpec, available_presets, load_register_map
from simulators.consumption import SimClock
from simulators.modbus_sim import ModbusTcpFleet, SimMeter
from tests.conftest import free_port

MODELS = [
    "eastron_sdm72", "eastron_sdm120", "eastron_sdm220", "eastron_sdm230", "eastron_sdm630",
    "abb_b21", "abb_b23", "abb_b24", "carlo_gavazzi_em24", "carlo_gavazzi_em340", "janitza_b23",
    "chint_dtsu666", "schneider_iem3x5x", "orno_we514", "orno_we516", "finder_7m24", "finder_7m38",
]
FROZEN = SimClock(datetime(2026, 3, 1, 9, 15, tzinfo=UTC), 0.0)


def _words(fmt: str, value: float | int, lsw_first: bool = False) -> list[int]:
    """Registers as a table describes them: struct big-endian, then words swapped if low word first."""
    raw = struct.pack(">" + fmt, value)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return words[::-1] if lsw_first else words


# (preset, register, words as the published table lays them out, the value they mean)
PUBLISHED = [
    # Eastron: IEEE 754 float32, high word first; 0x449A5000 is 1234.5
    *[(p, "1.8.0", [0x449A, 0x5000], "1234.5") for p in MODELS if p.startswith("eastron_")],
    *[(p, "2.8.0", _words("f", 98.25), "98.25") for p in MODELS if p.startswith("eastron_")],
    # ABB: unsigned 64-bit energies in 0.01 kWh, signed 64-bit net, i32 power in 0.01 W
    *[(p, "1.8.0", [0, 0, 0x0001, 0xE240], "1234.56") for p in ("abb_b21", "abb_b23", "abb_b24")],
    *[(p, "energy_net", _words("q", -123456), "-1234.56") for p in ("abb_b21", "abb_b23", "abb_b24")],
    *[(p, "power_total", _words("i", -12345), "-123.45") for p in ("abb_b21", "abb_b23", "abb_b24")],
    ("abb_b23", "voltage_l2", _words("I", 2301), "230.1"),
    ("abb_b21", "frequency", [5002], "50.02"),
    # Carlo Gavazzi: INT32 with the least significant word first, energies in 0.1 kWh
    *[(p, "1.8.0", [0xE240, 0x0001], "12345.6") for p in ("carlo_gavazzi_em24", "carlo_gavazzi_em340")],
    *[(p, "power_total", _words("i", -12345, lsw_first=True), "-1234.5")
      for p in ("carlo_gavazzi_em24", "carlo_gavazzi_em340")],
    ("carlo_gavazzi_em340", "power_factor", _words("h", -875), "-0.875"),
    # Janitza B23, Finder 7M: float32 energies in Wh
    ("janitza_b23", "1.8.0", _words("f", 1234567.0), "1234.567"),
    ("finder_7m24", "1.8.0", _words("f", 1234567.0), "1234.567"),
    ("finder_7m38", "2.8.0", _words("f", 7654321.0), "7654.321"),
    # CHINT DTSU666: float32 in the manual's units (0.1 V, 0.01 Hz), energies in kWh
    ("chint_dtsu666", "voltage_l1", _words("f", 2301.0), "230.1"),
    ("chint_dtsu666", "frequency", _words("f", 5001.0), "50.01"),
    ("chint_dtsu666", "1.8.0", [0x449A, 0x5000], "1234.5"),
    # Schneider iEM3x5x: INT64 energies in Wh
    ("schneider_iem3x5x", "1.8.0", [0, 0, 0x0012, 0xD687], "1234.567"),
    ("schneider_iem3x5x", "voltage_l1", _words("f", 231.5), "231.5"),
    # ORNO WE-514/515: u16 voltage in 0.01 V, u32 energies in 0.01 kWh
    ("orno_we514", "voltage", [23010], "230.1"),
    ("orno_we514", "1.8.1", [0x0001, 0xE240], "1234.56"),
    # ORNO WE-516/517: float32 kWh
    ("orno_we516", "1.8.2", [0x449A, 0x5000], "1234.5"),
]


def test_every_model_of_the_issue_has_a_preset_with_its_source_and_a_probe() -> None:
    assert set(MODELS) <= set(available_presets())
    for name in MODELS:
        rmap = load_register_map(name)
        assert "(" in rmap.source and len(rmap.source) > 40, name  # a document and where it was found
        assert rmap.probes, name
        assert rmap.get("1.8.0") is not None, name
        assert (rmap.path or Path()).read_text().startswith("# "), name  # the header says where it comes from


@pytest.mark.parametrize(("preset", "key", "words", "expected"), PUBLISHED,
                         ids=[f"{p}-{k}" for p, k, _w, _e in PUBLISHED])
def test_published_layout_decodes(preset: str, key: str, words: list[int], expected: str) -> None:
    spec = load_register_map(preset).get(key)
    assert spec is not None
    assert spec.decode(words) == Decimal(expected)


def known_value(spec: RegisterSpec, i: int) -> Decimal:
    """A value that a wrong width, sign, word order or scale cannot reproduce."""
    _fmt, bits, signed, is_float = TYPES[spec.type]
    if is_float:
        raw = Decimal("1000.25") + i  # exact in float32
    elif signed:
        raw = Decimal(-(1 << (bits - 2)) - 3 - i)  # negative, beyond the next narrower width
    else:
        raw = Decimal((1 << (bits - 1)) + 5 + i)  # above the signed maximum of its width
    return raw * spec.scale


def inventory(path: Path, preset: str, port: int, unit: int = 1) -> Path:
    path.write_text(
        '[[subscriber]]\naccount = "1"\n\n'
        f'[[meter]]\nid = "m1"\naccount = "1"\nadapter = "modbus_tcp"\npreset = "{preset}"\n'
        f'host = "127.0.0.1"\nport = {port}\nunit = {unit}\ntimeout = 1.0\n'
    )
    return path


@pytest.mark.parametrize("preset", MODELS)
def test_amr_poll_decodes_every_register_the_simulator_serves(preset: str, tmp_path: Path, capsys) -> None:
    from amr.cli import main

    rmap = load_register_map(preset)
    expected = {spec.key: known_value(spec, i) for i, spec in enumerate(rmap.registers)}
    sim = SimMeter(1, rmap, FROZEN, seed=1, fixed=dict(expected))
    port = free_port()
    with ModbusTcpFleet({(port, 1): sim}):
        assert main(["poll", "m1", "--inventory", str(inventory(tmp_path / "inv.toml", preset, port)), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {r["register"]: Decimal(r["value"]) for r in rows}
    assert got == expected
    assert {r["register"]: r["unit"] for r in rows} == {s.key: s.unit for s in rmap.registers}


def test_amr_scan_tells_every_model_apart() -> None:
    from collector.commands.poll import scan

    port = free_port()
    names = [*MODELS, "generic_counter"]
    fleet = {(port, u): SimMeter(u, load_register_map(n), FROZEN, seed=u) for u, n in enumerate(names, start=1)}
    with ModbusTcpFleet(fleet):
        found = asyncio.run(scan(host="127.0.0.1", port=port, device=None, baudrate=9600,
                                 units=list(range(1, len(names) + 2)), timeout=0.3))
    guesses = {f["unit"]: f["presets"] for f in found}
    # the unit past the last meter is silent (the TCP fleet answers "gateway target failed")
    assert sorted(guesses) == list(range(1, len(names) + 1))
    assert {names[u - 1]: g[0] if g else None for u, g in guesses.items()} == {n: n for n in names}
    # models sharing a layout are told apart by their identification registers alone
    em340 = guesses[names.index("carlo_gavazzi_em340") + 1]
    assert "carlo_gavazzi_em24" not in em340
    sdm230 = guesses[names.index("eastron_sdm230") + 1]
    assert sdm230[0] == "eastron_sdm230" and "eastron_sdm220" in sdm230  # ranked below the meter code
