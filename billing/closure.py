"""Changes to billed months: what they would change, and a person's decision on them.

A billed month is closed (migration 014). Ingestion records every interval of
register 1.8.0 it added, changed or took away in a billed month; the billing run
holds such a month's bill back (`billing.engine._closed_hold`). This module is
the other half: the list a person reads (`amr suspect list`), with the bill each
change would alter and by how much, and the decision (`amr suspect accept` or
`reject --account N --period YYYY-MM`): accepting issues the new bill version at
once, with the reason and the difference; rejecting keeps the billed version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from billing.engine import Bill, Held, RunSummary, bill_period, preview
from collector.inventory import normalize_account


@dataclass
class PeriodChange:
    """The open changes to one account's billed month, with the bill they would change."""

    account: str
    period: date
    version: int
    billed_total: Decimal
    new_total: Decimal | None  # None: the new data cannot be priced (the reason is in `held`)
    held: str | None
    intervals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def delta(self) -> Decimal | None:
        return None if self.new_total is None else self.new_total - self.billed_total

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "billed_period", "account": self.account, "period": self.period.strftime("%Y-%m"),
                "reason": f"changes billed period {self.period:%Y-%m}", "version": self.version,
                "billed_total": str(self.billed_total),
                "new_total": None if self.new_total is None else str(self.new_total),
                "delta": None if self.delta is None else str(self.delta), "held": self.held,
                "intervals": [{k: (v.isoformat() if isinstance(v, datetime) else
                                   str(v) if isinstance(v, Decimal) else v) for k, v in i.items()}
                              for i in self.intervals]}


def open_changes(conn: Any, account: str | None = None, tz: str = "Europe/Moscow") -> list[PeriodChange]:
    """Every billed month with changes awaiting a decision, oldest first, priced as it would be now."""
    account = normalize_account(account) if account else None
    rows = conn.execute(
        "SELECT m.account, c.period, c.meter_id, c.register, c.start_ts, c.end_ts, c.kwh, c.noticed_at"
        " FROM billed_change c JOIN meter m ON m.id = c.meter_id"
        " WHERE c.decision IS NULL AND (%(a)s::text IS NULL OR m.account = %(a)s)"
        " ORDER BY m.account, c.period, c.start_ts, c.end_ts", {"a": account}).fetchall()
    out: list[PeriodChange] = []
    for acc, period, meter, register, start, end, kwh, noticed in rows:
        if not out or (out[-1].account, out[-1].period) != (acc, period):
            latest = conn.execute(
                "SELECT version, total FROM bill WHERE account = %s AND period = %s"
                " ORDER BY version DESC LIMIT 1", (acc, period)).fetchone()
            now = preview(conn, acc, period, tz=tz)
            out.append(PeriodChange(
                acc, period, latest[0], latest[1],
                now.total if isinstance(now, Bill) else None,
                now.reason if isinstance(now, Held) else None))
        out[-1].intervals.append({"meter_id": meter, "register": register, "start": start, "end": end,
                                  "kwh": kwh, "noticed_at": noticed})
    return out


def decide_period(conn: Any, account: str, period: date, decision: str, by: str,
                  note: str | None = None, *, tz: str = "Europe/Moscow") -> tuple[int, RunSummary | None]:
    """Accept or reject the open changes to one account's billed month; returns (changes, run).

    Accepting bills the month again for this account at once: the new version
    carries who accepted and the difference. Rejecting keeps the billed version
    (the readings stay stored; the month's bill no longer follows them).
    """
    if decision not in ("accepted", "rejected"):
        raise ValueError(f"decision must be 'accepted' or 'rejected', got {decision!r}")
    account = normalize_account(account)
    period = period.replace(day=1)
    with conn.transaction():
        n = conn.execute(
            "UPDATE billed_change c SET decision = %s, decided_by = %s, decided_at = now(), note = %s"
            " FROM meter m WHERE m.id = c.meter_id AND m.account = %s AND c.period = %s"
            " AND c.decision IS NULL", (decision, by, note, account, period)).rowcount
    if not n or decision == "rejected":
        return n, None
    run = bill_period(conn, period, [account], tz=tz,
                      reason=f"changes to the billed period accepted by {by}" + (f" ({note})" if note else ""))
    return n, run
