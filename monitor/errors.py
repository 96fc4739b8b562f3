"""The project's exceptions: one base, a few named kinds."""


class MonitorError(Exception):
    """Base of every error gpulock-monitor raises on purpose."""


class ConfigError(MonitorError):
    """The configuration is invalid; the message names the key path and the problem."""


class AuditWriteError(MonitorError):
    """An audit or critical-failure line could not be written whole."""


class ReleaseError(MonitorError):
    """Redis refused or failed the release script (the lock was not released)."""
