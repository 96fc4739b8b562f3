"""`gpulock-monitor run`: one APScheduler interval job, systemd notify, metrics, clean stops.

Signals: SIGTERM/SIGINT finish the pass in progress and stop; SIGHUP reopens the audit files
(for an external logrotate).

Exit status: 0, or 1 when the pass of `--once` failed or when audit or critical-failure lines
could not be written by the time the monitor stopped (a full or read-only disk): the log on
stdout/journald still holds those events, and stderr says how many lines the files lack.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType

import redis
from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from monitor import allocator, channels, protocol, systemd
from monitor.alerts import Alerts
from monitor.audit import AuditLog, JsonlFile
from monitor.cluster_watch import ClusterWatcher
from monitor.config import Settings
from monitor.connection import connect, is_cluster
from monitor.errors import MonitorError
from monitor.events import Event
from monitor.evidence import Holders
from monitor.gpu import Nvml
from monitor.gpuwatch import GpuWatch
from monitor.hang import HangWatch
from monitor.health import Health, assess, mark_stopped, pass_grace_s
from monitor.jobmap import JobMap
from monitor.logs import get_logger
from monitor.notify import NotifyState
from monitor.pidwatch import PidWatch
from monitor.service import Monitor, PassReport
from monitor.watcher import Watcher

log = get_logger("gpulock_monitor")


def open_logs(settings: Settings, *, dry_run: bool) -> tuple[AuditLog, JsonlFile]:
    """Open the audit and critical-failure files now, so a bad path stops the start."""
    files = []
    for option, path in (("audit.path", settings.audit_path), ("audit.critical_path", settings.critical_path)):
        file = JsonlFile(path, max_bytes=settings.audit_max_bytes, backups=settings.audit_backups)
        try:
            file.open()
        except OSError as exc:
            raise MonitorError(f"{option}: cannot open {path}: {exc.strerror or exc}") from None
        files.append(file)
    return AuditLog(files[0], dry_run=dry_run, name=settings.name), files[1]


def build_monitor(settings: Settings, *, dry_run: bool) -> Monitor:
    audit, critical = open_logs(settings, dry_run=dry_run)
    # Xid events need a thread of their own: only the daemon watches them.
    nvml = Nvml(settings.nvml_enabled, xid_events=True)
    gpus = GpuWatch(nvml, settings.nvml_devices, settings.nvml_busy_grace_s)
    jobs = JobMap(Path(settings.job_mapping_dir)) if settings.job_mapping_dir else None
    holders = Holders(HangWatch(settings.hang), gpus=gpus, jobs=jobs)
    return Monitor(settings, connect(settings), audit, critical, gpus=gpus, holders=holders)


def start_pid_watch(monitor: Monitor) -> PidWatch | None:
    """Watch the processes of local holders: an exit is a dead heartbeat at once (README "Hung holders")."""
    if monitor.holders is None:
        return None
    pids = PidWatch(monitor.holder_exited)
    monitor.holders.pids = pids
    pids.start()
    return pids


class Runner:
    """Wraps each pass: keeps time of completed passes, feeds metrics, tells systemd."""

    def __init__(
        self,
        monitor: Monitor,
        observe: Callable[[PassReport | None], None] | None = None,
        alerts: Alerts | None = None,
        after_first: Callable[[], object] | None = None,
    ) -> None:
        self.monitor = monitor
        self.observe = observe
        self.alerts = alerts
        self.after_first = after_first  # called once, when the first pass has completed
        self.ready = threading.Event()
        self.last_end = monitor.mono()
        self.started: float | None = None  # when the pass in progress began (monotonic)

    def __call__(self) -> None:
        self.started = self.monitor.mono()
        try:
            report = self.monitor.run_pass()
        finally:
            self.started = None
        self.last_end = self.monitor.mono()
        if self.observe is not None:
            self.observe(report)
        if self.alerts is not None:
            self.alerts.redis_down(self.monitor.down_for_s(), self.monitor.redis_error)
        if report is None:
            log.debug("pass_skipped", reason="backing off while Redis is unavailable")
            return
        log.debug(
            "pass_done",
            locks=report.locks,
            released=report.released,
            invalid=report.invalid,
            duration_s=round(report.duration_s, 4),
            error=report.error,
        )
        systemd.notify(f"STATUS={summary(report)}")
        if not self.ready.is_set():
            if self.after_first is not None:
                self.after_first()
            self.ready.set()
            systemd.notify("READY=1")

    def skipped(self, _event: object = None) -> None:
        """The scheduler skipped a pass because the last one still runs (APScheduler's own line
        is dropped in logs.py): say how long that one has taken, every interval it goes on."""
        started = self.started
        log.warning(
            "pass_skipped_still_running",
            running_s=None if started is None else round(self.monitor.mono() - started, 1),
            monitor_interval_s=self.monitor.settings.monitor_interval_s,
        )

    def progressing(self) -> bool:
        """True while passes keep completing; a hung pass makes this False."""
        return self.monitor.mono() - self.last_end < pass_grace_s(self.monitor.settings.monitor_interval_s)

    def live(self) -> tuple[bool, str]:
        """/livez: the process runs and its passes complete (a hung pass fails it)."""
        if self.progressing():
            return True, "passes completing"
        return False, f"no pass completed for {self.monitor.mono() - self.last_end:.0f} s"

    def is_ready(self) -> tuple[bool, str]:
        """/readyz: a pass has completed and Redis answers."""
        m = self.monitor
        if m.redis_error is not None:
            return False, f"redis unavailable: {protocol.printable(m.redis_error, 300)}"
        if m.last_success is None:
            return False, "no pass completed yet"
        return True, "redis reachable, passes completing"

    def health(self) -> Health:
        m = self.monitor
        report = m.last_report
        verdicts = [v for v in report.verdicts if v.holding.key not in report.released_keys] if report else []
        age = None if m.last_success is None else max(0.0, m.wall() - m.last_success)
        if not self.progressing() and age is not None:
            age = max(age, m.mono() - self.last_end)
        return assess(
            m.settings,
            redis_error=m.redis_error,
            last_pass_age_s=age,
            failing_releases=m.failing_releases,
            verdicts=verdicts,
            discovery=m.discovery_mode(),
        )


GC_THRESHOLDS = (100_000, 50, 100)
# How long the start waits for the event watcher's first SCAN before the first pass (which SCANs
# by itself if the index is not complete by then).
SEED_WAIT_S = 5.0


def start_watcher(monitor: Monitor) -> Watcher | ClusterWatcher | None:
    """The event-driven core where it can run; otherwise passes SCAN, and the audit says why. In
    Redis Cluster, one watcher per primary (cluster_watch.py)."""
    settings = monitor.settings

    def said(state: NotifyState) -> None:
        mode = "events" if state.on else "scan"
        monitor.record(
            Event.KEYSPACE_NOTIFICATIONS, state=state.state, missing=state.missing, reason=state.reason, discovery=mode
        )

    if settings.notifications == "off":
        said(NotifyState("off", "", "discovery.notifications is off: a SCAN every pass"))
        return None
    watcher: Watcher | ClusterWatcher
    if is_cluster(monitor.client):
        watcher = ClusterWatcher(monitor, settings, on_state=said)  # a cluster has database 0 only
    else:
        db = int(monitor.client.connection_pool.connection_kwargs.get("db", 0))  # type: ignore[union-attr]
        watcher = Watcher(monitor, settings, db=db, on_state=said)
    watcher.test_now()  # said at start, right after monitor_started, where Redis answers
    monitor.discovery = watcher
    watcher.start()
    if watcher.progress.state is not None and watcher.progress.state.on:
        watcher.wait_complete(timeout_s=SEED_WAIT_S)  # the first pass reads the index, not the keyspace
    return watcher


def summary(report: PassReport) -> str:
    if report.error:
        return f"pass failed: {report.error}"[:200]
    return f"{report.locks} locks, {report.released} released, pass {report.duration_s * 1000:.0f} ms"


def run(settings: Settings, *, dry_run: bool = False, once: bool = False, stop: threading.Event | None = None) -> int:
    """Run the daemon until `stop` is set (or a signal arrives); the process exit code."""
    if not settings.enabled:
        log.warning("monitor_disabled", reason="gpu_lock_monitor.enabled is false; nothing to do")
        return 0
    stop = stop or threading.Event()
    reopen = threading.Event()
    # A pass over 10,000 locks allocates some 100,000 short-lived objects among as many kept ones
    # (records, verdicts): at the default thresholds the cyclic collector ran often enough to be
    # more than half of the pass's CPU (README "Performance"). Nothing here relies on it promptly.
    gc.set_threshold(*GC_THRESHOLDS)
    after_first = _own_allocator()
    # Before monitor_started: a SIGTERM that arrives once the start is visible must stop cleanly.
    _on_signals(stop, reopen)
    monitor = build_monitor(settings, dry_run=dry_run)
    if once:
        _lifecycle(monitor, Event.MONITOR_STARTED)
        report = monitor.run_pass()
        _lifecycle(monitor, Event.MONITOR_STOPPED)
        error = None if report is None else report.error
        if error:
            log.error("pass_failed", error=error)
        return 1 if _unwritten(monitor) or error else 0

    alerts = start_alerts(monitor)
    stop_http: Callable[[], None] | None = None
    runner = Runner(monitor, alerts=alerts, after_first=after_first)
    if settings.metrics_enabled:
        from monitor import metrics  # noqa: PLC0415 - prometheus_client only where metrics are on

        exporter = metrics.Metrics(monitor, alerts)
        stop_http = metrics.serve(
            settings.metrics_listen, exporter, runner.health, live=runner.live, ready=runner.is_ready
        )
        runner.observe = exporter.observe
    _lifecycle(monitor, Event.MONITOR_STARTED)
    # The holders' pid watch, then the event watcher (its first index read before the first pass:
    # its reads see the holder records, and start the watches).
    threads = [t for t in (start_pid_watch(monitor), start_watcher(monitor)) if t is not None]
    scheduler = _scheduler(runner, settings)
    scheduler.start()
    period = systemd.watchdog_period_s()
    tick = min(1.0, period) if period else 1.0
    try:
        while not stop.wait(tick):
            if reopen.is_set():
                reopen.clear()
                monitor.audit.file.reopen()
                monitor.critical.reopen()
                log.info("audit_reopened")
            if period and runner.progressing():
                systemd.notify("WATCHDOG=1")
    finally:
        systemd.notify("STOPPING=1")
        for thread in threads:
            thread.stop()  # after its release in progress, if any
        # wait=True lets a pass in progress finish: a release is never cut in half.
        scheduler.shutdown(wait=True)
        _lifecycle(monitor, Event.MONITOR_STOPPED)
        _say_stopped(monitor)
        if alerts is not None:
            alerts.stop(timeout_s=5.0)
        if stop_http is not None:
            stop_http()
    return 1 if _unwritten(monitor) else 0


def _own_allocator() -> Callable[[], object] | None:
    """glibc's malloc as a daemon of its own wants it (allocator.py: one arena, fixed thresholds),
    and what hands the first pass's peak back once it is done. Embedded (tests, the demo), the
    process is the caller's: left as it is."""
    if threading.current_thread() is not threading.main_thread():
        return None
    log.debug("allocator_tuned", settings=allocator.tune())
    return allocator.trim


def _scheduler(runner: Runner, settings: Settings) -> BackgroundScheduler:
    """One interval job, the first run at once; a run due while the last still runs is skipped
    (coalesced) and said by the runner."""
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    scheduler.add_job(
        runner,
        IntervalTrigger(seconds=settings.monitor_interval_s),
        id="pass",
        next_run_time=datetime.now(timezone.utc),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    scheduler.add_listener(runner.skipped, EVENT_JOB_MAX_INSTANCES)
    return scheduler


def start_alerts(monitor: Monitor) -> Alerts | None:
    """Alert delivery for the configured channels (None without any), listening to the monitor."""
    settings = monitor.settings
    if not settings.alert_channels:
        return None
    client = monitor.client

    def claim(digest: str) -> bool:
        # Replicas and restarts share this: the first to claim an alert sends it.
        return bool(client.set(protocol.MONITOR_PREFIX + b"alerted:" + digest.encode(), b"1", nx=True, ex=86400))

    alerts = Alerts(
        settings,
        channels.build(settings.alert_channels, os.environ),
        host=str(monitor.audit.identity["host"]),
        claim=claim,
    ).start()
    monitor.listeners.append(alerts.on_event)
    return alerts


def _lifecycle(monitor: Monitor, event: Event) -> None:
    s = monitor.settings
    monitor.record(
        event,
        sync=True,
        dry_run=monitor.dry_run,
        key_pattern=s.key_pattern,
        monitor_interval_s=s.monitor_interval_s,
        timeout_levels={"warning": s.warning_s, "soft_timeout": s.soft_timeout_s, "hard_timeout": s.hard_timeout_s},
    )
    if event == "monitor_stopped":
        monitor.audit.file.close()
        monitor.critical.close()


def _say_stopped(monitor: Monitor) -> None:
    """The status key says the daemon stopped, so `health` tells at once instead of calling it
    healthy until its last pass goes stale. Redis may be gone: the stop goes on."""
    try:
        mark_stopped(monitor.client, monitor.settings, monitor.audit.identity, monitor.wall())
    except redis.RedisError as exc:
        log.warning("stopped_state_not_written", error=str(exc))
    if monitor.holders is not None:
        monitor.holders.close()  # dcgm-exporter: no holder is known once the daemon is gone


def _unwritten(monitor: Monitor) -> int:
    """Audit and critical-failure lines that never reached their files, said in one line on
    stderr when there are any (the exit status says it to scripts and systemd)."""
    lost = [(f.pending + f.dropped, f.error) for f in (monitor.audit.file, monitor.critical) if f.pending + f.dropped]
    if lost:
        why = "; ".join(f"{count} line(s) not written: {error}" for count, error in lost)
        print(f"gpulock-monitor: {why} (the log on stdout has them)", file=sys.stderr)
    return sum(count for count, _ in lost)


def _on_signals(stop: threading.Event, reopen: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # embedded (tests, demo): the caller owns `stop`

    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            reopen.set()
            return
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
