"""`amr api` through a database outage and a restart, on a PostgreSQL of the test's own.

The API runs as a real process (the command its unit runs) against a
PostgreSQL this test stops and starts. While it is down every request answers
503 with the API's JSON error within a second, /metrics shows amr_db_up 0,
and the log says so in one line naming host, port and database, never the
password; when it is back, requests succeed again by themselves; and a
restart under a warm pool (several connections, all stale afterwards) costs
no request.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, free_port
from tests.own_postgres import own_postgres  # noqa: F401  (the fixture)
from tests.test_billing import add_subscriber

PW = "Outage-pw-7731"
TOKEN = "outage-token"


class Api:
    """`amr api` as a process, its log in a file."""

    def __init__(self, db_url: str, workdir: Path, *, metrics_port: int):
        tokens = workdir / "tokens.toml"
        tokens.write_text(f'[[token]]\ntoken = "{TOKEN}"\naccounts = ["123"]\n')
        self.port = free_port()
        self.metrics_port = metrics_port
        self.log = workdir / "api.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMR_", "PG"))}
        env |= {"AMR_DATABASE_URL": db_url, "AMR_API_TOKENS": str(tokens), "AMR_METRICS_PORT": str(metrics_port),
                "AMR_METRICS_REFRESH_S": "0.5", "AMR_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amr.cli", "api", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30,
                                   headers={"Authorization": f"Bearer {TOKEN}"})
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.text()
            try:
                self.client.get("/openapi.json")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, self.text()
                time.sleep(0.1)

    def get(self, _: object = None) -> tuple[int, float, httpx.Response]:
        t0 = time.monotonic()
        r = self.client.get("/accounts/123")
        return r.status_code, time.monotonic() - t0, r

    def burst(self, n: int = 48, threads: int = 16) -> list[int]:
        """Concurrent requests: the pool grows to several connections."""
        with ThreadPoolExecutor(threads) as pool:
            return [status for status, _, _ in pool.map(self.get, range(n))]

    def db_up(self) -> float | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.TransportError:
            return None
        m = re.search(r"^amr_db_up (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def text(self) -> str:
        return self.log.read_text()

    def close(self) -> str:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        return self.text()


def _until(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def api(own_postgres, tmp_path):  # noqa: F811
    url = own_postgres.create_database("amr")
    with psycopg.connect(url) as conn:
        add_subscriber(conn, "123", "single")
        conn.commit()
    a = Api(own_postgres.url("amr", password=PW), tmp_path, metrics_port=free_port())
    yield own_postgres, a
    a.close()


def test_database_down_503_json_within_a_second_then_recovers(api) -> None:
    pg, a = api
    assert set(a.burst()) == {200}
    _until(lambda: a.db_up() == 1.0, "amr_db_up 1")

    pg.stop()
    for _ in range(6):
        status, elapsed, r = a.get()
        assert status == 503, r.text
        assert r.json() == {"code": "database_unavailable", "message": r.json()["message"]}
        assert r.json()["message"] and r.headers["content-type"].startswith("application/json")
        assert r.headers.get("retry-after")
        assert elapsed < 1.0, elapsed
    _until(lambda: a.db_up() == 0.0, "amr_db_up 0")
    # the other routes say the same (a bill, a day range)
    for path in ("/accounts/123/bills", "/accounts/123/consumption/daily"):
        r = a.client.get(path)
        assert (r.status_code, r.json()["code"]) == (503, "database_unavailable")
    said = [line for line in a.text().splitlines() if "database unreachable" in line]
    assert len(said) == 1, a.text()
    assert f"127.0.0.1:{pg.port}/amr" in said[0]

    pg.start()
    _until(lambda: a.get()[0] == 200, "a request to succeed after the database is back")
    _until(lambda: a.db_up() == 1.0, "amr_db_up 1 again")
    assert set(a.burst()) == {200}
    log = a.close()
    assert PW not in log
    assert "postgresql://" not in log  # the database is named, the URL never printed
    assert "Traceback" not in log


def test_a_restart_under_a_warm_pool_costs_no_request(api) -> None:
    pg, a = api
    assert set(a.burst()) == {200}
    with psycopg.connect(pg.url("postgres")) as c:
        pooled = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'amr'").fetchone()[0]
    assert pooled >= 3, "the pool should hold several connections before the restart"
    for round_ in range(2):
        pg.stop()
        pg.start()  # every pooled connection is now stale
        if round_ == 0:
            results = [a.get() for _ in range(13)]  # one after another
        else:
            with ThreadPoolExecutor(16) as pool:  # all at once
                results = list(pool.map(a.get, range(32)))
        failed = [(s, r.text) for s, _, r in results if s != 200]
        assert failed == [], failed
        assert set(a.burst()) == {200}  # warm again for the next round
    log = a.close()
    assert PW not in log and "Traceback" not in log
