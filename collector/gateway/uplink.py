"""Drain the gateway's spool upstream, in order, in bounded batches.

Two destinations share one loop:

- `MqttForwarder` publishes each batch as one `amr/v1` message with QoS 1;
  the batch leaves the spool only on a PUBACK whose reason code is Success.
  Any PUBACK is not delivery: a broker with no subscriber for the topic
  answers 16 "No matching subscribers" and has dropped the message (Mosquitto
  does this after a restart until the collectors subscribe again, although
  their sessions are persistent), and codes from 0x80 up are refusals;
- `IngestForwarder` (the all-in-one deployment) hands the batch to
  `collector.ingest.ingestor.Ingestor`; it leaves the spool only after COMMIT.

A failed batch stays at the head of the spool and is retried with a capped
exponential back-off, so order is kept and an outage drains as fast as the
destination accepts, not as slowly as it lasted. Each refusal is counted in
amr_uplink_refused_total{reason} with a reason from `REFUSAL_REASONS`, never
a broker's own text; the log says it once when an outage begins (and when
its reason changes) and once when delivery resumes. A crash between delivery
and `ack()` repeats a batch; the idempotent store makes that harmless.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from adapters.reading import Reading, Rejected
from adapters.wire import amr_v1_payload, amr_v1_payload_encoded, default_topic, encode_item
from amr import metrics
from amr.settings import Settings
from collector.gateway.spool import Spool, SpoolEntry
from collector.mqtt.client import BrokerConfig, Connection, make_client

log = logging.getLogger(__name__)

# the values of amr_uplink_refused_total's `reason` label: a fixed set, whatever a broker answers
REFUSAL_REASONS = ("no_subscribers", "error", "timeout", "not_connected", "db_unavailable")
_NO_MATCHING_SUBSCRIBERS = 16


class UplinkError(RuntimeError):
    """The destination did not take a batch; it stays in the spool.

    `reason` is one of REFUSAL_REASONS (the metric label); the message says
    the rest for a person.
    """

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason if reason in REFUSAL_REASONS else "error"


def _refused(message: str, reason: str) -> UplinkError:
    err = UplinkError(message, reason)
    metrics.UPLINK_REFUSED.labels(err.reason).inc()
    return err


class Forwarder(Protocol):
    def send(self, items: Sequence[Reading | Rejected]) -> None:
        """Deliver items or raise; returning means the destination has them for good."""
        ...

    def close(self) -> None: ...


class MqttForwarder:
    """Publish batches with QoS 1 and wait for each PUBACK; only reason code 0 is delivery."""

    def __init__(
        self,
        broker: BrokerConfig,
        topic: str | None = None,
        client_id: str | None = None,
        timeout: float = 10.0,
        source: str | None = None,
    ):
        # by default the broker user names the topic, so an ACL `pattern write amr/v1/%u/readings` fits
        self.topic = topic or default_topic(broker.username)
        if source:
            self.source = source
        elif self.topic.startswith("amr/v1/") and self.topic.count("/") >= 3:
            self.source = self.topic.split("/")[2]
        else:
            self.source = "gateway"
        self.timeout = timeout
        self.broker = broker
        self.conn = Connection()
        self.client = make_client(broker, client_id or f"amr-uplink-{socket.gethostname()}-{os.getpid()}")
        self.client.on_connect = self.conn.on_connect
        self.client.on_disconnect = self.conn.on_disconnect
        # paho marks a message published on any PUBACK; the reason code comes only to on_publish
        # (called before the message counts as published), so it is kept here by mid
        self._pubacks: dict[int, Any] = {}
        self.client.on_publish = self._on_publish
        self.client.max_queued_messages_set(0)
        self.client.connect_async(broker.host, broker.port, keepalive=30, clean_start=True)
        self.client.loop_start()

    def send(self, items: Sequence[Reading | Rejected]) -> None:
        self._publish(amr_v1_payload(items, self.source))

    def send_encoded(self, texts: Sequence[str]) -> None:
        """The spool's stored text as it is: the fast path of `Uplink`."""
        self._publish(amr_v1_payload_encoded(texts, self.source))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._pubacks[mid] = reason_code

    def _publish(self, payload: bytes) -> None:
        where = self.broker.describe()
        if not self.conn.up.wait(self.timeout):
            raise _refused(f"broker {where} not connected ({self.conn.last_error or 'connecting'})", "not_connected")
        t0 = time.monotonic()
        info = self.client.publish(self.topic, payload, qos=1)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            reason = "not_connected" if not self.client.is_connected() else "error"
            raise _refused(f"publish to {where} failed: {exc}", reason) from None
        if not info.is_published():
            raise _refused(f"no PUBACK from {where} within {self.timeout}s", "timeout")
        code = self._pubacks.pop(info.mid, None)
        value = getattr(code, "value", None)
        if value != 0:
            if value == _NO_MATCHING_SUBSCRIBERS:
                raise _refused(f"broker {where} has no subscriber for {self.topic} (PUBACK 16, No matching "
                               "subscribers: the collectors are not subscribed, it dropped the batch)",
                               "no_subscribers")
            raise _refused(f"broker {where} refused the batch on {self.topic} (PUBACK {value}, {code})", "error")
        metrics.UPLINK_PUBLISH_SECONDS.observe(time.monotonic() - t0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class IngestForwarder:
    """Hand batches to the ingestion entry point; delivered means committed.

    A database that cannot take writes (`collector.mqtt.workers.is_outage`:
    unreachable, read-only, no privilege, a malformed URL) keeps the batch in
    the spool and shows amr_db_up 0. A batch the store refuses for its data
    is stored again item by item, and an item refused alone becomes a reject
    with its own text (code store_error), so one bad reading never holds the
    spool behind it.
    """

    def __init__(self, database_url: str, settings: Settings | None = None):
        self.database_url = database_url
        self.settings = settings
        self._conn: Any = None
        self._ingestor: Any = None

    def send(self, items: Sequence[Reading | Rejected]) -> None:
        from collector.mqtt.workers import is_outage

        try:
            self._ingest(items)  # commits
        except Exception as exc:
            self._drop()
            if is_outage(exc):
                raise self._unavailable(exc) from None
            metrics.DB_UP.set(1)  # it answered, refusing something in the batch
            log.error("uplink: the database refused a batch of %d (%s); storing it item by item",
                      len(items), self._why(exc))
            self._one_by_one(items)
            return
        metrics.DB_UP.set(1)

    def _ingest(self, items: Sequence[Reading | Rejected]) -> None:
        from amr.storage import db
        from collector.ingest.ingestor import Ingestor

        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database_url)
            self._ingestor = Ingestor(self._conn, self.settings)
        self._ingestor.ingest(list(items))

    def _one_by_one(self, items: Sequence[Reading | Rejected]) -> None:
        from collector.mqtt.workers import is_outage

        for it in items:
            try:
                self._ingest([it])
                continue
            except Exception as exc:
                self._drop()
                if is_outage(exc):
                    raise self._unavailable(exc) from None
                why = self._why(exc)
            raw = encode_item(it).encode()
            dead = Rejected(it.source or "spool", raw, f"the store refused this item: {why}"[:2000],
                            "store_error", it.meter_id, it.register, it.ts)
            try:
                self._ingest([dead])
            except Exception as exc:  # even the reject: keep the batch, say why, retry later
                self._drop()
                if is_outage(exc):
                    raise self._unavailable(exc) from None
                raise _refused(f"database {self._where()} refused an item and its reject ({self._why(exc)})",
                               "db_unavailable") from None

    def _where(self) -> str:
        from collector.mqtt.workers import describe_database

        return describe_database(self.database_url)

    def _why(self, exc: BaseException) -> str:
        from collector.mqtt.workers import safe_reason

        return safe_reason(exc, self.database_url)

    def _unavailable(self, exc: BaseException) -> UplinkError:
        metrics.DB_ERRORS.inc()
        metrics.DB_UP.set(0)
        return _refused(f"database {self._where()} cannot take writes ({self._why(exc)})", "db_unavailable")

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Uplink:
    """The loop from spool to destination; run it in its own thread with `start()`."""

    def __init__(
        self,
        spool: Spool,
        forwarder: Forwarder,
        batch_size: int = 500,
        max_backoff: float = 30.0,
        idle_wait: float = 0.2,
    ):
        self.spool = spool
        self.forwarder = forwarder
        self.batch_size = batch_size
        self.max_backoff = max_backoff
        self.idle_wait = idle_wait
        self.delivered = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def notify(self) -> None:
        """Tell the loop there is something new (the gateway calls this after `put`)."""
        self._wake.set()

    def drain_once(self) -> int:
        """Deliver at most one batch; returns how many left the spool. Raises on failure."""
        send_encoded = getattr(self.forwarder, "send_encoded", None)
        if send_encoded is not None:  # publish the stored text as it is
            rows = self.spool.peek_encoded(self.batch_size)
            if not rows:
                return 0
            send_encoded([text for _, text in rows])
            ids = [i for i, _ in rows]
        else:
            entries: list[SpoolEntry] = self.spool.peek(self.batch_size)
            if not entries:
                return 0
            self.forwarder.send([e.item for e in entries])  # readings carry `spooled` from the spool
            ids = [e.id for e in entries]
        self.spool.ack(ids)
        self.delivered += len(ids)
        return len(ids)

    def run(self) -> None:
        backoff = 0.5
        failing: str | None = None  # the reason of the outage under way
        while not self._stop.is_set():
            try:
                n = self.drain_once()
            except Exception as exc:
                reason = exc.reason if isinstance(exc, UplinkError) else type(exc).__name__
                if reason != failing:  # once per outage, and again only when its reason changes
                    log.warning("uplink: %s; %d readings wait in the spool, retrying with back-off",
                                exc, len(self.spool), extra={"reason": reason})
                failing = reason
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if failing:
                log.info("uplink: delivering again; %d readings wait in the spool", len(self.spool))
                failing = None
            backoff = 0.5
            if n == 0:
                self._wake.wait(self.idle_wait)
                self._wake.clear()

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="amr-uplink", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.forwarder.close()
