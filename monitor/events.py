"""Audit event names (DESIGN.md section 7), each with the level it is logged at and the alert it raises.

One table: the daemon records by these names, alerts and metrics read them. A name is public
(operators grep the audit log for it): add, never rename.
"""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    """An audit event: `level` for the log line, `alert` the severity of its page (None: none).

    Alerts refine a few by their fields (a hard-cap release is critical; see alerts.severity).
    """

    level: str
    alert: str | None

    def __new__(cls, name: str, level: str, alert: str | None) -> Event:
        member = str.__new__(cls, name)
        member._value_ = name
        member.level = level
        member.alert = alert
        return member

    MONITOR_STARTED = ("monitor_started", "info", None)
    MONITOR_STOPPED = ("monitor_stopped", "info", None)
    LOCK_WARNING = ("lock_warning", "warning", "warning")
    LONG_TASK_PROTECTED = ("long_task_protected", "info", None)
    LONG_TASK_OVERRUN = ("long_task_overrun", "warning", "warning")  # protected, and no cap will end it
    LOCK_RELEASED = ("lock_released", "warning", "warning")
    RELEASE_SKIPPED = ("release_skipped", "info", None)
    RELEASE_FAILED = ("release_failed", "error", None)  # critical once the retries are spent
    MANUAL_RELEASE = ("manual_release", "warning", None)
    REDIS_UNAVAILABLE = ("redis_unavailable", "error", None)
    REDIS_RECOVERED = ("redis_recovered", "warning", None)
    INVALID_LOCK = ("invalid_lock", "warning", "warning")
    LOCK_TIMEOUT_MISMATCH = ("lock_timeout_mismatch", "warning", None)
    # How locks are found: keyspace events (on) or a SCAN every pass (off, partial); said when it changes.
    KEYSPACE_NOTIFICATIONS = ("keyspace_notifications", "warning", None)
    GPU_BUSY_UNLOCKED = ("gpu_busy_unlocked", "warning", "warning")
    RELEASED_GPU_BUSY = ("released_gpu_busy", "warning", "warning")
    # Hung holders (monitor.hang): each once per holding. Two holders on one GPU is an incident.
    HOLDER_STALLED = ("holder_stalled", "warning", "warning")
    HOLDER_NOT_ON_GPU = ("holder_not_on_gpu", "warning", "warning")
    GPU_IDLE_HELD = ("gpu_idle_held", "warning", "warning")
    GPU_FOREIGN_PROCESS = ("gpu_foreign_process", "error", "critical")
    GPU_XID = ("gpu_xid", "error", "warning")
    # Raised by the alerter itself while Redis stays down; never written to the audit log.
    REDIS_UNAVAILABLE_LONG = ("redis_unavailable_long", "error", "critical")
