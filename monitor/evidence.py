"""What is known of each holding beyond its lock and heartbeat: its holder record, its process on
this host and its GPU. Feeds the hung-holder findings (monitor.hang), the pid watch that sees a
local holder die at once (monitor.pidwatch) and dcgm-exporter's job mapping (monitor.jobmap).

A holder record counts only while it is the holding's own (`protocol.holder_record_matches`): one
left behind by an earlier holding (a legacy worker's delete, a crash) describes nobody now. Records
are data anyone with write access controls: parsed defensively, cached by their bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from monitor import pidwatch, protocol
from monitor.gpu import GpuInfo
from monitor.gpuwatch import GpuWatch
from monitor.hang import Evidence, Found, HangWatch
from monitor.logs import get_logger
from monitor.policy import Heartbeat
from monitor.scanner import Observation
from monitor.verdict import Verdict

log = get_logger("gpulock_monitor.evidence")

# Holder record fields whose values many records repeat (a task's name, a host's name and boot, a pid
# namespace, the heartbeat settings): one object for each value, however many locks' records name it.
_REPEATED = ("task", "host", "boot_id", "pid_ns", "heartbeat_interval_s", "progress_timeout_s")


class Pids(Protocol):
    """The part of pidwatch.PidWatch used here."""

    def watch(self, key: bytes, token: str, pid: int, start_time: int) -> bool: ...

    def unwatch(self, key: bytes) -> None: ...

    def watching(self) -> dict[bytes, tuple[str, int]]: ...


class Jobs(Protocol):
    """The part of jobmap.JobMap used here."""

    def write(self, holders: Mapping[str, str | None]) -> None: ...

    def clear(self) -> None: ...


def identity(record: protocol.HolderRecord) -> str:
    """Which process of which holding a pid watch is for: the token names the holding, the pid and
    its start time the process (two processes forked from one client object share a token)."""
    return f"{record['token']}:{record['pid']}:{record['start_time']}"


def job_name(record: protocol.HolderRecord | None, holder: bytes) -> str:
    """What dcgm-exporter shows as the GPU's job: the task id where the holder gave one, else its task."""
    if record is not None and record["task_id"]:
        return record["task_id"]
    return protocol.text(protocol.task_name(holder))


class Holders:
    """Per lock, the last holder record read; per pass, findings, pid watches and the job map."""

    def __init__(
        self,
        hang: HangWatch,
        *,
        gpus: GpuWatch | None = None,
        pids: Pids | None = None,
        jobs: Jobs | None = None,
        watchable: Callable[[protocol.HolderRecord], bool] | None = None,
    ) -> None:
        self.hang = hang
        self.gpus = gpus
        self.pids = pids
        self.jobs = jobs
        # The record names a process of this host's and of our pid namespace (ours read once).
        here = protocol.this_process()
        self._watchable = watchable or functools.partial(
            pidwatch.watchable, pid_ns=here["pid_ns"], boot_id=here["boot_id"]
        )
        self._raw: dict[bytes, bytes] = {}  # lock -> its holder record as last read
        # lock -> (value, its own record parsed from _raw[lock]): dropped when _raw[lock] changes
        self._parsed: dict[bytes, tuple[bytes, protocol.HolderRecord | None]] = {}
        self._values: dict[str, dict[object, object]] = {name: {} for name in _REPEATED}  # field -> value -> it
        self._said: set[tuple[bytes, int, str]] = set()  # (lock, holding, finding) already audited
        self._gone: list[tuple[bytes, str]] = []
        self._exited: set[tuple[bytes, str]] = set()  # (lock, identity) found gone: not watched again
        # As of the last pass: each lock's findings, and the local GPU each lock guards.
        self.current: dict[bytes, tuple[Found, ...]] = {}
        self.lock_gpus: dict[bytes, GpuInfo] = {}
        self.job_errors = 0

    def seen(self, observations: Iterable[Observation]) -> None:
        """Take in what a read found at the holder record of each lock; a new record of a process of
        this host's is watched at once (an event read sees it milliseconds after the lock is taken:
        a holder killed right after acquiring is not left to the next pass)."""
        for obs in observations:
            if obs.holder is None or obs.value is None:
                self._raw.pop(obs.key, None)
                self._parsed.pop(obs.key, None)
                continue
            changed = self._raw.get(obs.key) != obs.holder
            if changed:  # else the bytes first read stay: one copy of a record however often it is read
                self._raw[obs.key] = obs.holder
                self._parsed.pop(obs.key, None)
            if self.pids is not None and changed:
                try:
                    record = self.record(obs.key, obs.value)
                    if record is not None and self._watchable(record):
                        self._watch(obs.key, record)
                except Exception:  # one lock's record (anyone's data) must never fail a read
                    log.exception("holder_record_failed", lock_key=protocol.text(obs.key))

    def record(self, key: bytes, value: bytes) -> protocol.HolderRecord | None:
        """The lock's own holder record as last read; parsed once per record written (a progress
        mark writes a new one), not once per pass: thousands of records must not cost a pass."""
        raw = self._raw.get(key)
        if raw is None:
            return None
        cached = self._parsed.get(key)
        if cached is None or cached[0] != value:
            cached = (value, self._shared(protocol.own_record(raw, value)))
            self._parsed[key] = cached
        return cached[1]

    def _shared(self, record: protocol.HolderRecord | None) -> protocol.HolderRecord | None:
        """`record`, its repeated values (_REPEATED) replaced by the equal objects already kept."""
        if record is not None:
            values = self._values
            for name in _REPEATED:
                value = record[name]  # type: ignore[literal-required]
                if value is not None:
                    record[name] = values[name].setdefault(value, value)  # type: ignore[literal-required]
        return record

    def gpu(self, key: bytes, record: protocol.HolderRecord | None) -> GpuInfo | None:
        """The local device of this lock: the one the holder names by UUID, else the lock's own."""
        if self.gpus is None:
            return None
        named = record["gpu_uuid"] if record is not None else None
        if named is not None:
            found = next((g for g in self.gpus.last.values() if g.uuid == named), None)
            if found is not None:
                return found
        return self.gpus.for_lock(key)

    def judge(self, verdict: Verdict, now_ms: int | None = None, now_mono: float | None = None) -> list[Found]:
        """Every finding true now of this holding (its process is watched from the read that first
        sees its record: `seen`). `now_ms`
        (Redis clock) and `now_mono` (this host's, read beside it): the pass's, else the verdict's."""
        h = verdict.holding
        record = self.record(h.key, h.holder)
        gpu = self.gpu(h.key, record)
        if gpu is None and not self._may_stall(record):
            return []  # nothing to judge: no GPU evidence here, and no progress promised
        visible = record is not None and self._watchable(record)
        evidence = Evidence(
            now_ms=max(h.now_ms, now_ms or 0),
            started_ms=h.now_ms - h.held_ms,
            heartbeat_alive=h.heartbeat is Heartbeat.ALIVE,
            record=record,
            pid_visible=visible,
            gpu=gpu,
            now_mono=now_mono,
        )
        return self.hang.judge(h.key, h.id, evidence)

    def _may_stall(self, record: protocol.HolderRecord | None) -> bool:
        """Whether holder_stalled can be judged of this record (hang.HangWatch._stalled's rule)."""
        if record is None:
            return False
        if record["progress_timeout_s"] is not None:
            return True
        return self.hang.settings.progress_timeout_s is not None and record["progress_ms"] is not None

    @property
    def idle(self) -> bool:
        """Nothing to judge, watch or write this pass: no holder record read, no local GPU, nothing
        left from an earlier pass (a fleet of legacy workers elsewhere costs a pass nothing here)."""
        local = self.gpus is not None and bool(self.gpus.last)
        watching = self.pids is not None and bool(self.pids.watching())
        return not (self._raw or local or self.current or self.lock_gpus or self._said or watching or self._gone)

    def pass_findings(
        self, verdicts: Iterable[Verdict], now_ms: int, now_mono: float | None = None
    ) -> list[tuple[Verdict, Found, bool]]:
        """The findings of a pass: (verdict, finding, new), `new` the first time this daemon saw that
        finding of that holding (audit and alert it then, once). Only locks with a holder record or
        a local GPU are judged: a pass over thousands of other hosts' legacy locks costs nothing here."""
        local = bool(self.gpus is not None and self.gpus.last)
        if local:
            assert self.gpus is not None
            self.hang.observe(self.gpus.last.values())  # every GPU's samples, held or not
        found: list[tuple[Verdict, Found, bool]] = []
        current: dict[bytes, tuple[Found, ...]] = {}
        for verdict in verdicts:
            h = verdict.holding
            if h.key not in self._raw and not local:
                continue
            try:
                judged = self.judge(verdict, now_ms, now_mono)
            except Exception:  # one lock's record (anyone's data) must never fail a pass
                log.exception("holder_findings_failed", lock_key=protocol.text(h.key))
                continue
            if judged:
                current[h.key] = tuple(judged)
            for f in judged:
                said = (h.key, h.id, f.finding.value)
                found.append((verdict, f, said not in self._said))
                self._said.add(said)  # once per holding, however often it clears and comes back
        self.current = current
        return found

    def first(self, key: bytes, holding: int, what: str) -> bool:
        """True the first time `what` is asked of this holding (once per holding, like findings)."""
        said = (key, holding, what)
        if said in self._said:
            return False
        self._said.add(said)
        return True

    def _watch(self, key: bytes, record: protocol.HolderRecord) -> None:
        assert self.pids is not None
        ident = identity(record)
        current = self.pids.watching().get(key)
        if (current is not None and current[0] == ident) or (key, ident) in self._exited:
            return
        pid, start = record["pid"], record["start_time"]
        assert pid is not None
        assert start is not None
        try:
            running = self.pids.watch(key, ident, pid, start)
        except (OSError, OverflowError, ValueError) as exc:  # hidden by ProtectProc, /proc unreadable, a pid
            # no kernel has: the heartbeat still judges
            log.info("holder_not_watched", lock_key=protocol.text(key), pid=pid, error=str(exc))
            return
        if not running:  # already gone (or its pid is another process's now): it exited
            self._exited.add((key, ident))
            self._gone.append((key, ident))

    def take_gone(self) -> list[tuple[bytes, str]]:
        """Holders found already exited when their watch began (lock, identity), once each."""
        gone, self._gone = self._gone, []
        return gone

    def after_pass(self, verdicts: Iterable[Verdict]) -> None:
        """Forget holdings that are gone, stop watching their processes, write the job map."""
        # Only locks with a record or a local GPU can have findings, watches or jobs: the rest cost a lookup.
        local = bool(self.gpus is not None and self.gpus.last)
        records = self._raw
        held = [v for v in verdicts if local or v.holding.key in records]
        self.hang.forget((v.holding.key, v.holding.id) for v in held)
        present = {v.holding.key: v for v in held}
        self._raw = {k: raw for k, raw in records.items() if k in present}
        self._parsed = {k: p for k, p in self._parsed.items() if k in self._raw}
        if sum(len(v) for v in self._values.values()) > 8 * len(self._parsed) + 64:
            # Values of records gone: kept again are only those of the records still here.
            self._values = {name: {} for name in _REPEATED}
            for _, record in self._parsed.values():
                self._shared(record)
        self._exited = {e for e in self._exited if e[0] in present}
        holdings = {(v.holding.key, v.holding.id) for v in held}
        self._said = {s for s in self._said if s[:2] in holdings}
        if self.pids is not None:
            for key, (ident, _) in list(self.pids.watching().items()):
                v = present.get(key)
                record = None if v is None else self.record(key, v.holding.holder)
                if record is None or identity(record) != ident:
                    self.pids.unwatch(key)
        self.lock_gpus = {}
        if local:
            for key, v in present.items():
                gpu = self.gpu(key, self.record(key, v.holding.holder))
                if gpu is not None:
                    self.lock_gpus[key] = gpu
        if self.jobs is not None and self.gpus is not None:
            self._write_jobs(present)

    def close(self) -> None:
        """Empty the job map: with the daemon stopped, no holder is known."""
        if self.jobs is None:
            return
        try:
            self.jobs.clear()
        except OSError as exc:
            log.error("job_mapping_write_failed", error=str(exc))

    def _write_jobs(self, present: Mapping[bytes, Verdict]) -> None:
        assert self.jobs is not None
        assert self.gpus is not None
        jobs: dict[str, str | None] = {str(g.index): None for g in self.gpus.last.values()}
        for key, gpu in self.lock_gpus.items():
            v = present[key]
            jobs[str(gpu.index)] = job_name(self.record(key, v.holding.holder), v.holding.holder)
        try:
            self.jobs.write(jobs)
        except OSError as exc:
            self.job_errors += 1
            if self.job_errors == 1:  # said once; the metric counts the rest
                log.error("job_mapping_write_failed", error=str(exc))
