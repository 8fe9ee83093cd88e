"""The /metrics endpoint of every long-running `amr` process (gateway, collector, API).

Call `serve_metrics()` once at start-up. It serves the default registry
(every metric of amr.metrics plus the process collectors) on
AMR_METRICS_PORT, and, when the process has a database, refreshes the
fleet-wide gauges that no single poll can know (amr_meters_stale, amr_db_up)
in a background thread, so a dead database shows up on the dashboard even
when nothing is being written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from amr import metrics
from amr.errors import UserError
from amr.settings import Settings, get_settings

log = logging.getLogger("amr.metrics")


@dataclass
class MetricsEndpoint:
    """A running /metrics server; `port` is the one bound (useful when asked for 0 = any)."""

    port: int
    addr: str
    _server: Any = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _refresher: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("", "0.0.0.0", "::") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._refresher is not None:
            self._refresher.join(timeout=5)


class DatabaseState:
    """amr_db_up and the log line that goes with it, for every part of a process that talks to the database.

    The gauge follows every report; the log says "database unreachable"
    once, when the state changes (not once a probe or a request, which would
    bury the line that matters), naming the database as host:port/dbname
    and libpq's reason with the URL's secrets masked, and says so again
    when the database is back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up: dict[str, bool] = {}

    def report(self, db_url: str, up: bool, reason: str | None = None) -> bool:
        """Record one outcome; True when it changed the state (and was logged)."""
        from amr.storage.db import describe_database

        metrics.DB_UP.set(1 if up else 0)
        target = describe_database(db_url)
        with self._lock:
            before = self._up.get(target)
            self._up[target] = up
        if before is up:
            return False
        if up:
            log.info("database %s %s", target, "reachable" if before is None else "reachable again",
                     extra={"database": target})
        else:
            log.warning("database unreachable: %s: %s", target, reason or "no reason given",
                        extra={"database": target})
        return True

    def failed(self, db_url: str, exc: BaseException) -> bool:
        """`report(down)` with the reason taken from the exception, secrets masked."""
        from amr.storage.db import safe_reason

        return self.report(db_url, False, safe_reason(exc, db_url))


DB_STATE = DatabaseState()


def refresh_fleet_gauges(db_url: str, *, connect_timeout: int = 5,
                         stale: Callable[[Any], Sized] | None = None) -> int | None:
    """One refresh of amr_db_up (and amr_meters_stale); returns the stale count or None.

    `stale(conn)` is the fleet's query for meters not heard from (the
    collector's, handed down by the daemon: this floor knows no meters); its
    count goes to amr_meters_stale. The database is up when a connection opens
    and answers; a query refused after that (a read-only role that may not
    read `meter`) is no outage.
    """
    import psycopg

    from amr.storage import db

    try:
        conn = db.connect(db_url, connect_timeout=connect_timeout, autocommit=True)
    except Exception as exc:  # the database being down is exactly what this reports
        DB_STATE.failed(db_url, exc)
        return None
    with conn:
        try:
            if stale is None:
                conn.execute("SELECT 1")
                DB_STATE.report(db_url, True)
                return None
            found = stale(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # lost on the way
            DB_STATE.failed(db_url, exc)
            return None
        except psycopg.Error as exc:
            DB_STATE.report(db_url, True)
            log.warning("cannot count stale meters: %s", db.safe_reason(exc, db_url))
            return None
    DB_STATE.report(db_url, True)
    metrics.METERS_STALE.set(len(found))
    return len(found)


def serve_metrics(
    settings: Settings | None = None, *, port: int | None = None, addr: str = "0.0.0.0",
    db_url: str | None = None, refresh_every: float | None = None,
    stale: Callable[[Any], Sized] | None = None,
) -> MetricsEndpoint | None:
    """Start the /metrics endpoint; None when AMR_METRICS_PORT is 0 (disabled).

    `db_url`: refresh amr_db_up and amr_meters_stale from this database every
    `refresh_every` seconds (default AMR_METRICS_REFRESH_S; a gateway without
    a database passes nothing); `stale`, the query for meters not heard from,
    also refreshes amr_meters_stale (without it only the database's answer is
    checked: the API, whose read-only role sees views, not meters).
    The first check runs at once, so a daemon says at start whether its
    database is there.
    A port already taken is a configuration error and says which variable
    to change.
    """
    settings = settings or get_settings()
    wanted = settings.metrics_port if port is None else port
    if wanted is None or wanted < 0 or (wanted == 0 and port is None):
        log.info("metrics endpoint disabled (AMR_METRICS_PORT=0)")
        return None
    try:
        server, thread = start_http_server(wanted, addr=addr)
    except OSError as exc:
        raise UserError(
            f"cannot serve /metrics on {addr}:{wanted}: {exc.strerror or exc}; "
            "set AMR_METRICS_PORT to a free port, or 0 to disable the endpoint"
        ) from None
    endpoint = MetricsEndpoint(port=server.server_address[1], addr=addr, _server=server, _thread=thread)
    log.info("serving metrics on %s", endpoint.url, extra={"port": endpoint.port})
    if db_url:
        every = refresh_every if refresh_every is not None else settings.metrics_refresh_s

        def loop() -> None:
            while not endpoint._stop.is_set():
                refresh_fleet_gauges(db_url, stale=stale)
                endpoint._stop.wait(every)

        endpoint._refresher = threading.Thread(target=loop, name="amr-fleet-gauges", daemon=True)
        endpoint._refresher.start()
    return endpoint


def write_textfile(settings: Settings | None = None) -> Path | None:
    """For one-shot commands (`amr bill`): write this process's amr_ metrics to AMR_METRICS_TEXTFILE.

    node_exporter's textfile collector serves the file, so a monthly run
    that lives for seconds still reaches Prometheus (and its alerts). Only
    amr_ series are written: node_exporter has process metrics of its own.
    The file is replaced atomically.
    """
    settings = settings or get_settings()
    path = settings.metrics_textfile
    if path is None:
        return None
    from prometheus_client import REGISTRY, write_to_textfile

    names = [n for n in metrics.exported_names() if n.startswith("amr_")]
    try:
        write_to_textfile(str(path), REGISTRY.restricted_registry(names))
    except OSError as exc:
        log.error("cannot write metrics to %s: %s", path, exc.strerror or exc)
        return None
    return Path(path)
