"""Prometheus metrics and `/healthz`, served from a thread on `metrics.listen`.

Per-lock gauges come from the last pass's report at scrape time, so a scrape always sees
one pass whole and locks that went away disappear with it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor import __version__, keys
from monitor.alerts import Alerts
from monitor.errors import MonitorError
from monitor.health import Health, State
from monitor.service import Monitor, PassReport

# `_created` series double every counter's cardinality and nobody alerts on them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "gpulock_monitor"


class _Locks(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        report = self.monitor.last_report
        verdicts = report.verdicts if report is not None else []
        held = GaugeMetricFamily(
            f"{PREFIX}_lock_held_seconds", "How long the current holding has lasted.", labels=["lock", "tier"]
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_lock_heartbeat_age_seconds",
            "Seconds since the holder's heartbeat last changed.",
            labels=["lock"],
        )
        for v in verdicts:
            lock = keys.text(v.holding.key)
            held.add_metric([lock, v.decision.tier.value], v.holding.held_s)
            if v.holding.hb_age_s is not None:
                age.add_metric([lock], v.holding.hb_age_s)
        count = GaugeMetricFamily(
            f"{PREFIX}_locks_held", "Locks held at the last pass, by heartbeat state.", labels=["heartbeat"]
        )
        for state in ("alive", "dead", "none"):
            count.add_metric([state], sum(1 for v in verdicts if v.holding.heartbeat.value == state))
        yield from (held, age, count)


class _Gpus(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        gpus = self.monitor.gpus.last if self.monitor.gpus is not None else {}
        labels = ["gpu", "uuid"]
        used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels)
        total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=labels)
        util = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_ratio", "GPU busy fraction, 0 to 1 (NVML).", labels=labels)
        procs = GaugeMetricFamily(f"{PREFIX}_gpu_processes", "Compute processes on the GPU (NVML).", labels=labels)
        for index, g in sorted(gpus.items()):
            key = [str(index), g.uuid or ""]
            if g.memory_used_bytes is not None:
                used.add_metric(key, g.memory_used_bytes)
            if g.memory_total_bytes is not None:
                total.add_metric(key, g.memory_total_bytes)
            if g.utilization_pct is not None:
                util.add_metric(key, g.utilization_pct / 100)
            if g.processes is not None:
                procs.add_metric(key, len(g.processes))
        yield from (used, total, util, procs)


class _Alerts(Collector):
    def __init__(self, alerts: Alerts) -> None:
        self.alerts = alerts

    def collect(self) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(f"{PREFIX}_alerts_{name}", f"Alerts {name}, by channel.", labels=["channel"])
            for name in ("sent", "failed", "dropped")
        }
        for channel, stats in self.alerts.stats().items():
            for name, family in families.items():
                family.add_metric([channel], getattr(stats, name))
        yield from families.values()


class Metrics:
    """The daemon's metrics; `observe` after each pass, `on_event` for every audited event."""

    def __init__(self, monitor: Monitor, alerts: Alerts | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(f"{PREFIX}_events", "Audited events, by name.", ["event"], registry=r)
        self.releases = Counter(
            f"{PREFIX}_releases", "Release attempts by rule and outcome.", ["reason", "outcome"], registry=r
        )
        self.pass_duration = Histogram(
            f"{PREFIX}_pass_duration_seconds",
            "Duration of monitor passes.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.pass_errors = Counter(f"{PREFIX}_pass_errors", "Passes that ended in an error.", registry=r)
        self.redis_up = Gauge(f"{PREFIX}_redis_up", "1 if the last pass reached Redis.", registry=r)
        self.last_success = Gauge(
            f"{PREFIX}_last_success_timestamp_seconds", "Unix time of the last pass that completed.", registry=r
        )
        self.failing = Gauge(f"{PREFIX}_failing_releases", "Releases still failing after max_retry.", registry=r)
        self.audit_failures = Gauge(
            f"{PREFIX}_audit_write_failures", "Audit lines not yet written (kept in memory).", registry=r
        )
        Info(f"{PREFIX}_build", "Version of gpulock-monitor.", registry=r).info({"version": __version__})
        r.register(_Locks(monitor))
        r.register(_Gpus(monitor))
        if alerts is not None:
            r.register(_Alerts(alerts))
        self.monitor = monitor
        monitor.listeners.append(self.on_event)

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        self.events.labels(event).inc()
        if event in ("lock_released", "release_skipped", "release_failed"):
            outcome = "failed" if event == "release_failed" else str(fields.get("outcome"))
            self.releases.labels(str(fields.get("reason")), outcome).inc()

    def observe(self, report: PassReport | None) -> None:
        if report is None:  # skipped while backing off
            return
        self.pass_duration.observe(report.duration_s)
        self.redis_up.set(0 if report.error and report.error.startswith("redis unavailable") else 1)
        if report.error:
            self.pass_errors.inc()
        else:
            self.last_success.set(report.started)
        self.failing.set(self.monitor.failing_releases)
        self.audit_failures.set(self.monitor.audit.file.pending)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/metrics":
            body = prometheus_client.generate_latest(self.server.metrics.registry)
            self._send(200, prometheus_client.CONTENT_TYPE_LATEST, body)
        elif self.path.split("?")[0] == "/healthz":
            health = self.server.health()
            doc = {"state": health.state.name.lower(), "code": int(health.state), "reason": health.reason}
            self._send(503 if health.state is State.CRITICAL else 200, "application/json", json.dumps(doc).encode())
        else:
            self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the journal; stay quiet."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: Metrics, health: Callable[[], Health]) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.health = health


def serve(listen: str, metrics: Metrics, health: Callable[[], Health]) -> Callable[[], None]:
    """Start serving in a thread; returns the function that stops it."""
    host, _, port = listen.rpartition(":")
    try:
        server = _Server((host.strip("[]"), int(port)), metrics, health)
    except OSError as exc:
        raise MonitorError(f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
