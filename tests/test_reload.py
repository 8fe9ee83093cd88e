"""Reload on SIGHUP: build, validate, swap atomically; on error keep the old and say why."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from collector.reload import ConfigError, Reloader, diff, load_runtime_config

ROOT = Path(__file__).resolve().parent.parent
TARIFFS = ROOT / "billing" / "catalogues" / "example.toml"

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
    r = Reloader(lambda: load_runtime_config(inv, TARIFFS), lambda old, new: applied.append(diff(old, new)))
    return inv, r, applied


def test_loads_inventory_presets_and_tariffs(tmp_path):
    _, r, applied = make(tmp_path)
    cfg = r.current
    assert set(cfg.meters) == {"m-1"}
    assert cfg.presets["eastron_sdm630"].model
    assert len(cfg.tariffs) > 0
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


def test_broken_tariffs_refuse_the_whole_reload(tmp_path):
    inv = tmp_path / "inventory.toml"
    tariffs = tmp_path / "tariffs.toml"
    write(inv, BASE)
    write(tariffs, TARIFFS.read_text())
    r = Reloader(lambda: load_runtime_config(inv, tariffs))
    write(inv, ADDED)
    write(tariffs, '[[tariff]]\nfrom = "2026-01-01"\nto = "2025-01-01"\nplan = "single"\n')
    assert r.reload() is False
    assert set(r.current.meters) == {"m-1"}  # inventory change not half-applied
    with pytest.raises(ConfigError):
        load_runtime_config(inv, tariffs)


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
