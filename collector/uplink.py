"""Drain the gateway's spool upstream, in order, in bounded batches.

Two destinations share one loop:

- `MqttForwarder` publishes each batch as one `amr/v1` message with QoS 1;
  the batch leaves the spool only when the broker's PUBACK arrived;
- `IngestForwarder` (the all-in-one deployment) hands the batch to
  `collector.ingest.Ingestor`; it leaves the spool only after COMMIT.

A failed batch stays at the head of the spool and is retried with a capped
exponential back-off, so order is kept and an outage drains as fast as the
destination accepts, not as slowly as it lasted. A crash between delivery and
`ack()` repeats a batch; the idempotent store makes that harmless.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from adapters.reading import Reading, Rejected
from collector import metrics
from collector.mqtt_client import BrokerConfig, Connection, make_client
from collector.spool import Spool, SpoolEntry, encode_item

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class UplinkError(RuntimeError):
    """The destination did not take a batch; it stays in the spool."""


class Forwarder(Protocol):
    def send(self, items: Sequence[Reading | Rejected]) -> None:
        """Deliver items or raise; returning means the destination has them for good."""
        ...

    def close(self) -> None: ...


def amr_v1_payload(items: Sequence[Reading | Rejected], source: str) -> bytes:
    """One `amr/v1` message (adapters/schemas/amr-v1.schema.json) carrying the items."""
    readings: list[str] = []
    rejected: list[str] = []
    for it in items:
        (readings if isinstance(it, Reading) else rejected).append(encode_item(it))
    body = f'{{"v":{FORMAT_VERSION},"source":{json.dumps(source)},"readings":[{",".join(readings)}]'
    if rejected:
        body += f',"rejected":[{",".join(rejected)}]'
    return (body + "}").encode()


def amr_v1_payload_encoded(texts: Sequence[str], source: str) -> bytes:
    """`amr_v1_payload` from items already encoded by the spool (no decode and re-encode)."""
    readings = [t for t in texts if not t.startswith('{"rejected":true')]
    rejected = [t for t in texts if t.startswith('{"rejected":true')] if len(readings) < len(texts) else []
    body = f'{{"v":{FORMAT_VERSION},"source":{json.dumps(source)},"readings":[{",".join(readings)}]'
    if rejected:
        body += f',"rejected":[{",".join(rejected)}]'
    return (body + "}").encode()


def default_topic(gateway_id: str | None = None) -> str:
    return f"amr/v1/{gateway_id or socket.gethostname()}/readings"


class MqttForwarder:
    """Publish batches with QoS 1 and wait for each PUBACK."""

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
        self.client.max_queued_messages_set(0)
        self.client.connect_async(broker.host, broker.port, keepalive=30, clean_start=True)
        self.client.loop_start()

    def send(self, items: Sequence[Reading | Rejected]) -> None:
        self._publish(amr_v1_payload(items, self.source))

    def send_encoded(self, texts: Sequence[str]) -> None:
        """The spool's stored text as it is: the fast path of `Uplink`."""
        self._publish(amr_v1_payload_encoded(texts, self.source))

    def _publish(self, payload: bytes) -> None:
        if not self.conn.up.wait(self.timeout):
            raise UplinkError(f"broker {self.broker.describe()} not connected ({self.conn.last_error or 'connecting'})")
        t0 = time.monotonic()
        info = self.client.publish(self.topic, payload, qos=1)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise UplinkError(f"publish to {self.broker.describe()} failed: {exc}") from None
        if not info.is_published():
            raise UplinkError(f"no PUBACK from {self.broker.describe()} within {self.timeout}s")
        metrics.UPLINK_PUBLISH_SECONDS.observe(time.monotonic() - t0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class IngestForwarder:
    """Hand batches to the ingestion entry point; delivered means committed."""

    def __init__(self, database_url: str, settings: object | None = None):
        self.database_url = database_url
        self.settings = settings
        self._conn = None
        self._ingestor = None

    def send(self, items: Sequence[Reading | Rejected]) -> None:
        from collector.ingest import Ingestor
        from collector.storage import db

        try:
            if self._conn is None or self._conn.closed:
                self._conn = db.connect(self.database_url)
                self._ingestor = Ingestor(self._conn, self.settings)
            self._ingestor.ingest(items)  # commits
        except Exception as exc:
            metrics.DB_ERRORS.inc()
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:
                    pass
            self._conn = None
            raise UplinkError(f"database write failed: {exc}") from None

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
        failing = False
        while not self._stop.is_set():
            try:
                n = self.drain_once()
            except Exception as exc:
                if not failing:
                    log.warning("uplink: %s; %d readings wait in the spool, retrying", exc, len(self.spool))
                failing = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if failing:
                log.info("uplink: delivering again; %d readings wait in the spool", len(self.spool))
                failing = False
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
