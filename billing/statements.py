"""One account's bill for a month as staff read it: every version, its lines, reason and difference.

`amr bill show` prints it; its JSON has the shape of the customer API's
GET /accounts/{n}/bills/{period} (account, period, latest, versions), so an
operator and the customer portal see the same bill, line for line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from billing.engine import Line, bills_of


@dataclass(frozen=True)
class Version:
    """One stored version of a bill; `diff` is the difference from the version before (None for the first)."""

    version: int
    total: Decimal
    kwh: Decimal
    estimated_kwh: Decimal
    plan: str
    method: str
    reason: str
    diff: dict[str, Any] | None
    created_at: datetime
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Statement:
    account: str
    period: date
    versions: tuple[Version, ...]  # oldest first; never empty

    @property
    def latest(self) -> Version:
        return self.versions[-1]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, keyed as the API's BillDetail (decimals as strings, as the API writes them)."""
        versions = [_version_dict(v) for v in self.versions]
        return {"account": self.account, "period": f"{self.period:%Y-%m}", "latest": versions[-1],
                "versions": versions}


def _line_dict(ln: Line) -> dict[str, Any]:
    return {"zone": ln.zone, "band": ln.band, "date_from": ln.date_from.isoformat(),
            "date_to": ln.date_to.isoformat(), "days": line_days(ln), "kwh": str(ln.kwh),
            "estimated_kwh": str(ln.estimated_kwh), "rate": str(ln.rate), "amount": str(ln.amount)}


def _version_dict(v: Version) -> dict[str, Any]:
    return {"version": v.version, "total": str(v.total), "kwh": str(v.kwh),
            "estimated_kwh": str(v.estimated_kwh), "plan": v.plan, "method": v.method,
            "reason": v.reason, "diff": v.diff, "created_at": v.created_at.isoformat(),
            "lines": [_line_dict(ln) for ln in v.lines]}


def line_days(ln: Line) -> int:
    """Days a line covers, both ends included (a rate change inside the month splits lines by day)."""
    return (ln.date_to - ln.date_from).days + 1


def statement(conn: Any, account: str, period: date) -> Statement | None:
    """Every version of ACCOUNT's bill for PERIOD's month, or None when the month was never billed."""
    rows = bills_of(conn, account, period.replace(day=1))
    if not rows:
        return None
    return Statement(
        account=rows[0]["account"], period=period.replace(day=1),
        versions=tuple(Version(
            version=r["version"], total=r["total"], kwh=r["kwh"], estimated_kwh=r["estimated_kwh"],
            plan=r["plan"], method=r["method"], reason=r["reason"], diff=r["diff"],
            created_at=r["created_at"], lines=tuple(r["lines"])) for r in rows))


def is_subscriber(conn: Any, account: str) -> bool:
    """Whether ACCOUNT is known at all: a missing bill and a mistyped account need different advice."""
    return conn.execute("SELECT 1 FROM subscriber WHERE account = %s", (account,)).fetchone() is not None
