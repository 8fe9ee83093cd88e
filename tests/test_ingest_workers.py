"""collector.ingest_workers: the share codec, the worker pool against the real database, a worker
killed mid-stream, and LocalIngest and IngestPool storing the same rows for the same input.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from adapters import quality
from adapters.reading import Reading, Rejected
from collector.ingest_workers import (
    IngestPool,
    LocalIngest,
    Outcome,
    decode_share,
    encode_share,
    route,
)
from collector.inventory import parse_inventory, upsert_inventory
from collector.settings import Settings
from tests.conftest import _with_db

BASE = (datetime.now(UTC) - timedelta(days=40)).replace(minute=0, second=0, microsecond=0)
STEP = timedelta(minutes=30)
RESULT_TIMEOUT = 30  # never hang the suite on a lost share


# --- 1. encode_share / decode_share ---

_offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
                         max_value=timedelta(hours=23, minutes=59, seconds=59, microseconds=999999))
_aware = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2200, 12, 31, 23, 59, 59, 999999),
    timezones=st.one_of(st.just(UTC), st.builds(timezone, _offsets)),
)
_decimals = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.builds(lambda sign, digits, exp: Decimal((sign, tuple(digits), exp)),
              st.integers(0, 1), st.lists(st.integers(0, 9), min_size=1, max_size=30), st.integers(-30, 30)),
    st.sampled_from([Decimal("1.10"), Decimal("0"), Decimal("0.000"), Decimal("-0"), Decimal("1E+3"),
                     Decimal("12345678901234567890.123456789"), Decimal("NaN"), Decimal("Infinity")]),
)
_text = st.text(max_size=12)
_readings = st.builds(
    Reading, meter_id=_text, register=st.sampled_from(["1.8.0", "2.8.0", "1.8.1", ""]) | _text, ts=_aware,
    value=_decimals, quality=st.frozensets(st.sampled_from(sorted(quality.ALL))), source=_text,
)
_rejects = st.builds(
    Rejected, source=_text, raw=st.binary(max_size=20), reason=_text, code=_text,
    meter_id=st.none() | _text, register=st.none() | _text, ts=st.none() | _aware,
)
_groups = st.lists(st.lists(st.one_of(_readings, _rejects), max_size=8), max_size=6).flatmap(
    lambda groups: st.lists(st.integers(0, 10_000), min_size=len(groups), max_size=len(groups), unique=True)
    .map(lambda idx: list(zip(idx, groups, strict=True))))


def _key(it: Reading | Rejected) -> tuple:
    """What must survive the pipe: Decimal by str (keeps the scale, and NaN is equal to itself)."""
    if type(it) is Reading:
        return ("R", it.meter_id, it.register, it.ts.astimezone(UTC), it.ts.astimezone(UTC).utcoffset(),
                str(it.value), it.quality, it.source)
    return ("X", it)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_groups)
def test_share_round_trip(groups: list[tuple[int, list[Reading | Rejected]]]) -> None:
    share = pickle.loads(pickle.dumps(encode_share(groups), protocol=pickle.HIGHEST_PROTOCOL))  # as on the pipe
    back = decode_share(share)
    kept = [(g, items) for g, items in groups if items]
    assert [g for g, _ in back] == [g for g, _ in kept]  # the groups in order; an empty one is left out
    for (g, items), (_, got) in zip(kept, back, strict=True):
        readings = [it for it in items if type(it) is Reading]
        rejects = [it for it in items if type(it) is not Reading]
        # a group comes back as its readings, in order, then its rejects, in order
        assert [_key(it) for it in got] == [_key(it) for it in readings + rejects], g
        assert Counter(_key(it) for it in got) == Counter(_key(it) for it in items)
        for orig, r in zip(readings, got, strict=False):
            assert type(r) is Reading
            assert r.ts == orig.ts and r.ts.tzinfo is UTC  # the same instant, to the microsecond, in UTC
            assert type(r.value) is Decimal and str(r.value) == str(orig.value)
            assert type(r.quality) is frozenset and r.quality == orig.quality
        for orig, x in zip(rejects, got[len(readings):], strict=True):
            assert x == orig


def test_share_round_trip_examples() -> None:
    t = datetime(2200, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    groups = [
        (3, [Rejected("s", b"\x00raw", "bad", "code", "m", "1.8.0", t),
             Reading("m", "1.8.0", t, Decimal("1.10"), frozenset({quality.LATE, quality.RETRIED}), "src"),
             Reading("m", "1.8.0", datetime(1990, 1, 1, 0, 0, 0, 1, tzinfo=UTC), Decimal("0.000"))]),
        (0, []),
        (7, [Reading("n", "2.8.0", t - timedelta(microseconds=1), Decimal("1E+3"), frozenset(), "")]),
    ]
    back = decode_share(encode_share(groups))
    assert [g for g, _ in back] == [3, 7]  # the empty group is left out
    (_, first), (_, last) = back
    assert [type(x) for x in first] == [Reading, Reading, Rejected]  # readings first, then rejects
    assert str(first[0].value) == "1.10" and first[0].ts == t and first[0].ts.tzinfo is UTC
    assert first[0].ts.microsecond == 999999 and first[0].quality == {quality.LATE, quality.RETRIED}
    assert first[1].ts == datetime(1990, 1, 1, 0, 0, 0, 1, tzinfo=UTC) and str(first[1].value) == "0.000"
    assert first[2] == groups[0][1][0]
    assert last[0].ts == t - timedelta(microseconds=1) and str(last[0].value) == "1E+3"
    assert decode_share(encode_share([])) == []


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_groups, st.integers(2, 4))
def test_route_splits_by_meter_and_group_and_loses_nothing(groups, n: int) -> None:
    shares = route(groups, n)
    assert len(shares) == n
    got: dict[int, list[tuple[int, Reading | Rejected]]] = {}  # group -> (worker, item)
    for w, share in enumerate(shares):
        if share is None:
            continue
        back = decode_share(pickle.loads(pickle.dumps(share)))
        assert back and all(items for _, items in back)  # no empty groups on the pipe
        order = [g for g, _ in groups]
        assert len({g for g, _ in back}) == len(back)  # each group once a share
        assert [g for g, _ in back] == [g for g in order if g in {g2 for g2, _ in back}]  # batch order
        for g, items in back:
            for it in items:
                if type(it) is Reading:
                    assert hash(it.meter_id) % n == w  # a meter always goes to the same worker
                else:
                    assert g % n == w
                got.setdefault(g, []).append((w, it))
    for g, items in groups:
        mine = got.pop(g, [])
        assert Counter(_key(it) for _, it in mine) == Counter(_key(it) for it in items)
        for w in range(n):  # each worker's part of the group keeps its readings' order
            assert [_key(it) for v, it in mine if v == w and type(it) is Reading] == \
                [_key(it) for it in items if type(it) is Reading and hash(it.meter_id) % n == w]
    assert not got
    assert all(s is None for s in route([(g, []) for g, _ in groups], n))


# --- helpers for the database tests ---


def _meters(tag: str, per_worker: int = 4, workers: int = 2) -> list[str]:
    """Meter ids of which `per_worker` hash to each worker (the pool routes by hash(meter_id) % workers)."""
    by_worker: dict[int, list[str]] = {w: [] for w in range(workers)}
    i = 0
    while any(len(v) < per_worker for v in by_worker.values()):
        m = f"iw-{tag}-{i}"
        w = hash(m) % workers
        if len(by_worker[w]) < per_worker:
            by_worker[w].append(m)
        i += 1
    return sorted(m for v in by_worker.values() for m in v)


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
    pool = IngestPool(db_url, Settings(database_url=db_url, metrics_port=0), 2, stop)
    pool.start(timeout=30)
    assert all(w.ready for w in pool._workers), "the workers did not start"
    return pool


# --- 2. IngestPool with 2 workers ---


def test_pool_stores_every_reading_once_and_both_workers_work(db_url: str) -> None:
    meters = _meters(uuid.uuid4().hex[:6])
    assert {hash(m) % 2 for m in meters} == {0, 1}
    _add_meters(db_url, meters)
    batches = _batches(meters, 50, 10)  # 5 batches of 80 readings, 4 messages each
    total = 8 * 50
    stop = threading.Event()
    pool = _pool(db_url, stop)
    try:
        tickets = []
        for b in batches:
            t = pool.submit(b)
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
        again = pool.result(pool.submit(batches[2]), timeout=RESULT_TIMEOUT)
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
        tickets = [pool.submit(b) for b in batches[:6]]
        outcomes = [pool.result(tickets[0], timeout=RESULT_TIMEOUT)]  # working by now
        assert pool._workers[0].unconfirmed, "nothing outstanding at the kill"
        killed = [_kill(pool, 0)]
        tickets += [pool.submit(b) for b in batches[6:10]]  # keep submitting to the dead worker
        outcomes.append(pool.result(tickets[1], timeout=RESULT_TIMEOUT))  # needs worker 0: restarted by now
        assert pool.restarts == 1
        # the other one too, mid-stream, while the first catches up
        tickets += [pool.submit(b) for b in batches[10:15]]
        assert pool._workers[1].unconfirmed, "nothing outstanding at the second kill"
        killed.append(_kill(pool, 1))
        tickets += [pool.submit(b) for b in batches[15:]]
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
        again = pool.result(pool.submit(batches[0]), timeout=RESULT_TIMEOUT)
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
        tickets = [pool.submit(b) for b in batches[:5]]
        _kill(pool, 1)
        tickets += [pool.submit(b) for b in batches[5:]]
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
    name = f"amr_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        for attempt in range(20):
            try:
                admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.05 * (attempt + 1))
    yield _with_db(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


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

    local = LocalIngest(db_url, Settings(database_url=db_url, metrics_port=0), stop)
    local.start()
    try:
        local_outcomes = [local.result(local.submit(b)) for b in batches]
    finally:
        local.close()

    pool = _pool(second_db_url, stop)
    try:
        pool_outcomes = [pool.result(pool.submit(b), timeout=RESULT_TIMEOUT) for b in batches]
    finally:
        pool.close()

    lt, pt = _totals(local_outcomes), _totals(pool_outcomes)
    assert lt == pt
    accepted, duplicate, conflict, rejected, codes, _ = lt
    assert accepted == len(meters) * 40
    assert (duplicate, conflict, rejected) == (4, 2, 4)
    assert codes == {"bad_json": 1, "unknown_meter": 1, "negative": 1, "missing_field": 1}

    local_rows, pool_rows = _snapshot(db_url), _snapshot(second_db_url)
    for table in local_rows:
        assert local_rows[table] == pool_rows[table], table
    expected = sorted((r.meter_id, r.register, r.ts, r.value) for m in meters for r in _series(m, 40))
    assert [row[:4] for row in pool_rows["reading"]] == expected
    assert sum(1 for row in pool_rows["rejected_reading"] if row[0] == "conflict") == 2
    assert pool_rows["interval_usage"], "nothing derived"
