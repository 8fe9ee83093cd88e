"""The tail: an owner keeps each series' newest readings in memory (migration 026).

An append then needs no window probe; the properties of ingestion must hold
as they did without it. Every other writer of an owned series (another
process, the `reading` view, retention) makes the owner read the database
again, so two processes writing one meter never corrupt it.
"""

from __future__ import annotations

import itertools
import multiprocessing
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.reading import Reading
from amr.storage import retention
from collector.ingest.ingestor import Ingestor
from tests.helpers import T0, add_meters, derived

_ids = itertools.count()
NOW = datetime(2027, 1, 1, tzinfo=UTC)


def _clock() -> datetime:
    return NOW


def values_of(steps: list[int], faults: list[int]) -> list[int]:
    """Counter values in 0.01 kWh with spikes (1), dips (2) and counter resets (3)."""
    out, v = [], 5000
    for step, fault in zip(steps, faults, strict=True):
        v = step if fault == 3 else v + step
        out.append(v + 90_000 if fault == 1 else max(v - 4_000, 0) if fault == 2 else v)
    return out


def readings_of(meter: str, values: list[int]) -> list[Reading]:
    return [Reading(meter, "1.8.0", T0 + timedelta(minutes=30 * i), Decimal(x) / 100)
            for i, x in enumerate(values)]


def connect(url: str) -> psycopg.Connection:
    c = psycopg.connect(url, autocommit=True)
    c.execute("SET TIME ZONE 'UTC'")
    return c


def test_appends_take_the_tail_and_store_what_the_database_path_stores(db_url: str) -> None:
    with connect(db_url) as conn:
        add_meters(conn, "t1", "r1", max_power_kw=1000)
        conn.commit()
        values = values_of(list(range(40, 440, 10)), [0, 0, 1, 0, 0, 2, 0, 3, 0, 0] * 4)
        tail = Ingestor(conn, clock=_clock)
        plain = Ingestor(conn, clock=_clock, tail=False)
        for r in readings_of("t1", values):
            tail.ingest([r])
        for r in readings_of("r1", values):
            plain.ingest([r])
        assert tail.tail_hits == len(values) - 1  # every call after the first took no probe
        assert plain.tail_hits == 0
        assert derived(conn, "t1") == derived(conn, "r1")
        owner = conn.execute("SELECT owner FROM reading_series WHERE meter_id = 't1'").fetchone()[0]
        assert owner == tail._token


noisy = st.integers(min_value=3, max_value=30).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(min_value=0, max_value=400), min_size=n, max_size=n),
        st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3]), min_size=n, max_size=n),
        # mostly in order (a live stream) with some late readings
        st.lists(st.integers(min_value=-3, max_value=0), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),  # which process sends each batch
        st.integers(min_value=1, max_value=3),  # batch size
        st.lists(st.integers(min_value=0, max_value=n - 1), max_size=4),  # repeats
    )
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=noisy)
def test_two_processes_writing_one_meter_never_corrupt_it(db_url: str, data) -> None:
    """Two ingesting sessions, each with its tail, take turns on the same meter; the result
    equals ingesting the series in order at once without a tail."""
    steps, faults, shifts, who, batch, repeats = data
    n = len(steps)
    base = next(_ids)
    ref, meter = f"w{base}r", f"w{base}s"
    with connect(db_url) as a_conn, connect(db_url) as b_conn:
        add_meters(a_conn, ref, meter, max_power_kw=1000)
        a_conn.commit()
        values = values_of(steps, faults)
        Ingestor(a_conn, clock=_clock, tail=False).ingest(readings_of(ref, values))
        series = readings_of(meter, values)
        # arrival order: each reading moved back by up to three places
        order = sorted(range(n), key=lambda i: i + shifts[i] - 0.5 * (shifts[i] != 0))
        arrival = [series[i] for i in order] + [series[i] for i in repeats]
        a, b = Ingestor(a_conn, clock=_clock), Ingestor(b_conn, clock=_clock)
        turns = [a if who[k % n] else b for k in range(0, (len(arrival) + batch - 1) // batch)]
        for k, ing in enumerate(turns):
            ing.ingest(arrival[k * batch:(k + 1) * batch])
        assert derived(a_conn, meter) == derived(a_conn, ref)
        # the first to write owns the meter; when the other wrote and the owner came back
        # after it, the owner forgot its tail and read the database
        owner = turns[0]
        other = next((k for k, ing in enumerate(turns) if ing is not owner), None)
        assert owner._owned and not (b if owner is a else a)._owned
        if other is not None and owner in turns[other:]:
            assert owner.tail_drops >= 1


def _hammer(url: str, meter: str, values: list[int], offset: int, rounds: int) -> None:
    """A process of its own ingesting every other reading of the meter, one per call, twice over."""
    with connect(url) as conn:
        ing = Ingestor(conn, clock=_clock)
        series = readings_of(meter, values)
        for _ in range(rounds):
            for r in series[offset::2]:
                ing.ingest([r])


def test_two_real_processes_at_once_leave_the_meter_as_one_would(db_url: str) -> None:
    values = values_of([17 * (i % 9) + 3 for i in range(120)], [0] * 50 + [1] + [0] * 30 + [3] + [0] * 38)
    with connect(db_url) as conn:
        add_meters(conn, "p1", "p1ref", max_power_kw=1000)
        conn.commit()
        Ingestor(conn, clock=_clock, tail=False).ingest(readings_of("p1ref", values))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(db_url, "p1", values, off, 2)) for off in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with connect(db_url) as conn:
        assert derived(conn, "p1") == derived(conn, "p1ref")


def test_an_edit_through_the_view_makes_the_owner_read_the_database(db_url: str) -> None:
    with connect(db_url) as conn, connect(db_url) as other:
        add_meters(conn, "v1", "v1ref", max_power_kw=1000)
        conn.commit()
        values = [1000 + 10 * i for i in range(12)]
        ing = Ingestor(conn, clock=_clock)
        for r in readings_of("v1", values[:8]):
            ing.ingest([r])
        # a person removes the newest reading through the view, in another session
        last = T0 + timedelta(minutes=30 * 7)
        other.execute("DELETE FROM reading WHERE meter_id = 'v1' AND ts = %s", (last,))
        drops = ing.tail_drops
        for r in readings_of("v1", values)[8:]:
            ing.ingest([r])
        assert ing.tail_drops == drops + 1
        ref = readings_of("v1ref", values)
        Ingestor(conn, clock=_clock, tail=False).ingest(ref[:7] + ref[8:])
        # readings and intervals (a raw delete through the view leaves the daily totals as they were)
        assert derived(conn, "v1")[:2] == derived(conn, "v1ref")[:2]


def test_another_ingestor_without_a_tail_tells_the_owner(db_url: str) -> None:
    with connect(db_url) as conn, connect(db_url) as other:
        add_meters(conn, "n1", "n1ref", max_power_kw=1000)
        conn.commit()
        series = readings_of("n1", [2000 + 7 * i for i in range(10)])
        owner = Ingestor(conn, clock=_clock)
        for r in series[:5]:
            owner.ingest([r])
        gen = conn.execute("SELECT gen FROM tail_owner WHERE token = %s", (owner._token,)).fetchone()[0]
        Ingestor(other, clock=_clock, tail=False).ingest(series[5:7])  # e.g. `amr ingest` of a file
        assert conn.execute("SELECT gen FROM tail_owner WHERE token = %s",
                            (owner._token,)).fetchone()[0] == gen + 1
        for r in series[7:]:
            owner.ingest([r])
        Ingestor(conn, clock=_clock, tail=False).ingest(readings_of("n1ref", [2000 + 7 * i for i in range(10)]))
        assert derived(conn, "n1") == derived(conn, "n1ref")


def test_an_owner_that_ended_leaves_its_series_to_the_next(db_url: str) -> None:
    with connect(db_url) as conn:
        add_meters(conn, "d1", max_power_kw=1000)
        conn.commit()
    series = readings_of("d1", [3000 + 5 * i for i in range(6)])
    with connect(db_url) as first_conn:
        first = Ingestor(first_conn, clock=_clock)
        first.ingest(series[:3])
        token = first._token
    with connect(db_url) as conn:  # the first process is gone: its lock with it
        second = Ingestor(conn, clock=_clock)
        second.ingest(series[3:4])
        assert second._token != token
        assert conn.execute("SELECT owner FROM reading_series WHERE meter_id = 'd1'").fetchone()[0] == second._token
        assert conn.execute("SELECT count(*) FROM tail_owner WHERE token = %s", (token,)).fetchone()[0] == 0
        second.ingest(series[4:])
        assert second.tail_hits == 1


def test_retention_tells_every_owner(db_url: str) -> None:
    with connect(db_url) as conn:
        add_meters(conn, "m1", max_power_kw=1000)
        conn.commit()
        ing = Ingestor(conn, clock=_clock)
        # readings of a month long past: retention drops its partition
        old = [Reading("m1", "1.8.0", datetime(2021, 3, 1, tzinfo=UTC) + timedelta(minutes=30 * i),
                       Decimal(100 + i)) for i in range(3)]
        ing.ingest(old)
        gen = conn.execute("SELECT gen FROM tail_owner WHERE token = %s", (ing._token,)).fetchone()[0]
        report = retention.apply(conn, months=36, now=NOW)
        assert report.dropped
        assert conn.execute("SELECT gen FROM tail_owner WHERE token = %s",
                            (ing._token,)).fetchone()[0] == gen + 1


def test_beyond_its_size_the_tail_keeps_the_series_it_has_and_reads_the_rest(db_url: str, monkeypatch) -> None:
    from collector.ingest import ingestor

    monkeypatch.setattr(ingestor, "TAIL_SERIES", 2)
    meters = ["c1", "c2", "c3"]
    with connect(db_url) as conn:
        add_meters(conn, *meters, *(m + "ref" for m in meters), max_power_kw=1000)
        conn.commit()
        ing = Ingestor(conn, clock=_clock)
        values = [4000 + 9 * i for i in range(8)]
        series = {m: readings_of(m, values) for m in meters}
        for i in range(len(values)):  # round after round, in the same order
            ing.ingest([series[m][i] for m in meters])
        assert len(ing._tails) == 2
        assert ing.tail_hits == 2 * (len(values) - 1)  # the two kept hit every round, the third never
        plain = Ingestor(conn, clock=_clock, tail=False)
        for m in meters:
            plain.ingest(readings_of(m + "ref", values))
            assert derived(conn, m) == derived(conn, m + "ref")


def test_ingestors_made_one_after_another_on_a_connection_share_its_one_token(db_url: str) -> None:
    """As a pooled connection sees them: no session lock piles up, and an earlier ingestor
    still in use goes on without its tail, telling the token's new holder of its writes."""
    with connect(db_url) as conn:
        add_meters(conn, "s1", "s1ref", max_power_kw=1000)
        conn.commit()
        values = [6000 + 11 * i for i in range(12)]
        series = readings_of("s1", values)
        first = Ingestor(conn, clock=_clock)
        for r in series[:4]:
            first.ingest([r])
        locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        assert conn.execute(locks).fetchone()[0] == 1
        for _ in range(5):
            later = Ingestor(conn, clock=_clock)
            later.ingest(series[4:5])  # new the first time, then repeats; each takes the token over
        assert later._token == first._token
        assert conn.execute(locks).fetchone()[0] == 1
        for r in series[5:8]:
            later.ingest([r])
        first.ingest(series[8:9])  # the earlier one, without its tail now
        for r in series[9:]:
            later.ingest([r])
        assert later.tail_drops >= 1
        Ingestor(conn, clock=_clock, tail=False).ingest(readings_of("s1ref", values))
        assert derived(conn, "s1") == derived(conn, "s1ref")

