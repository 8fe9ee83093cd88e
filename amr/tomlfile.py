"""Reading the project's TOML files (inventory, tariffs) with one kind of error."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class TomlFileError(ValueError):
    """The file cannot be read as TOML; the message names the file and the problem."""


def read_toml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TomlFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise TomlFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TomlFileError(f"{path}: not valid TOML: {exc}") from None
