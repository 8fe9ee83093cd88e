"""Every Prometheus metric the project exports, defined in one place.

Labels are of low cardinality (adapter, bus, outcome, reason code): never one
series per meter. The README's metrics table is written from this file.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# --- polling (adapters, scheduler) ---
POLL_SECONDS = Histogram(
    "amr_poll_duration_seconds", "Time to read one meter, request to decoded values",
    ["adapter", "bus"], buckets=_LATENCY,
)
POLLS = Counter(
    "amr_polls_total", "Meter reads by outcome (ok, timeout, crc, exception, decode, refused...)",
    ["adapter", "bus", "outcome"],
)
MODBUS_REQUESTS = Counter(
    "amr_modbus_requests_total", "Modbus requests sent (after batching adjacent registers)",
    ["bus"],
)
CYCLE_OVERRUNS = Counter(
    "amr_poll_cycle_overruns_total", "Poll cycles that did not finish within the meter interval",
    ["bus"],
)
MISSED_SLOTS = Counter(
    "amr_poll_missed_slots_total", "Scheduled reads that failed every retry within their interval",
    ["adapter", "bus"],
)
METERS_BACKED_OFF = Gauge(
    "amr_meters_backed_off", "Meters currently in exponential back-off after failures", ["bus"],
)
METERS_STALE = Gauge(
    "amr_meters_stale", "Meters with no reading for more than two intervals (`amr status` lists them)",
)

# --- ingestion (collector.ingest) ---
READINGS = Counter(
    "amr_readings_total", "Readings offered to ingestion by outcome (accepted, duplicate, conflict, rejected)",
    ["outcome"],
)
REJECTS = Counter(
    "amr_rejected_readings_total", "Rejected inputs by reason code", ["reason"],
)
DB_WRITE_SECONDS = Histogram(
    "amr_db_write_seconds", "Time to store one ingestion batch, validation to commit",
    buckets=_LATENCY,
)
DB_BATCH_SIZE = Histogram(
    "amr_db_batch_size", "Readings per ingestion batch",
    buckets=(1, 10, 100, 500, 1000, 5000, 10000, 50000),
)
DB_ERRORS = Counter("amr_db_errors_total", "Failed database writes (the batch is kept and retried)")

# --- store-and-forward and MQTT ---
SPOOL_DEPTH = Gauge("amr_spool_depth", "Readings waiting in the gateway spool")
SPOOL_OLDEST_AGE = Gauge("amr_spool_oldest_age_seconds", "Age of the oldest reading in the spool")
SPOOL_DROPPED = Counter(
    "amr_spool_dropped_total", "Readings the full spool refused or dropped, by policy", ["policy"],
)
UPLINK_PUBLISH_SECONDS = Histogram(
    "amr_uplink_publish_seconds", "Publish to broker acknowledgement, per batch", buckets=_LATENCY,
)
MQTT_MESSAGES = Counter(
    "amr_mqtt_messages_total", "MQTT messages consumed by payload format and outcome",
    ["format", "outcome"],
)

# --- billing ---
BILLING_RUN_SECONDS = Histogram(
    "amr_billing_run_seconds", "Duration of one billing run", buckets=(0.1, 1, 5, 10, 30, 60, 120, 300),
)
BILLS = Counter(
    "amr_bills_total", "Bills by outcome of a run (billed, unchanged, new_version, held_back)",
    ["outcome"],
)
