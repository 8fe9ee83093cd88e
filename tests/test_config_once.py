"""`amr gateway` and `amr collect` read their configuration files once at start and once per reload.

Each daemon runs as a real process with a Python audit hook that records
every `open` of the inventory and of the register-map preset it names; the
test counts them after the daemon is at work (polling, or subscribed) and
again after SIGHUP. Reading a file again at start (four times, once) cost
a gateway's start its time and could mix two versions of a file being
replaced.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from tests.conftest import ROOT, free_port
from tests.daemons import Daemon

# runs the CLI with an audit hook that appends the path of every watched file opened
WRAPPER = """
import os, sys
watch = {os.path.realpath(p) for p in os.environ["AMR_TEST_WATCH"].split(os.pathsep)}
out = open(os.environ["AMR_TEST_OPENS"], "a", buffering=1)
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
        path = os.path.realpath(os.fspath(args[0]))
        if path in watch:
            out.write(path + "\\n")
sys.addaudithook(hook)
from amr.cli import main
sys.exit(main(sys.argv[1:]))
"""

METER = """
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


class Watched(Daemon):
    """A daemon process whose opens of some files are counted."""

    def __init__(self, args: list[str], env: dict[str, str], watch: list[Path], tmp: Path):
        self.opens = tmp / "opens.txt"
        self.opens.touch()
        super().__init__([sys.executable, "-c", WRAPPER, *args],
                         {**env, "AMR_TEST_OPENS": str(self.opens),
                          "AMR_TEST_WATCH": os.pathsep.join(str(p) for p in watch)}, tmp / "daemon.log")

    def count(self, path: Path) -> int:
        target = os.path.realpath(path)
        return sum(1 for line in self.opens.read_text().splitlines() if line == target)


def test_gateway_reads_inventory_and_preset_once_at_start_and_once_per_reload(db_url, tmp_path) -> None:
    from adapters.registermap import load_register_map
    from collector.inventory import load_inventory, upsert_inventory
    from simulators.consumption import SimClock
    from simulators.modbus_sim import ModbusTcpFleet, SimMeter

    rmap = load_register_map("generic_counter")
    preset = ROOT / "adapters" / "presets" / "generic_counter.toml"
    assert preset.exists()
    sim_port = free_port()
    fleet = ModbusTcpFleet({(sim_port, u): SimMeter(u, rmap, SimClock(datetime.now(UTC)), seed=u)
                            for u in (1, 2)}).start()
    inv = tmp_path / "inventory.toml"
    inv.write_text('[[subscriber]]\naccount = "1001"\nplan = "three_zone"\n'
                   + METER.format(id="once-a", port=sim_port, unit=1) + METER.format(id="once-b", port=sim_port, unit=2))
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, load_inventory(inv))

    def stored() -> int:
        with psycopg.connect(db_url) as c:
            return c.execute("SELECT count(DISTINCT ts) FROM reading WHERE meter_id = 'once-a'").fetchone()[0]

    d = Watched(["gateway", "--sink", "direct"],
                {"AMR_DATABASE_URL": db_url, "AMR_INVENTORY": str(inv), "AMR_METRICS_PORT": "0"},
                [inv, preset], tmp_path)
    try:
        d.until(lambda: stored() >= 2, "two polls stored")
        assert (d.count(inv), d.count(preset)) == (1, 1), d.opens.read_text()
        d.proc.send_signal(1)  # SIGHUP, as `systemctl reload amr-gateway` sends it
        d.until(lambda: "configuration reloaded" in d.text(), "the reload")
        polled = stored()
        d.until(lambda: stored() >= polled + 1, "a poll after the reload")
        assert (d.count(inv), d.count(preset)) == (2, 2), d.opens.read_text()
    finally:
        d.stop()
        fleet.stop()


def test_collector_reads_the_inventory_once_at_start_and_once_per_reload(db_url, tmp_path, broker) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text('[[subscriber]]\naccount = "1"\n\n[[meter]]\naccount = "1"\nid = "once-p"\n'
                   'adapter = "mqtt"\ndevice = "plug-once"\n')
    d = Watched(["collect", "--workers", "1"],
                {"AMR_DATABASE_URL": db_url, "AMR_INVENTORY": str(inv), "AMR_METRICS_PORT": "0",
                 "AMR_MQTT_URL": f"mqtt://collector@127.0.0.1:{broker.port}", "AMR_MQTT_GROUP": "once"},
                [inv], tmp_path)
    try:
        d.until(lambda: "subscribed to" in d.text(), "the collector to subscribe")
        assert d.count(inv) == 1, d.opens.read_text()
        d.proc.send_signal(1)
        d.until(lambda: "collector configuration reloaded" in d.text(), "the reload")
        assert d.count(inv) == 2, d.opens.read_text()
    finally:
        d.stop()
