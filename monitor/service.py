"""One monitoring pass: observe every lock, decide, act, audit, remember.

`evaluate` is read-only (the `status` command uses it too); `Monitor.run_pass` adds the
actions and the bookkeeping. Releases happen only after the whole keyspace was read: a pass
that loses Redis part-way releases nothing.

Only a monitor that acts (not `--dry-run`, `auto_recovery: true`) writes what it learned to
Redis, compare-and-set per holding; any other replica keeps its own view in memory, so replicas
with other settings never overwrite each other's records.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import redis
from redis.crc import key_slot

from monitor import invalid, protocol, units
from monitor.audit import AuditLog, JsonlFile, critical_record
from monitor.config import Settings
from monitor.connection import REDIS_DOWN, Client, is_cluster, redis_down
from monitor.errors import AuditWriteError, ReleaseError
from monitor.events import Event
from monitor.evidence import Holders, identity
from monitor.gpuwatch import GpuWatch
from monitor.holding import Holding, Record, evolve, shifted
from monitor.logs import get_logger
from monitor.policy import Action, Decision, Heartbeat, Reason
from monitor.protocol import HeartbeatCheck, Outcome
from monitor.reaper import Reaper, ReleaseResult
from monitor.redact import redact
from monitor.scanner import READ_BATCH, Observation, read_locks, scan_candidates
from monitor.snapshot import last_complete_pass_ms, status_ttl_ms
from monitor.verdict import Verdict, due_ms, evaluate, lock_fields, next_deadline_ms

log = get_logger("gpulock_monitor")

# A record outlives its lock's expiry by this much; records of locks without a TTL are rewritten
# every pass and last this long after the last one.
RECORD_MARGIN_MS = 60_000
NO_TTL_RECORD_MS = 86_400_000
MISMATCH_TTL_MS = 7 * 86_400_000
TOMBSTONE_S = units.to_s(protocol.TOMBSTONE_TTL_MS)
_NEVER = 2**62
# While Redis is down, passes are skipped with exponential backoff up to this long.
MAX_BACKOFF_S = 5.0
# Releases of a holder that is alive, whatever its heartbeat does: the cap, and hang: rules.
_ANY_HEARTBEAT = frozenset(
    {
        Reason.HARD_TIMEOUT,
        Reason.HOLDER_STALLED,
        Reason.HOLDER_NOT_ON_GPU,
        Reason.GPU_IDLE_HELD,
        Reason.GPU_FOREIGN_PROCESS,
        Reason.GPU_XID,
    }
)


@dataclass
class PassReport:
    started: float
    duration_s: float = 0.0
    invalid: int = 0
    released_keys: set[bytes] = field(default_factory=set)
    error: str | None = None
    redis_down: bool = False  # the error is Redis being unreachable (or not yet serving)
    now_ms: int = 0  # Redis-clock ms when the pass began
    # Every lock the pass found, as judged: this pass's verdicts, and the last one of each lock that
    # nothing changed and no boundary reached since (judged earlier: `verdicts` moves their clock on).
    judged: list[Verdict] = field(default_factory=list)

    @property
    def released(self) -> int:
        return len(self.released_keys)

    @property
    def locks(self) -> int:
        """Locks the pass found (those it released included)."""
        return len(self.judged)

    @property
    def verdicts(self) -> list[Verdict]:
        """Every lock the pass found, as of the pass's start: a verdict carried from an earlier
        look is the same decision, its held time and heartbeat age moved on. Made when asked for
        (health), not by the pass: a steady pass makes no object per lock."""
        return [
            v if moved == 0 else Verdict(shifted(v.holding, self.now_ms), v.decision, v.stored)
            for v, moved in self.moved()
        ]

    def moved(self) -> Iterator[tuple[Verdict, int]]:
        """Each verdict as judged, and how many ms its clock must move on to the pass's start."""
        now = self.now_ms
        for v in self.judged:
            yield v, max(0, now - v.holding.now_ms)


class _Kept:
    """What a monitor keeps of a lock between passes: its last verdict, with the record as kept
    (and as Redis will hold it, for an acting monitor), the holder record read with it, and when
    that verdict can next change (no sooner than `due`: a pass may carry it without reading or
    judging the lock again; -1 where it must judge it at every look)."""

    __slots__ = ("due", "holder", "verdict")

    def __init__(self, verdict: Verdict, holder: bytes | None, due: int) -> None:
        self.verdict = verdict
        self.holder = holder
        self.due = due

    def unchanged(self, obs: Observation) -> bool:
        """Whether `obs` finds in Redis what the kept verdict was judged on: the lock and its
        heartbeat (value and expiry), the record as kept and the holder record. Asked only where
        `due` is not -1."""
        h = self.verdict.holding
        return (
            obs.expiry_ms == h.expiry_ms
            and obs.hb_expiry_ms == h.hb_expiry_ms
            and obs.value == h.holder
            and obs.hb_value == h.hb_value
            and obs.record == self.verdict.stored
            and getattr(obs, "holder", None) == self.holder  # the holder record, where the scanner reads it
        )


class _Records(Mapping[bytes, Record]):
    """The kept records by lock (a view: what `evaluate` remembers)."""

    __slots__ = ("_kept",)

    def __init__(self, kept: dict[bytes, _Kept]) -> None:
        self._kept = kept

    def get(self, key: bytes, default: Any = None) -> Any:
        found = self._kept.get(key)
        return default if found is None else found.verdict.holding.record

    def __getitem__(self, key: bytes) -> Record:
        return self._kept[key].verdict.holding.record

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._kept)

    def __len__(self) -> int:
        return len(self._kept)


def _identity(h: Holding) -> tuple[bytes, bytes, int, int]:
    """A holding's identity (DESIGN section 3): lock, value and absolute expiry; without a TTL, which
    repeats, also when it was first seen."""
    return (h.key, h.holder, h.expiry_ms, h.id if h.expiry_ms < 0 else 0)


def _replace(held: dict[bytes, _Kept], judged: list[Observation], entries: dict[bytes, _Kept]) -> None:
    """What was kept of the locks judged becomes `entries`. Assigned over rather than removed and
    added again: a dict that loses and gains thousands of keys a pass grows its table to three
    times their number."""
    for obs in judged:
        if obs.key not in entries:
            held.pop(obs.key, None)
    held.update(entries)


class Discovery(Protocol):
    """Where a pass finds its candidate keys when keyspace notifications keep an index (watcher.py)."""

    def candidates(self) -> tuple[list[bytes], bool] | None:
        """The indexed lock keys, and whether the index holds every lock present before this call
        (then the pass may count as complete); None: no index, SCAN instead."""

    def forget_absent(self, absent: list[bytes]) -> None:
        """Keys the pass found gone (the index drops those no event has named since)."""

    def quiet(self) -> frozenset[bytes]:
        """Locks no event has named since they were last read (as of `candidates()`). A discovery
        may instead say `changed() -> frozenset[bytes] | None`: the indexed locks that are NOT
        quiet (few where most locks are steady), None where none is known quiet; a pass asks that
        one where there is one."""

    def read_by_pass(self, keys: list[bytes]) -> None:
        """The pass read these keys."""

    def relocked(self) -> frozenset[bytes]:
        """Locks some event changed since they were last read (as of `candidates()`)."""

    def tainted(self) -> frozenset[bytes]:
        """Locks whose holding began with a heartbeat key there (as of `candidates()`)."""


@dataclass
class _Failure:
    attempts: int = 0
    next_try: float = 0.0
    critical_written: bool = False


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
        holders: Holders | None = None,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client = client
        self.audit = audit
        self.critical = critical
        self.reaper = reaper or Reaper(client)
        self.gpus = gpus
        self.holders = holders  # holder records, their processes and GPUs: the hang findings
        self.dry_run = audit.dry_run or not settings.auto_recovery
        self.wall = wall
        self.mono = mono
        self._persist = client.register_script(protocol.PERSIST_SCRIPT)
        self._failures: dict[tuple[bytes, bytes, int], _Failure] = {}  # by (lock, holder, holding)
        # What this monitor learned of each present holding (its record, in its last verdict), and
        # when its last complete pass began: the only memory of a monitor that does not act.
        self._held: dict[bytes, _Kept] = {}
        self._complete_ms: int | None = None
        # Releases whose reply was lost: asked again at the next pass, the tombstone answers.
        self._unsettled: dict[bytes, Verdict] = {}
        # Holdings this monitor released, and when (monotonic): a pass and the event watcher may
        # both have read one before either released it, and the tombstone would answer the
        # second `released` too. Forgotten with the tombstone.
        self._released: dict[tuple[bytes, bytes, int, int], float] = {}  # by _identity
        # Names this monitor's release attempts: replicas share a holding's id (its stored first
        # sight), and a tombstone must answer `released` only to the attempt that released.
        self._attempt = f"monitor:{secrets.token_hex(8)}"
        self._invalid_said: invalid.Said | None = None  # read from Redis at the first pass
        self._down_since: float | None = None
        self.redis_error: str | None = None  # set while Redis is unreachable
        self._down_passes = 0
        self._skip = 0
        self.listeners: list[Callable[[Event, dict[str, Any]], None]] = []
        self.last_report: PassReport | None = None
        self.last_success: float | None = None
        # Passes (the scheduler's thread) and the event watcher's reads act one at a time.
        self.lock = threading.RLock()
        self.discovery: Discovery | None = None
        self._persisted_ms: int | None = None

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
        except Exception as exc:
            if redis_down(exc):  # unreachable, loading its data, or BUSY with a script
                report.error = f"redis unavailable: {exc}"
                report.redis_down = True
                self._redis_lost(exc)
            else:
                report.error = f"{exc.__class__.__name__}: {exc}"
                log.exception("pass_failed", error=report.error)
        report.duration_s = self.mono() - t0
        if report.error is None:
            self.last_success = report.started
        self.last_report = report
        return report

    def _candidates(self) -> tuple[list[bytes], bool]:
        """The keys to read, and whether they are every lock present at this moment. Outside the
        lock: neither a SCAN nor waiting for the watcher's index holds up the event path."""
        found = self.discovery.candidates() if self.discovery is not None else None
        if found is not None:
            return found
        return scan_candidates(self.client, self.settings.key_pattern), True

    def _pass(self, report: PassReport) -> None:
        began_ms, persisted_ms = self._pass_start()
        keys, every_lock = self._candidates()
        with self.lock:
            self._locked_pass(report, began_ms, persisted_ms, keys, every_lock=every_lock)

    def _locked_pass(
        self, report: PassReport, began_ms: int, persisted_ms: int | None, keys: list[bytes], *, every_lock: bool
    ) -> None:
        self._persisted_ms = persisted_ms
        report.now_ms = began_ms
        self._settle_unknown(report)
        carried: list[Verdict] = []  # judged before, and nothing since can have changed them
        keys = self._to_read(keys, began_ms, carried)
        observations = self._with_events(self._not_released(self._moved(read_locks(self.client, keys))))
        began_mono = self.mono()  # beside began_ms (one round trip ago): this host's clock for findings
        if self.holders is not None:
            self.holders.seen(observations)
        self._redis_back()
        if self.discovery is not None:
            self.discovery.read_by_pass(keys)
            self.discovery.forget_absent([o.key for o in observations if o.value is None and o.invalid is None])
        self._report_invalid({o.key: o.invalid for o in observations if o.invalid}, report)
        after = max((t for t in (self._complete_ms, persisted_ms) if t is not None), default=None)
        fresh, judged = self._evaluate(observations, after, carried)
        report.judged = fresh + carried
        if self.gpus is not None:
            self.gpus.refresh()
        if self._failures:
            live = {self._fid(v.holding) for v in fresh if not v.holding.new}
            live.update(self._fid(v.holding) for v in carried)
            self._failures = {k: f for k, f in self._failures.items() if k in live}
        kept: dict[bytes, tuple[Verdict, Record]] = {}
        complete = False
        try:
            for verdict in fresh:
                record = self._act(verdict, report)
                if record is not None:
                    kept[verdict.holding.key] = (verdict, record)
            if self.gpus is not None:
                self._gpu_findings(report.judged, report)
            if self.holders is not None:
                self._hang_findings(report, began_ms, began_mono, kept)
            complete = every_lock
        finally:
            # Keep what was learned even if a release lost Redis part-way.
            self._hold(judged, kept, carried)
            if complete:
                self._complete_ms = began_ms
            self._remember(kept, began_ms if complete else None, self._status(report))

    def _to_read(self, keys: list[bytes], began_ms: int, carried: list[Verdict]) -> list[bytes]:
        """The keys to read: where events say a lock is as it was last read and no deadline of it
        is due, its last verdict is carried instead (a steady pass reads what changed)."""
        changed, quiet = self._quiet_by_events()
        if changed is None and not quiet:
            return keys
        held, moved = self._held, changed if changed is not None else frozenset()
        unread: list[bytes] = []
        for key in keys:
            entry = held.get(key)
            if entry is not None and entry.due > began_ms and (key in quiet if quiet is not None else key not in moved):
                carried.append(entry.verdict)
            else:
                unread.append(key)
        return unread

    def _moved(self, observations: list[Observation]) -> list[Observation]:
        """Less the reads of locks that some event changed after the pass's barrier: they may show a
        holding the barrier's proofs do not describe (a same-value retake of a lock without a TTL; a
        holding begun under a live heartbeat), and the watcher reads them itself, with their proofs."""
        moved_since: Callable[[list[bytes]], frozenset[bytes] | None] | None = getattr(
            self.discovery, "moved_since_barrier", None
        )
        if moved_since is None or not observations:
            return observations
        moved = moved_since([o.key for o in observations])
        if moved is None:  # nothing known of what came between: this pass judges none of them
            return []
        return [o for o in observations if o.key not in moved] if moved else observations

    def _with_events(self, observations: list[Observation]) -> list[Observation]:
        """The reads, with what keyspace events told of them as of the pass's barrier."""
        if self.discovery is None:
            return observations
        relocked, beaten = self.discovery.relocked(), self.discovery.tainted()
        if not relocked and not beaten:
            return observations
        return [
            replace(o, relocked=o.key in relocked, hb_tainted=o.key in beaten)
            if o.key in relocked or o.key in beaten
            else o
            for o in observations
        ]

    def _hold(
        self, judged: list[Observation], kept: dict[bytes, tuple[Verdict, Record]], carried: list[Verdict]
    ) -> None:
        """After a pass: what it kept and carried, and nothing else (a lock gone, released, or
        out of the index since)."""
        held = self._held
        _replace(held, judged, self._keep(kept, judged))
        if len(held) != len(carried) + len(kept):
            present = {v.holding.key for v in carried}.union(kept)
            self._held = {key: entry for key, entry in held.items() if key in present}

    def _quiet_by_events(self) -> tuple[frozenset[bytes], None] | tuple[None, frozenset[bytes] | None]:
        """The locks that are not quiet (a discovery that says `changed()`: few in a steady pass),
        else those that are (`quiet()`), else (None, None): read every lock."""
        d = self.discovery
        if d is None:
            return None, None
        changed: Callable[[], frozenset[bytes] | None] | None = getattr(d, "changed", None)
        if changed is None:
            return None, d.quiet()
        found = changed()
        return (found, None) if found is not None else (None, None)

    def _evaluate(
        self, observations: list[Observation], after: int | None, carried: list[Verdict]
    ) -> tuple[list[Verdict], list[Observation]]:
        """`evaluate`, except for locks where nothing in Redis changed since the last look and no
        boundary (a tier, the heartbeat's expiry or staleness) fell due: their last verdict holds,
        and goes to `carried` (README "Performance": most locks of a pass without notifications).
        The verdicts, and the observations judged (those of absent and invalid keys included)."""
        fresh: list[Observation] = []
        held = self._held
        for obs in observations:
            kept = held.get(obs.key)
            if kept is not None and obs.now_ms < kept.due and not obs.hb_written and kept.unchanged(obs):
                carried.append(kept.verdict)
            else:
                fresh.append(obs)
        verdicts = evaluate(fresh, self.settings, after_ms=after, remembered=self._known)
        if not self.acting:
            verdicts = [self._own_notified(v) for v in verdicts]
        return verdicts, fresh

    @property
    def _known(self) -> Mapping[bytes, Record]:
        """The record this monitor keeps of each present lock."""
        return _Records(self._held)

    def _keep(self, kept: dict[bytes, tuple[Verdict, Record]], observations: list[Observation]) -> dict[bytes, _Kept]:
        """What the next look may use: each kept verdict with its record as kept and as the next read
        will find it, and when it can next change."""
        holders = {o.key: getattr(o, "holder", None) for o in observations} if kept else {}
        entries = {}
        for key, (verdict, record) in kept.items():
            h = verdict.holding
            stored = record.dumps() if self.acting else verdict.stored
            last = Verdict(h if record is h.record else evolve(h, record=record), verdict.decision, stored)
            if verdict.decision.action is Action.RELEASE or h.expiry_ms < 0:
                # Acted on at every look; a lock without a TTL has no identity to hold on to.
                entries[key] = _Kept(last, None, -1)
                continue
            holder, before = holders.get(key), self._held.get(key)
            if before is not None and holder is not None and before.holder == holder:
                holder = before.holder  # the bytes first read: one copy of a record however often it is read
            entries[key] = _Kept(last, holder, next_deadline_ms(last, self.settings) or _NEVER)
        return entries

    def _not_released(self, observations: list[Observation]) -> list[Observation]:
        """Less reads of a holding this monitor released since (a pass and the event watcher may both
        have read it before either released it; the tombstone would answer `released` again)."""
        if not self._released:
            return observations
        return [o for o in observations if (o.key, o.value, o.expiry_ms, 0) not in self._released]

    def run_keys(self, observations: list[Observation], *, wait_s: float | None = None) -> list[Verdict] | None:
        """Decide and act on these locks now, between passes (the event watcher's deadline and
        event reads); the verdicts of those still held. Redis errors propagate. With `wait_s`, None
        when a pass holds the monitor longer than that (the caller reads them again after it)."""
        if wait_s is not None:
            if not self.lock.acquire(timeout=wait_s):
                return None
            try:
                return self.run_keys(observations)
            finally:
                self.lock.release()
        with self.lock:
            observations = self._not_released(observations)
            if self.holders is not None:
                self.holders.seen(observations)
            report = PassReport(started=self.wall())
            after = max((t for t in (self._complete_ms, self._persisted_ms) if t is not None), default=None)
            verdicts = evaluate(observations, self.settings, after_ms=after, remembered=self._known)
            if not self.acting:
                verdicts = [self._own_notified(v) for v in verdicts]
            kept: dict[bytes, tuple[Verdict, Record]] = {}
            try:
                for verdict in verdicts:
                    record = self._act(verdict, report)
                    if record is not None:
                        kept[verdict.holding.key] = (verdict, record)
            finally:
                # The next pass need not judge again what was judged here.
                _replace(self._held, observations, self._keep(kept, observations))
                self._remember(kept, None, None)
            for key, ident in self.holders.take_gone() if self.holders is not None else ():
                self.holder_exited(key, ident)  # found gone as its watch began
            return [verdict for verdict, _ in kept.values()]

    @property
    def acting(self) -> bool:
        return not self.dry_run

    def _pass_start(self) -> tuple[int, int | None]:
        """Redis TIME before the SCAN (a holding present then is seen by this pass), and when the
        last complete pass of an acting monitor began, in one round trip; the first pass also
        reads what was said of invalid keys."""
        first = self._invalid_said is None
        if is_cluster(self.client):  # TIME is no keyed command: no cluster pipeline takes it
            if first:
                self._invalid_said = invalid.Said.loads(self.client.get(invalid.SAID_KEY))  # type: ignore[arg-type]
            return units.redis_time_ms(self.client), last_complete_pass_ms(self.client, self.settings)
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.get(protocol.last_pass_key(self.settings.key_pattern))
        if first:
            pipe.get(invalid.SAID_KEY)
        (seconds, micros), raw, *said = pipe.execute()
        if first:
            self._invalid_said = invalid.Said.loads(said[0])
        persisted = int(raw) if raw is not None and raw.isdigit() else None
        return units.ms_of_time(seconds, micros), persisted

    def _own_notified(self, verdict: Verdict) -> Verdict:
        """A replica that does not act audits for itself: what it already said is its own."""
        h = verdict.holding
        mine = self._known.get(h.key)
        notified = mine.notified if mine is not None and mine.is_holding(h.holder, h.expiry_ms) else frozenset()
        return replace(verdict, holding=evolve(h, record=evolve(h.record, notified=notified)))

    @staticmethod
    def _fid(h: Holding) -> tuple[bytes, bytes, int]:
        return (h.key, h.holder, h.id)

    def _hang_findings(
        self, report: PassReport, now_ms: int, now_mono: float, kept: dict[bytes, tuple[Verdict, Record]]
    ) -> None:
        """The hung-holder findings of every lock held (README "Hung holders"), each audited once per
        holding; where its `hang:` rule says release and its grace is over, the holding is released
        as the hard cap releases it (value and expiry re-checked by the script, heartbeat or not)."""
        assert self.holders is not None
        if self.holders.idle:
            return
        released = report.released_keys
        judged = [v for v in report.judged if v.holding.key not in released]
        for judged_verdict, found, new in self.holders.pass_findings(judged, now_ms, now_mono):
            h = judged_verdict.holding
            if h.key in released:
                continue
            verdict = judged_verdict
            if h.now_ms < now_ms:  # carried from an earlier look: its clock moved on, nothing else
                verdict = Verdict(shifted(h, now_ms), verdict.decision, verdict.stored)
            rule = self.settings.hang.rule(found.finding)
            facts = {"since_s": found.since_s, "action": rule.action, **found.detail}
            if new and found.finding.value not in verdict.holding.record.notified:
                self.record(Event[found.finding.name], **self._fields(verdict, dry_run=self.dry_run), finding=facts)
                # The holding's record remembers it (an acting monitor writes it to Redis): said once
                # per holding across restarts and replicas, as the tiers' events are.
                entry = kept.get(h.key)
                base = verdict.holding.record if entry is None else entry[1]
                said = evolve(base, notified=base.notified | {found.finding.value})
                kept[h.key] = (verdict if entry is None else entry[0], said)
            if not found.release or verdict.decision.action is Action.RELEASE:
                continue
            decision = Decision(Action.RELEASE, verdict.decision.tier, Reason(found.finding.value))
            forced = Verdict(verdict.holding, decision, verdict.stored)
            if self.dry_run:
                if self.holders.first(h.key, h.id, "release"):
                    fields = self._fields(forced, dry_run=True)
                    self.record(Event.LOCK_RELEASED, **fields, outcome="dry_run", finding=facts)
                continue
            if self._release(forced, report, verdict.holding.record, finding=facts) is None:
                kept.pop(h.key, None)
        self.holders.after_pass(v for v in judged if v.holding.key not in released)
        for key, ident in self.holders.take_gone():
            self.holder_exited(key, ident)

    def holder_exited(self, key: bytes, ident: str) -> None:
        """The pid watch saw the process of the holder record `ident` names exit (or found it gone):
        its heartbeat is dead now, whatever the key still says (README "Hung holders"). The lock is
        read again first: released only while it is still that holding, and its heartbeat still the
        write that was read (the release script's check, as for any dead heartbeat)."""
        with self.lock:
            try:
                observations = self._not_released(read_locks(self.client, [key]))
                if not observations or observations[0].value is None:
                    return
                obs = observations[0]
                assert obs.value is not None
                if self.holders is not None:
                    self.holders.seen([obs])
                record = protocol.own_record(obs.holder, obs.value)
                if record is None or identity(record) != ident:
                    return  # another holding (or process) now: its own is watched in its turn
                after = max((t for t in (self._complete_ms, self._persisted_ms) if t is not None), default=None)
                (verdict,) = evaluate([obs], self.settings, after_ms=after, remembered=self._known)
                h = replace(verdict.holding, heartbeat=Heartbeat.DEAD)
                decision = Decision(Action.RELEASE, verdict.decision.tier, Reason.HEARTBEAT_DEAD)
                dead = Verdict(h, decision, verdict.stored)
                exited = {"pid": record["pid"], "host": record["host"]}
                report = PassReport(started=self.wall())
                if self.dry_run:
                    if self.holders is None or self.holders.first(key, h.id, "exited"):
                        fields = self._fields(dead, dry_run=True)
                        self.record(Event.LOCK_RELEASED, **fields, outcome="dry_run", holder_exited=exited)
                    return
                self._release(dead, report, h.record, holder_exited=exited)
            except redis.RedisError as exc:  # the heartbeat's expiry still ends it, a pass later at worst
                log.warning("holder_exit_not_acted", lock_key=protocol.text(key), error=redact(str(exc)))
            except Exception:  # this runs on the pid watch's thread: never let it die of a bug of ours
                log.exception("holder_exit_failed", lock_key=protocol.text(key))

    def _gpu_findings(self, verdicts: list[Verdict], report: PassReport) -> None:
        assert self.gpus is not None
        released = report.released_keys
        held = [v.holding.key for v in verdicts if v.holding.key not in released]
        gone = [(v.holding.key, v.holding.holder) for v in verdicts if v.holding.key in released]
        for event, fields in self.gpus.findings(held, gone):
            self.record(event, **fields)

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
                "locks": report.locks,
                "released": report.released,
                "failing_releases": self.failing_releases,
                "dry_run": self.dry_run,
                "monitor_interval_s": self.settings.monitor_interval_s,
                "discovery": self.discovery_mode(),
                # What `status` shows of the hang findings (README "Hung holders"): locks with any.
                "findings": {}
                if self.holders is None
                else {protocol.text(k): [f.finding.value for f in fs] for k, fs in self.holders.current.items()},
            }
        ).encode()

    def discovery_mode(self) -> str:
        """How this monitor finds locks, in a few words (health, status, the status key)."""
        progress = getattr(self.discovery, "progress", None)
        state = getattr(progress, "state", None)
        if progress is not None and progress.complete and state is not None and state.on:
            return "keyspace events"
        if state is None:
            return "a SCAN every pass"
        return f"a SCAN every pass (keyspace notifications {state.state})"

    def _remember(self, kept: dict[bytes, tuple[Verdict, Record]], began_ms: int | None, status: bytes | None) -> None:
        """Write this monitor's status; an acting monitor also writes the records that changed
        (compare-and-set) and, after a complete pass, when it began. One script call per
        READ_BATCH records written, the last also writing the mark and the status: one round trip
        in a steady pass (README "Performance"); in a cluster, a pipeline split by node."""
        status_key = protocol.monitor_status_key(self.settings.name)  # monitor.name: what `health` reads
        # The status key's own TTL dates it on Redis's clock: `health` reads its age as ttl - PTTL.
        status_ttl = status_ttl_ms(self.settings)
        if not self.acting:
            if status is not None:
                self.client.set(status_key, status, px=status_ttl)
            return
        writes = []
        for verdict, record in kept.values():
            h = verdict.holding
            data = record.dumps()
            if data == verdict.stored and h.expiry_ms >= 0:
                continue
            life = NO_TTL_RECORD_MS if h.expiry_ms < 0 else max(1, h.expiry_ms - h.now_ms) + RECORD_MARGIN_MS
            writes.append((h.key, [protocol.fingerprint(h.holder), h.expiry_ms, verdict.stored or b"", data, life]))
        if is_cluster(self.client):
            if status is not None:
                self.client.set(status_key, status, px=status_ttl)
            self._remember_cluster(writes, began_ms)
            return
        head = [protocol.last_pass_key(self.settings.key_pattern), status_key]
        for start in range(0, max(1, len(writes)), READ_BATCH):
            batch = writes[start : start + READ_BATCH]
            header: list[Any] = ["", "", "", b"", 0]
            if status is None and not batch:
                return  # nothing changed, and no pass to report
            if status is not None and start + READ_BATCH >= len(writes):  # the last call also says the pass is done
                header = ["h", "", "" if began_ms is None else began_ms, status, status_ttl]
            pairs = [k for key, _ in batch for k in (key, protocol.holding_key(key))]
            script_keys = (head if header[0] else []) + pairs
            self._persist(keys=script_keys, args=header + [a for _, per in batch for a in per])

    def _remember_cluster(self, writes: list[tuple[bytes, list[Any]]], began_ms: int | None) -> None:
        """One script per record, in its lock's slot (a record key that cannot share the lock's
        slot is not written: that holding is timed from first sight by each pass)."""
        pipe = self.client.pipeline()
        for key, per in writes:
            record_key = protocol.holding_key(key)
            if key_slot(record_key) == key_slot(key):
                pipe.execute_command("EVAL", protocol.PERSIST_SCRIPT, 2, key, record_key, "", "", "", b"", 0, *per)
        pipe.execute()
        if began_ms is not None:
            self.client.eval(protocol.RAISE_TO_SCRIPT, 1, protocol.last_pass_key(self.settings.key_pattern), began_ms)

    # --- actions ----------------------------------------------------------------------------

    def _act(self, verdict: Verdict, report: PassReport) -> Record | None:
        """Carry out a decision; the record to keep, or None when the lock was released."""
        record = verdict.holding.record
        if verdict.holding.ttl_mismatch:
            record = self._mismatch(record, verdict)
        action, reason = verdict.decision.action, verdict.decision.reason
        if action is Action.WARN:
            return self._once(record, verdict, Event.LOCK_WARNING)
        if action is Action.KEEP:
            if reason is not Reason.LONG_TASK_PROTECTED:
                return record
            record = self._once(record, verdict, Event.LONG_TASK_PROTECTED)
            if self.settings.hard_timeout_s is None and verdict.holding.held_s >= 2 * self.settings.soft_timeout_s:
                # No cap will ever end it: say so once, loudly enough to alert on.
                record = self._once(record, verdict, Event.LONG_TASK_OVERRUN)
            return record
        if self.dry_run:
            return self._once(record, verdict, Event.LOCK_RELEASED, outcome="dry_run")
        return self._release(verdict, report, record)

    def _once(self, record: Record, verdict: Verdict, event: Event, **extra: Any) -> Record:
        """Audit `event` once per holding; the record remembers that it was sent."""
        if event.value in record.notified:
            return record
        self.record(event, **self._fields(verdict, dry_run=self.dry_run), **extra)
        return evolve(record, notified=record.notified | {event.value})

    def _mismatch(self, record: Record, verdict: Verdict) -> Record:
        """The lock's TTL says it is older than a complete pass that did not see it: its worker
        uses a shorter EX than gpu_lock.lock_timeout. Held time is then first sight alone."""
        if "lock_timeout_mismatch" in record.notified:
            return record
        h = verdict.holding
        assert record.after_ms is not None  # a mismatch needs a pass that did not see the lock
        details = {
            "lock_timeout_s": self.settings.lock_timeout_s,
            "worker_ex_at_most_s": round(units.to_s(h.expiry_ms - record.after_ms), 3),
        }
        if self.acting:
            found = {"lock_key": protocol.text(h.key), "seen_ms": h.now_ms, **details}
            self.client.set(protocol.MISMATCH_KEY, json.dumps(found), px=MISMATCH_TTL_MS)
        return self._once(record, verdict, Event.LOCK_TIMEOUT_MISMATCH, **details)

    def _release(self, verdict: Verdict, report: PassReport, record: Record, **extra: Any) -> Record | None:
        h = verdict.holding
        fid = self._fid(h)
        failure = self._failures.get(fid)
        if failure is not None and self.mono() < failure.next_try:
            return record
        fields = {**self._fields(verdict, dry_run=False), **extra}
        before = Record.loads(verdict.stored) if self.acting else self._known.get(h.key)
        due = due_ms(verdict, before, self.settings)
        if due is not None:
            fields["late_s"] = round(units.to_s(max(0, h.now_ms - due)), 3)
        try:
            result = self._call_reaper(verdict)
        except REDIS_DOWN as exc:
            # The script may have run: its outcome is unknown until the next pass asks again.
            self._unsettled[h.key] = verdict
            error = redact(f"{exc.__class__.__name__}: {exc}")
            self.record(Event.LOCK_RELEASED, sync=True, outcome="unknown", error=error, **fields)
            raise
        except (ReleaseError, redis.RedisError) as exc:
            self._release_failed(fid, fields, exc)
            return record
        self._failures.pop(fid, None)
        self._audit_result(result, fields, report, h.key)
        if result.outcome is Outcome.RELEASED:
            now = self.mono()
            self._released = {k: t for k, t in self._released.items() if now - t < TOMBSTONE_S}
            self._released[_identity(h)] = now
            unsettled = self._unsettled.get(h.key)
            if unsettled is not None and _identity(unsettled.holding) == _identity(h):
                del self._unsettled[h.key]  # settled by this answer: the next pass must not say it again
        return record if result.outcome is Outcome.HEARTBEAT_REVIVED else None

    def _call_reaper(self, verdict: Verdict) -> ReleaseResult:
        h = verdict.holding
        # The cap applies whatever the heartbeat does; the other rules only while it stays dead.
        check = HeartbeatCheck.ANY if verdict.decision.reason in _ANY_HEARTBEAT else HeartbeatCheck.CHECK
        return self.reaper.release(
            h.key,
            h.holder,
            h.expiry_ms,
            heartbeat=check,
            hb_value=h.hb_value,
            hb_expiry_ms=h.hb_expiry_ms,
            attempt=f"{self._attempt}:{h.id}",
        )

    def _audit_result(self, result: ReleaseResult, fields: dict[str, Any], report: PassReport, key: bytes) -> None:
        if result.outcome is Outcome.RELEASED:
            report.released_keys.add(key)
            if result.notice_error is not None:
                fields["notice_error"] = result.notice_error
            self.record(Event.LOCK_RELEASED, sync=True, outcome=result.outcome.value, **fields)
            return
        if result.current is not None:
            fields["current_holder"] = protocol.shown(result.current)
        self.record(Event.RELEASE_SKIPPED, outcome=result.outcome.value, **fields)

    def _settle_unknown(self, report: PassReport) -> None:
        """Ask again about releases whose reply was lost; the script answers what it did."""
        for key, verdict in list(self._unsettled.items()):
            fields = {**self._fields(verdict, dry_run=False), "settles": "unknown"}
            try:
                result = self._call_reaper(verdict)
            except REDIS_DOWN:
                raise  # still unreachable: the pass stops, and the next one asks again
            except (ReleaseError, redis.RedisError) as exc:
                # Refused now (a replica, an ACL): the pass goes on and decides afresh.
                del self._unsettled[key]
                self._release_failed(self._fid(verdict.holding), fields, exc, outcome="unknown")
                continue
            del self._unsettled[key]
            self._failures.pop(self._fid(verdict.holding), None)
            self._audit_result(result, fields, report, key)

    def _release_failed(
        self, fid: tuple[bytes, bytes, int], fields: dict[str, Any], exc: Exception, **extra: Any
    ) -> None:
        failure = self._failures.setdefault(fid, _Failure())
        failure.attempts += 1
        failure.next_try = self.mono() + self.settings.retry_delay_s
        spent = failure.attempts >= self.settings.max_retry
        error = redact(f"{exc.__class__.__name__}: {exc}")
        self.record(
            Event.RELEASE_FAILED,
            sync=True,
            attempt=failure.attempts,
            max_retry=self.settings.max_retry,
            retries_spent=spent,
            error=error,
            **fields,
            **extra,
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

    def _report_invalid(self, found: dict[bytes, str], report: PassReport) -> None:
        report.invalid = len(found)
        said, new, summary = invalid.to_say(self._invalid_said or invalid.Said(), found)
        for key in new:
            self.record(Event.INVALID_LOCK, lock_key=protocol.shown(key), reason=found[key])
        if summary is not None:
            reason = f"{summary} more keys under the pattern are not locks (not named one by one)"
            self.record(Event.INVALID_LOCK, lock_key=None, reason=reason, count=summary)
        if said != self._invalid_said and self.acting:
            self.client.set(invalid.SAID_KEY, said.dumps(), px=invalid.SAID_TTL_MS)
        self._invalid_said = said

    # --- Redis outages --------------------------------------------------------------------------

    def _redis_lost(self, exc: Exception) -> None:
        self._down_passes += 1
        max_skip = max(0, math.ceil(MAX_BACKOFF_S / self.settings.monitor_interval_s) - 1)
        self._skip = min(2 ** (self._down_passes - 1) - 1, max_skip)
        self.redis_error = str(exc)
        if self._down_since is None:
            self._down_since = self.wall()
            self.record(Event.REDIS_UNAVAILABLE, error=redact(str(exc)))

    def down_for_s(self) -> float | None:
        """How long Redis has been unreachable, or None while it answers."""
        return None if self._down_since is None else max(0.0, self.wall() - self._down_since)

    def _redis_back(self) -> None:
        self._down_passes = 0
        self.redis_error = None
        if self._down_since is not None:
            down_s = round(self.wall() - self._down_since, 3)
            self._down_since = None
            self.record(Event.REDIS_RECOVERED, down_s=down_s)

    # --- audit ----------------------------------------------------------------------------------

    def record(self, event: Event, *, sync: bool = False, **fields: Any) -> None:
        """Log, audit and announce one event; never raises."""
        getattr(log, event.level)(event.value, **{k: v for k, v in fields.items() if k != "dry_run" or v})
        try:
            self.audit.event(event.value, sync=sync, now=self.wall(), **fields)
        except AuditWriteError as exc:
            # The event is kept in memory and written before the next one; the log line above
            # already holds it for journald.
            log.error("audit_write_failed", error=str(exc), audit_event=event.value)
        for listener in self.listeners:
            try:
                listener(event, fields)
            except Exception:  # a listener's bug must not stop a release (logged with its traceback)
                log.exception("event_listener_failed", audit_event=event.value)
