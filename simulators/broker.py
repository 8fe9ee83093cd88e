"""A Mosquitto of one's own on a free local port, for the demo (and anything else that needs a broker).

The demo uses a broker that answers; when none does, it starts this one, so
the MQTT meter takes part on a bare machine as it does in the tests. When
the `mosquitto` binary is not installed, `mosquitto_binary()` says None and
the caller explains why MQTT was left out.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_binary() -> str | None:
    """The mosquitto executable: on the PATH, or where Debian and Homebrew put it; None if absent."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).is_file() and os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections there (a broker, as far as a quick check can tell)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalBroker:
    """Mosquitto on 127.0.0.1 at a free port, anonymous, its configuration in WORKDIR; `stop()` ends it.

    With `persistent`, sessions and queues are kept in WORKDIR across
    `stop()` and `start()` (for tests of a broker restart).
    """

    def __init__(self, workdir: Path, binary: str | None = None, persistent: bool = False):
        found = binary or mosquitto_binary()
        if found is None:
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.binary = found
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dir = workdir
        self.conf = workdir / "mosquitto.conf"
        text = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        if persistent:
            text += (f"persistence true\npersistence_location {workdir}/\n"
                     "max_queued_messages 0\nmax_inflight_messages 0\n")
            if os.geteuid() == 0:  # as root, mosquitto switches to its own user and cannot write WORKDIR
                text += "user root\n"
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10) -> LocalBroker:
        """Start it and wait until it accepts connections; RuntimeError (with its exit) if it does not."""
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start (status {code}) with {self.conf}")
            if answers(self.host, self.port, 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on {self.host}:{self.port} within {timeout} s")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its sessions and queues), then wait for it."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
