"""Property: stored interval energy is exact whatever the arrival order.

For any sequence of cumulative readings of a register (with rollovers), fed in
any order, in any batches, with repeats, the stored interval energy sums
exactly to last minus first plus the rollovers, no interval is negative and
the zone parts of each interval sum to the interval.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.reading import Reading
from collector.ingest.ingestor import Ingestor
from tests.helpers import T0, add_meters, derived

_ids = itertools.count()

series = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        st.integers(min_value=0, max_value=99_999),  # start, in 0.01 kWh
        st.lists(st.integers(min_value=0, max_value=9_999), min_size=n - 1, max_size=n - 1),  # steps < R/10
        st.lists(st.integers(min_value=1, max_value=4), min_size=n, max_size=n),  # minutes x 15 apart
        st.permutations(list(range(n))),  # arrival order
        st.lists(st.integers(min_value=0, max_value=n - 1), max_size=5),  # repeats
        st.integers(min_value=1, max_value=7),  # batch size
    )
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=series)
def test_interval_energy_is_exact_in_any_arrival_order(conn, data) -> None:
    start, steps, gaps, order, repeats, batch = data
    rollover = Decimal(1000)
    meter = f"p{next(_ids)}"
    add_meters(conn, meter, rollover=int(rollover), max_power_kw=1000)
    cum = [start]
    for s in steps:
        cum.append(cum[-1] + s)
    ts = [T0]
    for g in gaps[1:]:
        ts.append(ts[-1] + timedelta(minutes=15 * g))
    readings = [
        Reading(meter, "1.8.0", t, (Decimal(c) / 100) % rollover) for t, c in zip(ts, cum, strict=True)
    ]
    arrival = [readings[i] for i in order] + [readings[i] for i in repeats]
    ing = Ingestor(conn, clock=lambda: datetime(2027, 1, 1, tzinfo=UTC))
    for k in range(0, len(arrival), batch):
        ing.ingest(arrival[k : k + batch])

    rows = conn.execute(
        "SELECT start_ts, end_ts, sum(kwh), min(kwh) FROM interval_usage WHERE meter_id = %s"
        " GROUP BY 1, 2 ORDER BY 1",
        (meter,),
    ).fetchall()
    expected = Decimal(cum[-1] - cum[0]) / 100
    assert sum(r[2] for r in rows) == expected
    assert all(r[3] >= 0 for r in rows)
    # intervals tile the time line between the first and last reading
    assert [r[0] for r in rows] == ts[:-1] and [r[1] for r in rows] == ts[1:]
    # each interval's zone parts sum to the interval's energy
    for (s, e, kwh, _), (a, b) in zip(rows, itertools.pairwise(cum), strict=True):
        assert kwh == Decimal(b - a) / 100, (s, e)
    daily = conn.execute(
        "SELECT coalesce(sum(kwh + suspect_kwh), 0) FROM daily_zone_usage WHERE meter_id = %s", (meter,)
    ).fetchone()[0]
    assert daily == expected


noisy = st.integers(min_value=3, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(min_value=0, max_value=400), min_size=n, max_size=n),  # steps, 0.01 kWh
        # 0: in line; 1: a spike; 2: a dip; 3: a counter reset before this reading
        st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3]), min_size=n, max_size=n),
        st.permutations(list(range(n))),
        st.integers(min_value=1, max_value=7),
    )
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=noisy)
def test_glitches_and_resets_derive_the_same_in_any_arrival_order(conn, data) -> None:
    """Late readings re-derive only a window; with runs of spikes, dips and resets
    beside them, the result must still equal ingesting the series in order at once."""
    steps, faults, order, batch = data
    base = next(_ids)
    ref, meter = f"q{base}r", f"q{base}s"
    add_meters(conn, ref, meter, max_power_kw=1000)
    values, v = [], 5000
    for step, fault in zip(steps, faults, strict=True):
        v = step if fault == 3 else v + step
        values.append(v + 90_000 if fault == 1 else max(v - 4_000, 0) if fault == 2 else v)
    ts = [T0 + timedelta(minutes=30 * i) for i in range(len(values))]

    def series(m: str) -> list[Reading]:
        return [Reading(m, "1.8.0", t, Decimal(x) / 100) for t, x in zip(ts, values, strict=True)]

    ing = Ingestor(conn, clock=lambda: datetime(2027, 1, 1, tzinfo=UTC))
    ing.ingest(series(ref))
    shuffled = [series(meter)[i] for i in order]
    for k in range(0, len(shuffled), batch):
        ing.ingest(shuffled[k : k + batch])

    assert derived(conn, meter) == derived(conn, ref)
