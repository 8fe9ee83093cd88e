"""`amr mqtt listen` against the simulators of every family, and the collector subscribing to the layouts.

A Mosquitto of the test's own; the simulators' command line publishes each
family in its default topic layout and in layouts people configure. What
`amr mqtt listen` writes must pass `amr inventory check` as it is, and must
map every simulated device to a meter with the simulated value. Then the
collector, given an inventory with custom layouts, subscribes to what they need
(not to fixed filters) and stores what the devices publish there; a SIGHUP
that adds a layout subscribes to it without a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg

from adapters import mqtt_formats as fmt
from adapters.reading import Reading
from collector.inventory import load_inventory, parse_inventory, upsert_inventory
from simulators import mqtt_sim
from simulators.consumption import ConsumptionModel
from tests.conftest import ROOT

T0 = datetime(2026, 2, 10, 8, 30, tzinfo=UTC)

# (simulated format, topic prefix, Tasmota FullTopic): every family, default and configured layouts
CASES = [
    ("tasmota", None, None),
    ("tasmota", None, "tasmota/%topic%/%prefix%/"),
    ("tasmota_tariff", "home/tele", None),
    ("tasmota_sml", None, "zaehler/%topic%/%prefix%/"),
    ("shelly_gen1", None, None),
    ("shelly_gen1", "shellies/shellies", None),
    ("shelly_gen2", None, None),
    ("shelly_switch", "home/garage", None),
    ("shelly_pm1", None, None),
    ("shelly_em1data", "haus/keller", None),
    ("zigbee2mqtt", None, None),
    ("zigbee2mqtt", "home/zigbee", None),
    ("esphome", None, None),
    ("esphome", "esphome/attic", None),
    ("homeassistant", None, None),
    ("homeassistant", "energy/bridge2", None),
]


def _env(port: int, **more: str) -> dict[str, str]:
    return {**os.environ, "AMR_MQTT_URL": f"mqtt://127.0.0.1:{port}", "PYTHONPATH": str(ROOT),
            "AMR_LOG_FORMAT": "text", **more}


def _simulate(port: int, start: datetime, numbered) -> None:
    """The simulators of (device number, case) pairs, one device each, all at once, through their command line."""
    procs = []
    for n, (sim, prefix, full) in numbered:
        argv = [sys.executable, "-m", "simulators.mqtt_sim", "--broker", f"127.0.0.1:{port}", "--format", sim,
                "--devices", "1", "--first", str(n), "--rounds", "1", "--start", start.isoformat(),
                "--client-id", f"sim-{n}-{start.timestamp():.0f}"]
        argv += ["--topic-prefix", prefix] if prefix else []
        argv += ["--fulltopic", full] if full else []
        procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err


def _expected(start: datetime, cases=CASES) -> dict[str, Decimal]:
    return {mqtt_sim.device_name(sim, n, prefix): ConsumptionModel(seed=n).energy_kwh(start)
            for n, (sim, prefix, _) in enumerate(cases)}


def test_listen_lists_every_family_and_its_entries_pass_inventory_check(broker, tmp_path):
    out = tmp_path / "heard.toml"
    listen = subprocess.Popen(
        [sys.executable, "-m", "amr.cli", "mqtt", "listen", "--seconds", "120", "--toml", str(out)],
        cwd=ROOT, env=_env(broker.port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "listening" in listen.stderr.readline()  # said once the broker confirmed the subscription
    _simulate(broker.port, T0, enumerate(CASES))
    time.sleep(1.0)  # what the simulators had acknowledged reaches the listener
    listen.send_signal(signal.SIGINT)  # Ctrl-C: it reports what it heard
    report, err = listen.communicate(timeout=60)
    assert listen.returncode == 0, err + report
    check = subprocess.run([sys.executable, "-m", "amr.cli", "inventory", "check", str(out)],
                           cwd=ROOT, env=_env(broker.port), capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr + out.read_text()

    inv = load_inventory(out)
    dm = fmt.DeviceMap(inv.meters.values(), inv.mqtt_layouts)
    assert dm.warnings == []
    expected = _expected(T0)
    assert {m.device for m in inv.meters.values()} == set(expected), report
    for family in ("tasmota", "shelly", "zigbee2mqtt", "esphome", "homeassistant"):
        assert f"  {family}" in report
    # the ESPHome node's temperature is heard and said why it is no meter's; em1:N is counted as ignored
    assert "not placed: esphome/attic/meter-0013/sensor/temperature/state" in report
    assert "does not say energy" in report

    # what the entries say places every simulated message, for the meter of its device, with its value
    by_device = {m.device: m.id for m in inv.meters.values()}
    got: dict[str, Decimal] = {}
    for n, (sim, prefix, full) in enumerate(CASES):
        models = {n: ConsumptionModel(seed=n)}
        for topic, payload in mqtt_sim.messages(sim, range(n, n + 1), T0, models, prefix=prefix, fulltopic=full):
            d = fmt.decode(topic, payload, T0, layouts=dm.layouts)
            if d.ignored or topic.endswith("/temperature/state"):
                continue
            items = fmt.to_items(d, payload, dm)
            assert items and all(isinstance(i, Reading) for i in items), (topic, items)
            for i in items:
                assert i.meter_id == by_device[mqtt_sim.device_name(sim, n, prefix)]
                if i.register == "1.8.0":
                    got[mqtt_sim.device_name(sim, n, prefix)] = i.value
    assert got == expected
    tariff = next(m for m in inv.meters.values() if m.device == mqtt_sim.device_name("tasmota_tariff", 2, "home/tele"))
    assert set(tariff.registers) == {"1.8.0", "1.8.1", "1.8.2"} and tariff.topic_prefix == "home/tele"
    sml = next(m for m in inv.meters.values() if m.device == mqtt_sim.device_name("tasmota_sml", 3))
    assert sml.fields == {"MT631.Total_in": "1.8.0", "MT631.Total_out": "2.8.0"}


def test_listen_without_a_broker_says_so(tmp_path):
    from tests.conftest import free_port

    r = subprocess.run([sys.executable, "-m", "amr.cli", "mqtt", "listen", "--seconds", "1"], cwd=ROOT,
                       env=_env(free_port()), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no connection to mqtt://127.0.0.1" in r.stderr and "Traceback" not in r.stderr


# --- the collector subscribes to what the inventory's layouts need ------------------------------


def _toml(meters: list[dict]) -> str:
    lines = ['[[subscriber]]\naccount = "1"\n']
    for m in meters:
        lines.append("[[meter]]")
        for k, v in m.items():
            if isinstance(v, dict):
                lines.append(f"{k} = {{ " + ", ".join(f"{json.dumps(a)} = {json.dumps(b)}" for a, b in v.items()) + " }")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    return "\n".join(lines)


def _inventory(db_url: str, path: Path, cases) -> None:
    meters = [{"id": f"lay-{n}", "account": "1", **mqtt_sim.meter_keys(sim, n, prefix, full)}
              for n, (sim, prefix, full) in cases]
    path.write_text(_toml(meters))
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, parse_inventory({"subscriber": [{"account": "1"}], "meter": meters}))


def _stored(db_url: str) -> dict[tuple[str, str], Decimal]:
    with psycopg.connect(db_url) as c:
        rows = c.execute("SELECT meter_id, register, value FROM reading WHERE meter_id LIKE 'lay-%'").fetchall()
    return {(m, r): v for m, r, v in rows}


def _wait(db_url: str, want: int, timeout: float = 30) -> dict[tuple[str, str], Decimal]:
    deadline = time.monotonic() + timeout
    while True:
        got = _stored(db_url)
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_collector_subscribes_to_the_inventorys_layouts_and_to_new_ones_on_sighup(db_url, broker, tmp_path):
    from tests.test_mqtt_collector import Collector

    custom = [(n, c) for n, c in enumerate(CASES) if c[1] or c[2] or c[0] in ("esphome", "homeassistant")]
    first, later = custom[:-2], custom[-2:]
    inv = tmp_path / "inventory.toml"
    _inventory(db_url, inv, first)
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-layouts", inv)
    start = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=0)
    try:
        log = "".join(c.lines)
        for n, (sim, prefix, full) in first:
            keys = mqtt_sim.meter_keys(sim, n, prefix, full)
            fmts = fmt.formats_named(keys["format"])
            lay = fmt.layout_for(fmts[0], topic=keys.get("topic") or (
                fmt.exact_topic(fmts[0], keys["device"]) if not fmts[0].auto else None),
                prefix=keys.get("topic_prefix"), device=keys["device"])
            assert all(f in log for f in lay.filters), (lay.filters, log)  # subscribed to that layout
        _simulate(broker.port, start, first)
        want = {(f"lay-{n}", "1.8.0"): ConsumptionModel(seed=n).energy_kwh(start) for n, _ in first}
        got = _wait(db_url, len(want) + 2)  # the tariff meter has 1.8.1 and 1.8.2 too
        assert {k: v for k, v in got.items() if k[1] == "1.8.0"} == want, "".join(c.lines)

        # a meter in a layout nothing subscribes to yet: its messages are not even received...
        _simulate(broker.port, start, later)
        time.sleep(1.0)
        assert not {k for k in _stored(db_url) if k[0] in {f"lay-{n}" for n, _ in later}}
        with psycopg.connect(db_url) as conn:  # not received at all: not even refused
            assert conn.execute("SELECT count(*) FROM rejected_reading WHERE source LIKE '%meter-001%'"
                                ).fetchone() == (0,)
        # ...until the inventory names it: SIGHUP subscribes to its layout, no restart
        _inventory(db_url, inv, first + later)
        c.proc.send_signal(signal.SIGHUP)
        c.wait_log("collector configuration reloaded")
        c.wait_log("topic filters changed")
        t2 = start + timedelta(hours=1)
        _simulate(broker.port, t2, later)
        want2 = {(f"lay-{n}", "1.8.0"): ConsumptionModel(seed=n).energy_kwh(t2) for n, _ in later}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not want2.items() <= _stored(db_url).items():
            time.sleep(0.2)
        assert want2.items() <= _stored(db_url).items(), "".join(c.lines)
    finally:
        log = c.stop()
    assert c.proc.returncode == 0, log
