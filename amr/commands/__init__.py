"""Subcommands of the ground floor: `amr db`."""
