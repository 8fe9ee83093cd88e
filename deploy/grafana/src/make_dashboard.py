"""Writes deploy/grafana/amr-dashboard.json: `python deploy/grafana/src/make_dashboard.py > deploy/grafana/amr-dashboard.json`.

The dashboard is code so that its panels stay regular; tests/test_ops_rules.py
checks that every series it shows is one the code exports.
"""

import json

DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []
pid = [0]
y = [0]

def nid():
    pid[0] += 1
    return pid[0]

def row(title):
    panels.append({"type": "row", "title": title, "id": nid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]}, "panels": []})
    y[0] += 1

def place(items, h):
    x = 0
    w = 24 // len(items)
    for p in items:
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y[0]}
        x += w
        panels.append(p)
    y[0] += h

def stat(title, expr, unit="none", desc="", thresholds=None):
    return {"type": "stat", "title": title, "id": nid(), "datasource": DS, "description": desc,
            "targets": [{"refId": "A", "datasource": DS, "expr": expr, "instant": True}],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": thresholds or [
                {"color": "green", "value": None}]}}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}}

def ts(title, targets, unit="short", desc="", stack=False):
    return {"type": "timeseries", "title": title, "id": nid(), "datasource": DS, "description": desc,
            "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": legend}
                        for i, (e, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1,
                                                                   "fillOpacity": 10,
                                                                   "stacking": {"mode": "normal" if stack else "none"}}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi"}}}

SEL = 'job=~"$job", instance=~"$instance"'

def red(v):
    return [{"color": "green", "value": None}, {"color": "red", "value": v}]


row("Overview")
place([
    stat("Stale meters", f"max(amr_meters_stale{{{SEL}}})", desc="Meters with no reading for more than two intervals; `amr status` lists them.", thresholds=red(1)),
    stat("Database reachable", f"min(amr_db_up{{{SEL}}})", desc="1: the last round trip succeeded.", thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]),
    stat("Readings accepted /s", f'sum(rate(amr_readings_total{{outcome="accepted", {SEL}}}[5m]))', unit="reqps"),
    stat("Refused share", f'sum(rate(amr_readings_total{{outcome=~"rejected|conflict", {SEL}}}[15m])) / sum(rate(amr_readings_total{{{SEL}}}[15m]))', unit="percentunit", thresholds=red(0.05)),
    stat("Spool depth", f"sum(amr_spool_depth{{{SEL}}})", desc="Readings waiting on gateways for the uplink."),
    stat("Processes up", f'sum(up{{job=~"amr-.*", {SEL}}})', desc="amr processes whose /metrics answers."),
], 4)

row("Polling")
place([
    ts("Reads by outcome", [(f"sum by (outcome) (rate(amr_polls_total{{{SEL}}}[5m]))", "{{outcome}}")], "reqps", stack=True),
    ts("Read error share by bus", [(f'sum by (bus) (rate(amr_polls_total{{outcome!="ok", {SEL}}}[15m])) / sum by (bus) (rate(amr_polls_total{{{SEL}}}[15m]))', "{{bus}}")], "percentunit"),
], 8)
place([
    ts("Read latency p95 by bus", [(f"histogram_quantile(0.95, sum by (le, bus) (rate(amr_poll_duration_seconds_bucket{{{SEL}}}[5m])))", "{{bus}} p95"),
                                   (f"histogram_quantile(0.5, sum by (le) (rate(amr_poll_duration_seconds_bucket{{{SEL}}}[5m])))", "all p50")], "s"),
    ts("Cycle overruns and missed slots", [(f"sum by (bus) (increase(amr_poll_cycle_overruns_total{{{SEL}}}[30m]))", "overruns {{bus}}"),
                                           (f"sum by (bus) (increase(amr_poll_missed_slots_total{{{SEL}}}[30m]))", "missed {{bus}}")], "short"),
    ts("Meters in back-off; Modbus requests", [(f"sum by (bus) (amr_meters_backed_off{{{SEL}}})", "backed off {{bus}}"),
                                              (f"sum by (bus) (rate(amr_modbus_requests_total{{{SEL}}}[5m]))", "requests/s {{bus}}")], "short"),
], 8)
place([
    ts("Last successful read, seconds ago", [(f"time() - max by (adapter, bus) (amr_bus_last_success_timestamp_seconds{{{SEL}}})", "{{adapter}} {{bus}}")], "s"),
    ts("Meters configured", [(f"sum by (adapter) (amr_meters_configured{{{SEL}}})", "{{adapter}}")], "short", stack=True),
    ts("Back-filled slots; clock corrections", [
        (f"sum by (outcome) (increase(amr_backfill_slots_total{{{SEL}}}[1h]))", "back-fill {{outcome}}"),
        (f"sum by (outcome) (increase(amr_clock_corrections_total{{{SEL}}}[1d]))", "clock {{outcome}}")], "short"),
], 7)

row("Ingestion and database")
place([
    ts("Readings by outcome", [(f"sum by (outcome) (rate(amr_readings_total{{{SEL}}}[5m]))", "{{outcome}}")], "reqps", stack=True),
    ts("Refused by reason", [(f"sum by (reason) (rate(amr_rejected_readings_total{{{SEL}}}[15m]))", "{{reason}}")], "reqps", stack=True),
], 8)
place([
    ts("Database write latency", [(f"histogram_quantile(0.95, sum by (le) (rate(amr_db_write_seconds_bucket{{{SEL}}}[5m])))", "p95"),
                                  (f"histogram_quantile(0.5, sum by (le) (rate(amr_db_write_seconds_bucket{{{SEL}}}[5m])))", "p50")], "s"),
    ts("Batch size (mean)", [(f"sum(rate(amr_db_batch_size_sum{{{SEL}}}[5m])) / sum(rate(amr_db_batch_size_count{{{SEL}}}[5m]))", "readings per batch")], "short"),
    ts("Database errors; reachability", [(f"sum by (instance) (increase(amr_db_errors_total{{{SEL}}}[10m]))", "errors {{instance}}"),
                                         (f"min by (instance) (amr_db_up{{{SEL}}})", "up {{instance}}"),
                                         (f"sum by (instance) (increase(amr_ingest_worker_restarts_total{{{SEL}}}[10m]))", "worker restarts {{instance}}")], "short"),
], 8)

row("Store-and-forward and MQTT")
place([
    ts("Spool depth", [(f"sum by (instance) (amr_spool_depth{{{SEL}}})", "{{instance}}")], "short"),
    ts("Oldest spooled reading", [(f"max by (instance) (amr_spool_oldest_age_seconds{{{SEL}}})", "{{instance}}")], "s"),
    ts("Spool drops and damage", [(f"sum by (instance, policy) (increase(amr_spool_dropped_total{{{SEL}}}[15m]))", "{{instance}} {{policy}}"),
                                  (f"sum by (instance) (increase(amr_spool_damaged_total{{{SEL}}}[1h]))", "damaged spool {{instance}}"),
                                  (f"sum by (instance, outcome) (increase(amr_spool_salvaged_total{{{SEL}}}[1h]))", "rows {{outcome}} {{instance}}")], "short"),
], 8)
place([
    ts("Uplink publish latency", [(f"histogram_quantile(0.95, sum by (le, instance) (rate(amr_uplink_publish_seconds_bucket{{{SEL}}}[5m])))", "p95 {{instance}}")], "s"),
    ts("Uplink batches refused", [(f"sum by (instance, reason) (increase(amr_uplink_refused_total{{{SEL}}}[15m]))", "{{instance}} {{reason}}")], "short"),
    ts("MQTT messages by format and outcome", [(f"sum by (format, outcome) (rate(amr_mqtt_messages_total{{{SEL}}}[5m]))", "{{format}} {{outcome}}")], "reqps", stack=True),
], 8)

row("Billing")
place([
    stat("Held back by the last run", "max(amr_billing_held_back)", desc="Accounts the last `amr bill` left without a bill (AMR_METRICS_TEXTFILE).", thresholds=red(1)),
    stat("Since the last billing run", "time() - max(amr_billing_last_run_timestamp_seconds)", unit="s", thresholds=red(35 * 86400)),
    ts("Bills by outcome", [(f"sum by (outcome) (increase(amr_bills_total{{{SEL}}}[1d]))", "{{outcome}}")], "short", stack=True),
    ts("Billing run duration", [(f"histogram_quantile(0.95, sum by (le) (rate(amr_billing_run_seconds_bucket{{{SEL}}}[1d])))", "p95"),
                                (f"sum(rate(amr_billing_run_seconds_sum{{{SEL}}}[1d])) / sum(rate(amr_billing_run_seconds_count{{{SEL}}}[1d]))", "mean")], "s"),
], 7)

row("Processes")
place([
    ts("CPU", [(f"rate(process_cpu_seconds_total{{{SEL}}}[5m])", "{{job}} {{instance}}")], "percentunit"),
    ts("Resident memory", [(f"process_resident_memory_bytes{{{SEL}}}", "{{job}} {{instance}}")], "bytes"),
    ts("Open file descriptors", [(f"process_open_fds{{{SEL}}}", "{{job}} {{instance}}")], "short"),
    ts("Configuration reloads", [(f"sum by (instance, outcome) (increase(amr_config_reloads_total{{{SEL}}}[1h]))", "{{instance}} {{outcome}}"),
                                 (f"time() - max by (instance) (amr_config_loaded_timestamp_seconds{{{SEL}}})", "age {{instance}}")], "short"),
], 7)

dash = {
    "title": "AMR metering",
    "uid": "amr-metering",
    "description": "Polling, ingestion, spool and uplink, billing and processes of an AMR installation.",
    "tags": ["amr", "metering"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
         "current": {"text": "Prometheus", "value": "prometheus"}},
        {"name": "job", "type": "query", "datasource": DS, "label": "Job", "includeAll": True, "multi": True,
         "query": {"query": 'label_values(up{job=~"amr-.*"}, job)', "refId": "job"},
         "definition": 'label_values(up{job=~"amr-.*"}, job)', "refresh": 2, "allValue": "amr-.*",
         "current": {"text": "All", "value": "$__all"}},
        {"name": "instance", "type": "query", "datasource": DS, "label": "Instance", "includeAll": True, "multi": True,
         "query": {"query": 'label_values(up{job=~"$job"}, instance)', "refId": "instance"},
         "definition": 'label_values(up{job=~"$job"}, instance)', "refresh": 2, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}},
    ]},
    "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                              "enable": True, "hide": True, "name": "Annotations & Alerts", "type": "dashboard"}]},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
