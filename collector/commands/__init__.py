"""Subcommands of `amr`, one module per concern; each has `register(subparsers)`."""
