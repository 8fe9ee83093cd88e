"""Decode and store a collector's messages in one process or in several.

One Python process stores about 50,000 readings/s, bound by its own
interpreter while the database server still has CPU to spare; processes
that store disjoint meters scale almost linearly (two on two cores stored
1.85 times as much as one). What keeps their meters disjoint is the topic: a
gateway publishes its own meters on its own `amr/v1/<source>/readings`, a
device on its own topic. So `IngestPool` routes whole messages by topic
(each new topic to the worker with the fewest) to N worker processes, which
decode them (collector.mqtt.decoding) and store them, each over its own database
connection, its share of a batch in one transaction. The parent only receives and routes: it never becomes the
bottleneck, as it did when it decoded everything itself and routed readings
by meter (measured: the parent alone took more CPU per reading than a worker).
A meter that moves to another gateway is still safe: the per-meter locks of
collector.ingest.ingestor order the two workers.

The parent acknowledges a batch only when every worker has confirmed its
share, so delivery stays at-least-once. A worker that dies is started again
and sent its unconfirmed shares again; what it had already committed comes
back as counted duplicates. A share that kills its worker three times is
handed back as failed, to be dead-lettered. `LocalIngest` is the same
contract in the calling thread, for one worker.

A batch is stored as groups, one per MQTT message: when the store refuses a
batch for anything but an unreachable database, it is stored again group by
group, and the groups it still refuses are handed back (`Outcome.failed`)
for the caller to dead-letter with the message's raw bytes.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import psycopg

from adapters.reading import Reading, Rejected
from amr import metrics
from amr.runtime import tune_gc
from amr.storage import db
from collector.ingest.ingestor import Ingestor, IngestResult, record_metrics
from collector.mqtt.decoding import Message, MessageDecoder

log = logging.getLogger("amr.ingest")

# the items of one message, as (group index in the batch, items)
Group = tuple[int, list[Reading | Rejected]]
Batch = list[tuple[int, Message]]  # the messages of one batch, by group index
_MAX_TOPICS = 1_000_000  # topics remembered with their worker (about 100 bytes each)
_DEATHS_BEFORE_GIVING_UP = 3  # a share that kills its worker this often is dead-lettered


@dataclass
class Outcome(IngestResult):
    """What storing one batch did: the ingestion counts, and the groups the store refused."""

    items: int = 0
    seconds: float = 0.0
    failed: dict[int, str] = field(default_factory=dict)  # group index -> why the store refused it
    labels: dict[int, tuple[str, str]] = field(default_factory=dict)  # group index -> (family, outcome)
    decode_seconds: float = 0.0

    def add(self, other: Outcome) -> None:
        self += other  # the counts, as IngestResult adds them
        self.items += other.items
        self.seconds = max(self.seconds, other.seconds)
        self.failed.update(other.failed)
        self.labels.update(other.labels)
        self.decode_seconds += other.decode_seconds


def is_outage(exc: BaseException) -> bool:
    """True when a failed write says the database cannot take writes now; False when it refuses the data.

    This decides between waiting and dead-lettering, so it errs towards waiting.
    An outage is waited out with the messages unacknowledged: the readings are
    stored once the database takes writes again. A refusal of the data is
    isolated message by message and the refused messages are dead-lettered,
    because waiting would not change the answer. Only what the data itself
    causes is a refusal: PostgreSQL's data exceptions (SQLSTATE class 22, like a
    value out of range or a NUL byte in text), integrity violations (class 23),
    program limits a statement hits (class 54, like an index row too large), and
    a Python exception raised while decoding or validating the items.
    Everything else is the state of the database or of our configuration, which
    a failover or a person fixes, and the readings must still be there then:
    unreachable (OperationalError, InterfaceError), a standby after failover
    (read-only transaction, class 25), a missing privilege or table (class 42),
    a malformed AMR_DATABASE_URL (ProgrammingError from libpq's conninfo
    parser), a full disk, no database configured. Taking one of those for a
    refusal would dead-letter or acknowledge good readings; taking a refusal
    for an outage only stalls, visibly (amr_db_up, amr_db_errors_total, the log).
    """
    if isinstance(exc, psycopg.errors.DataError | psycopg.errors.IntegrityError | psycopg.errors.ProgramLimitExceeded):
        return False
    return isinstance(exc, psycopg.Error | OSError | db.DatabaseNotConfigured)


# how a database is named in log lines (host:port/dbname, never a secret) and libpq's reason with the
# URL's secrets masked: the one definition every daemon uses, re-exported for the collector's callers
describe_database = db.describe_database
safe_reason = db.safe_reason


class _Store:
    """One database connection and its Ingestor, opened on first use and dropped after any failure."""

    def __init__(self, database_url: str, settings: Any):
        self.database_url = database_url
        self.settings = settings
        self._held: tuple[psycopg.Connection, Ingestor] | None = None

    def ingest(self, items: list[Reading | Rejected]) -> IngestResult:
        """Store a batch; an empty one only opens the connection."""
        if self._held is None or self._held[0].closed:
            conn = db.connect(self.database_url)
            self._held = (conn, Ingestor(conn, self.settings, record_metrics=False))
        return self._held[1].ingest(items)

    def describe(self) -> str:
        return describe_database(self.database_url)

    def drop(self) -> None:
        if self._held is not None:
            try:
                self._held[0].close()
            except Exception:
                pass
        self._held = None


def _ingest_waiting(store: _Store, items: list[Reading | Rejected], stopped: Callable[[float], bool],
                    on_db_error: Callable[[str], None]) -> IngestResult | None:
    """Store items, waiting out a database outage (`is_outage`) with back-off; None when stopped.

    A refusal of the data is raised: the caller isolates and dead-letters it.
    The outage is logged once, when it starts, and once more when the
    database takes writes again; every failed attempt is counted.
    """
    backoff = 0.5
    failing = False
    while True:
        try:
            result = store.ingest(items)
        except Exception as exc:
            store.drop()
            if not is_outage(exc):
                metrics.DB_UP.set(1)  # it answered: with a refusal of these items
                raise
            metrics.DB_UP.set(0)
            reason = safe_reason(exc, store.database_url)
            if not failing:
                log.warning("database %s cannot take writes (%s): the messages stay unacknowledged, "
                            "retrying with back-off", store.describe(), reason)
                failing = True
            on_db_error(reason)
            if stopped(backoff):
                return None
            backoff = min(backoff * 2, 30)
            continue
        metrics.DB_UP.set(1)
        if failing:
            log.info("database %s takes writes again", store.describe())
        return result


def store_groups(
    store: _Store, groups: Sequence[Group], stopped: Callable[[float], bool],
    on_db_error: Callable[[str], None],
) -> Outcome | None:
    """Store a batch in one transaction, or group by group when the store refuses it.

    Returns None only when `stopped(wait)` says to give up while the database
    is unreachable: then nothing of the batch may be acknowledged.
    """
    out = Outcome()
    t0 = time.perf_counter()
    try:
        result = _ingest_waiting(store, [it for _, items in groups for it in items], stopped, on_db_error)
        if result is None:
            return None
        out += result
    except Exception as exc:
        log.error("batch of %d messages failed (%s); storing message by message", len(groups), exc)
        for g, items in groups:
            try:
                result = _ingest_waiting(store, items, stopped, on_db_error)
            except Exception as exc_one:
                out.failed[g] = f"the store refused this message: {exc_one}"
                continue
            if result is None:
                return None
            out += result
    out.items = sum(len(items) for _, items in groups)
    out.seconds = time.perf_counter() - t0
    return out


def check_database(url: str, timeout: int = 5) -> str | None:
    """None when the database at `url` would take the collector's writes; else why not, safe to log.

    For the line a daemon writes at start: reachable is not enough, since a
    standby after failover answers but refuses writes, and a role without
    INSERT on `reading` (or a database never migrated) refuses every batch.
    """
    try:
        with psycopg.connect(url, connect_timeout=timeout, autocommit=True) as conn:
            if conn.execute("SHOW transaction_read_only").fetchone()[0] == "on":  # type: ignore[index]
                return "it is read-only: a standby, or default_transaction_read_only is on"
            if not conn.execute("SELECT has_table_privilege('reading', 'INSERT')").fetchone()[0]:  # type: ignore[index]
                return "this role may not INSERT into table reading"
    except Exception as exc:
        return safe_reason(exc, url)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def record(outcome: Outcome) -> None:
    """Count a stored batch in this process's metrics (workers' own registries are not served)."""
    record_metrics(outcome, outcome.items, outcome.seconds)


class LocalIngest:
    """Batches decoded and stored in the calling thread, one at a time."""

    def __init__(self, database_url: str, settings: Any, stop: threading.Event, decoder: MessageDecoder):
        self._store = _Store(database_url, settings)
        self._stop = stop
        self.decoder = decoder
        self._done: dict[int, Outcome | None] = {}
        self._next = 0

    def set_decoder(self, decoder: MessageDecoder) -> None:
        self.decoder = decoder

    def start(self) -> None:
        try:
            self._store.ingest([])
        except Exception:
            self._store.drop()  # the first batch tries again, and waits out the outage

    def submit(self, messages: Batch) -> int:
        return self._keep(store_batch(self._store, self.decoder, messages, self._stop.wait, _count_db_error))

    def submit_items(self, groups: list[Group]) -> int:
        """Store items made already (the rejects the caller dead-letters)."""
        return self._keep(store_groups(self._store, groups, self._stop.wait, _count_db_error))

    def _keep(self, outcome: Outcome | None) -> int:
        ticket = self._next
        self._next += 1
        self._done[ticket] = outcome
        return ticket

    def ready(self, ticket: int) -> bool:
        return True

    def result(self, ticket: int, timeout: float | None = None) -> Outcome | None:
        """The outcome, or None when stopped before the batch was stored."""
        return self._done.pop(ticket)

    def close(self) -> None:
        self._store.drop()


def _count_db_error(reason: str) -> None:
    metrics.DB_ERRORS.inc()  # _ingest_waiting logged the outage when it began


def decode_batch(decoder: MessageDecoder, messages: Batch) -> tuple[list[Group], dict[int, tuple[str, str]], float]:
    """Groups to store, each message's (family, outcome) for the metrics, and the seconds it took."""
    t0 = time.perf_counter()
    groups: list[Group] = []
    labels: dict[int, tuple[str, str]] = {}
    for g, m in messages:
        d = decoder(m)
        groups.append((g, d.items))
        labels[g] = (d.family, d.outcome)
    return groups, labels, time.perf_counter() - t0


def store_batch(store: _Store, decoder: MessageDecoder, messages: Batch, stopped: Callable[[float], bool],
                on_db_error: Callable[[str], None]) -> Outcome | None:
    groups, labels, seconds = decode_batch(decoder, messages)
    outcome = store_groups(store, groups, stopped, on_db_error)
    if outcome is not None:
        outcome.labels = labels
        outcome.decode_seconds = seconds
    return outcome


# --- worker processes ---


def _worker_main(index: int, parent: int) -> None:
    """A worker process: take shares, store them, confirm each; ends with its parent.

    Started by `_Worker.spawn` as `python -m collector.mqtt.workers INDEX PARENT_PID`:
    requests arrive on stdin, replies leave on stdout, the log goes to stderr.
    """
    import signal

    from amr import logs

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    requests = Connection(os.dup(0), writable=False)
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a stray print must not corrupt the replies
    logs.setup()
    tune_gc()
    try:
        database_url, settings, decoder = requests.recv()
    except EOFError:
        return
    store = _Store(database_url, settings)
    try:
        store.ingest([])  # connect now, so the first batch does not wait for it
    except Exception as exc:  # the first batch tries again, and waits out the outage
        store.drop()  # the collector said so at start (check_database)
        log.debug("ingestion worker %d: database %s not usable yet (%s)", index, store.describe(),
                  safe_reason(exc, database_url))

    def stopped(seconds: float) -> bool:
        time.sleep(seconds)
        return os.getppid() != parent  # the parent died: nobody would acknowledge

    def db_error(reason: str) -> None:
        replies.send(("db_error", reason))  # _ingest_waiting logged the outage when it began

    try:
        replies.send(("ready",))
        while True:
            try:
                msg = requests.recv()
            except EOFError:
                return  # the parent is gone
            if msg is None:
                return
            kind, ticket, body = msg
            if kind == "decoder":  # the inventory was reloaded
                decoder = body
                continue
            if kind == "messages":
                outcome = store_batch(store, decoder, body, stopped, db_error)
            else:  # "items": rejects the parent dead-letters
                outcome = store_groups(store, body, stopped, db_error)
            if outcome is None:
                return
            replies.send(("done", ticket, outcome))
    except (BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        store.drop()


class _Worker:
    """The parent's handle on one worker process and the shares it has not confirmed."""

    def __init__(self, index: int, database_url: str, settings: Any, decoder: MessageDecoder):
        self.index = index
        self.database_url = database_url
        self.settings = settings
        self.decoder = decoder
        self.unconfirmed: dict[int, tuple] = {}  # ticket -> request, in submission order
        self.deaths: dict[int, int] = {}  # ticket -> times this worker died holding it
        self.spawn()

    def spawn(self) -> None:
        # a fresh interpreter, not a fork: the parent runs paho's network thread, and
        # multiprocessing's spawn would import the parent's __main__ again
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "collector.mqtt.workers", str(self.index), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        requests = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.replies = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.ready = False
        self.dead = False
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._outbox.put((self.database_url, self.settings, self.decoder))
        # a share of a large batch is bigger than a pipe's buffer: sending it from a thread
        # of its own keeps the consumer free while the worker is still busy with the last one
        self._sender = threading.Thread(target=self._send_loop, args=(requests, self._outbox),
                                        name=f"amr-ingest-send-{self.index}", daemon=True)
        self._sender.start()

    @staticmethod
    def _send_loop(conn: Connection, outbox: queue.Queue[Any]) -> None:
        try:
            while True:
                msg = outbox.get()
                if msg is None:
                    return
                conn.send(msg)
        except (BrokenPipeError, OSError):
            pass  # the worker died: the pool starts a new one and sends again
        finally:
            conn.close()

    def send(self, request: tuple) -> None:
        """A ("messages" or "items", ticket, body) request, kept until the worker confirms it."""
        self.unconfirmed[request[1]] = request
        self._outbox.put(request)

    def set_decoder(self, decoder: MessageDecoder) -> None:
        self.decoder = decoder  # a restarted worker starts with it
        self._outbox.put(("decoder", None, decoder))

    def _end(self, timeout: float) -> None:
        self._outbox.put(None)  # the sender closes the requests pipe: the worker sees EOF
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.replies.close()

    def restart(self) -> None:
        self._end(1)
        self.spawn()
        for request in self.unconfirmed.values():
            self._outbox.put(request)

    def close(self, timeout: float) -> None:
        self._end(timeout)


class IngestPool:
    """Batches decoded and stored by N worker processes, each owning the topics handed to it."""

    def __init__(self, database_url: str, settings: Any, workers: int, stop: threading.Event,
                 decoder: MessageDecoder):
        self.decoder = decoder
        if workers < 2:
            raise ValueError("an IngestPool needs at least 2 workers; use LocalIngest for one")
        self.database_url = database_url
        self.settings = settings
        self.size = workers
        self._stop = stop
        self._workers: list[_Worker] = []
        self._next = 0
        self._waiting: dict[int, set[int]] = {}  # ticket -> workers still to confirm it
        self._outcomes: dict[int, Outcome] = {}
        self._owner: dict[str, int] = {}  # topic -> worker, for as long as this collector runs
        self._owned = [0] * workers
        self.restarts = 0

    def start(self, timeout: float = 60) -> None:
        """Start the workers and wait until each has imported and connected (or given up connecting)."""
        self._workers = [_Worker(i, self.database_url, self.settings, self.decoder) for i in range(self.size)]
        deadline = time.monotonic() + timeout
        while any(not w.ready for w in self._workers) and time.monotonic() < deadline:
            self._collect(0.1)

    def set_decoder(self, decoder: MessageDecoder) -> None:
        """A new device map for every worker, taking effect from the next batch each receives."""
        self.decoder = decoder
        for w in self._workers:
            w.set_decoder(decoder)

    def submit(self, messages: Batch) -> int:
        """Route every message to the worker of its topic; returns a ticket for `result`."""
        parts: list[Batch] = [[] for _ in range(self.size)]
        owner = self._owner
        for g, m in messages:
            w = owner.get(m.topic)
            if w is None:
                w = self._assign(m.topic)
            parts[w].append((g, m))
        return self._send("messages", parts)

    def _assign(self, topic: str) -> int:
        """A new topic goes to the worker with the fewest: a hash would leave a small fleet lopsided
        (four gateways on two workers all on one a time in eight). Past _MAX_TOPICS, by hash."""
        if len(self._owner) >= _MAX_TOPICS:
            return hash(topic) % self.size
        w = min(range(self.size), key=self._owned.__getitem__)
        self._owner[topic] = w
        self._owned[w] += 1
        return w

    def submit_items(self, groups: list[Group]) -> int:
        """Store items made already (the rejects the caller dead-letters), by the first worker."""
        return self._send("items", [groups] + [[] for _ in range(self.size - 1)])

    def _send(self, kind: str, parts: list[Any]) -> int:
        ticket = self._next
        self._next += 1
        self._outcomes[ticket] = Outcome()
        self._waiting[ticket] = set()
        for w, part in enumerate(parts):
            if part:
                self._waiting[ticket].add(w)
                self._workers[w].send((kind, ticket, part))
        return ticket

    def ready(self, ticket: int) -> bool:
        self._collect(0)
        return not self._waiting.get(ticket)

    def result(self, ticket: int, timeout: float | None = None) -> Outcome | None:
        """Wait until every share of the ticket is stored.

        None when stopped first, or, with a timeout (for a clean stop), when
        the time is up.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._waiting.get(ticket):
            if (self._stop.is_set() if deadline is None else time.monotonic() > deadline):
                return None
            self._collect(0.2)
        self._waiting.pop(ticket, None)
        return self._outcomes.pop(ticket)

    def _collect(self, timeout: float) -> None:
        """Read what the workers confirmed; start again any that died (its replies pipe ends)."""
        by_conn = {w.replies: w for w in self._workers}
        for ready in wait(list(by_conn), timeout):
            w = by_conn[ready]  # type: ignore[index]
            while not w.dead and w.replies.poll():
                self._read(w)
            if w.dead:
                self._restart(w)

    def _read(self, w: _Worker) -> None:
        try:
            msg = w.replies.recv()
        except (EOFError, OSError):
            w.dead = True
            return
        if msg[0] == "ready":
            w.ready = True
        elif msg[0] == "db_error":
            metrics.DB_ERRORS.inc()
            metrics.DB_UP.set(0)
        else:
            _, ticket, outcome = msg
            metrics.DB_UP.set(1)
            w.unconfirmed.pop(ticket, None)
            w.deaths.pop(ticket, None)
            self._outcomes[ticket].add(outcome)
            self._waiting[ticket].discard(w.index)

    def _restart(self, w: _Worker) -> None:
        self.restarts += 1
        metrics.INGEST_WORKER_RESTARTS.inc()
        try:
            code = w.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None  # it closed its replies but lives on: restart() ends it
        log.error("ingestion worker %d (pid %s) ended (exit code %s); starting it again and resending "
                  "%d unconfirmed batches", w.index, w.process.pid, code, len(w.unconfirmed))
        if not w.ready:
            # it never started (a broken install, no memory): not the shares' fault, and
            # nothing is gained by starting it again at once
            time.sleep(1)
            w.restart()
            return
        for ticket in list(w.unconfirmed):
            w.deaths[ticket] = deaths = w.deaths.get(ticket, 0) + 1
            if deaths >= _DEATHS_BEFORE_GIVING_UP:  # the share itself kills it: give its messages up
                request = w.unconfirmed.pop(ticket)
                del w.deaths[ticket]
                for g, _ in request[2]:
                    self._outcomes[ticket].failed[g] = (
                        f"the ingestion worker died {_DEATHS_BEFORE_GIVING_UP} times storing this message")
                self._waiting[ticket].discard(w.index)
        w.restart()

    def close(self, timeout: float = 10) -> None:
        for w in self._workers:
            w.close(timeout)
        self._workers = []


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: what a worker pickles must name
    # classes the parent knows (collector.mqtt.workers.Outcome, not __main__.Outcome)
    from collector.mqtt import workers as ingest_workers

    ingest_workers._worker_main(int(sys.argv[1]), int(sys.argv[2]))
