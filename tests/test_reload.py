"""Reload on SIGHUP: build, validate, swap atomically; on error keep the old and say why."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from amr.reload import ConfigError, Reloader
from collector.config import diff, load_runtime_config

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[[subscriber]]
account = "1001"
plan = "three_zone"

[[meter]]
id = "m-1"
account = "1001"
adapter = "modbus_tcp"
host = "127.0.0.1"
port = 5020
preset = "eastron_sdm630"
"""

ADDED = BASE + """
[[meter]]
id = "m-2"
account = "1001"
adapter = "iec62056"
port = "/dev/ttyS9"
"""


def reloads(outcome: str) -> float:
    return REGISTRY.get_sample_value("amr_config_reloads_total", {"outcome": outcome}) or 0.0


def write(path: Path, text: str) -> None:
    """Replace a file the way an editor or config manager should: write aside, rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def make(tmp_path: Path, text: str = BASE):
    inv = tmp_path / "inventory.toml"
    write(inv, text)
    applied: list = []
    r = Reloader(lambda: load_runtime_config(inv), lambda old, new: applied.append(diff(old, new)))
    return inv, r, applied


def test_loads_inventory_and_presets(tmp_path):
    _, r, applied = make(tmp_path)
    cfg = r.current
    assert set(cfg.meters) == {"m-1"}
    assert cfg.presets["eastron_sdm630"].model
    assert applied[0].added == {"m-1"}
    assert REGISTRY.get_sample_value("amr_meters_configured", {"adapter": "modbus_tcp"}) == 1


def test_sighup_swaps_in_the_new_configuration(tmp_path):
    inv, r, applied = make(tmp_path)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        r.install_sighup()
        write(inv, ADDED)
        ok_before = reloads("ok")
        os.kill(os.getpid(), signal.SIGHUP)  # a real signal to this process
        deadline = time.monotonic() + 5
        while not r.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.reload_if_requested() is True
        assert r.reload_if_requested() is None  # the request was consumed
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert set(r.current.meters) == {"m-1", "m-2"}
    assert applied[-1].added == {"m-2"} and not applied[-1].removed and not applied[-1].changed
    assert r.generation == 2
    assert reloads("ok") == ok_before + 1


def test_broken_inventory_keeps_the_old_one_and_logs_every_problem(tmp_path, caplog):
    inv, r, applied = make(tmp_path)
    old = r.current
    errors_before = reloads("error")
    write(inv, BASE.replace('preset = "eastron_sdm630"', 'preset = "no_such_meter"') + '\n[[meter]]\nid = "m-3"\naccount = "999"\n')
    with caplog.at_level(logging.ERROR, logger="amr.reload"):
        assert r.reload() is False
    assert r.current is old  # untouched, not a mixture
    assert len(applied) == 1  # the daemon was never told about the broken one
    assert reloads("error") == errors_before + 1
    message = caplog.records[-1].getMessage()
    assert "keeping the one in use" in message
    assert "no_such_meter" in message and "m-1" in message  # the preset problem names the meter
    assert "'999'" in message  # and the unknown subscriber of m-3, in the same round
    # fixed file: the next reload goes through
    write(inv, ADDED)
    assert r.reload() is True and set(r.current.meters) == {"m-1", "m-2"}


def test_a_broken_preset_refuses_the_whole_reload(tmp_path):
    """A new meter whose preset is missing: the inventory's other change is not half-applied."""
    inv = tmp_path / "inventory.toml"
    write(inv, BASE)
    r = Reloader(lambda: load_runtime_config(inv))
    write(inv, ADDED + '\n[[meter]]\nid = "m-3"\naccount = "1001"\nadapter = "modbus_tcp"\n'
          'host = "127.0.0.1"\nunit = 3\npreset = "no_such_meter"\n')
    assert r.reload() is False
    assert set(r.current.meters) == {"m-1"}
    with pytest.raises(ConfigError, match="no_such_meter"):
        load_runtime_config(inv)


def test_apply_may_refuse(tmp_path):
    inv = tmp_path / "inventory.toml"
    write(inv, BASE)

    def apply(old, new):
        if old is not None and "m-2" in new.meters:
            raise ValueError("meter 'm-2': port /dev/ttyS9 cannot be opened")

    r = Reloader(lambda: load_runtime_config(inv), apply)
    write(inv, ADDED)
    assert r.reload() is False
    assert "ttyS9" in (r.last_error or "")
    assert set(r.current.meters) == {"m-1"}


def test_changed_meter_is_reported(tmp_path):
    inv, r, applied = make(tmp_path)
    write(inv, BASE.replace("port = 5020", "port = 5021"))
    assert r.reload()
    assert applied[-1].changed == {"m-1"}
    write(inv, BASE.replace("port = 5020", "port = 5021").replace('id = "m-1"', 'id = "m-9"'))
    assert r.reload()
    assert applied[-1].added == {"m-9"} and applied[-1].removed == {"m-1"}


def test_sighup_on_an_asyncio_loop(tmp_path):
    inv, r, _ = make(tmp_path)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        r.install_sighup(loop)
        try:
            write(inv, ADDED)
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(500):
                if r.generation == 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert r.generation == 2
    assert set(r.current.meters) == {"m-1", "m-2"}


# --- a running gateway: reload while readings wait in its spool ---------------------------

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
        GW_METER.format(id=mid, port=port, unit=unit) for mid, unit in meters
    )


def _until(check, what: str, timeout: float = 25.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_gateway_reload_keeps_every_buffered_reading(db_url, conn, tmp_path):
    import subprocess
    import sys
    from datetime import UTC, datetime

    import psycopg

    from adapters.reading import Reading
    from adapters.registermap import load_register_map
    from collector.gateway.spool import Spool
    from collector.inventory import load_inventory, upsert_inventory
    from simulators.consumption import SimClock
    from simulators.modbus_sim import ModbusTcpFleet, SimMeter
    from tests.conftest import free_port
    from tests.test_metrics_scrape import scrape, value

    rmap = load_register_map("generic_counter")
    port = free_port()
    fleet = ModbusTcpFleet({(port, u): SimMeter(u, rmap, SimClock(datetime.now(UTC)), seed=u) for u in (1, 2)}).start()
    inv = tmp_path / "inventory.toml"
    write(inv, _gw_inventory(port, ("gw-a", 1), ("gw-b", 2)))
    upsert_inventory(conn, load_inventory(inv))  # both meters known to the database
    conn.commit()
    write(inv, _gw_inventory(port, ("gw-a", 1)))
    spool_path = tmp_path / "spool.sqlite"
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMR_")}
    env |= {"AMR_DATABASE_URL": db_url, "AMR_INVENTORY": str(inv), "AMR_SPOOL_PATH": str(spool_path),
            "AMR_METRICS_PORT": str(metrics_port), "AMR_LOG_FORMAT": "json"}
    log_path = tmp_path / "gateway.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from amr.cli import main; raise SystemExit(main())",
         "gateway", "--sink", "spool", "--jitter", "0"],
        env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    admin_url = psycopg.conninfo.make_conninfo(**{**info, "dbname": "postgres"})

    def count(meter: str) -> int:
        with psycopg.connect(db_url) as c:
            return c.execute("SELECT count(*) FROM reading WHERE meter_id = %s", (meter,)).fetchone()[0]

    def metric(name: str, **labels: str) -> float:
        try:
            return value(scrape(metrics_port), name, **labels)
        except OSError:
            return -1

    def set_connections(allowed: bool) -> None:
        with psycopg.connect(admin_url, autocommit=True) as a:
            a.execute(f'ALTER DATABASE "{info["dbname"]}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            if not allowed:
                a.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (info["dbname"],))

    conn.close()
    try:
        _until(lambda: count("gw-a") >= 2, "gw-a readings in the database")
        # the database goes away: readings pile up in the spool
        set_connections(False)
        try:
            _until(lambda: metric("amr_spool_depth") >= 3, "readings buffered in the spool")
            # reload: gw-a removed, gw-b added, while gw-a's readings still wait in the spool
            write(inv, _gw_inventory(port, ("gw-b", 2)))
            proc.send_signal(signal.SIGHUP)
            _until(lambda: metric("amr_config_reloads_total", outcome="ok") == 1, "the reload")
            # a broken file: refused, the running configuration stays
            write(inv, _gw_inventory(port, ("gw-b", 2)).replace("generic_counter", "no_such_preset"))
            proc.send_signal(signal.SIGHUP)
            _until(lambda: metric("amr_config_reloads_total", outcome="error") == 1, "the refused reload")
            # what waits in the spool now, read from the spool file itself
            spool = Spool(spool_path)
            try:
                buffered = {(e.item.meter_id, e.item.ts) for e in spool.peek(100_000) if isinstance(e.item, Reading)}
            finally:
                spool.close()
            assert any(m == "gw-a" for m, _ in buffered), "no reading of gw-a was waiting"
        finally:
            set_connections(True)
        _until(lambda: metric("amr_spool_depth") == 0 and count("gw-b") >= 2, "the spool drained, gw-b stored")
        assert proc.poll() is None, "the gateway died on a reload"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        fleet.stop()
    with psycopg.connect(db_url) as c:
        stored = {(m, ts) for m, ts in c.execute("SELECT meter_id, ts FROM reading").fetchall()}
        a_ts = [r[0] for r in c.execute("SELECT ts FROM reading WHERE meter_id = 'gw-a' ORDER BY ts").fetchall()]
    missing = buffered - stored
    assert not missing, f"buffered readings lost over the reload: {sorted(missing)[:5]}"
    # gw-a was read every slot until it was removed: no hole around the reload
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(a_ts)]
    assert gaps and max(gaps) <= 4.0, gaps
    log_text = log_path.read_text()
    assert "reload refused, keeping the one in use" in log_text and "no_such_preset" in log_text
    assert "Traceback" not in log_text
