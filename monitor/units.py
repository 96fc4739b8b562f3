"""Time in one place: seconds and milliseconds, Redis TIME, ISO 8601, and durations people write.

Internally time is Redis-clock milliseconds (ints, exact) or seconds (floats, for people and
config). Stdlib only: the worker client imports it.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Protocol

_SPAN = re.compile(r"(\d+(?:\.\d+)?)(ms|[smhdw])")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _HasTime(Protocol):
    def time(self) -> Any: ...


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def to_s(ms: float) -> float:
    return ms / 1000


def ms_of_time(seconds: Any, micros: Any) -> int:
    """A Redis TIME reply (seconds, microseconds; bytes or ints) as whole milliseconds."""
    return int(seconds) * 1000 + int(micros) // 1000


def redis_time_ms(client: _HasTime) -> int:
    """Now on Redis's clock, the only clock held time is measured on (DESIGN.md section 3)."""
    return ms_of_time(*client.time())


def iso(timestamp: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds: the audit log's and alerts' `ts`."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def parse_iso(text: str) -> float:
    """ISO 8601 (a trailing Z allowed; naive means UTC) as epoch seconds; ValueError otherwise."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def parse_span(text: str) -> float | None:
    """Seconds from a span such as `90s`, `1m30s`, `2h`, `1d12h`, `250ms`; None if it is not one."""
    spans = _SPAN.findall(text)
    if not spans or "".join(n + u for n, u in spans) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in spans)


def human(seconds: float) -> str:
    """A short duration for people: 42.0s, 5m12s, 2h05m, 3d04h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
