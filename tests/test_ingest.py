"""The ingestion entry point against a real PostgreSQL: validation, idempotency, derivation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from adapters.reading import Reading, Rejected
from collector.ingest.ingestor import Ingestor, decide_interval
from tests.helpers import T0, add_meters, daily, interval_total

H = timedelta(minutes=30)


def r(meter: str, k: int, value: str | Decimal, register: str = "1.8.0") -> Reading:
    return Reading(meter, register, T0 + k * H, Decimal(value))


@pytest.fixture
def ing(conn):
    add_meters(conn, "m1", "m2", installed="2026-01-01T00:00:00+03:00")
    return Ingestor(conn, clock=lambda: datetime(2026, 11, 15, tzinfo=UTC))


def rejects(conn) -> list[tuple[str, str, str]]:
    return conn.execute("SELECT kind, code, reason FROM rejected_reading ORDER BY id").fetchall()


def test_bad_readings_are_rejected_with_reasons_and_the_rest_stored(ing, conn) -> None:
    batch = [
        r("m1", 0, "100"),
        Reading("m1", "1.8.0", T0 + H, Decimal("NaN")),
        Reading("m1", "1.8.0", T0 + 2 * H, Decimal("Infinity")),
        Reading("m1", "1.8.0", T0 + 3 * H, Decimal("-1")),
        Reading("nope", "1.8.0", T0 + 4 * H, Decimal("1")),
        Reading("m1", "1.8.0", datetime(2026, 10, 1, 5, 0), Decimal("101")),  # naive
        Reading("m1", "1.8.0", datetime(2027, 1, 1, tzinfo=UTC), Decimal("200")),  # future
        Reading("m1", "1.8.0", datetime(2025, 12, 31, tzinfo=UTC), Decimal("50")),  # before installation
        Reading("m1", "1.8.0", T0 + 6 * H, "12,5"),  # type: ignore[arg-type]  # not numeric
        Rejected("test", b"\xff\xfe", "line 3: not UTF-8 text", code="encoding"),
        r("m1", 8, "102"),
    ]
    res = ing.ingest(batch)
    assert (res.accepted, res.rejected, res.duplicate, res.conflict) == (2, 9, 0, 0)
    got = rejects(conn)
    codes = [c for _, c, _ in got]
    assert codes == [
        "not_finite", "not_finite", "negative", "unknown_meter", "naive_ts", "future_ts",
        "before_installation", "not_numeric", "encoding",
    ]
    reasons = " | ".join(reason for _, _, reason in got)
    assert "value NaN is not a finite number" in reasons
    assert "meter_id 'nope'" in reasons
    assert "has no UTC offset" in reasons
    assert "before the meter was installed" in reasons
    raw = conn.execute("SELECT raw FROM rejected_reading WHERE code = 'negative'").fetchone()[0]
    assert bytes(raw).endswith(b",-1")
    assert interval_total(conn, "m1") == Decimal(2)


def test_same_reading_twice_is_a_noop_and_other_value_a_conflict(ing, conn) -> None:
    ing.ingest([r("m1", 0, "100"), r("m1", 1, "101")])
    before = conn.execute("SELECT count(*) FROM interval_usage").fetchone()[0]
    res = ing.ingest([r("m1", 0, "100.000"), r("m1", 1, "101"), r("m1", 1, "999")])
    assert (res.accepted, res.duplicate, res.conflict, res.rejected) == (0, 2, 1, 0)
    assert conn.execute("SELECT value FROM reading WHERE ts = %s", (T0 + H,)).fetchone()[0] == 101
    (kind, _code, reason), = rejects(conn)
    assert kind == "conflict" and "already stored" in reason and "999" in reason
    assert conn.execute("SELECT count(*) FROM interval_usage").fetchone()[0] == before
    # a conflict inside one batch too
    res = ing.ingest([r("m2", 0, "5"), r("m2", 0, "6")])
    assert (res.accepted, res.conflict) == (1, 1)


def test_out_of_order_reading_rederives_only_its_neighbours(ing, conn) -> None:
    ing.ingest([r("m1", k, str(100 + k)) for k in (0, 1, 2, 4, 5, 6)])
    assert interval_total(conn, "m1") == Decimal(6)
    gap = conn.execute(
        "SELECT kind, estimated FROM interval_usage WHERE start_ts = %s", (T0 + 2 * H,)
    ).fetchone()
    assert gap == ("gap", True)
    ing.ingest([r("m1", 3, "103")])
    rows = conn.execute(
        "SELECT start_ts, end_ts, kwh, kind FROM interval_usage WHERE meter_id = 'm1' ORDER BY start_ts"
    ).fetchall()
    assert [(s, e - s, k, kind) for s, e, k, kind in rows] == [
        (T0 + k * H, H, Decimal(1), "normal") for k in range(6)
    ]


def test_rollover_counts_the_wrap_and_reset_never_goes_negative(ing, conn) -> None:
    add_meters(conn, "roll", rollover=1000, installed="2026-01-01T00:00:00+03:00")
    ing.ingest([r("roll", 0, "998.5"), r("roll", 1, "999.5"), r("roll", 2, "0.5"), r("roll", 3, "1.5")])
    assert interval_total(conn, "roll") == Decimal(3)
    assert conn.execute(
        "SELECT kind FROM interval_usage WHERE meter_id='roll' AND start_ts=%s", (T0 + H,)
    ).fetchone()[0] == "rollover"
    flags = conn.execute("SELECT quality FROM reading WHERE meter_id='roll' AND ts=%s", (T0 + 2 * H,)).fetchone()[0]
    assert "rollover" in flags
    # a reset to zero of a mid-range counter: counted from zero, flagged, never negative
    ing.ingest([r("m2", 0, "5000"), r("m2", 1, "5001"), r("m2", 2, "0.4"), r("m2", 3, "1.4")])
    rows = conn.execute(
        "SELECT kwh, kind, estimated FROM interval_usage WHERE meter_id='m2' ORDER BY start_ts"
    ).fetchall()
    assert rows == [(Decimal(1), "normal", False), (Decimal("0.4"), "reset", True), (Decimal(1), "normal", False)]


def test_glitch_is_ignored_without_rebasing(ing, conn) -> None:
    ing.ingest([r("m1", 0, "100"), r("m1", 1, "101"), r("m1", 2, "9999"), r("m1", 3, "102"), r("m1", 4, "103")])
    assert interval_total(conn, "m1") == Decimal(3)
    assert "glitch" in conn.execute("SELECT quality FROM reading WHERE ts=%s", (T0 + 2 * H,)).fetchone()[0]
    # a dip, and the glitch arriving after its right neighbour is already stored
    ing.ingest([r("m2", 0, "100"), r("m2", 1, "101"), r("m2", 3, "103")])
    ing.ingest([r("m2", 2, "3")])
    assert interval_total(conn, "m2") == Decimal(3)
    assert conn.execute("SELECT min(kwh) FROM interval_usage WHERE meter_id='m2'").fetchone()[0] >= 0


def test_multiplier_and_daily_zone_totals(ing, conn) -> None:
    add_meters(conn, "ct", multiplier=40, installed="2026-01-01T00:00:00+03:00")
    # 2026-10-01 00:00 UTC is 03:00 MSK: 4 hours of night then peak from 04:00 UTC
    ing.ingest([r("ct", k, str(Decimal("10") + Decimal(k) / 10)) for k in range(11)])
    d = daily(conn, "ct")
    assert d[("2026-10-01", "night")] == (Decimal("32.0"), Decimal(0))  # 8 intervals x 0.1 x 40
    assert d[("2026-10-01", "peak")] == (Decimal("8.0"), Decimal(0))


def test_suspect_energy_is_held_until_accepted(ing, conn) -> None:
    add_meters(conn, "small", max_power_kw=2, installed="2026-01-01T00:00:00+03:00")
    ing.ingest([r("small", 0, "10"), r("small", 1, "11"), r("small", 2, "30")])  # 19 kWh in 30 min
    row = conn.execute(
        "SELECT sum(kwh), sum(suspect_kwh) FROM daily_zone_usage WHERE meter_id='small'"
    ).fetchone()
    assert row == (Decimal(1), Decimal(19))
    n = decide_interval(conn, "small", "1.8.0", T0 + H, T0 + 2 * H, "accepted", by="tester", note="checked on site")
    assert n == 1
    row = conn.execute(
        "SELECT sum(kwh), sum(suspect_kwh) FROM daily_zone_usage WHERE meter_id='small'"
    ).fetchone()
    assert row == (Decimal(20), Decimal(0))
    # a later re-derivation of the same interval keeps the decision
    ing.ingest([r("small", 3, "30.5")])
    assert conn.execute(
        "SELECT status FROM interval_usage WHERE meter_id='small' AND start_ts=%s", (T0 + H,)
    ).fetchone()[0] == "accepted"


def test_daily_equals_sum_of_segments_after_edits(ing, conn) -> None:
    ing.ingest([r("m1", k, str(100 + k * 2)) for k in range(0, 60, 3)])
    ing.ingest([r("m1", k, str(100 + k * 2)) for k in range(1, 60, 3)])
    ing.ingest([r("m1", k, str(100 + k * 2)) for k in range(2, 60, 3)])
    seg = conn.execute(
        "SELECT day, zone, sum(kwh) FROM interval_usage WHERE meter_id='m1' GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    day = conn.execute(
        "SELECT day, zone, kwh FROM daily_zone_usage WHERE meter_id='m1' AND kwh <> 0 ORDER BY 1, 2"
    ).fetchall()
    assert seg == day
    assert sum(k for _, _, k in day) == Decimal(118)
    assert conn.execute("SELECT sum(estimated_kwh) FROM daily_zone_usage WHERE meter_id='m1'").fetchone()[0] == 0


def test_offsets_postgresql_cannot_store_are_converted_to_utc(ing, conn) -> None:
    from datetime import timezone

    far = timezone(timedelta(hours=16))
    res = ing.ingest([
        Reading("m1", "1.8.0", (T0 + H).astimezone(far), Decimal("101")),
        Reading("m1", "1.8.0", (T0 + 2 * H).astimezone(far), Decimal("-5")),  # rejected, same offset
        r("m1", 0, "100"),
    ])
    assert (res.accepted, res.rejected) == (2, 1)
    assert conn.execute("SELECT ts FROM rejected_reading").fetchone()[0] == T0 + 2 * H
    assert interval_total(conn, "m1") == Decimal(1)


def test_nul_bytes_and_odd_ids_are_rejected_not_fatal(ing, conn) -> None:
    res = ing.ingest([
        Reading("m\x001", "1.8.0", T0, Decimal("1")),
        Reading("x" * 200, "1.8.0", T0, Decimal("1")),
        Reading("m1", "1.8.0\x00", T0, Decimal("1")),
        Rejected("gw\x00", b"\x00\x01", "line 1: not a reading\x00", code="parse_error"),
        r("m1", 0, "100"),
    ])
    assert (res.accepted, res.rejected) == (1, 4)
    rows = conn.execute("SELECT code, meter_id, source FROM rejected_reading ORDER BY id").fetchall()
    assert [c for c, _, _ in rows] == ["bad_meter_id", "bad_meter_id", "bad_register", "parse_error"]
    assert rows[0][1] == "m\\x001" and rows[3][2] == "gw\\x00"
    assert bytes(conn.execute("SELECT raw FROM rejected_reading WHERE code = 'parse_error'").fetchone()[0]) \
        == b"\x00\x01"
