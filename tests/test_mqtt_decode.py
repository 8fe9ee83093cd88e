"""MQTT payload decoding: every format, every kind of malformed message, the CLI."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from adapters import mqtt_formats as fmt
from adapters import quality, wire
from adapters.reading import Reading, Rejected
from collector.commands import mqtt as mqtt_cmd
from collector.inventory import parse_inventory
from simulators import mqtt_sim
from simulators.consumption import ConsumptionModel

RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _one(topic: str, payload: bytes, **kw):
    d = fmt.decode(topic, payload, RECEIVED, **kw)
    assert not d.problems, d.problems
    assert len(d.values) == 1, d.values
    return d, d.values[0]


def test_tasmota_local_time_and_kwh():
    d, v = _one("tele/plug-7/SENSOR", b'{"Time":"2026-03-01T15:00:00","ENERGY":{"Total":123.456,"Power":10}}')
    assert (d.format, v.device, v.register, v.value) == ("tasmota", "plug-7", "1.8.0", Decimal("123.456"))
    assert v.ts == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # Moscow local time -> UTC
    assert quality.METER_CLOCK in v.quality


def test_tasmota_per_phase_totals_are_summed():
    _, v = _one("tele/p/SENSOR", b'{"Time":"2026-03-01T15:00:00+03:00","ENERGY":{"Total":[1.25,2.5,0.25]}}')
    assert v.value == Decimal("4.00")


def test_shelly_gen1_watt_hours_and_receive_time():
    d, v = _one("shellies/shellyem-B9/emeter/1/total", b"123456.7")
    assert (d.family, v.device, v.register, v.value) == ("shelly", "shellyem-B9/1", "1.8.0", Decimal("123.4567"))
    assert v.ts == RECEIVED and quality.METER_CLOCK not in v.quality
    _, r = _one("shellies/shellyem-B9/emeter/1/total_returned", b"5000")
    assert (r.register, r.value) == ("2.8.0", Decimal("5"))


def test_shelly_gen2_status_and_rpc_notification():
    d = fmt.decode("shellypro3em-x/status/emdata:0", b'{"id":0,"total_act":12345.6,"total_act_ret":10}', RECEIVED)
    got = {(v.device, v.register, v.value) for v in d.values}
    assert got == {("shellypro3em-x/0", "1.8.0", Decimal("12.3456")), ("shellypro3em-x/0", "2.8.0", Decimal("0.010"))}
    _, v = _one("shellyplus1pm-y/status/switch:0", b'{"id":0,"aenergy":{"total":1500.5,"minute_ts":1767225600}}')
    assert v.value == Decimal("1.5005") and v.ts == datetime(2026, 1, 1, tzinfo=UTC)
    _, v = _one("shellypro3em-x/events/rpc",
                b'{"method":"NotifyStatus","params":{"ts":1767225600,"emdata:1":{"id":1,"total_act":500}}}')
    assert (v.device, v.value) == ("shellypro3em-x/1", Decimal("0.500"))
    quiet = fmt.decode("shellypro3em-x/events/rpc", b'{"method":"NotifyStatus","params":{"ts":1,"sys":{}}}')
    assert quiet.ignored and not quiet.values and not quiet.problems


def test_zigbee2mqtt_energy_and_last_seen():
    d, v = _one("zigbee2mqtt/kitchen", b'{"energy":12.34,"power":5,"last_seen":1767225600000}')
    assert (d.format, v.device, v.value, v.ts) == ("zigbee2mqtt", "kitchen", Decimal("12.34"), datetime(2026, 1, 1, tzinfo=UTC))


def test_forced_format_and_wrong_topic_for_it():
    # any topic ends like Zigbee2MQTT's <base_topic>/<name>; none of these ends like a Shelly topic
    d = fmt.decode("tele/p/SENSOR", b'{"ENERGY":{"Total":1}}', RECEIVED, family="shelly")
    assert [p.code for p in d.problems] == ["unknown_topic"] and "not a shelly topic" in d.problems[0].reason


def test_amr_batch_keeps_good_readings_and_names_bad_ones():
    body = {"v": 1, "source": "gw-1", "readings": [
        {"meter": "m1", "register": "1.8.0", "ts": "2026-01-01T00:00:00Z", "value": "1.5"},
        {"meter": "m1", "register": "1.8.0", "ts": "2026-01-01T00:30:00Z", "value": -1},
        {"meter": "m1", "register": "1.8.0", "ts": "2026-01-01T01:00:00Z", "value": "12,5"},
        {"meter": "m1", "register": "1.8.0", "ts": "2026-01-01T01:30:00", "value": 2},
        {"meter": "m1", "register": "1.8.0", "ts": "2026-01-01T02:00:00+03:00", "value": 2.25},
    ]}
    d = fmt.decode("amr/v1/gw-1/readings", json.dumps(body).encode(), RECEIVED)
    assert [(v.ts.isoformat(), v.value) for v in d.values] == [
        ("2026-01-01T00:00:00+00:00", Decimal("1.5")), ("2025-12-31T23:00:00+00:00", Decimal("2.25"))]
    codes = {p.reason.split(":")[0]: p.code for p in d.problems}
    assert codes == {"readings/1/value": "negative", "readings/2/value": "type", "readings/3/ts": "ts"}
    assert all(p.raw and p.device == "m1" for p in d.problems)


def test_amr_watt_hours_unit():
    d = fmt.decode("amr/v1/g/readings", b'{"v":1,"unit":"Wh","readings":[{"meter":"m","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":1500}]}')
    assert d.values[0].value == Decimal("1.500")


@pytest.mark.parametrize(
    ("topic", "payload", "code"),
    [
        ("amr/v1/g/readings", b"not json", "malformed"),
        ("amr/v1/g/readings", b'{"v":1,"readings":[{"meter":"m\\u0000","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"1"}]}', "schema"),
        ("amr/v1/g/readings", b"\xff\xfe", "malformed"),
        ("amr/v1/g/readings", b'{"v":1,"readings":"many"}', "schema"),
        ("amr/v1/g/readings", b'{"v":2,"readings":[]}', "schema"),
        ("amr/v1/g/readings", b'{"v":1,"unit":"MWh","readings":[]}', "unit"),
        ("amr/v1/g/readings", b'{"v":1,"readings":[{"meter":"m","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":NaN}]}', "not_finite"),
        ("amr/v1/g/readings", b'{"v":1,"readings":[{"meter":"m","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":Infinity}]}', "not_finite"),
        ("amr/v1/g/readings", b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        ("amr/v1/g/readings", b"[" * 50_000, "too_deep"),
        ("amr/v1/g/readings", b'{"v":1,"readings":[' + b" " * (2 << 20) + b"]}", "too_large"),
        ("tele/p/SENSOR", b'{"ENERGY":{"Total":"12 kWh"}}', "type"),
        ("tele/p/SENSOR", b'{"ENERGY":{"Total":-3.5}}', "negative"),
        ("tele/p/SENSOR", b'{"AM2301":{"Temperature":21}}', "no_energy"),
        ("tele/p/SENSOR", b"[1,2]", "type"),
        ("tele/p/SENSOR", b'{"Time":"yesterday","ENERGY":{"Total":1}}', "ts"),
        ("shellies/s/emeter/0/total", b"", "malformed"),
        ("shellies/s/emeter/0/total", b"nan", "not_finite"),
        ("zigbee2mqtt/p", b'{"energy":true}', "type"),
        ("some/other/topic", b"{}", "unknown_topic"),
    ],
)
def test_malformed_messages_give_a_reason_never_an_exception(topic, payload, code):
    d = fmt.decode(topic, payload, RECEIVED)
    assert not d.values
    assert [p.code for p in d.problems] == [code], d.problems
    assert d.problems[0].reason


def test_a_value_beyond_the_largest_float_is_refused_alone_and_named_not_finite():
    d = fmt.decode("amr/v1/g/readings", b'{"v":1,"readings":['
                   b'{"meter":"m","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":1e400},'
                   b'{"meter":"m","register":"1.8.0","ts":"2026-01-01T00:30:00Z","value":5}]}', RECEIVED)
    assert [v.value for v in d.values] == [Decimal(5)]
    assert [p.code for p in d.problems] == ["not_finite"]
    assert "readings/0/value" in d.problems[0].reason and "inf" in d.problems[0].reason
    assert "NoneType" not in d.problems[0].reason


def test_schema_quality_flags_match_the_source_flags():
    schema = json.loads(wire.AMR_SCHEMA_PATH.read_text())
    assert set(schema["$defs"]["reading"]["properties"]["quality"]["items"]["enum"]) == quality.SOURCE_FLAGS


INVENTORY = {
    "subscriber": [{"account": "1"}],
    "meter": [
        {"id": "m-plug", "account": "1", "adapter": "mqtt", "device": "plug-7", "format": "tasmota"},
        {"id": "m-em", "account": "1", "adapter": "mqtt", "device": "shellyem-B9/1"},
        {"id": "m-other", "account": "1", "adapter": "mqtt", "device": "kitchen", "format": "tasmota"},
    ],
}


def test_devices_map_to_meters_and_unmapped_is_a_counted_reject():
    devices = fmt.DeviceMap(parse_inventory(INVENTORY).meters.values())
    payload = b'{"Time":"2026-03-01T15:00:00","ENERGY":{"Total":1.5}}'
    [item] = fmt.to_items(fmt.decode("tele/plug-7/SENSOR", payload, RECEIVED), payload, devices)
    assert isinstance(item, Reading) and item.meter_id == "m-plug" and item.source == "mqtt:tele/plug-7/SENSOR"
    [item] = fmt.to_items(fmt.decode("shellies/shellyem-B9/emeter/1/total", b"10", RECEIVED), b"10", devices)
    assert isinstance(item, Reading) and item.meter_id == "m-em"
    # "kitchen" is configured for tasmota only, so a zigbee2mqtt "kitchen" is unknown
    z = b'{"energy":1}'
    [item] = fmt.to_items(fmt.decode("zigbee2mqtt/kitchen", z, RECEIVED), z, devices)
    assert isinstance(item, Rejected) and item.code == "unknown_device" and item.raw == z
    assert "'kitchen'" in item.reason and 'device = "kitchen"' in item.reason


def test_malformed_becomes_rejected_with_raw_bytes():
    [item] = fmt.to_items(fmt.decode("amr/v1/g/readings", b"{oops", RECEIVED), b"{oops", None)
    assert isinstance(item, Rejected) and item.raw == b"{oops" and item.code == "malformed"
    assert item.source == "mqtt:amr/v1/g/readings"


@pytest.mark.parametrize("fmt_name", mqtt_sim.FORMATS)
def test_simulated_devices_decode_to_the_model_value(fmt_name):
    t = datetime(2026, 2, 10, 8, 30, tzinfo=UTC)
    models = {n: ConsumptionModel(seed=n) for n in range(3)}
    msgs = mqtt_sim.messages(fmt_name, range(3), t, models, batch=2)
    inv = parse_inventory({"subscriber": [{"account": "1"}], "meter": [
        {"id": f"m{n}", "account": "1", **mqtt_sim.meter_keys(fmt_name, n)} for n in range(3)]})
    layouts = fmt.DeviceMap(inv.meters.values()).layouts  # ESPHome and Home Assistant need their meters
    got = {}
    for topic, payload in msgs:
        d = fmt.decode(topic, payload, t, layouts=layouts)
        if d.ignored or topic.endswith("/temperature/state"):
            continue  # em1:N (power only); an ESPHome temperature no meter names
        assert not d.problems, d.problems
        for v in d.values:
            if v.register == "1.8.0":
                got[v.device] = (v.value, v.ts)
    assert got == {mqtt_sim.device_name(fmt_name, n): (models[n].energy_kwh(t), t) for n in range(3)}


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    mqtt_cmd.register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_decode_json_lines(capsys):
    rc = _cli(["mqtt", "decode", "--json", "shellypro3em-x/status/emdata:0", '{"id":0,"total_act":2000}'])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 1
    assert {k: lines[0][k] for k in ("device", "register", "value")} == {
        "device": "shellypro3em-x/0", "register": "1.8.0", "value": "2.000"}
    datetime.fromisoformat(lines[0]["ts"])


def test_cli_decode_says_where_each_time_came_from(capsys):
    amr = '{"v":1,"readings":[{"meter":"m","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"1"}]}'
    assert _cli(["mqtt", "decode", "amr/v1/g/readings", amr]) == 0
    assert "(time in the message)" in capsys.readouterr().out
    assert _cli(["mqtt", "decode", "shellies/s/emeter/0/total", "1500"]) == 0
    assert "(time of receipt)" in capsys.readouterr().out


def test_cli_decode_says_why_nothing(capsys):
    rc = _cli(["mqtt", "decode", "tele/p/SENSOR", '{"ENERGY":{"Total":"12 kWh"}}'])
    out = capsys.readouterr().out
    assert rc == 1 and "ENERGY.Total" in out and "expected a number" in out
    rc = _cli(["mqtt", "decode", "--format", "shelly", "tele/p/SENSOR", "1"])
    assert rc == 1 and "not a shelly topic" in capsys.readouterr().out


def test_example_inventory_maps_every_simulated_device():
    from collector.inventory import load_inventory
    from tests.conftest import ROOT

    inv = load_inventory(ROOT / "deploy/examples/mqtt/inventory-mqtt.toml")
    devices = fmt.DeviceMap(inv.meters.values())
    t = datetime(2026, 2, 10, 8, 30, tzinfo=UTC)
    models = {0: ConsumptionModel(seed=0)}
    for fmt_name in ("tasmota", "shelly_gen1", "shelly_gen2", "zigbee2mqtt"):
        [(topic, payload)] = mqtt_sim.messages(fmt_name, range(1), t, models)
        items = fmt.to_items(fmt.decode(topic, payload, t), payload, devices)
        assert items and all(isinstance(i, Reading) and i.meter_id.startswith("flat-12-") for i in items), items


def test_amr_help_lists_the_mqtt_commands():
    from amr.cli import build_parser

    text = build_parser().format_help()
    assert "collect" in text and "mqtt" in text
    for argv in (["mqtt", "decode", "--help"], ["mqtt", "drain", "--help"], ["collect", "--help"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 0
