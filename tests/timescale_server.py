"""The PGlite+TimescaleDB server of tests/timescale (serve.mjs): installed and started.

PostgreSQL 17 with TimescaleDB 2.23 compiled to WASM, served on a TCP port by
tests/timescale/serve.mjs (npm packages pinned in tests/timescale/package-lock.json).
Used by tests/test_timescale.py and bench/storage.py --timescale. One in-memory
database, one client at a time; no COPY FROM STDIN.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVER_DIR = Path(__file__).resolve().parent / "timescale"
START_TIMEOUT_S = 90


class Unavailable(Exception):
    """The server cannot run here: no node or npm, or `npm ci` failed."""


class ServerFailed(Exception):
    """serve.mjs did not start, or did not exit cleanly on SIGTERM."""


def installed() -> bool:
    """node_modules holds exactly the versions package-lock.json pins."""
    try:
        want = json.loads((SERVER_DIR / "package-lock.json").read_text())["packages"]
        have = json.loads((SERVER_DIR / "node_modules" / ".package-lock.json").read_text())["packages"]
    except (OSError, ValueError, KeyError):
        return False
    for path, entry in want.items():
        if not path:
            continue
        got = have.get(path) or {}
        if (got.get("version"), got.get("integrity")) != (entry.get("version"), entry.get("integrity")):
            return False
        if not (SERVER_DIR / path / "package.json").is_file():
            return False
    return True


def install() -> None:
    """`npm ci` the pinned packages unless they are there; Unavailable when that cannot be done."""
    if shutil.which("node") is None:
        raise Unavailable("no `node` on PATH (Node.js 18+ runs the PGlite TimescaleDB server)")
    lock = Path(tempfile.gettempdir()) / "amr-timescale-npm.lock"
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # xdist workers install once, not over each other
        if installed():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise Unavailable("no `npm` on PATH to install tests/timescale/package-lock.json")
        try:
            done = subprocess.run(
                [npm, "ci", "--prefix", str(SERVER_DIR), "--no-audit", "--no-fund",
                 "--fetch-retries=1"],
                capture_output=True, text=True, timeout=600, check=False,
            )
        except subprocess.TimeoutExpired:
            raise Unavailable("`npm ci --prefix tests/timescale` took over 10 minutes") from None
        if done.returncode != 0 or not installed():
            head = "\n".join((done.stderr or done.stdout).strip().splitlines()[:6])
            raise Unavailable(f"`npm ci --prefix tests/timescale` failed (exit {done.returncode}):\n{head}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(log_dir: Path) -> Iterator[str]:
    """Install, start serve.mjs on a free port (its log in log_dir/serve.log), yield its URL,
    stop it with SIGTERM. Unavailable or ServerFailed when it cannot."""
    install()
    port = free_port()
    log = log_dir / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["node", str(SERVER_DIR / "serve.mjs"), str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "ready postgresql://" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ServerFailed(f"serve.mjs did not start (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    try:
        yield f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    finally:
        proc.terminate()
        try:
            code: int | None = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    if code != 0:
        raise ServerFailed(f"serve.mjs did not exit cleanly on SIGTERM (exit {code}):\n{log.read_text()[-3000:]}")
