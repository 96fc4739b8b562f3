"""Hung holders: findings from the GPU's own evidence and the work's progress (DESIGN.md section 6).

Alive is not progressing. A heartbeat thread keeps beating while the work is deadlocked in an
NCCL call, spinning in a kernel or blocked on I/O; the tiers then keep the GPU until
`hard_timeout`, which is also what ends honest long tasks. This module judges, for one holding at
one moment, the findings below from data it is given (the holder record, the NVML snapshot of the
lock's device, /proc); it reads no Redis and no NVML itself. `HangWatch.judge` returns every
finding true now; the caller audits each once per holding, alerts, shows it, and releases when a
`Found.release` says so (the `hang:` rules; the default is to warn only).

Clocks. Progress is Redis-clock ms (`progress_ms`, written by Redis's TIME inside the progress
script) against the pass's `now_ms`: never a worker's clock. Everything measured on this host
(absence from the GPU, idleness, Xid errors) is on this host's monotonic clock; a moment of it is
put on the Redis clock only through `now_ms` and `now_mono`, read together. `started_ms` is the
monitor's proven lower bound of the held time (so the latest moment the holding can have begun):
"since the holding began" may miss what happened just after the true start, never count what
came before it.

`since_s` of a finding is how long the finding itself has been true: past its own threshold
(progress_timeout, the not-on-GPU grace, the idle window, the foreign-process grace) and
counted from there; a rule's `grace_s` is measured on it. A condition that stops, or that
cannot be judged at some moment (NVML or /proc could not say), resets its clock.

Findings, what each is built on, and what it cannot prove:

- `holder_stalled`: no progress mark for `progress_timeout_s`. The timeout is the holder
  record's own when it declares one (then counted from the holding's start until the first mark:
  a task that promises marks and never makes one is stalled), else the config's, which applies
  only from the first mark (a task that never marks progress has not opted in: no finding).
  Cannot prove the work is stuck: a legitimately long step between two marks (one huge batch, a
  checkpoint write) looks the same; the timeout is the task's statement of how long a step may
  take. Needs the holder record (legacy workers have none).
- `holder_not_on_gpu`: heartbeat alive, yet neither the holder's pid nor any process descended
  from it (its /proc parent chain reaches the holder's pid) is among the GPU's compute processes
  for `not_on_gpu_grace_s`. Pids are compared only when the record's pid lives in this monitor's
  pid namespace on this host (`pid_visible`: a container's pid means nothing on the host) and
  the holder's process is still there with its recorded start time (a reused pid is another
  process). Cannot prove a hang: a task loading a model from disk, preprocessing on the CPU or
  waiting for input has no CUDA context yet; a process that double-forks away from the holder
  (its parent becomes init or a subreaper) is not counted as the holder's; NVML's process list
  comes from the driver's pid namespace (a monitor in a container without the host's pids sees
  pids that are not its own); with MPS the GPU lists the MPS server, not the client; another
  user's process hidden by /proc's hidepid or ProtectProc makes the answer unknown (no finding).
  A record naming another GPU (`GPU-...`) than the lock's device is not judged.
- `gpu_idle_held`: the lock is held and, for `idle_window_s` since the holding began, every
  observation of its GPU was quiet: utilisation below `idle_util_pct` (idle), or the spin
  signature (SPIN_* below: a kernel "running" all the time with power near idle and no memory
  traffic, as a kernel spinning on a flag looks). Observations are every sample in the driver's
  own buffer (nvmlDeviceGetSamples) since the previous pass, else one reading a pass.
  Utilisation is "a kernel was executing during the sample period", never "useful work": a
  memory-bound or tiny kernel also reads 100 %, and a host-side stall between kernels reads 0.
  Cannot prove a hang: a task in a CPU phase (tokenising, decoding, waiting for a download or a
  queue) idles its GPU honestly; a busy burst the driver did not keep (its buffer is shorter
  than a pass on some GPUs, and runs dry while idle) is not seen. The spin signature cannot tell
  a spin-wait from an honest kernel that computes from registers and shared memory alone at low
  clocks; it needs power, its limit and memory utilisation, and is not judged without them.
- `gpu_foreign_process`: a compute process on the locked GPU that is neither the holder's pid
  nor descended from it, for `foreign_process_grace_s`: two holders (a Redis failover that lost
  the lock, a legacy worker's blind DEL, a job that bypasses the lock). Same pid conditions as
  `holder_not_on_gpu`; a process whose ancestry /proc will not tell is not counted; with a MIG
  record, processes of the other instances of the same GPU are not foreign, so none is judged.
  Cannot prove misuse: the previous holder's process may still be tearing down its context
  (the grace covers that), and a helper process that is not a descendant (a server the task
  talks to) looks foreign.
- `gpu_xid`: an Xid error reported by NVML for the lock's GPU since the holding began (codes
  in `xid_ignore` excepted). Cannot prove the holder is stuck, nor that it caused the error:
  some Xids are the application's own fault (13, 31, 43: the task may have died or recovered),
  some are reported for the whole GPU (48, 63, 64, 79, 94, 95: ECC, page retirement, fallen off
  the bus), and with MIG another instance's error is reported on the same physical GPU. Xids are
  seen only from when the monitor started watching, and not at all where the driver or the
  container does not deliver events.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from monitor.gpu import GpuInfo, Sample
from monitor.protocol import HolderRecord


class Finding(str, Enum):
    HOLDER_STALLED = "holder_stalled"  # no progress mark for progress_timeout (heartbeat may still beat)
    HOLDER_NOT_ON_GPU = "holder_not_on_gpu"  # heartbeat alive, holder (or a descendant) absent from its GPU
    GPU_IDLE_HELD = "gpu_idle_held"  # lock held, GPU idle or spin-hung for idle_window
    GPU_FOREIGN_PROCESS = "gpu_foreign_process"  # a process not the holder's on the locked GPU: two holders
    GPU_XID = "gpu_xid"  # an Xid error on the holder's GPU since the holding began


ACTIONS = ("warn", "release")


@dataclass(frozen=True)
class Rule:
    action: str = "warn"  # "warn" | "release"
    grace_s: float = 0.0  # how long the finding must persist (its since_s) before a release


def _all_warn() -> Mapping[Finding, Rule]:
    return MappingProxyType({f: Rule() for f in Finding})


@dataclass(frozen=True)
class HangSettings:
    progress_timeout_s: float | None = None  # config default; a holder record's own progress_timeout_s wins
    not_on_gpu_grace_s: float = 120.0
    idle_window_s: float = 300.0
    idle_util_pct: float = 5.0
    rules: Mapping[Finding, Rule] = field(default_factory=_all_warn)
    # A process that is not the holder's must be there this long: the previous holder's process
    # may take a few seconds to leave the GPU after its lock went.
    foreign_process_grace_s: float = 30.0
    xid_ignore: frozenset[int] = frozenset()  # Xid codes that are no finding

    def rule(self, finding: Finding) -> Rule:
        return self.rules.get(finding, Rule())


# The spin signature: what a kernel spinning on a flag looks like to NVML. Utilisation counts a
# sample period in which any kernel was executing, so one spinning thread block reads ~100 %;
# the power it draws stays near the idle floor and its flag sits in cache, so device memory is not
# touched. An honest kernel that reads 100 % almost always draws well above a third of the
# enforced limit or moves device memory. What it cannot prove: a compute-only kernel at low
# clocks (registers and shared memory, no device-memory traffic) on a GPU whose idle draw is a
# large share of its limit (small inference cards idle at 20-40 % of theirs) can match it.
SPIN_UTIL_PCT = 90.0  # utilisation at or above: "a kernel ran the whole period"
SPIN_MEMORY_UTIL_PCT = 1.0  # memory-controller activity at or below: no device-memory traffic
SPIN_POWER_FRACTION = 0.3  # power at or below this share of the enforced limit: near idle
# A memory-utilisation or power sample is read with a utilisation sample when this close in time.
SAMPLE_PAIR_S = 2.0
# /proc parent chains are followed this far (a chain longer than this is not the holder's).
MAX_ANCESTRY = 64
# Utilisation samples outside 0..100 are a driver's garbage, not a reading.
MAX_PCT = 100.0


class ProcReader(Protocol):
    """The /proc facts the pid findings use (injectable: tests give a table)."""

    def parent(self, pid: int) -> int | None:
        """The parent pid, or None when /proc cannot say (gone, hidden, another namespace)."""

    def start_time(self, pid: int) -> int | None:
        """/proc/<pid>/stat field 22 (clock ticks after boot), or None."""


class ProcFs:
    """ProcReader over a real /proc (or another mount of it)."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root

    def _stat(self, pid: int) -> list[bytes] | None:
        try:
            data = (self.root / str(pid) / "stat").read_bytes()
            # Fields from 3 on; the command name (field 2) may hold spaces and parentheses.
            fields = data[data.rindex(b")") + 2 :].split()
        except (OSError, ValueError):
            return None
        return fields if len(fields) >= 20 else None

    def parent(self, pid: int) -> int | None:
        fields = self._stat(pid)
        return None if fields is None else int(fields[4 - 3])

    def start_time(self, pid: int) -> int | None:
        fields = self._stat(pid)
        return None if fields is None else int(fields[22 - 3])


@dataclass(frozen=True)
class Evidence:
    """One holding at one moment."""

    now_ms: int  # Redis clock, ms
    started_ms: int  # the latest moment the holding can have begun (Redis clock, ms)
    heartbeat_alive: bool
    record: HolderRecord | None = None  # already checked to belong to this holding
    pid_visible: bool = False  # the record's pid is in this monitor's pid namespace on this host
    gpu: GpuInfo | None = None  # the device this lock guards on this host (samples and Xids inside)
    now_mono: float | None = None  # this host's time.monotonic() when now_ms was read; None: at judge


@dataclass(frozen=True)
class Found:
    finding: Finding
    since_s: float  # how long the finding has been true (past its own threshold)
    release: bool  # the rule's action is release and since_s >= its grace
    detail: dict[str, Any]  # JSON-able facts for the audit and the alert


@dataclass
class _Timeline:
    """What one GPU's observations say, kept as extremes so that feeding a point twice (two
    holdings on one device, a snapshot judged again) changes nothing."""

    first: float
    latest: float
    latest_quiet: bool
    last_active: float | None = None
    last_spin: float | None = None
    latest_point: dict[str, Any] = field(default_factory=dict)

    def add(self, t: float, kind: str, point: dict[str, Any]) -> None:
        self.first = min(self.first, t)
        if kind == "active":
            self.last_active = t if self.last_active is None else max(self.last_active, t)
        elif kind == "spin":
            self.last_spin = t if self.last_spin is None else max(self.last_spin, t)
        if t > self.latest or (t == self.latest and kind == "active"):
            self.latest, self.latest_quiet, self.latest_point = t, kind != "active", point


@dataclass
class _Point:
    t: float
    util: float
    memory: float | None
    power: float | None
    signal: str  # "samples" | "reading"


def _nearest(samples: tuple[Sample, ...] | None, times: list[float], t: float) -> float | None:
    """The value of the sample nearest to t within SAMPLE_PAIR_S (`times` sorted, of `samples`)."""
    if not samples:
        return None
    i = bisect.bisect_left(times, t)
    best = min(
        (j for j in (i - 1, i) if 0 <= j < len(times)),
        key=lambda j: abs(times[j] - t),
    )
    return samples[best].value if abs(times[best] - t) <= SAMPLE_PAIR_S else None


def _points(gpu: GpuInfo, now_mono: float) -> list[_Point]:
    """Every observation of the GPU's activity in this snapshot: each utilisation sample with the
    memory and power samples beside it, and the snapshot's own reading."""
    points: list[_Point] = []
    read_at = gpu.read_mono if gpu.read_mono is not None else now_mono
    mem = tuple(sorted(gpu.memory_util_samples or (), key=lambda s: s.mono))
    power = tuple(sorted(gpu.power_samples or (), key=lambda s: s.mono))
    mem_t, power_t = [s.mono for s in mem], [s.mono for s in power]
    for s in gpu.util_samples or ():
        if not 0 <= s.value <= MAX_PCT:
            continue
        m = _nearest(mem, mem_t, s.mono)
        p = _nearest(power, power_t, s.mono)
        if abs(s.mono - read_at) <= SAMPLE_PAIR_S:  # the snapshot's own readings are beside it too
            m = gpu.memory_util_pct if m is None else m
            p = gpu.power_w if p is None else p
        points.append(_Point(s.mono, s.value, m, p, "samples"))
    if gpu.utilization_pct is not None and 0 <= gpu.utilization_pct <= MAX_PCT:
        points.append(_Point(read_at, gpu.utilization_pct, gpu.memory_util_pct, gpu.power_w, "reading"))
    return points


def classify(point: _Point, limit_w: float | None, idle_util_pct: float) -> str:
    """The point's kind: idle, spin, or active (anything the evidence cannot call quiet)."""
    if point.util < idle_util_pct:
        return "idle"
    spin = (
        point.util >= SPIN_UTIL_PCT
        and point.memory is not None
        and point.memory <= SPIN_MEMORY_UTIL_PCT
        and point.power is not None
        and limit_w is not None
        and limit_w > 0
        and point.power <= SPIN_POWER_FRACTION * limit_w
    )
    return "spin" if spin else "active"


def _owner(pid: int, holder: int, proc: ProcReader, cache: dict[int, bool | None]) -> bool | None:
    """True when pid is the holder or descends from it, False when its chain ends elsewhere, None
    when /proc cannot say (`cache`: the answers for every pid on the chains followed so far)."""
    chain: list[int] = []
    answer: bool | None = False
    current: int | None = pid
    while current is not None and len(chain) < MAX_ANCESTRY:
        if current == holder:
            answer = True
            break
        if current in cache:
            answer = cache[current]
            break
        if current <= 1:
            break
        chain.append(current)
        current = proc.parent(current)
    else:
        answer = None if current is None else False
    for p in chain:
        cache[p] = answer
    return answer


@dataclass(frozen=True)
class _Pids:
    """The GPU's compute processes sorted by whose they are."""

    holder: int
    own: tuple[int, ...]
    foreign: tuple[int, ...]
    unknown: tuple[int, ...]


class HangWatch:
    """The findings of every holding, with what must be remembered between passes: per (lock key,
    holding) how long the holder has been absent from its GPU and a foreign process present, and
    per GPU what its observations said."""

    def __init__(
        self,
        settings: HangSettings,
        mono: Callable[[], float] = time.monotonic,
        proc: ProcReader | None = None,
    ) -> None:
        self.settings = settings
        self._mono = mono
        self.proc: ProcReader = proc or ProcFs()
        self._absent: dict[tuple[bytes, int], float] = {}
        self._foreign: dict[tuple[bytes, int], float] = {}
        self._gpus: dict[str, _Timeline] = {}

    def judge(self, key: bytes, holding: int, ev: Evidence) -> list[Found]:
        """Every finding true now for this holding."""
        now = self._mono() if ev.now_mono is None else ev.now_mono
        held = (key, holding)
        found: list[Found | None] = [self._stalled(ev)]
        pids = self._pids(ev)
        found.append(self._not_on_gpu(held, ev, pids, now))
        found.append(self._foreign_process(held, ev, pids, now))
        found.append(self._idle(ev, now))
        found.append(self._xid(ev, now))
        return [f for f in found if f is not None]

    def forget(self, present: Iterable[tuple[bytes, int]]) -> None:
        """Drop what is remembered of holdings that are gone."""
        keep = set(present)
        for state in (self._absent, self._foreign):
            for held in [h for h in state if h not in keep]:
                del state[held]

    # --- the findings ------------------------------------------------------------------------------

    def _found(self, finding: Finding, since_s: float, detail: dict[str, Any]) -> Found:
        rule = self.settings.rule(finding)
        since_s = max(0.0, since_s)
        return Found(finding, round(since_s, 3), rule.action == "release" and since_s >= rule.grace_s, detail)

    def _stalled(self, ev: Evidence) -> Found | None:
        record = ev.record
        if record is None:
            return None
        own = record["progress_timeout_s"]
        timeout = own if own is not None else self.settings.progress_timeout_s
        mark = record["progress_ms"]
        if timeout is None or (own is None and mark is None):
            return None  # no timeout, or only the config's and the task never marked progress
        since_ms = mark if mark is not None else ev.started_ms
        silent_s = (ev.now_ms - since_ms) / 1000
        if silent_s < timeout:
            return None
        return self._found(
            Finding.HOLDER_STALLED,
            silent_s - timeout,
            {
                "progress_timeout_s": timeout,
                "timeout_from": "record" if own is not None else "config",
                "last_progress_ms": mark,
                "silent_s": round(silent_s, 3),
            },
        )

    def _pid_reason(self, ev: Evidence) -> str | None:
        """Why the GPU's pids cannot be compared with the holder's here, or None when they can."""
        record, gpu = ev.record, ev.gpu
        if record is None:
            return "no holder record"
        holder = record["pid"]
        if holder is None:
            return "the holder record has no pid"
        if not ev.pid_visible:
            return "the holder's pid is not in this monitor's pid namespace on this host"
        if gpu is None:
            return "the lock guards no GPU of this host"
        if gpu.processes is None:
            return "NVML lists no processes for this GPU"
        named = record["gpu_uuid"]
        if named is not None and named.startswith("GPU-") and gpu.uuid is not None and named != gpu.uuid:
            return f"the holder record names another GPU ({named})"
        started = self.proc.start_time(holder)
        if started is None or (record["start_time"] is not None and started != record["start_time"]):
            return "the holder's process is not in /proc (gone, hidden, or its pid reused)"
        return None

    def _pids(self, ev: Evidence) -> _Pids | None:
        """The GPU's processes by whose they are, or None when pids cannot be compared here."""
        if self._pid_reason(ev) is not None:
            return None
        record, gpu = ev.record, ev.gpu
        assert record is not None
        assert gpu is not None
        assert gpu.processes is not None
        holder = record["pid"]
        assert holder is not None
        cache: dict[int, bool | None] = {}
        whose: dict[bool | None, list[int]] = {True: [], False: [], None: []}
        for p in gpu.processes:
            whose[_owner(p.pid, holder, self.proc, cache)].append(p.pid)
        return _Pids(holder, tuple(whose[True]), tuple(whose[False]), tuple(whose[None]))

    def unjudged(self, ev: Evidence) -> dict[Finding, str]:
        """Why each finding that cannot be judged for this holding is not (for status: "xid: not
        available"); a finding judged, true or not, is absent."""
        why: dict[Finding, str] = {}
        record, gpu = ev.record, ev.gpu
        if record is None:
            why[Finding.HOLDER_STALLED] = "no holder record"
        elif record["progress_timeout_s"] is None and self.settings.progress_timeout_s is None:
            why[Finding.HOLDER_STALLED] = "no progress_timeout (holder record or config)"
        elif record["progress_timeout_s"] is None and record["progress_ms"] is None:
            why[Finding.HOLDER_STALLED] = "no progress mark yet (the config's timeout applies from the first)"
        pids = self._pid_reason(ev)
        if pids is not None:
            why[Finding.HOLDER_NOT_ON_GPU] = why[Finding.GPU_FOREIGN_PROCESS] = pids
        elif not ev.heartbeat_alive:
            why[Finding.HOLDER_NOT_ON_GPU] = "the heartbeat is not alive"
        if pids is None and record is not None and (record["gpu_uuid"] or "").startswith("MIG-"):
            why[Finding.GPU_FOREIGN_PROCESS] = "a MIG holder: the GPU lists every instance's processes"
        if gpu is None:
            why[Finding.GPU_IDLE_HELD] = why[Finding.GPU_XID] = "the lock guards no GPU of this host"
            return why
        if gpu.utilization_pct is None and gpu.util_samples is None:
            why[Finding.GPU_IDLE_HELD] = "NVML gives no utilisation for this GPU"
        if gpu.xids is None:
            why[Finding.GPU_XID] = "xid: not available"
        return why

    def observe(self, gpus: Iterable[GpuInfo]) -> None:
        """Take in a snapshot's samples for every GPU, held or not. `judge` takes in its lock's GPU
        itself; call this after every snapshot as well where a pass may not judge every held lock
        (samples are read once: a snapshot no one takes in leaves a gap no window can see into)."""
        now = self._mono()
        for gpu in gpus:
            self._timeline(gpu, now)

    def _not_on_gpu(self, held: tuple[bytes, int], ev: Evidence, pids: _Pids | None, now: float) -> Found | None:
        absent = ev.heartbeat_alive and pids is not None and not pids.own and not pids.unknown
        if not absent or pids is None:
            self._absent.pop(held, None)
            return None
        since = self._absent.setdefault(held, now)
        grace = self.settings.not_on_gpu_grace_s
        if now - since < grace:
            return None
        return self._found(
            Finding.HOLDER_NOT_ON_GPU,
            now - since - grace,
            {"pid": pids.holder, "absent_s": round(now - since, 3), "gpu_pids": sorted(pids.foreign)},
        )

    def _foreign_process(self, held: tuple[bytes, int], ev: Evidence, pids: _Pids | None, now: float) -> Found | None:
        record = ev.record
        mig = record is not None and (record["gpu_uuid"] or "").startswith("MIG-")
        if pids is None or not pids.foreign or mig:
            self._foreign.pop(held, None)
            return None
        since = self._foreign.setdefault(held, now)
        grace = self.settings.foreign_process_grace_s
        if now - since < grace:
            return None
        gpu = ev.gpu
        assert gpu is not None  # pids come from it
        return self._found(
            Finding.GPU_FOREIGN_PROCESS,
            now - since - grace,
            {
                "pid": pids.holder,
                "foreign": [p.as_dict() for p in gpu.processes or () if p.pid in pids.foreign],
                "holder_pids": sorted(pids.own),
                "unknown_pids": sorted(pids.unknown),
                "present_s": round(now - since, 3),
            },
        )

    def _timeline(self, gpu: GpuInfo, now: float) -> _Timeline | None:
        name = gpu.uuid or f"index:{gpu.index}"
        line = self._gpus.get(name)
        points = _points(gpu, now)
        if not points and line is not None:  # NVML could not say: what it said before no longer holds
            line.add(now, "active", {"signal": None})
        for point in points:
            kind = classify(point, gpu.power_limit_w, self.settings.idle_util_pct)
            facts = {
                "signal": point.signal,
                "utilization_pct": point.util,
                "memory_util_pct": point.memory,
                "power_w": point.power,
            }
            if line is None:
                line = self._gpus[name] = _Timeline(point.t, point.t, kind != "active", latest_point=facts)
            line.add(point.t, kind, facts)
        return line

    def _idle(self, ev: Evidence, now: float) -> Found | None:
        gpu = ev.gpu
        if gpu is None:
            return None
        line = self._timeline(gpu, now)
        if line is None or not line.latest_quiet:
            return None
        began = now - (ev.now_ms - ev.started_ms) / 1000  # the holding's start on this host's clock
        quiet_from = max(line.first if line.last_active is None else line.last_active, began)
        quiet_s = line.latest - quiet_from
        window = self.settings.idle_window_s
        if quiet_s < window:
            return None
        spin = line.last_spin is not None and line.last_spin >= quiet_from
        return self._found(
            Finding.GPU_IDLE_HELD,
            quiet_s - window,
            {
                "kind": "spin" if spin else "idle",
                "quiet_s": round(quiet_s, 3),
                "idle_window_s": window,
                "idle_util_pct": self.settings.idle_util_pct,
                "power_limit_w": gpu.power_limit_w,
                "sm_clock_mhz": gpu.sm_clock_mhz,
                **line.latest_point,
            },
        )

    def _xid(self, ev: Evidence, now: float) -> Found | None:
        gpu = ev.gpu
        if gpu is None or not gpu.xids:
            return None
        # An Xid's moment on the Redis clock: now_ms less how long ago (this host's clock) it came.
        xids = [
            x
            for x in gpu.xids
            if x.code not in self.settings.xid_ignore and ev.now_ms - (now - x.mono) * 1000 >= ev.started_ms
        ]
        if not xids:
            return None
        first = min(x.mono for x in xids)
        return self._found(
            Finding.GPU_XID,
            now - first,
            {"codes": sorted({x.code for x in xids}), "count": len(xids), "xids": [x.as_dict() for x in xids[-16:]]},
        )
