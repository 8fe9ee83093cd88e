"""The gateway says what it waits for, and `--now` does not wait.

A gateway started at 12:16 with 30-minute meters used to be silent until
12:30, which looks like a hang; `amr gateway --cycles 1` as a first check of
an inventory could take half an hour. Here the gateway runs as a real
process against simulated Modbus TCP meters and a real database, and the
scheduler runs with an injected clock so the announced wait is minutes long
without a test waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from adapters.reading import Reading, Rejected
from collector.gateway.scheduler import Scheduler, slot_start
from collector.inventory import Meter
from tests.conftest import ROOT, free_port


class ListSink:
    def __init__(self) -> None:
        self.items: list[Reading | Rejected] = []

    def put(self, items: list[Reading | Rejected]) -> None:
        self.items.extend(items)


def _meter(mid: str, interval: str) -> Meter:
    # never read in these tests: nothing listens on port 9
    return Meter(id=mid, account="1", adapter="modbus_tcp", preset="generic_counter",
                 host="127.0.0.1", port=9, unit=1, timeout=0.2, interval=interval)


def test_gateway_now_cycles_1_polls_every_meter_and_exits_without_waiting_for_a_slot(db_url, tmp_path) -> None:
    from adapters.registermap import load_register_map
    from collector.inventory import load_inventory, upsert_inventory
    from simulators.consumption import SimClock
    from simulators.modbus_sim import ModbusTcpFleet, SimMeter, inventory_toml

    # daily meters: the next slot is UTC midnight; keep it at least two minutes away
    day = timedelta(days=1)
    to_slot = (slot_start(datetime.now(UTC), day) + day - datetime.now(UTC)).total_seconds()
    if to_slot < 120:
        time.sleep(to_slot + 1)
    rmap = load_register_map("generic_counter")
    port = free_port()
    fleet = ModbusTcpFleet({(port, u): SimMeter(u, rmap, SimClock(datetime.now(UTC)), seed=u) for u in (1, 2)})
    inv = tmp_path / "inventory.toml"
    inv.write_text(inventory_toml(fleet.meters, "generic_counter", interval="1d"))
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, load_inventory(inv))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))},
           "PYTHONPATH": str(ROOT), "AMR_DATABASE_URL": db_url, "AMR_INVENTORY": str(inv),
           "AMR_METRICS_PORT": "0", "AMR_LOG_FORMAT": "text"}
    started = datetime.now(UTC)
    with fleet:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from amr.cli import main; sys.exit(main(sys.argv[1:]))",
             "gateway", "--now", "--cycles", "1", "--sink", "direct", "--jitter", "0"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=90,
        )
        elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert elapsed < 60, f"took {elapsed:.1f} s:\n{out}"  # the next slot was at least 120 s away
    assert "first pass now over 2 meters every 1 day" in out, out
    assert "next slot at" not in out, out  # it never waited
    with psycopg.connect(db_url) as c:
        rows = c.execute("SELECT meter_id, min(ts), max(ts) FROM reading GROUP BY meter_id ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == sorted(m for m in load_inventory(inv).meters), out
    for _, first, last in rows:  # read now, not stamped with a slot of the day
        assert started - timedelta(seconds=60) < first <= last < datetime.now(UTC) + timedelta(seconds=60)


def test_a_wait_of_minutes_is_announced_in_local_time_with_what_it_is_for(caplog) -> None:
    now = datetime(2026, 3, 1, 9, 15, 40, tzinfo=UTC)  # 12:15:40 in Moscow
    ms = [_meter("w-1", "30m"), _meter("w-2", "30m"), _meter("w-3", "1d")]
    sched = Scheduler(ms, lambda m: None, ListSink(), now=lambda: now, timezone="Europe/Moscow")  # type: ignore[arg-type, return-value]

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sched.run(stop, cycles=1))
        for _ in range(500):
            if sum("next slot at" in r.getMessage() for r in caplog.records) >= 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    with caplog.at_level(logging.INFO, logger="amr.scheduler"):
        asyncio.run(go())
    lines = sorted(r.getMessage() for r in caplog.records if "next slot at" in r.getMessage())
    assert lines == [
        "next slot at 12:30:00 MSK (in 14 min) for 2 meters every 30 min",
        "next slot at 2026-03-02 03:00:00 MSK (in 14 h 44 min) for 1 meter every 1 day",
    ]
    assert sched.reports == []  # stopped while waiting: nothing polled


def test_short_waits_are_not_announced(caplog) -> None:
    now = datetime(2026, 3, 1, 9, 15, 41, tzinfo=UTC)  # 1 s before a 2-second slot
    ms = [_meter("s-1", "2s")]
    sched = Scheduler(ms, lambda m: None, ListSink(), now=lambda: now)  # type: ignore[arg-type, return-value]

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sched.run(stop, cycles=1))
        await asyncio.sleep(0.3)
        stop.set()
        await task

    with caplog.at_level(logging.INFO, logger="amr.scheduler"):
        asyncio.run(go())
    assert not [r for r in caplog.records if "next slot at" in r.getMessage()]


@pytest.mark.parametrize("zone", ["Mars/Olympus", ""])
def test_an_unknown_zone_tells_the_wait_in_utc_and_says_so(caplog, zone: str) -> None:
    with caplog.at_level(logging.WARNING, logger="amr.scheduler"):
        sched = Scheduler([], lambda m: None, ListSink(), timezone=zone)  # type: ignore[arg-type, return-value]
    assert sched.tz is UTC
    assert f"timezone {zone!r} (AMR_TIMEZONE) is not a known zone" in caplog.text


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from amr.cli import main; sys.exit(main(sys.argv[1:]))", *args],
        env={**base, "PYTHONPATH": str(ROOT), "AMR_METRICS_PORT": "0", "AMR_LOG_FORMAT": "text", **env},
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )


def _first_line_with(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> str:
    """The first output line containing text; then the process is stopped (SIGTERM)."""
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + timeout, []
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}:\n{''.join(seen)}")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _password(db_url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(db_url).get("password") or "no-password-in-the-url"


def test_collect_says_at_start_which_topics_it_waits_on_and_where_it_stores(db_url, broker) -> None:
    proc = _cli(["collect", "--workers", "1", "--formats", "amr,tasmota", "--client-id", "waits-1"],
                {"AMR_DATABASE_URL": db_url, "AMR_MQTT_URL": f"mqtt://collector@127.0.0.1:{broker.port}",
                 "AMR_MQTT_GROUP": "waits"})
    line = _first_line_with(proc, "waits for messages")
    assert f"collector waits-1 waits for messages from mqtt://collector@127.0.0.1:{broker.port} " \
           "on amr/v1/+/readings, tele/+/SENSOR (shared group waits) and stores them in " in line, line
    assert psycopg.conninfo.conninfo_to_dict(db_url)["dbname"] in line
    assert _password(db_url) not in line


def test_drain_follow_says_where_it_drains_to_and_that_it_then_waits(db_url, tmp_path) -> None:
    from decimal import Decimal

    from collector.gateway.spool import Spool

    path = tmp_path / "spool.sqlite"
    with Spool(path, 1000) as s:
        s.put([Reading("gw-x", "1.8.0", datetime(2026, 3, 1, tzinfo=UTC), Decimal("1.5"), frozenset(), "modbus")])
    proc = _cli(["mqtt", "drain", "--spool", str(path), "--to", "database", "--follow"], {"AMR_DATABASE_URL": db_url})
    line = _first_line_with(proc, "draining")
    assert line.startswith(f"draining 1 readings from {path} to "), line
    assert line.rstrip().endswith("; then waits for new readings (Ctrl-C stops)"), line
    assert psycopg.conninfo.conninfo_to_dict(db_url)["dbname"] in line and _password(db_url) not in line
