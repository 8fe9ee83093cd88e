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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import paho.mqtt.client as mqtt

from adapters import mqtt_formats as fmt
from adapters.reading import Rejected
from amr import metrics
from collector.mqtt.client import BrokerConfig, Connection, connect_properties, make_client
from collector.mqtt.decoding import Message, MessageDecoder
from collector.mqtt.workers import (
    IngestPool,
    LocalIngest,
    Outcome,
    check_database,
    describe_database,
    record,
)

log = logging.getLogger("amr.mqtt")


@dataclass(frozen=True, slots=True)
class _Msg:
    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    received: datetime


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
        self._decoder = MessageDecoder(devices, local_tz)
        self.families = tuple(families)
        self.filters = self._decoder.devices.layouts.filters(self.families)  # what the inventory's layouts need
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
        self._store: LocalIngest | IngestPool = (
            IngestPool(database_url, settings, self.workers, self._stop, self._decoder) if self.workers > 1
            else LocalIngest(database_url, settings, self._stop, self._decoder))
        self._max_inflight = 2
        self._prepared = False
        self.client = make_client(broker, client_id)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._conn_state.on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    @property
    def devices(self) -> fmt.DeviceMap:
        return self._decoder.devices

    @devices.setter
    def devices(self, devices: fmt.DeviceMap) -> None:
        """A new device map (SIGHUP): messages stored from now on are decoded with it."""
        self._decoder = MessageDecoder(devices, self.local_tz)
        self._store.set_decoder(self._decoder)
        self._resubscribe(devices.layouts.filters(self.families))

    def _resubscribe(self, filters: list[str]) -> None:
        """Subscribe to the topic filters a new inventory's layouts need, and drop those it no longer does."""
        old, self.filters = self.filters, filters
        if not self._conn_state.up.is_set():
            return  # the next connection subscribes to self.filters
        gone = [shared(self.group, f) for f in old if f not in filters]
        new = [(shared(self.group, f), 1) for f in filters if f not in old]
        if gone:
            self.client.unsubscribe(gone)
        if new:
            self.client.subscribe(new)
        if gone or new:
            log.info("topic filters changed with the inventory: %d added, %d dropped", len(new), len(gone))

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
        # only queued here: decoding happens where the message is stored, in this process's
        # store thread or in the ingestion worker that owns its topic
        self._queue.put(_Msg(msg.mid, msg.qos, msg.topic, bytes(msg.payload), self._generation, datetime.now(UTC)))

    # --- worker ---

    def prepare(self) -> None:
        """Open the store (start the worker processes, connect to the database) before consuming.

        A database that cannot take writes does not stop the collector: it
        says so in one line, shows amr_db_up 0 and joins the broker anyway;
        the messages wait unacknowledged until the database takes them.
        """
        if not self._prepared:
            problem = check_database(self.database_url)
            metrics.DB_UP.set(0 if problem else 1)
            if problem:
                log.warning("database %s cannot take writes (%s): joining the broker anyway; messages stay "
                            "unacknowledged until it can", describe_database(self.database_url), problem)
            self._store.start()
            self._prepared = True

    def start(self) -> None:
        self.prepare()  # workers first: messages would only wait for them
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
        # batches handed to the store and not yet acknowledged, oldest first: while the
        # workers store one, the next is gathered and queued behind it
        inflight: deque[tuple[int, list[_Msg]]] = deque()
        store = self._store
        try:
            while not self._stop.is_set():
                batch = self._gather(0.01 if inflight else 0.2) if len(inflight) < self._max_inflight else []
                if batch:
                    messages = [(i, Message(m.topic, m.payload, m.received)) for i, m in enumerate(batch)]
                    inflight.append((store.submit(messages), batch))
                while inflight and store.ready(inflight[0][0]):
                    ticket, done = inflight.popleft()
                    self._finish(done, store.result(ticket))
                if inflight and len(inflight) >= self._max_inflight:
                    outcome = store.result(inflight[0][0])
                    if outcome is not None:
                        self._finish(inflight.popleft()[1], outcome)
        finally:
            # a clean stop acknowledges what is stored by now; the rest the broker sends again
            for ticket, batch in inflight:
                outcome = store.result(ticket, timeout=5)
                if outcome is None:
                    break
                self._finish(batch, outcome)
            self.client.disconnect()
            self.client.loop_stop()
            store.close()
            log.info("collector %s stopped after storing %d messages", self.client_id, self.stored_messages)

    def stop(self) -> None:
        self._stop.set()

    def _gather(self, timeout: float) -> list[_Msg]:
        try:
            first = self._queue.get(timeout=timeout)
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

    def _finish(self, batch: list[_Msg], outcome: Outcome | None) -> None:
        """Count a stored batch and acknowledge its messages, dead-lettering those the store refused.

        A message is acknowledged only once its readings or its dead-letter row
        are committed. One whose dead-letter row cannot be written either stays
        unacknowledged: the broker delivers it again on the next connection.
        """
        if outcome is None:
            return  # stopped before it was stored: unacknowledged, the broker sends it again
        refused_groups = set(outcome.failed)
        unsaved: dict[int, str] = {}
        if outcome.failed:
            again = self._dead_letter(batch, outcome.failed)
            if again is None:
                return  # stopped while the database was down: nothing of the batch is acknowledged
            unsaved = again.failed
            again.failed = {}
            outcome.failed = {}
            outcome.add(again)
        record(outcome)
        self.ingest_seconds += outcome.seconds
        self.decode_seconds += outcome.decode_seconds
        for g, m in enumerate(batch):
            if g in unsaved:
                continue
            family, result = outcome.labels.get(g, ("unknown", "rejected"))
            metrics.MQTT_MESSAGES.labels(family, "rejected" if g in refused_groups else result).inc()
            self._ack(m)
        self.stored_messages += len(batch) - len(unsaved)

    def _dead_letter(self, batch: list[_Msg], failed: dict[int, str]) -> Outcome | None:
        """Store each refused message as a reject with its raw bytes; what still fails is in `.failed`.

        A reason the store refuses (a NUL byte quoted from the data, say) gets
        a second try with a fixed reason, so only a database refusing even that
        keeps a message back. None when stopped during an outage.
        """
        def rejects(reasons: dict[int, str]) -> list:
            return [(g, [Rejected(f"mqtt:{batch[g].topic}"[:256], batch[g].payload[: fmt.MAX_RAW_KEPT],
                                  reason.replace("\x00", "\\0")[:2000], "store_error")])
                    for g, reason in reasons.items()]

        out = self._store.result(self._store.submit_items(rejects(failed)))
        if out is None or not out.failed:
            return out
        fixed = {g: "the store refused this message, and the reason it gave could not be stored either"
                 for g in out.failed}
        second = self._store.result(self._store.submit_items(rejects(fixed)))
        if second is None:
            return None
        if second.failed:
            log.error("could not dead-letter %d refused messages (%s); they stay unacknowledged and come "
                      "again on the next connection", len(second.failed), "; ".join(second.failed.values())[:500])
        out.failed = {}
        out.add(second)
        return out

    def _ack(self, m: _Msg) -> None:
        if m.qos == 0:
            return
        if m.generation != self._generation:
            return  # received on an earlier connection: the broker redelivers it on this one
        self.client.ack(m.mid, m.qos)
