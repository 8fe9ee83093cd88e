"""collector.mqtt.workers: routing by topic, the worker pool against the real database, a worker
killed mid-stream, and LocalIngest and IngestPool storing the same rows for the same input.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from adapters import quality
from adapters.reading import Reading, Rejected
from adapters.wire import amr_v1_payload
from amr.settings import Settings
from collector.inventory import parse_inventory, upsert_inventory
from collector.mqtt.decoding import Message, MessageDecoder
from collector.mqtt.workers import Batch, IngestPool, LocalIngest, Outcome
from tests.conftest import fresh_database

BASE = (datetime.now(UTC) - timedelta(days=40)).replace(minute=0, second=0, microsecond=0)
STEP = timedelta(minutes=30)
RESULT_TIMEOUT = 30  # never hang the suite on a lost share


# --- routing: a topic always goes to the same worker ---


def test_every_message_of_a_topic_goes_to_the_same_worker(db_url: str) -> None:
    stop = threading.Event()
    pool = _pool(db_url, stop)
    try:
        topics = [f"amr/v1/gw-{i}/readings" for i in range(20)]
        batch = [(g, Message(topics[g % 20], b"not json", datetime.now(UTC))) for g in range(200)]
        ticket = pool.submit(batch)
        owner: dict[str, set[int]] = {}
        for w in pool._workers:
            for _g, m in w.unconfirmed[ticket][2]:
                owner.setdefault(m.topic, set()).add(w.index)
        assert all(len(ws) == 1 for ws in owner.values()) and set(owner) == set(topics)
        # every new topic to the worker with the fewest: an even split, whatever the hashes
        assert Counter(next(iter(ws)) for ws in owner.values()) == {0: 10, 1: 10}
        out = pool.result(ticket, timeout=RESULT_TIMEOUT)
        assert out is not None and out.rejected == 200 and set(out.labels) == set(range(200))
    finally:
        pool.close()


# --- helpers for the database tests ---


def _meters(tag: str, per_worker: int = 4, workers: int = 2) -> list[str]:
    """Meter ids, each publishing on its own topic (the pool hands every new topic to the worker
    with the fewest, so any set of them is spread evenly); kept balanced by hash as well."""
    by_worker: dict[int, list[str]] = {w: [] for w in range(workers)}
    i = 0
    while any(len(v) < per_worker for v in by_worker.values()):
        m = f"iw-{tag}-{i}"
        w = hash(_topic(m)) % workers
        if len(by_worker[w]) < per_worker:
            by_worker[w].append(m)
        i += 1
    return sorted(m for v in by_worker.values() for m in v)


def _topic(meter: str) -> str:
    return f"amr/v1/{meter}/readings"


def _msgs(batch: list) -> Batch:
    """A batch of item groups as amr/v1 messages, one per meter of each group, on the meter's topic."""
    out: Batch = []
    for _, items in batch:
        by_meter: dict[str, list] = {}
        for it in items:
            by_meter.setdefault(it.meter_id or "none", []).append(it)
        for m, its in by_meter.items():
            out.append((len(out), Message(_topic(m), amr_v1_payload(its, m), datetime.now(UTC))))
    return out


def _add_meters(db_url: str, meters: list[str]) -> None:
    inv = {"subscriber": [{"account": "1"}], "meter": [{"account": "1", "id": m, "adapter": "mqtt"} for m in meters]}
    with psycopg.connect(db_url) as c:
        upsert_inventory(c, parse_inventory(inv))


def _series(meter: str, n: int, k0: int = 0) -> list[Reading]:
    """Cumulative, increasing, in the past; about 1 kW."""
    salt = sum(map(ord, meter)) % 7
    return [Reading(meter, "1.8.0", BASE + (k0 + k) * STEP, Decimal(f"{1000 + salt}.000") + Decimal("0.5") * (k0 + k),
                    frozenset(), "mqtt")
            for k in range(n)]


def _batches(meters: list[str], readings: int, per_batch: int, msgs_per_batch: int = 4) -> list[list]:
    """Split each meter's series into batches of `per_batch` readings a meter, several messages a batch."""
    series = {m: _series(m, readings) for m in meters}
    batches = []
    for start in range(0, readings, per_batch):
        items = [r for m in meters for r in series[m][start:start + per_batch]]
        size = -(-len(items) // msgs_per_batch)
        batches.append([(g, items[g * size:(g + 1) * size]) for g in range(msgs_per_batch) if items[g * size:]])
    return batches


def _stored(db_url: str) -> list[tuple]:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT meter_id, register, ts, value FROM reading ORDER BY 1, 2, 3").fetchall()


def _expected(batches: list[list]) -> list[tuple]:
    return sorted({(r.meter_id, r.register, r.ts, r.value) for b in batches for _, items in b for r in items
                   if type(r) is Reading})


def _conflicts(db_url: str) -> int:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT count(*) FROM rejected_reading WHERE kind = 'conflict'").fetchone()[0]


def _pool(db_url: str, stop: threading.Event) -> IngestPool:
    pool = IngestPool(db_url, Settings(database_url=db_url, metrics_port=0), 2, stop, MessageDecoder())
    pool.start(timeout=30)
    assert all(w.ready for w in pool._workers), "the workers did not start"
    return pool


# --- 2. IngestPool with 2 workers ---


def test_pool_stores_every_reading_once_and_both_workers_work(db_url: str) -> None:
    meters = _meters(uuid.uuid4().hex[:6])
    _add_meters(db_url, meters)
    batches = _batches(meters, 50, 10)  # 5 batches of 80 readings, 4 messages each
    total = 8 * 50
    stop = threading.Event()
    pool = _pool(db_url, stop)
    try:
        tickets = []
        for b in batches:
            t = pool.submit(_msgs(b))
            # nothing is collected between submit and here: each worker still holds its share
            assert all(t in w.unconfirmed for w in pool._workers), "a batch did not reach both workers"
            tickets.append(t)
        outcomes = [pool.result(t, timeout=RESULT_TIMEOUT) for t in tickets]
        assert all(o is not None for o in outcomes)
        assert all(not o.failed for o in outcomes)
        assert [o.items for o in outcomes] == [sum(len(i) for _, i in b) for b in batches]
        assert sum(o.accepted for o in outcomes) == total
        assert sum(o.duplicate + o.conflict + o.rejected for o in outcomes) == 0
        assert all(not w.unconfirmed for w in pool._workers)
        assert _stored(db_url) == _expected(batches) and len(_stored(db_url)) == total

        # the same batch again: counted duplicates, no new rows
        again = pool.result(pool.submit(_msgs(batches[2])), timeout=RESULT_TIMEOUT)
        assert again is not None and not again.failed
        assert (again.accepted, again.duplicate, again.conflict, again.rejected) == (0, 80, 0, 0)
        assert len(_stored(db_url)) == total
        assert _conflicts(db_url) == 0
        assert pool.restarts == 0
    finally:
        pool.close()


# --- 3. a worker killed mid-stream ---


def _kill(pool: IngestPool, i: int) -> int:
    proc = pool._workers[i].process
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return proc.pid


def test_worker_killed_mid_stream_loses_and_doubles_nothing(db_url: str) -> None:
    meters = _meters(uuid.uuid4().hex[:6])
    _add_meters(db_url, meters)
    readings = 240
    batches = _batches(meters, readings, 12)  # 20 batches of 96 readings
    total = len(meters) * readings
    stop = threading.Event()
    pool = _pool(db_url, stop)
    try:
        tickets = [pool.submit(_msgs(b)) for b in batches[:6]]
        outcomes = [pool.result(tickets[0], timeout=RESULT_TIMEOUT)]  # working by now
        assert pool._workers[0].unconfirmed, "nothing outstanding at the kill"
        killed = [_kill(pool, 0)]
        tickets += [pool.submit(_msgs(b)) for b in batches[6:10]]  # keep submitting to the dead worker
        outcomes.append(pool.result(tickets[1], timeout=RESULT_TIMEOUT))  # needs worker 0: restarted by now
        assert pool.restarts == 1
        # the other one too, mid-stream, while the first catches up
        tickets += [pool.submit(_msgs(b)) for b in batches[10:15]]
        assert pool._workers[1].unconfirmed, "nothing outstanding at the second kill"
        killed.append(_kill(pool, 1))
        tickets += [pool.submit(_msgs(b)) for b in batches[15:]]
        outcomes += [pool.result(t, timeout=RESULT_TIMEOUT) for t in tickets[2:]]
        assert all(o is not None for o in outcomes), "a result did not come back"
        assert all(not o.failed for o in outcomes), [o.failed for o in outcomes]
        assert pool.restarts >= 2
        assert pool._workers[0].process.pid != killed[0] and pool._workers[1].process.pid != killed[1]
        assert all(not w.unconfirmed for w in pool._workers)
        # what a killed worker had committed but not confirmed comes back as duplicates
        assert sum(o.items for o in outcomes) == total
        assert all(o.accepted + o.duplicate == o.items for o in outcomes)
        assert _stored(db_url) == _expected(batches) and len(_stored(db_url)) == total
        assert _conflicts(db_url) == 0
        with psycopg.connect(db_url) as c:
            assert c.execute("SELECT count(*) FROM rejected_reading").fetchone()[0] == 0

        # the restarted workers keep working
        again = pool.result(pool.submit(_msgs(batches[0])), timeout=RESULT_TIMEOUT)
        assert again is not None and (again.accepted, again.duplicate, again.conflict) == (0, 96, 0)
    finally:
        pool.close()


def test_outcomes_account_for_every_item_after_a_kill(db_url: str) -> None:
    """accepted + duplicate per batch is its readings: a resent share's stored part counts as duplicate."""
    meters = _meters(uuid.uuid4().hex[:6])
    _add_meters(db_url, meters)
    batches = _batches(meters, 120, 12)
    stop = threading.Event()
    pool = _pool(db_url, stop)
    try:
        tickets = [pool.submit(_msgs(b)) for b in batches[:5]]
        _kill(pool, 1)
        tickets += [pool.submit(_msgs(b)) for b in batches[5:]]
        outcomes = [pool.result(t, timeout=RESULT_TIMEOUT) for t in tickets]
        assert all(o is not None and not o.failed for o in outcomes)
        for o, b in zip(outcomes, batches, strict=True):
            n = sum(len(i) for _, i in b)
            assert o.items == n
            assert o.accepted + o.duplicate == n and o.conflict == 0 and o.rejected == 0
        assert sum(o.accepted for o in outcomes) <= len(meters) * 120
        assert pool.restarts >= 1
        assert _stored(db_url) == _expected(batches)
    finally:
        pool.close()


# --- 4. LocalIngest and IngestPool store the same rows ---


@pytest.fixture
def second_db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    with fresh_database(pg_admin_url, template_db) as url:
        yield url


def _mixed_batches(meters: list[str]) -> list[list]:
    """In-order and late readings, repeats, a conflict, refusals and upstream rejects, over 4 batches."""
    s = {m: _series(m, 40) for m in meters}
    a, b = meters[0], meters[-1]
    late = {m: [s[m][k] for k in (5, 17, 18)] for m in meters}  # held back, sent in a later batch
    early = {m: [r for k, r in enumerate(s[m]) if k not in (5, 17, 18)] for m in meters}
    reject = Rejected("mqtt", b"\xffnot json", "payload is not JSON", "bad_json")
    b1 = [(g, [r for m in meters[g::3] for r in early[m][:20]]) for g in range(3)]
    b1[0][1].append(reject)
    b2 = [(0, [r for m in meters for r in early[m][20:]]),
          (1, [early[a][3], early[a][4], early[a][4]]),  # repeats of stored ones, one twice in the batch
          (2, [Reading("iw-nosuch", "1.8.0", BASE, Decimal(1), frozenset(), "mqtt"),
               Reading(b, "1.8.0", BASE + 100 * STEP, Decimal("-1"), frozenset(), "mqtt"),
               Rejected("mqtt", b"x", "no meter id", "missing_field"),
               early[b][10]._replace(value=early[b][10].value + 7)])]  # a conflict with a stored reading
    b3 = [(g, late[m]) for g, m in enumerate(meters)]
    b4 = [(0, [s[a][5]._replace(quality=frozenset({quality.LATE}))]),  # again, with a flag: a duplicate
          (1, [late[b][0]._replace(value=late[b][0].value + 1)])]  # a conflict with a late reading
    return [b1, b2, b3, b4]


def _snapshot(db_url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(db_url) as c:
        c.execute("SET TIME ZONE 'UTC'")
        return {
            "reading": c.execute(
                "SELECT meter_id, register, ts, value, quality, source, start_ts, kwh, kind, status, estimated,"
                " day, zone FROM reading ORDER BY 1, 2, 3").fetchall(),
            "interval_usage": c.execute(
                "SELECT meter_id, register, start_ts, end_ts, seg_start, seg_end, day, zone, kwh, estimated, kind,"
                " status FROM interval_usage ORDER BY 1, 2, 5").fetchall(),
            "daily_zone_usage": c.execute(
                "SELECT meter_id, day, zone, kwh, estimated_kwh, suspect_kwh FROM daily_zone_usage"
                " ORDER BY 1, 2, 3").fetchall(),
            "rejected_reading": sorted(c.execute(
                "SELECT kind, source, meter_id, register, ts, value, code, reason, raw FROM rejected_reading"
            ).fetchall(), key=repr),
        }


def _totals(outcomes: list[Outcome | None]) -> tuple:
    assert all(o is not None and not o.failed for o in outcomes)
    codes: Counter[str] = Counter()
    for o in outcomes:
        codes.update(o.rejects_by_code)
    return (sum(o.accepted for o in outcomes), sum(o.duplicate for o in outcomes),
            sum(o.conflict for o in outcomes), sum(o.rejected for o in outcomes), dict(codes),
            [o.items for o in outcomes])


def test_local_and_pool_store_the_same_rows(db_url: str, second_db_url: str) -> None:
    meters = _meters(uuid.uuid4().hex[:6], per_worker=3)
    batches = _mixed_batches(meters)
    stop = threading.Event()
    for url in (db_url, second_db_url):
        _add_meters(url, meters)

    local = LocalIngest(db_url, Settings(database_url=db_url, metrics_port=0), stop, MessageDecoder())
    local.start()
    try:
        local_outcomes = [local.result(local.submit(_msgs(b))) for b in batches]
    finally:
        local.close()

    pool = _pool(second_db_url, stop)
    try:
        pool_outcomes = [pool.result(pool.submit(_msgs(b)), timeout=RESULT_TIMEOUT) for b in batches]
    finally:
        pool.close()

    lt, pt = _totals(local_outcomes), _totals(pool_outcomes)
    assert lt == pt
    accepted, duplicate, conflict, rejected, codes, _ = lt
    assert accepted == len(meters) * 40
    assert (duplicate, conflict, rejected) == (4, 2, 4)
    # the negative value travels as the string "-5", which the amr/v1 schema refuses as a type
    assert codes == {"bad_json": 1, "unknown_meter": 1, "type": 1, "missing_field": 1}

    local_rows, pool_rows = _snapshot(db_url), _snapshot(second_db_url)
    for table in local_rows:
        assert local_rows[table] == pool_rows[table], table
    expected = sorted((r.meter_id, r.register, r.ts, r.value) for m in meters for r in _series(m, 40))
    assert [row[:4] for row in pool_rows["reading"]] == expected
    assert sum(1 for row in pool_rows["rejected_reading"] if row[0] == "conflict") == 2
    assert pool_rows["interval_usage"], "nothing derived"


# --- 5. what is an outage and what is a refusal of the data: real errors from a real server ---


def _error(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # the error is what the test looks at
        return exc
    raise AssertionError("expected an error")


def test_is_outage_tells_the_database_state_from_the_data(db_url: str, pg_admin_url: str) -> None:
    from amr.storage import db
    from collector.mqtt.workers import is_outage
    from tests.conftest import free_port

    def write(url: str, sql: str, *, setup: str | None = None) -> None:
        with psycopg.connect(url) as c:
            if setup:
                c.execute(setup)
            c.execute(sql)

    insert = "INSERT INTO meter (id, account) VALUES ('x', 'x')"
    role = f"amr_ro_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        role_url = psycopg.conninfo.make_conninfo(db_url, user=role)
        outages = {
            "unreachable": _error(lambda: psycopg.connect(f"postgresql://u:pw@127.0.0.1:{free_port()}/amr")),
            "malformed URL": _error(lambda: psycopg.connect("postgresql://u:pw@127.0.0.1:5432/amr?foo=bar")),
            "unparseable conninfo": _error(lambda: psycopg.connect("host=h password=pw dbname")),
            "read-only (a standby)": _error(lambda: write(db_url, insert, setup="SET TRANSACTION READ ONLY")),
            "no privilege": _error(lambda: write(role_url, "INSERT INTO reading (meter_id) VALUES ('x')")),
            "not migrated": _error(lambda: write(db_url, "SELECT * FROM no_such_table")),
            "no database configured": _error(lambda: db.connect("")),
        }
        refusals = {
            "bad text for a number": _error(lambda: write(db_url, "SELECT 'x'::int")),
            "a NUL byte in text": _error(lambda: psycopg.connect(db_url).execute("SELECT %s::text", ("a\x00b",))),
            "out of range": _error(lambda: write(db_url, "SELECT 1e400::float8")),
            "a duplicate key": _error(lambda: write(db_url, "INSERT INTO t VALUES (1), (1)",
                                                    setup="CREATE TEMP TABLE t (k int PRIMARY KEY)")),
            "decoding": _error(lambda: Decimal("1,5")),
            "validating": ValueError("year 1 is before the zone calendar"),
        }
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {role}")
    assert isinstance(outages["read-only (a standby)"], psycopg.errors.ReadOnlySqlTransaction)
    assert isinstance(outages["no privilege"], psycopg.errors.InsufficientPrivilege)
    assert isinstance(outages["malformed URL"], psycopg.ProgrammingError)
    assert {k: is_outage(e) for k, e in outages.items()} == dict.fromkeys(outages, True)
    assert {k: is_outage(e) for k, e in refusals.items()} == dict.fromkeys(refusals, False)


def test_database_descriptions_never_carry_the_password() -> None:
    from collector.mqtt.workers import describe_database, safe_reason

    urls = {
        "postgresql://amr:hunter2@db1:5433/amr": "amr@db1:5433/amr",
        "host=db1 port=5433 dbname=amr user=col password=hunter2": "col@db1:5433/amr",
        "postgresql://amr:hunter2@127.0.0.1:5432/amr?foo=bar": "amr@127.0.0.1:5432/amr (a malformed URL)",
        "postgresql://amr:hun@ter2@127.0.0.1:5432/amr": "amr@127.0.0.1:5432/amr (a malformed URL: encode @ in the password as %40)",
        "postgres//amr:hunter2@db1/amr": "(an AMR_DATABASE_URL that does not parse)",
    }
    for url, described in urls.items():
        assert describe_database(url) == described
        exc = _error(lambda url=url: psycopg.connect(url, connect_timeout=2))
        assert "hunter2" not in safe_reason(exc, url) and "ter2" not in safe_reason(exc, url), safe_reason(exc, url)


def test_pool_waits_out_a_read_only_database_and_then_stores_everything(db_url: str, pg_admin_url: str) -> None:
    """A standby after failover: nothing refused, nothing dead-lettered; stored once it takes writes."""
    from prometheus_client import REGISTRY

    meters = _meters(uuid.uuid4().hex[:6], per_worker=2)
    _add_meters(db_url, meters)
    name = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    batches = _batches(meters, 20, 10)
    errors = REGISTRY.get_sample_value("amr_db_errors_total") or 0
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    stop = threading.Event()
    pool = _pool(db_url, stop)
    try:
        tickets = [pool.submit(_msgs(b)) for b in batches]
        deadline = time.monotonic() + 20
        while (REGISTRY.get_sample_value("amr_db_errors_total") or 0) < errors + 2:
            assert time.monotonic() < deadline, "the workers never tried the database"
            assert not any(pool.ready(t) for t in tickets), "a batch was finished with the database read-only"
        assert REGISTRY.get_sample_value("amr_db_up") == 0
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = off")
        outcomes = [pool.result(t, timeout=60) for t in tickets]
    finally:
        pool.close()
    assert all(o is not None and not o.failed for o in outcomes)
    assert _stored(db_url) == _expected(batches)
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM rejected_reading").fetchone()[0] == 0
    assert REGISTRY.get_sample_value("amr_db_up") == 1
