"""From readings to a bill through the real ingestion path, and the CLI around it."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from adapters.reading import Reading
from amr.settings import Settings, get_settings
from billing import commands, money
from billing.engine import bill_period, bills_of
from collector.ingest.ingestor import Ingestor
from simulators.consumption import ConsumptionModel
from tests.test_billing import CATALOGUES, add_subscriber

MSK = ZoneInfo("Europe/Moscow")
OCT = date(2026, 10, 1)


def run(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="amr")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


@pytest.fixture
def cli_env(db_url, monkeypatch):
    monkeypatch.setenv("AMR_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_readings_to_bill_then_suspect_accepted(conn, db_url, cli_env, capsys) -> None:
    run(["tariffs", "load", str(CATALOGUES / "example.toml")], capsys)
    add_subscriber(conn, "900", "three_zone", meters=(("m-900", "2026-09-01T00:00+03:00", None),))
    conn.execute("UPDATE meter SET max_power_kw = 10 WHERE id = 'm-900'")
    conn.commit()
    model = ConsumptionModel(seed=7)
    start = datetime(2026, 10, 1, tzinfo=MSK).astimezone(UTC)
    times = [start + timedelta(minutes=30 * i) for i in range(48 * 2 + 1)]  # Oct 1 and 2, local
    ingestor = Ingestor(conn, Settings(database_url=db_url), clock=lambda: datetime(2026, 11, 1, tzinfo=UTC))
    result = ingestor.ingest(Reading("m-900", "1.8.0", t, model.energy_kwh(t), source="test") for t in times)
    assert result.accepted == len(times)

    out = run(["bill", "--period", "2026-10", "--json"], capsys)
    summary = json.loads(out.splitlines()[-1])
    assert (summary["kind"], summary["billed"], summary["held_back"]) == ("summary", 1, 0)
    [bill] = bills_of(conn, "900", OCT)
    # energy per zone is the model's counter differences over the zone's half-hours
    expected = {"peak": Decimal(0), "half_peak": Decimal(0), "night": Decimal(0)}
    for a, b in pairwise(times):
        hour = a.astimezone(MSK).hour
        zone = "night" if hour >= 23 or hour < 7 else "peak" if 7 <= hour < 10 or 17 <= hour < 21 else "half_peak"
        expected[zone] += model.energy_kwh(b) - model.energy_kwh(a)
    rates = {"peak": Decimal("8.72"), "half_peak": Decimal("7.14"), "night": Decimal("4.20")}
    assert [(ln.zone, ln.kwh) for ln in bill["lines"]] == [(z, expected[z]) for z in ("peak", "half_peak", "night")]
    assert bill["total"] == sum(money.line_amount(expected[z], rates[z]) for z in rates)
    assert bill["kwh"] == model.energy_kwh(times[-1]) - model.energy_kwh(times[0])

    # a jump implying 100 kW in half an hour on a 10 kW meter: suspect, the bill is held back
    t_bad = times[-1] + timedelta(minutes=30)
    jump = model.energy_kwh(times[-1]) + Decimal(50)
    ingestor.ingest([Reading("m-900", "1.8.0", t_bad, jump, source="test")])
    out = run(["bill", "--period", "2026-10"], capsys)
    assert "held back: account 900: 50" in out
    assert "new versions 0, held back 1" in out
    listed = [json.loads(line) for line in run(["suspect", "list", "--json", "--account", "0900"], capsys).splitlines()]
    assert [(r["meter_id"], Decimal(r["kwh"])) for r in listed] == [("m-900", Decimal(50))]
    assert datetime.fromisoformat(listed[0]["start"]) == times[-1]

    out = run(["suspect", "accept", "m-900", times[-1].isoformat(), "--by", "inspector", "--note", "kettle test"], capsys)
    assert "50" in out and "accepted by inspector" in out
    audit = conn.execute("SELECT meter_id, kwh, decision, decided_by, note FROM suspect_audit").fetchall()
    assert audit == [("m-900", Decimal(50), "accepted", "inspector", "kettle test")]
    assert run(["suspect", "list"], capsys).strip() == (
        "no suspect energy and no change to a billed month waiting for a decision")
    s = bill_period(conn, OCT)
    assert s.new_versions == 1
    v1, v2 = bills_of(conn, "900", OCT)
    assert v2["kwh"] - v1["kwh"] == Decimal(50)
    assert v1["total"] == bill["total"]  # the old version is kept as it was


def test_tariffs_cli_reports_every_problem(conn, cli_env, tmp_path, capsys) -> None:
    from amr.errors import UserError

    bad = tmp_path / "bad.toml"
    bad.write_text('[[tariff]]\nfrom = "2026-01-01"\nto = "2026-06-30"\ncategory = "gas_stove"\n'
                   'area = "urban"\nplan = "two_zone"\nrates = { day = "0" }\n')
    with pytest.raises(UserError) as err:
        run(["tariffs", "load", str(bad)], capsys)
    assert "2 problem(s)" in str(err.value)
    assert "key 'rates.day': rate must be positive" in str(err.value)
    assert "key 'rates.night': missing" in str(err.value)
    out = run(["tariffs", "load", str(CATALOGUES / "spb-2014-gas-stove-checked.toml")], capsys)
    assert "added 4 tariffs, 0 already stored" in out
    listed = [json.loads(x) for x in run(["tariffs", "list", "--json", "--on", "2014-08-01"], capsys).splitlines()]
    assert [(t["plan"], t["rates"]) for t in listed] == [
        ("single", {"all": "3.53"}), ("two_zone", {"day": "3.55", "night": "2.14"})]


def test_amr_bill_on_a_terminal_shows_progress_then_the_summary(conn, db_url) -> None:
    """The real console command in a pseudo-terminal: a progress bar, then the summary line."""
    import os
    import pty
    import subprocess
    import sys

    from billing.tariffs import load_catalogue_file, store_catalogue
    from tests.test_billing import add_usage

    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    for n in range(1, 6):
        add_subscriber(conn, str(n), "two_zone")
        add_usage(conn, f"m-{n}", date(2026, 10, 2), night="2", peak="1", half_peak="1")
    main, child = pty.openpty()
    env = {**os.environ, "AMR_DATABASE_URL": db_url, "AMR_METRICS_PORT": "0", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "amr.cli", "bill", "--period", "2026-10"],
                            stdout=child, stderr=child, stdin=child, env=env, close_fds=True)
    os.close(child)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
        os.close(main)
    text = out.decode(errors="replace")
    assert "billing 2026-10" in text and "\x1b[" in text  # the progress bar, drawn on the terminal
    assert "2026-10: billed 5, unchanged 0, new versions 0, held back 0" in text
