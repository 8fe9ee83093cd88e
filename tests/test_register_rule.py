"""One rule for a register, at every entry point (issue 18).

A reading for a register not configured for its meter (the inventory's
`registers`, default 1.8.0) is refused with the code unknown_register by
validation (collector.rules.vee), so by `amr ingest`, the MQTT collector, the
gateway's drain to the database and the API's POST readings alike. A meter
with no list (an MQTT device: its payload format decides its registers)
takes any OBIS register.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from fastapi.testclient import TestClient

from adapters.reading import REJECT_CODES, Reading
from amr.settings import Settings
from billing.api import TokenStore, create_app
from collector.gateway.spool import Spool
from collector.gateway.uplink import IngestForwarder, Uplink
from collector.inventory import parse_inventory, upsert_inventory
from collector.rules.vee import register_refusal
from tests.test_mqtt_collector import (
    Collector,
    Publisher,
    _forget_session,
    _setup_meters,
    _wait_for,
)

T0 = (datetime.now(UTC) - timedelta(days=20)).replace(minute=0, second=0, microsecond=0)
REASON_9 = register_refusal("rr-1", "9.9.9", frozenset({"1.8.0"}))


def _inventory(conn, meters: list[dict], metering: str = "amr") -> None:
    upsert_inventory(conn, parse_inventory({
        "subscriber": [{"account": "77", "metering": metering}],
        "meter": [{"account": "77", **m} for m in meters]}))
    conn.commit()


def _rejects(conn) -> list[tuple]:
    conn.rollback()
    return conn.execute("SELECT code, reason, meter_id, register FROM rejected_reading ORDER BY id").fetchall()


def _registers(conn, meter_id: str) -> list[str]:
    conn.rollback()
    return [r for (r,) in conn.execute("SELECT DISTINCT register FROM reading WHERE meter_id = %s"
                                       " ORDER BY register", (meter_id,)).fetchall()]


def test_the_rule_and_its_code() -> None:
    assert REASON_9 is not None and REASON_9.code == "unknown_register" and "unknown_register" in REJECT_CODES
    assert "'9.9.9' is not configured" in REASON_9.reason and "registers" in REASON_9.reason
    assert register_refusal("m", "9.9.9", None) is None  # no list: any register
    assert register_refusal("m", "1.8.0", frozenset({"1.8.0"})) is None


def test_amr_ingest_refuses_an_unconfigured_register_with_its_line(db_url, conn, tmp_path) -> None:
    _inventory(conn, [{"id": "rr-1"}, {"id": "rr-2", "registers": ["1.8.0", "1.8.1"]}])
    f = tmp_path / "r.csv"
    f.write_text("meter_id,register,ts,value\n"
                 f"rr-1,1.8.0,{T0.isoformat()},10\n"
                 f"rr-1,9.9.9,{T0.isoformat()},10\n"
                 f"rr-2,1.8.1,{T0.isoformat()},10\n"
                 f"rr-1,1.8.1,{T0.isoformat()},10\n")
    out = tmp_path / "rejects.csv"
    env = {**os.environ, "AMR_DATABASE_URL": db_url}
    res = subprocess.run([sys.executable, "-m", "amr.cli", "ingest", str(f), "--json", "--rejects", str(out)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert json.loads(res.stdout)["accepted"] == 2
    assert [(c, m, r) for c, _, m, r in _rejects(conn)] == [("unknown_register", "rr-1", "9.9.9"),
                                                            ("unknown_register", "rr-1", "1.8.1")]
    assert _rejects(conn)[0][1] == REASON_9.reason  # the same words as every other entry point
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [ln.split(",")[:2] for ln in lines[1:]] == [["3", "unknown_register"], ["5", "unknown_register"]]
    assert _registers(conn, "rr-2") == ["1.8.1"]


def test_the_mqtt_collector_refuses_it_and_a_device_without_a_list_takes_any(db_url, conn, tmp_path,
                                                                             mqtt_broker) -> None:
    host, port = mqtt_broker
    tag = uuid.uuid4().hex[:6]
    polled, device = f"rq{tag}-gw", f"rq{tag}-dev"
    # a polled meter (its readings come through a gateway's uplink) and an MQTT device
    _setup_meters(db_url, tmp_path, [{"id": polled, "adapter": "modbus_tcp", "host": "10.0.0.1"},
                                     {"id": device, "adapter": "mqtt"}])
    c = Collector(db_url, host, port, f"g{tag}", f"c-{tag}", None, batch=1)
    pub = Publisher(host, port)
    rows = [{"meter": polled, "register": "9.9.9", "ts": T0.isoformat(), "value": "5"},
            {"meter": polled, "register": "1.8.0", "ts": T0.isoformat(), "value": "5"},
            {"meter": device, "register": "2.8.0", "ts": T0.isoformat(), "value": "7"}]
    pub.publish("amr/v1/t/readings", json.dumps({"v": 1, "readings": rows}).encode())
    pub.confirm()
    stored = _wait_for(db_url, f"rq{tag}-", 2, timeout=30)
    c.stop()
    pub.close()
    _forget_session(host, port, f"c-{tag}")
    assert sorted((m, r) for m, r, _, _ in stored) == [(device, "2.8.0"), (polled, "1.8.0")]
    refused = [(code, reason) for code, reason, m, _ in _rejects(conn) if m == polled]
    assert refused == [("unknown_register", register_refusal(polled, "9.9.9", frozenset({"1.8.0"})).reason)]


def test_the_gateway_drain_to_the_database_refuses_it(db_url, conn, tmp_path) -> None:
    _inventory(conn, [{"id": "rr-1"}])
    spool = Spool(tmp_path / "spool.sqlite", 1000)
    spool.put([Reading("rr-1", "9.9.9", T0, Decimal(10), frozenset(), "modbus"),
               Reading("rr-1", "1.8.0", T0, Decimal(10), frozenset(), "modbus")])
    up = Uplink(spool, IngestForwarder(db_url, Settings()), batch_size=10)
    while up.drain_once():
        pass
    up.forwarder.close()
    assert len(spool) == 0
    assert _registers(conn, "rr-1") == ["1.8.0"]
    assert [(c, r) for c, r, _, _ in _rejects(conn)] == [("unknown_register", REASON_9.reason)]


def test_the_api_refuses_it_with_the_same_code(db_url, conn) -> None:
    _inventory(conn, [{"id": "rr-1", "adapter": "manual"}], metering="manual")
    conn.execute("UPDATE meter SET installed = %s WHERE id = 'rr-1'", (T0 - timedelta(days=30),))
    conn.commit()
    tokens = TokenStore.from_toml('[[token]]\nname = "t"\ntoken = "tok-77"\naccounts = ["77"]\n', "tokens.toml")
    with TestClient(create_app(Settings(database_url=db_url), tokens)) as api:
        post = lambda reg: api.post(  # noqa: E731
            "/accounts/77/readings", headers={"Authorization": "Bearer tok-77"},
            json={"readings": [{"register": reg, "ts": T0.isoformat(), "value": "10"}]})
        r = post("1.8.1")  # a register the API's form allows, not configured for this meter
        assert (r.status_code, r.json()["code"]) == (422, "unknown_register"), r.json()
        assert "1.8.1" in r.json()["message"]
        r = post("9.9.9")  # an OBIS code of no meter: the same rule, not a form error
        assert (r.status_code, r.json()["code"]) == (422, "unknown_register"), r.json()
        assert post("1.8.0").status_code == 201
    assert _registers(conn, "rr-1") == ["1.8.0"]
