"""Fleet queries: which meters went quiet and since when, what came in, what was refused.

Used by `amr status`, by the demo, and by the daemons' /metrics refresher
(amr_meters_stale), so the rule for "stale" has one home.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from amr import metrics

STALE_AFTER_INTERVALS = 2
DAY = timedelta(days=1)


@dataclass(frozen=True)
class StaleMeter:
    meter_id: str
    account: str
    adapter: str
    bus: str
    interval_s: int
    last_reading: datetime | None  # None: never read
    silent_since: datetime  # the last reading, or installation / registration when never read

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("last_reading", "silent_since"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


def _bus_of(adapter: str, config: dict[str, Any]) -> str:
    if config.get("bus"):
        return str(config["bus"])
    if adapter == "modbus_tcp":
        return f"{config.get('host')}:{config.get('port') or 502}"
    return str(config.get("port") or config.get("device") or adapter)


def stale_meters(conn: Any, now: datetime | None = None) -> list[StaleMeter]:
    """Meters read automatically with no reading for more than two of their intervals.

    Meters of manual-metering subscribers and removed meters are not
    expected to report, so they are never stale. A meter installed in the
    future is not stale either.
    """
    now = now or datetime.now(UTC)
    rows = conn.execute(
        """
        SELECT m.id, m.account, m.adapter, m.interval_s, m.config, last.ts,
               coalesce(m.installed, m.created_at)
        FROM meter m
        JOIN subscriber s ON s.account = m.account
        LEFT JOIN LATERAL (
            SELECT max(r.ts) AS ts FROM reading r WHERE r.meter_id = m.id AND r.ts <= %(now)s
        ) last ON true
        WHERE s.metering = 'amr' AND m.adapter <> 'manual'
          AND (m.removed IS NULL OR m.removed > %(now)s)
          AND coalesce(last.ts, m.installed, m.created_at)
              < %(now)s - make_interval(secs => %(k)s * m.interval_s)
        ORDER BY coalesce(last.ts, m.installed, m.created_at), m.id
        """,
        {"now": now, "k": STALE_AFTER_INTERVALS},
    ).fetchall()
    return [
        StaleMeter(mid, account, adapter, _bus_of(adapter, config or {}), interval_s, last, last or since)
        for mid, account, adapter, interval_s, config, last, since in rows
    ]


def reading_counts(conn: Any, now: datetime) -> dict[str, int]:
    """Readings stored in all, in the day before `now`, and meters that sent any that day."""
    total, day, meters = conn.execute(
        """SELECT count(*), count(*) FILTER (WHERE ts > %(since)s AND ts <= %(now)s),
                  count(DISTINCT meter_id) FILTER (WHERE ts > %(since)s AND ts <= %(now)s)
           FROM reading""",
        {"since": now - DAY, "now": now},
    ).fetchone()
    n_meters = conn.execute("SELECT count(*) FROM meter WHERE removed IS NULL OR removed > %s", (now,)).fetchone()[0]
    return {"meters": n_meters, "readings_total": total, "readings_last_day": day, "meters_reporting_last_day": meters}


def rejects_last_day(conn: Any, now: datetime) -> list[tuple[str, str, int]]:
    """(kind, code, count) of refused inputs received in the last day (wall-clock receipt time)."""
    wall_now = datetime.now(UTC)
    return [
        tuple(r)
        for r in conn.execute(
            """SELECT kind, code, count(*) FROM rejected_reading WHERE received_at > %s
               GROUP BY kind, code ORDER BY count(*) DESC, kind, code""",
            (wall_now - DAY,),
        ).fetchall()
    ]


def collect_status(conn: Any, now: datetime | None = None) -> dict[str, Any]:
    """Everything `amr status` prints, as plain data (the demo uses it too)."""
    now = now or datetime.now(UTC)
    stale = stale_meters(conn, now)
    metrics.METERS_STALE.set(len(stale))
    return {
        "at": now,
        "counts": reading_counts(conn, now),
        "stale": stale,
        "rejects": rejects_last_day(conn, now),
    }
