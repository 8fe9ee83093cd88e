"""Device payloads captured by others, decoded in the default and in non-default topic layouts.

Every payload below was published by a real device and quoted in public
material; the source is named beside it (facts only: topic and payload). The
topic layouts are the ones people configure (a Tasmota FullTopic with
%topic% before %prefix% or extra levels, a Zigbee2MQTT base_topic, a Shelly or
ESPHome topic prefix, a doubled prefix); each family is decoded in its default
layout and in at least two others, both ways an integrator meets them: with
`--format` (any topic that ends like the family's pattern) and through the
inventory's `topic_prefix` / `topic` (what the collector subscribes to).
"""

from __future__ import annotations

import argparse
import json
import tomllib
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from adapters import mqtt_formats as fmt
from adapters.reading import Reading
from collector.commands import mqtt as mqtt_cmd
from collector.inventory import InventoryError, parse_inventory

RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _inventory(*meters: dict, layouts: list[dict] | None = None):
    data: dict = {"subscriber": [{"account": "1"}],
                  "meter": [{"account": "1", "adapter": "mqtt", **m} for m in meters]}
    if layouts:
        data["mqtt_layout"] = layouts
    return parse_inventory(data)


def _devmap(*meters: dict, layouts: list[dict] | None = None) -> fmt.DeviceMap:
    inv = _inventory(*meters, layouts=layouts)
    dm = fmt.DeviceMap(inv.meters.values(), inv.mqtt_layouts)
    assert dm.warnings == []
    return dm


def _values(d: fmt.Decoded) -> dict[tuple[str, str], Decimal]:
    assert not d.problems, d.problems
    return {(v.device, v.register): v.value for v in d.values}


def _readings(dm: fmt.DeviceMap, topic: str, payload: bytes) -> dict[tuple[str, str], Decimal]:
    d = fmt.decode(topic, payload, RECEIVED, layouts=dm.layouts)
    items = fmt.to_items(d, payload, dm)
    assert items and all(isinstance(i, Reading) for i in items), items
    return {(i.meter_id, i.register): i.value for i in items}


# --- Tasmota --------------------------------------------------------------------------------

# Tasmota 8.4+ with two tariffs, from a Domoticz plugin's notes quoting its device's console
# ("MQT: tele/D1-HAIER-POW/SENSOR = ...", public code index; Tasmota's 8.3.1.2 change log in
# arendst/Tasmota RELEASENOTES.md: "Change Energy JSON Total field from "Total":[33.736,11.717,16.978]
# to "Total":33.736,"TotalTariff":[11.717,16.978]")
TARIFF = (b'{"Time":"2024-11-12T23:01:05","ENERGY":{"TotalStartTime":"2024-02-20T22:54:12",'
          b'"Total":711.792,"TotalTariff":[96.965,614.826],"Yesterday":9.928,"Today":10.541,"Period":12,'
          b'"Power":734,"ApparentPower":769,"ReactivePower":230,"Factor":0.95,"Voltage":242,"Current":3.182}}')
TARIFF_VALUES = {"1.8.0": Decimal("711.792"), "1.8.1": Decimal("96.965"), "1.8.2": Decimal("614.826")}
# home-assistant/core tests/components/tasmota/test_sensor.py: FullTopic %topic%/%prefix%/
HA_TOPIC, HA_PAYLOAD = "tasmota_49A3BC/tele/SENSOR", b'{"ENERGY":{"TotalTariff":[1.2,3.4]}}'
# Tasmota docs, Teleinfo page (a Denky D4 publishing with extra levels before %topic%/%prefix%)
TELEINFO_TOPIC = "emoncms/ch2i/factory/denky_D6C0C0/tele/SENSOR"
TELEINFO = (b'{"Time":"2021-10-26T17:28:45","ENERGY":{"TotalStartTime":"2021-10-25T15:22:04",'
            b'"Total":9098.245,"Yesterday":6822.685,"Today":2275.560,"Period": 9,"Power":170,'
            b'"Current":1.000,"Load":6}}')


def test_tasmota_total_tariff_default_layout_gives_zone_registers():
    d = fmt.decode("tele/D1-HAIER-POW/SENSOR", TARIFF, RECEIVED)
    assert d.format == "tasmota"
    assert _values(d) == {("D1-HAIER-POW", r): v for r, v in TARIFF_VALUES.items()}
    assert all(v.ts == datetime(2024, 11, 12, 20, 1, 5, tzinfo=UTC) for v in d.values)  # local Moscow time


def test_tasmota_tariff_to_zone_mapping_is_the_meters_configuration():
    """Tasmota's tariff 1 is whatever the user set (often the off-peak one): the meter's `tariffs` says."""
    dm = _devmap({"id": "haier", "device": "D1-HAIER-POW", "format": "tasmota", "tariffs": ["1.8.2", "1.8.1"]})
    got = _readings(dm, "tele/D1-HAIER-POW/SENSOR", TARIFF)
    assert got == {("haier", "1.8.0"): Decimal("711.792"), ("haier", "1.8.2"): Decimal("96.965"),
                   ("haier", "1.8.1"): Decimal("614.826")}


@pytest.mark.parametrize(("topic", "device"), [
    (HA_TOPIC, "tasmota_49A3BC"),  # %topic%/%prefix%/
    ("blitzwolf-shp2-2/tele/SENSOR", "blitzwolf-shp2-2"),  # arendst/Tasmota#6500's FullTopic
    (TELEINFO_TOPIC, "denky_D6C0C0"),  # extra levels, then %topic%/%prefix%/
    ("home/tele/plug-7/SENSOR", "plug-7"),  # a custom prefix before %prefix%/%topic%/
    ("tele/flat12/plug-7/SENSOR", "plug-7"),  # extra level between %prefix% and %topic%
])
def test_tasmota_format_finds_the_device_in_any_topic_that_ends_like_its_pattern(topic, device, capsys):
    d = fmt.decode(topic, HA_PAYLOAD, RECEIVED, family="tasmota")
    assert _values(d) == {(device, "1.8.1"): Decimal("1.2"), (device, "1.8.2"): Decimal("3.4")}
    assert _cli(["mqtt", "decode", "--format", "tasmota", "--json", topic, HA_PAYLOAD.decode()]) == 0
    assert {json.loads(x)["device"] for x in capsys.readouterr().out.splitlines()} == {device}


def test_tasmota_fulltopic_from_the_inventory_topic_first_then_prefix():
    dm = _devmap({"id": "ha", "device": "tasmota_49A3BC", "format": "tasmota", "topic": "%topic%/%prefix%/"},
                 {"id": "denky", "device": "denky_D6C0C0", "format": "tasmota",
                  "topic": "emoncms/ch2i/factory/%topic%/%prefix%/"})
    assert "+/tele/SENSOR" in dm.layouts.filters() and "emoncms/ch2i/factory/+/tele/SENSOR" in dm.layouts.filters()
    assert _readings(dm, HA_TOPIC, HA_PAYLOAD) == {("ha", "1.8.1"): Decimal("1.2"), ("ha", "1.8.2"): Decimal("3.4")}
    assert _readings(dm, TELEINFO_TOPIC, TELEINFO) == {("denky", "1.8.0"): Decimal("9098.245")}
    # without the layout the same topic is not placed (the default takes tele/<topic>/SENSOR only)
    assert [p.code for p in fmt.decode(TELEINFO_TOPIC, TELEINFO, RECEIVED).problems] == ["unknown_topic"]


def test_tasmota_family_layout_for_every_device_of_the_inventory():
    dm = _devmap({"id": "p7", "device": "plug-7", "format": "tasmota"},
                 layouts=[{"family": "tasmota", "topic_prefix": "home/tele"}])
    assert "home/tele/+/SENSOR" in dm.layouts.filters() and "tele/+/SENSOR" in dm.layouts.filters()
    assert _readings(dm, "home/tele/plug-7/SENSOR", TELEINFO) == {("p7", "1.8.0"): Decimal("9098.245")}


# A Tasmota on a two-channel device (Total per channel), quoted in a Hubitat Tasmota driver's comment
# ("Some SENSOR devices have a second switch", public code index)
TWO_CHANNELS = (b'{"Time":"2022-01-07T19:43:24","Switch1":"ON","Switch2":"ON","ENERGY":{"TotalStartTime":'
                b'"2021-04-03T18:52:24","Total":[0.005,1.507],"Yesterday":[0.000,0.648],"Today":[0.000,0.197],'
                b'"Period":[ 0, 0],"Power":[ 0,26],"ApparentPower":[ 0,43],"ReactivePower":[ 0,33],'
                b'"Factor":[0.00,0.62],"Frequency":50.016,"Voltage":225,"Current":[0.000,0.189]}}')


def test_tasmota_multichannel_total_array_split_into_channels_or_summed():
    assert _values(fmt.decode("tele/shelly25/SENSOR", TWO_CHANNELS, RECEIVED)) == {
        ("shelly25", "1.8.0"): Decimal("1.512")}  # phases of one meter: summed, as before
    dm = _devmap({"id": "boiler", "device": "shelly25/1", "format": "tasmota", "channels": "split"},
                 {"id": "heater", "device": "shelly25/2", "format": "tasmota", "channels": "split",
                  "topic_prefix": "home"})
    assert _readings(dm, "home/shelly25/SENSOR", TWO_CHANNELS) == {
        ("boiler", "1.8.0"): Decimal("0.005"), ("heater", "1.8.0"): Decimal("1.507")}


# Tasmota SML reader: the meter name and field names are the user's script's. Payload from
# trucki-eu/Trucki2Shelly-Gateway#17 (a script with an empty meter name: the key is "").
SML = b'{"Time":"1970-06-11T05:35:26","":{"Total_in":2173.5,"Total_out":349.3,"Power_curr":-136.39}}'


def test_tasmota_sml_reader_needs_the_meters_field_map():
    d = fmt.decode("tele/lesekopf/SENSOR", SML, RECEIVED)
    assert [p.code for p in d.problems] == ["no_energy"] and "ENERGY.Total" in d.problems[0].reason
    dm = _devmap({"id": "sml", "device": "lesekopf", "format": "tasmota", "topic": "zaehler/%topic%/%prefix%/",
                  "fields": {".Total_in": "1.8.0", ".Total_out": "2.8.0"}})
    assert _readings(dm, "zaehler/lesekopf/tele/SENSOR", SML) == {
        ("sml", "1.8.0"): Decimal("2173.5"), ("sml", "2.8.0"): Decimal("349.3")}


# --- Shelly ---------------------------------------------------------------------------------

# Gen2 switch:0 (Plus 1PM Mini Gen3), status and NotifyStatus, from
# iobroker-community-adapters/ioBroker.shelly#1592
SWITCH = (b'{"id":0,"source":"MQTT","tag":null, "output":true, "apower":11.5, "voltage":240.3, "freq":50.0, '
          b'"current":0.073, "aenergy":{"total":152669.987,"by_minute":[0.000,0.000,0.000],"minute_ts":1788945240}, '
          b'"ret_aenergy":{"total":0.000,"by_minute":[0.000,0.000,0.000],"minute_ts":1788945240},'
          b'"counts":{"on_time":44340},"temperature":{"tC":55.0, "tF":131.0}}')
# Plus 2PM with a custom topic prefix ("shellyplus2pm-Einfahrt", src shellyplus2pm-3ce90e2f7c34),
# from iobroker-community-adapters/ioBroker.shelly#813
RPC_2PM = (b'{"src":"shellyplus2pm-3ce90e2f7c34","dst":"shellyplus2pm-Einfahrt/events","method":"NotifyStatus",'
           b'"params":{"ts":1698999960.13,"switch:0":{"id":0,"aenergy":{"by_minute":[0.000,0.000,0.000],'
           b'"minute_ts":1698999959,"total":123.585}}}}')
# Plus PM Mini pm1:0, status and NotifyStatus, from StyraHem/pyShelly#78
PM1 = (b'{"id":0, "voltage":238.3, "current":0.020, "apower":1.6 ,"freq":50.0,"aenergy":{"total":12.948,'
       b'"by_minute":[0.000,0.000,0.000],"minute_ts":1698852539}}')
PM1_RPC = (b'{"src":"shellypmmini-6055f999dfd4","dst":"shellypmmini-6055f999dfd4/events","method":"NotifyStatus",'
           b'"params":{"ts":1698852540.24,"pm1:0":{"id":0,"aenergy":{"by_minute":[0.000,0.000,0.000],'
           b'"minute_ts":1698852539,"total":12.948}}}}')
# Pro EM-50: em1:N (power only) and em1data:N (Wh), from evcc-io/evcc#12252 (Shelly.GetStatus: the same
# component objects the device publishes on <prefix>/status/<component>)
EM1 = b'{"id":1,"current":30.665,"voltage":221.4,"act_power":6769.3,"aprt_power":6823.1,"pf":0.99, "freq":50.0,"calibration":"factory"}'
EM1DATA = b'{"id":1,"total_act_energy":9671.54,"total_act_ret_energy":2595.26}'
# Pro 3EM emdata:0 field set, from sdeigm/uni-meter#352 (EMData.GetStatus; zeros there, so the
# counters here are the same fields with the totals of Pro 3EM's phases a, b and c added up)
EMDATA = (b'{"id":0,"a_total_act_energy":1000.00,"a_total_act_ret_energy":0.00,"b_total_act_energy":2000.00,'
          b'"b_total_act_ret_energy":0.00,"c_total_act_energy":500.00,"c_total_act_ret_energy":10.00,'
          b'"total_act":3500.00,"total_act_ret":10.00}')
# Gen1 Shelly EM, from enesbcs/shellyteacher4domo#5
GEN1_TOPIC, GEN1 = "shellies/shellyem-123456789012/emeter/0/total", b"1891.9"


@pytest.mark.parametrize("prefix", [
    "shelly1pmminig3-5432044edbc0",  # the default: the device id
    "shellyplus2pm-Einfahrt",  # a name of the user's (ioBroker.shelly#813)
    "home/garage/plug1",  # levels
    "shellies/shellies/plug1",  # a doubled prefix
])
def test_shelly_gen2_switch_status_and_rpc_in_any_prefix(prefix):
    d = fmt.decode(f"{prefix}/status/switch:0", SWITCH, RECEIVED, family="shelly")
    assert _values(d) == {(f"{prefix}/0", "1.8.0"): Decimal("152.669987"), (f"{prefix}/0", "2.8.0"): Decimal("0")}
    assert d.values[0].ts == datetime.fromtimestamp(1788945240, UTC)
    d = fmt.decode(f"{prefix}/events/rpc", RPC_2PM, RECEIVED, family="shelly")
    assert _values(d) == {(f"{prefix}/0", "1.8.0"): Decimal("0.123585")}
    dm = _devmap({"id": "sw", "device": f"{prefix}/0", "format": "shelly", "topic_prefix": prefix})
    assert _readings(dm, f"{prefix}/status/switch:0", SWITCH) == {
        ("sw", "1.8.0"): Decimal("152.669987"), ("sw", "2.8.0"): Decimal("0")}
    assert _readings(dm, f"{prefix}/events/rpc", RPC_2PM) == {("sw", "1.8.0"): Decimal("0.123585")}
    quiet = fmt.decode(f"{prefix}/status/sys", b'{"mac":"A8032ABE2F18"}', RECEIVED, layouts=dm.layouts)
    assert quiet.ignored and not quiet.problems


@pytest.mark.parametrize("levels", ["", "home/", "haus/keller/shellies/"])  # before the device id
@pytest.mark.parametrize(("component", "payload", "want"), [
    ("pm1:0", PM1, {"1.8.0": Decimal("0.012948")}),
    ("em1data:1", EM1DATA, {"1.8.0": Decimal("9.67154"), "2.8.0": Decimal("2.59526")}),
    ("emdata:0", EMDATA, {"1.8.0": Decimal("3.5"), "2.8.0": Decimal("0.01")}),
])
def test_shelly_meter_components_in_default_and_custom_prefixes(levels, component, payload, want):
    prefix = f"{levels}shellypro-08f9e0e67204"
    device = f"{prefix}/{component.split(':')[1]}"
    topic = f"{prefix}/status/{component}"
    assert _values(fmt.decode(topic, payload, RECEIVED, family="shelly")) == {(device, r): v for r, v in want.items()}
    meter = {"id": "m", "device": device, "format": "shelly"}
    dm = _devmap({**meter, "topic_prefix": prefix} if levels else meter)
    assert _readings(dm, topic, payload) == {("m", r): v for r, v in want.items()}


def test_shelly_pm1_em1data_emdata_in_watt_hours_and_em_power_only():
    assert _values(fmt.decode("shellypmmini-6055f999dfd4/status/pm1:0", PM1, RECEIVED)) == {
        ("shellypmmini-6055f999dfd4/0", "1.8.0"): Decimal("0.012948")}
    assert _values(fmt.decode("shellypmmini-6055f999dfd4/events/rpc", PM1_RPC, RECEIVED)) == {
        ("shellypmmini-6055f999dfd4/0", "1.8.0"): Decimal("0.012948")}
    assert _values(fmt.decode("shellyproem50-08f9e0e67204/status/em1data:1", EM1DATA, RECEIVED)) == {
        ("shellyproem50-08f9e0e67204/1", "1.8.0"): Decimal("9.67154"),
        ("shellyproem50-08f9e0e67204/1", "2.8.0"): Decimal("2.59526")}
    assert _values(fmt.decode("shellypro3em-0cb815fd1c64/status/emdata:0", EMDATA, RECEIVED)) == {
        ("shellypro3em-0cb815fd1c64/0", "1.8.0"): Decimal("3.5"),
        ("shellypro3em-0cb815fd1c64/0", "2.8.0"): Decimal("0.01")}
    em1 = fmt.decode("shellyproem50-08f9e0e67204/status/em1:1", EM1, RECEIVED)
    assert em1.ignored and "em1data" in em1.ignored and not em1.values and not em1.problems
    # the same in a prefix of the user's, found by --format and by the inventory
    d = fmt.decode("haus/keller/proem/status/em1data:1", EM1DATA, RECEIVED, family="shelly")
    assert ("haus/keller/proem/1", "1.8.0") in _values(d)
    dm = _devmap({"id": "pv", "device": "haus/keller/proem/1", "format": "shelly_gen2",
                  "topic_prefix": "haus/keller/proem"})
    assert _readings(dm, "haus/keller/proem/status/em1data:1", EM1DATA) == {
        ("pv", "1.8.0"): Decimal("9.67154"), ("pv", "2.8.0"): Decimal("2.59526")}


@pytest.mark.parametrize(("topic", "prefix"), [
    (GEN1_TOPIC, None),
    ("home/shellies/shellyem-123456789012/emeter/0/total", "home/shellies"),
    ("shellies/shellies/shellyem-123456789012/emeter/0/total", "shellies/shellies"),  # doubled
])
def test_shelly_gen1_in_custom_and_doubled_prefixes(topic, prefix):
    assert _values(fmt.decode(topic, GEN1, RECEIVED, family="shelly")) == {
        ("shellyem-123456789012/0", "1.8.0"): Decimal("1.8919")}
    meter = {"id": "em", "device": "shellyem-123456789012/0", "format": "shelly_gen1"}
    dm = _devmap({**meter, "topic_prefix": prefix} if prefix else meter)
    assert _readings(dm, topic, GEN1) == {("em", "1.8.0"): Decimal("1.8919")}
    if prefix:
        assert f"{prefix}/+/emeter/+/total" in dm.layouts.filters()


# --- Zigbee2MQTT ----------------------------------------------------------------------------

# Koenkk/zigbee2mqtt#32463 (TS011F plug "z1"), the state message up to its "update" object
Z1 = (b'{"child_lock":"UNLOCK","countdown":0,"current":0,"energy":12.05,"identify":null,'
      b'"indicator_mode":"off/on","last_seen":"2026-07-27T09:41:41+02:00","linkquality":43,"power":0,'
      b'"power_outage_memory":"off","state":"OFF"}')
# Koenkk/zigbee2mqtt#14934: base_topic "zigbee2mqttcc1352", a plug that has not reported energy yet
CC1352 = (b'{"child_lock":null,"current":0.1,"energy":null,"indicator_mode":null,"last_seen":'
          b'"2022-11-15T19:05:39+00:00","linkquality":81,"power":12,"power_outage_memory":null,"state":"ON",'
          b'"update":{"state":null},"update_available":null,"voltage":241}')


@pytest.mark.parametrize("base", ["zigbee2mqtt", "zigbee2mqttcc1352", "home/zigbee"])
def test_zigbee2mqtt_in_any_base_topic(base):
    d = fmt.decode(f"{base}/z1", Z1, RECEIVED, family="zigbee2mqtt")
    assert _values(d) == {("z1", "1.8.0"): Decimal("12.05")}
    assert d.values[0].ts == datetime(2026, 7, 27, 7, 41, 41, tzinfo=UTC)
    meter = {"id": "z", "device": "z1", "format": "zigbee2mqtt"}
    dm = _devmap({**meter, "topic_prefix": base} if base != "zigbee2mqtt" else meter)
    assert _readings(dm, f"{base}/z1", Z1) == {("z", "1.8.0"): Decimal("12.05")}
    assert f"{base}/+" in dm.layouts.filters()
    assert fmt.decode(f"{base}/bridge", b'{"state":"online"}', RECEIVED, layouts=dm.layouts).problems


def test_zigbee2mqtt_energy_not_reported_yet_is_a_named_refusal():
    dm = _devmap({"id": "p27", "device": "plug_zigbee27", "format": "zigbee2mqtt", "topic_prefix": "zigbee2mqttcc1352"})
    d = fmt.decode("zigbee2mqttcc1352/plug_zigbee27", CC1352, RECEIVED, layouts=dm.layouts)
    assert [p.code for p in d.problems] == ["no_energy"] and "energy" in d.problems[0].reason


# --- ESPHome --------------------------------------------------------------------------------

# syssi/esphome-soyosource-gtn-virtual-meter#71: node "attic-powerwall", topics as ESPHome logs them
ESP_TOPIC, ESP = "attic-powerwall/sensor/firstfloor_inverter_energy_yesterday/state", b"0.105"


@pytest.mark.parametrize("prefix", ["attic-powerwall", "home/attic", "esphome/attic-powerwall/mqtt"])
def test_esphome_state_topic_in_any_topic_prefix_with_the_unit_from_the_inventory(prefix):
    topic = ESP_TOPIC.replace("attic-powerwall", prefix, 1)
    device = f"{prefix}/firstfloor_inverter_energy_yesterday"
    assert _values(fmt.decode(topic, ESP, RECEIVED, family="esphome")) == {(device, "1.8.0"): Decimal("0.105")}
    # not decoded without an inventory: any ESPHome sensor (temperature too) has such a topic
    assert [p.code for p in fmt.decode(topic, ESP, RECEIVED).problems] == ["unknown_topic"]
    dm = _devmap({"id": "pw", "device": device, "format": "esphome", "topic_prefix": prefix, "energy_unit": "Wh"})
    assert topic in dm.layouts.filters()  # that sensor's topic alone: the node's other sensors are not heard
    assert _readings(dm, topic, ESP) == {("pw", "1.8.0"): Decimal("0.000105")}
    other = topic.replace("firstfloor_inverter_energy_yesterday", "inverter0_power_demand")
    assert [p.code for p in fmt.decode(other, b"190", RECEIVED, layouts=dm.layouts).problems] == ["unknown_topic"]


# --- Home Assistant-style sensors -----------------------------------------------------------

# enesbcs/shellyteacher4domo#8: discovery configs a bridge publishes for a Shelly 3EM, abbreviated keys,
# "~" the topic base; the state topic shellies/<id>/emeter/1/total carries Wh as text
HA_CONFIG = {"name": "%shelly_id% Total 1", "stat_t": "~emeter/1/total", "avty_t": "~online",
             "uniq_id": "%shelly_id%-total-1", "~": "shellies/%shelly_id%/", "dev_cla": "energy",
             "stat_cla": "total_increasing", "unit_of_meas": "Wh", "val_tpl": "{{value|round(2)}}"}
# OpenInverterGateway/OpenInverterGateway#46: a JSON state topic "energy/solar" with value templates
GROWATT = b'{"PV1EnergyTotal":1234.5,"PV2EnergyTotal":987.6,"PV1EnergyToday":3.2}'


@pytest.mark.parametrize("topic", ["shellies/shellyem3-abc/emeter/1/total", "energy/solar/total", "a/b/c/d"])
def test_home_assistant_sensor_by_its_whole_state_topic(topic):
    dm = _devmap({"id": "ha", "device": "shellyem3-abc-total-1", "format": "homeassistant", "topic": topic,
                  "energy_unit": "Wh"})
    assert topic in dm.layouts.filters()
    assert _readings(dm, topic, b"64541.0") == {("ha", "1.8.0"): Decimal("64.5410")}


def test_home_assistant_json_state_topic_shared_by_several_meters():
    dm = _devmap({"id": "pv1", "device": "growatt-pv1", "format": "homeassistant", "topic": "energy/solar",
                  "fields": {"PV1EnergyTotal": "2.8.0"}},
                 {"id": "pv2", "device": "growatt-pv2", "format": "homeassistant", "topic": "energy/solar",
                  "fields": {"PV2EnergyTotal": "2.8.0"}})
    assert _readings(dm, "energy/solar", GROWATT) == {("pv1", "2.8.0"): Decimal("1234.5"),
                                                      ("pv2", "2.8.0"): Decimal("987.6")}


def test_home_assistant_discovery_config_is_ignored_not_rejected():
    d = fmt.decode("homeassistant/sensor/shellyem3-abc-1/total/config", json.dumps(HA_CONFIG).encode(), RECEIVED,
                   family="homeassistant")
    assert d.ignored and "discovery" in d.ignored and not d.problems


# --- the inventory refuses what cannot work -------------------------------------------------


@pytest.mark.parametrize(("meter", "says"), [
    ({"device": "x", "format": "tasmota", "topic": "tasmota/#"}, "'#' is not allowed"),
    ({"device": "x", "format": "shelly", "topic": "a/{device}"}, "several formats"),
    ({"device": "x", "topic_prefix": "home"}, "need a 'format'"),
    ({"format": "tasmota", "topic": "plain/topic"}, "no placeholders"),  # one device's topic, but which device?
    ({"device": "x", "format": "tasmota", "tariffs": ["day"]}, "not an OBIS code"),
    ({"device": "x", "format": "tasmota", "channels": "both"}, "channels"),
])
def test_inventory_check_names_a_bad_layout(tmp_path, meter, says):
    from collector.gateway.daemon import check_inventory

    path = tmp_path / "inv.toml"
    lines = ['[[subscriber]]\naccount = "1"\n\n[[meter]]\nid = "m"\naccount = "1"\nadapter = "mqtt"\n']
    lines += [f"{k} = {json.dumps(v)}\n" for k, v in meter.items()]
    path.write_text("".join(lines))
    with pytest.raises(InventoryError) as exc:
        check_inventory(path)
    assert says in str(exc.value) and "'m'" in str(exc.value)


def test_mqtt_layout_section_needs_one_of_prefix_or_topic():
    with pytest.raises(InventoryError) as exc:
        _inventory({"id": "m", "device": "x"}, layouts=[{"family": "tasmota"}])
    assert "mqtt_layout[0]" in str(exc.value) and "topic_prefix" in str(exc.value)


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    mqtt_cmd.register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


# --- amr mqtt listen's placing, on the same captured payloads ---------------------------------


def test_listener_places_captured_payloads_and_writes_entries_that_decode_them():
    from collector.mqtt.listen import Listener, inventory_toml

    heard = [("tele/D1-HAIER-POW/SENSOR", TARIFF), (HA_TOPIC, HA_PAYLOAD), (TELEINFO_TOPIC, TELEINFO),
             ("zaehler/lesekopf/tele/SENSOR", SML), ("home/garage/plug1/status/switch:0", SWITCH),
             ("home/garage/plug1/events/rpc", RPC_2PM), ("shellies/shellies/shellyem-123456789012/emeter/0/total", GEN1),
             ("zigbee2mqttcc1352/z1", Z1), ("home/attic/sensor/total_energy/state", b"12.5"), (ESP_TOPIC, ESP),
             ("shellyproem50-08f9e0e67204/status/em1:1", EM1), ("energy/solar", GROWATT)]
    growatt = {"name": "Growatt.PV1EnergyTotal", "uniq_id": "mqtt_growatt_pv1energytotal", "stat_t": "energy/solar",
               "unit_of_meas": "kWh", "stat_cla": "total_increasing", "dev_cla": "energy",
               "val_tpl": "{{ value_json.PV1EnergyTotal|float }}"}
    listener = Listener()
    listener.feed("homeassistant/sensor/growatt/pv1/config", json.dumps(growatt).encode())
    listener.feed("homeassistant/sensor/shellyem3-abc-1/total/config", json.dumps(HA_CONFIG).encode())
    for topic, payload in heard:
        listener.feed(topic, payload)
    devices, unplaced = listener.report()
    got = {s.device: s for s in devices}
    assert set(got) == {"D1-HAIER-POW", "tasmota_49A3BC", "denky_D6C0C0", "lesekopf", "home/garage/plug1/0",
                        "shellyem-123456789012/0", "z1", "home/attic/total_energy", "mqtt_growatt_pv1energytotal"}
    assert got["mqtt_growatt_pv1energytotal"].keys == {"topic": "energy/solar", "energy_unit": "kWh",
                                                        "fields": {"PV1EnergyTotal": "1.8.0"}}
    assert got["lesekopf"].keys["fields"] == {".Total_in": "1.8.0", ".Total_out": "2.8.0"}
    assert got["home/garage/plug1/0"].registers == {"1.8.0", "2.8.0"}  # status and RPC events: one device
    assert [u.topic for u in unplaced] == [ESP_TOPIC] and "daily" in unplaced[0].reason  # a daily counter
    inv = parse_inventory(tomllib.loads(inventory_toml(devices)))
    dm = fmt.DeviceMap(inv.meters.values())
    assert dm.warnings == []
    for topic, payload in heard:
        d = fmt.decode(topic, payload, RECEIVED, layouts=dm.layouts)
        if d.ignored or topic == ESP_TOPIC:
            continue
        items = fmt.to_items(d, payload, dm)
        assert items and all(isinstance(i, Reading) for i in items), (topic, items)
