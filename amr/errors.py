"""Errors a person can act on: the CLI prints them without a traceback.

`amr.cli.main` maps them to the exit code in one place: a `UserError` (and so
a `ProblemsError`) is exit status 2 with its message; anything else is a bug,
status 1 with a redacted traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration, described so the reader knows what to fix."""


class ProblemsError(UserError, ValueError):
    """A file refused as a whole, with every problem found in it, so that one round fixes them.

    `problems` names file, entry and key of each; `str()` is one per line, and
    `describe()` heads them with their count and what was read (`what`, like
    "the inventory"). Inventories, register-map presets, tariff catalogues and
    reloaded configurations raise subclasses of this one.
    """

    what = "the file"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def describe(self) -> str:
        return f"{len(self.problems)} problem(s) in {self.what}:\n" + "\n".join(self.problems)
