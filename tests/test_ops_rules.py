"""The deployment files agree with the code: every metric the alert rules and the
dashboard use is one the code exports; the rules and units pass their own tools."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from amr import metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "amr-dashboard.json"
COMPOSE = DEPLOY / "compose.yaml"

# series Prometheus makes itself, not the code
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "le",
}
_FUNCTIONS_WITH_LABEL_ARGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = _FUNCTIONS_WITH_LABEL_ARGS.sub("", text)  # grouping label lists
    text = re.sub(r"\$\w+", "", text)  # dashboard variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def exported() -> set[str]:
    return metrics.exported_names()


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_the_parser_finds_names_and_ignores_the_rest():
    expr = (
        'sum by (bus) (rate(amr_polls_total{outcome!="ok", job=~"$job"}[15m])) '
        "/ sum without (instance) (rate(amr_polls_total[15m])) > 0.2 and on (instance) up == 1"
    )
    assert promql_metric_names(expr) == {"amr_polls_total", "up"}
    assert promql_metric_names("histogram_quantile(0.95, sum by (le) (rate(amr_x_bucket[5m])))") == {"amr_x_bucket"}


def test_exported_names_come_from_the_registry():
    names = exported()
    assert "amr_polls_total" in names and "amr_poll_duration_seconds_bucket" in names
    assert "process_resident_memory_bytes" in names  # prometheus-client's process collector
    assert "amr_no_such_metric" not in names


def test_every_metric_in_the_alert_rules_is_exported():
    names = exported() | PROMETHEUS_OWN
    rules = alert_rules()
    assert len(rules) >= 5
    for rule in rules:
        used = promql_metric_names(rule["expr"])
        assert used, f"rule {rule['alert']}: no metric found in {rule['expr']!r}"
        unknown = used - names
        assert not unknown, f"rule {rule['alert']} uses metrics the code does not export: {sorted(unknown)}"
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("warning", "critical")


def test_the_alerts_the_issue_asks_for_exist():
    by_metric: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in promql_metric_names(rule["expr"]):
            by_metric.setdefault(name, set()).add(rule["alert"])
    assert "amr_meters_stale" in by_metric  # stale meters
    assert "amr_spool_depth" in by_metric  # spool growing
    assert "amr_polls_total" in by_metric and "amr_readings_total" in by_metric  # error rates
    assert "amr_db_up" in by_metric  # database unreachable
    assert "amr_billing_held_back" in by_metric  # billing held back (one-shot run, via the textfile)


def test_every_metric_on_the_dashboard_is_exported():
    names = exported() | PROMETHEUS_OWN
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used_all: set[str] = set()
    for title, expr in exprs:
        used = promql_metric_names(expr)
        assert used, f"panel {title!r}: no metric in {expr!r}"
        unknown = used - names
        assert not unknown, f"panel {title!r} uses metrics the code does not export: {sorted(unknown)}"
        used_all |= used
    # and the dashboard shows every amr_ metric family the code defines
    families = {row[0] for row in metrics.documented_rows()}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used_all}
    assert families - shown == set(), f"metrics missing from the dashboard: {sorted(families - shown)}"


def test_dashboard_is_well_formed():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
    assert {v["name"] for v in doc["templating"]["list"]} >= {"datasource", "job", "instance"}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`): the rules were not checked by it")
    return tool


def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_promtool_check_config():
    out = subprocess.run([_promtool(), "check", "config", str(SCRAPE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check above can fail: a broken expression is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text(ALERTS.read_text().replace("max(amr_meters_stale) > 0", "max(amr_meters_stale > 0"))
    out = subprocess.run([_promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0


def test_scrape_config_jobs_match_the_compose_services():
    scrape = yaml.safe_load(SCRAPE.read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    services = set(compose["services"])
    assert {"timescaledb", "mosquitto", "prometheus", "grafana", "gateway", "collector", "api"} <= services
    assert compose["services"]["timescaledb"]["image"].startswith("timescale/timescaledb")
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    assert {"amr-gateway", "amr-collector", "amr-api", "node"} <= set(jobs)
    for name in ("gateway", "collector", "api"):
        targets = jobs[f"amr-{name}"]["static_configs"][0]["targets"]
        assert targets == [f"{name}:9108"]
    assert scrape["rule_files"] == ["alerts.yml"]


def test_compose_mounts_files_that_exist():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"service {name}: {src} does not exist"
        build = svc.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).exists()


def test_systemd_units_are_hardened_and_valid(tmp_path):
    units = sorted((DEPLOY / "systemd").glob("amr-*.service"))
    names = [u.name for u in units]
    assert names == ["amr-api.service", "amr-bill.service", "amr-collector.service", "amr-gateway.service"]
    for unit in units:
        text = unit.read_text()
        daemon = unit.name != "amr-bill.service"
        for key in ("User=amr", "NoNewPrivileges=true", "ProtectSystem=strict", "ProtectHome=true",
                    "PrivateTmp=true", "CapabilityBoundingSet=", "SystemCallFilter=@system-service",
                    *(("Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID") if daemon else ())):
            assert key in text, f"{unit.name}: no {key}"
        env_file = re.search(r"^EnvironmentFile=/etc/amr/(\S+)$", text, re.M)
        assert env_file and (DEPLOY / "examples" / env_file.group(1)).exists()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    (tmp_path / "amr-bill.timer").write_text((DEPLOY / "systemd" / "amr-bill.timer").read_text())
    for unit in units:  # the binary is not installed here: verify a copy that runs /bin/true
        copy = tmp_path / unit.name
        copy.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", unit.read_text(), flags=re.M))
        extra = [str(tmp_path / "amr-bill.timer")] if unit.name == "amr-bill.service" else []
        out = subprocess.run([analyze, "verify", str(copy), *extra], capture_output=True, text=True, timeout=60)
        problems = [line for line in (out.stdout + out.stderr).splitlines() if "Unknown" in line or "Invalid" in line
                    or "Failed" in line]
        assert not problems, f"{unit.name}: {problems}"


def test_example_configs_are_valid():
    from billing.api import TokenStore
    from collector.inventory import load_inventory

    for inv in ("inventory.toml", "compose-inventory.toml"):
        load_inventory(DEPLOY / "examples" / inv)
    TokenStore.from_toml((DEPLOY / "examples" / "api-tokens.toml").read_text())
    from amr.settings import Settings

    known = {f"AMR_{name.upper()}" for name in Settings.model_fields}
    known |= {"AMR_LOG_LEVEL"}
    for env in (DEPLOY / "examples").glob("*.env"):
        for line in env.read_text().splitlines():
            line = line.strip().lstrip("# ")
            m = re.match(r"^(AMR_[A-Z_]+)=", line)
            if m:
                assert m.group(1) in known, f"{env.name}: {m.group(1)} is not a setting"


def test_readme_metrics_table_is_the_one_the_code_makes():
    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- metrics:start -->"), text.index("<!-- metrics:end -->")
    table = text[start + len("<!-- metrics:start -->"):end].strip()
    assert table == metrics.markdown_table(), "README metrics table is stale: paste `python -m amr.metrics`"
    # and the table names every amr_ metric, with its labels
    for name, _kind, labels, _doc in metrics.documented_rows():
        assert f"| `{name}` |" in table and (labels or "-") in table
    assert start > text.index("<!-- ops:start -->") and end < text.index("<!-- ops:end -->")


def test_one_shot_billing_writes_its_metrics_for_node_exporter(db_url, tmp_path):
    """`amr bill` lives for seconds: its held-back count reaches Prometheus through a textfile."""
    import os
    import sys

    from prometheus_client.parser import text_string_to_metric_families

    prom = tmp_path / "amr-bill.prom"
    env = {**os.environ, "AMR_DATABASE_URL": db_url, "AMR_METRICS_TEXTFILE": str(prom)}
    amr = [sys.executable, "-c", "from amr.cli import main; raise SystemExit(main())"]
    ok = subprocess.run([*amr, "inventory", "load", str(DEPLOY / "examples" / "inventory.toml")],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    # no tariffs loaded and no data: every subscriber is held back
    out = subprocess.run([*amr, "bill", "--period", "2026-10", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    held = sum(1 for line in out.stdout.splitlines() if '"held_back"' in line and '"kind": "held_back"' in line)
    samples = {s.name: s.value for f in text_string_to_metric_families(prom.read_text()) for s in f.samples}
    assert held > 0 and samples["amr_billing_held_back"] == held
    assert samples["amr_billing_last_run_timestamp_seconds"] > 0
    assert not any(name.startswith("process_") for name in samples)  # node_exporter has its own


def test_dashboard_json_is_what_its_generator_writes():
    import sys

    out = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "src" / "make_dashboard.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(DASHBOARD.read_text()), "regenerate deploy/grafana/amr-dashboard.json"
