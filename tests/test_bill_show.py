"""`amr bill show`: a bill's lines, versions and differences, the same as the customer API serves."""

from __future__ import annotations

import argparse
import json
from datetime import date, datetime

import pytest
from fastapi.testclient import TestClient

from amr.cli import build_parser
from amr.errors import UserError
from amr.settings import Settings, get_settings
from billing.api import TokenStore, create_app
from billing.engine import bill_period
from billing.tariffs import load_catalogue_file, store_catalogue
from tests.test_billing import CATALOGUES, add_subscriber, add_usage

TOKEN = "show-token-1"
OCT = date(2026, 10, 1)


@pytest.fixture
def two_versions(conn, db_url, monkeypatch):
    """Account 123's October bill in two versions (late data for October 3rd), and the CLI pointed at it."""
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example.toml"))
    add_subscriber(conn, "123", "three_zone")
    add_usage(conn, "m-123", date(2026, 10, 1), night="10", peak="2", half_peak="3", estimated={"night": "1"})
    add_usage(conn, "m-123", date(2026, 10, 2), night="5")
    conn.commit()
    bill_period(conn, OCT)
    add_usage(conn, "m-123", date(2026, 10, 3), night="1")
    bill_period(conn, OCT, reason="late data")
    monkeypatch.setenv("AMR_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def amr(argv: list[str], capsys) -> str:
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_bill_show_json_is_the_apis_bill(two_versions, db_url, capsys) -> None:
    shown = json.loads(amr(["bill", "show", "--account", "0123", "--period", "2026-10", "--json"], capsys))
    tokens = TokenStore.from_toml(f'[[token]]\nname = "t"\ntoken = "{TOKEN}"\naccounts = ["123"]\n', "t.toml")
    with TestClient(create_app(Settings(database_url=db_url), tokens)) as client:
        r = client.get("/accounts/123/bills/2026-10", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    api = r.json()
    assert len(api["versions"]) == 2

    def same(v: dict) -> dict:  # the CLI adds each line's day count; times compared as instants
        return {**v, "created_at": datetime.fromisoformat(v["created_at"].replace("Z", "+00:00")),
                "lines": [{k: x for k, x in ln.items() if k != "days"} for ln in v["lines"]]}

    assert (shown["account"], shown["period"]) == (api["account"], api["period"])
    assert [same(v) for v in shown["versions"]] == [same(v) for v in api["versions"]]
    assert same(shown["latest"]) == same(api["latest"])
    assert [v["total"] for v in shown["versions"]] == ["101.86", "106.06"]
    assert shown["latest"]["diff"]["total_delta"] == "4.20"
    assert [ln["days"] for ln in shown["latest"]["lines"]] == [31, 31, 31]


def test_bill_show_prints_lines_total_versions_and_difference(two_versions, capsys) -> None:
    out = amr(["bill", "show", "--account", "123", "--period", "2026-10"], capsys)
    assert "account 123  2026-10  plan three_zone  version 2 of 2" in out
    lines = out.splitlines()
    night = next(ln for ln in lines if ln.strip().startswith("night"))
    assert night.split()[-4:] == ["31", "16", "4.20", "67.20"]  # days, kWh, rate, amount
    assert "total 106.06 RUB" in out
    assert any(ln.strip().startswith("1 ") and "101.86" in ln for ln in lines)
    assert "late data: energy changed: total 101.86 -> 106.06 (+4.20)" in out
    assert "night from 2026-10-01: kWh 15 -> 16, rate 4.2, amount 63.00 -> 67.20" in out


def test_bill_without_show_still_bills(two_versions, capsys) -> None:
    out = amr(["bill", "--period", "2026-10", "--json"], capsys)
    summary = json.loads(out.splitlines()[-1])
    assert (summary["kind"], summary["unchanged"]) == ("summary", 1)


@pytest.mark.parametrize(("argv", "says"), [
    (["--period", "2026-09", "--account", "123"], "no bill for 2026-09; bill the month with"),
    (["--period", "2026-10", "--account", "999"], "account 999: no such subscriber"),
    (["--period", "2026-10"], "exactly one --account"),
    (["--period", "2026-10", "--account", "123", "--account", "124"], "exactly one --account"),
    (["--period", "2026-13", "--account", "123"], "2026-13"),
])
def test_bill_show_refusals_say_what_to_do(two_versions, argv, says) -> None:
    args = build_parser().parse_args(["bill", "show", *argv])
    with pytest.raises(UserError, match=says):
        args.func(args)


def test_bill_accepts_no_other_action() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bill", "list", "--period", "2026-10"])
    assert isinstance(build_parser().parse_args(["bill", "--period", "2026-10"]), argparse.Namespace)
