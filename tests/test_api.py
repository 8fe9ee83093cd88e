"""The customer account API: tokens, cross-account refusal, readings entry, the portal role."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from amr.settings import Settings
from billing.api import TokenStore, create_app, hash_token
from billing.engine import bill_period
from billing.tariffs import load_catalogue_file, store_catalogue
from tests.test_billing import CATALOGUES, add_subscriber, add_usage

ALICE, BOB = "alice-token-1", "bob-token-2"
TOKENS = f"""
[[token]]
name = "alice"
sha256 = "{hash_token(ALICE)}"
accounts = ["000123", "456"]

[[token]]
name = "bob"
token = "{BOB}"
accounts = ["789"]
"""
A = {"Authorization": f"Bearer {ALICE}"}
B = {"Authorization": f"Bearer {BOB}"}
NOW = datetime.now(UTC).replace(microsecond=0)
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture
def api(db_url, conn):
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    add_subscriber(conn, "123", "three_zone")
    conn.execute("INSERT INTO subscriber (account, metering, plan, category, area) VALUES"
                 " ('456', 'manual', 'single', 'electric_stove', 'rural')")
    conn.execute("INSERT INTO meter (id, account, adapter, max_power_kw, installed) VALUES"
                 " ('m-456', '456', 'manual', 10, '2026-01-01T00:00+03:00')")
    conn.commit()
    add_subscriber(conn, "789", "single")
    for acc in ("123", "789"):
        add_usage(conn, f"m-{acc}", date(2026, 10, 1), night="10", peak="2", half_peak="3",
                  estimated={"night": "1"})
        add_usage(conn, f"m-{acc}", date(2026, 10, 2), night="5")
    conn.execute("INSERT INTO reading (meter_id, register, ts, value) VALUES"
                 " ('m-123', '1.8.0', '2026-10-02T21:00Z', 1234.5), ('m-123', '1.8.0', '2026-10-01T21:00Z', 1200)")
    conn.commit()
    bill_period(conn, date(2026, 10, 1))
    add_usage(conn, "m-123", date(2026, 10, 3), night="1")
    bill_period(conn, date(2026, 10, 1), reason="late data")
    app = create_app(Settings(database_url=db_url), TokenStore.from_toml(TOKENS, "tokens.toml"))
    with TestClient(app) as client:
        yield client


def test_a_token_is_required(api) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YTpi"}):
        r = api.get("/accounts/123", headers=headers)
        assert r.status_code in (401, 403), headers
        assert "Bearer" in r.headers.get("www-authenticate", "Bearer")


def test_account_summary_with_leading_zeros(api) -> None:
    r = api.get("/accounts/000123", headers=A)
    assert r.status_code == 200
    body = r.json()
    assert (body["account"], body["metering"], body["plan"]) == ("123", "amr", "three_zone")
    assert body["meters"][0]["registers"] == [
        {"register": "1.8.0", "value": "1234.5", "read_at": "2026-10-02T21:00:00Z"}]
    assert api.get("/accounts", headers=A).json() == {"accounts": ["123", "456"]}


PATHS = ["/accounts/{}", "/accounts/{}/consumption/daily?from=2026-10-01&to=2026-10-31",
         "/accounts/{}/consumption/monthly?from=2026-01&to=2026-12", "/accounts/{}/bills",
         "/accounts/{}/bills/2026-10"]


def test_every_cross_account_attempt_fails_and_reveals_nothing(api) -> None:
    for path in PATHS:
        assert api.get(path.format("789"), headers=B).status_code == 200, path
        for other in ("789", "0789", "999999", "12a", "١٢٣"):
            r = api.get(path.format(other), headers=A)
            assert r.status_code == 404, (path, other)
            assert r.json() == {"code": "not_found", "message": "Лицевой счёт не найден."}
        assert api.get(path.format("123"), headers=B).status_code == 404
    r = api.post("/accounts/789/readings", headers=A,
                 json={"readings": [{"ts": NOW.isoformat(), "value": "1"}]})
    assert r.status_code == 404


def test_consumption_by_day_and_month(api) -> None:
    days = api.get(PATHS[1].format("123"), headers=A).json()["days"]
    assert days[0] == {"day": "2026-10-01", "night": "10", "peak": "2", "half_peak": "3",
                       "total": "15", "estimated": "1", "suspect": "0"}
    assert [d["total"] for d in days] == ["15", "5", "1"]
    months = api.get(PATHS[2].format("123"), headers=A).json()["months"]
    assert [(m["month"], m["night"], m["total"]) for m in months] == [("2026-10", "16", "21")]


def test_bills_with_lines_and_versions(api) -> None:
    listing = api.get("/accounts/123/bills", headers=A).json()["bills"]
    # v2: peak 2 x 8.72 = 17.44; half_peak 3 x 7.14 = 21.42; night 16 x 4.20 = 67.20
    assert listing == [{"period": "2026-10", "version": 2, "versions": 2, "total": "106.06",
                        "kwh": "21", "estimated_kwh": "1"}]
    detail = api.get("/accounts/123/bills/2026-10", headers=A).json()
    assert [v["total"] for v in detail["versions"]] == ["101.86", "106.06"]
    assert detail["latest"]["reason"] == "late data: energy changed: total 101.86 -> 106.06 (+4.20)"
    assert [(ln["zone"], ln["amount"]) for ln in detail["latest"]["lines"]] == [
        ("peak", "17.44"), ("half_peak", "21.42"), ("night", "67.20")]
    assert api.get("/accounts/123/bills/2026-09", headers=A).status_code == 404


def test_readings_entry_refused_for_automated_metering(api, conn) -> None:
    r = api.post("/accounts/123/readings", headers=A,
                 json={"readings": [{"ts": NOW.isoformat(), "value": "1300"}]})
    assert r.status_code == 409
    assert r.json()["code"] == "readings_entry_disabled"
    assert "автоматически" in r.json()["message"]
    assert conn.execute("SELECT count(*) FROM reading WHERE ts > '2026-11-01'").fetchone()[0] == 0


def test_manual_readings_are_checked_then_stored(api, conn) -> None:
    t0 = NOW - timedelta(days=10)
    post = lambda ts, value: api.post(  # noqa: E731
        "/accounts/456/readings", headers=A, json={"readings": [{"ts": ts.isoformat(), "value": value}]})
    r = post(t0, "1000.5")
    assert (r.status_code, r.json()["accepted"]) == (201, 1)
    r = post(t0 + timedelta(days=5), "999")
    assert (r.status_code, r.json()["code"]) == (422, "reading_below_last")
    assert "меньше предыдущего" in r.json()["message"]
    # 10 kW for 5 days is at most 1200 kWh
    r = post(t0 + timedelta(days=5), "2300")
    assert (r.status_code, r.json()["code"]) == (422, "reading_implausible")
    r = post(NOW + timedelta(days=2), "1100")
    assert (r.status_code, r.json()["code"]) == (422, "reading_in_future")
    r = post(t0 + timedelta(days=5), "1150.25")
    assert r.status_code == 201
    rows = conn.execute("SELECT value, quality, source FROM reading WHERE meter_id = 'm-456' ORDER BY ts").fetchall()
    assert rows == [(Decimal("1000.5"), ["manual"], "portal"), (Decimal("1150.25"), ["manual"], "portal")]
    r = api.post("/accounts/456/readings", headers=A, json={"readings": [{"ts": "2026-10-01T10:00", "value": "1"}]})
    assert r.status_code == 422
    # an offset PostgreSQL would refuse (over 15:59) is taken as the instant it names
    far_east = (t0 + timedelta(days=6)).astimezone(timezone(timedelta(hours=16)))
    assert post(far_east, "1160").status_code == 201
    assert conn.execute("SELECT max(ts) FROM reading WHERE meter_id = 'm-456'").fetchone()[0] == t0 + timedelta(days=6)


def test_the_portal_role_can_only_read_views(api, conn) -> None:
    conn.execute("SET ROLE amr_portal")
    assert conn.execute("SELECT count(*) FROM portal_bill").fetchone()[0] == 3  # 123 v1 and v2, 789 v1
    for view in ("portal_account", "portal_meter", "portal_latest_reading", "portal_daily_usage",
                 "portal_bill", "portal_bill_line"):
        conn.execute(f"SELECT * FROM {view} LIMIT 1")
    statements = [
        "SELECT * FROM bill", "SELECT * FROM reading", "SELECT * FROM subscriber",
        "INSERT INTO bill (account) VALUES ('1')", "DELETE FROM bill_line",
        "UPDATE portal_account SET plan = 'single'", "DELETE FROM portal_bill_line",
        "INSERT INTO portal_meter (meter_id, account) VALUES ('x', '123')",
        "UPDATE daily_zone_usage SET kwh = 0", "TRUNCATE tariff", "CREATE TABLE evil (x int)",
        "DROP VIEW portal_bill", "ALTER TABLE bill ADD COLUMN x int",
        "SELECT nextval('tariff_id_seq')",
    ]
    for sql in statements:
        conn.rollback()
        conn.execute("SET ROLE amr_portal")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)
    conn.rollback()


def test_fuzzing_the_openapi_spec_finds_no_server_error(api) -> None:
    """Every operation, generated cases (valid and not), the holder of two accounts' token."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    # every operation the app documents is fuzzed (the count grows with the API)
    documented = {(m.upper(), path) for path, ops in api.app.openapi()["paths"].items() for m in ops}
    assert {(op.method.upper(), op.path) for op in operations} == documented and len(documented) >= 9
    seen: set[int] = set()
    for op in operations:

        @given(op.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            case.call_and_validate(headers=A, checks=CHECKS)
            if "account" in (case.path_parameters or {}):
                # the same fuzzed query and body against accounts that exist and are the token's
                for account in ("000123", "456"):
                    case.path_parameters["account"] = account
                    r = case.call_and_validate(headers=A, checks=CHECKS)
                    seen.add(r.status_code)

        run()
    assert {200, 404, 422} <= seen  # real data was reached, not only refusals


def test_consumption_counts_a_meter_only_while_installed(api, conn) -> None:
    """As on the bill: energy after a meter's removal is not the account's."""
    conn.execute("UPDATE meter SET removed = '2026-10-01T12:00+03:00' WHERE id = 'm-789'")
    conn.commit()
    days = api.get(PATHS[1].format("789"), headers=B).json()["days"]
    assert [(d["day"], d["total"]) for d in days] == [("2026-10-01", "15")]
