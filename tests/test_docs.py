"""docs/ against the code: the generated inventory page, and names the other pages cite.

If test_inventory_doc_is_generated fails, regenerate the page with `scripts/docs`
(or `.venv/bin/python -m collector.inventory_docs > docs/inventory.md`) and commit it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from collector.inventory import Meter, Subscriber, parse_inventory
from collector.inventory_docs import REGENERATE, render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_inventory_doc_is_generated() -> None:
    committed = (DOCS / "inventory.md").read_text(encoding="utf-8")
    assert committed == render(), f"docs/inventory.md differs from the models: run `{REGENERATE}`"


def test_every_inventory_key_is_documented() -> None:
    page = render()
    for model, section in ((Subscriber, "subscriber"), (Meter, "meter")):
        table = page.split(f"## `[[{section}]]`", 1)[1]
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} needs Field(description=...)"
            assert f"| `{name}` |" in table, f"{section}.{name} missing from docs/inventory.md"


def test_inventory_example_is_a_valid_inventory() -> None:
    block = re.search(r"```toml\n(.*?)```", render(), re.S)
    assert block is not None
    inv = parse_inventory(tomllib.loads(block.group(1)), "docs/inventory.md")
    assert set(inv.meters) == {"sdm630-0001", "mqtt-0004"}


def _blocks(page: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


def test_tariff_examples_are_valid() -> None:
    from billing.tariffs import parse_catalogue, parse_norms

    blocks = _blocks("tariffs.md", "toml")
    tariffs = [b for b in blocks if "[[tariff]]" in b]
    norms = [b for b in blocks if "[[norm]]" in b]
    assert len(tariffs) == 2 and len(norms) == 1
    assert len(parse_catalogue(tomllib.loads(tariffs[1]), "docs/tariffs.md")) == 2
    parse_catalogue(tomllib.loads(tariffs[0]), "docs/tariffs.md")
    assert len(parse_norms(tomllib.loads(norms[0]), "docs/tariffs.md")) == 5


def test_tariff_keys_documented() -> None:
    from billing import tariffs

    page = (DOCS / "tariffs.md").read_text(encoding="utf-8")
    for key in [*tariffs._KEYS, *tariffs._NORM_KEYS]:
        assert f"| `{key}` |" in page, f"docs/tariffs.md has no row for the key {key!r}"
    for rule in tariffs.ALLOCATIONS:
        assert f'`"{rule}"`' in page, f"docs/tariffs.md does not name the allocation {rule!r}"


def test_registry_layout_doc_matches_the_code(tmp_path: Path) -> None:
    from billing.registry import DEFAULT_LAYOUT, FIELDS, load_layout

    page = (DOCS / "registries.md").read_text(encoding="utf-8")
    default = load_layout(DEFAULT_LAYOUT)
    for field, column in default.columns.items():
        assert f"| {column} | `{field}` |" in page, f"default column {column} ({field}) not as in docs"
    for field in FIELDS:
        assert f"`{field}`" in page
    example = tmp_path / "bank.toml"
    example.write_text(_blocks("registries.md", "toml")[0], encoding="utf-8")
    layout = load_layout(example)
    assert layout.columns["penalty"] == 6 and layout.totals_prefix == "ИТОГО"


def test_troubleshooting_codes_exist_and_mqtt_ones_are_all_explained() -> None:
    from adapters.base import OUTCOMES
    from adapters.reading import REJECT_CODES

    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\s*\| `([a-z_0-9]+)` \|", page, re.M))
    for outcome in set(OUTCOMES) - {"ok"}:
        assert outcome in rows, f"poll outcome {outcome!r} has no row in docs/troubleshooting.md"
    mqtt_codes = {"malformed", "too_deep", "too_large", "type", "ts", "schema", "no_energy",
                  "unknown_topic", "unknown_device", "decode_error", "unit"}
    assert mqtt_codes <= REJECT_CODES
    assert mqtt_codes <= rows, f"MQTT codes without a row: {sorted(mqtt_codes - rows)}"
    named = set(re.findall(r"`([a-z]+_[a-z_]+)`", page)) & REJECT_CODES
    assert rows | named <= REJECT_CODES | set(OUTCOMES), "docs/troubleshooting.md names a code the code has not"


def test_troubleshooting_names_every_subscribed_topic_and_real_presets() -> None:
    from adapters.mqtt_formats import DEVICES_PATH
    from adapters.registermap import PRESETS_DIR

    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    formats = tomllib.loads(DEVICES_PATH.read_text(encoding="utf-8"))["format"]
    for f in formats:
        for topic in f["subscribe"]:
            tail = topic.rsplit("/", 1)[-1]
            assert f"`{topic}`" in page or f"`.../{tail}`" in page, f"topic {topic} not in the MQTT section"
    for preset in set(re.findall(r"`((?:eastron|generic)_[a-z0-9_]+)`", page)):
        assert (PRESETS_DIR / f"{preset}.toml").is_file(), f"docs name a preset {preset!r} that is not shipped"


def test_troubleshooting_decode_examples_print_what_the_page_shows(capsys) -> None:
    import argparse
    import shlex
    import textwrap

    from collector.commands import mqtt as mqtt_cmd

    console = _blocks("troubleshooting.md", "console")
    assert console
    text = textwrap.dedent(console[0])
    examples = re.findall(r"^\$ (amr mqtt decode .*)\n((?:(?!\$ ).*\n)*)", text, re.M)
    assert len(examples) == 2
    parser = argparse.ArgumentParser()
    mqtt_cmd.register(parser.add_subparsers())
    for command, shown in examples:
        args = parser.parse_args(shlex.split(command)[1:])
        args.timezone = "Europe/Moscow"
        args.func(args)
        out = capsys.readouterr().out
        for line in shown.strip("\n").splitlines():
            assert line.split("...")[0].rstrip() in out, f"{command}: {line!r} not in {out!r}"


def test_every_page_is_in_the_index_and_every_link_resolves() -> None:
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([a-z_-]+\.md)(?:#[a-z0-9-]+)?\)", page.read_text(encoding="utf-8")):
            assert (DOCS / target).is_file(), f"{page.name} links {target}, which is not in docs/"
