"""Errors a person can act on: the CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration, described so the reader knows what to fix."""
