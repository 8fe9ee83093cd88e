"""/metrics of a running gateway and collector (real processes, over HTTP): the series move
as readings flow and as faults are injected (a meter that stops answering, a dead port,
malformed MQTT messages, the database going away)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.inventory import load_inventory, upsert_inventory
from simulators.consumption import ConsumptionModel, SimClock
from simulators.modbus_sim import ModbusTcpFleet, SimMeter
from simulators.mqtt_sim import messages
from tests.conftest import free_port

AMR = [sys.executable, "-c", "from amr.cli import main; raise SystemExit(main())"]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def has(samples: dict, name: str) -> bool:
    return any(n == name for n, _ in samples)


def wait_for(port: int, check: Callable[[dict], bool], what: str, timeout: float = 25) -> dict:
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = scrape(port)
            if check(last):
                return last
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; amr_ series: "
                         f"{ {k: v for k, v in last.items() if k[0].startswith('amr_')} }")


def inventory(port: int, dead_port: int, device: str) -> str:
    common = 'account = "555001"\nadapter = "modbus_tcp"\npreset = "generic_counter"\nhost = "127.0.0.1"\n' \
             'interval = "2s"\ntimeout = 0.3\n'
    return (
        '[[subscriber]]\naccount = "555001"\nplan = "three_zone"\n\n'
        f'[[meter]]\nid = "scrape-a"\n{common}port = {port}\nunit = 1\n\n'
        f'[[meter]]\nid = "scrape-b"\n{common}port = {port}\nunit = 2\n\n'
        f'[[meter]]\nid = "scrape-dead"\n{common}port = {dead_port}\nunit = 1\n\n'
        f'[[meter]]\nid = "scrape-mqtt"\naccount = "555001"\nadapter = "mqtt"\ndevice = "{device}"\n'
        'format = "tasmota"\ninterval = "2s"\n'
    )


@pytest.fixture
def fleet():
    from adapters.registermap import load_register_map

    rmap = load_register_map("generic_counter")
    clock = SimClock(datetime.now(UTC), 1.0)
    port = free_port()
    f = ModbusTcpFleet({(port, u): SimMeter(u, rmap, clock, seed=u) for u in (1, 2)}).start()
    yield f, port
    f.stop()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*AMR, *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_gateway_and_collector_metrics_move(db_url, conn, mqtt_broker, fleet, tmp_path):
    sim, port = fleet
    n = random.randint(5000, 9999)
    device = f"tasmota-{n:04d}"
    inv = tmp_path / "inventory.toml"
    inv.write_text(inventory(port, free_port(), device))
    upsert_inventory(conn, load_inventory(inv))
    conn.commit()
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMR_")}
    base |= {"AMR_DATABASE_URL": db_url, "AMR_INVENTORY": str(inv), "AMR_LOG_FORMAT": "json"}
    gw_port, col_port = free_port(), free_port()
    host, mport = mqtt_broker
    run_id = f"{os.getpid()}-{n}"
    # the distributed deployment: the gateway spools and publishes to the broker, the collector stores
    gateway = start(
        ["gateway", "--sink", "spool", "--jitter", "0"],
        {**{k: v for k, v in base.items() if k != "AMR_DATABASE_URL"}, "AMR_METRICS_PORT": str(gw_port),
         "AMR_SPOOL_PATH": str(tmp_path / "spool.sqlite"), "AMR_MQTT_URL": f"mqtt://{host}:{mport}"},
        tmp_path / "gateway.log",
    )
    collector = start(
        ["collect", "--client-id", f"scrape-{run_id}", "--formats", "amr,tasmota,shelly"],
        {**base, "AMR_METRICS_PORT": str(col_port), "AMR_MQTT_URL": f"mqtt://{host}:{mport}",
         "AMR_MQTT_GROUP": f"scrape-{run_id}", "AMR_METRICS_REFRESH_S": "0.5"},
        tmp_path / "collector.log",
    )
    try:
        # --- the gateway: reads flow -----------------------------------------------------
        labels = {"adapter": "modbus_tcp", "bus": f"127.0.0.1:{port}"}
        first = wait_for(gw_port, lambda s: value(s, "amr_polls_total", outcome="ok", **labels) >= 2,
                         "first good reads")
        later = wait_for(
            gw_port,
            lambda s: value(s, "amr_polls_total", outcome="ok", **labels)
            >= value(first, "amr_polls_total", outcome="ok", **labels) + 4
            and value(s, "amr_uplink_publish_seconds_count") > value(first, "amr_uplink_publish_seconds_count"),
            "reads and published batches to grow",
        )
        assert value(later, "amr_poll_duration_seconds_count", **labels) > value(first, "amr_poll_duration_seconds_count", **labels)
        assert value(later, "amr_modbus_requests_total") > 0
        assert has(later, "amr_spool_depth") and has(later, "amr_spool_oldest_age_seconds")
        # the collector stores what the gateway published
        stored = wait_for(col_port, lambda s: value(s, "amr_readings_total", outcome="accepted") >= 4
                          and value(s, "amr_mqtt_messages_total", format="amr", outcome="ok") >= 2,
                          "the gateway's readings stored by the collector")
        assert value(stored, "amr_db_write_seconds_count") > 0 and value(stored, "amr_db_batch_size_sum") >= 4
        assert value(later, "amr_bus_last_success_timestamp_seconds", **labels) > time.time() - 30
        assert value(later, "process_resident_memory_bytes") > 0
        # a dead port: refused reads on its own bus, the others carry on
        assert value(later, "amr_polls_total", outcome="refused") > 0 or value(later, "amr_polls_total", outcome="timeout") > 0

        # the gateway counts its own silent meter (the dead port), without a database
        wait_for(gw_port, lambda s: value(s, "amr_meters_stale") == 1, "the gateway's stale count", timeout=15)

        # --- fault: meter b stops answering -------------------------------------------------
        before = value(later, "amr_polls_total", outcome="timeout", **labels)
        sim.meters[(port, 2)].inject("no_answer")
        faulty = wait_for(gw_port, lambda s: value(s, "amr_polls_total", outcome="timeout", **labels) > before,
                          "timeouts from the silent meter")
        ok_then = value(faulty, "amr_polls_total", outcome="ok", **labels)
        wait_for(gw_port, lambda s: value(s, "amr_polls_total", outcome="ok", **labels) > ok_then,
                 "meter a still read while b is silent")
        sim.meters[(port, 2)].inject("none")

        # --- SIGHUP: the reload is counted ----------------------------------------------------
        gateway.send_signal(signal.SIGHUP)
        wait_for(gw_port, lambda s: value(s, "amr_config_reloads_total", outcome="ok") == 1, "a counted reload")

        # --- the collector: MQTT messages flow ----------------------------------------------
        wait_for(col_port, lambda s: value(s, "amr_db_up") == 1, "amr_db_up = 1")
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"scrape-pub-{run_id}", protocol=mqtt.MQTTv5)
        pub.connect(host, mport, keepalive=30)
        pub.loop_start()
        try:
            time.sleep(0.5)  # the collector's subscription is in place once amr_db_up is; give SUBACK a moment
            models = {n: ConsumptionModel(n)}
            t0 = datetime.now(UTC) - timedelta(minutes=10)
            sent = 0
            for i in range(5):
                for topic, payload in messages("tasmota", range(n, n + 1), t0 + timedelta(minutes=2 * i), models):
                    pub.publish(topic, payload, qos=1).wait_for_publish(10)
                    sent += 1
            accepted = value(scrape(col_port), "amr_readings_total", outcome="accepted")
            got = wait_for(col_port, lambda s: value(s, "amr_mqtt_messages_total", format="tasmota", outcome="ok") >= sent,
                           "tasmota messages stored")
            assert value(got, "amr_readings_total", outcome="accepted") >= accepted + sent
            # --- fault: malformed messages are counted and refused, not dropped ----------------
            pub.publish(f"shellies/shellyem-{n:04d}/emeter/0/total", b"twelve", qos=1).wait_for_publish(10)
            pub.publish(f"tele/{device}/SENSOR", b"{not json", qos=1).wait_for_publish(10)
            bad = wait_for(col_port, lambda s: value(s, "amr_mqtt_messages_total", outcome="rejected") >= 2,
                           "malformed messages counted")
            assert value(bad, "amr_rejected_readings_total") >= 2
            assert value(bad, "amr_readings_total", outcome="rejected") >= 2
        finally:
            pub.loop_stop()
            pub.disconnect()

        # --- stale meters: the dead one, counted, not listed per meter -------------------------
        stale = wait_for(col_port, lambda s: value(s, "amr_meters_stale") >= 1, "a stale meter counted", timeout=15)
        assert not any("meter" in dict(ls) for (name, ls) in stale if name.startswith("amr_"))

        # --- fault: the database goes away --------------------------------------------------------
        stop(gateway)
        info = psycopg.conninfo.conninfo_to_dict(db_url)
        admin = psycopg.conninfo.make_conninfo(**{**info, "dbname": "postgres"})
        conn.close()
        with psycopg.connect(admin, autocommit=True) as a:
            a.execute(f'ALTER DATABASE "{info["dbname"]}" ALLOW_CONNECTIONS false')
            a.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{info['dbname']}'")
        try:
            wait_for(col_port, lambda s: value(s, "amr_db_up") == 0, "amr_db_up = 0 with the database refusing")
        finally:
            with psycopg.connect(admin, autocommit=True) as a:
                a.execute(f'ALTER DATABASE "{info["dbname"]}" ALLOW_CONNECTIONS true')
        wait_for(col_port, lambda s: value(s, "amr_db_up") == 1, "amr_db_up back to 1")
    finally:
        stop(gateway)
        stop(collector)
    gateway_log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in gateway_log
    # off a terminal the logs are JSON lines; a line about a device names the meter and the bus
    lines = [json.loads(line) for line in gateway_log.splitlines() if line.strip()]
    failures = [r for r in lines if r["msg"].startswith("poll failed")]
    assert failures and all(r.get("meter") and r.get("bus") for r in failures)
    assert {"scrape-dead", "scrape-b"} <= {r["meter"] for r in failures}


def test_api_serves_metrics(db_url, tmp_path):
    api_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMR_")}
    from billing.api import hash_token

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "t"\nsha256 = "{hash_token("scrape-token")}"\naccounts = ["1"]\n')
    env |= {"AMR_DATABASE_URL": db_url, "AMR_METRICS_PORT": str(metrics_port), "AMR_METRICS_REFRESH_S": "0.5",
            "AMR_API_TOKENS": str(tokens)}
    proc = start(["api", "--port", str(api_port)], env, tmp_path / "api.log")
    try:
        got = wait_for(metrics_port, lambda s: value(s, "amr_db_up") == 1, "the API's /metrics")
        assert value(got, "process_resident_memory_bytes") > 0 and has(got, "amr_meters_stale")
        deadline = time.monotonic() + 20  # the API starts listening after /metrics does
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/openapi.json", timeout=5) as resp:
                    assert resp.status == 200
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        stop(proc)
