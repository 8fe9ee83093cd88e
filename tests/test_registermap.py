"""Register maps: schema, decoding of every type and order, batching, inventory checks."""

from __future__ import annotations

import struct
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.registermap import (
    TYPES,
    DecodeError,
    RegisterMapError,
    RegisterSpec,
    available_presets,
    check_modbus_meters,
    load_register_map,
    parse_register_map,
    plan_requests,
)
from collector.inventory import InventoryError, parse_inventory


def spec(typ: str, address: int = 0, word: str = "big", byte: str = "big", scale: str = "1", **kw) -> RegisterSpec:
    return RegisterSpec(
        name=kw.pop("name", "v"), address=address, type=typ, word_order=word, byte_order=byte,
        scale=Decimal(scale), **kw,
    )


def test_every_preset_loads_and_names_its_energy_registers() -> None:
    assert {"eastron_sdm120", "eastron_sdm630", "generic_counter"} <= set(available_presets())
    sdm630 = load_register_map("eastron_sdm630")
    imp, exp = sdm630.get("1.8.0"), sdm630.get("2.8.0")
    assert (imp.address, imp.function, imp.type, imp.word_order) == (0x48, "input", "f32", "big")
    assert (exp.address, exp.function) == (0x4A, "input")
    assert sdm630.get("voltage_l1").address == 0
    generic = load_register_map("generic_counter")
    assert {r.type for r in generic.registers} >= {"u32", "u64"}


def test_sdm630_import_energy_decodes_a_published_float() -> None:
    # 1234.5 kWh as the meter sends it: float32 0x449A5000, high word first
    assert load_register_map("eastron_sdm630").get("1.8.0").decode([0x449A, 0x5000]) == Decimal("1234.5")


@pytest.mark.parametrize("typ", list(TYPES))
@pytest.mark.parametrize("word", ["big", "little"])
@pytest.mark.parametrize("byte", ["big", "little"])
def test_known_wire_layouts(typ: str, word: str, byte: str) -> None:
    fmt, _bits, signed, is_float = TYPES[typ]
    value = -1234.5 if is_float else (-12345 if signed else 54321)
    raw = struct.pack(">" + fmt, value)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if word == "little":
        words.reverse()
    if byte == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    assert spec(typ, word=word, byte=byte).decode(words) == Decimal(str(value))


@given(
    typ=st.sampled_from(sorted(TYPES)),
    word=st.sampled_from(["big", "little"]),
    byte=st.sampled_from(["big", "little"]),
    hundredths=st.integers(min_value=0, max_value=327_67),  # fits i16 at 0.01
)
def test_encode_then_decode_is_the_value(typ: str, word: str, byte: str, hundredths: int) -> None:
    value = Decimal(hundredths) / 100
    s = spec(typ, word=word, byte=byte, scale="0.01" if not TYPES[typ][3] else "1")
    got = s.decode(s.encode(value))
    if TYPES[typ][3]:
        assert abs(got - value) <= value * Decimal("1e-7")
    else:
        assert got == value


def test_counters_wrap_like_the_register() -> None:
    s = spec("u16", scale="0.01")
    assert s.decode(s.encode(Decimal("655.36"))) == 0
    assert s.decode(s.encode(Decimal("655.37"))) == Decimal("0.01")


def test_nan_and_short_answers_are_decode_errors() -> None:
    with pytest.raises(DecodeError, match="nan"):
        spec("f32", name="voltage").decode([0x7FC0, 0x0000])
    with pytest.raises(DecodeError, match="needs 2 registers"):
        spec("u32").decode([1])


def test_batching_groups_bridges_and_caps() -> None:
    regs = [spec("u32", a, name=f"r{a}") for a in (0, 2, 4, 10, 40)] + [
        spec("u16", 0, name="in0", function="input"),
    ]
    plan = plan_requests(regs, max_request=125, max_gap=10)
    assert [(r.function, r.address, r.count) for r in plan] == [
        ("input", 0, 1), ("holding", 0, 12), ("holding", 40, 2),
    ]
    assert len(plan) < len(regs)
    contiguous = plan_requests(regs, max_request=125, max_gap=0)
    assert [(r.address, r.count) for r in contiguous if r.function == "holding"] == [(0, 6), (10, 2), (40, 2)]
    capped = plan_requests([spec("u16", a, name=f"r{a}") for a in range(300)], max_request=125, max_gap=0)
    assert [r.count for r in capped] == [125, 125, 50]
    # a value is never split across two requests
    assert all(r.count <= 4 for r in plan_requests([spec("u64", a * 4, name=f"q{a}") for a in range(3)], 5, 0))


def test_batched_request_decodes_each_register_from_its_offset() -> None:
    a, b = spec("u16", 0, name="a"), spec("i32", 5, name="b", word="little")
    (req,) = plan_requests([a, b], max_gap=10)
    words = [7, 0, 0, 0, 0, *b.encode(Decimal(-70000))]
    assert req.values(words) == {"a": Decimal(7), "b": Decimal(-70000)}
    # an answer of another size is refused, longer as well as shorter: the offsets are not ours
    with pytest.raises(DecodeError, match=r"asked 7 registers at 0\.\.6, got 125"):
        req.values(words + [0] * 118)
    with pytest.raises(DecodeError, match="got 6"):
        req.values(words[:6])


def _doc(registers: list[dict]) -> dict:
    return {"model": "test", "register": registers}


def test_overlapping_duplicate_and_bad_entries_are_all_named() -> None:
    doc = _doc([
        {"obis": "1.8.0", "address": 0, "type": "u32"},
        {"obis": "2.8.0", "address": 1, "type": "u32"},
        {"obis": "1.8.0", "address": 10, "type": "u16"},
        {"name": "voltage", "address": 70000, "type": "f32"},
        {"name": "x", "address": 20, "type": "u24"},
        {"obis": "1.8.1", "name": "both", "address": 30},
    ])
    with pytest.raises(RegisterMapError) as err:
        parse_register_map(doc, "bad", "bad.toml")
    text = str(err.value)
    assert "bad.toml: register[3] ('voltage'): key 'address'" in text
    assert "register[4] ('x'): key 'type': unknown type 'u24'" in text
    assert "exactly one of 'obis'" in text
    doc = _doc([
        {"obis": "1.8.0", "address": 0, "type": "u32"},
        {"obis": "2.8.0", "address": 1, "type": "u32"},
        {"obis": "1.8.0", "address": 10, "type": "u16"},
    ])
    with pytest.raises(RegisterMapError) as err:
        parse_register_map(doc, "bad", "bad.toml")
    assert "registers '1.8.0' (holding 0..1) and '2.8.0' (holding 1..2) overlap" in str(err.value)
    assert "duplicate register '1.8.0'" in str(err.value)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(RegisterMapError, match=r"unknown preset 'sdm999'; known: abb_b21, .*eastron_sdm120"):
        load_register_map("sdm999")


INVENTORY = """
[[subscriber]]
account = "1"

[[meter]]
id = "ok"
account = "1"
adapter = "modbus_tcp"
preset = "eastron_sdm630"
host = "10.0.0.5"
port = 502
unit = 1

[[meter]]
id = "ghost"
account = "1"
adapter = "modbus_tcp"
preset = "sdm999"
host = "10.0.0.5"
unit = 2

[[meter]]
id = "twin"
account = "1"
adapter = "modbus_tcp"
preset = "eastron_sdm630"
host = "10.0.0.5"
port = 502
unit = 1

[[meter]]
id = "noport"
account = "1"
adapter = "modbus_rtu"
preset = "eastron_sdm120"
unit = 0

[[meter]]
id = "overlap"
account = "1"
adapter = "modbus_rtu"
preset = "overlap.toml"
port = "/dev/ttyS1"
unit = 4

[[meter]]
id = "tariffs"
account = "1"
adapter = "modbus_rtu"
preset = "eastron_sdm120"
port = "/dev/ttyS1"
unit = 5
registers = ["1.8.0", "1.8.1"]

[[meter]]
id = "even"
account = "1"
adapter = "modbus_rtu"
preset = "eastron_sdm120"
port = "/dev/ttyS1"
parity = "E"
unit = 6

[[meter]]
id = "iec-on-rtu"
account = "1"
adapter = "iec62056"
port = "/dev/ttyS1"
"""


def test_broken_inventory_is_refused_with_file_meter_and_reason(tmp_path: Path) -> None:
    (tmp_path / "overlap.toml").write_text(
        'model = "x"\n[[register]]\nobis = "1.8.0"\naddress = 0\ntype = "u32"\n'
        '[[register]]\nobis = "2.8.0"\naddress = 1\ntype = "u32"\n'
    )
    inv = parse_inventory(tomllib.loads(INVENTORY), "site.toml")
    problems = check_modbus_meters(inv.meters.values(), "site.toml", tmp_path)
    text = "\n".join(problems)
    assert "site.toml: meter 'ghost': key 'preset': unknown preset 'sdm999'" in text
    assert "site.toml: meter 'twin': key 'unit': unit 1 on bus 10.0.0.5:502 is already meter 'ok'" in text
    assert "site.toml: meter 'noport': key 'unit'" in text
    assert "site.toml: meter 'noport': key 'port': a Modbus RTU meter needs a serial device path" in text
    assert "meter 'overlap': key 'preset'" in text and "overlap" in text and "'2.8.0' (holding 1..2)" in text
    assert "meter 'tariffs': key 'registers': preset 'eastron_sdm120' has no register '1.8.1'" in text
    assert (
        "meter 'even': key 'baudrate': 9600 baud E on bus /dev/ttyS1, but meter 'overlap' on the same bus "
        "uses 9600 baud N" in text
    )
    assert not any(p.startswith("site.toml: meter 'ok'") for p in problems)
    # and the gateway refuses to start on it
    from collector.gateway.daemon import check_inventory

    (tmp_path / "site.toml").write_text(INVENTORY)
    with pytest.raises(InventoryError, match="meter 'twin'") as err:
        check_inventory(tmp_path / "site.toml")
    assert "meter 'iec-on-rtu': key 'port': /dev/ttyS1 is a modbus_rtu bus" in str(err.value)
