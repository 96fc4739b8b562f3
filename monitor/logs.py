"""structlog set-up: JSON lines for journald, readable console output on a terminal.

Standard-library loggers (APScheduler, redis-py) go through the same renderer. Tracebacks
are rendered as plain text without local variables, so no secret held in a local leaks, and every
string of an event goes through `redact.redact` (a password in a URL, a token in a query).

Under systemd (`$JOURNAL_STREAM` names the very stream written to) each line starts with its
syslog priority, `<N>`, which journald strips and keeps as the entry's PRIORITY: `journalctl -p
warning` then shows warnings and worse. APScheduler's own "skipped: maximum number of running
instances reached" is dropped here: the daemon says it as `pass_skipped_still_running`, with how
long the running pass has taken.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from monitor.redact import redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# syslog priorities (sd-daemon(3)) of the standard library's levels.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

JOURNAL_ENV = "JOURNAL_STREAM"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a level between two takes the more severe one)."""
    for level in sorted(_PRIORITIES, reverse=True):
        if levelno >= level:
            return _PRIORITIES[level]
    return _PRIORITIES[logging.DEBUG]


def writes_to_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal stream systemd connected: `$JOURNAL_STREAM` is its
    `device:inode` (a child of the service whose output goes elsewhere inherits the variable, but
    not the stream)."""
    env = os.environ if env is None else env
    expected = env.get(JOURNAL_ENV)
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.StringIO has no descriptor
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _JournalFormatter(structlog.stdlib.ProcessorFormatter):
    """Each line starts with `<N>`, the record's syslog priority (journald's SyslogLevelPrefix)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class _SchedulerSkips(logging.Filter):
    """APScheduler's raw line for a run skipped because the last one still runs: the daemon says it
    itself (`pass_skipped_still_running`), with what APScheduler cannot know."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "skipped: maximum number of running instances reached" not in str(record.msg)


_SKIPS = _SchedulerSkips()


def _redacted(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return {k: redact(v) if isinstance(v, str) else v for k, v in event.items()}


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    journal: bool | None = None,
) -> None:
    """`journal`: prefix each line with its syslog priority; None: when `stream` is the journal."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    if journal is None:
        journal = writes_to_journal(stream)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc: list[Any] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        exc = []
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    formatter = _JournalFormatter if journal else structlog.stdlib.ProcessorFormatter
    handler.setFormatter(
        formatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exc, _redacted, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # APScheduler logs every job start and end at INFO; keep its warnings only.
    scheduler = logging.getLogger("apscheduler")
    scheduler.setLevel(max(_LEVELS[level], logging.WARNING))
    skips = logging.getLogger("apscheduler.scheduler")
    if _SKIPS not in skips.filters:
        skips.addFilter(_SKIPS)


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
