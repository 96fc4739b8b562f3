"""Alerts: which audited events page whom, deduplicated, delivered off the scanning path.

The pass only appends to a bounded queue (`submit` never blocks). A thread per channel sends,
with a timeout, retries with backoff and a rate limit, so a hung webhook delays nothing but
its own later alerts. When a queue is full the oldest warning is dropped, never a critical.
Deduplication is per holding and event: in memory on the scanning path, then through Redis
(SET NX, from the sender threads) so monitor replicas and restarts do not page twice.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor import units
from monitor.channels import SECRETS, Channel
from monitor.config import Settings
from monitor.events import Event
from monitor.logs import get_logger
from monitor.redact import redact, secret_fragments

log = get_logger("gpulock_monitor.alerts")

QUEUE_CAPACITY = 1000
DEDUP_MEMORY = 10_000
MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class Alert:
    severity: str  # warning | critical
    event: str
    summary: str
    host: str
    ts: float
    lock_key: str | None = None
    holder: str | None = None
    held_s: float | None = None
    heartbeat: str | None = None
    decision: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def dedup_key(self) -> str:
        return f"{self.event}|{self.lock_key}|{self.holder}|{self.details.get('holding', '')}"

    def document(self) -> dict[str, Any]:
        """The webhook payload, schema version 1."""
        return {
            "version": 1,
            "source": "gpulock-monitor",
            "severity": self.severity,
            "event": self.event,
            "summary": self.summary,
            "ts": units.iso(self.ts),
            "host": self.host,
            "lock_key": self.lock_key,
            "holder": self.holder,
            "held_s": self.held_s,
            "heartbeat": self.heartbeat,
            "decision": self.decision,
            "details": self.details,
        }


def alert_for(event: Event, fields: dict[str, Any], *, host: str, now: float) -> Alert | None:
    """The alert an audited event raises, if any. Pure."""
    level = severity(event, fields)
    if level is None:
        return None
    lock, holder = fields.get("lock_key"), fields.get("holder")
    held, heartbeat = fields.get("held_s"), fields.get("heartbeat")
    decision: dict[str, Any] | None = {k: fields[k] for k in ("tier", "reason", "outcome") if k in fields} or None
    where = f"{lock} held by {holder} for {_ago(held)}, heartbeat {heartbeat}" if lock and holder else str(lock or "")
    summaries = {
        Event.LOCK_WARNING: f"{where}: past the warning threshold",
        Event.LONG_TASK_OVERRUN: f"{where}: protected long task still running",
        Event.LOCK_RELEASED: f"{where}: released ({fields.get('reason')})"
        + (" [dry run: not released]" if fields.get("dry_run") else "")
        + (" [reply lost: outcome unknown until the next pass]" if fields.get("outcome") == "unknown" else ""),
        Event.RELEASE_SKIPPED: f"{where}: heartbeat came back just before release",
        Event.RELEASE_FAILED: f"{where}: RELEASE FAILED after {fields.get('attempt')} attempts: {fields.get('error')}",
        Event.INVALID_LOCK: f"{lock}: not a lock ({fields.get('reason')})",
        Event.GPU_BUSY_UNLOCKED: f"GPU {_gpu(fields)} busy with no lock held for {_ago(fields.get('busy_s'))}",
        Event.RELEASED_GPU_BUSY: f"{lock} released, but GPU {_gpu(fields)} still has processes",
        Event.REDIS_UNAVAILABLE_LONG: f"Redis unreachable for {_ago(fields.get('down_s'))}: {fields.get('error')}",
        **_finding_summaries(where, fields.get("finding") or {}),
    }
    details = {k: v for k, v in fields.items() if k not in ("lock_key", "holder", "held_s", "heartbeat")}
    if event is Event.GPU_BUSY_UNLOCKED:
        details["holding"] = f"gpu{(fields.get('gpu') or {}).get('index')}@{round(now)}"  # one page per episode
    return Alert(
        severity=level,
        event=event.value,
        summary=f"{host}: {summaries.get(event, event.value)}",
        host=host,
        ts=now,
        lock_key=lock,
        holder=holder,
        held_s=held,
        heartbeat=heartbeat,
        decision=decision,
        details=details,
    )


def _finding_summaries(where: str, found: dict[str, Any]) -> dict[Event, str]:
    """What each hung-holder finding's page says (its facts are under `finding` in the event)."""
    return {
        Event.HOLDER_STALLED: f"{where}: no progress mark for {_ago(found.get('silent_s'))}"
        f" (progress timeout {_ago(found.get('progress_timeout_s'))})",
        Event.HOLDER_NOT_ON_GPU: f"{where}: holder pid {found.get('pid')} not on its GPU"
        f" for {_ago(found.get('absent_s'))}",
        Event.GPU_IDLE_HELD: f"{where}: GPU {found.get('kind', 'idle')} for {_ago(found.get('quiet_s'))}",
        Event.GPU_FOREIGN_PROCESS: f"{where}: another process on its GPU (pids "
        f"{', '.join(str(p.get('pid')) for p in found.get('foreign') or [])}): two holders?",
        Event.GPU_XID: f"{where}: Xid {', '.join(str(c) for c in found.get('codes') or [])} on its GPU",
    }


# Releases of a holder that was alive: the hard cap, and a hung-holder finding's `release` rule.
_LIVE_RELEASES = frozenset(
    {"hard_timeout", "holder_stalled", "holder_not_on_gpu", "gpu_idle_held", "gpu_foreign_process", "gpu_xid"}
)


def severity(event: Event, fields: dict[str, Any]) -> str | None:
    """The page `event` raises: the event's own, refined by its fields for releases."""
    if event is Event.LOCK_RELEASED:
        return "critical" if fields.get("reason") in _LIVE_RELEASES and not fields.get("dry_run") else "warning"
    if event is Event.RELEASE_SKIPPED and fields.get("outcome") == "heartbeat_revived":
        return "warning"  # a heartbeat that died and came back: a worker in trouble
    if event is Event.RELEASE_FAILED and fields.get("retries_spent"):
        return "critical"
    return event.alert


def _gpu(fields: dict[str, Any]) -> str:
    gpu = fields.get("gpu") or {}
    procs = gpu.get("processes") or []
    return f"{gpu.get('index')} ({len(procs)} process(es): {', '.join(str(p.get('pid')) for p in procs)})"


def _ago(seconds: object) -> str:
    return units.human(float(seconds)) if isinstance(seconds, (int, float)) else "?"


@dataclass
class ChannelStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0


def channel_secrets(channel: Channel) -> list[str]:
    """What a channel's failure log must never show: its resolved secrets (URL, token, signing
    secret, password, header values), each with the pieces of it an error may quote."""
    values = [channel.options.get(name) for name in SECRETS]
    headers = channel.options.get("headers")
    if isinstance(headers, dict):
        values += list(headers.values())
    pieces = [piece for value in values if isinstance(value, str) and value for piece in secret_fragments(value)]
    urls = channel.options.get("urls")  # apprise's: a token may stand where the host does
    if isinstance(urls, list):
        pieces += [
            piece for url in urls if isinstance(url, str) for piece in secret_fragments(url, host_is_secret=True)
        ]
    return pieces


class _Outbox:
    """One channel's bounded queue and sender thread."""

    def __init__(
        self,
        channel: Channel,
        capacity: int,
        sleep: Callable[[float], None],
        mono: Callable[[], float],
        gate: Callable[[Alert], bool],
    ) -> None:
        self.channel = channel
        self._gate = gate
        self.capacity = capacity
        self.stats = ChannelStats()
        self._sleep = sleep
        self._mono = mono
        self._queue: collections.deque[Alert] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._tokens = channel.rate_per_minute
        self._refilled = mono()
        self._thread = threading.Thread(target=self._run, name=f"alerts {channel.name}", daemon=True)
        self._secrets = channel_secrets(channel)

    def put(self, alert: Alert) -> None:
        with self._cond:
            if len(self._queue) >= self.capacity:
                victim = next((a for a in self._queue if a.severity == "warning"), None)
                if victim is not None:
                    self._queue.remove(victim)
                    self.stats.dropped += 1
                elif alert.severity == "warning":
                    self.stats.dropped += 1
                    return
                # A critical is never dropped: the queue may outgrow its bound for it.
            self._queue.append(alert)
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._busy

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                alert = self._queue.popleft()
                self._busy = True
            try:
                if self._gate(alert):
                    self._deliver(alert)
            finally:
                with self._cond:
                    self._busy = False

    def _deliver(self, alert: Alert) -> None:
        self._take_token()
        for attempt in range(self.channel.retries + 1):
            try:
                self.channel.send(alert)
            except Exception as exc:  # noqa: BLE001 - any channel failure is logged and counted, never raised
                error = redact(str(exc), secrets=self._secrets)
                log.warning("alert_send_failed", channel=self.channel.name, attempt=attempt + 1, error=error)
                if attempt < self.channel.retries and not self._closing:
                    self._sleep(min(MAX_BACKOFF_S, 0.5 * 2**attempt))
                    continue
                self.stats.failed += 1
                log.error(
                    "alert_undelivered", channel=self.channel.name, alert_event=alert.event, summary=alert.summary
                )
                return
            self.stats.sent += 1
            return

    def _take_token(self) -> None:
        rate_per_s = self.channel.rate_per_minute / 60
        while True:
            now = self._mono()
            self._tokens = min(self.channel.rate_per_minute, self._tokens + (now - self._refilled) * rate_per_s)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            self._sleep((1 - self._tokens) / rate_per_s)


class Alerts:
    """Turns audited events into alerts and hands them to the channels' outboxes."""

    def __init__(
        self,
        settings: Settings,
        channels: list[Channel],
        *,
        host: str,
        claim: Callable[[str], bool] | None = None,
        capacity: int = QUEUE_CAPACITY,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.host = host
        self._claim = claim
        self._wall = wall
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seen_lock = threading.Lock()
        self._claims: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self._claims_lock = threading.Lock()
        self.outboxes = [_Outbox(c, capacity, sleep, mono, self._claimed) for c in channels]
        self._down_alerted = False

    def start(self) -> Alerts:
        for box in self.outboxes:
            box._thread.start()
        return self

    def on_event(self, event: Event, fields: dict[str, Any]) -> None:
        """A Monitor listener: called on the scanning path, so it only enqueues."""
        alert = alert_for(event, fields, host=self.host, now=self._wall())
        if alert is not None:
            self.submit(alert)

    def redis_down(self, down_s: float | None, error: str | None) -> None:
        """Called after each pass: page once per outage once it lasts `alerts.redis_down_after`."""
        if down_s is None:
            self._down_alerted = False
        elif down_s >= self.settings.redis_down_alert_s and not self._down_alerted:
            self._down_alerted = True
            self.on_event(
                Event.REDIS_UNAVAILABLE_LONG, {"down_s": round(down_s, 1), "error": error, "holding": self._wall()}
            )

    def submit(self, alert: Alert) -> None:
        if not self._first_time(alert):
            return
        for box in self.outboxes:
            if box.channel.wants(alert.severity):
                box.put(alert)

    def _first_time(self, alert: Alert) -> bool:
        """In-memory dedup, on the scanning path: no I/O here."""
        with self._seen_lock:
            if alert.dedup_key in self._seen:
                return False
            self._seen[alert.dedup_key] = None
            if len(self._seen) > DEDUP_MEMORY:
                self._seen.popitem(last=False)
        return True

    def _claimed(self, alert: Alert) -> bool:
        """Cross-replica dedup, in the outbox threads: the first channel to get here asks Redis
        once for the alert, the others reuse the answer."""
        if self._claim is None:
            return True
        with self._claims_lock:
            if alert.dedup_key in self._claims:
                return self._claims[alert.dedup_key]
            try:
                digest = hashlib.sha1(alert.dedup_key.encode(), usedforsecurity=False).hexdigest()
                mine = self._claim(digest)
            except Exception as exc:  # noqa: BLE001 - Redis down: better a duplicate page than a lost one
                log.warning("alert_dedup_unavailable", error=redact(str(exc)))
                mine = True
            self._claims[alert.dedup_key] = mine
            if len(self._claims) > DEDUP_MEMORY:
                self._claims.popitem(last=False)
            return mine

    def wait_idle(self, timeout_s: float) -> bool:
        """True once every queued alert was sent or given up on (for shutdown and tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(box.idle() for box in self.outboxes):
                return True
            time.sleep(0.01)
        return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush for up to `timeout_s`, then let the (daemon) threads go."""
        self.wait_idle(timeout_s)
        for box in self.outboxes:
            with box._cond:
                box._closing = True
                box._cond.notify()

    def stats(self) -> dict[str, ChannelStats]:
        return {box.channel.name: box.stats for box in self.outboxes}
