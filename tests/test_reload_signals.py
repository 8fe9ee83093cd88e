"""Every daemon survives the reload signal its systemd unit sends, and the reload takes effect.

The signal is read from the unit file itself (ExecReload=/bin/kill -HUP
$MAINPID), the command from its ExecStart and the environment from the
example of its EnvironmentFile (deploy/examples/<name>.env), pointed at this
test's database, broker and free ports; so a unit and its daemon cannot drift
apart without this failing. Each daemon runs as a real process, is sent the
signal, and must still be alive and answering afterwards with the changed
file in effect; a broken file sent the same way keeps the old configuration.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, free_port
from tests.daemons import Daemon

SYSTEMD = ROOT / "deploy" / "systemd"
EXAMPLES = ROOT / "deploy" / "examples"
DAEMON_UNITS = ("amr-gateway.service", "amr-collector.service", "amr-api.service")


# --- the unit files ---------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (a key may repeat), as systemd reads them (no line continuations here)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert section is not None, f"{path.name}: {line!r} outside a section"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def reload_signal(service: dict[str, list[str]]) -> signal.Signals | None:
    """The signal `systemctl reload` sends: ExecReload must be `kill -SIG $MAINPID` (or none at all)."""
    lines = service.get("ExecReload", [])
    if not lines:
        return None
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0].lstrip("-@:+!"))
    assert Path(argv[0]).name == "kill" and argv[-1] == "$MAINPID", f"ExecReload is not a kill: {lines[0]}"
    args = argv[1:-1]
    if args[:1] == ["-s"]:
        name = args[1]
    elif args and args[0].startswith("--signal="):
        name = args[0].split("=", 1)[1]
    else:
        assert len(args) == 1 and args[0].startswith("-"), lines[0]
        name = args[0][1:]
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def example_env(service: dict[str, list[str]]) -> dict[str, str]:
    """The variables of the unit's EnvironmentFile, from its example in deploy/examples."""
    (path,) = service["EnvironmentFile"]
    env = {}
    for line in (EXAMPLES / Path(path.lstrip("-")).name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def command(service: dict[str, list[str]]) -> list[str]:
    """ExecStart with the installed `amr` replaced by this checkout's."""
    (line,) = service["ExecStart"]
    argv = shlex.split(line)
    assert Path(argv[0]).name == "amr", line
    return [sys.executable, "-m", "amr.cli", *argv[1:]]


def test_every_unit_reloads_only_a_daemon_that_handles_it() -> None:
    """A oneshot has no ExecReload; every long-running daemon has one that sends a signal it handles
    (the example units under deploy/examples too)."""
    seen = set()
    for path in sorted(SYSTEMD.glob("*.service")) + sorted((ROOT / "deploy" / "examples").rglob("*.service")):
        service = parse_unit(path)["Service"]
        sig = reload_signal(service)
        if service.get("Type", ["simple"])[0] == "oneshot":
            assert sig is None, f"{path.name}: a oneshot has nothing running to reload"
            continue
        assert sig is signal.SIGHUP, f"{path.name}: the daemons reload on SIGHUP, the unit sends {sig}"
        assert command(service)[3] in ("gateway", "collect", "api"), path.name
        seen.add(path.name)
    assert seen == {*DAEMON_UNITS, "amr-collector@.service"}


# --- the daemons ---------------------------------------------------------------------------

def metric(port: int, name: str, **labels: str) -> float | None:
    """Sum of a metric's samples with these labels; None when /metrics does not answer."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return None
    total = 0.0
    for m in re.finditer(rf"^{name}(?:{{(.*?)}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def write(path: Path, text: str) -> None:
    """Replace a file as a config manager should: write aside, rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def unit(name: str) -> tuple[dict[str, list[str]], signal.Signals]:
    service = parse_unit(SYSTEMD / name)["Service"]
    sig = reload_signal(service)
    assert sig is not None, f"{name} has no ExecReload"
    return service, sig


def test_api_survives_its_reload_signal_and_takes_the_new_tokens(db_url, conn, tmp_path) -> None:
    from tests.test_billing import add_subscriber

    add_subscriber(conn, "123", "single")
    service, sig = unit("amr-api.service")
    tokens = tmp_path / "api-tokens.toml"
    write(tokens, '[[token]]\nname = "old"\ntoken = "old-token-1"\naccounts = ["123"]\n')
    port, metrics_port = free_port(), free_port()
    env = example_env(service) | {"AMR_DATABASE_URL": db_url, "AMR_API_TOKENS": str(tokens),
                                  "AMR_METRICS_PORT": str(metrics_port)}
    argv = command(service)
    argv[argv.index("--port") + 1] = str(port)
    d = Daemon(argv, env, tmp_path / "api.log")
    try:
        def status(token: str) -> int | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/accounts/123", timeout=5,
                                 headers={"Authorization": f"Bearer {token}"}).status_code
            except httpx.TransportError:
                return None

        d.until(lambda: status("old-token-1") == 200, "the API to answer")
        write(tokens, '[[token]]\nname = "new"\ntoken = "new-token-2"\naccounts = ["123"]\n')
        d.signal(sig)
        d.until(lambda: status("new-token-2") == 200, "the new token to be accepted")
        assert status("old-token-1") == 401
        assert metric(metrics_port, "amr_config_reloads_total", outcome="ok") == 1
        # a broken file and an empty one (half-written) keep the tokens in use, and say why
        for broken in ('[[token]\nname = "x"', ""):
            write(tokens, broken)
            d.signal(sig)
        d.until(lambda: metric(metrics_port, "amr_config_reloads_total", outcome="error") == 2,
                "both broken reloads to be refused")
        assert status("new-token-2") == 200
        log = d.text()
        assert log.count("API tokens reload refused") == 2, log
        assert "not valid TOML" in log and "names no token" in log
    finally:
        log = d.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: systemd counts that a clean stop
    assert d.proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log
    assert "new-token-2" not in log and "old-token-1" not in log


GW_METER = """
[[meter]]
id = "{id}"
account = "1001"
adapter = "modbus_tcp"
preset = "generic_counter"
host = "127.0.0.1"
port = {port}
unit = {unit}
interval = "2s"
timeout = 0.5
"""


def _gw_inventory(port: int, *meters: tuple[str, int]) -> str:
    return '[[subscriber]]\naccount = "1001"\nplan = "three_zone"\n' + "".join(
        GW_METER.format(id=mid, port=port, unit=u) for mid, u in meters)


def test_gateway_survives_its_reload_signal_and_polls_the_new_inventory(tmp_path, broker) -> None:
    from adapters.registermap import load_register_map
    from simulators.consumption import SimClock
    from simulators.modbus_sim import ModbusTcpFleet, SimMeter

    service, sig = unit("amr-gateway.service")
    rmap = load_register_map("generic_counter")
    sim_port = free_port()
    fleet = ModbusTcpFleet({(sim_port, u): SimMeter(u, rmap, SimClock(datetime.now(UTC)), seed=u)
                            for u in (1, 2)}).start()
    inv = tmp_path / "inventory.toml"
    write(inv, _gw_inventory(sim_port, ("hup-a", 1)))
    metrics_port = free_port()
    env = example_env(service)
    env.pop("AMR_MQTT_CA")  # the test broker speaks plain MQTT
    env |= {"AMR_INVENTORY": str(inv), "AMR_SPOOL_PATH": str(tmp_path / "spool.sqlite"),
            "AMR_MQTT_URL": f"mqtt://gateway-01@127.0.0.1:{broker.port}", "AMR_METRICS_PORT": str(metrics_port)}
    d = Daemon(command(service), env, tmp_path / "gateway.log")
    try:
        d.until(lambda: (metric(metrics_port, "amr_polls_total", outcome="ok") or 0) >= 1, "a first poll")
        write(inv, _gw_inventory(sim_port, ("hup-a", 1), ("hup-b", 2)))
        d.signal(sig)
        d.until(lambda: metric(metrics_port, "amr_config_reloads_total", outcome="ok") == 1, "the reload")
        assert metric(metrics_port, "amr_meters_configured", adapter="modbus_tcp") == 2
        polled = metric(metrics_port, "amr_polls_total", outcome="ok") or 0
        d.until(lambda: (metric(metrics_port, "amr_polls_total", outcome="ok") or 0) >= polled + 2,
                "polls of both meters after the reload")
        write(inv, "[[meter]]\nid = ")  # broken: the two meters stay
        d.signal(sig)
        d.until(lambda: metric(metrics_port, "amr_config_reloads_total", outcome="error") == 1,
                "the broken reload to be refused")
        assert metric(metrics_port, "amr_meters_configured", adapter="modbus_tcp") == 2
        assert "configuration reloaded: 2 meters polled" in d.text()
    finally:
        log = d.stop()
        fleet.stop()
    assert d.proc.returncode == 0, log
    assert "change-me" not in log  # the broker password of the unit's environment


def test_collector_survives_its_reload_signal_and_maps_the_new_device(db_url, tmp_path, broker) -> None:
    import paho.mqtt.client as mqtt

    from collector.inventory import load_inventory, upsert_inventory

    service, sig = unit("amr-collector.service")
    one = '[[subscriber]]\naccount = "1"\n\n[[meter]]\naccount = "1"\nid = "hup-a"\nadapter = "mqtt"\ndevice = "plug-a"\n'
    two = one + '\n[[meter]]\naccount = "1"\nid = "hup-b"\nadapter = "mqtt"\ndevice = "plug-b"\n'
    inv = tmp_path / "inventory.toml"
    write(inv, two)
    with psycopg.connect(db_url) as c:  # both meters known to the database, only one to the collector
        upsert_inventory(c, load_inventory(inv))
    write(inv, one)
    metrics_port = free_port()
    env = example_env(service)
    env.pop("AMR_MQTT_CA")
    env |= {"AMR_DATABASE_URL": db_url, "AMR_INVENTORY": str(inv), "AMR_MQTT_GROUP": "hup",
            "AMR_MQTT_URL": f"mqtt://collector@127.0.0.1:{broker.port}", "AMR_METRICS_PORT": str(metrics_port)}
    d = Daemon(command(service), env, tmp_path / "collector.log")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hup-pub", protocol=mqtt.MQTTv5)
    try:
        d.until(lambda: "subscribed to" in d.text(), "the collector to subscribe")
        write(inv, two)
        d.signal(sig)
        d.until(lambda: "collector configuration reloaded" in d.text(), "the reload")
        assert metric(metrics_port, "amr_config_reloads_total", outcome="ok") == 1
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        ts = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
        pub.publish("zigbee2mqtt/plug-b", json.dumps({"energy": 2.5, "last_seen": ts.isoformat()}),
                    qos=1).wait_for_publish(10)

        def stored() -> list:
            with psycopg.connect(db_url) as c:
                return c.execute("SELECT meter_id, value FROM reading WHERE meter_id = 'hup-b'").fetchall()

        rows = d.until(stored, "the new device's reading to be stored")
        assert [(m, float(v)) for m, v in rows] == [("hup-b", 2.5)]
        write(inv, "[[meter]\n")
        d.signal(sig)
        d.until(lambda: metric(metrics_port, "amr_config_reloads_total", outcome="error") == 1,
                "the broken reload to be refused")
    finally:
        pub.loop_stop()
        pub.disconnect()
        log = d.stop()
    assert d.proc.returncode == 0, log
    assert "change-me" not in log


@pytest.mark.parametrize("name", DAEMON_UNITS)
def test_each_daemon_unit_has_a_survival_test(name: str) -> None:
    """A daemon unit added later needs a test above: this names the ones there are."""
    tests = {"amr-api.service": test_api_survives_its_reload_signal_and_takes_the_new_tokens,
             "amr-gateway.service": test_gateway_survives_its_reload_signal_and_polls_the_new_inventory,
             "amr-collector.service": test_collector_survives_its_reload_signal_and_maps_the_new_device}
    service, _ = unit(name)
    assert command(service)[3] in tests[name].__name__
