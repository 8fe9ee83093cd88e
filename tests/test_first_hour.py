"""What a new user meets first: how to run `amr` after setup, daemons side by side on one box."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

from tests.conftest import ROOT

EXAMPLES = ROOT / "deploy" / "examples"


def test_bootstrap_says_how_to_run_amr() -> None:
    """Run by hand (the venv is there already, so it installs nothing), it names .venv/bin/amr."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    done = subprocess.run([str(ROOT / "scripts" / "bootstrap")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ".venv/bin/amr" in done.stderr and "source .venv/bin/activate" in done.stderr


def test_each_daemon_example_serves_metrics_on_a_port_of_its_own() -> None:
    """Two daemons on one box with the example files must not fight over one port."""
    ports = {}
    for path in sorted(EXAMPLES.glob("*.env")):
        found = re.findall(r"^AMR_METRICS_PORT=(\d+)$", path.read_text(), re.M)
        if found:
            ports[path.name] = int(found[0])
    assert {"gateway.env", "collector.env", "api.env"} <= set(ports)
    assert len(set(ports.values())) == len(ports), ports


def test_the_api_example_says_which_endpoints_write() -> None:
    text = (EXAMPLES / "api.env").read_text()
    for endpoint in ("readings", "payments", "callback"):
        assert endpoint in text, f"api.env does not say that the {endpoint} endpoint writes"


def test_the_licence_is_an_spdx_expression() -> None:
    """A licence table makes pip warn at every install; an SPDX string does not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
