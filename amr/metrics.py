"""Every Prometheus metric the project exports, defined in one place.

Labels are of low cardinality (adapter, bus, outcome, reason code): never one
series per meter. The README's metrics table is written from this file.
The process collectors of prometheus-client (process_cpu_seconds_total,
process_resident_memory_bytes, process_open_fds, python_gc_*, ...) are on
the same default registry and need nothing here.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

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
BACKFILL_SLOTS = Counter(
    "amr_backfill_slots_total",
    "Missed slots read back from a meter's own load profile (filled), or that it could not give (invalid, error)",
    ["adapter", "bus", "outcome"],
)
CLOCK_CORRECTIONS = Counter(
    "amr_clock_corrections_total", "Meter clocks corrected by the gateway (clock_correction = true), by outcome",
    ["adapter", "bus", "outcome"],
)
METERS_BACKED_OFF = Gauge(
    "amr_meters_backed_off", "Meters currently in exponential back-off after failures", ["bus"],
)
METERS_STALE = Gauge(
    "amr_meters_stale", "Meters with no reading for more than two intervals (`amr status` lists them)",
)

# --- ingestion (collector.ingest.ingestor) ---
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
INGEST_WORKER_RESTARTS = Counter(
    "amr_ingest_worker_restarts_total",
    "Collector ingestion worker processes that died and were started again (their batches resent)",
)

# --- store-and-forward and MQTT ---
SPOOL_DEPTH = Gauge("amr_spool_depth", "Readings waiting in the gateway spool")
SPOOL_OLDEST_AGE = Gauge("amr_spool_oldest_age_seconds", "Age of the oldest reading in the spool")
SPOOL_DROPPED = Counter(
    "amr_spool_dropped_total", "Readings the full spool refused or dropped, by policy", ["policy"],
)
SPOOL_DAMAGED = Counter(
    "amr_spool_damaged_total",
    "Damaged spool files found at start: moved aside, their readable rows salvaged into a fresh spool",
)
SPOOL_SALVAGED = Counter(
    "amr_spool_salvaged_total",
    "Spool rows after damage, by outcome: salvaged (copied out of a damaged file), lost (unreadable "
    "there), undecodable (read back but not decodable: forwarded alone as a reject with its raw bytes)",
    ["outcome"],
)
UPLINK_REFUSED = Counter(
    "amr_uplink_refused_total",
    "Uplink batches the destination did not take (kept at the head of the spool and retried), by reason: "
    "no_subscribers (PUBACK 16), error (another PUBACK code), timeout, not_connected, db_unavailable",
    ["reason"],
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
BILLING_HELD_BACK = Gauge(
    "amr_billing_held_back", "Accounts the last billing run of this process held back (no tariff, no data)",
)
BILLING_LAST_RUN = Gauge(
    "amr_billing_last_run_timestamp_seconds", "Unix time the last billing run of this process finished",
)

# --- operations (collector.config, collector.status, every daemon) ---
DB_UP = Gauge(
    "amr_db_up", "1 when the last database round trip of this process succeeded, 0 when it failed",
)
CONFIG_RELOADS = Counter(
    "amr_config_reloads_total", "Reloads of a daemon's configuration on SIGHUP (inventory and presets; the API's tokens) by outcome (ok, error)",
    ["outcome"],
)
CONFIG_LOADED_AT = Gauge(
    "amr_config_loaded_timestamp_seconds", "Unix time the configuration in use was loaded",
)
METERS_CONFIGURED = Gauge(
    "amr_meters_configured", "Meters in the inventory this process works with", ["adapter"],
)
BUS_LAST_SUCCESS = Gauge(
    "amr_bus_last_success_timestamp_seconds", "Unix time of the last successful read on a bus",
    ["adapter", "bus"],
)


def exported_names(registry=REGISTRY) -> set[str]:
    """Every series name the registry can export (counters with _total, histograms with _bucket...).

    Used by the tests that check the dashboard, the alert rules and the README
    against the code.
    """
    names: set[str] = set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "histogram":
            names.update({f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"})
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "gauge":  # a labelled gauge exports nothing until first set
            names.add(family.name)
    return names


def documented_rows() -> list[tuple[str, str, str, str]]:
    """(name as scraped, type, labels, meaning) of every metric defined in this module."""
    rows = []
    for obj in list(globals().values()):
        if not isinstance(obj, MetricWrapperBase):
            continue
        for family in obj.describe():
            name = f"{family.name}_total" if family.type == "counter" else family.name
            labels = ", ".join(obj._labelnames)
            rows.append((name, family.type, labels, family.documentation))
    return sorted(rows)


def markdown_table() -> str:
    """The README's metrics table: `python -m amr.metrics` prints it."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, doc in documented_rows():
        lines.append(f"| `{name}` | {kind} | {labels or '-'} | {doc.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
