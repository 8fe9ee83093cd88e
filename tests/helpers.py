"""Small builders shared by the core tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from collector.inventory import parse_inventory, upsert_inventory

T0 = datetime(2026, 10, 1, tzinfo=UTC)


def add_meters(conn, *meter_ids: str, account: str = "1001", plan: str = "three_zone", **meter_keys) -> None:
    """Upsert one subscriber and the given meters through the inventory path."""
    upsert_inventory(
        conn,
        parse_inventory(
            {
                "subscriber": [{"account": account, "plan": plan}],
                "meter": [{"id": m, "account": account, **meter_keys} for m in meter_ids],
            }
        ),
    )
    conn.commit()


def interval_total(conn, meter_id: str, register: str = "1.8.0") -> Decimal:
    row = conn.execute(
        "SELECT coalesce(sum(kwh), 0) FROM interval_usage WHERE meter_id = %s AND register = %s",
        (meter_id, register),
    ).fetchone()
    return row[0]


def daily(conn, meter_id: str) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    rows = conn.execute(
        "SELECT day::text, zone, kwh, estimated_kwh FROM daily_zone_usage WHERE meter_id = %s",
        (meter_id,),
    ).fetchall()
    return {(d, z): (k, e) for d, z, k, e in rows}


def derived(conn, meter_id: str) -> tuple[list, list, list]:
    """Everything ingestion stores and derives for a meter (readings, interval parts, daily
    totals), without the meter's id: two meters fed the same series compare equal."""
    readings = conn.execute(
        "SELECT ts, value, quality, start_ts, kwh, kind, status, estimated, day, zone"
        " FROM reading WHERE meter_id = %s ORDER BY ts", (meter_id,)).fetchall()
    parts = conn.execute(
        "SELECT start_ts, end_ts, seg_start, day, zone, kwh, status FROM interval_usage"
        " WHERE meter_id = %s ORDER BY seg_start", (meter_id,)).fetchall()
    totals = conn.execute(
        "SELECT day, zone, kwh, estimated_kwh, suspect_kwh FROM daily_zone_usage"
        " WHERE meter_id = %s AND (kwh <> 0 OR suspect_kwh <> 0) ORDER BY 1, 2", (meter_id,)).fetchall()
    return readings, parts, totals
