"""The TOML inventory: every problem named with file, entry and key; upsert."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from collector.inventory import InventoryError, load_inventory, normalize_account

GOOD = """
[[subscriber]]
account = "000123"
metering = "amr"
plan = "three_zone"
category = "gas_stove"
area = "urban"

[[meter]]
id = "m-0001"
account = "123"
adapter = "modbus_tcp"
preset = "eastron_sdm630"
host = "127.0.0.1"
port = 502
unit = 1
interval = "30m"
multiplier = 1
rollover = 1000000
installed = "2026-01-01T00:00:00+03:00"
"""


def test_leading_zeros_are_not_significant() -> None:
    assert normalize_account("000123") == normalize_account(123) == "123"
    assert normalize_account("0000") == "0"
    with pytest.raises(ValueError):
        normalize_account("12a")


def test_every_problem_is_named(tmp_path) -> None:
    f = tmp_path / "inv.toml"
    f.write_text(
        GOOD
        + '\n[[meter]]\nid = "m-0002"\naccount = "999"\ninterval = "3x"\nmultiplier = -1\n'
        + 'installed = "2026-01-01T00:00:00"\ncolour = "red"\n'
    )
    with pytest.raises(InventoryError) as err:
        load_inventory(f)
    text = str(err.value)
    assert f"{f}: meter[1] (id 'm-0002'): key 'interval': invalid duration '3x'" in text
    assert "key 'multiplier'" in text
    assert "key 'installed': timestamp needs an offset" in text
    assert "key 'colour': Extra inputs are not permitted" in text


def test_unknown_account_and_bad_toml(tmp_path) -> None:
    f = tmp_path / "inv.toml"
    f.write_text(GOOD.replace('account = "123"', 'account = "124"'))
    with pytest.raises(InventoryError, match="key 'account': no subscriber '124'"):
        load_inventory(f)
    f.write_text("[[meter]\n")
    with pytest.raises(InventoryError, match="not valid TOML"):
        load_inventory(f)


def test_cli_load_upserts(db_url, conn, tmp_path) -> None:
    f = tmp_path / "inv.toml"
    f.write_text(GOOD)
    env = {**os.environ, "AMR_DATABASE_URL": db_url}
    run = lambda *a: subprocess.run([sys.executable, "-m", "amr.cli", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    res = run("inventory", "load", str(f))
    assert res.returncode == 0, res.stderr
    res = run("inventory", "load", str(f))  # twice: an upsert
    assert "loaded 1 subscribers and 1 meters" in res.stdout
    assert conn.execute("SELECT account, plan FROM subscriber").fetchall() == [("123", "three_zone")]
    assert conn.execute("SELECT id, interval_s FROM meter").fetchall() == [("m-0001", 1800)]
    f.write_text(GOOD.replace('plan = "three_zone"', 'plan = "four_zone"'))
    res = run("inventory", "load", str(f))
    assert res.returncode == 2 and "subscriber[0] (account '000123'): key 'plan'" in res.stderr


def test_cli_check_runs_the_adapter_checks(tmp_path) -> None:
    f = tmp_path / "inv.toml"
    f.write_text(GOOD.replace('preset = "eastron_sdm630"', 'preset = "no_such_meter"'))
    res = subprocess.run([sys.executable, "-m", "amr.cli", "inventory", "check", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "m-0001" in res.stderr and "no_such_meter" in res.stderr
    f.write_text(GOOD)
    res = subprocess.run([sys.executable, "-m", "amr.cli", "inventory", "check", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "1 subscribers, 1 meters: OK" in res.stdout
