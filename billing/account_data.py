"""What a customer sees of an account, as data: one home for the queries the JSON API and the web pages share.

Everything reads through the `portal_*` views (migrations 011, 017, 019),
the same ones the read-only role `amr_portal` sees, so the API, the pages and
that role agree. Readings entry (`enter_readings`) is the one write: it checks
manual readings against the last stored ones and hands them to the one
ingestion path (`collector.ingest.ingestor.Ingestor`); a refusal is a
`ReadingRefused` with a code and a reason in Russian, which the API answers as
422 and the pages show beside the form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from amr.settings import Settings
from billing.ledger import COMPONENTS, ZERO
from collector.rules.vee import configured_registers, register_refusal
from collector.rules.vocabulary import STORED_ZONES

# a meter's energy counts for its account only on the local days it was installed there,
# the same rule the bills follow (billing.engine), so the portal and the bill agree
IN_SERVICE = (
    " JOIN portal_meter pm ON pm.meter_id = u.meter_id"
    " AND (pm.installed IS NULL OR u.day >= (pm.installed AT TIME ZONE %s)::date)"
    " AND (pm.removed IS NULL OR u.day <= (pm.removed AT TIME ZONE %s)::date)"
    " WHERE u.account = %s"
)


@dataclass(frozen=True)
class Subscriber:
    account: str
    metering: str  # amr | manual
    plan: str
    category: str
    area: str


def subscriber(conn: Any, acc: str) -> Subscriber | None:
    """The subscriber of a (normalised) account number, or None."""
    row = conn.execute("SELECT account, metering, plan, category, area FROM portal_account WHERE account = %s",
                       (acc,)).fetchone()
    return Subscriber(*row) if row else None


@dataclass(frozen=True)
class RegisterValue:
    register: str
    ts: datetime
    value: Decimal


@dataclass(frozen=True)
class Meter:
    meter_id: str
    installed: datetime | None
    removed: datetime | None
    registers: list[RegisterValue] = field(default_factory=list)


def meters(conn: Any, acc: str) -> list[Meter]:
    """The account's meters (installed first) with the latest value of each register."""
    rows = conn.execute("SELECT meter_id, installed, removed FROM portal_meter"
                        " WHERE account = %s ORDER BY installed NULLS FIRST, meter_id", (acc,)).fetchall()
    values = conn.execute("SELECT meter_id, register, ts, value FROM portal_latest_reading"
                          " WHERE account = %s ORDER BY meter_id, register", (acc,)).fetchall()
    return [Meter(m, i, r, [RegisterValue(v[1], v[2], v[3]) for v in values if v[0] == m]) for m, i, r in rows]


def zone_energy(rows: Sequence[tuple[Any, ...]]) -> dict[Any, dict[str, Decimal]]:
    """Rows of (key, stored zone, kWh, estimated, suspect) summed per key: night, peak, half_peak,
    total, estimated, suspect."""
    out: dict[Any, dict[str, Decimal]] = {}
    for key, zone, kwh, est, sus in rows:
        z = out.setdefault(key, {**dict.fromkeys(STORED_ZONES, Decimal(0)),
                                 "total": Decimal(0), "estimated": Decimal(0), "suspect": Decimal(0)})
        if zone in STORED_ZONES:
            z[zone] += kwh
        z["total"] += kwh
        z["estimated"] += est
        z["suspect"] += sus
    return out


def daily_usage(conn: Any, acc: str, first: date, last: date, tz: str) -> dict[date, dict[str, Decimal]]:
    """Energy per local day (first..last inclusive), per zone, of the meters in service on each day."""
    rows = conn.execute(
        "SELECT day, zone, sum(kwh), sum(estimated_kwh), sum(suspect_kwh)"
        " FROM portal_daily_usage u" + IN_SERVICE + " AND day BETWEEN %s AND %s"
        " GROUP BY 1, 2 ORDER BY 1, 2", (tz, tz, acc, first, last)).fetchall()
    return dict(sorted(zone_energy(rows).items()))


def monthly_usage(conn: Any, acc: str, first: date, end: date, tz: str) -> dict[str, dict[str, Decimal]]:
    """Energy per calendar month ('2026-10') from the month of `first` up to `end` (exclusive), per zone."""
    rows = conn.execute(
        "SELECT to_char(day, 'YYYY-MM'), zone, sum(kwh), sum(estimated_kwh), sum(suspect_kwh)"
        " FROM portal_daily_usage u" + IN_SERVICE + " AND day >= %s AND day < %s"
        " GROUP BY 1, 2 ORDER BY 1, 2", (tz, tz, acc, first, end)).fetchall()
    return dict(sorted(zone_energy(rows).items()))


@dataclass(frozen=True)
class BillSummary:
    period: str  # 2026-10
    version: int
    versions: int
    total: Decimal
    kwh: Decimal
    estimated_kwh: Decimal


def bill_summaries(conn: Any, acc: str) -> list[BillSummary]:
    """The latest version of each month's bill, newest month first, with how many versions it has."""
    rows = conn.execute(
        "SELECT to_char(period, 'YYYY-MM'), version, count(*) OVER w, total, kwh, estimated_kwh"
        " FROM portal_bill WHERE account = %s"
        " WINDOW w AS (PARTITION BY period) ORDER BY period DESC, version DESC", (acc,)).fetchall()
    seen: set[str] = set()
    out = []
    for p, v, n, total, kwh, est in rows:
        if p not in seen:
            seen.add(p)
            out.append(BillSummary(p, v, n, total, kwh, est))
    return out


@dataclass(frozen=True)
class BillLine:
    zone: str
    band: int | None
    date_from: date
    date_to: date
    kwh: Decimal
    estimated_kwh: Decimal
    rate: Decimal
    amount: Decimal


@dataclass(frozen=True)
class BillVersion:
    version: int
    total: Decimal
    kwh: Decimal
    estimated_kwh: Decimal
    plan: str
    method: str
    reason: str
    diff: dict[str, Any] | None
    created_at: datetime
    lines: list[BillLine]


def bill_versions(conn: Any, acc: str, period: date) -> list[BillVersion]:
    """Every version of one month's bill, oldest first, with its lines; empty when none was issued."""
    heads = conn.execute(
        "SELECT version, total, kwh, estimated_kwh, plan, reason, diff, created_at, method FROM portal_bill"
        " WHERE account = %s AND period = %s ORDER BY version", (acc, period)).fetchall()
    lines = conn.execute(
        "SELECT version, zone, date_from, date_to, kwh, estimated_kwh, rate, amount, band"
        " FROM portal_bill_line WHERE account = %s AND period = %s ORDER BY version, line_no",
        (acc, period)).fetchall()
    return [BillVersion(h[0], h[1], h[2], h[3], h[4], h[8], h[5], h[6], h[7],
                        [BillLine(ln[1], ln[8], ln[2], ln[3], ln[4], ln[5], ln[6], ln[7])
                         for ln in lines if ln[0] == h[0]]) for h in heads]


def balance(conn: Any, acc: str, on: date) -> dict[str, Decimal]:
    """Charges minus payments per component (energy, penalty) at the end of `on`: above zero owed."""
    rows = conn.execute(
        "SELECT component, sum(amount) FROM portal_ledger_entry WHERE account = %s AND booked_on <= %s"
        " GROUP BY component", (acc, on)).fetchall()
    sums = dict.fromkeys(COMPONENTS, ZERO)
    for component, total in rows:
        sums[component] = Decimal(total)
    return sums


@dataclass(frozen=True)
class LedgerRow:
    id: int
    component: str
    kind: str
    amount: Decimal
    booked_on: date
    period: str | None
    source: str | None
    reverses: int | None
    reason: str


def ledger_rows(conn: Any, acc: str, component: str | None = None) -> list[LedgerRow]:
    """The account's ledger entries in booking order, optionally of one component."""
    rows = conn.execute(
        "SELECT id, component, kind, amount, booked_on, to_char(period, 'YYYY-MM'), source, reverses, reason"
        " FROM portal_ledger_entry WHERE account = %s AND (%s::text IS NULL OR component = %s)"
        " ORDER BY booked_on, id", (acc, component, component)).fetchall()
    return [LedgerRow(*r) for r in rows]


# --- readings entry (manual metering) ------------------------------------------------


class ReadingRefused(ValueError):
    """A manual reading not taken: `code` for machines, the message for the customer (Russian)."""

    def __init__(self, code: str, message: str, reject_codes: Sequence[str] = ()):
        super().__init__(message)
        self.code = code
        self.reject_codes = tuple(reject_codes)  # what the ingestion refused it for, when it did


class EntryDisabled(ReadingRefused):
    """The account is on automated metering: its readings come from the meter."""


ENTRY_DISABLED = ("Показания по этому лицевому счёту передаются прибором учёта автоматически, "
                  "вводить их вручную не нужно.")


@dataclass(frozen=True)
class ManualReading:
    meter_id: str | None
    register: str
    ts: datetime
    value: Decimal


def enter_readings(conn: Any, acc: str, readings: Sequence[ManualReading], settings: Settings, *,
                   source: str = "portal", now: datetime | None = None) -> dict[str, int]:
    """Check manual readings of a manual-metering account, then ingest them; the ingestion's counts.

    Refused (ReadingRefused) for an automated-metering account, an unknown
    meter or register, a date in the future, a value below the last one or
    implying more than the meter's maximum power, and whatever the ingestion
    itself refuses. The caller commits.
    """
    from adapters import quality
    from adapters.reading import Reading
    from collector.ingest.ingestor import Ingestor

    sub = subscriber(conn, acc)
    if sub is not None and sub.metering != "manual":
        raise EntryDisabled("readings_entry_disabled", ENTRY_DISABLED)
    rows = conn.execute("SELECT id, max_power_kw, removed, adapter, config FROM meter WHERE account = %s",
                        (acc,)).fetchall()
    found = {m: (p, rem) for m, p, rem, _, _ in rows}
    registers = {m: configured_registers(adapter, config) for m, _, _, adapter, config in rows}
    active = [m for m, (_, rem) in found.items() if rem is None]
    now = now or datetime.now(UTC)
    tz = ZoneInfo(settings.timezone)
    stamped = []
    for i, r in enumerate(readings):
        try:  # to UTC first: PostgreSQL takes offsets only up to 15:59, a client may send more
            ts = r.ts.astimezone(UTC)
        except (OverflowError, ValueError):
            ts = None
        if ts is None or ts.year < 1970:
            raise ReadingRefused("invalid_time", f"readings[{i}]: неверная дата показания.")
        stamped.append((ts, r))
    stamped.sort(key=lambda p: p[0])
    items = []
    for i, (ts, r) in enumerate(stamped):
        where = f"readings[{i}]"
        meter_id = r.meter_id
        if meter_id is None:
            if len(active) != 1:
                raise ReadingRefused("meter_required", f"{where}: укажите номер прибора учёта (meter_id): "
                                                       f"на счёте их {len(active)}.")
            meter_id = active[0]
        if meter_id not in found:
            raise ReadingRefused("unknown_meter", f"{where}: прибор учёта {meter_id!r} не относится к счёту.")
        # the one register rule (collector.rules.vee), with its code; the reason for a person in Russian
        refusal = register_refusal(meter_id, r.register, registers[meter_id])
        if refusal is not None:
            raise ReadingRefused(refusal.code, f"{where}: у прибора учёта {meter_id!r} нет регистра "
                                               f"{r.register!r} (есть: {', '.join(sorted(registers[meter_id] or ()))}).")
        if ts > now + timedelta(seconds=settings.future_tolerance_s):
            raise ReadingRefused("reading_in_future", f"{where}: дата показания ещё не наступила.")
        last = conn.execute(
            "SELECT ts, value FROM reading WHERE meter_id = %s AND register = %s AND ts <= %s"
            " ORDER BY ts DESC LIMIT 1", (meter_id, r.register, ts)).fetchone()
        if last is not None:
            last_ts, last_value = last
            if r.value < last_value:
                raise ReadingRefused("reading_below_last",
                                     f"{where}: показание {r.value} меньше предыдущего {last_value} "
                                     f"от {last_ts.astimezone(tz):%d.%m.%Y}.")
            hours = Decimal(max((ts - last_ts).total_seconds(), 1)) / 3600
            max_kw = found[meter_id][0]
            if (r.value - last_value) / hours > max_kw:
                raise ReadingRefused("reading_implausible",
                                     f"{where}: расход {r.value - last_value} кВт·ч за это время больше "
                                     f"возможного для прибора (до {max_kw} кВт); проверьте показание.")
        items.append(Reading(meter_id, r.register, ts, r.value, frozenset({quality.MANUAL}), source))
    # made per request: no in-memory tail (collector.ingest.ingestor), which is for an ingestor
    # that lives as long as its connection
    result = Ingestor(conn, settings, tail=False).ingest(items)
    if result.rejected or result.conflict:
        codes = sorted(result.rejects_by_code) or ["conflict"]
        raise ReadingRefused("reading_rejected", f"Показание не принято ({', '.join(codes)}).", codes)
    return result.as_dict()


# the registers a customer is asked for when the meter's inventory names none: by the plan
PLAN_REGISTERS = {"single": ("1.8.0",), "two_zone": ("1.8.1", "1.8.2"), "three_zone": ("1.8.1", "1.8.2", "1.8.3")}


def entry_registers(conn: Any, acc: str, plan: str) -> list[tuple[str, list[str]]]:
    """(meter, its registers) a manual reading may be entered for: the meters in service, each with the
    registers its inventory configures, or the plan's when it names none."""
    rows = conn.execute("SELECT meter_id, adapter, config FROM portal_meter_entry WHERE account = %s"
                        " ORDER BY installed NULLS FIRST, meter_id", (acc,)).fetchall()
    out = []
    for meter_id, adapter, config in rows:
        regs = configured_registers(adapter, config)
        out.append((meter_id, sorted(regs) if regs else list(PLAN_REGISTERS.get(plan, ("1.8.0",)))))
    return out


def readings_since(conn: Any, acc: str, since: datetime) -> list[tuple[Any, ...]]:
    """The latest reading of each meter register taken at or after `since` (this month's), as
    (meter_id, register, ts, value) rows."""
    rows: list[tuple[Any, ...]] = conn.execute(
        "SELECT meter_id, register, ts, value FROM portal_latest_reading WHERE account = %s AND ts >= %s"
        " ORDER BY meter_id, register", (acc, since)).fetchall()
    return rows
