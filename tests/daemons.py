"""A daemon under test as a real process: its log in a file, waited on, signalled, stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT


class Daemon:
    """A unit's command as a process, its log in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
        self.log = log
        self.proc = subprocess.Popen(argv, env={**base, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text()

    def until(self, check: Callable[[], object], what: str, timeout: float = 30) -> object:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the daemon exited ({self.proc.returncode}) waiting for {what}:\n" \
                + self.text()
            got = check()
            if got:
                return got
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text()}"
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)
        time.sleep(0.3)
        assert self.proc.poll() is None, f"{sig.name} ended the daemon ({self.proc.returncode}):\n{self.text()}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.text()
