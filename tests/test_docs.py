"""docs/ against the code: the generated inventory page, and names the other pages cite.

If test_inventory_doc_is_generated fails, regenerate the page:
    .venv/bin/python -m collector.inventory_docs > docs/inventory.md
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
