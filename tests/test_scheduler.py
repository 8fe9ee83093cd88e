"""The scheduler against simulated TCP meters: slots, retries, back-off, bounds, and what reaches the database."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg

from adapters import quality
from adapters.modbus import ModbusAdapter
from adapters.reading import Reading, Rejected
from adapters.registermap import load_register_map
from amr import metrics
from amr.settings import Settings
from collector.gateway.daemon import IngestSink, run_gateway
from collector.gateway.scheduler import Scheduler, jitter_of, slot_start
from collector.inventory import Meter, load_inventory, upsert_inventory
from simulators.consumption import SimClock
from simulators.modbus_sim import ModbusTcpFleet, SimMeter, inventory_toml
from tests.conftest import free_port


class ListSink:
    def __init__(self) -> None:
        self.items: list[Reading | Rejected] = []

    def put(self, items: list[Reading | Rejected]) -> None:
        self.items.extend(items)


def tcp_meter(port: int, unit: int, **kw) -> Meter:
    return Meter(
        id=kw.pop("id", f"m{port}-{unit}"), account="1", adapter="modbus_tcp", preset="generic_counter",
        host="127.0.0.1", port=port, unit=unit, timeout=kw.pop("timeout", 0.2), interval=kw.pop("interval", "1s"),
        **kw,
    )


def live_fleet(keys: list[tuple[int, int]]) -> ModbusTcpFleet:
    clock = SimClock(datetime.now(UTC), 1.0)
    rmap = load_register_map("generic_counter")
    return ModbusTcpFleet({k: SimMeter(k[1], rmap, clock, seed=i) for i, k in enumerate(keys)})


def counter(c, *labels: str) -> float:
    return c.labels(*labels)._value.get()


def test_slots_align_to_the_wall_clock_and_jitter_is_stable() -> None:
    t = datetime(2026, 3, 1, 9, 47, 12, tzinfo=UTC)
    assert slot_start(t, timedelta(minutes=30)) == datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    assert slot_start(t, timedelta(hours=1)) == datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    assert jitter_of("m-1", 2.0) == jitter_of("m-1", 2.0)
    assert 0 <= jitter_of("m-1", 2.0) < 2.0 and jitter_of("m-1", 0) == 0
    assert len({round(jitter_of(f"m-{i}", 2.0), 3) for i in range(100)}) > 50  # spread out


def test_a_missed_read_is_retried_within_the_interval_flagged_and_counted() -> None:
    port = free_port()
    with live_fleet([(port, 1), (port, 2)]) as fleet:
        fleet.meters[(port, 2)].inject("no_answer")
        threading.Timer(0.5, lambda: fleet.meters[(port, 2)].inject("none")).start()
        ms = [tcp_meter(port, 1, interval="3s"), tcp_meter(port, 2, interval="3s", id="flaky")]
        sink = ListSink()
        before = counter(metrics.POLLS, "modbus_tcp", f"127.0.0.1:{port}", "timeout")

        async def go() -> Scheduler:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
            sched = Scheduler(ms, lambda m: adapter, sink, jitter_s=0, retry_delay_s=0.2, backoff_after=10)
            slot = datetime.now(UTC)  # a whole interval ahead for the retries
            await sched.run_slot(ms, slot, timedelta(seconds=3))
            await adapter.close()
            return sched

        sched = asyncio.run(go())
    report = sched.reports[0]
    assert sorted(report.read) == ["flaky", f"m{port}-1"] and report.retried == ["flaky"]
    assert not report.missed
    assert counter(metrics.POLLS, "modbus_tcp", f"127.0.0.1:{port}", "timeout") >= before + 1
    flaky = [r for r in sink.items if r.meter_id == "flaky"]
    assert flaky and all({quality.RETRIED, quality.LATE} <= r.quality for r in flaky)
    assert all(not r.quality for r in sink.items if r.meter_id != "flaky")
    # the prompt read is stamped with its slot; the retried one keeps its real time
    assert {r.ts for r in sink.items if r.meter_id != "flaky"} == {report.slot}
    assert all(r.ts > report.slot for r in flaky)


def test_back_off_grows_to_its_cap_and_a_probe_brings_the_meter_back() -> None:
    port = free_port()
    with live_fleet([(port, 1), (port, 2)]) as fleet:
        dead = fleet.meters[(port, 2)]
        dead.inject("exception", 4)
        ms = [tcp_meter(port, 1, interval="1s"), tcp_meter(port, 2, interval="1s", id="dead")]
        sink = ListSink()
        backoffs: list[float] = []

        async def go() -> Scheduler:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
            sched = Scheduler(
                ms, lambda m: adapter, sink, jitter_s=0, retry_delay_s=0.05, backoff_after=1,
                backoff_base_s=0.4, backoff_max_s=0.8,
            )
            iv = timedelta(seconds=1)
            for i in range(6):
                if i == 4:
                    dead.inject("none")  # repaired: the next probe must find it
                now = datetime.now(UTC)
                slot = slot_start(now, iv) + iv
                await asyncio.sleep((slot - now).total_seconds())
                await sched.run_slot(ms, slot, iv)
                backoffs.append(sched.state["dead"].backoff_s)
            await adapter.close()
            return sched

        sched = asyncio.run(go())
        requests_of_dead = dead.requests
    assert backoffs[:3] == [0.4, 0.8, 0.8]  # doubled, then capped
    assert backoffs[-1] == 0.0 and "dead" in sched.reports[-1].read  # probed and back
    assert all(f"m{port}-1" in r.read for r in sched.reports)  # the neighbour never missed a slot
    missed = sum(1 for r in sched.reports if "dead" in r.missed)
    assert 3 <= missed <= 5
    # without back-off each of the missed slots would have cost ~5 attempts (retry every 0.05 s)
    assert requests_of_dead <= missed + 2


def test_tcp_reads_run_concurrently_up_to_the_bound() -> None:
    ports = [free_port() for _ in range(12)]
    with live_fleet([(p, 1) for p in ports]) as fleet:
        for m in fleet.meters.values():
            m.inject("slow", 0.25)
        ms = [tcp_meter(p, 1, timeout=1.0) for p in ports]

        def cycle(bound: int) -> float:
            async def go() -> float:
                adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
                sched = Scheduler(ms, lambda m: adapter, ListSink(), jitter_s=0, tcp_concurrency=bound)
                t = time.perf_counter()
                report = await sched.run_slot(ms, slot_start(datetime.now(UTC), timedelta(seconds=60)),
                                              timedelta(seconds=60))
                took = time.perf_counter() - t
                assert len(report.read) == 12
                await adapter.close()
                return took

            return asyncio.run(go())

        bounded, wide = cycle(3), cycle(12)
    assert bounded >= 4 * 0.25 * 0.95  # 12 reads, 3 at a time: at least four rounds of 250 ms
    assert wide < bounded / 2  # all twelve at once: about one round


def test_faults_are_counted_and_named_and_only_good_readings_are_stored(db_url: str, tmp_path: Path) -> None:
    """Through the gateway into the real database: good meters stored, faulty ones counted, none stored."""
    port = free_port()
    keys = [(port, u) for u in range(1, 7)]
    with live_fleet(keys) as fleet:
        faults = {2: ("no_answer", None), 3: ("garbage", None), 4: ("exception", 2), 5: ("slow", 1.0)}
        for unit, (kind, arg) in faults.items():
            fleet.meters[(port, unit)].inject(kind, arg)
        fleet.meters[(port, 6)].inject("clock_drift", 900)
        inv_path = tmp_path / "inventory.toml"
        inv_path.write_text(
            inventory_toml(fleet.meters, "generic_counter", registers=("1.8.0", "1.8.1"), interval="2s", timeout=0.2)
        )
        with psycopg.connect(db_url) as conn:
            upsert_inventory(conn, load_inventory(inv_path))
        settings = Settings(database_url=db_url, clock_skew_tolerance_s=60)
        sink = IngestSink(db_url, settings)
        bus = f"127.0.0.1:{port}"
        before = {o: counter(metrics.POLLS, "modbus_tcp", bus, o) for o in ("ok", "timeout", "garbage", "exception")}
        missed_before = counter(metrics.MISSED_SLOTS, "modbus_tcp", bus)
        got: dict = {}

        async def go() -> None:
            await run_gateway(
                inv_path, sink, settings, cycles=1,
                scheduler_options={"jitter_s": 0.1, "retry_delay_s": 0.3, "backoff_after": 2},
                on_scheduler=lambda s: got.setdefault("s", s),
            )

        asyncio.run(go())
        # a counter reset on meter 1 in the next slot: stored, flagged, never negative energy
        fleet.meters[(port, 1)].inject("reset")
        asyncio.run(go())
        sink.close()
    report = got["s"].reports[0]
    assert sorted(report.missed) == [f"sim-{port}-{u}" for u in (2, 3, 4, 5)]
    outcomes = {mid: outcome for mid, outcome, _ in report.errors}
    assert outcomes == {
        f"sim-{port}-2": "timeout", f"sim-{port}-3": "garbage", f"sim-{port}-4": "exception",
        f"sim-{port}-5": "timeout",
    }
    assert all(f"on bus {bus} unit" in msg for _, _, msg in report.errors)
    assert counter(metrics.POLLS, "modbus_tcp", bus, "ok") == before["ok"] + 2 + 2
    assert counter(metrics.POLLS, "modbus_tcp", bus, "exception") >= before["exception"] + 1
    assert counter(metrics.POLLS, "modbus_tcp", bus, "garbage") >= before["garbage"] + 1
    assert counter(metrics.MISSED_SLOTS, "modbus_tcp", bus) >= missed_before + 8
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT meter_id, register, ts, value, quality FROM reading ORDER BY meter_id, ts").fetchall()
        negative = conn.execute("SELECT count(*) FROM interval_usage WHERE kwh < 0").fetchone()[0]
    assert {r[0] for r in rows} == {f"sim-{port}-1", f"sim-{port}-6"}
    assert len(rows) == 2 * 2 * 2  # two meters, two registers, two slots
    assert all(quality.CLOCK_SKEW in r[4] for r in rows if r[0] == f"sim-{port}-6")
    assert not any(quality.CLOCK_SKEW in r[4] for r in rows if r[0] == f"sim-{port}-1")
    m1 = [r for r in rows if r[0] == f"sim-{port}-1" and r[1] == "1.8.0"]
    assert m1[1][3] < m1[0][3] and m1[1][3] < Decimal(1)  # the reset was stored as read
    assert negative == 0


def test_amr_gateway_polls_into_the_spool_and_the_uplink_delivers(db_url: str, tmp_path: Path) -> None:
    """The daemon as an operator starts it: a subprocess, the spool, the uplink to the database."""
    import os
    import subprocess
    import sys

    port = free_port()
    with live_fleet([(port, 1), (port, 2)]) as fleet:
        inv_path = tmp_path / "inventory.toml"
        inv_path.write_text(inventory_toml(fleet.meters, "generic_counter", interval="1s", timeout=0.5))
        with psycopg.connect(db_url) as conn:
            upsert_inventory(conn, load_inventory(inv_path))
        env = {
            **os.environ, "AMR_DATABASE_URL": db_url, "AMR_SPOOL_PATH": str(tmp_path / "spool.sqlite"),
            "AMR_METRICS_PORT": "0", "AMR_MQTT_URL": "", "AMR_LOG_FORMAT": "text",
        }
        done = subprocess.run(
            [sys.executable, "-m", "amr.cli", "gateway", "--inventory", str(inv_path), "--cycles", "2",
             "--jitter", "0"],
            env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
        )
    assert done.returncode == 0, done.stderr
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT meter_id, ts, quality FROM reading ORDER BY ts").fetchall()
    assert {r[0] for r in rows} == {f"sim-{port}-1", f"sim-{port}-2"}
    assert len(rows) == 4 and all(quality.SPOOLED in r[2] for r in rows)
    assert len({r[1] for r in rows}) == 2  # two slots, one second apart


def test_amr_gateway_refuses_a_broken_inventory(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    inv = tmp_path / "inventory.toml"
    inv.write_text(
        '[[subscriber]]\naccount = "1"\n\n'
        '[[meter]]\nid = "a"\naccount = "1"\nadapter = "modbus_rtu"\npreset = "eastron_sdm120"\n'
        'port = "/dev/ttyS9"\nunit = 3\n\n'
        '[[meter]]\nid = "b"\naccount = "1"\nadapter = "modbus_rtu"\npreset = "eastron_sdm120"\n'
        'port = "/dev/ttyS9"\nunit = 3\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "amr.cli", "gateway", "--inventory", str(inv), "--cycles", "1"],
        env={**os.environ, "AMR_METRICS_PORT": "0"}, capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2
    assert f"{inv}: meter 'b': key 'unit': unit 3 on bus /dev/ttyS9 is already meter 'a'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_register_rollover_is_stored_as_read_and_never_gives_negative_energy(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    clock = SimClock(datetime.now(UTC), 600.0)  # ten simulated minutes a second: the counter moves
    sim = SimMeter(1, load_register_map("generic_counter"), clock, seed=3)
    with ModbusTcpFleet({(port, 1): sim}):
        inv_path = tmp_path / "inventory.toml"
        inv_path.write_text(
            inventory_toml({(port, 1): sim}, "generic_counter", interval="1s", timeout=0.5)
            + "rollover = 42949672.96\nmax_power_kw = 10000\n"
        )
        inv = load_inventory(inv_path)
        with psycopg.connect(db_url) as conn:
            upsert_inventory(conn, inv)
        settings = Settings(database_url=db_url)
        sink = IngestSink(db_url, settings)
        ms = list(inv.meters.values())

        async def go() -> None:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=10**9)
            sched = Scheduler(ms, lambda m: adapter, sink, jitter_s=0, snap_s=0)
            now = clock.now()
            # the u32 register (0.01 kWh) wraps about one wall second from now
            sim.inject("rollover", float(sim.model.energy_kwh(now + timedelta(minutes=10)) - sim.model.energy_kwh(now)))
            for _ in range(3):
                await sched.run_slot(ms, datetime.now(UTC), timedelta(seconds=1))
                await asyncio.sleep(1.0)
            await adapter.close()

        asyncio.run(go())
        sink.close()
    with psycopg.connect(db_url) as conn:
        values = [r[0] for r in conn.execute(
            "SELECT value FROM reading WHERE register = '1.8.0' ORDER BY ts").fetchall()]
        kinds = conn.execute("SELECT kind, kwh FROM interval_usage WHERE register = '1.8.0'").fetchall()
    assert len(values) == 3
    assert values[0] > Decimal("42949672") and values[-1] < Decimal(5)  # it wrapped, as the meter shows it
    assert kinds and all(kwh >= 0 for _, kwh in kinds)
    assert "rollover" in {k for k, _ in kinds}


def test_an_overrun_counts_the_slots_it_swallowed() -> None:
    port = free_port()
    with live_fleet([(port, 1)]) as fleet:
        fleet.meters[(port, 1)].inject("slow", 1.2)  # longer than the 1 s interval
        ms = [tcp_meter(port, 1, interval="1s", timeout=3.0, id="slow")]
        bus = f"127.0.0.1:{port}"
        missed_before = counter(metrics.MISSED_SLOTS, "modbus_tcp", bus)
        overruns_before = counter(metrics.CYCLE_OVERRUNS, bus)

        async def go() -> Scheduler:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=10**9)
            sched = Scheduler(ms, lambda m: adapter, ListSink(), jitter_s=0)
            await sched.run(cycles=2)
            await adapter.close()
            return sched

        sched = asyncio.run(go())
    first, second = sched.reports
    assert first.read == ["slow"] and first.overrun
    assert second.slot - first.slot == timedelta(seconds=2)  # the slot between them had no time
    assert sched.state["slow"].missed == 1
    assert counter(metrics.MISSED_SLOTS, "modbus_tcp", bus) == missed_before + 1
    assert counter(metrics.CYCLE_OVERRUNS, bus) >= overruns_before + 1


def test_a_failing_sink_does_not_stop_polling_and_loses_nothing() -> None:
    port = free_port()

    class FlakySink(ListSink):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def put(self, items: list[Reading | Rejected]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise OSError("database unreachable")
            super().put(items)

    with live_fleet([(port, 1)]):
        ms = [tcp_meter(port, 1, id="m")]
        sink = FlakySink()

        async def go() -> None:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=10**9)
            sched = Scheduler(ms, lambda m: adapter, sink, jitter_s=0)
            for _ in range(2):
                await sched.run_slot(ms, datetime.now(UTC), timedelta(seconds=1))
            await adapter.close()

        asyncio.run(go())
    assert sink.calls == 2
    assert len(sink.items) == 2  # the first slot's reading came with the second


def test_an_undecodable_answer_is_kept_as_a_rejected_input(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    clock = SimClock(datetime.now(UTC), 1.0)
    sim = SimMeter(1, load_register_map("eastron_sdm120"), clock, seed=1)
    sim.fixed = {"1.8.0": Decimal("NaN")}  # what a meter with a broken register sends
    with ModbusTcpFleet({(port, 1): sim}):
        inv_path = tmp_path / "inventory.toml"
        inv_path.write_text(inventory_toml({(port, 1): sim}, "eastron_sdm120", registers=("1.8.0", "2.8.0")))
        inv = load_inventory(inv_path)
        with psycopg.connect(db_url) as conn:
            upsert_inventory(conn, inv)
        sink = IngestSink(db_url, Settings(database_url=db_url))
        ms = list(inv.meters.values())

        async def go() -> Scheduler:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
            sched = Scheduler(ms, lambda m: adapter, sink, jitter_s=0, backoff_after=1)
            await sched.run_slot(ms, datetime.now(UTC), timedelta(seconds=2))
            await adapter.close()
            return sched

        sched = asyncio.run(go())
        sink.close()
    assert sched.reports[0].errors[0][1] == "decode"
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT count(*) FROM reading").fetchone()[0]
        rows = conn.execute("SELECT meter_id, code, reason, raw FROM rejected_reading").fetchall()
    assert stored == 0
    assert len(rows) == 1
    meter_id, code, reason, raw = rows[0]
    assert meter_id == f"sim-{port}-1" and code == "decode"
    assert "1.8.0" in reason and "nan" in reason and f"on bus 127.0.0.1:{port} unit 1" in reason
    assert bytes(raw)[:4] == bytes.fromhex("7fc00000")  # the float32 NaN as the meter sent it


def test_a_reload_adds_meters_and_their_interval_without_a_restart() -> None:
    port = free_port()
    with live_fleet([(port, 1), (port, 2)]):
        first = tcp_meter(port, 1, id="first", interval="1s")
        added = tcp_meter(port, 2, id="added", interval="2s")
        sink = ListSink()

        async def go() -> Scheduler:
            adapter = ModbusAdapter(Settings(), clock_tolerance_s=10**9)
            sched = Scheduler([first], lambda m: adapter, sink, jitter_s=0)
            stop = asyncio.Event()
            task = asyncio.create_task(sched.run(stop))
            await asyncio.sleep(1.2)
            sched.replace_meters([first, added])
            deadline = time.monotonic() + 8
            while not any(r.meter_id == "added" for r in sink.items) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 5)
            await adapter.close()
            return sched

        sched = asyncio.run(go())
    assert any(r.meter_id == "added" for r in sink.items)
    assert sum(1 for r in sink.items if r.meter_id == "first") >= 2
    assert all(r.ts.timestamp() % 2 == 0 for r in sink.items if r.meter_id == "added")  # on its own 2 s slots
    assert sched.state["added"].reads >= 1
