"""One bad timestamp never takes other readings with it, and never runs the store out of partitions.

Field cases: a Tasmota plug without NTP sends 1969; a register dump dated year 0001; a
"2000-01-01" default; a meter whose first stored reading is from 1999 (stored by a version
without the plausibility window). Through the ingestion entry point every path uses, and
through the real MQTT collector.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
from prometheus_client import REGISTRY

from adapters.reading import REJECT_CODES, Reading, Rejected
from amr.settings import Settings
from amr.storage.timeseries import Partitions
from collector.ingest.ingestor import Ingestor
from tests.conftest import ROOT
from tests.helpers import add_meters
from tests.test_mqtt_collector import Collector, Publisher, _setup_meters

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
MSK = timezone(timedelta(hours=3))
BAD = [
    datetime(1969, 12, 31, 23, 59, 50, tzinfo=UTC),  # a device clock never set
    datetime(1999, 6, 1, tzinfo=UTC),  # before the zone calendar
    datetime(2000, 1, 1, tzinfo=MSK),  # a default date, absurdly far from now
    datetime(1, 1, 1, 1, tzinfo=MSK),  # year 0001 east of UTC: no UTC instant in Python
]


def _good(meters: list[str], n: int) -> list[Reading]:
    return [Reading(m, "1.8.0", NOW + timedelta(minutes=30 * k), Decimal(100 + k), source="t")
            for m in meters for k in range(n)]


def _partitions(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_inherits JOIN pg_class c ON c.oid = inhrelid WHERE c.relkind = 'r'").fetchall()}


def test_bad_timestamps_are_refused_alone_in_a_batch_of_good_ones(conn) -> None:
    meters = [f"pt-{i}" for i in range(10)]
    add_meters(conn, *meters)
    before = _partitions(conn)
    batch: list[Reading | Rejected] = _good(meters, 10)
    batch[37:37] = [Reading("pt-3", "1.8.0", ts, Decimal(5), frozenset({"meter_clock"}), "t") for ts in BAD]
    result = Ingestor(conn, Settings()).ingest(batch)
    assert (result.accepted, result.rejected) == (100, len(BAD))
    assert result.rejects_by_code == {"implausible_ts": len(BAD)}
    assert conn.execute("SELECT count(*) FROM reading").fetchone()[0] == 100
    reasons = [r for (r,) in conn.execute("SELECT reason FROM rejected_reading ORDER BY id").fetchall()]
    assert all("earliest plausible" in r and "pt-3" in r for r in reasons), reasons
    # no partition was made for any refused month, and no daily rows far back
    made = _partitions(conn) - before
    assert all(re.search(r"_p20\d\d\d\d$", p) and int(p[-6:-2]) >= datetime.now(UTC).year - 1 for p in made), made
    assert conn.execute("SELECT min(day) FROM daily_zone_usage").fetchone()[0] >= (NOW - timedelta(days=1)).date()


def test_a_stored_reading_from_1999_does_not_poison_later_ones(conn) -> None:
    add_meters(conn, "pt-old")
    with conn.transaction():
        Partitions().ensure(conn, datetime(1999, 6, 1, tzinfo=UTC), datetime(1999, 6, 1, tzinfo=UTC))
        conn.execute("INSERT INTO reading (meter_id, register, ts, value) VALUES ('pt-old', '1.8.0', %s, 1)",
                     (datetime(1999, 6, 1, tzinfo=UTC),))
    conn.commit()
    ing = Ingestor(conn, Settings())
    for k in range(30):  # one message after another, as a live stream sends them
        result = ing.ingest(_good(["pt-old"], 30)[k:k + 1])
        assert result.accepted == 1, (k, result)
    rows = conn.execute("SELECT ts, start_ts, kwh FROM reading WHERE meter_id = 'pt-old' AND ts > '2000-01-01'"
                        " ORDER BY ts").fetchall()
    assert len(rows) == 30
    assert rows[0][1] is None  # the 1999 reading is no neighbour: no 27-year interval
    assert [r[2] for r in rows[1:]] == [Decimal(1)] * 29
    assert conn.execute("SELECT count(*) FROM interval_segment").fetchone()[0] == 0


def test_a_batch_spanning_years_makes_partitions_only_for_its_months(conn) -> None:
    add_meters(conn, "pt-span")
    before = _partitions(conn)
    old = datetime(2013, 5, 10, tzinfo=UTC)
    result = Ingestor(conn, Settings()).ingest([
        Reading("pt-span", "1.8.0", old, Decimal(1)), Reading("pt-span", "1.8.0", NOW, Decimal(2))])
    assert result.accepted == 2
    made = _partitions(conn) - before
    assert {p for p in made if "2013" in p} == {"reading_data_p201305", "interval_segment_p201305"}
    assert not [p for p in made if re.search(r"_p201[4-9]|_p202[0-3]", p)], made


def test_bad_timestamps_inside_messages_do_not_stall_the_collector(db_url, tmp_path, broker) -> None:
    meters = [f"pm-{i}" for i in range(10)]
    inv = _setup_meters(db_url, tmp_path, [{"id": m, "adapter": "mqtt"} for m in meters])
    c = Collector(db_url, "127.0.0.1", broker.port, "g", "c-pt", inv, batch=10)
    pub = Publisher("127.0.0.1", broker.port)
    try:
        for k in range(3):
            rows = [{"meter": m, "register": "1.8.0", "ts": (NOW + timedelta(minutes=30 * (10 * k + j))).isoformat(),
                     "value": str(100 + 10 * k + j)} for m in meters for j in range(10)]
            rows.insert(50, {"meter": "pm-1", "register": "1.8.0", "ts": "1969-12-31T23:59:59Z", "value": "7",
                             "quality": ["meter_clock"]})
            rows.insert(20, {"meter": "pm-2", "register": "1.8.0", "ts": "0001-01-01T01:00:00+03:00", "value": "7"})
            pub.publish("amr/v1/pt/readings", json.dumps({"v": 1, "readings": rows}).encode())
        pub.confirm()
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while datetime.now(UTC) < deadline:
            with psycopg.connect(db_url) as q:
                stored = q.execute("SELECT count(*) FROM reading").fetchone()[0]
                refused = q.execute("SELECT code, sum(times) FROM rejected_reading GROUP BY 1").fetchall()
            if stored >= 300 and refused:
                break
    finally:
        c.stop()
        pub.close()
    assert stored == 300
    assert dict(refused).keys() <= {"implausible_ts", "ts"}, refused
    assert sum(n for _, n in refused) == 6, refused


def test_metric_labels_come_from_the_fixed_set(conn) -> None:
    """Forwarded reject codes of any text never become label values (5,000 would be 5,000 series)."""
    def series() -> int:
        return sum(len(m.samples) for m in REGISTRY.collect() if m.name == "amr_rejects")

    ing = Ingestor(conn, Settings())
    ing.ingest([Rejected("gw", b"x", "forwarded", "code_0")])
    start = series()
    ing.ingest([Rejected("gw", f"x{i}".encode(), "forwarded", f"code_{i}") for i in range(1, 500)])
    assert series() == start
    assert conn.execute("SELECT count(DISTINCT code) FROM rejected_reading").fetchone()[0] == 500


def test_every_reject_code_in_the_source_is_in_the_documented_set() -> None:
    """A new code written anywhere must join REJECT_CODES, or it would count as "other"."""
    pattern = re.compile(r"""(?:reject\(\s*|code\s*=\s*|Refusal\(\s*)"([a-z][a-z_]+)"\s*[,)]""")
    found: dict[str, Path] = {}
    for folder in ("adapters", "collector", "billing"):
        for path in (ROOT / folder).rglob("*.py"):
            for code in pattern.findall(path.read_text(encoding="utf-8")):
                found.setdefault(code, path)
    missing = {c: str(p.relative_to(ROOT)) for c, p in found.items() if c not in REJECT_CODES}
    assert not missing, f"codes not in adapters.reading.REJECT_CODES: {missing}"
    assert len(found) >= 20  # the pattern still finds the codes it is meant to
