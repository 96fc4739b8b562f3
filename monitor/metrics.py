"""Prometheus metrics, `/healthz`, `/livez` and `/readyz`, served from one thread on `metrics.listen`.

Per-lock gauges describe the last pass that completed (`last_success_timestamp_seconds` dates it),
less the locks released since: a scrape sees one pass whole, a released lock leaves at once, and a
failed pass (Redis lost) leaves the last known locks in place rather than reading as "no locks".
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import selectors
import socket
import threading
import time
from collections import Counter as Counter_
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from monitor import __version__, gpu, protocol, units
from monitor.alerts import Alerts
from monitor.audit import JsonlFile
from monitor.config import Settings
from monitor.errors import MonitorError
from monitor.events import Event
from monitor.health import Health, State
from monitor.holding import Holding
from monitor.logs import get_logger
from monitor.service import Monitor, PassReport
from monitor.verdict import Verdict

# `_created` series double every counter's cardinality and nobody alerts on them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "gpulock_monitor"
log = get_logger("gpulock_monitor.metrics")


class _Passes(Collector):
    """What the passes found: the per-lock gauges, `locks_held` and `redis_up`.

    Fed by `apply` with each pass's report (the daemon's runner calls it through
    `Metrics.observe`; a scrape also applies the monitor's latest report, once) and by `forget`
    when a lock is released. Every family is absent until the first pass."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self._lock = threading.Lock()
        self._applied: PassReport | None = None
        # The last complete pass's locks, less those released since (by lock, as protocol.shown
        # names it): read from the report at a scrape, not at every pass.
        self._locks: PassReport | None = None
        self._dropped: set[str] = set()
        self._redis_up: bool | None = None

    def apply(self, report: PassReport | None) -> None:
        if report is None:  # skipped while backing off from a Redis outage: nothing new
            return
        with self._lock:
            if report is self._applied:
                return
            self._applied = report
            self._redis_up = not report.redis_down
            if report.error is None:
                self._locks, self._dropped = report, set()
            for key in report.released_keys:  # a failed pass may still have released some
                self._dropped.add(protocol.shown(key))

    def forget(self, lock: str) -> None:
        """A lock released: its series leave now, not at the next pass."""
        with self._lock:
            self._dropped.add(lock)

    def collect(self) -> Iterator[Metric]:
        self.apply(self.monitor.last_report)
        with self._lock:
            locks, dropped = self._locks, set(self._dropped)
            redis_up = self._redis_up
        if redis_up is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_redis_up", "1 if the last pass reached Redis (absent before the first pass).", redis_up
            )
        if locks is not None:
            yield from _lock_families(locks, dropped)


def _lock_families(locks: PassReport, dropped: set[str]) -> Iterator[Metric]:
    """The per-lock gauges of a pass's locks, less those released since. Held time, heartbeat age
    and TTL are as of the pass (service.PassReport.verdicts): a verdict carried from an earlier look
    has its clock moved on by `moved` ms."""

    def rows() -> Iterator[tuple[str, Verdict, int]]:
        for v, moved in locks.moved():
            lock = protocol.shown(v.holding.key)
            if lock not in dropped:
                yield lock, v, moved

    def gauge(name: str, documentation: str, of: Callable[[Holding, int], float | None]) -> GaugeMetricFamily:
        values = (([lock], x) for lock, v, moved in rows() if (x := of(v.holding, moved)) is not None)
        return _lazy(f"{PREFIX}_{name}", documentation, ["lock"], values)

    yield gauge("lock_held_seconds", "How long the current holding has lasted.", lambda h, m: units.to_s(h.held_ms + m))
    yield gauge(
        "lock_heartbeat_age_seconds",
        "Seconds since the holder's heartbeat last changed.",
        lambda h, m: None if h.hb_age_ms is None else units.to_s(h.hb_age_ms + m),
    )
    yield gauge(
        "lock_ttl_seconds",
        "Seconds until Redis expires the lock, as the pass saw it; -1 when it has no expiry.",
        lambda h, m: -1 if h.expiry_ms < 0 else units.to_s(max(0, h.expiry_ms - h.now_ms - m)),
    )
    info = (
        ([lock, protocol.shown(protocol.task_name(v.holding.holder)), v.decision.tier.value], 1.0)
        for lock, v, _ in rows()
    )
    yield _lazy(f"{PREFIX}_lock_info", "1 for each lock held, with its task and tier.", ["lock", "task", "tier"], info)
    count = GaugeMetricFamily(
        f"{PREFIX}_locks_held", "Locks held at the last pass, by heartbeat state.", labels=["heartbeat"]
    )
    states = Counter_(v.holding.heartbeat.value for _, v, _ in rows())
    for state in ("alive", "dead", "none"):
        count.add_metric([state], states[state])
    yield count


def _lazy(
    name: str, documentation: str, labels: list[str], samples: Iterator[tuple[list[str], float]]
) -> GaugeMetricFamily:
    """A gauge family whose samples are made as the exposition reads them, once: 10,000 locks are
    40,000 samples, and made all at once they were most of a scrape's memory."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    made = (Sample(name, dict(zip(labels, values, strict=True)), value) for values, value in samples)
    family.samples = made  # type: ignore[assignment]
    return family


class _Gpus(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.hostname = gpu.node_name()

    def collect(self) -> Iterator[Metric]:
        gpus = self.monitor.gpus.last if self.monitor.gpus is not None else {}
        labels = list(gpu.METRIC_LABELS)
        used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels)
        total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=labels)
        util = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_ratio", "GPU busy fraction, 0 to 1 (NVML).", labels=labels)
        procs = GaugeMetricFamily(f"{PREFIX}_gpu_processes", "Compute processes on the GPU (NVML).", labels=labels)
        for _, g in sorted(gpus.items()):
            key = gpu.metric_labels(g, self.hostname)
            if g.memory_used_bytes is not None:
                used.add_metric(key, g.memory_used_bytes)
            if g.memory_total_bytes is not None:
                total.add_metric(key, g.memory_total_bytes)
            if g.utilization_pct is not None:
                util.add_metric(key, g.utilization_pct / 100)
            if g.processes is not None:
                procs.add_metric(key, len(g.processes))
        yield from (used, total, util, procs)


class _Holders(Collector):
    """Hung-holder findings true at the last pass, and which local GPU each lock guards, labelled
    as dcgm-exporter labels its series: `gpulock_monitor_lock_gpu_info * on (UUID) group_left(lock)`
    puts a lock's name on every DCGM series of its GPU."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.hostname = gpu.node_name()

    def collect(self) -> Iterator[Metric]:
        holders = self.monitor.holders
        findings = GaugeMetricFamily(
            f"{PREFIX}_holder_findings",
            "1 for each hung-holder finding true of a lock at the last pass.",
            labels=["lock", "finding"],
        )
        on_gpu = GaugeMetricFamily(
            f"{PREFIX}_lock_gpu_info",
            "1 for each lock held that guards a GPU of this host, with dcgm-exporter's GPU labels.",
            labels=["lock", *gpu.METRIC_LABELS],
        )
        if holders is not None:
            for key, found in sorted(holders.current.items()):
                for f in found:
                    findings.add_metric([protocol.shown(key), f.finding.value], 1)
            for key, g in sorted(holders.lock_gpus.items()):
                on_gpu.add_metric([protocol.shown(key), *gpu.metric_labels(g, self.hostname)], 1)
        yield from (findings, on_gpu)


class _AuditFiles(Collector):
    """The audit and critical-failure files: lines held back by a failing disk, failed writes, lines lost."""

    def __init__(self, files: dict[str, JsonlFile]) -> None:
        self.files = files

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            f"{PREFIX}_audit_pending_lines",
            "Lines the file refused so far, held in memory until a write succeeds.",
            labels=["file"],
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_audit_write_failures", "Writes to the file that failed.", labels=["file"]
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_audit_dropped_lines", "Lines lost: more were pending than memory keeps.", labels=["file"]
        )
        for name, file in self.files.items():
            pending.add_metric([name], file.pending)
            failures.add_metric([name], file.failures)
            dropped.add_metric([name], file.dropped)
        yield from (pending, failures, dropped)


# The config settings rules and dashboards need (gpulock_monitor_config_seconds{setting}).
CONFIG_SECONDS = {
    "monitor_interval": "monitor_interval_s",
    "warning": "warning_s",
    "soft_timeout": "soft_timeout_s",
    "hard_timeout": "hard_timeout_s",  # absent with `hard_timeout: null`
    "heartbeat_timeout": "heartbeat_timeout_s",
}


def _config_seconds(settings: Settings) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        f"{PREFIX}_config_seconds", "The daemon's intervals and thresholds, in seconds.", labels=["setting"]
    )
    for setting, attribute in CONFIG_SECONDS.items():
        value = getattr(settings, attribute)
        if value is not None:
            family.add_metric([setting], value)
    return family


class _Static(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


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


class _Discovery:
    """How locks are found (README "How it finds locks"): the event watcher's progress."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        progress = getattr(self.monitor.discovery, "progress", None)
        state = "off" if progress is None or progress.state is None else progress.state.state
        mode = "events" if progress is not None and progress.complete and state == "on" else "scan"
        info = GaugeMetricFamily(
            f"{PREFIX}_discovery_info",
            "How locks are found: mode events (keyspace notifications) or scan (a SCAN every pass).",
            labels=["mode", "notifications"],
        )
        info.add_metric([mode, state], 1)
        yield info
        if progress is None:
            return
        for name, kind, value, text in (
            ("keyspace_events", "counter", progress.events, "Keyspace events and marks received."),
            ("index_locks", "gauge", progress.index_size, "Lock keys in the index."),
            ("reconcile_sweeps", "counter", progress.sweeps, "Reconcile SCAN sweeps ended."),
            ("reconcile_sweep_keys", "gauge", progress.sweep_keys, "Keys examined by the sweep under way."),
            ("reconcile_found", "counter", progress.found_by_reconcile, "Locks found by a sweep, not an event."),
            ("subscriptions", "counter", progress.resubscribes, "Keyspace subscriptions made (1 + resubscriptions)."),
        ):
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"{PREFIX}_{name}", text, value=value)


class Metrics:
    """The daemon's metrics; `observe` after each pass, `on_event` for every audited event."""

    def __init__(self, monitor: Monitor, alerts: Alerts | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Only what this daemon audits: `manual_release` is audited by the `release` command's
        # own process, and is in the audit log, never here.
        self.events = Counter(f"{PREFIX}_events", "Events this daemon audited, by name.", ["event"], registry=r)
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
        self.release_delay = Histogram(
            f"{PREFIX}_release_delay_seconds",
            "From when a release fell due (heartbeat expiry or staleness, tier boundary) to the release.",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.last_success = Gauge(
            f"{PREFIX}_last_success_timestamp_seconds",
            "Unix time the last pass that completed began (0 before one has).",
            registry=r,
        )
        self.failing = Gauge(f"{PREFIX}_failing_releases", "Releases still failing after max_retry.", registry=r)
        Info(f"{PREFIX}_build", "Version of gpulock-monitor.", registry=r).info({"version": __version__})
        self.passes = _Passes(monitor)
        r.register(self.passes)
        r.register(_AuditFiles({"audit": monitor.audit.file, "critical": monitor.critical}))
        r.register(_Static([_config_seconds(monitor.settings)]))
        r.register(_Gpus(monitor))
        r.register(_Holders(monitor))
        r.register(_Discovery(monitor))
        if alerts is not None:
            r.register(_Alerts(alerts))
        self.monitor = monitor
        monitor.listeners.append(self.on_event)

    def on_event(self, event: Event, fields: dict[str, Any]) -> None:
        self.events.labels(event.value).inc()
        if event in (Event.LOCK_RELEASED, Event.RELEASE_SKIPPED, Event.RELEASE_FAILED):
            outcome = "failed" if event is Event.RELEASE_FAILED else str(fields.get("outcome"))
            self.releases.labels(str(fields.get("reason")), outcome).inc()
            if event is Event.LOCK_RELEASED and outcome == "released":
                self.passes.forget(str(fields.get("lock_key")))
                late = fields.get("late_s")
                if isinstance(late, (int, float)):
                    self.release_delay.observe(late)

    def observe(self, report: PassReport | None) -> None:
        self.passes.apply(report)
        if report is None:  # skipped while backing off
            return
        self.pass_duration.observe(report.duration_s)
        if report.error:
            self.pass_errors.inc()
        else:
            self.last_success.set(report.started)
        self.failing.set(self.monitor.failing_releases)


# One thread serves every connection (a selector), so idle or slow clients cost a socket each,
# never a thread. A connection has IDLE_TIMEOUT_S from its connect to send a whole request (at
# most MAX_REQUEST_BYTES), and as long again after each write of the answer that makes progress;
# past MAX_CONNECTIONS the one idle longest is closed to make room for the newcomer.
MAX_CONNECTIONS = 256
IDLE_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 8192
_NOT_FOUND = b"not found: try /metrics, /healthz, /livez or /readyz\n"
# A probe answers (ok, reason): /livez and /readyz say 200 or 503 with the reason.
Probe = Callable[[], tuple[bool, str]]


class _One(Collector):
    """One family as a registry of its own (what `generate_latest` formats)."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


def exposition(registry: CollectorRegistry) -> list[bytes]:
    """`generate_latest(registry)`, one piece per family: its text is made a family at a time, and
    never joined. 10,000 locks are 40,000 lines (some 3 MB): all made at once, then joined, encoded
    and copied behind the HTTP head, they took four times that at each scrape."""
    return [prometheus_client.generate_latest(_One(family)) for family in registry.collect()]


class _Connection:
    __slots__ = ("done", "head", "inbox", "last", "outbox", "sock")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbox = b""
        self.outbox: collections.deque[memoryview] = collections.deque()  # what is left to send, in order
        self.last = now
        self.head = False  # a HEAD request: no body
        self.done = False  # answered: what still arrives is read and dropped until the client closes


class _Server:
    """A small HTTP/1.1 server for GET /metrics and /healthz: one request per connection."""

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        health: Callable[[], Health],
        probes: dict[bytes, Probe],
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.listener = socket.create_server(address, family=family, backlog=128)
        self.listener.setblocking(False)
        self.metrics = metrics
        self.health = health
        self.probes = probes
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        self.connections: dict[socket.socket, _Connection] = {}
        self._stopping = False

    # --- the loop -------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self._stopping:
                for key, events in self.selector.select(timeout=1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self.listener:
                        self._accept()
                    elif sock is self._wake_r:
                        self._drain_wakeups()
                    elif (conn := self.connections.get(sock)) is not None:  # None: closed earlier in this round
                        self._serve(conn, events)
                self._expire(time.monotonic())
        finally:
            for conn in list(self.connections.values()):
                self._close(conn)
            self.selector.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _serve(self, conn: _Connection, events: int) -> None:
        try:
            if events & selectors.EVENT_WRITE:
                self._write(conn)
            elif events & selectors.EVENT_READ:
                self._read(conn)
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("metrics_connection_failed")
            self._close(conn)

    def shutdown(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(64)

    def _accept(self) -> None:
        for _ in range(64):  # a burst of connections: take what is there, then serve the others
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: drop the oldest, try later
                log.warning("metrics_accept_failed", error=str(exc))
                self._close_oldest()
                return
            if len(self.connections) >= MAX_CONNECTIONS:
                self._close_oldest()
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic())
            self.connections[sock] = conn
            self.selector.register(sock, selectors.EVENT_READ)

    def _close_oldest(self) -> None:
        if self.connections:
            self._close(min(self.connections.values(), key=lambda c: c.last))

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.connections.values() if now - c.last > IDLE_TIMEOUT_S]:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self.connections.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:  # the client closed: after reading the answer, or before asking a whole question
            self._close(conn)
            return
        if conn.done:  # after the answer: dropped until the client closes (or IDLE_TIMEOUT_S)
            return
        # `last` stays the time of the connect: a request trickled in byte by byte gets no longer.
        conn.inbox += data
        end = conn.inbox.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbox.find(b"\n\n")
        if end < 0:
            if len(conn.inbox) > MAX_REQUEST_BYTES:
                self._respond(conn, 400, "text/plain", b"request too large\n")
            return
        self._respond(conn, *self._answer(conn, conn.inbox[:end]))

    def _write(self, conn: _Connection) -> None:
        outbox = conn.outbox
        while outbox:
            piece = outbox[0]
            try:
                sent = conn.sock.send(piece)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            conn.last = time.monotonic()
            if sent < len(piece):
                outbox[0] = piece[sent:]  # a view: the rest is not copied
                return
            outbox.popleft()
        # Half-close and wait for the client's own close: closing now, with bytes of its still
        # unread, would send a reset that can destroy the answer in flight.
        conn.done = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            self.selector.modify(conn.sock, selectors.EVENT_READ)
        except OSError:
            self._close(conn)

    # --- HTTP -------------------------------------------------------------------------------------

    def _answer(self, conn: _Connection, head: bytes) -> tuple[int, str, bytes | list[bytes]]:
        parts = head.split(b"\n", 1)[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        conn.head = method == b"HEAD"
        try:
            if target == b"/metrics":
                return 200, prometheus_client.CONTENT_TYPE_LATEST, exposition(self.metrics.registry)
            if target == b"/healthz":
                health = self.health()
                doc = {"state": health.state.name.lower(), "code": int(health.state), "reason": health.reason}
                return 503 if health.state is State.CRITICAL else 200, "application/json", json.dumps(doc).encode()
            probe = self.probes.get(target)
            if probe is not None:
                ok, reason = probe()
                return (200 if ok else 503), "text/plain", f"{'ok' if ok else 'failing'}: {reason}\n".encode()
        except Exception:  # a collector's bug: one 500, logged with its traceback; the server goes on
            log.exception("metrics_request_failed", path=protocol.text(target))
            return 500, "text/plain", b"internal error\n"
        return 404, "text/plain", _NOT_FOUND

    def _respond(self, conn: _Connection, code: int, content_type: str, body: bytes | list[bytes]) -> None:
        pieces = [body] if isinstance(body, bytes) else body
        head = (
            f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {sum(len(p) for p in pieces)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        conn.outbox = collections.deque(memoryview(p) for p in [head, *([] if conn.head else pieces)] if p)
        conn.inbox = b""
        self.selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(conn)


def serve(
    listen: str,
    metrics: Metrics,
    health: Callable[[], Health],
    *,
    live: Probe | None = None,
    ready: Probe | None = None,
) -> Callable[[], None]:
    """Start serving in one thread; returns the function that stops it.

    /healthz is the operator's judgement (critical while Redis is down). Kubernetes gets two
    narrower probes: /livez fails only when passes stopped completing (a restart may help), and
    /readyz while Redis is unreachable or no pass has completed yet (a restart would not help).
    """
    probes = {path: probe for path, probe in ((b"/livez", live), (b"/readyz", ready)) if probe is not None}
    host, _, port = listen.rpartition(":")
    try:
        server = _Server((host.strip("[]"), int(port)), metrics, health, probes)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)  # create_server appends the address
        raise MonitorError(f"metrics.listen: cannot listen on {listen}: {why}") from None
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)

    return stop
