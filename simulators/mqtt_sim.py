"""Simulated MQTT meters: our amr/v1 format and what real devices publish.

Each simulated device is a `ConsumptionModel` (seed = device number), so the
value a message carries is exactly what a test can compute for that instant.
`messages()` builds the (topic, payload) pairs; `main()` publishes them with
QoS 1 to a broker at simulated time (`SimClock`), optionally mixing in
malformed messages to exercise dead-lettering.

    python -m simulators.mqtt_sim --broker 127.0.0.1:1883 --format tasmota --devices 20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from simulators.consumption import ConsumptionModel, SimClock

FORMATS = ("amr", "tasmota", "shelly_gen1", "shelly_gen2", "zigbee2mqtt")
_MSK_OFFSET = timedelta(hours=3)  # Tasmota publishes local time without an offset (Europe/Moscow now)


def device_name(fmt: str, n: int) -> str:
    """The device id a decoder reports for simulated device n of a format."""
    return {
        "amr": f"sim-{n:04d}",
        "tasmota": f"tasmota-{n:04d}",
        "shelly_gen1": f"shellyem-{n:04d}/0",
        "shelly_gen2": f"shellypro3em-{n:04d}/0",
        "zigbee2mqtt": f"plug-{n:04d}",
    }[fmt]


def messages(
    fmt: str, devices: range, t: datetime, models: dict[int, ConsumptionModel], batch: int = 1,
    source: str = "sim",
) -> list[tuple[str, bytes]]:
    """The messages the devices publish at instant t (aware UTC); amr/v1 as gateway `source`."""
    out: list[tuple[str, bytes]] = []
    ts = t.astimezone(UTC)
    if fmt == "amr":
        rows = []
        for n in devices:
            rows.append({"meter": device_name("amr", n), "register": "1.8.0",
                         "ts": ts.isoformat().replace("+00:00", "Z"),
                         "value": str(models[n].energy_kwh(ts))})
        for i in range(0, len(rows), batch):
            body = {"v": 1, "source": source, "readings": rows[i: i + batch]}
            out.append((f"amr/v1/{source}/readings", json.dumps(body, separators=(",", ":")).encode()))
        return out
    for n in devices:
        kwh = models[n].energy_kwh(ts)
        wh = kwh * 1000
        if fmt == "tasmota":
            local = (ts + _MSK_OFFSET).replace(tzinfo=None).isoformat(timespec="seconds")
            body = {"Time": local, "ENERGY": {"TotalStartTime": "2024-01-01T00:00:00", "Total": float(kwh),
                                                "Yesterday": 0.0, "Today": 0.0,
                                                "Power": round(models[n].power_kw(ts) * 1000)}}
            out.append((f"tele/tasmota-{n:04d}/SENSOR", json.dumps(body).encode()))
        elif fmt == "shelly_gen1":
            out.append((f"shellies/shellyem-{n:04d}/emeter/0/total", f"{wh:.1f}".encode()))
        elif fmt == "shelly_gen2":
            body = {"id": 0, "total_act": float(wh), "total_act_ret": 0.0,
                    "a_total_act_energy": float(wh), "a_total_act_ret_energy": 0}
            out.append((f"shellypro3em-{n:04d}/status/emdata:0", json.dumps(body).encode()))
        elif fmt == "zigbee2mqtt":
            body = {"energy": float(kwh), "power": round(models[n].power_kw(ts) * 1000), "linkquality": 120,
                    "last_seen": ts.isoformat()}
            out.append((f"zigbee2mqtt/plug-{n:04d}", json.dumps(body).encode()))
        else:
            raise ValueError(f"unknown simulated format {fmt!r}; known: {', '.join(FORMATS)}")
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
    models = {n: ConsumptionModel(seed=n) for n in range(args.devices)}
    rng = random.Random(args.seed)
    step = timedelta(seconds=args.interval)
    t = start
    rounds = 0
    try:
        while args.rounds == 0 or rounds < args.rounds:
            now = clock.now()
            if t > now:
                time.sleep(min(1.0, clock.wall_seconds(t - now)))
                continue
            sent = 0
            for topic, payload in messages(args.format, range(args.devices), t, models, args.batch):
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
            "or as Tasmota, Shelly Gen1 EM, Shelly Gen2/Pro 3EM or Zigbee2MQTT devices do. "
            "Values follow simulators.consumption (seed = device number), at simulated time."
        ),
    )
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the broker")
    p.add_argument("--format", choices=FORMATS, default="amr")
    p.add_argument("--devices", type=int, default=10, help="number of simulated devices")
    p.add_argument("--interval", type=float, default=1800, help="simulated seconds between publications")
    p.add_argument("--scale", type=float, default=1440, help="simulated seconds per wall second")
    p.add_argument("--start", default=None, help="simulated start time, ISO 8601 with offset (default: a day ago)")
    p.add_argument("--rounds", type=int, default=0, help="publication rounds, 0 = forever")
    p.add_argument("--batch", type=int, default=100, help="readings per amr/v1 message")
    p.add_argument("--faults", type=float, default=0.0, help="share of messages replaced by malformed ones")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault injection")
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
