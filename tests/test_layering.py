"""Imports go down only: a wrong-way import fails here, named with its file and line.

The floors, lowest first: `amr/` (settings, errors, logs, metrics, database,
migrations, the CLI root), `adapters/`, `collector/`, `billing/`, `portal/` (the customer account's pages), and on top
`simulators/` (the simulated meters and the demo, which drive everything).
Every import counts, at module level or inside a function, since a lazy import
is a dependency all the same. The CLI root finds the parts' commands by
module name (amr.cli.COMMAND_MODULES), and no module imports a command module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

FLOORS = ["amr", "adapters", "collector", "billing", "portal", "simulators"]


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative ones resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    if package is None:
        package = dotted(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def modules(floor: str) -> list[Path]:
    return sorted((ROOT / floor).rglob("*.py"))


def test_every_floor_exists_and_has_modules() -> None:
    for floor in FLOORS:
        assert modules(floor), f"{floor}/ has no modules"


@pytest.mark.parametrize("floor", FLOORS)
def test_imports_go_down_only(floor: str) -> None:
    above = FLOORS[FLOORS.index(floor) + 1:]
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {module} ({module.split('.')[0]}/ is above {floor}/)"
        for path in modules(floor)
        for line, module in imports(path)
        if module.split(".")[0] in above
    ]
    assert not wrong, "wrong-way imports:\n" + "\n".join(wrong)


def is_command(module: str) -> bool:
    return "commands" in module.split(".")


def test_no_module_imports_a_command_module() -> None:
    """Commands are thin layers over library functions; what they share lives in the library."""
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports the command module {module}"
        for floor in FLOORS
        for path in modules(floor)
        if not is_command(dotted(path))
        for line, module in imports(path)
        if module.split(".")[0] in FLOORS and is_command(module)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The check itself: an import inside a function and a relative one are both seen."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from billing import engine\n\nfrom . import zones\n")
    found = imports(sample, package="collector.rules")
    assert (2, "billing") in found and (2, "billing.engine") in found and (4, "collector.rules.zones") in found
