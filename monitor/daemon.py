"""`gpulock-monitor run`: one APScheduler interval job, a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timezone
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from monitor.audit import AuditLog, JsonlFile
from monitor.config import Settings
from monitor.connection import connect
from monitor.errors import MonitorError
from monitor.logs import get_logger
from monitor.service import Monitor, PassReport

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
    return AuditLog(files[0], dry_run=dry_run), files[1]


def build_monitor(settings: Settings, *, dry_run: bool) -> Monitor:
    audit, critical = open_logs(settings, dry_run=dry_run)
    return Monitor(settings, connect(settings), audit, critical)


def run(settings: Settings, *, dry_run: bool = False, once: bool = False, stop: threading.Event | None = None) -> int:
    """Run the daemon until `stop` is set (or a signal arrives); the process exit code."""
    if not settings.enabled:
        log.warning("monitor_disabled", reason="gpu_lock_monitor.enabled is false; nothing to do")
        return 0
    stop = stop or threading.Event()
    # Before monitor_started: a SIGTERM that arrives once the start is visible must stop cleanly.
    _on_signals(stop)
    monitor = build_monitor(settings, dry_run=dry_run)
    _lifecycle(monitor, "monitor_started")
    if once:
        report = monitor.run_pass()
        _lifecycle(monitor, "monitor_stopped")
        if report is not None and report.error:
            log.error("pass_failed", error=report.error)
            return 1
        return 0

    scheduler = BackgroundScheduler(timezone=timezone.utc)
    scheduler.add_job(
        lambda: _summarise(monitor.run_pass()),
        IntervalTrigger(seconds=settings.monitor_interval_s),
        id="pass",
        next_run_time=datetime.now(timezone.utc),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    scheduler.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        # wait=True lets a pass in progress finish: a release is never cut in half.
        scheduler.shutdown(wait=True)
        _lifecycle(monitor, "monitor_stopped")
    return 0


def _lifecycle(monitor: Monitor, event: str) -> None:
    s = monitor.settings
    monitor.record(
        event,
        "info",
        sync=True,
        dry_run=monitor.dry_run,
        key_pattern=s.key_pattern,
        monitor_interval_s=s.monitor_interval_s,
        timeout_levels={"warning": s.warning_s, "soft_timeout": s.soft_timeout_s, "hard_timeout": s.hard_timeout_s},
    )
    if event == "monitor_stopped":
        monitor.audit.file.close()
        monitor.critical.close()


def _summarise(report: PassReport | None) -> None:
    if report is None:
        log.debug("pass_skipped", reason="backing off while Redis is unavailable")
    else:
        log.debug(
            "pass_done",
            locks=len(report.verdicts),
            released=report.released,
            invalid=report.invalid,
            duration_s=round(report.duration_s, 4),
            error=report.error,
        )


def _on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # embedded (tests, demo): the caller owns `stop`

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
