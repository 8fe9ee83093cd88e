"""`amr tariffs load` as an operator runs it: the file AMR_TARIFFS names when no FILE is given.

Tariffs are billing's data, loaded by billing's command; the collector does
not read them. Each test runs the real console entry point (`amr.cli.main`)
against a database of its own and reads back what was stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from amr.cli import main
from amr.settings import get_settings
from billing.tariffs import load_catalogue_file, load_db_catalogue

CATALOGUES = Path(__file__).resolve().parent.parent / "billing" / "catalogues"

GOOD = ('[[tariff]]\nfrom = "2026-01-01"\nto = "2026-06-30"\ncategory = "gas_stove"\narea = "urban"\n'
        'plan = "single"\nrates = { all = "5.00" }\n')
# three problems in two entries, after a good entry that must not be stored either
BROKEN = GOOD + (
    '[[tariff]]\nfrom = "2026-01-01"\nto = "2026-06-30"\ncategory = "gas_stove"\narea = "urban"\n'
    'plan = "two_zone"\nrates = { day = "0" }\n'
    '[[tariff]]\nfrom = "2026-01-01"\nto = "2026-06-30"\ncategory = "coal_stove"\narea = "urban"\n'
    'plan = "single"\nrates = { all = "5.00" }\n')


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The CLI's environment: this test's database, no tariff file until the test sets one."""
    monkeypatch.setenv("AMR_DATABASE_URL", db_url)
    monkeypatch.delenv("AMR_TARIFFS", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def amr(*argv: str) -> int:
    get_settings.cache_clear()  # each run reads the environment afresh, as a new process would
    return main(list(argv))


def test_load_without_file_stores_the_catalogue_amr_tariffs_names(
        env: pytest.MonkeyPatch, conn: psycopg.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    path = CATALOGUES / "example.toml"
    env.setenv("AMR_TARIFFS", str(path))
    assert amr("tariffs", "load") == 0
    assert capsys.readouterr().out == f"{path}: added 36 tariffs, 0 already stored\n"
    assert load_db_catalogue(conn).tariffs == sorted(
        load_catalogue_file(path), key=lambda t: (t.key, t.valid_from))
    # loading it again adds nothing; a FILE named on the command line wins over AMR_TARIFFS
    assert amr("tariffs", "load") == 0
    assert "added 0 tariffs, 36 already stored" in capsys.readouterr().out
    checked = CATALOGUES / "spb-2014-gas-stove-checked.toml"
    assert amr("tariffs", "load", str(checked)) == 0
    assert capsys.readouterr().out == f"{checked}: added 4 tariffs, 0 already stored\n"
    assert len(load_db_catalogue(conn)) == 40


def test_a_broken_file_is_refused_whole_with_every_problem_listed(
        env: pytest.MonkeyPatch, conn: psycopg.Connection, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "tariffs.toml"
    bad.write_text(BROKEN)
    env.setenv("AMR_TARIFFS", str(bad))
    assert amr("tariffs", "load") == 2
    err = capsys.readouterr().err
    assert err.startswith("amr tariffs: 3 problem(s) in the tariffs:\n")
    assert f"{bad}: tariff[1] (gas_stove/urban/two_zone from 2026-01-01): key 'rates.day': rate must be positive" in err
    assert f"{bad}: tariff[1] (gas_stove/urban/two_zone from 2026-01-01): key 'rates.night': missing" in err
    assert f"{bad}: tariff[2] (coal_stove/urban/single from 2026-01-01): key 'category': 'coal_stove' is not one of" in err
    assert len(load_db_catalogue(conn)) == 0  # not even the good first entry
    # --check says the same and stores nothing either
    assert amr("tariffs", "load", "--check") == 2
    assert "3 problem(s) in the tariffs" in capsys.readouterr().err
    bad.write_text(GOOD)
    assert amr("tariffs", "load", "--check") == 0
    assert capsys.readouterr().out == f"{bad}: 1 tariffs: OK\n"
    assert len(load_db_catalogue(conn)) == 0


def test_neither_file_nor_amr_tariffs_says_what_to_give(
        env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert amr("tariffs", "load") == 2
    assert capsys.readouterr().err == (
        "amr tariffs: no tariff file: name one (amr tariffs load FILE) or set AMR_TARIFFS\n")
