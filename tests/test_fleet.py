"""The fleet's real workers (DESIGN.md section 2) against the monitor: nobody alive may be released.

The workers here speak the ORIGINAL protocol (tests/fleet_worker.py), not our reference client:
values repeat (task names), EX values differ between workers, some heartbeat and some do not, and a
release deletes the lock key only, so the previous holder's heartbeat outlives its holding.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fleet_worker import LegacyGpuLock
from helpers import build, config_file, events, make_settings, read_jsonl, stop_daemon, wait_for

FLEET_WORKER = Path(__file__).with_name("fleet_worker.py")

# --- contention: real worker processes and a real daemon ---------------------------------------------

RUN_S = 60.0  # how long the workers keep starting tasks
# The fleet's EX values 600 / 1800 / 3600, scaled down; the monitor is told the shortest.
FLEET_EX_S = (20, 60, 120)
LOCK_TIMEOUT_S = min(FLEET_EX_S)
HB_INTERVAL_S = 0.5
# Tasks hold the GPU 0.2 to 3 s, mostly briefly; every tier is above the longest.
DURATIONS = "0.2,0.2,0.3,0.3,0.4,0.5,0.2,0.3,1.5,3.0"
TIERS = {"warning": 5, "soft_timeout": 8, "hard_timeout": 12}
# (gpu, task name, EX or None for a worker that cannot read its config, heartbeat interval or 0)
WORKERS = [
    (0, "tts_synthesize", 20, HB_INTERVAL_S),
    (0, "tts_synthesize", 60, 0),
    (0, "asr_transcribe", 120, HB_INTERVAL_S),
    (1, "tts_synthesize", 120, 0),
    (1, "diarize", None, HB_INTERVAL_S),
    (1, "diarize", 20, 0),
]
WORKER_LOCKS = {f"gpu_lock:{gpu}" for gpu, *_ in WORKERS}
# What a monitor must never do to a holder that is alive and within every limit.
ACTING = ("lock_warning", "long_task_protected", "lock_released", "release_skipped", "release_failed")


def fleet_config(tmp: Path, ex: int | None) -> Path:
    """A worker's own config.yml; a path that does not exist for one that cannot read it (EX 600)."""
    path = tmp / f"fleet-{ex}.yml"
    if ex is not None:
        path.write_text(f"gpu_lock:\n  lock_timeout: {ex}\n  poll_interval: 0.05\n")
    return path


def fleet_worker(url: str, tmp: Path, name: str, gpu: int, task: str, *extra: str) -> subprocess.Popen[bytes]:
    """One worker process; its holdings go to `<tmp>/<name>.jsonl`."""
    args = ["--redis", url, "--gpu", str(gpu), "--task", task, "--record", str(tmp / f"{name}.jsonl"), "--name", name]
    return subprocess.Popen([sys.executable, str(FLEET_WORKER), *args, *extra])


def start_daemon_logged(config: Path, log: Path) -> subprocess.Popen[str]:
    """The daemon with its output in a file: a minute of logs would fill a pipe and stall it."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT, text=True
        )


def back_to_back_same_value(holdings: list[dict[str, Any]]) -> int:
    """Consecutive holdings of one GPU that carried the same lock value."""
    count = 0
    for _, group in itertools.groupby(sorted(holdings, key=lambda h: (h["gpu"], h["start"])), key=lambda h: h["gpu"]):
        count += sum(a["value"] == b["value"] for a, b in itertools.pairwise(group))
    return count


def canary_released(client: redis.Redis, url: str, tmp: Path, audit: Path) -> None:
    """A heartbeating fleet worker killed mid-task: proves the daemon still watched and acted."""
    config = fleet_config(tmp, LOCK_TIMEOUT_S)
    extra = ["--config", str(config), "--heartbeat-s", str(HB_INTERVAL_S), "--durations", "60"]
    proc = fleet_worker(url, tmp, "canary", 9, "canary", *extra)
    try:
        first = wait_for(lambda: client.get(b"gpu_lock:9:heartbeat"))
        wait_for(lambda: client.get(b"gpu_lock:9:heartbeat") not in (None, first))  # it beats
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: [e for e in events(audit, "lock_released") if e["lock_key"] == "gpu_lock:9"], timeout_s=15)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_fleet_contention_releases_nobody_alive(redis_server, r, tmp_path):
    audit = tmp_path / "audit.jsonl"
    monitor = {
        "monitor_interval": 0.2,
        "timeout_levels": TIERS,
        "heartbeat": {"interval": HB_INTERVAL_S, "timeout": 1.5},
        "cleanup": {"max_retry": 2, "retry_delay": 0.1},
    }
    lock = {"lock_timeout": LOCK_TIMEOUT_S}
    config = config_file(tmp_path, redis_server.url, gpu_lock=lock, gpu_lock_monitor=monitor)
    daemon = start_daemon_logged(config, tmp_path / "daemon.log")
    workers: list[subprocess.Popen[bytes]] = []
    began = time.monotonic()
    try:
        wait_for(lambda: events(audit, "monitor_started") or daemon.poll() is not None)
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
        for n, (gpu, task, ex, hb) in enumerate(WORKERS):
            extra = ["--config", str(fleet_config(tmp_path, ex)), "--heartbeat-s", str(hb), "--seed", str(n)]
            extra += ["--tasks", "100000", "--run-s", str(RUN_S), "--durations", DURATIONS, "--max-wait-s", "60"]
            workers.append(fleet_worker(redis_server.url, tmp_path, f"w{n}", gpu, task, *extra))
        codes = [w.wait(timeout=RUN_S + 90) for w in workers]
        ran_s = time.monotonic() - began
        assert daemon.poll() is None, "the daemon died under load"
        canary_released(r, redis_server.url, tmp_path, audit)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        code, _ = stop_daemon(daemon)
    out = (tmp_path / "daemon.log").read_text()
    records = [line for n in range(len(WORKERS)) for line in read_jsonl(tmp_path / f"w{n}.jsonl")]
    holdings = [h for h in records if h["event"] == "holding"]
    overlaps = [h for h in holdings if h["overlap"]]
    lost = [h for h in holdings if not h["still_held"]]
    gave_up = [h for h in records if h["event"] == "gave_up"]
    acted = [e for e in events(audit) if e["event"] in ACTING and e.get("lock_key") in WORKER_LOCKS]
    released = [e for e in acted if e["event"] == "lock_released"]
    repeats = back_to_back_same_value(holdings)
    print(
        f"\nfleet contention, {ran_s:.1f} s: {len(holdings)} holdings "
        f"({repeats} back-to-back with the same value), {len(released)} released by the monitor, "
        f"{len(overlaps)} holdings overlapped, {len(lost)} ended without their value, {len(gave_up)} gave up; "
        f"monitor acted {len(acted)} times"
    )
    for line in brief(acted[:20]):
        print("  " + line)
    assert codes == [0] * len(WORKERS)
    assert len(holdings) > 100, len(holdings)
    assert repeats >= 5, repeats
    assert released == [], brief(released[:10])
    assert overlaps == [], overlaps[:5]
    assert acted == [], brief(acted[:10])  # a warning or a skipped release of a live holder is the same bug
    assert gave_up == []
    assert [r.get(f"gpu_inuse:{gpu}") for gpu in (0, 1)] == [b"0", b"0"]
    assert code == 0, out
    assert "Traceback" not in out


# --- the same facts, one pass at a time --------------------------------------------------------------


def brief(audit_events: list[dict[str, Any]]) -> list[str]:
    """Audit events as one short line each, for failure messages."""
    return [
        f"{e['event']} {e.get('holder')} reason={e.get('reason')} "
        f"heartbeat={e.get('heartbeat')} held_s={e.get('held_s')}"
        for e in audit_events
    ]


def completed(report: Any) -> None:
    """The pass ran to its end: a holding absent from it began after it started."""
    assert report is not None
    assert getattr(report, "error", None) is None, report.error


@pytest.mark.parametrize("successor", ["tts_synthesize", "asr_transcribe"], ids=["same-task", "other-task"])
@pytest.mark.parametrize("pass_while_leftover", [True, False], ids=["pass-sees-leftover", "no-pass-before-expiry"])
def test_previous_holders_heartbeat_is_not_the_successors(redis_server, r, tmp_path, successor, pass_while_leftover):
    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={
            "monitor_interval": 0.2,
            "timeout_levels": {"warning": 0.1, "soft_timeout": 30, "hard_timeout": 60},  # warn: an audit line
            "heartbeat": {"interval": 1.0, "timeout": 3.0},
            "cleanup": {"max_retry": 2, "retry_delay": 0.05},
        },
    )
    audit = tmp_path / "audit.jsonl"
    monitor = build(settings)
    lock_timeout = round(settings.lock_timeout_s)
    a = LegacyGpuLock(r, 0, "tts_synthesize", lock_timeout=lock_timeout, heartbeat_interval=1.0)
    assert a.try_acquire()
    completed(monitor.run_pass())  # the monitor sees A and its heartbeat
    assert a.release()
    assert r.exists(b"gpu_lock:0:heartbeat")  # A's heartbeat outlives its holding
    b = LegacyGpuLock(r, 0, successor, lock_timeout=lock_timeout)  # a legacy worker: no heartbeat
    before_b = time.monotonic()
    assert b.try_acquire()
    mark = len(events(audit))
    if pass_while_leftover:
        completed(monitor.run_pass())
    wait_for(lambda: not r.exists(b"gpu_lock:0:heartbeat"), timeout_s=5)  # A's leftover expires
    completed(monitor.run_pass())
    held_at_most = time.monotonic() - before_b
    after = [e for e in events(audit)[mark:] if e.get("lock_key") == "gpu_lock:0"]
    assert r.get(b"gpu_lock:0") == b.value.encode(), f"B released: {brief(after)}"
    assert [e for e in after if e["event"] == "lock_released"] == []
    assert after, "B's holding is over the warning tier: it must be audited"
    assert {e["heartbeat"] for e in after} == {"none"}, brief(after)
    assert max(e["held_s"] for e in after) <= held_at_most + 0.05, (held_at_most, brief(after))


@pytest.mark.parametrize("ex", [20, 60, 5])
def test_lock_taken_after_a_complete_pass_is_no_older_than_that_pass(redis_server, r, tmp_path, ex):
    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock={"lock_timeout": 20},  # the shortest EX the fleet is said to use
        gpu_lock_monitor={
            "monitor_interval": 0.2,
            "timeout_levels": {"warning": 10, "soft_timeout": 12, "hard_timeout": 14},
            "heartbeat": {"interval": 1.0, "timeout": 3.0},
            "cleanup": {"max_retry": 2, "retry_delay": 0.05},
        },
    )
    audit = tmp_path / "audit.jsonl"
    monitor = build(settings)
    empty_pass_began = time.monotonic()
    completed(monitor.run_pass())  # no lock present
    worker = LegacyGpuLock(r, 0, "tts_synthesize", lock_timeout=ex)
    assert worker.try_acquire()
    for _ in range(3):
        completed(monitor.run_pass())
    at_most = time.monotonic() - empty_pass_began
    lock_events = [e for e in events(audit) if e.get("lock_key") == "gpu_lock:0"]
    assert r.get(b"gpu_lock:0") == worker.value.encode(), f"released: {brief(lock_events)}"
    assert [e for e in lock_events if e["event"] in ACTING] == []
    assert all((e.get("held_s") or 0) <= at_most + 0.05 for e in lock_events), (at_most, brief(lock_events))
    mismatches = [e for e in lock_events if e["event"] == "lock_timeout_mismatch"]
    if ex < 20:  # a worker misconfigured below the shortest EX: audited, once
        assert len(mismatches) == 1, brief(lock_events)
    elif ex == 20:
        assert mismatches == []
