"""The MQTT collector: consume, decode, store, and only then acknowledge.

Any number of these processes share the load through one MQTT 5 shared
subscription (`$share/<group>/...`). Each keeps a persistent session under a
stable client id, so a collector that dies keeps its queue at the broker and
gets it back when it restarts with the same id.

At-least-once end to end: messages are acknowledged by hand (PUBACK) only
after the transaction holding their readings has committed. A crash between
commit and PUBACK makes the broker deliver the message again; the idempotent
store turns that into a counted duplicate, not a second reading.

A message that cannot be decoded is not left unacknowledged (that would eat
the broker's in-flight window until consumption stops): it becomes a
`Rejected` with its raw bytes and reason, stored in `rejected_reading` with
the batch, and acknowledged like any other.

Messages are gathered into batches (up to `batch_messages`, or whatever came
within `batch_wait` seconds) so that one COPY and one commit serve many.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import paho.mqtt.client as mqtt
import psycopg

from adapters import mqtt_formats as fmt
from adapters.reading import Reading, Rejected
from collector import metrics
from collector.mqtt_client import BrokerConfig, Connection, connect_properties, make_client

log = logging.getLogger("amr.mqtt")


@dataclass(frozen=True, slots=True)
class _Msg:
    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    family: str  # decoded already, on the network thread (see _on_message)
    outcome: str
    items: list[Reading | Rejected]


def shared(group: str, topic_filter: str) -> str:
    return f"$share/{group}/{topic_filter}" if group else topic_filter


class Consumer:
    """One collector process's consumer; `run()` blocks until `stop()`."""

    def __init__(
        self,
        broker: BrokerConfig,
        database_url: str,
        client_id: str,
        group: str = "amr-collectors",
        devices: fmt.DeviceMap | None = None,
        families: Sequence[str] = fmt.FAMILIES,
        settings: object | None = None,
        batch_messages: int = 500,
        batch_wait: float = 0.05,
        receive_maximum: int = 1000,
        local_tz: str = "Europe/Moscow",
        workers: int = 1,
    ):
        self.broker = broker
        self.database_url = database_url
        self.client_id = client_id
        self.group = group
        self.devices = devices or fmt.DeviceMap()
        self.filters = fmt.subscriptions(families)
        self.settings = settings
        self.batch_messages = batch_messages
        self.batch_wait = batch_wait
        self.local_tz = local_tz
        self.receive_maximum = receive_maximum
        self.stored_messages = 0
        self.ingest_seconds = 0.0  # time spent in the ingestion entry point (benchmarks report it)
        self.decode_seconds = 0.0
        self._queue: queue.Queue[_Msg] = queue.Queue()
        self._stop = threading.Event()
        self._generation = 0
        self._started = False
        self._conn_state = Connection()
        self.workers = max(1, workers)
        self._slots: list[tuple[psycopg.Connection, object] | None] = [None] * self.workers
        self._pool = ThreadPoolExecutor(self.workers, "amr-ingest") if self.workers > 1 else None
        self.client = make_client(broker, client_id)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._conn_state.on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # --- network thread ---

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self._subscribe(client, flags, reason_code, properties)
        except Exception:  # an exception here would silently end paho's network thread
            log.exception("subscribing at %s failed", self.broker.describe())

    def _subscribe(self, client, flags, reason_code, properties) -> None:
        self._conn_state.on_connect(client, None, flags, reason_code, properties)
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.broker.describe(), reason_code)
            return
        self._generation += 1
        if flags.session_present:
            # a persistent session keeps old subscriptions (Telegraf#9703): drop the ones we no longer want
            stale = [shared(self.group, f) for f in fmt.subscriptions() if f not in self.filters]
            if stale:
                client.unsubscribe(stale)
        client.subscribe([(shared(self.group, f), 1) for f in self.filters])
        log.info(
            "connected to %s as %s (session %s), %d topic filters in group %s",
            self.broker.describe(), self.client_id,
            "resumed" if flags.session_present else "new", len(self.filters), self.group,
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("broker %s refused subscriptions: %s", self.broker.describe(), ", ".join(failed))
        else:
            log.info("subscribed to %d topic filters in group %s", len(reason_codes), self.group)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        # Decoding here, on paho's network thread, overlaps it with the worker's database
        # round trips; decode() never raises on bad input, and a bug must not end this thread.
        payload = bytes(msg.payload)
        t0 = time.perf_counter()
        try:
            family, outcome, items = self._decode(msg.topic, payload, datetime.now(UTC))
        except Exception as exc:
            log.exception("decoding a message on %s failed", msg.topic)
            family, outcome = "unknown", "rejected"
            items = [Rejected(f"mqtt:{msg.topic}"[:256], payload[: fmt.MAX_RAW_KEPT],
                              f"the decoder failed on this message: {exc!r}", "decode_error")]
        self.decode_seconds += time.perf_counter() - t0
        self._queue.put(_Msg(msg.mid, msg.qos, msg.topic, payload, self._generation, family, outcome, items))

    # --- worker ---

    def start(self) -> None:
        self.client.connect_async(
            self.broker.host, self.broker.port, keepalive=30, clean_start=False,
            properties=connect_properties(persistent=True, receive_maximum=self.receive_maximum),
        )
        self.client.loop_start()
        self._started = True

    def run(self) -> None:
        """Consume until `stop()`; connects first when `start()` was not called."""
        if not self._started:
            self.start()
        try:
            while not self._stop.is_set():
                batch = self._gather()
                if batch:
                    self._handle(batch)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            self._drop_db()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            log.info("collector %s stopped after storing %d messages", self.client_id, self.stored_messages)

    def stop(self) -> None:
        self._stop.set()

    def _gather(self) -> list[_Msg]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_messages:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get_nowait() if left <= 0 else self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _decode(self, topic: str, payload: bytes, received: datetime) -> tuple[str, str, list[Reading | Rejected]]:
        d = fmt.decode(topic, payload, received, local_tz=self.local_tz)
        items = fmt.to_items(d, payload, self.devices)
        readings = sum(type(i) is Reading for i in items)
        if d.ignored is not None:
            outcome = "ignored"
        elif d.values and readings == len(items):
            outcome = "ok"
        elif readings:
            outcome = "partial"
        else:
            outcome = "rejected"
        return d.family or "unknown", outcome, items

    def _handle(self, batch: list[_Msg]) -> None:
        items = [it for m in batch for it in m.items]
        backoff = 0.5
        while True:
            try:
                self._store(batch, items)
                break
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                metrics.DB_ERRORS.inc()
                self._drop_db()
                log.warning("database write failed (%s); %d messages kept unacknowledged, retrying",
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                            len(batch))
                if self._stop.wait(backoff):
                    return  # unacknowledged: the broker delivers them again
                backoff = min(backoff * 2, 30)
        for m in batch:
            metrics.MQTT_MESSAGES.labels(m.family, m.outcome).inc()
            self._ack(m)
        self.stored_messages += len(batch)

    def _store(self, batch: list[_Msg], items: list[Reading | Rejected]) -> None:
        """Store a batch; raises only when the database is unreachable (then nothing is acknowledged)."""
        try:
            self._ingest(items)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except Exception as exc:  # a message the store refuses must not stall the stream
            self._drop_db()
            log.error("batch of %d messages failed (%s); storing message by message", len(batch), exc)
            self._one_by_one(batch)

    def _one_by_one(self, batch: list[_Msg]) -> None:
        for m in batch:
            try:
                self._ingest(m.items)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception as exc:
                self._drop_db()
                self._ingest([Rejected(f"mqtt:{m.topic}"[:256], m.payload[: fmt.MAX_RAW_KEPT],
                                       f"the store refused this message: {exc}", "store_error")])

    def _ack(self, m: _Msg) -> None:
        if m.qos == 0:
            return
        if m.generation != self._generation:
            return  # received on an earlier connection: the broker redelivers it on this one
        self.client.ack(m.mid, m.qos)

    def _ingest(self, items: list[Reading | Rejected]) -> None:
        """Store one batch; with several workers, split by meter so each meter stays in one transaction.

        The parts commit separately: when one fails the batch is not acknowledged and comes
        again, and the parts already stored count as duplicates.
        """
        t0 = time.perf_counter()
        if self._pool is None or len(items) < 2 * self.workers:
            self._ingest_slot(0, items)
        else:
            parts: list[list[Reading | Rejected]] = [[] for _ in range(self.workers)]
            for it in items:
                key = it.meter_id if isinstance(it, Reading) else None
                parts[hash(key) % self.workers if key else 0].append(it)
            futures = [self._pool.submit(self._ingest_slot, i, part) for i, part in enumerate(parts) if part]
            errors = [f.exception() for f in futures]
            failed = [e for e in errors if e is not None]
            if failed:
                raise failed[0]
        self.ingest_seconds += time.perf_counter() - t0

    def _ingest_slot(self, slot: int, items: list[Reading | Rejected]) -> None:
        from collector.ingest import Ingestor
        from collector.storage import db

        held = self._slots[slot]
        if held is None or held[0].closed:
            conn = db.connect(self.database_url)
            held = (conn, Ingestor(conn, self.settings))
            self._slots[slot] = held
        held[1].ingest(items)  # type: ignore[attr-defined]

    def _drop_db(self) -> None:
        for i, held in enumerate(self._slots):
            if held is not None:
                try:
                    held[0].close()
                except Exception:
                    pass
            self._slots[i] = None
