"""Hung holders: the findings engine, table by table, against a fake clock, a fake /proc and
fake GPU snapshots; and the /proc reading against real processes (a holder's real child and
grandchild are the holder's, its parent is not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from monitor import protocol
from monitor.gpu import GpuInfo, GpuProcess, Sample, Xid
from monitor.hang import (
    SAMPLE_PAIR_S,
    Evidence,
    Finding,
    Found,
    HangSettings,
    HangWatch,
    ProcFs,
    Rule,
)

HOLDER = 4242
START = 777_000  # the holder's /proc start time
NOW_MS = 1_700_000_000_000
KEY = b"gpu_lock:0"
UUID = "GPU-11111111-2222-3333-4444-555555555555"
OTHER_UUID = "GPU-99999999-2222-3333-4444-555555555555"
MIG_UUID = "MIG-11111111-2222-3333-4444-555555555555"


def record(**fields: Any) -> protocol.HolderRecord:
    """A holder record as the monitor reads it back from Redis."""
    doc: dict[str, Any] = {
        "v": 1,
        "host": "node-1",
        "pid": HOLDER,
        "pid_ns": 4026531836,
        "start_time": START,
        "gpu_uuid": None,
        "task": "tts",
        "task_id": "c0ffee",
        "token": "9b1e2f",
        "heartbeat_interval_s": 60,
        "heartbeats": True,
        "progress_ms": None,
        "progress_timeout_s": None,
        **fields,
    }
    parsed = protocol.parse_holder_record(json.dumps(doc).encode())
    assert parsed is not None
    return parsed


class FakeProc:
    """/proc as a table: pid -> parent, and the start times of the pids that exist."""

    def __init__(self, parents: dict[int, int] | None = None, starts: dict[int, int] | None = None) -> None:
        self.parents = {HOLDER: 1, **(parents or {})}
        self.starts = {HOLDER: START, **(starts or {})}

    def parent(self, pid: int) -> int | None:
        return self.parents.get(pid)

    def start_time(self, pid: int) -> int | None:
        return self.starts.get(pid)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def device(pids: tuple[int, ...] | None = (HOLDER,), **kw: Any) -> GpuInfo:
    processes = None if pids is None else tuple(GpuProcess(p, 1 << 30, "python", "svc") for p in pids)
    base: dict[str, Any] = {
        "index": 0,
        "uuid": UUID,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_used_bytes": 1 << 30,
        "memory_total_bytes": 80 << 30,
        "utilization_pct": 80,
        "processes": processes,
        "memory_util_pct": 30,
        "power_w": 400.0,
        "power_limit_w": 700.0,
    }
    base.update(kw)
    return GpuInfo(**base)


def evidence(
    *,
    held_s: float = 60.0,
    alive: bool = True,
    rec: protocol.HolderRecord | None = None,
    visible: bool = True,
    gpu: GpuInfo | None = None,
    now_mono: float | None = None,
) -> Evidence:
    return Evidence(
        now_ms=NOW_MS,
        started_ms=NOW_MS - int(held_s * 1000),
        heartbeat_alive=alive,
        record=record() if rec is None else rec,
        pid_visible=visible,
        gpu=gpu,
        now_mono=now_mono,
    )


def watch(clock: Clock | None = None, proc: FakeProc | None = None, **settings: Any) -> HangWatch:
    return HangWatch(HangSettings(**settings), mono=clock or Clock(), proc=proc or FakeProc())


def findings(found: list[Found]) -> dict[Finding, Found]:
    by = {f.finding: f for f in found}
    assert len(by) == len(found)
    return by


# --- holder_stalled ---------------------------------------------------------------------------------------

S = 1000  # ms


@pytest.mark.parametrize(
    ("own", "config", "mark_ago_s", "held_s", "since_s", "source"),
    [
        # (a) the record declares a timeout: counted from the holding's start until the first mark
        (60, None, None, 59, None, None),
        (60, None, None, 60, 0.0, "record"),
        (60, None, None, 61.5, 1.5, "record"),
        (60, None, 30, 500, None, None),
        (60, None, 90, 500, 30.0, "record"),
        (60, 10, 30, 500, None, None),  # the record's own wins over the config's
        (10, 600, 30, 500, 20.0, "record"),
        # (b) only the config sets it: from the first mark; a task that never marked has not opted in
        (None, 60, None, 10_000, None, None),
        (None, 60, 59, 10_000, None, None),
        (None, 60, 61, 10_000, 1.0, "config"),
        (None, None, 10_000, 10_000, None, None),  # no timeout anywhere
    ],
)
def test_holder_stalled(own, config, mark_ago_s, held_s, since_s, source):
    mark = None if mark_ago_s is None else NOW_MS - mark_ago_s * S
    ev = evidence(held_s=held_s, rec=record(progress_timeout_s=own, progress_ms=mark))
    got = findings(watch(progress_timeout_s=config).judge(KEY, 1, ev)).get(Finding.HOLDER_STALLED)
    if since_s is None:
        assert got is None
        return
    assert got is not None
    assert got.since_s == since_s
    assert got.detail["timeout_from"] == source
    assert got.detail["last_progress_ms"] == mark
    assert got.detail["silent_s"] == (held_s if mark is None else mark_ago_s)
    json.dumps(got.detail)


def test_stalled_is_judged_on_the_redis_clock_alone_and_clears_with_a_new_mark():
    w = watch(Clock())
    stale = evidence(held_s=500, rec=record(progress_timeout_s=60, progress_ms=NOW_MS - 100 * S))
    assert Finding.HOLDER_STALLED in findings(w.judge(KEY, 1, stale))
    # This host's clock is irrelevant: only now_ms against the mark Redis's own TIME wrote.
    w._mono = lambda: -1e9
    assert Finding.HOLDER_STALLED in findings(w.judge(KEY, 1, stale))
    fresh = evidence(held_s=500, rec=record(progress_timeout_s=60, progress_ms=NOW_MS - 1 * S))
    assert Finding.HOLDER_STALLED not in findings(w.judge(KEY, 1, fresh))


def test_a_legacy_holder_without_a_record_has_no_findings_of_its_own():
    w = watch(progress_timeout_s=1)
    ev = replace(evidence(held_s=10_000, gpu=device(pids=(HOLDER, 99))), record=None)
    assert w.judge(KEY, 1, ev) == []


# --- rules: warn or release, after a grace ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "grace_s", "since_s", "release"),
    [
        ("warn", 0, 0, False),
        ("warn", 0, 1e6, False),
        ("release", 0, 0, True),
        ("release", 30, 29.9, False),
        ("release", 30, 30, True),
        ("release", 30, 31, True),
        ("bogus", 0, 100, False),
    ],
)
@pytest.mark.parametrize("finding", list(Finding))
def test_every_finding_warns_or_releases_after_its_own_grace(finding, action, grace_s, since_s, release):
    clock = Clock()
    proc = FakeProc(parents={99: 1}, starts={99: 5})
    w = watch(clock, proc, rules={finding: Rule(action, grace_s)}, progress_timeout_s=None)
    # Each scenario makes exactly its finding true for `since_s` past its threshold.
    scenario = SCENARIOS[finding]
    w.judge(KEY, 1, scenario(clock, 0.0))
    clock.t += {
        Finding.HOLDER_NOT_ON_GPU: 120,
        Finding.GPU_FOREIGN_PROCESS: 30,
        Finding.GPU_IDLE_HELD: 0,
        Finding.HOLDER_STALLED: 0,
        Finding.GPU_XID: 0,
    }[finding] + since_s
    got = findings(w.judge(KEY, 1, scenario(clock, since_s)))
    assert set(got) == {finding}
    assert got[finding].since_s == pytest.approx(since_s, abs=1e-3)
    assert got[finding].release is release
    assert w.settings.rule(finding).action == action


def _stalled(clock: Clock, since_s: float) -> Evidence:
    return evidence(held_s=60 + since_s, rec=record(progress_timeout_s=60), gpu=device())


def _not_on_gpu(clock: Clock, since_s: float) -> Evidence:
    return evidence(gpu=device(pids=()))


def _foreign(clock: Clock, since_s: float) -> Evidence:
    return evidence(gpu=device(pids=(HOLDER, 99)))


def _idle(clock: Clock, since_s: float) -> Evidence:
    # Quiet since 300 s + since_s ago, inside a holding older than that.
    t0 = clock.t - 300 - since_s
    samples = (Sample(t0, 0), Sample(clock.t, 1))
    return evidence(held_s=1e7, gpu=device(utilization_pct=0, util_samples=samples, read_mono=clock.t))


def _xid(clock: Clock, since_s: float) -> Evidence:
    return evidence(held_s=1e7, gpu=device(xids=(Xid(79, 0.0, clock.t - since_s),)))


SCENARIOS = {
    Finding.HOLDER_STALLED: _stalled,
    Finding.HOLDER_NOT_ON_GPU: _not_on_gpu,
    Finding.GPU_FOREIGN_PROCESS: _foreign,
    Finding.GPU_IDLE_HELD: _idle,
    Finding.GPU_XID: _xid,
}


def test_default_settings_warn_on_everything():
    settings = HangSettings()
    assert all(settings.rule(f) == Rule("warn", 0.0) for f in Finding)
    assert (settings.progress_timeout_s, settings.not_on_gpu_grace_s, settings.idle_window_s) == (None, 120, 300)
    assert settings.idle_util_pct == 5
    assert HangSettings(rules={}).rule(Finding.GPU_XID) == Rule()


# --- pids: the holder's own, descendants, other namespaces -------------------------------------------------

# A family: HOLDER -> 5000 -> 5001 (grandchild); 6000 is someone else's (parent init);
# 7000's chain cannot be read (gone, or hidden by hidepid); 8000 descends from a pid that /proc hides.
FAMILY = FakeProc(
    parents={5000: HOLDER, 5001: 5000, 6000: 1, 6001: 6000, 8000: 8001},
    starts={5000: 1, 5001: 1, 6000: 1, 6001: 1, 8000: 1},
)


@pytest.mark.parametrize(
    ("case", "gpu_pids", "ev_kw", "rec_kw", "absent", "foreign"),
    [
        ("holder on its GPU", (HOLDER,), {}, {}, False, ()),
        ("a child is the holder's", (5000,), {}, {}, False, ()),
        ("a grandchild is the holder's", (5001,), {}, {}, False, ()),
        ("a grandchild then its parent (read once)", (5001, 5000), {}, {}, False, ()),
        ("no process at all", (), {}, {}, True, ()),
        ("only a stranger", (6000,), {}, {}, True, (6000,)),
        ("a stranger's child", (HOLDER, 6001), {}, {}, False, (6001,)),
        ("init itself", (HOLDER, 1), {}, {}, False, (1,)),
        ("an unreadable chain is unknown, not absent", (7000,), {}, {}, False, ()),
        ("a chain hidden half way is unknown", (HOLDER, 8000), {}, {}, False, ()),
        ("heartbeat not alive: not judged absent", (), {"alive": False}, {}, False, ()),
        ("a container's pid is not comparable", (6000,), {"visible": False}, {}, False, ()),
        ("no process list from NVML", None, {}, {}, False, ()),
        ("a record without a pid", (6000,), {}, {"pid": None}, False, ()),
        ("the holder's process is gone", (6000,), {}, {"pid": 9999}, False, ()),
        ("its pid is another process now", (6000,), {}, {"start_time": START + 1}, False, ()),
        ("a record without a start time trusts the pid", (6000,), {}, {"start_time": None}, True, (6000,)),
        ("the record names another GPU", (6000,), {}, {"gpu_uuid": OTHER_UUID}, False, ()),
        ("the record names this GPU", (6000,), {}, {"gpu_uuid": UUID}, True, (6000,)),
        ("a MIG holder: other instances' processes are not foreign", (6000,), {}, {"gpu_uuid": MIG_UUID}, True, ()),
    ],
)
def test_pid_findings(case, gpu_pids, ev_kw, rec_kw, absent, foreign):
    clock = Clock()
    w = watch(clock, FAMILY)
    ev = evidence(rec=record(**rec_kw), gpu=device(pids=gpu_pids), **ev_kw)
    assert w.judge(KEY, 1, ev) == []  # nothing before its grace
    clock.t += 200
    got = findings(w.judge(KEY, 1, ev))
    assert (Finding.HOLDER_NOT_ON_GPU in got) is absent, case
    assert (Finding.GPU_FOREIGN_PROCESS in got) is bool(foreign), case
    if absent:
        detail = got[Finding.HOLDER_NOT_ON_GPU].detail
        assert detail == {"pid": HOLDER, "absent_s": 200.0, "gpu_pids": sorted(gpu_pids)}
    if foreign:
        detail = got[Finding.GPU_FOREIGN_PROCESS].detail
        assert [p["pid"] for p in detail["foreign"]] == list(foreign)
        assert detail["present_s"] == 200.0
        assert detail["pid"] == HOLDER


@pytest.mark.parametrize(
    ("finding", "grace_key", "grace", "there", "gone"),
    [
        (Finding.HOLDER_NOT_ON_GPU, "not_on_gpu_grace_s", 120.0, (), (HOLDER,)),
        (Finding.GPU_FOREIGN_PROCESS, "foreign_process_grace_s", 30.0, (HOLDER, 6000), (HOLDER,)),
    ],
)
def test_pid_findings_wait_their_grace_and_a_condition_that_stops_resets_its_clock(
    finding, grace_key, grace, there, gone
):
    clock = Clock()
    w = watch(clock, FAMILY, **{grace_key: grace})
    bad, good = evidence(gpu=device(pids=there)), evidence(gpu=device(pids=gone))
    unknown = evidence(gpu=device(pids=None))  # NVML could not list the processes this pass
    assert w.judge(KEY, 1, bad) == []
    clock.t += grace - 0.5
    assert w.judge(KEY, 1, bad) == []
    clock.t += 0.5
    (found,) = w.judge(KEY, 1, bad)
    assert (found.finding, found.since_s) == (finding, 0.0)
    clock.t += 10
    assert w.judge(KEY, 1, bad)[0].since_s == 10.0
    for interruption in (good, unknown):
        assert w.judge(KEY, 1, interruption) == []
        clock.t += 5
        assert w.judge(KEY, 1, bad) == []  # counted again from here
        clock.t += grace - 0.5
        assert w.judge(KEY, 1, bad) == []
        clock.t += 0.5
        assert w.judge(KEY, 1, bad)[0].since_s == 0.0


def test_pid_state_is_per_holding_and_forget_drops_the_ones_gone():
    clock = Clock()
    w = watch(clock, FAMILY)
    absent = evidence(gpu=device(pids=()))
    w.judge(KEY, 1, absent)
    w.judge(b"gpu_lock:1", 1, absent)
    clock.t += 60
    w.judge(KEY, 2, absent)  # a new holding of the same lock starts its own clock
    clock.t += 60
    assert [f.finding for f in w.judge(KEY, 1, absent)] == [Finding.HOLDER_NOT_ON_GPU]
    assert w.judge(KEY, 2, absent) == []
    w.forget([(KEY, 2)])
    assert w.judge(KEY, 1, absent) == []  # forgotten: its clock starts again
    clock.t += 60
    assert [f.finding for f in w.judge(KEY, 2, absent)] == [Finding.HOLDER_NOT_ON_GPU]
    assert w.judge(b"gpu_lock:1", 1, absent) == []


def test_a_long_parent_chain_is_not_the_holders():
    chain = {9000 + i: 9001 + i for i in range(100)}  # a loop-free chain longer than anyone's
    proc = FakeProc(parents=chain, starts={9000: 1})
    clock = Clock()
    w = watch(clock, proc, foreign_process_grace_s=0)
    (found,) = w.judge(KEY, 1, evidence(gpu=device(pids=(HOLDER, 9000))))
    assert found.finding is Finding.GPU_FOREIGN_PROCESS


def test_a_cycle_in_parent_links_ends():
    proc = FakeProc(parents={9000: 9001, 9001: 9000}, starts={9000: 1})
    w = watch(Clock(), proc, foreign_process_grace_s=0)
    assert [f.finding for f in w.judge(KEY, 1, evidence(gpu=device(pids=(HOLDER, 9000))))] == [
        Finding.GPU_FOREIGN_PROCESS
    ]


# --- gpu_idle_held: idle and spin-hung over a window --------------------------------------------------------


def samples(start: float, values: list[float], step: float = 1.0) -> tuple[Sample, ...]:
    return tuple(Sample(start + i * step, v) for i, v in enumerate(values))


IDLE = {"utilization_pct": 0, "memory_util_pct": 0, "power_w": 70.0}
SPIN = {"utilization_pct": 100, "memory_util_pct": 0, "power_w": 90.0}


@pytest.mark.parametrize(
    ("case", "reading", "util", "mem", "power", "limit", "kind"),
    [
        ("all idle", IDLE, [0, 1, 4], None, None, 700.0, "idle"),
        ("one sample at the threshold", IDLE, [0, 5, 0], None, None, 700.0, None),
        ("spin: busy, no memory traffic, idle power", SPIN, [100, 100, 99], [0, 1, 0], [90, 95, 90], 700.0, "spin"),
        ("spin mixed with idle", SPIN, [0, 100, 0], [0, 0, 0], [70, 90, 70], 700.0, "spin"),
        ("busy with memory traffic", SPIN, [100, 100, 100], [0, 30, 0], [90, 90, 90], 700.0, None),
        ("busy at real power", SPIN, [100, 100, 100], [0, 0, 0], [90, 400, 90], 700.0, None),
        ("spin unprovable without power samples or reading", {**SPIN, "power_w": None}, [100], [0], None, 700.0, None),
        ("spin unprovable without the limit", SPIN, [100], [0], [90], None, None),
        ("spin unprovable with a zero limit", SPIN, [100], [0], [90], 0.0, None),
        ("spin unprovable without memory activity", {**SPIN, "memory_util_pct": None}, [100], None, [90], 700.0, None),
        ("the reading alone, no samples", IDLE, None, None, None, 700.0, "idle"),
        ("a busy reading after idle samples", {**IDLE, "utilization_pct": 60}, [0, 0], None, None, 700.0, None),
        ("garbage samples are no reading", IDLE, [0, 4000, -5], None, None, 700.0, "idle"),
    ],
)
def test_idle_and_spin_signatures(case, reading, util, mem, power, limit, kind):
    """Samples one a second over the last 3 s of a 400 s quiet period whose start the first
    pass saw; a 300 s window."""
    clock = Clock()
    w = watch(clock)
    start = evidence(held_s=10_000, gpu=device(**IDLE, read_mono=clock.t, util_samples=()))
    assert w.judge(KEY, 1, start) == []
    clock.t += 400
    first = clock.t - 3
    gpu = device(
        **reading,
        power_limit_w=limit,
        read_mono=clock.t,
        util_samples=None if util is None else samples(first, util),
        memory_util_samples=None if mem is None else samples(first, mem),
        power_samples=None if power is None else samples(first, power),
    )
    got = findings(w.judge(KEY, 1, evidence(held_s=10_000, gpu=gpu)))
    if kind is None:
        assert Finding.GPU_IDLE_HELD not in got, case
        return
    found = got[Finding.GPU_IDLE_HELD]
    assert found.detail["kind"] == kind, case
    assert found.since_s == 100.0
    assert found.detail["quiet_s"] == 400.0
    assert found.detail["signal"] == "reading"
    json.dumps(found.detail)


def test_one_busy_sample_between_passes_resets_the_window():
    """The driver's buffer is judged sample by sample: a burst that no pass saw still counts."""
    clock = Clock()
    w = watch(clock, idle_window_s=100)
    w.judge(KEY, 1, evidence(held_s=10_000, gpu=device(**IDLE, read_mono=clock.t)))
    clock.t += 150
    burst = samples(clock.t - 150, [0] * 80 + [90] + [0] * 69)  # busy 70 s ago, for one sample
    gpu = device(**IDLE, read_mono=clock.t, util_samples=burst)
    assert findings(w.judge(KEY, 1, evidence(held_s=10_000, gpu=gpu))) == {}
    clock.t += 30
    gpu = device(**IDLE, read_mono=clock.t, util_samples=())
    (found,) = w.judge(KEY, 1, evidence(held_s=10_000, gpu=gpu))
    assert found.detail["quiet_s"] == 100.0  # from that sample
    assert found.since_s == 0.0


def test_idleness_before_the_holding_began_does_not_count():
    clock = Clock()
    w = watch(clock, idle_window_s=100)
    w.judge(KEY, 1, evidence(gpu=device(**IDLE, read_mono=clock.t)))
    clock.t += 500
    gpu = device(**IDLE, read_mono=clock.t)
    assert w.judge(KEY, 1, evidence(held_s=99, gpu=gpu)) == []
    (found,) = w.judge(KEY, 1, evidence(held_s=130, gpu=gpu))
    assert (found.since_s, found.detail["quiet_s"]) == (30.0, 130.0)
    # The holding's start is put on this host's clock from now_ms and the now_mono read with it.
    (found,) = w.judge(KEY, 1, evidence(held_s=130, gpu=gpu, now_mono=clock.t + 10))
    assert found.detail["quiet_s"] == 120.0


def test_a_pass_where_nvml_could_not_say_resets_the_idle_clock():
    clock = Clock()
    w = watch(clock, idle_window_s=100)
    ev = lambda **kw: evidence(held_s=10_000, gpu=device(read_mono=clock.t, **kw))  # noqa: E731
    w.judge(KEY, 1, ev(**IDLE))
    clock.t += 60
    assert w.judge(KEY, 1, ev(utilization_pct=None, util_samples=None)) == []
    clock.t += 60
    assert w.judge(KEY, 1, ev(**IDLE)) == []  # 120 s since the first, 60 since NVML could not say
    clock.t += 40
    assert [f.since_s for f in w.judge(KEY, 1, ev(**IDLE))] == [0.0]


def test_the_idle_timeline_is_per_gpu_and_judging_it_twice_changes_nothing():
    clock = Clock()
    w = watch(clock, idle_window_s=100)
    idle_a = device(**IDLE, read_mono=clock.t, util_samples=samples(clock.t - 10, [0] * 10))
    busy_b = device(index=1, uuid=OTHER_UUID, read_mono=clock.t, utilization_pct=90)
    for _ in range(2):  # two locks guarding one GPU, or the same snapshot judged again
        w.judge(KEY, 1, evidence(held_s=10_000, gpu=idle_a))
        w.judge(b"gpu_lock:1", 1, evidence(held_s=10_000, gpu=busy_b))
    clock.t += 95
    idle_a = device(**IDLE, read_mono=clock.t)
    for key in (KEY, b"gpu_lock:x"):
        (found,) = w.judge(key, 1, evidence(held_s=10_000, gpu=idle_a))
        assert found.detail["quiet_s"] == 105.0
    busy_b = device(index=1, uuid=OTHER_UUID, read_mono=clock.t, **IDLE)
    assert w.judge(b"gpu_lock:1", 1, evidence(held_s=10_000, gpu=busy_b)) == []
    # A GPU whose UUID NVML cannot tell is followed by its index.
    nameless = device(uuid=None, index=3, read_mono=clock.t, **IDLE)
    assert w.judge(b"gpu_lock:3", 1, evidence(held_s=10_000, gpu=nameless)) == []
    assert "index:3" in w._gpus


def test_samples_arriving_out_of_order_keep_the_latest_and_the_last_busy():
    clock = Clock()
    w = watch(clock, idle_window_s=10)
    late = device(**IDLE, read_mono=clock.t, util_samples=(Sample(clock.t + 20, 0), Sample(clock.t + 5, 50)))
    clock.t += 20
    (found,) = w.judge(KEY, 1, evidence(held_s=10_000, gpu=late))
    assert found.detail["quiet_s"] == 15.0  # from the busy sample at +5 to the newest at +20


@pytest.mark.parametrize(
    ("offset", "paired"),
    [(0.0, True), (SAMPLE_PAIR_S, True), (SAMPLE_PAIR_S + 0.1, False), (-SAMPLE_PAIR_S - 0.1, False)],
)
def test_memory_and_power_samples_are_read_with_a_utilisation_sample_only_when_close(offset, paired):
    clock = Clock()
    w = watch(clock, idle_window_s=0)
    t = clock.t - 100  # far from the pass's own reading
    gpu = device(
        utilization_pct=None,
        memory_util_pct=None,
        power_w=None,
        read_mono=clock.t,
        util_samples=(Sample(t, 100),),
        memory_util_samples=(Sample(t + offset, 0), Sample(t + 50, 0)),
        power_samples=(Sample(t - 50, 90), Sample(t + offset, 90)),
    )
    got = w.judge(KEY, 1, evidence(held_s=10_000, gpu=gpu))
    assert bool(got) is paired
    if paired:
        assert (got[0].detail["kind"], got[0].detail["signal"]) == ("spin", "samples")


def test_a_sample_beside_the_pass_takes_the_pass_readings_for_what_the_driver_did_not_sample():
    clock = Clock()
    w = watch(clock, idle_window_s=0)
    gpu = device(**SPIN, read_mono=clock.t, util_samples=(Sample(clock.t - 1, 100),))
    gpu = replace(gpu, utilization_pct=None)
    (found,) = w.judge(KEY, 1, evidence(held_s=10_000, gpu=gpu))
    assert (found.detail["kind"], found.detail["power_w"], found.detail["memory_util_pct"]) == ("spin", 90.0, 0)


def test_no_gpu_no_gpu_findings():
    w = watch()
    assert w.judge(KEY, 1, evidence(gpu=None)) == []


# --- gpu_xid ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xids", "ignore", "codes", "since_s"),
    [
        (None, (), None, None),  # not watched / not available
        ((), (), None, None),
        (((79, 50),), (), [79], 50.0),
        (((79, 150),), (), None, None),  # before the holding began (100 s ago)
        (((13, 150), (79, 50), (79, 10)), (), [79], 50.0),
        (((63, 50), (79, 10)), (63,), [79], 10.0),
        (((63, 50),), (63,), None, None),
        (((48, 99.5),), (), [48], 99.5),
    ],
)
def test_xid_since_the_holding_began(xids, ignore, codes, since_s):
    clock = Clock()
    w = watch(clock, xid_ignore=frozenset(ignore))
    kept = None if xids is None else tuple(Xid(code, 1.7e9, clock.t - ago) for code, ago in xids)
    got = findings(w.judge(KEY, 1, evidence(held_s=100, gpu=device(xids=kept))))
    if codes is None:
        assert Finding.GPU_XID not in got
        return
    found = got[Finding.GPU_XID]
    assert found.detail["codes"] == codes
    assert found.since_s == since_s
    assert found.detail["count"] == len([x for x in xids if x[1] <= 100 and x[0] not in ignore])
    json.dumps(found.detail)


def test_xid_timing_uses_the_monotonic_moment_read_with_now_ms():
    clock = Clock()
    w = watch(clock)
    gpu = device(xids=(Xid(79, 1.7e9, clock.t - 95),))
    assert Finding.GPU_XID in findings(w.judge(KEY, 1, evidence(held_s=100, gpu=gpu)))
    # now_ms was read 10 s before this judge: the Xid came 105 s before it, before the holding.
    assert Finding.GPU_XID not in findings(w.judge(KEY, 1, evidence(held_s=100, gpu=gpu, now_mono=clock.t + 10)))


# --- /proc, for real -----------------------------------------------------------------------------------------


@pytest.fixture
def family() -> Iterator[tuple[int, int]]:
    """A real child of this process, and its own child (our grandchild): (child, grandchild)."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    try:
        yield proc.pid, grandchild
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


def test_procfs_reads_real_parents_and_start_times(family):
    child, grandchild = family
    proc = ProcFs()
    assert proc.parent(child) == os.getpid()
    assert proc.parent(grandchild) == child
    assert proc.start_time(child) == protocol.process_start_time(child)
    assert proc.start_time(os.getpid()) == protocol.process_start_time()
    assert proc.parent(2**22 + 7) is None  # no such pid
    assert proc.start_time(2**22 + 7) is None


def test_procfs_parses_a_command_name_with_spaces_and_parentheses_and_refuses_a_short_stat(tmp_path):
    fields = " ".join(str(i) for i in range(3, 53))
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "stat").write_text(f"10 (a) b (c)) S {fields}\n")
    (tmp_path / "11").mkdir()
    (tmp_path / "11" / "stat").write_text("11 (x) S 1 2\n")
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "stat").write_text("garbage without a parenthesis")
    proc = ProcFs(tmp_path)
    # after "S": field 4 (ppid) is the first of ours, 3; field 22 is 3 + 18 = 21
    assert (proc.parent(10), proc.start_time(10)) == (3, 21)
    assert (proc.parent(11), proc.start_time(11)) == (None, None)
    assert proc.parent(12) is None


def test_a_real_holders_child_and_grandchild_on_its_gpu_are_its_own_and_its_parent_is_foreign(family):
    """The holder is this test process; its real child and grandchild hold its GPU: no finding.
    Its parent (the process that started pytest) is on the GPU too: not the holder's, two holders."""
    child, grandchild = family
    me = protocol.this_process()
    rec = record(pid=me["pid"], start_time=me["start_time"], pid_ns=me["pid_ns"])
    clock = Clock()
    w = HangWatch(HangSettings(not_on_gpu_grace_s=0, foreign_process_grace_s=0), mono=clock)
    own = evidence(rec=rec, gpu=device(pids=(child, grandchild)))
    assert w.judge(KEY, 1, own) == []
    shared = evidence(rec=rec, gpu=device(pids=(grandchild, os.getppid())))
    (found,) = w.judge(KEY, 1, shared)
    assert found.finding is Finding.GPU_FOREIGN_PROCESS
    assert [p["pid"] for p in found.detail["foreign"]] == [os.getppid()]
    assert found.detail["holder_pids"] == [grandchild]
    # The holder's processes left the GPU; only a stranger is there.
    gone = evidence(rec=rec, gpu=device(pids=(os.getppid(),)))
    assert {f.finding for f in w.judge(KEY, 1, gone)} == {Finding.HOLDER_NOT_ON_GPU, Finding.GPU_FOREIGN_PROCESS}


def test_a_real_process_that_left_the_holders_family_is_foreign(tmp_path):
    """A double fork: the grandchild's parent exits, it is re-parented (init or a subreaper) and
    is no longer the holder's, as the docstring says it cannot be."""
    out = tmp_path / "pid"
    subprocess.run(["/bin/sh", "-c", f"(sleep 60 & echo $! > {out}) &"], check=True)
    orphan = int(_wait_text(out))
    try:
        me = protocol.this_process()
        rec = record(pid=me["pid"], start_time=me["start_time"])
        w = HangWatch(HangSettings(foreign_process_grace_s=0), mono=Clock())
        (found,) = w.judge(KEY, 1, evidence(rec=rec, gpu=device(pids=(me["pid"], orphan))))
        assert found.finding is Finding.GPU_FOREIGN_PROCESS
    finally:
        os.kill(orphan, 9)


def _wait_text(path: Path) -> str:
    from helpers import wait_for

    return str(wait_for(lambda: path.exists() and path.read_text().strip()))


def test_the_module_reads_no_redis_and_no_nvml():
    source = Path(sys.modules["monitor.hang"].__file__ or "").read_text()
    assert "import redis" not in source
    assert "pynvml" not in source


# --- what cannot be judged, and samples taken in for GPUs no lock was judged on ------------------------------

NO_GPU = "the lock guards no GPU of this host"
NO_RECORD = "no holder record"


@pytest.mark.parametrize(
    ("case", "ev_kw", "config_timeout", "expect"),
    [
        ("everything judged", {"rec": record(progress_timeout_s=60), "gpu": device(xids=())}, None, {}),
        (
            "a legacy holder on a host without NVML",
            {"rec": None, "gpu": None},
            None,
            {
                Finding.HOLDER_STALLED: NO_RECORD,
                Finding.HOLDER_NOT_ON_GPU: NO_RECORD,
                Finding.GPU_FOREIGN_PROCESS: NO_RECORD,
                Finding.GPU_IDLE_HELD: NO_GPU,
                Finding.GPU_XID: NO_GPU,
            },
        ),
        (
            "no timeout anywhere; xid not available",
            {"gpu": device()},
            None,
            {
                Finding.HOLDER_STALLED: "no progress_timeout (holder record or config)",
                Finding.GPU_XID: "xid: not available",
            },
        ),
        (
            "the config's timeout before a first mark",
            {"gpu": device(xids=())},
            60,
            {Finding.HOLDER_STALLED: "no progress mark yet (the config's timeout applies from the first)"},
        ),
        ("the config's timeout after a mark", {"rec": record(progress_ms=NOW_MS), "gpu": device(xids=())}, 60, {}),
        (
            "a container's pid; no utilisation from NVML",
            {"visible": False, "gpu": device(xids=(), utilization_pct=None)},
            60,
            {
                Finding.HOLDER_STALLED: "no progress mark yet (the config's timeout applies from the first)",
                Finding.HOLDER_NOT_ON_GPU: "the holder's pid is not in this monitor's pid namespace on this host",
                Finding.GPU_FOREIGN_PROCESS: "the holder's pid is not in this monitor's pid namespace on this host",
                Finding.GPU_IDLE_HELD: "NVML gives no utilisation for this GPU",
            },
        ),
        (
            "a dead heartbeat; a MIG holder",
            {"alive": False, "rec": record(gpu_uuid=MIG_UUID, progress_timeout_s=1), "gpu": device(xids=())},
            None,
            {
                Finding.HOLDER_NOT_ON_GPU: "the heartbeat is not alive",
                Finding.GPU_FOREIGN_PROCESS: "a MIG holder: the GPU lists every instance's processes",
            },
        ),
        (
            "no pid in the record",
            {"rec": record(pid=None, progress_timeout_s=1), "gpu": device(xids=())},
            None,
            dict.fromkeys((Finding.HOLDER_NOT_ON_GPU, Finding.GPU_FOREIGN_PROCESS), "the holder record has no pid"),
        ),
        (
            "no process list",
            {"rec": record(progress_timeout_s=1), "gpu": device(pids=None, xids=())},
            None,
            dict.fromkeys(
                (Finding.HOLDER_NOT_ON_GPU, Finding.GPU_FOREIGN_PROCESS), "NVML lists no processes for this GPU"
            ),
        ),
        (
            "another GPU named",
            {"rec": record(gpu_uuid=OTHER_UUID, progress_timeout_s=1), "gpu": device(xids=())},
            None,
            dict.fromkeys(
                (Finding.HOLDER_NOT_ON_GPU, Finding.GPU_FOREIGN_PROCESS),
                f"the holder record names another GPU ({OTHER_UUID})",
            ),
        ),
        (
            "the holder's process gone",
            {"rec": record(pid=9999, progress_timeout_s=1), "gpu": device(xids=())},
            None,
            dict.fromkeys(
                (Finding.HOLDER_NOT_ON_GPU, Finding.GPU_FOREIGN_PROCESS),
                "the holder's process is not in /proc (gone, hidden, or its pid reused)",
            ),
        ),
    ],
)
def test_unjudged_says_why_each_finding_cannot_be_judged(case, ev_kw, config_timeout, expect):
    w = watch(progress_timeout_s=config_timeout)
    ev = evidence(**ev_kw)
    if "rec" in ev_kw and ev_kw["rec"] is None:
        ev = replace(ev, record=None)
    assert w.unjudged(ev) == expect, case


def test_observe_takes_in_samples_of_gpus_no_lock_was_judged_on():
    """A busy burst in a snapshot that no judge took in still resets the window, through observe."""
    clock = Clock()
    w = watch(clock, idle_window_s=100)
    w.judge(KEY, 1, evidence(held_s=10_000, gpu=device(**IDLE, read_mono=clock.t)))
    clock.t += 60
    w.observe([device(**IDLE, read_mono=clock.t, util_samples=(Sample(clock.t - 1, 80),))])
    clock.t += 60
    assert w.judge(KEY, 1, evidence(held_s=10_000, gpu=device(**IDLE, read_mono=clock.t))) == []
    clock.t += 40
    (found,) = w.judge(KEY, 1, evidence(held_s=10_000, gpu=device(**IDLE, read_mono=clock.t)))
    assert found.detail["quiet_s"] == 101.0
    # Without it, that snapshot's burst would have gone unseen:
    blind = watch(clock := Clock(), idle_window_s=100)
    blind.judge(KEY, 1, evidence(held_s=10_000, gpu=device(**IDLE, read_mono=clock.t)))
    clock.t += 120
    assert blind.judge(KEY, 1, evidence(held_s=10_000, gpu=device(**IDLE, read_mono=clock.t)))


# --- from a fake driver to findings: every call an old driver lacks leaves only its finding out ------------


@pytest.mark.parametrize(
    ("case", "device_kw", "fake_kw", "found", "unjudged"),
    [
        ("a driver with everything", {}, {}, {"idle"}, set()),
        ("no process list", {"unsupported": {"processes"}}, {}, {"idle"}, {"absent", "foreign"}),
        ("the old process call only", {}, {"old_driver": True}, {"idle"}, set()),
        (
            "no utilisation reading nor samples",
            {"unsupported": {"util"}},
            {"absent": frozenset({"nvmlDeviceGetSamples"})},
            set(),
            {"idle"},
        ),
        ("no utilisation reading but samples", {"unsupported": {"util"}, "samples": "idle"}, {}, {"idle"}, set()),
        ("no samples: the readings alone", {}, {"no_symbol": frozenset({"nvmlDeviceGetSamples"})}, {"idle"}, set()),
        ("a spin, with power", {"util": 100, "memory_util": 0}, {}, {"idle"}, set()),
        (
            "a spin cannot be told without power",
            {"util": 100, "memory_util": 0},
            {"absent": frozenset({"nvmlDeviceGetPowerUsage"})},
            set(),
            set(),
        ),
        (
            "nor without the power limit",
            {"util": 100, "memory_util": 0, "unsupported": {"nvmlDeviceGetEnforcedPowerLimit"}},
            {},
            set(),
            set(),
        ),
        ("no Xid events on this GPU", {"unsupported": {"events"}}, {}, {"idle"}, {"xid"}),
        ("no event sets at all", {}, {"no_symbol": frozenset({"nvmlEventSetCreate"})}, {"idle"}, {"xid"}),
    ],
)
def test_each_nvml_call_missing_leaves_out_only_its_own_finding(case, device_kw, fake_kw, found, unjudged):
    from fake_pynvml import GPU_UTILIZATION_SAMPLES, Device, FakeNvml

    from monitor.gpu import Nvml

    names = {
        "idle": Finding.GPU_IDLE_HELD,
        "absent": Finding.HOLDER_NOT_ON_GPU,
        "foreign": Finding.GPU_FOREIGN_PROCESS,
        "xid": Finding.GPU_XID,
    }
    holder_absent = "processes" not in device_kw.get("unsupported", set())
    kw = {"util": 0, "memory_util": 0, "power_mw": 90_000, "power_limit_mw": 700_000, **device_kw}
    if kw.get("samples") == "idle":
        now_us = int(__import__("time").time() * 1e6)
        kw["samples"] = {GPU_UTILIZATION_SAMPLES: [(now_us - 1_000_000, 0), (now_us, 1)]}
    fake = FakeNvml([Device(UUID, processes=[(6000, 1 << 30)] if holder_absent else [], **kw)], **fake_kw)
    nvml = Nvml("auto", load=lambda: fake.module, xid_events=True, xid_wait_ms=20)
    try:
        gpu = nvml.snapshot()[0]
        proc = FakeProc(parents={6000: 1}, starts={6000: 1})
        w = HangWatch(
            HangSettings(idle_window_s=0, not_on_gpu_grace_s=0, foreign_process_grace_s=0, progress_timeout_s=60),
            proc=proc,
        )
        ev = evidence(gpu=gpu, rec=record(progress_ms=NOW_MS))
        got = {f.finding for f in w.judge(KEY, 1, ev)}
        # The holder is not on its GPU, a stranger is: seen wherever NVML lists processes.
        pid_findings = {"absent", "foreign"} if holder_absent else set()
        assert got == {names[n] for n in found | pid_findings}, case
        assert set(w.unjudged(ev)) == {names[n] for n in unjudged}, case
    finally:
        nvml.shutdown()
