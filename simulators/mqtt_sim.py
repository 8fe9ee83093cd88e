"""Simulated MQTT meters: our amr/v1 format and what real devices publish.

Each simulated device is a `ConsumptionModel` (seed = device number), so the
value a message carries is exactly what a test can compute for that instant.
`messages()` builds the (topic, payload) pairs; `main()` publishes them with
QoS 1 to a broker at simulated time (`SimClock`), optionally mixing in
malformed messages to exercise dead-lettering.

    python -m simulators.mqtt_sim --broker 127.0.0.1:1883 --format tasmota --devices 20
    python -m simulators.mqtt_sim --format shelly_switch --topic-prefix home/garage --rounds 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from simulators.consumption import ConsumptionModel, SimClock

FORMATS = ("amr", "tasmota", "shelly_gen1", "shelly_gen2", "zigbee2mqtt", "tasmota_tariff", "tasmota_sml",
           "shelly_switch", "shelly_pm1", "shelly_em1data", "esphome", "homeassistant")
_MSK_OFFSET = timedelta(hours=3)  # Tasmota publishes local time without an offset (Europe/Moscow now)
_GEN2 = {"shelly_gen2": ("shellypro3em", "emdata"), "shelly_switch": ("shellyplus1pm", "switch"),
         "shelly_pm1": ("shellypmmini", "pm1"), "shelly_em1data": ("shellyproem50", "em1data")}


def _node(fmt: str, n: int) -> str:
    """The device's own name: Tasmota's %topic%, Shelly's id, the Zigbee friendly name, ESPHome's node."""
    if fmt.startswith("tasmota"):
        return f"tasmota-{n:04d}"
    if fmt in _GEN2:
        return f"{_GEN2[fmt][0]}-{n:04d}"
    return {"amr": f"sim-{n:04d}", "shelly_gen1": f"shellyem-{n:04d}", "zigbee2mqtt": f"plug-{n:04d}",
            "esphome": f"meter-{n:04d}", "homeassistant": f"meter-{n:04d}"}[fmt]


def _gen2_prefix(fmt: str, n: int, prefix: str | None) -> str:
    """A Shelly Gen2 topic prefix: the device id, or levels of the user's before it."""
    return f"{prefix}/{_node(fmt, n)}" if prefix else _node(fmt, n)


def device_name(fmt: str, n: int, prefix: str | None = None) -> str:
    """The device id a decoder reports for simulated device n of a format (in a topic prefix, if given)."""
    if fmt in _GEN2:
        return f"{_gen2_prefix(fmt, n, prefix)}/0"
    if fmt == "shelly_gen1":
        return f"{_node(fmt, n)}/0"
    if fmt == "esphome":
        return f"{prefix + '/' if prefix else ''}{_node(fmt, n)}/total_energy"
    if fmt == "homeassistant":
        return f"bridge-{_node(fmt, n)}-energy"
    return _node(fmt, n)


def tasmota_topic(name: str, prefix: str | None = None, fulltopic: str | None = None) -> str:
    """The SENSOR topic of a Tasmota: FullTopic (default %prefix%/%topic%/) with %prefix% (default tele)."""
    full = fulltopic or "%prefix%/%topic%/"
    full = full if full.endswith("/") else full + "/"
    return full.replace("%prefix%", prefix or "tele").replace("%topic%", name) + "SENSOR"


def meter_keys(fmt: str, n: int, prefix: str | None = None, fulltopic: str | None = None) -> dict:
    """The inventory keys of simulated device n (adapter mqtt): what amr mqtt listen should propose."""
    if fmt == "amr":
        return {"adapter": "mqtt"}
    family = "tasmota" if fmt.startswith("tasmota") else "shelly" if fmt.startswith("shelly") else fmt
    keys: dict = {"adapter": "mqtt", "device": device_name(fmt, n, prefix), "format": family}
    if family == "tasmota" and fulltopic:
        keys["topic"] = fulltopic
        if prefix:
            keys["topic_prefix"] = prefix
    elif family == "shelly" and fmt != "shelly_gen1" and prefix:
        keys["topic_prefix"] = _gen2_prefix(fmt, n, prefix)
    elif prefix and fmt != "homeassistant" and fmt != "esphome":
        keys["topic_prefix"] = prefix
    elif fmt == "esphome" and prefix:
        keys["topic_prefix"] = f"{prefix}/{_node(fmt, n)}"
    if fmt == "tasmota_sml":
        keys["fields"] = {"MT631.Total_in": "1.8.0", "MT631.Total_out": "2.8.0"}
    if fmt == "homeassistant":
        keys.update(topic=f"{prefix or 'bridge'}/{_node(fmt, n)}/energy", energy_unit="Wh",
                    fields={"energy_total": "1.8.0"})
    return keys


def discovery(fmt: str, devices: range, prefix: str | None = None) -> list[tuple[str, bytes]]:
    """Retained configs a bridge publishes for Home Assistant (format homeassistant only)."""
    if fmt != "homeassistant":
        return []
    out = []
    for n in devices:
        node = _node(fmt, n)
        cfg = {"name": f"{node} energy", "uniq_id": device_name(fmt, n), "~": f"{prefix or 'bridge'}/{node}/",
               "stat_t": "~energy", "dev_cla": "energy", "stat_cla": "total_increasing", "unit_of_meas": "Wh",
               "val_tpl": "{{ value_json.energy_total }}"}
        out.append((f"homeassistant/sensor/{node}/energy/config", json.dumps(cfg).encode()))
    return out


def messages(
    fmt: str, devices: range, t: datetime, models: dict[int, ConsumptionModel], batch: int = 1,
    source: str = "sim", prefix: str | None = None, fulltopic: str | None = None,
) -> list[tuple[str, bytes]]:
    """The messages the devices publish at instant t (aware UTC); amr/v1 as gateway `source`.

    `prefix` is the family's topic prefix (Tasmota's %prefix%, Shelly Gen1's and
    Zigbee2MQTT's base, levels before a Shelly Gen2's or ESPHome's own prefix,
    a Home Assistant bridge's base); `fulltopic` a Tasmota FullTopic.
    """
    out: list[tuple[str, bytes]] = []
    ts = t.astimezone(UTC)
    if fmt == "amr":
        rows = []
        for n in devices:
            rows.append({"meter": device_name("amr", n), "register": "1.8.0",
                         "ts": ts.isoformat().replace("+00:00", "Z"),
                         "value": str(models[n].energy_kwh(ts))})
        for i in range(0, len(rows), batch):
            batch_body = {"v": 1, "source": source, "readings": rows[i: i + batch]}
            out.append((f"amr/v1/{source}/readings", json.dumps(batch_body, separators=(",", ":")).encode()))
        return out
    if fmt not in FORMATS:
        raise ValueError(f"unknown simulated format {fmt!r}; known: {', '.join(FORMATS)}")
    for n in devices:
        kwh = models[n].energy_kwh(ts)
        wh = kwh * 1000
        node = _node(fmt, n)
        local = (ts + _MSK_OFFSET).replace(tzinfo=None).isoformat(timespec="seconds")
        if fmt == "tasmota":
            body: dict[str, Any] = {"Time": local, "ENERGY": {
                "TotalStartTime": "2024-01-01T00:00:00", "Total": float(kwh), "Yesterday": 0.0, "Today": 0.0,
                "Power": round(models[n].power_kw(ts) * 1000)}}
            out.append((tasmota_topic(node, prefix, fulltopic), json.dumps(body).encode()))
        elif fmt == "tasmota_tariff":  # firmware 8.4+: the total and one total per tariff (1 day, 2 night here)
            night = (kwh * 3 / 10).quantize(kwh)
            body = {"Time": local, "ENERGY": {"TotalStartTime": "2024-01-01T00:00:00", "Total": float(kwh),
                                              "TotalTariff": [float(kwh - night), float(night)], "Today": 0.0}}
            out.append((tasmota_topic(node, prefix, fulltopic), json.dumps(body).encode()))
        elif fmt == "tasmota_sml":  # an SML reader script: meter name and field names are the user's
            body = {"Time": local, "MT631": {"Total_in": float(kwh), "Total_out": 0.0,
                                             "Power_curr": round(models[n].power_kw(ts) * 1000)}}
            out.append((tasmota_topic(node, prefix, fulltopic), json.dumps(body).encode()))
        elif fmt == "shelly_gen1":
            out.append((f"{prefix or 'shellies'}/{node}/emeter/0/total", f"{wh:.1f}".encode()))
        elif fmt == "shelly_gen2":
            body = {"id": 0, "total_act": float(wh), "total_act_ret": 0.0,
                    "a_total_act_energy": float(wh), "a_total_act_ret_energy": 0}
            out.append((f"{_gen2_prefix(fmt, n, prefix)}/status/emdata:0", json.dumps(body).encode()))
        elif fmt in ("shelly_switch", "shelly_pm1"):
            kind = _GEN2[fmt][1]
            minute = int(ts.timestamp()) // 60 * 60
            energy = {"total": float(wh), "by_minute": [0.0, 0.0, 0.0], "minute_ts": minute}
            body = {"id": 0, "apower": round(models[n].power_kw(ts) * 1000, 1), "voltage": 230.1, "aenergy": energy}
            pfx = _gen2_prefix(fmt, n, prefix)
            out.append((f"{pfx}/status/{kind}:0", json.dumps(body).encode()))
            rpc = {"src": node, "dst": f"{pfx}/events", "method": "NotifyStatus",
                   "params": {"ts": ts.timestamp(), f"{kind}:0": {"id": 0, "aenergy": energy}}}
            out.append((f"{pfx}/events/rpc", json.dumps(rpc).encode()))
        elif fmt == "shelly_em1data":
            pfx = _gen2_prefix(fmt, n, prefix)
            em1 = {"id": 0, "current": 1.0, "voltage": 230.0, "act_power": round(models[n].power_kw(ts) * 1000, 1)}
            out.append((f"{pfx}/status/em1:0", json.dumps(em1).encode()))  # power only: ignored
            out.append((f"{pfx}/status/em1data:0",
                        json.dumps({"id": 0, "total_act_energy": float(wh), "total_act_ret_energy": 0.0}).encode()))
        elif fmt == "zigbee2mqtt":
            body = {"energy": float(kwh), "power": round(models[n].power_kw(ts) * 1000), "linkquality": 120,
                    "last_seen": ts.isoformat()}
            out.append((f"{prefix or 'zigbee2mqtt'}/{node}", json.dumps(body).encode()))
        elif fmt == "esphome":
            base = f"{prefix}/{node}" if prefix else node
            out.append((f"{base}/sensor/total_energy/state", f"{kwh:.3f}".encode()))
            out.append((f"{base}/sensor/temperature/state", b"21.5"))  # not a meter's: listen says why
        elif fmt == "homeassistant":
            body = {"energy_total": float(wh), "power": round(models[n].power_kw(ts) * 1000)}
            out.append((f"{prefix or 'bridge'}/{node}/energy", json.dumps(body).encode()))
    return out


MALFORMED: tuple[tuple[str, bytes], ...] = (
    ("amr/v1/sim/readings", b"not json at all"),
    ("amr/v1/sim/readings", b'{"v":1,"readings":[{"meter":"sim-0000","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":-5}]}'),
    ("amr/v1/sim/readings", b'{"v":1,"readings":[{"meter":"sim-0000","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":NaN}]}'),
    ("amr/v1/sim/readings", b'{"v":1,"unit":"MWh","readings":[]}'),
    ("amr/v1/sim/readings", b"[" * 5000 + b"]" * 5000),
    ("amr/v1/sim/readings", b'{"v":1,"readings":"many"}'),
    ("tele/unknown-plug/SENSOR", b'{"ENERGY":{"Total":1.0}}'),
    ("shellies/shellyem-0000/emeter/0/total", b"twelve"),
)


def huge_message(size: int = 2 << 20) -> tuple[str, bytes]:
    return ("amr/v1/sim/readings", b'{"v":1,"readings":[' + b" " * size + b"]}")


def _parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1"), int(port or 1883)


def run(args: argparse.Namespace) -> Iterator[int]:
    import paho.mqtt.client as mqtt

    host, port = _parse_broker(args.broker)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    start = datetime.fromisoformat(args.start) if args.start else datetime.now(UTC) - timedelta(days=1)
    clock = SimClock(start, args.scale)
    numbers = range(args.first, args.first + args.devices)
    models = {n: ConsumptionModel(seed=n) for n in numbers}
    rng = random.Random(args.seed)
    step = timedelta(seconds=args.interval)
    t = start
    rounds = 0
    for topic, payload in discovery(args.format, numbers, args.topic_prefix):
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    try:
        while args.rounds == 0 or rounds < args.rounds:
            now = clock.now()
            if t > now:
                time.sleep(min(1.0, clock.wall_seconds(t - now)))
                continue
            sent = 0
            for topic, payload in messages(args.format, numbers, t, models, args.batch,
                                           prefix=args.topic_prefix, fulltopic=args.fulltopic):
                if args.faults and rng.random() < args.faults:
                    topic, payload = rng.choice(MALFORMED)
                client.publish(topic, payload, qos=1).wait_for_publish(10)
                sent += 1
            yield sent
            rounds += 1
            t += step
    finally:
        client.disconnect()
        client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m simulators.mqtt_sim",
        description=(
            "Simulated MQTT meters publishing cumulative energy with QoS 1, in our amr/v1 format "
            "or as Tasmota (plain, two tariffs, SML reader), Shelly Gen1 EM, Shelly Gen2/Pro (Pro 3EM emdata, "
            "Plus 1PM switch, PM Mini pm1, Pro EM em1data), Zigbee2MQTT, ESPHome devices and Home "
            "Assistant-style bridges do, in the topic layout chosen (--topic-prefix, --fulltopic). "
            "Values follow simulators.consumption (seed = device number), at simulated time."
        ),
    )
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the broker")
    p.add_argument("--format", choices=FORMATS, default="amr")
    p.add_argument("--devices", type=int, default=10, help="number of simulated devices")
    p.add_argument("--first", type=int, default=0, help="number of the first simulated device (0)")
    p.add_argument("--interval", type=float, default=1800, help="simulated seconds between publications")
    p.add_argument("--scale", type=float, default=1440, help="simulated seconds per wall second")
    p.add_argument("--start", default=None, help="simulated start time, ISO 8601 with offset (default: a day ago)")
    p.add_argument("--rounds", type=int, default=0, help="publication rounds, 0 = forever")
    p.add_argument("--batch", type=int, default=100, help="readings per amr/v1 message")
    p.add_argument("--faults", type=float, default=0.0, help="share of messages replaced by malformed ones")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault injection")
    p.add_argument("--topic-prefix", default=None,
                   help="the family's topic prefix instead of its default (Tasmota %%prefix%%, Shelly Gen1 and "
                        "Zigbee2MQTT base, levels before a Shelly Gen2 or ESPHome device's own prefix)")
    p.add_argument("--fulltopic", default=None, help="Tasmota FullTopic, like 'tasmota/%%topic%%/%%prefix%%/'")
    p.add_argument("--client-id", default="amr-mqtt-sim")
    args = p.parse_args(argv)
    total = 0
    try:
        for sent in run(args):
            total += sent
    except KeyboardInterrupt:
        pass
    print(f"published {total} messages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
