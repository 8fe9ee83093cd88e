"""Norms are loaded by `amr tariffs norms`; the API shows a bill's method and its lines' bands."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import psycopg
import pytest
from fastapi.testclient import TestClient

from amr.settings import Settings
from billing.api import TokenStore, create_app
from billing.engine import bill_period
from billing.tariffs import load_catalogue_file, store_catalogue
from tests.test_billing import add_subscriber, add_usage
from tests.test_tariffs_cli import CATALOGUES, amr, env  # noqa: F401 (env is a fixture)


def test_norms_load_checks_the_file_whole(env, conn: psycopg.Connection, capsys, tmp_path) -> None:  # noqa: F811
    path = CATALOGUES / "norms-example.toml"
    assert amr("tariffs", "norms", str(path), "--check") == 0
    assert conn.execute("SELECT count(*) FROM consumption_norm").fetchone()[0] == 0  # --check stores nothing
    assert amr("tariffs", "norms", str(path)) == 0
    out = capsys.readouterr().out
    stored = conn.execute("SELECT count(*) FROM consumption_norm").fetchone()[0]
    assert stored > 0 and f"added {stored} norm cells, 0 already stored" in out
    assert amr("tariffs", "norms", str(path)) == 0
    assert f"added 0 norm cells, {stored} already stored" in capsys.readouterr().out
    broken = tmp_path / "norms.toml"
    broken.write_text(path.read_text(encoding="utf-8") + "\n[[norm]]\ncategory = \"coal_stove\"\n",
                      encoding="utf-8")
    assert amr("tariffs", "norms", str(broken)) == 2
    assert "problem(s)" in capsys.readouterr().err
    assert conn.execute("SELECT count(*) FROM consumption_norm").fetchone()[0] == stored


@pytest.fixture
def banded_api(db_url: str, conn: psycopg.Connection):
    store_catalogue(conn, load_catalogue_file(CATALOGUES / "example-banded.toml"))
    add_subscriber(conn, "7", "two_zone")
    add_usage(conn, "m-7", date(2025, 10, 3), night="1500", peak="1000", half_peak="2000")
    conn.commit()
    bill_period(conn, date(2025, 10, 1))
    app = create_app(Settings(database_url=db_url),
                     TokenStore.from_toml('[[token]]\nname = "a"\ntoken = "tok"\naccounts = ["7"]\n', "t.toml"))
    with TestClient(app) as client:
        yield client


def test_the_api_shows_the_method_and_the_bands(banded_api) -> None:
    r = banded_api.get("/accounts/7/bills/2025-10", headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200, r.text
    latest = r.json()["latest"]
    assert latest["method"] == "readings"
    got = [(ln["band"], ln["zone"], Decimal(ln["kwh"])) for ln in latest["lines"]]
    # the worked example: day 800 / 1,800 / 400, night 400 / 900 / 200
    assert sorted(got) == [(1, "day", 800), (1, "night", 400), (2, "day", 1800), (2, "night", 900),
                           (3, "day", 400), (3, "night", 200)]
