"""The tariff catalogue: validation names the entry and key; loading is idempotent."""

from __future__ import annotations

import tomllib
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from billing.tariffs import (
    Catalogue,
    TariffError,
    load_catalogue_file,
    load_db_catalogue,
    parse_catalogue,
    store_catalogue,
)

CATALOGUES = Path(__file__).resolve().parent.parent / "billing" / "catalogues"


def _doc(*entries: str) -> dict:
    return tomllib.loads("\n".join(f"[[tariff]]\n{e}\n" for e in entries))


GOOD = 'from = "2026-01-01"\nto = "2026-06-30"\ncategory = "gas_stove"\narea = "urban"\nplan = "single"\nrates = { all = "5.00" }'


def test_example_catalogue_has_every_plan_category_and_the_july_change() -> None:
    cat = Catalogue(load_catalogue_file(CATALOGUES / "example.toml"))
    assert "EXAMPLE" in (CATALOGUES / "example.toml").read_text().splitlines()[0]
    for category, area in (("gas_stove", "urban"), ("electric_stove", "urban"), ("rural", "rural")):
        for plan in ("single", "two_zone", "three_zone"):
            for year in (2025, 2026):
                segs = cat.segments(category, area, plan, date(year, 1, 1), date(year, 12, 31))
                assert [(s[0], s[1]) for s in segs] == [
                    (date(year, 1, 1), date(year, 6, 30)), (date(year, 7, 1), date(year, 12, 31))]
                assert all(s[2] for s in segs)
    # a rural home of either stove type gets the rural category's rates
    rural = cat.segments("electric_stove", "rural", "single", date(2026, 7, 1), date(2026, 7, 31))
    assert rural[0][2][0].category == "rural"


def test_checked_catalogue_has_only_checked_figures() -> None:
    tariffs = load_catalogue_file(CATALOGUES / "spb-2014-gas-stove-checked.toml")
    got = {(t.plan, t.valid_from.month, z): r for t in tariffs for z, r in t.rates}
    assert got == {
        ("single", 1, "all"): Decimal("3.39"), ("single", 7, "all"): Decimal("3.53"),
        ("two_zone", 1, "day"): Decimal("3.41"), ("two_zone", 1, "night"): Decimal("2.06"),
        ("two_zone", 7, "day"): Decimal("3.55"), ("two_zone", 7, "night"): Decimal("2.14"),
    }
    assert "three-zone" in (CATALOGUES / "spb-2014-gas-stove-checked.toml").read_text()


def test_every_problem_names_entry_and_key() -> None:
    doc = _doc(
        GOOD,
        'from = "2026-03-01"\nto = "2026-12-31"\ncategory = "gas_stove"\narea = "urban"\nplan = "single"\nrates = { all = "5.10" }',
        'from = "2026-01-01"\nto = "2026-06-30"\ncategory = "gas_stove"\narea = "urban"\nplan = "three_zone"\nrates = { peak = "7.0", night = "-1" }',
        'from = "2026-07-01"\nto = "2026-06-30"\ncategory = "coal"\narea = "urban"\nplan = "single"\nrates = { all = "x" }',
    )
    with pytest.raises(TariffError) as err:
        parse_catalogue(doc, "t.toml")
    text = str(err.value)
    assert "t.toml: tariff[1] (gas_stove/urban/single from 2026-03-01): key 'from': 2026-03-01 overlaps" in text
    assert "tariff[2] (gas_stove/urban/three_zone from 2026-01-01): key 'rates.half_peak': missing" in text
    assert "key 'rates.night': rate must be positive" in text
    assert "tariff[3] (coal/urban/single from 2026-07-01): key 'category': 'coal' is not one of" in text
    assert "tariff[3]" in text and "key 'to': 2026-06-30 is before 'from'" in text
    assert "key 'rates.all': not a decimal number: 'x'" in text


def test_overlap_hidden_behind_a_short_entry_is_found() -> None:
    long = GOOD.replace('to = "2026-06-30"', 'to = "2026-12-31"')
    short = GOOD.replace('from = "2026-01-01"\nto = "2026-06-30"', 'from = "2026-02-01"\nto = "2026-02-28"')
    later = GOOD.replace('from = "2026-01-01"\nto = "2026-06-30"', 'from = "2026-05-01"\nto = "2026-05-31"')
    with pytest.raises(TariffError) as err:
        parse_catalogue(_doc(long, short, later), "t.toml")
    assert len(err.value.problems) == 2


def test_a_zone_not_in_the_plan_is_refused() -> None:
    with pytest.raises(TariffError, match=r"key 'rates.day': plan 'single' has no zone 'day'"):
        parse_catalogue(_doc(GOOD.replace('{ all = "5.00" }', '{ all = "5.00", day = "6.00" }')), "t.toml")


def test_volume_bands_fit_the_model_without_overlap_errors() -> None:
    band1 = GOOD + '\nband = 1\nband_to_kwh = "1200"'
    band2 = GOOD.replace('"5.00"', '"6.00"') + '\nband = 2\nband_from_kwh = "1200"\nband_to_kwh = "3900"'
    tariffs = parse_catalogue(_doc(band1, band2), "t.toml")
    segs = Catalogue(tariffs).segments("gas_stove", "urban", "single", date(2026, 3, 1), date(2026, 3, 31))
    assert [t.band for t in segs[0][2]] == [1, 2]


def test_store_is_idempotent_and_refuses_overlap_with_stored(conn) -> None:
    tariffs = load_catalogue_file(CATALOGUES / "example.toml")
    assert store_catalogue(conn, tariffs) == (36, 0)
    assert store_catalogue(conn, tariffs) == (0, 36)
    assert len(load_db_catalogue(conn)) == 36
    clash = parse_catalogue(_doc(GOOD.replace('"5.00"', '"9.99"')), "new.toml")
    with pytest.raises(TariffError, match=r"new.toml: tariff\[0\].*overlaps .*example.toml: tariff\[\d+\]"):
        store_catalogue(conn, clash)
    assert len(load_db_catalogue(conn)) == 36


def test_the_inventory_offers_the_plans_categories_and_areas_the_tariffs_know() -> None:
    """collector.inventory spells them as Literal types, which cannot name constants: kept equal here."""
    from typing import get_args

    from collector.inventory import Subscriber
    from collector.rules import vocabulary

    def offered(name: str) -> set[str]:
        return set(get_args(Subscriber.model_fields[name].annotation))

    assert offered("plan") == set(vocabulary.PLANS) == set(vocabulary.PLAN_ZONES) == set(vocabulary.FOLD)
    # the rural category is the tariffs' own: a subscriber is a rural home by its area
    assert offered("category") == set(vocabulary.CATEGORIES) - {vocabulary.RURAL}
    assert offered("area") == set(vocabulary.AREAS)
    for plan, fold in vocabulary.FOLD.items():
        assert set(fold) == set(vocabulary.STORED_ZONES)
        assert set(fold.values()) == set(vocabulary.PLAN_ZONES[plan])
