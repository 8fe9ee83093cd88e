"""`amr status`: stale meters and since when, counts, rejects of the last day, the gauge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from amr.storage.timeseries import Partitions
from collector.fleet import collect_status, stale_meters
from collector.inventory import parse_inventory, upsert_inventory

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)

INVENTORY = {
    "subscriber": [
        {"account": "1001", "metering": "amr", "plan": "three_zone"},
        {"account": "1002", "metering": "manual", "plan": "single"},
    ],
    "meter": [
        # fresh: read 20 minutes ago, interval 30 min
        {"id": "fresh", "account": "1001", "adapter": "modbus_tcp", "host": "10.0.0.5", "port": 502,
         "preset": "eastron_sdm630", "installed": "2026-01-01T00:00:00+03:00"},
        # late but not stale: 50 min ago < 2 x 30 min
        {"id": "late", "account": "1001", "adapter": "iec62056", "port": "/dev/ttyUSB0",
         "installed": "2026-01-01T00:00:00+03:00"},
        # stale: last reading 3 hours ago
        {"id": "quiet", "account": "1001", "adapter": "modbus_rtu", "port": "/dev/ttyS0", "bus": "rs485-1",
         "preset": "eastron_sdm120", "installed": "2026-01-01T00:00:00+03:00"},
        # never read since installation a day ago
        {"id": "never", "account": "1001", "adapter": "mqtt", "device": "dev-9",
         "installed": "2026-03-09T12:00:00+00:00"},
        # hourly meter read 90 min ago: not stale (2 x 60 min)
        {"id": "hourly", "account": "1001", "adapter": "modbus_tcp", "host": "10.0.0.6", "interval": "1h",
         "preset": "eastron_sdm630", "installed": "2026-01-01T00:00:00+03:00"},
        # manual metering never counts as stale
        {"id": "by-hand", "account": "1002", "adapter": "manual", "installed": "2026-01-01T00:00:00+03:00"},
        # removed meters are not expected to report
        {"id": "gone", "account": "1001", "adapter": "modbus_tcp", "host": "10.0.0.7", "preset": "eastron_sdm630",
         "installed": "2026-01-01T00:00:00+03:00", "removed": "2026-02-01T00:00:00+03:00"},
    ],
}

LAST = {"fresh": 20, "late": 50, "quiet": 180, "hourly": 90, "gone": 60 * 24 * 40}


def seed(conn) -> None:
    upsert_inventory(conn, parse_inventory(INVENTORY))
    Partitions().ensure(conn, NOW - timedelta(days=60), NOW + timedelta(days=1))
    with conn.cursor() as cur:
        for mid, minutes in LAST.items():
            for k in range(3):  # three readings each, the newest `minutes` ago
                ts = NOW - timedelta(minutes=minutes + 30 * k)
                cur.execute(
                    "INSERT INTO reading (meter_id, register, ts, value) VALUES (%s, '1.8.0', %s, %s)",
                    (mid, ts, 100 - k),
                )
        cur.execute(
            "INSERT INTO rejected_reading (source, meter_id, code, reason) VALUES "
            "('t', 'quiet', 'negative', 'value: negative'), ('t', 'quiet', 'negative', 'value: negative'), "
            "('t', 'x', 'unknown_meter', 'meter_id: unknown')"
        )
        cur.execute(
            "INSERT INTO rejected_reading (received_at, source, code, reason) VALUES "
            "(now() - interval '3 days', 't', 'old', 'too old to count')"
        )
    conn.commit()


def test_stale_meters_and_since_when(conn):
    seed(conn)
    stale = {m.meter_id: m for m in stale_meters(conn, NOW)}
    assert set(stale) == {"quiet", "never"}
    assert stale["quiet"].last_reading == NOW - timedelta(minutes=180)
    assert stale["quiet"].silent_since == NOW - timedelta(minutes=180)
    assert stale["quiet"].bus == "rs485-1"
    assert stale["never"].last_reading is None
    assert stale["never"].silent_since == datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
    # an hour later "late" has crossed two intervals too
    assert {m.meter_id for m in stale_meters(conn, NOW + timedelta(hours=1))} >= {"late", "fresh", "quiet"}


def test_status_sets_the_gauge_and_counts(conn):
    seed(conn)
    st = collect_status(conn, NOW)
    assert REGISTRY.get_sample_value("amr_meters_stale") == 2
    assert st["counts"]["meters"] == 6  # "gone" is removed
    assert st["counts"]["readings_total"] == 15
    # within the day before NOW: all readings but those of "gone"
    assert st["counts"]["readings_last_day"] == 12
    assert ("invalid", "negative", 2) in st["rejects"]
    assert all(code != "old" for _, code, _ in st["rejects"])


def test_amr_status_command_json(conn, db_url):
    seed(conn)
    env = {**os.environ, "AMR_DATABASE_URL": db_url}
    out = subprocess.run(
        [sys.executable, "-c", "from amr.cli import main; raise SystemExit(main())",
         "status", "--json", "--at", NOW.isoformat()],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    objs = [json.loads(line) for line in out.stdout.splitlines()]
    summary = objs[0]
    assert summary["type"] == "summary" and summary["stale_meters"] == 2
    stale = {o["meter_id"]: o for o in objs if o["type"] == "stale_meter"}
    assert stale["quiet"]["last_reading"] == (NOW - timedelta(hours=3)).isoformat()
    assert stale["never"]["last_reading"] is None
    rejects = {o["code"]: o["count"] for o in objs if o["type"] == "rejects"}
    assert rejects == {"negative": 2, "unknown_meter": 1}
    # the readable form names the meter, its bus and when it went quiet
    text = subprocess.run(
        [sys.executable, "-c", "from amr.cli import main; raise SystemExit(main())",
         "status", "--at", NOW.isoformat()],
        capture_output=True, text=True, env=env, timeout=60,
    ).stdout
    assert "quiet" in text and "rs485-1" in text and "2026-03-10 09:00 UTC" in text
