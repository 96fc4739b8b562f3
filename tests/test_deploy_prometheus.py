"""deploy/prometheus/rules.yml and deploy/grafana/gpulock-monitor.json: every PromQL expression parses, and
names only metrics (and labels) that a real daemon's /metrics exports; promtool checks and unit-tests the
rules where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import redis
import yaml
from helpers import beat, config_file, hold, start_daemon, stop_daemon, wait_for
from prometheus_client.parser import text_string_to_metric_families

from monitor import protocol

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "gpulock-monitor.json"
README = REPO / "README.md"
PREFIX = "gpulock_monitor_"

# Series names a metric family of each type exposes (the text parser names a counter without _total).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}
# Labels Prometheus attaches to every scraped series (static config, or prometheus-operator's PodMonitor).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}
# Series that are not the daemon's but Prometheus's own.
PROMETHEUS_SERIES = {"up"}
# Grafana's variables, replaced by something PromQL accepts before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


# --- what the daemon exports -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:  # not listening yet
        return ""


@dataclass(frozen=True)
class Exported:
    labels: dict[str, set[str]]  # every series name, with the label names seen on its samples
    sampled: set[str]  # the series that had samples

    def __contains__(self, name: str) -> bool:
        return name in self.labels


@pytest.fixture(scope="module")
def exported(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Every series `gpulock-monitor run` serves on /metrics (also those of families without samples).

    The daemon runs as a real process against a Redis with a live holder and a dead one (released),
    and an alert channel, so that the labelled families have samples."""
    tmp = tmp_path_factory.mktemp("exported")
    client = redis.Redis.from_url(redis_server.url, protocol=2)
    client.flushall()
    key = hold(client, 0, "tts#t0", age_s=10)
    beat(client, key, age_s=3)
    # Its holder record asks for a progress mark every second and has made none: holder_stalled.
    record = protocol.holder_record(task="tts", token="t0", heartbeat_interval_s=60, progress_timeout_s=1)
    client.set(protocol.holder_key(key), record, px=client.pttl(key))
    hold(client, 1, "legacy", age_s=450)  # past soft_timeout with no heartbeat: released
    port = _free_port()
    dead_hook = {"type": "webhook", "url": f"http://127.0.0.1:{_free_port()}/", "retries": 0}
    config = config_file(
        tmp,
        redis_server.url,
        metrics={"enabled": True, "listen": f"127.0.0.1:{port}"},
        alerts={"channels": [dead_hook]},
    )
    proc = start_daemon(config)
    try:
        # A release is counted during the pass; the per-lock series appear once the pass is over.
        done = (f"{PREFIX}releases_total{{", f"{PREFIX}lock_held_seconds{{", f"{PREFIX}holder_findings{{")
        text = wait_for(lambda: (t := _scrape(port)) and all(name in t for name in done) and t)
    finally:
        code, output = stop_daemon(proc)
        client.flushall()
        client.close()
    assert code == 0, output
    series: dict[str, set[str]] = {}
    sampled = set()
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
            sampled.add(sample.name)
    return Exported(series, sampled)


# --- the expressions -----------------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules()}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable, Grafana's variables filled in."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["definition"]
            inner = re.fullmatch(r"label_values\((.+), *\w+\)", query)  # Grafana's function, not PromQL
            found.append((f"variable {variable['name']}", inner.group(1) if inner else query))
    filled = []
    for where, query in found:
        expr = query
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable the test does not know: {expr}"
        filled.append((where, expr))
    return filled


def all_exprs() -> list[tuple[str, str]]:
    return [(f"rules.yml {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in rules()] + [
        (f"dashboard {where}", expr) for where, expr in dashboard_exprs()
    ]


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """The series an expression selects, each with the label names it matches on, and the label names
    of its `by`/`without`/`on`/`ignoring` clauses. Raises ValueError when it does not parse."""
    found: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            equal = promql_parser.MatchOp.Equal
            names = [m.value for m in node.matchers.matchers if m.name == "__name__" and m.op == equal]
            name = node.name or (names[0] if names else None)
            assert name is not None, f"a selector without a metric name: {node}"
            found.append((name, labels - {"__name__"}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouping.update(node.modifier.matching.labels)
            grouping.update(node.modifier.group_labels or [])

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found, grouping


def test_rules_and_dashboard_have_expressions():
    assert len(rules()) >= 8
    assert len(dashboard_exprs()) >= 20


@pytest.mark.parametrize(("where", "expr"), all_exprs(), ids=[where for where, _ in all_exprs()])
def test_every_expression_parses(where, expr):
    selectors(expr)


def test_the_parser_refuses_what_prometheus_refuses():
    # The check above is worth what the parser refuses: a typo, a range where an instant vector goes.
    for bad in ("rate(gpulock_monitor_events_total)", "sum by (le (x)", "nosuchfunction(up)", 'up{job="a"'):
        with pytest.raises(ValueError):  # noqa: PT011 - the parser says why in its own words
            promql_parser.parse(bad)


def test_every_metric_used_is_exported(exported):
    used = {(where, name) for where, expr in all_exprs() for name, _ in selectors(expr)[0]}
    unknown = sorted(
        f"{where}: {name}"
        for where, name in used
        if name not in PROMETHEUS_SERIES and (not name.startswith(PREFIX) or name not in exported)
    )
    assert not unknown, f"not exported by the daemon: {unknown}; it exports {sorted(exported.labels)}"
    # The deploy artefacts use most of what the daemon exports (a new metric deserves a panel).
    unused = {name for name in exported.labels if name.startswith(PREFIX)} - {name for _, name in used}
    assert unused <= {f"{PREFIX}build_info", f"{PREFIX}pass_duration_seconds_count"}, unused


def test_every_label_used_is_exported(exported):
    wrong = []
    for where, expr in all_exprs():
        found, grouping = selectors(expr)
        ours = [(name, labels) for name, labels in found if name in exported]  # others: the test above
        known = set().union(*(exported.labels[name] for name, _ in ours)) if ours else set()
        if any(name not in exported.sampled for name, _ in ours):
            continue  # a family without samples here (NVML's: no GPU): its labels cannot be seen
        for name, labels in ours:
            wrong += [f"{where}: {name}{{{label}}}" for label in labels - exported.labels[name] - TARGET_LABELS]
        if ours:
            wrong += [f"{where}: by/on ({label})" for label in grouping - known - TARGET_LABELS]
    assert not wrong, wrong


def test_every_metric_the_rules_use_had_samples(exported):
    # So that test_every_label_used_is_exported checked every label the rules use.
    for where, expr in all_exprs():
        if where.startswith("rules.yml"):
            for name, _ in selectors(expr)[0]:
                assert name in PROMETHEUS_SERIES or name in exported.sampled, f"{where}: {name} had no sample"


# --- the rules file ----------------------------------------------------------------------------------------


def readme_anchors() -> set[str]:
    """GitHub's anchors of README.md's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", README.read_text(), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_alert_is_routable_and_documented():
    anchors = readme_anchors()
    for name, rule in alerts().items():
        assert re.fullmatch(r"GpulockMonitor[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "https://github.com/gpulock-monitor/gpulock-monitor/blob/main/README.md", name
        assert anchor in anchors, f"{name}: README has no section #{anchor}"
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_the_rules_cover_what_the_on_call_needs():
    exprs = {name: rule["expr"] for name, rule in alerts().items()}
    expected = {
        "GpulockMonitorDown": "up{",
        "GpulockMonitorAbsent": "absent(",
        "GpulockMonitorPassesStalled": 'setting="monitor_interval"',  # each monitor's own interval
        "GpulockMonitorRedisDown": f"{PREFIX}redis_up",
        "GpulockMonitorReleaseFailing": 'outcome="failed"',
        "GpulockMonitorReleaseRetriesSpent": f"{PREFIX}failing_releases",
        "GpulockMonitorLockPastHardCap": 'setting="hard_timeout"',  # a held time, not a tier that changes
        "GpulockMonitorReleaseBurst": f"{PREFIX}releases_total",
        "GpulockMonitorAuditWriteFailing": f"{PREFIX}audit_pending_lines",
        "GpulockMonitorAuditLinesLost": f"{PREFIX}audit_dropped_lines_total",
    }
    for name, fragment in expected.items():
        assert fragment in exprs[name], name
    # No hard-coded threshold that belongs to the daemon's config, and no series that changes with a tier.
    for name, expr in exprs.items():
        assert "tier" not in expr, name
        assert not re.search(r"> *160\b", expr), name


def test_every_alert_has_unit_tests_firing_and_not():
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == ["rules.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert firing == set(alerts()), set(alerts()) ^ firing
    assert silent == set(alerts()), set(alerts()) ^ silent


promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")


@promtool
def test_promtool_check_rules():
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@promtool
def test_promtool_test_rules():
    result = subprocess.run(
        ["promtool", "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the dashboard -------------------------------------------------------------------------------------------


def test_dashboard_imports_with_a_prometheus_input():
    doc = dashboard()
    assert [(i["name"], i["type"], i["pluginId"]) for i in doc["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    assert doc["uid"] == "gpulock-monitor"
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    prometheus = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in doc["panels"]:
        assert panel["gridPos"]["x"] >= 0, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == prometheus, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == prometheus, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    for variable in doc["templating"]["list"]:
        assert variable["datasource"] == prometheus


def test_dashboard_shows_what_the_on_call_needs():
    exprs = " ".join(expr for _, expr in dashboard_exprs())
    titles = [panel["title"] for panel in dashboard()["panels"]]
    for wanted in (
        "sum by (heartbeat) (gpulock_monitor_locks_held",
        "gpulock_monitor_lock_held_seconds",
        "sum by (reason) (increase(gpulock_monitor_releases_total",
        "gpulock_monitor_pass_duration_seconds_bucket",
        "gpulock_monitor_redis_up",
    ):
        assert wanted in exprs, wanted
    assert any(panel["type"] == "heatmap" for panel in dashboard()["panels"]), titles
