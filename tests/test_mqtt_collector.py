"""The MQTT collector against real Mosquitto brokers and the real database.

Shared subscription split between two processes, a broker restart, a
collector killed with SIGKILL mid-stream, and malformed messages: every
reading stored exactly once, nothing lost, nothing stalls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from collector.inventory import parse_inventory, upsert_inventory
from simulators import mqtt_sim
from simulators.consumption import ConsumptionModel
from tests.conftest import ROOT

BASE = (datetime.now(UTC) - timedelta(days=40)).replace(minute=0, second=0, microsecond=0)


def _setup_meters(db_url: str, tmp_path: Path, meters: list[dict]) -> Path:
    inv = {"subscriber": [{"account": "1"}], "meter": [{"account": "1", **m} for m in meters]}
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, parse_inventory(inv))
    path = tmp_path / "inventory.toml"
    lines = ['[[subscriber]]\naccount = "1"\n']
    for m in meters:
        lines.append("[[meter]]\naccount = \"1\"\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in m.items()))
    path.write_text("\n".join(lines))
    return path


class Collector:
    def __init__(self, db_url: str, host: str, port: int, group: str, client_id: str, inventory: Path | None,
                 batch: int = 200, workers: int = 1, formats: str | None = None):
        env = {**os.environ, "AMR_DATABASE_URL": db_url, "AMR_MQTT_URL": f"mqtt://{host}:{port}",
               "AMR_MQTT_GROUP": group, "AMR_METRICS_PORT": "0", "AMR_LOG_FORMAT": "text",
               "PYTHONPATH": str(ROOT)}
        if inventory is not None:
            env["AMR_INVENTORY"] = str(inventory)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amr.cli", "collect", "--client-id", client_id, "--batch", str(batch),
             "--workers", str(workers), *(["--formats", formats] if formats else [])],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_log("subscribed to")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "collector exited:\n" + "".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n" + "".join(self.lines)
            time.sleep(0.05)

    def stop(self) -> str:
        """SIGTERM and the log it wrote."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self._reader.join(5)
        return "".join(self.lines)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stored(self, log: str) -> int:
        m = re.search(r"stopped after storing (\d+) messages", log)
        assert m, log
        return int(m.group(1))


class Publisher:
    """QoS 1 publisher that waits for every PUBACK and re-publishes what a broker outage lost."""

    def __init__(self, host: str, port: int):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.max_inflight_messages_set(200)
        self.client.connect(host, port)
        self.client.loop_start()
        self.pending: list[tuple[str, bytes, mqtt.MQTTMessageInfo]] = []

    def publish(self, topic: str, payload: bytes) -> None:
        deadline = time.monotonic() + 15
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)  # after a broker restart: paho reconnects by itself
        self.pending.append((topic, payload, self.client.publish(topic, payload, qos=1)))

    @staticmethod
    def _done(info: mqtt.MQTTMessageInfo) -> bool:
        try:
            info.wait_for_publish(0.5)
            return info.is_published()
        except (RuntimeError, ValueError):
            return False

    def confirm(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.pending:
            assert time.monotonic() < deadline, f"{len(self.pending)} messages never acknowledged"
            left = []
            for topic, payload, info in self.pending:
                if not self._done(info):
                    if self.client.is_connected():
                        info = self.client.publish(topic, payload, qos=1)
                    left.append((topic, payload, info))
            self.pending = left
            if left:
                time.sleep(0.2)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _amr_messages(meters: list[str], n: int, per_message: int) -> tuple[list[tuple[str, bytes]], set]:
    """n readings per meter, as amr/v1 messages of per_message readings; and the expected rows."""
    models = {m: ConsumptionModel(seed=i) for i, m in enumerate(meters)}
    rows = []
    for k in range(n):
        t = BASE + timedelta(minutes=30 * k)
        for m in meters:
            rows.append({"meter": m, "register": "1.8.0", "ts": t.isoformat(), "value": str(models[m].energy_kwh(t))})
    msgs = [
        ("amr/v1/test/readings", json.dumps({"v": 1, "readings": rows[i: i + per_message]}).encode())
        for i in range(0, len(rows), per_message)
    ]
    expected = {(r["meter"], "1.8.0", datetime.fromisoformat(r["ts"]), Decimal(r["value"])) for r in rows}
    return msgs, expected


def _stored(db_url: str, prefix: str) -> list[tuple]:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT meter_id, register, ts, value FROM reading WHERE meter_id LIKE %s",
                         (prefix + "%",)).fetchall()


def _wait_for(db_url: str, prefix: str, count: int, timeout: float = 60) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _stored(db_url, prefix)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _rejects(db_url: str) -> list[tuple]:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT kind, code, reason, raw, source FROM rejected_reading ORDER BY id").fetchall()


def _forget_session(host: str, port: int, client_id: str) -> None:
    """End a collector's persistent session, so the shared broker stops queueing for it."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(host, port, clean_start=True)  # no session expiry: the session ends with this connection
    c.disconnect()


def test_two_collectors_share_the_load_exactly_once(db_url, tmp_path, mqtt_broker):
    host, port = mqtt_broker
    tag = uuid.uuid4().hex[:6]
    meters = [f"sh{tag}-{i}" for i in range(4)]
    _setup_meters(db_url, tmp_path, [{"id": m, "adapter": "mqtt"} for m in meters])
    group = f"g{tag}"
    a = Collector(db_url, host, port, group, f"c-{tag}-a", None, batch=20)
    b = Collector(db_url, host, port, group, f"c-{tag}-b", None, batch=20)
    msgs, expected = _amr_messages(meters, 150, 1)
    pub = Publisher(host, port)
    for topic, payload in msgs:
        pub.publish(topic, payload)
    pub.confirm()
    rows = _wait_for(db_url, f"sh{tag}-", len(expected))
    logs = [a.stop(), b.stop()]
    pub.close()
    for cid in (f"c-{tag}-a", f"c-{tag}-b"):
        _forget_session(host, port, cid)
    assert len(rows) == len(expected) and set(rows) == expected, logs
    done = [a.stored(logs[0]), b.stored(logs[1])]
    assert min(done) > 0, done  # both did work
    assert sum(done) >= len(msgs)


def test_broker_restart_and_collector_kill_9_lose_nothing(db_url, tmp_path, broker):
    meters = [f"kr-{i}" for i in range(5)]
    _setup_meters(db_url, tmp_path, [{"id": m, "adapter": "mqtt"} for m in meters])
    a = Collector(db_url, "127.0.0.1", broker.port, "g", "c-a", None, batch=50, workers=2)
    b = Collector(db_url, "127.0.0.1", broker.port, "g", "c-b", None, batch=50)
    msgs, expected = _amr_messages(meters, 300, 2)  # 750 messages
    pub = Publisher("127.0.0.1", broker.port)
    third = len(msgs) // 3
    for topic, payload in msgs[:third]:
        pub.publish(topic, payload)
    b.kill()  # mid-stream: whatever it had unacknowledged stays in its session at the broker
    for topic, payload in msgs[third: 2 * third]:
        pub.publish(topic, payload)
    pub.confirm()
    broker.stop()
    broker.start()
    b = Collector(db_url, "127.0.0.1", broker.port, "g", "c-b", None, batch=50)  # same id: same session
    for topic, payload in msgs[2 * third:]:
        pub.publish(topic, payload)
    pub.confirm()
    rows = _wait_for(db_url, "kr-", len(expected), timeout=90)
    time.sleep(0.5)
    rows = _stored(db_url, "kr-")
    a.stop(), b.stop()
    pub.close()
    assert len(rows) == len(expected), (len(rows), len(expected))
    assert set(rows) == expected
    assert not [r for r in _rejects(db_url) if r[0] == "conflict"]


def test_malformed_messages_are_dead_lettered_and_never_stall(db_url, tmp_path, broker):
    inv = _setup_meters(db_url, tmp_path, [
        {"id": "mf-good", "adapter": "mqtt"},
        {"id": "mf-plug", "adapter": "mqtt", "device": "tasmota-0000", "format": "tasmota"},
    ])
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-mf", inv, batch=10)
    pub = Publisher("127.0.0.1", broker.port)
    bad = [*mqtt_sim.MALFORMED, mqtt_sim.huge_message(),
           ("zigbee2mqtt/unknown-plug", b'{"energy": 3.5}'),
           ("amr/v1/x/readings", json.dumps({"v": 1, "readings": [{"a": [[[[[[1]]]]]]}]}).encode()),
           ("amr/v1/x/readings", json.dumps({"v": 1, "readings": [
               {"meter": "mf-\u0000", "register": "1.8.0", "ts": "2026-01-01T00:00:00Z", "value": "1"}]}).encode()),
           ("amr/v1/x/readings", b'{"v":1,"readings":[{"meter":"mf-good","register":"1.8.0","ts":"2026-01-01T00:00:00Z","value":"1e5"}]}')]
    for k in range(3):  # well past any in-flight window
        for topic, payload in bad:
            pub.publish(topic, payload)
        t = BASE + timedelta(hours=k)
        good = {"v": 1, "readings": [{"meter": "mf-good", "register": "1.8.0", "ts": t.isoformat(), "value": f"{100 + k}.5"}]}
        pub.publish("amr/v1/x/readings", json.dumps(good).encode())
        local = (t + timedelta(hours=3)).replace(tzinfo=None).isoformat()
        pub.publish("tele/tasmota-0000/SENSOR", json.dumps({"Time": local, "ENERGY": {"Total": 50 + k}}).encode())
    pub.confirm()
    rows = _wait_for(db_url, "mf-", 6, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with psycopg.connect(db_url) as conn:
            if conn.execute("SELECT coalesce(sum(times), 0) FROM rejected_reading").fetchone()[0] >= 3 * len(bad):
                break
        time.sleep(0.2)
    c.stop()
    pub.close()
    assert sorted((r[0], r[3]) for r in rows) == sorted(
        [("mf-good", Decimal(f"{100 + k}.5")) for k in range(3)] + [("mf-plug", Decimal(50 + k)) for k in range(3)])
    rejects = _rejects(db_url)
    with psycopg.connect(db_url) as conn:  # the same refusal from the same source is one row, counted in times
        times = conn.execute("SELECT coalesce(sum(times), 0) FROM rejected_reading").fetchone()[0]
    assert times == 3 * len(bad) and len(bad) <= len(rejects) <= 3 * len(bad)
    codes = {r[1] for r in rejects}
    assert {"malformed", "negative", "not_finite", "unit", "too_deep", "too_large", "schema",
            "unknown_device", "type"} <= codes, codes
    assert all(r[2] and r[3] is not None for r in rejects)  # a reason and the raw bytes, always
    assert any(bytes(r[3]) == b"not json at all" for r in rejects)
    assert any("unknown-plug" in r[2] for r in rejects if r[1] == "unknown_device")


def test_sighup_maps_a_new_device_without_restart(db_url, tmp_path, broker):
    inv = _setup_meters(db_url, tmp_path, [{"id": "hup-a", "adapter": "mqtt", "device": "plug-a"}])
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-hup", inv)
    pub = Publisher("127.0.0.1", broker.port)
    t = BASE
    pub.publish("zigbee2mqtt/plug-b", json.dumps({"energy": 1.5, "last_seen": t.isoformat()}).encode())
    pub.confirm()
    deadline = time.monotonic() + 20
    while not [r for r in _rejects(db_url) if r[1] == "unknown_device"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r[1] for r in _rejects(db_url)] == ["unknown_device"]
    _setup_meters(db_url, tmp_path, [{"id": "hup-a", "adapter": "mqtt", "device": "plug-a"},
                                     {"id": "hup-b", "adapter": "mqtt", "device": "plug-b"}])
    c.proc.send_signal(signal.SIGHUP)
    c.wait_log("collector configuration reloaded")
    pub.publish("zigbee2mqtt/plug-b", json.dumps({"energy": 2.5, "last_seen": (t + timedelta(hours=1)).isoformat()}).encode())
    pub.confirm()
    rows = _wait_for(db_url, "hup-", 1, timeout=20)
    log = c.stop()
    pub.close()
    assert [(r[0], r[3]) for r in rows] == [("hup-b", Decimal("2.5"))], log
    assert c.proc.returncode == 0


@pytest.mark.parametrize("sim_format", ["shelly_gen2", "tasmota"])
def test_simulated_devices_end_to_end(db_url, tmp_path, broker, sim_format):
    """The simulator's command line, the broker, the collector and the database agree on every value."""
    n, rounds = 3, 4
    inv = _setup_meters(db_url, tmp_path, [
        {"id": f"e2e-{i}", "adapter": "mqtt", "device": mqtt_sim.device_name(sim_format, i)} for i in range(n)])
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-e2e", inv)
    sim = subprocess.run(
        [sys.executable, "-m", "simulators.mqtt_sim", "--broker", f"127.0.0.1:{broker.port}",
         "--format", sim_format, "--devices", str(n), "--rounds", str(rounds), "--interval", "1800",
         "--start", BASE.isoformat(), "--client-id", "sim-e2e"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert sim.returncode == 0, sim.stderr
    registers = 2 if sim_format == "shelly_gen2" else 1  # the Pro 3EM publishes 1.8.0 and 2.8.0
    rows = _wait_for(db_url, "e2e-", n * rounds * registers, timeout=30)
    c.stop()
    expected = {
        (f"e2e-{i}", BASE + timedelta(minutes=30 * k), ConsumptionModel(seed=i).energy_kwh(BASE + timedelta(minutes=30 * k)))
        for i in range(n) for k in range(rounds)
    }
    got = {(r[0], r[2], r[3]) for r in rows if r[1] == "1.8.0"}
    if sim_format == "shelly_gen2":  # no clock in the payload: stamped at receipt, values as simulated
        assert sorted((m, v) for m, _, v in got) == sorted((m, v) for m, _, v in expected)
        assert all(abs(ts - datetime.now(UTC)) < timedelta(minutes=5) for _, ts, _ in got)
    else:
        assert got == expected


def test_no_acknowledgement_before_the_readings_are_stored(db_url, tmp_path, broker):
    """Database unreachable: nothing is acknowledged; the same session stores it all later."""
    from amr.settings import Settings
    from collector.mqtt.client import parse_broker_url
    from collector.mqtt.consumer import Consumer

    _setup_meters(db_url, tmp_path, [{"id": f"na-{i}", "adapter": "mqtt"} for i in range(2)])
    cfg = parse_broker_url(f"mqtt://127.0.0.1:{broker.port}")
    from prometheus_client import REGISTRY

    errors_before = REGISTRY.get_sample_value("amr_db_errors_total") or 0
    dead_db = db_url + "_gone"
    first = Consumer(cfg, dead_db, "c-na", group="g", families=["amr"], settings=Settings(database_url=dead_db))
    th = threading.Thread(target=first.run, daemon=True)
    th.start()
    msgs, expected = _amr_messages(["na-0", "na-1"], 20, 4)
    pub = Publisher("127.0.0.1", broker.port)
    for topic, payload in msgs:
        pub.publish(topic, payload)
    pub.confirm()
    deadline = time.monotonic() + 10
    while (REGISTRY.get_sample_value("amr_db_errors_total") or 0) < errors_before + 2:
        assert time.monotonic() < deadline, "the consumer never tried the database"
        time.sleep(0.05)
    first.stop()
    th.join(20)
    assert first.stored_messages == 0
    second = Consumer(cfg, db_url, "c-na", group="g", families=["amr"], settings=Settings(database_url=db_url))
    th = threading.Thread(target=second.run, daemon=True)
    th.start()
    rows = _wait_for(db_url, "na-", len(expected), timeout=30)
    second.stop()
    th.join(20)
    pub.close()
    assert set(rows) == expected and len(rows) == len(expected)


def test_resumed_session_drops_subscriptions_no_longer_wanted(db_url, tmp_path, broker):
    """A persistent session keeps old subscriptions (Telegraf#9703); the collector removes them."""
    _setup_meters(db_url, tmp_path, [{"id": "sub-a", "adapter": "mqtt"}])
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-sub", None, formats="amr,tasmota")
    c.stop()
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-sub", None, formats="amr")
    assert any("session resumed" in line for line in c.lines)
    pub = Publisher("127.0.0.1", broker.port)
    pub.publish("tele/plug/SENSOR", b'{"ENERGY":{"Total":1}}')  # no longer subscribed: never delivered
    good = {"v": 1, "readings": [{"meter": "sub-a", "register": "1.8.0", "ts": BASE.isoformat(), "value": "1"}]}
    pub.publish("amr/v1/x/readings", json.dumps(good).encode())
    pub.confirm()
    rows = _wait_for(db_url, "sub-", 1, timeout=20)
    time.sleep(0.5)
    log = c.stop()
    pub.close()
    assert len(rows) == 1
    assert _rejects(db_url) == [], log  # the Tasmota message would have been an unknown device


# --- nothing acknowledged that is not committed: the database's state is an outage, not a reject ---


def _count(db_url: str, sql: str) -> int:
    with psycopg.connect(db_url) as c:
        return c.execute(sql).fetchone()[0]


def _set_read_only(pg_admin_url: str, db_url: str, on: bool) -> None:
    name = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = {'on' if on else 'off'}")


def test_read_only_database_nothing_acknowledged_is_lost(db_url, pg_admin_url, tmp_path, broker):
    """A standby after failover: the collector says so, keeps every message, stores them all later."""
    _setup_meters(db_url, tmp_path, [{"id": f"ro-{i}", "adapter": "mqtt"} for i in range(2)])
    _set_read_only(pg_admin_url, db_url, True)
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-ro", None, batch=5, workers=2)
    c.wait_log("is read-only")  # said at start, before or while joining the broker
    msgs, expected = _amr_messages(["ro-0", "ro-1"], 5, 1)  # 10 readings, a message each
    pub = Publisher("127.0.0.1", broker.port)
    for topic, payload in msgs:
        pub.publish(topic, payload)
    pub.confirm()
    c.wait_log("cannot take writes (cannot execute", timeout=30)  # a worker tried, and waits
    time.sleep(1)
    assert _count(db_url, "SELECT count(*) FROM reading") == 0
    assert _count(db_url, "SELECT count(*) FROM rejected_reading") == 0  # not dead-lettered either
    _set_read_only(pg_admin_url, db_url, False)  # the database takes writes again
    rows = _wait_for(db_url, "ro-", len(expected), timeout=60)
    log = c.stop()
    pub.close()
    assert set(rows) == expected and len(rows) == len(expected), log
    assert _rejects(db_url) == []
    assert "takes writes again" in log


def test_malformed_database_url_nothing_acknowledged_nothing_lost(db_url, tmp_path, broker):
    _setup_meters(db_url, tmp_path, [{"id": f"mu-{i}", "adapter": "mqtt"} for i in range(2)])
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    bad_url = f"postgresql://{info.get('user') or 'postgres'}:hunter2@127.0.0.1:5432/{info['dbname']}?foo=bar"
    c = Collector(bad_url, "127.0.0.1", broker.port, "g", "c-mu", None, batch=5)
    c.wait_log(f"database {info.get('user') or 'postgres'}@127.0.0.1:5432/{info['dbname']} (a malformed URL) "
               "cannot take writes")
    msgs, expected = _amr_messages(["mu-0", "mu-1"], 3, 1)
    pub = Publisher("127.0.0.1", broker.port)
    for topic, payload in msgs:
        pub.publish(topic, payload)
    pub.confirm()
    time.sleep(2)
    first_log = c.stop()
    assert c.stored(first_log) == 0
    assert _count(db_url, "SELECT count(*) FROM reading") == 0
    assert _count(db_url, "SELECT count(*) FROM rejected_reading") == 0
    assert "hunter2" not in first_log
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-mu", None, batch=5)  # fixed: the same session
    rows = _wait_for(db_url, "mu-", len(expected), timeout=30)
    c.stop()
    pub.close()
    assert set(rows) == expected and len(rows) == len(expected)
    assert _rejects(db_url) == []


def test_collect_says_the_database_is_unreachable_and_shows_db_up_0(db_url, tmp_path, broker):
    import urllib.request

    from tests.conftest import free_port

    dead, metrics_port = free_port(), free_port()
    url = f"postgresql://amr:hunter2@127.0.0.1:{dead}/amr_prod"
    env = {**os.environ, "AMR_DATABASE_URL": url, "AMR_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}",
           "AMR_MQTT_GROUP": "g", "AMR_METRICS_PORT": str(metrics_port), "AMR_METRICS_REFRESH_S": "3600",
           "AMR_LOG_FORMAT": "text", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "amr.cli", "collect", "--client-id", "c-dead", "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        for line in proc.stderr:
            lines.append(line)
            if "subscribed to" in line or time.monotonic() > deadline:
                break
        said = [line for line in lines if "cannot take writes" in line]
        assert len(said) == 1, "".join(lines)
        assert f"amr@127.0.0.1:{dead}/amr_prod" in said[0] and "joining the broker anyway" in said[0]
        assert lines.index(said[0]) < next(i for i, line in enumerate(lines) if "subscribed to" in line)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert re.search(r"^amr_db_up 0\.0$", body, re.M), body
        assert "hunter2" not in "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[1]
    assert proc.returncode == 0 and "hunter2" not in out


def test_a_message_that_cannot_be_dead_lettered_is_not_acknowledged(db_url, tmp_path, broker, caplog):
    """The store refuses a message (its data), and refuses its dead-letter row too: it stays
    unacknowledged, and the next connection gets it again; the good messages beside it are stored once."""
    from amr.settings import Settings
    from collector.mqtt.client import parse_broker_url
    from collector.mqtt.consumer import Consumer

    _setup_meters(db_url, tmp_path, [{"id": m, "adapter": "mqtt"} for m in ("dl-a", "dl-x")])
    with psycopg.connect(db_url) as c:
        # readings are rows of reading_data (reading is a view over it since migration 023)
        c.execute("""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN IF TG_TABLE_NAME = 'rejected_reading' THEN
                       RAISE EXCEPTION 'refused by a test trigger' USING ERRCODE = '22023'; END IF;
                     IF NEW.series IN (SELECT id FROM reading_series WHERE meter_id = 'dl-x') THEN
                       RAISE EXCEPTION 'refused by a test trigger' USING ERRCODE = '22023'; END IF;
                     RETURN NEW; END $$""")
        c.execute("CREATE TRIGGER refuse BEFORE INSERT ON reading_data FOR EACH ROW EXECUTE FUNCTION refuse()")
        c.execute("CREATE TRIGGER refuse_dead BEFORE INSERT ON rejected_reading FOR EACH ROW "
                  "WHEN (NEW.code = 'store_error') EXECUTE FUNCTION refuse()")
    cfg = parse_broker_url(f"mqtt://127.0.0.1:{broker.port}")

    def consumer() -> tuple[Consumer, threading.Thread]:
        con = Consumer(cfg, db_url, "c-dl", group="g", families=["amr"], settings=Settings(database_url=db_url),
                       batch_wait=0.5)
        th = threading.Thread(target=con.run, daemon=True)
        th.start()
        return con, th

    def message(meter: str, k: int) -> bytes:
        t = BASE + timedelta(minutes=30 * k)
        return json.dumps({"v": 1, "readings": [{"meter": meter, "register": "1.8.0", "ts": t.isoformat(),
                                                 "value": f"{100 + k}"}]}).encode()

    first, th = consumer()
    time.sleep(1.5)
    pub = Publisher("127.0.0.1", broker.port)
    for meter, k in (("dl-a", 0), ("dl-x", 0), ("dl-a", 1)):
        pub.publish(f"amr/v1/{meter}/readings", message(meter, k))
    pub.confirm()
    with caplog.at_level(logging.ERROR, logger="amr.mqtt"):
        deadline = time.monotonic() + 30
        while not any("could not dead-letter" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the dead-letter write was never refused"
            time.sleep(0.1)
    first.stop()
    th.join(20)
    assert first.stored_messages == 2  # the good two; the third is not acknowledged
    assert len(_stored(db_url, "dl-")) == 2 and _rejects(db_url) == []
    with psycopg.connect(db_url) as c:
        c.execute("DROP TRIGGER refuse_dead ON rejected_reading")
    second, th = consumer()  # the same session: the broker delivers the unacknowledged message again
    deadline = time.monotonic() + 30
    while not _rejects(db_url):
        assert time.monotonic() < deadline, "the unacknowledged message never came again"
        time.sleep(0.1)
    second.stop()
    th.join(20)
    pub.close()
    rejects = _rejects(db_url)
    assert [(r[1], r[4]) for r in rejects] == [("store_error", "mqtt:amr/v1/dl-x/readings")]
    assert b'"dl-x"' in bytes(rejects[0][3]) and "refused by a test trigger" in rejects[0][2]
    assert sorted(r[0] for r in _stored(db_url, "dl-")) == ["dl-a", "dl-a"]
