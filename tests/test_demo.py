"""`amr demo` end to end: what it prints is what the database holds; it cleans up after itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from tests.conftest import fresh_database

ROOT = Path(__file__).resolve().parent.parent
AMR = [sys.executable, "-c", "from amr.cli import main; raise SystemExit(main())"]


def run_demo(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    out = subprocess.run([*AMR, "demo", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def parse(stdout: str) -> tuple[list[dict], dict]:
    objs = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    subs = [o for o in objs if o["type"] == "subscriber"]
    runs = [o for o in objs if o["type"] == "run"]
    assert len(runs) == 1
    return subs, runs[0]


def test_demo_summary_matches_the_database(db_url, mqtt_broker, tmp_path):
    host, port = mqtt_broker
    env = {**os.environ, "AMR_DATABASE_URL": db_url, "AMR_MQTT_URL": f"mqtt://{host}:{port}",
           "TMPDIR": str(tmp_path)}
    out = run_demo(env, "--json", "--month", "2026-03", "--days", "3")
    subs, run = parse(out.stdout)

    # every protocol took part, and the month was polled at 30-minute slots
    assert run["protocols"] == ["modbus_tcp", "modbus_rtu (pty)", "iec62056 (pty)", "mqtt", "manual"]
    assert run["slots"] == 3 * 48 + 1
    assert run["readings"]["accepted"] > 0 and run["readings"]["rejected"] == 0
    assert run["billing"]["held_back"] == 0 and run["billing"]["billed"] == 5
    plans = {(s["plan"], s["metering"]) for s in subs}
    assert {p for p, _ in plans} == {"single", "two_zone", "three_zone"}
    assert {m for _, m in plans} == {"amr", "manual"}

    period = date(2026, 3, 1)
    with psycopg.connect(db_url) as conn:
        for s in subs:
            account = s["account"]
            # energy per zone, from the table the bills are made of
            rows = conn.execute(
                "SELECT d.zone, sum(d.kwh) FROM daily_zone_usage d JOIN meter m ON m.id = d.meter_id"
                " WHERE m.account = %s AND d.day >= '2026-03-01' AND d.day < '2026-04-01' GROUP BY d.zone",
                (account,),
            ).fetchall()
            db_zones = {zone: kwh for zone, kwh in rows}
            printed = {z: Decimal(v) for z, v in s["zones"].items() if Decimal(v) != 0}
            assert printed == {z: v for z, v in db_zones.items() if v != 0}, account
            assert sum(db_zones.values()) > 0, f"account {account}: no energy stored"
            # the bill: total and every line as stored
            total, version = conn.execute(
                "SELECT total, version FROM bill WHERE account = %s AND period = %s ORDER BY version DESC LIMIT 1",
                (account, period),
            ).fetchone()
            assert Decimal(s["bill"]["total"]) == total and s["bill"]["version"] == version
            lines = conn.execute(
                "SELECT zone, kwh, rate, amount FROM bill_line WHERE account = %s AND period = %s AND version = %s"
                " ORDER BY line_no", (account, period, version),
            ).fetchall()
            assert [(ln["zone"], Decimal(ln["kwh"]), Decimal(ln["rate"]), Decimal(ln["amount"]))
                    for ln in s["bill"]["lines"]] == [tuple(r) for r in lines]
            assert sum(Decimal(ln["amount"]) for ln in s["bill"]["lines"]) == total
            # readings of every meter of the subscriber are there
            for meter in s["meters"]:
                n = conn.execute("SELECT count(*) FROM reading WHERE meter_id = %s", (meter,)).fetchone()[0]
                assert n >= 2, f"meter {meter}: {n} readings"
        # the three-day stretch of a 30-minute meter is fully covered: 3 x 48 intervals
        n = conn.execute("SELECT count(*) FROM reading WHERE meter_id = 'demo-tcp-1'").fetchone()[0]
        assert n == 3 * 48 + 1
        # the MQTT meter's readings came through the broker and the collector
        src = conn.execute("SELECT DISTINCT source FROM reading WHERE meter_id = 'demo-mqtt-1'").fetchall()
        assert src and all("mqtt" in s[0] or "tasmota" in s[0] for s in src)
    # the readable summary shows the same totals
    text = run_demo({**env}, "--month", "2026-03", "--days", "3").stdout
    for s in subs:
        assert f"account {s['account']}" in text
        assert s["bill"]["total"] in text
    assert "where to look next" in text and "amr bill --period 2026-03" in text
    assert not list(tmp_path.glob("amr-demo-*")), "the demo left its work folder behind"


def test_demo_on_its_own_embedded_database_cleans_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMR_")}
    env["TMPDIR"] = str(tmp_path)
    out = run_demo(env, "--json", "--days", "1", "--no-mqtt")
    subs, run = parse(out.stdout)
    assert run["embedded_database"] is True
    assert "mqtt" not in run["protocols"]
    assert len(subs) == 5 and all(s["bill"] and Decimal(s["bill"]["total"]) > 0 for s in subs)
    # nothing left running or lying around
    assert not list(tmp_path.glob("amr-demo-*"))
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10).stdout
    assert str(tmp_path) not in ps


@pytest.mark.parametrize("bad", [["--days", "0"], ["--month", "2026-13"], ["--month", "2099-01"]])
def test_demo_refuses_bad_arguments(bad):
    out = subprocess.run([*AMR, "demo", *bad], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--days" in out.stderr or "month" in out.stderr
    assert "Traceback" not in out.stderr


def test_demo_serve_keeps_metrics_and_api_up_until_stopped(db_url, tmp_path):
    import signal
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith("AMR_")}
    env |= {"AMR_DATABASE_URL": db_url, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([*AMR, "demo", "--json", "--days", "1", "--no-mqtt", "--serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        subs, run = [], None
        for line in proc.stdout:  # type: ignore[union-attr]
            obj = json.loads(line)
            if obj["type"] == "subscriber":
                subs.append(obj)
            else:
                run = obj
                break
        assert run is not None and run["api_url"] and run["api_token"]
        req = urllib.request.Request(f"{run['api_url']}/accounts/990001/bills",
                                     headers={"Authorization": f"Bearer {run['api_token']}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read().decode()
        printed = next(s for s in subs if s["account"] == "990001")
        assert printed["bill"]["total"].rstrip("0").rstrip(".") in body
        with urllib.request.urlopen(run["metrics_url"], timeout=10) as resp:
            metrics_text = resp.read().decode()
        assert 'amr_readings_total{outcome="accepted"}' in metrics_text
        _the_demo_user_sees_both_kinds_of_account(run["portal"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with pytest.raises(OSError):  # the API is gone with the demo
        urllib.request.urlopen(f"{run['api_url']}/docs", timeout=3)
    assert not list(tmp_path.glob("amr-demo-*"))


def _the_demo_user_sees_both_kinds_of_account(portal: dict) -> None:
    """The printed login and password open the customer account, with the demo's accounts linked."""
    from tests.portal_kit import Visitor

    assert portal and portal["login"] == "demo" and len(portal["password"]) >= 8
    v = Visitor(portal["url"], {})
    try:
        assert v.login("demo", "not the password").status_code != 303
        assert v.login(portal["login"], portal["password"]).status_code == 303
        home = v.get("/")
        assert home.status_code == 200 and "990001" in home.text and "990005" in home.text
        automated = v.get("/accounts/990001/readings")
        assert automated.status_code == 200 and 'name="value_' not in automated.text
        assert "автоматически" in automated.text
        manual = v.get("/accounts/990005/readings")
        assert manual.status_code == 200 and 'name="value_' in manual.text
        usage = v.get("/accounts/990001")
        assert usage.status_code == 200 and "<svg" in usage.text
    finally:
        v.close()


def test_demo_summary_counts_the_mqtt_meters_readings(db_url, mqtt_broker, tmp_path, pg_admin_url, template_db):
    host, port = mqtt_broker
    env = {**os.environ, "AMR_DATABASE_URL": db_url, "AMR_MQTT_URL": f"mqtt://{host}:{port}",
           "TMPDIR": str(tmp_path)}
    _, run = parse(run_demo(env, "--json", "--month", "2026-03", "--days", "1").stdout)
    assert "mqtt" in run["protocols"] and run["mqtt_left_out"] is None
    with psycopg.connect(db_url) as conn:
        stored = dict(conn.execute(
            "SELECT m.adapter, count(*) FROM reading r JOIN meter m ON m.id = r.meter_id"
            " WHERE m.id LIKE 'demo-%' GROUP BY 1").fetchall())
    assert stored["mqtt"] > 0
    assert run["readings_by_protocol"] == stored
    # the run's count is every protocol's, the MQTT collector's included
    assert run["readings"]["accepted"] == sum(stored.values())
    with fresh_database(pg_admin_url, template_db) as other:  # the readable summary, on a database of its own
        text = run_demo({**env, "AMR_DATABASE_URL": other}, "--month", "2026-03", "--days", "1").stdout
    assert "readings of every protocol: " + ", ".join(f"{v} {k}" for k, v in run["readings"].items()) in text
    assert f"mqtt {stored['mqtt']}" in text.split("readings stored by protocol:")[1].splitlines()[0]


def test_demo_starts_its_own_broker_when_none_answers(tmp_path, monkeypatch):
    import simulators.demo as demo_mod
    from amr.settings import Settings
    from simulators.broker import answers

    real = demo_mod.broker_answers
    monkeypatch.setattr(demo_mod, "broker_answers",  # as on a machine without a broker on 1883
                        lambda h, p, timeout=0.5: False if p == 1883 else real(h, p, timeout))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    demo = demo_mod.Demo(demo_mod.DemoOptions(), settings=Settings(database_url="", mqtt_url=""))
    cfg = demo._broker()
    try:
        assert cfg is not None and cfg.port != 1883 and demo.mqtt_left_out is None
        assert answers(cfg.host, cfg.port)
    finally:
        demo.close()
    assert not answers(cfg.host, cfg.port), "the demo's broker outlived the demo"
    assert not list(tmp_path.glob("amr-demo-*"))


def test_demo_without_mosquitto_says_mqtt_was_left_out_and_why(tmp_path, monkeypatch, capsys):
    import simulators.broker
    import simulators.demo as demo_mod
    from amr.settings import Settings
    from simulators.commands import print_summary

    monkeypatch.setattr(demo_mod, "broker_answers", lambda h, p, timeout=0.5: False)
    monkeypatch.setattr(simulators.broker, "mosquitto_binary", lambda: None)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    demo = demo_mod.Demo(demo_mod.DemoOptions(), settings=Settings(database_url="", mqtt_url=""))
    try:
        assert demo._broker() is None
    finally:
        demo.close()
    assert "mosquitto is not installed" in (demo.mqtt_left_out or "")
    from datetime import UTC, datetime
    result = demo_mod.DemoResult(
        period=date(2026, 3, 1), first=datetime(2026, 2, 28, 21, tzinfo=UTC), last=datetime(2026, 3, 1, 21, tzinfo=UTC),
        database="x", database_url="x", embedded=True, slots=49, readings={"accepted": 1}, protocols=["manual"],
        mqtt=None, metrics_url=None, seconds=1.0, mqtt_left_out=demo.mqtt_left_out)
    print_summary(result)
    out = capsys.readouterr().out
    assert "MQTT left out: no broker answers on 127.0.0.1:1883 and mosquitto is not installed" in out


def test_demo_hints_are_commands_that_work(db_url, tmp_path):
    from amr.cli import build_parser

    env = {k: v for k, v in os.environ.items() if not k.startswith("AMR_")}
    env |= {"AMR_DATABASE_URL": db_url, "TMPDIR": str(tmp_path)}
    text = run_demo(env, "--month", "2026-03", "--days", "1", "--no-mqtt").stdout
    hints = [ln.strip().split("   ")[0] for ln in text.splitlines() if ln.startswith("    amr ")]
    _, run = parse(run_demo(env, "--json", "--month", "2026-03", "--days", "1", "--no-mqtt").stdout)
    assert hints == [h["command"] for h in run["next_steps"]]
    assert any(h.startswith("amr bill show --account") for h in hints)
    for hint in hints:
        argv = hint.split()[1:]
        build_parser().parse_args(argv)  # a hint that does not parse exits here
        if argv[0] == "api":
            continue  # a daemon: parsing is what can be checked
        out = subprocess.run([*AMR, *argv], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
        assert out.returncode == 0, (hint, out.stderr[-2000:])
        if argv[:2] == ["bill", "show"] and "--json" in argv:
            bill = json.loads(out.stdout)
            assert bill["latest"]["lines"] and bill["versions"]
        elif argv[:2] == ["bill", "show"]:
            assert "total" in out.stdout and "versions:" in out.stdout
