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
from collector.ingest import Ingestor
from tests.helpers import T0, add_meters

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
