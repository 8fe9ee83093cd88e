"""`amr poll` reads a SPODES meter once and `amr scan --dlms` finds meters by physical address.

Against the SPODES simulator on a paced pty (HDLC, 9600 baud), through the
real command line entry point.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from amr.cli import main
from simulators.dlms_sim import HdlcMeterLine, SimMeter


def _inventory(path: Path, device: str, password: str = "12345678") -> Path:
    path.write_text(
        '[[subscriber]]\naccount = "1"\n\n'
        f'[[meter]]\nid = "sp"\naccount = "1"\nadapter = "dlms"\nport = "{device}"\nbaudrate = 9600\n'
        f'physical_address = 18\npassword = "{password}"\nregisters = ["1.8.0", "1.8.1"]\n',
        encoding="utf-8",
    )
    return path


def test_amr_poll_prints_every_tariff_and_the_clock(tmp_path: Path, capsys) -> None:
    sims = [SimMeter(17, seed=1), SimMeter(18, seed=2)]
    with HdlcMeterLine(sims, 9600) as line:
        assert main(["poll", "sp", "--inventory", str(_inventory(tmp_path / "inv.toml", line.device)), "--json"]) == 0
        after = datetime.now(UTC)
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    got = {r["register"]: r for r in rows}
    assert {"1.8.0", "1.8.1", "1.8.2", "1.8.3", "2.8.0"} <= set(got)  # every tariff, not only the configured
    ts = datetime.fromisoformat(got["1.8.0"]["ts"])
    assert after - timedelta(seconds=10) < ts <= after
    expect = Decimal(sims[1].register_raw("1.8.0", ts)) * 10 / 1000
    assert abs(Decimal(got["1.8.0"]["value"]) - expect) <= Decimal("0.01")  # read a moment before the clock
    assert got["1.8.0"]["unit"] == "kWh"


def test_amr_poll_with_a_wrong_password_says_password(tmp_path: Path, capsys) -> None:
    with HdlcMeterLine([SimMeter(18, seed=2)], 9600) as line:
        inv = _inventory(tmp_path / "inv.toml", line.device, password="00000000")
        assert main(["poll", "sp", "--inventory", str(inv)]) == 2
    err = capsys.readouterr().err
    assert "password" in err and "refused" in err and "00000000" not in err


def test_amr_scan_finds_dlms_meters_by_physical_address(capsys) -> None:
    sims = [SimMeter(17, seed=1, serial="SN17"), SimMeter(19, seed=3, serial="SN19")]
    with HdlcMeterLine(sims, 9600) as line:
        assert main(["scan", "--device", line.device, "--dlms", "--addresses", "16-20", "--timeout", "0.2",
                     "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["physical_address"], r["serial"], r["adapter"]) for r in rows] == [
        (17, "SN17", "dlms"), (19, "SN19", "dlms")]
