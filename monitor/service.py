"""One monitoring pass: observe every lock, decide, act, audit, remember.

`evaluate` is read-only (the `status` command uses it too); `Monitor.run_pass` adds the
actions and the bookkeeping. Releases happen only after the whole keyspace was read: a pass
that loses Redis part-way releases nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from monitor import keys
from monitor.audit import AuditLog, JsonlFile, critical_record
from monitor.config import Settings
from monitor.connection import REDIS_DOWN, Client, is_cluster
from monitor.errors import AuditWriteError, ReleaseError
from monitor.gpuwatch import GpuWatch
from monitor.holding import Holding, Record, track
from monitor.logs import get_logger
from monitor.policy import Action, Decision, Reason, Tiers, decide
from monitor.reaper import HeartbeatCheck, Outcome, Reaper
from monitor.scanner import Observation, read_locks, scan_candidates

log = get_logger("gpulock_monitor")

# Deletes monitor records whose lock no longer exists; the EXISTS check runs in Redis so a
# lock re-created since the pass read it keeps its record.
FORGET_SCRIPT = """
local n = 0
for _, lock in ipairs(ARGV) do
  if redis.call('EXISTS', lock) == 0 then n = n + redis.call('HDEL', KEYS[1], lock) end
end
return n
"""
# While Redis is down, passes are skipped with exponential backoff up to this long.
MAX_BACKOFF_S = 5.0


def status_ttl_ms(settings: Settings) -> int:
    """Lifetime of the daemon's status key: long enough to see a stalled daemon as stale."""
    return round(max(10 * settings.monitor_interval_s, 600) * 1000)


@dataclass(frozen=True)
class Verdict:
    holding: Holding
    decision: Decision


@dataclass
class PassReport:
    started: float
    duration_s: float = 0.0
    verdicts: list[Verdict] = field(default_factory=list)
    invalid: int = 0
    released_keys: set[bytes] = field(default_factory=set)
    error: str | None = None

    @property
    def released(self) -> int:
        return len(self.released_keys)


@dataclass
class _Failure:
    attempts: int = 0
    next_try: float = 0.0
    critical_written: bool = False


def tiers(settings: Settings) -> Tiers:
    return Tiers(settings.warning_s, settings.soft_timeout_s, settings.hard_timeout_s)


def evaluate(observations: list[Observation], settings: Settings) -> list[Verdict]:
    """Holdings and decisions for every present, valid lock. Pure."""
    limits = tiers(settings)
    verdicts = []
    for obs in observations:
        if obs.invalid or obs.value is None:
            continue
        holding = track(
            obs,
            lock_timeout_ms=round(settings.lock_timeout_s * 1000),
            hb_ttl_ms=round(settings.heartbeat_ttl_s * 1000),
            hb_timeout_ms=round(settings.heartbeat_timeout_s * 1000),
        )
        verdicts.append(Verdict(holding, decide(holding.held_s, holding.heartbeat, limits)))
    return verdicts


def lock_fields(verdict: Verdict, *, dry_run: bool) -> dict[str, Any]:
    """The lock part of an audit event (DESIGN.md section 7)."""
    h, d = verdict.holding, verdict.decision
    return {
        "lock_key": keys.text(h.key),
        "holder": keys.text(h.holder),
        "held_s": round(h.held_s, 3),
        "heartbeat": h.heartbeat.value,
        "heartbeat_age_s": None if h.hb_age_s is None else round(h.hb_age_s, 3),
        "tier": d.tier.value,
        "reason": d.reason.value,
        "dry_run": dry_run,
        # Which holding: Redis-clock ms when it began. Values repeat across holdings; this does not.
        "holding": h.record.since_ms,
    }


class Monitor:
    """The daemon's state between passes; `run_pass` never raises."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        audit: AuditLog,
        critical: JsonlFile,
        *,
        reaper: Reaper | None = None,
        gpus: GpuWatch | None = None,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client = client
        self.audit = audit
        self.critical = critical
        self.reaper = reaper or Reaper(client)
        self.gpus = gpus
        self.dry_run = audit.dry_run or not settings.auto_recovery
        self.wall = wall
        self.mono = mono
        self._forget = client.register_script(FORGET_SCRIPT)
        self._failures: dict[tuple[bytes, bytes], _Failure] = {}  # by (lock, holder)
        self._invalid_seen: set[bytes] = set()
        self._down_since: float | None = None
        self.redis_error: str | None = None  # set while Redis is unreachable
        self._down_passes = 0
        self._skip = 0
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.last_report: PassReport | None = None
        self.last_success: float | None = None

    # --- the pass ---------------------------------------------------------------------------

    def run_pass(self) -> PassReport | None:
        """One pass; None when skipped while backing off from a Redis outage."""
        if self._skip > 0:
            self._skip -= 1
            return None
        report = PassReport(started=self.wall())
        t0 = self.mono()
        try:
            self._pass(report)
        except REDIS_DOWN as exc:
            report.error = f"redis unavailable: {exc}"
            self._redis_lost(exc)
        except Exception as exc:
            report.error = f"{exc.__class__.__name__}: {exc}"
            log.exception("pass_failed", error=report.error)
        report.duration_s = self.mono() - t0
        if report.error is None:
            self.last_success = report.started
        self.last_report = report
        return report

    def _pass(self, report: PassReport) -> None:
        observations = read_locks(self.client, scan_candidates(self.client, self.settings.key_pattern))
        self._redis_back()
        for obs in observations:
            if obs.invalid:
                report.invalid += 1
                self._report_invalid(obs)
        self._invalid_seen &= {o.key for o in observations if o.invalid}
        verdicts = evaluate(observations, self.settings)
        report.verdicts = verdicts
        if self.gpus is not None:
            self.gpus.refresh()
        stored = {o.key: o.record for o in observations}
        live = {(v.holding.key, v.holding.holder) for v in verdicts if not v.holding.new}
        self._failures = {k: f for k, f in self._failures.items() if k in live}
        writes: dict[bytes, bytes] = {}
        keep: set[bytes] = set()
        try:
            for verdict in verdicts:
                record = self._act(verdict, report)
                if record is not None:
                    keep.add(verdict.holding.key)
                    data = record.dumps()
                    if data != stored.get(verdict.holding.key):
                        writes[verdict.holding.key] = data
            if self.gpus is not None:
                self._gpu_findings(verdicts, report)
        finally:
            # Keep what was learned even if a release lost Redis part-way.
            self._remember(writes, keep, self._status(report))

    def _gpu_findings(self, verdicts: list[Verdict], report: PassReport) -> None:
        assert self.gpus is not None
        released = report.released_keys
        held = [v.holding.key for v in verdicts if v.holding.key not in released]
        gone = [(v.holding.key, v.holding.holder) for v in verdicts if v.holding.key in released]
        for event, fields in self.gpus.findings(held, gone):
            self.record(event, "warning", **fields)

    def _fields(self, verdict: Verdict, *, dry_run: bool) -> dict[str, Any]:
        """An event's lock fields, with what NVML shows of the lock's GPU when it is local."""
        fields = lock_fields(verdict, dry_run=dry_run)
        if self.gpus is not None:
            fields.update(self.gpus.fields(verdict.holding.key))
        return fields

    @property
    def failing_releases(self) -> int:
        """Holdings whose release failed `cleanup.max_retry` times and is still being retried."""
        return sum(1 for f in self._failures.values() if f.critical_written)

    def _status(self, report: PassReport) -> bytes:
        return json.dumps(
            {
                **self.audit.identity,
                "locks": len(report.verdicts),
                "released": report.released,
                "failing_releases": self.failing_releases,
                "dry_run": self.dry_run,
                "monitor_interval_s": self.settings.monitor_interval_s,
            }
        ).encode()

    def _remember(self, writes: dict[bytes, bytes], keep: set[bytes], status: bytes) -> None:
        """Persist changed records and this monitor's status; forget records of locks that are
        gone. One round trip, plus one when there is something to forget."""
        pipe = self.client.pipeline(transaction=False)
        if writes:
            pipe.hset(keys.HOLDINGS_HASH, mapping=writes)  # type: ignore[arg-type]
        # The key's own TTL dates it on Redis's clock: `health` reads its age as ttl - PTTL.
        pipe.set(keys.monitor_status_key(self.audit.identity["host"]), status, px=status_ttl_ms(self.settings))
        pipe.hkeys(keys.HOLDINGS_HASH)
        known = pipe.execute()[-1]
        stale = [k for k in known if k not in keep]
        if stale and not is_cluster(self.client):
            self._forget(keys=[keys.HOLDINGS_HASH], args=stale)
        elif stale:
            # A cluster script cannot reach lock keys in other slots: check, then forget. A lock
            # re-created in between loses its record and is timed afresh from its TTL.
            pipe = self.client.pipeline()
            for key in stale:
                pipe.exists(key)
            gone = [key for key, exists in zip(stale, pipe.execute(), strict=True) if not exists]
            if gone:
                self.client.hdel(keys.HOLDINGS_HASH, *gone)

    # --- actions ----------------------------------------------------------------------------

    def _act(self, verdict: Verdict, report: PassReport) -> Record | None:
        """Carry out a decision; the record to keep, or None when the lock was released."""
        record = verdict.holding.record
        action, reason = verdict.decision.action, verdict.decision.reason
        if action is Action.WARN:
            return self._once(record, verdict, "lock_warning", "warning")
        if action is Action.KEEP:
            if reason is not Reason.LONG_TASK_PROTECTED:
                return record
            record = self._once(record, verdict, "long_task_protected", "info")
            if self.settings.hard_timeout_s is None and verdict.holding.held_s >= 2 * self.settings.soft_timeout_s:
                # No cap will ever end it: say so once, loudly enough to alert on.
                record = self._once(record, verdict, "long_task_overrun", "warning")
            return record
        if self.dry_run:
            return self._once(record, verdict, "lock_released", "warning", outcome="dry_run")
        return self._release(verdict, report)

    def _once(self, record: Record, verdict: Verdict, event: str, level: str, **extra: Any) -> Record:
        """Audit `event` once per holding; the record remembers that it was sent."""
        if event in record.notified:
            return record
        self.record(event, level, **self._fields(verdict, dry_run=self.dry_run), **extra)
        return replace(record, notified=record.notified | {event})

    def _release(self, verdict: Verdict, report: PassReport) -> Record | None:
        h, d = verdict.holding, verdict.decision
        fid = (h.key, h.holder)
        failure = self._failures.get(fid)
        if failure is not None and self.mono() < failure.next_try:
            return h.record
        if d.reason is Reason.HARD_TIMEOUT:
            check = HeartbeatCheck.ANY  # the cap applies whatever the heartbeat does
        elif h.hb_value is None:
            check = HeartbeatCheck.ABSENT
        else:
            check = HeartbeatCheck.EQUAL
        fields = self._fields(verdict, dry_run=False)
        try:
            result = self.reaper.release(h.key, h.holder, heartbeat=check, hb_value=h.hb_value, seen_pttl_ms=h.pttl_ms)
        except (ReleaseError, redis.RedisError) as exc:
            self._release_failed(fid, fields, exc)
            if isinstance(exc, REDIS_DOWN):
                raise
            return h.record
        self._failures.pop(fid, None)
        if result.outcome is Outcome.RELEASED:
            report.released_keys.add(h.key)
            self.record("lock_released", "warning", sync=True, outcome=result.outcome.value, **fields)
            return None
        if result.current is not None:
            fields["current_holder"] = keys.text(result.current)
        self.record("release_skipped", "info", outcome=result.outcome.value, **fields)
        return None if result.outcome is Outcome.GONE else h.record

    def _release_failed(self, fid: tuple[bytes, bytes], fields: dict[str, Any], exc: Exception) -> None:
        failure = self._failures.setdefault(fid, _Failure())
        failure.attempts += 1
        failure.next_try = self.mono() + self.settings.retry_delay_s
        spent = failure.attempts >= self.settings.max_retry
        error = f"{exc.__class__.__name__}: {exc}"
        self.record(
            "release_failed",
            "error",
            sync=True,
            attempt=failure.attempts,
            max_retry=self.settings.max_retry,
            retries_spent=spent,
            error=error,
            **fields,
        )
        if spent and not failure.critical_written:
            failure.critical_written = True
            self._write_critical(fields, exc, failure.attempts)

    def _write_critical(self, fields: dict[str, Any], exc: Exception, attempts: int) -> None:
        record = critical_record(
            lock_key=fields["lock_key"],
            holder=fields["holder"],
            exc=exc,
            attempts=attempts,
            now=self.wall(),
            reason=fields["reason"],
            monitor=self.audit.identity,
        )
        log.critical("release_failed_critical", lock_key=fields["lock_key"], attempts=attempts, error=str(exc))
        try:
            self.critical.write(record, sync=True)
        except AuditWriteError as err:
            # journald keeps what the file could not; the record stays pending for the next write.
            log.error("critical_write_failed", error=str(err), record=record)

    def _report_invalid(self, obs: Observation) -> None:
        if obs.key in self._invalid_seen:
            return
        self._invalid_seen.add(obs.key)
        self.record("invalid_lock", "warning", lock_key=keys.text(obs.key), reason=obs.invalid)

    # --- Redis outages --------------------------------------------------------------------------

    def _redis_lost(self, exc: Exception) -> None:
        self._down_passes += 1
        max_skip = max(0, math.ceil(MAX_BACKOFF_S / self.settings.monitor_interval_s) - 1)
        self._skip = min(2 ** (self._down_passes - 1) - 1, max_skip)
        self.redis_error = str(exc)
        if self._down_since is None:
            self._down_since = self.wall()
            self.record("redis_unavailable", "error", error=str(exc))

    def down_for_s(self) -> float | None:
        """How long Redis has been unreachable, or None while it answers."""
        return None if self._down_since is None else max(0.0, self.wall() - self._down_since)

    def _redis_back(self) -> None:
        self._down_passes = 0
        self.redis_error = None
        if self._down_since is not None:
            down_s = round(self.wall() - self._down_since, 3)
            self._down_since = None
            self.record("redis_recovered", "warning", down_s=down_s)

    # --- audit ----------------------------------------------------------------------------------

    def record(self, event: str, level: str, *, sync: bool = False, **fields: Any) -> None:
        """Log, audit and announce one event; never raises."""
        getattr(log, level)(event, **{k: v for k, v in fields.items() if k != "dry_run" or v})
        try:
            self.audit.event(event, sync=sync, now=self.wall(), **fields)
        except AuditWriteError as exc:
            # The event is kept in memory and written before the next one; the log line above
            # already holds it for journald.
            log.error("audit_write_failed", error=str(exc), audit_event=event)
        for listener in self.listeners:
            try:
                listener(event, fields)
            except Exception:  # a listener's bug must not stop a release (logged with its traceback)
                log.exception("event_listener_failed", audit_event=event)
