"""The gateway uplink: spool to broker (QoS 1) or to the database, in order, nothing lost."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from adapters.reading import Reading, Rejected
from amr.settings import Settings
from collector.gateway.spool import Spool
from collector.gateway.uplink import IngestForwarder, MqttForwarder, Uplink, UplinkError
from collector.inventory import parse_inventory, upsert_inventory
from collector.mqtt.client import parse_broker_url
from tests.conftest import ROOT, _mosquitto_binary

T0 = (datetime.now(UTC) - timedelta(days=30)).replace(minute=0, second=0, microsecond=0)


class Subscriber:
    """Records every amr/v1 reading the broker delivers, in delivery order (persistent session)."""

    def __init__(self, port: int):
        self.values: list[tuple[str, str, str]] = []
        self.rejected: list[dict] = []
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="uplink-test-sub",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *a: c.subscribe("amr/v1/+/readings", 1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        from collector.mqtt.client import connect_properties

        self.client.connect("127.0.0.1", port, clean_start=False, properties=connect_properties())
        self.client.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            self.values.extend((r["meter"], r["ts"], r["value"]) for r in body["readings"])
            self.rejected.extend(body.get("rejected", ()))

    def first_seen(self) -> list[tuple[str, str, str]]:
        """Delivery order with redeliveries removed."""
        seen, out = set(), []
        with self.lock:
            for v in self.values:
                if v not in seen:
                    seen.add(v)
                    out.append(v)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _readings(n: int, start: int = 0, meter: str = "gw-m") -> list[Reading]:
    return [Reading(meter, "1.8.0", T0 + timedelta(minutes=30 * i), Decimal(1000 + i) / 10, frozenset(), "modbus")
            for i in range(start, start + n)]


def _key(r: Reading) -> tuple[str, str, str]:
    return (r.meter_id, r.ts.isoformat(), str(r.value))


def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_broker_down_spool_grows_then_drains_in_order(tmp_path, broker):
    sub = Subscriber(broker.port)
    broker.stop()
    spool = Spool(tmp_path / "spool.sqlite", 100_000)
    fwd = MqttForwarder(parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"), "amr/v1/gw-test/readings",
                        timeout=2)
    uplink = Uplink(spool, fwd, batch_size=100, max_backoff=1)
    uplink.start()
    rej = Rejected("modbus:bus1", b"\x00\xff", "meter 'gw-m2' register '1.8.0': CRC mismatch", "crc", "gw-m2")
    sent: list[Reading] = []
    for k in range(10):  # the gateway keeps polling through the outage
        batch = _readings(50, 50 * k)
        spool.put(batch + ([rej] if k == 3 else []))
        sent.extend(batch)
        uplink.notify()
        time.sleep(0.05)
    time.sleep(1.0)
    assert len(spool) == 501 and uplink.delivered == 0  # nothing left while the broker is down
    broker.start()
    _until(lambda: len(spool) == 0, 60, f"spool did not drain: {len(spool)} left")
    _until(lambda: len(sub.first_seen()) == len(sent), 20, "subscriber did not see everything")
    uplink.stop()
    sub.close()
    assert sub.first_seen() == [_key(r) for r in sent]  # in order, none missing
    assert [r["reason"] for r in sub.rejected][:1] == [rej.reason]


def test_kill_9_during_drain_loses_nothing(tmp_path, broker):
    sub = Subscriber(broker.port)
    path = tmp_path / "spool.sqlite"
    sent = _readings(40_000)  # long enough a drain to be caught in the middle
    with Spool(path, 100_000) as s:
        for i in range(0, len(sent), 5000):
            s.put(sent[i: i + 5000])
    env = {**os.environ, "AMR_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}", "AMR_METRICS_PORT": "0",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "amr.cli", "mqtt", "drain", "--spool", str(path), "--batch", "100",
           "--topic", "amr/v1/gw-kill/readings"]
    gw = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _until(lambda: len(sub.values) >= 1000, 60, "the drain did not start")
    gw.send_signal(signal.SIGKILL)
    gw.wait(10)
    gw.stderr.close()
    left = len(Spool(path, 100_000))
    assert 0 < left < len(sent)  # killed mid-drain
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _until(lambda: len(sub.first_seen()) == len(sent), 20, "subscriber did not see everything")
    sub.close()
    assert sub.first_seen() == [_key(r) for r in sent]
    assert len(Spool(path, 100_000)) == 0


def test_drain_to_the_database_after_commit_only(tmp_path, db_url):
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, parse_inventory({"subscriber": [{"account": "1"}],
                                             "meter": [{"id": "gw-m", "account": "1"}]}))
    spool = Spool(tmp_path / "spool.sqlite", 10_000)
    sent = _readings(120)
    spool.put(sent)
    bad = Uplink(spool, IngestForwarder(db_url + "_no_such_db", Settings()), batch_size=50)
    with pytest.raises(UplinkError, match="cannot take writes") as err:
        bad.drain_once()
    assert err.value.reason == "db_unavailable"
    assert len(spool) == 120  # nothing left the spool without a commit
    good = Uplink(spool, IngestForwarder(db_url, Settings()), batch_size=50)
    while good.drain_once():
        pass
    good.forwarder.close()
    assert len(spool) == 0
    with psycopg.connect(db_url) as c:
        rows = c.execute("SELECT ts, value, quality FROM reading WHERE meter_id = 'gw-m' ORDER BY ts").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(r.ts, r.value) for r in sent]
    assert all("spooled" in r[2] for r in rows)


def test_secrets_are_not_in_the_description(tmp_path):
    cfg = parse_broker_url("mqtts://gw:hunter2@broker.example:8883")
    assert cfg.tls and cfg.port == 8883 and cfg.username == "gw"
    assert cfg.password.get_secret_value() == "hunter2"
    assert "hunter2" not in cfg.describe() and "hunter2" not in repr(cfg)


def _tls_broker(tmp: Path, port: int) -> tuple[subprocess.Popen, dict[str, Path]]:
    """A Mosquitto with TLS, client certificates and a password file, made here with openssl."""
    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, timeout=60)

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=amr-test-ca")
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "ext.cnf"]), ("client", [])):
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext)
    run("mosquitto_passwd", "-b", "-c", "passwd", "gw-tls", "s3cr3t-pw")
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\ncafile {tmp}/ca.pem\ncertfile {tmp}/server.pem\nkeyfile {tmp}/server.key\n"
        f"require_certificate true\nallow_anonymous false\npassword_file {tmp}/passwd\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen([_mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "TLS broker did not start"
            time.sleep(0.05)
    return proc, {"ca": tmp / "ca.pem", "cert": tmp / "client.pem", "key": tmp / "client.key"}


def test_tls_with_client_certificate_and_password_never_logged(tmp_path):
    from tests.conftest import free_port

    port = free_port()
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    proc, certs = _tls_broker(certs_dir, port)
    try:
        path = tmp_path / "spool.sqlite"
        with Spool(path, 1000) as s:
            s.put(_readings(30))
        env = {**os.environ, "AMR_MQTT_URL": f"mqtts://gw-tls@127.0.0.1:{port}", "AMR_MQTT_PASSWORD": "s3cr3t-pw",
               "AMR_MQTT_CA": str(certs["ca"]), "AMR_MQTT_CERT": str(certs["cert"]),
               "AMR_MQTT_KEY": str(certs["key"]), "AMR_METRICS_PORT": "0", "AMR_LOG_FORMAT": "text",
               "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "amr.cli", "mqtt", "drain", "--spool", str(path), "--batch", "10"]
        # a wrong password: nothing delivered, the spool keeps everything, the password is nowhere in the log
        bad = subprocess.Popen(cmd, env={**env, "AMR_MQTT_PASSWORD": "wr0ng-pw"}, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        bad.send_signal(signal.SIGTERM)
        out, err = bad.communicate(timeout=20)
        assert bad.returncode == 1 and "30 left in the spool" in err, err
        assert "wr0ng-pw" not in out + err and "retrying" in err
        # delivery needs a subscriber (a broker with none answers PUBACK 16 and the batch stays)
        from pydantic import SecretStr

        from collector.mqtt.client import make_client

        cfg = parse_broker_url(f"mqtts://gw-tls@127.0.0.1:{port}", SecretStr("s3cr3t-pw"), certs["ca"],
                               certs["cert"], certs["key"])
        got: list[str] = []
        subscribed = threading.Event()
        sub = make_client(cfg, "uplink-tls-sub")
        sub.on_connect = lambda c, *a: c.subscribe("amr/v1/+/readings", 1)
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_message = lambda c, u, msg: got.extend(r["value"] for r in json.loads(msg.payload)["readings"])
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        assert subscribed.wait(10)
        ok = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert "delivered 30 readings; 0 left" in ok.stderr and "s3cr3t-pw" not in ok.stdout + ok.stderr
        _until(lambda: len(got) >= 30, 10, "the subscriber did not get the readings")
        sub.disconnect()
        sub.loop_stop()
    finally:
        proc.terminate()
        proc.wait(10)


# --- delivery means delivery: only a PUBACK with reason code 0 takes a batch out of the spool ---


def _refused(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("amr_uplink_refused_total", {"reason": reason}) or 0


def test_puback_no_matching_subscribers_keeps_the_batch(tmp_path, broker):
    """Reason 16 is an answer, not a delivery: the broker dropped the message."""
    spool = Spool(tmp_path / "spool.sqlite", 10_000)
    sent = _readings(120)
    spool.put(sent)
    fwd = MqttForwarder(parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"), "amr/v1/gw-nosub/readings", timeout=5)
    uplink = Uplink(spool, fwd, batch_size=50)
    before = _refused("no_subscribers")
    for _ in range(3):  # nobody subscribed: every try is refused, nothing leaves the spool
        with pytest.raises(UplinkError, match="PUBACK 16") as err:
            uplink.drain_once()
        assert err.value.reason == "no_subscribers"
    assert len(spool) == 120 and uplink.delivered == 0
    assert [e.item for e in spool.peek(1)] == [sent[0].flagged("spooled")]  # still at the head
    assert _refused("no_subscribers") == before + 3
    sub = Subscriber(broker.port)  # a subscriber: now the same batches are delivered, in order
    while uplink.drain_once():
        pass
    _until(lambda: len(sub.first_seen()) == len(sent), 20, "subscriber did not see everything")
    fwd.close()
    sub.close()
    assert len(spool) == 0 and sub.first_seen() == [_key(r) for r in sent]


def test_broker_restart_while_draining_with_collectors_down_stores_every_reading_once(db_url, tmp_path, broker, caplog):
    """The gateway polls and drains; the collectors are down; the broker restarts (and forgets their
    shared subscriptions until they come back). Every polled reading is stored exactly once."""
    from tests.test_mqtt_collector import Collector, _setup_meters

    meters = [f"rs-{i}" for i in range(4)]
    _setup_meters(db_url, tmp_path, [{"id": m, "adapter": "mqtt"} for m in meters])
    Collector(db_url, "127.0.0.1", broker.port, "g", "c-rs", None).stop()  # subscribed once: a persistent session
    spool = Spool(tmp_path / "spool.sqlite", 1_000_000)
    fwd = MqttForwarder(parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"), "amr/v1/gw-rs/readings", timeout=3)
    fwd.client.reconnect_delay_set(0.1, 0.5)
    uplink = Uplink(spool, fwd, batch_size=100, max_backoff=0.5)
    sent: list[Reading] = []

    def poll(rounds: int) -> None:  # the gateway keeps polling: 4 meters, a reading each per round
        for _ in range(rounds):
            k = len(sent) // len(meters)
            batch = [Reading(m, "1.8.0", T0 + timedelta(minutes=30 * k), Decimal(1000 + k), frozenset(), "modbus")
                     for m in meters]
            spool.put(batch)
            sent.extend(batch)
            uplink.notify()
            time.sleep(0.005)

    refused_before = _refused("no_subscribers")
    with caplog.at_level(logging.INFO, logger="collector.gateway.uplink"):
        uplink.start()
        poll(400)  # delivered into the offline session's queue at the broker
        broker.stop()
        broker.start()
        poll(600)  # the broker answers 16 until a collector subscribes again
        _until(lambda: _refused("no_subscribers") > refused_before, 30, "no PUBACK 16 after the restart")
        poll(200)
        assert len(spool) > 0  # what the broker could not deliver is still here
        collector = Collector(db_url, "127.0.0.1", broker.port, "g", "c-rs", None)
        poll(200)
        _until(lambda: len(spool) == 0, 60, f"the spool did not drain: {len(spool)} left")
    expected = {(r.meter_id, r.ts, r.value) for r in sent}
    deadline = time.monotonic() + 60
    while True:
        with psycopg.connect(db_url) as c:
            rows = c.execute("SELECT meter_id, ts, value FROM reading WHERE meter_id LIKE 'rs-%'").fetchall()
        if len(rows) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    uplink.stop()
    log = collector.stop()
    assert len(sent) == 5600
    assert len(rows) == len(expected) and set(rows) == expected, (len(rows), len(expected), log[-2000:])
    warned = [r.getMessage() for r in caplog.records if "No matching subscribers" in r.getMessage()]
    assert len(warned) == 1  # said once for the outage, not once per retry
    assert any("delivering again" in r.getMessage() for r in caplog.records)


def test_database_down_keeps_the_spool_and_says_where_without_the_password(tmp_path, db_url, caplog):
    from prometheus_client import REGISTRY

    from tests.conftest import free_port

    with psycopg.connect(db_url) as c:
        upsert_inventory(c, parse_inventory({"subscriber": [{"account": "1"}],
                                             "meter": [{"id": "gw-m", "account": "1"}]}))
    spool = Spool(tmp_path / "spool.sqlite", 10_000)
    spool.put(_readings(60))
    port = free_port()  # nobody listens
    down = IngestForwarder(f"postgresql://amr:hunter2@127.0.0.1:{port}/amr_prod", Settings())
    uplink = Uplink(spool, down, batch_size=50, max_backoff=0.2)
    refused = _refused("db_unavailable")
    with caplog.at_level(logging.INFO, logger="collector.gateway.uplink"):
        uplink.start()
        _until(lambda: _refused("db_unavailable") >= refused + 3, 20, "the uplink did not retry")
        uplink.stop()
    assert len(spool) == 60 and REGISTRY.get_sample_value("amr_db_up") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "collector.gateway.uplink"]
    assert len(lines) == 1, lines  # one line for the outage, however many retries
    assert f"amr@127.0.0.1:{port}/amr_prod" in lines[0] and "hunter2" not in lines[0]
    good = Uplink(spool, IngestForwarder(db_url, Settings()), batch_size=50)
    while good.drain_once():
        pass
    good.forwarder.close()
    assert len(spool) == 0 and REGISTRY.get_sample_value("amr_db_up") == 1


def test_read_only_database_keeps_the_spool_until_it_takes_writes(tmp_path, db_url, pg_admin_url):
    """A standby after failover answers, but refuses writes: an outage, not a refusal of the data."""
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, parse_inventory({"subscriber": [{"account": "1"}],
                                             "meter": [{"id": "gw-m", "account": "1"}]}))
    name = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    spool = Spool(tmp_path / "spool.sqlite", 10_000)
    sent = _readings(80)
    spool.put(sent)
    uplink = Uplink(spool, IngestForwarder(db_url, Settings()), batch_size=50)
    with pytest.raises(UplinkError, match="read-only") as err:
        uplink.drain_once()
    assert err.value.reason == "db_unavailable" and len(spool) == 80
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM rejected_reading").fetchone()[0] == 0  # not dead-lettered either
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = off")
    while uplink.drain_once():
        pass
    uplink.forwarder.close()
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM reading WHERE meter_id = 'gw-m'").fetchone()[0] == len(sent)


def test_one_item_the_database_refuses_does_not_hold_the_spool(tmp_path, db_url):
    """A refusal of the data (a trigger raising a data exception for one meter stands in for any) is
    isolated: that reading becomes a reject with its own text, the rest of its batch is stored."""
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, parse_inventory({"subscriber": [{"account": "1"}],
                                             "meter": [{"id": "gw-m", "account": "1"}, {"id": "gw-x", "account": "1"}]}))
        # readings are rows of reading_data (reading is a view over it since migration 023)
        c.execute("""CREATE FUNCTION refuse_gw_x() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN IF NEW.series IN (SELECT id FROM reading_series WHERE meter_id = 'gw-x') THEN
                       RAISE EXCEPTION 'value refused for %', 'gw-x' USING ERRCODE = '22023'; END IF;
                     RETURN NEW; END $$""")
        c.execute("CREATE TRIGGER refuse_gw_x BEFORE INSERT ON reading_data FOR EACH ROW"
                  " EXECUTE FUNCTION refuse_gw_x()")
    spool = Spool(tmp_path / "spool.sqlite", 10_000)
    good = _readings(60)
    poison = _readings(1, 1000, meter="gw-x")[0]
    spool.put([*good[:30], poison, *good[30:]])
    uplink = Uplink(spool, IngestForwarder(db_url, Settings()), batch_size=50)
    while uplink.drain_once():
        pass
    uplink.forwarder.close()
    assert len(spool) == 0
    with psycopg.connect(db_url) as c:
        stored = c.execute("SELECT count(*) FROM reading WHERE meter_id = 'gw-m'").fetchone()[0]
        rejects = c.execute("SELECT code, reason, raw, meter_id FROM rejected_reading").fetchall()
    assert stored == len(good)
    assert [(r[0], r[3]) for r in rejects] == [("store_error", "gw-x")]
    assert "value refused for gw-x" in rejects[0][1] and b'"meter":"gw-x"' in bytes(rejects[0][2])
