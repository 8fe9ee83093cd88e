"""The ground floor of amr: what every part uses and that uses none of them.

Settings, errors, logging, the metrics catalogue and endpoint, runtime tuning,
the TOML reader, the generic reload mechanism, the database connection,
migrations and the time-table switch, and the root of the `amr` command.
Nothing here imports adapters/, collector/, billing/ or simulators/
(tests/test_layering.py walks the imports); the CLI root finds the parts'
commands by module name.
"""
