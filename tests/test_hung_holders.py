"""Hung holders end to end (README "Hung holders"): real worker processes of the reference client
write their holder record and progress marks to a real Redis; the monitor watches their processes,
judges the findings (NVML faked: CI has no GPU) and audits, alerts, releases by its `hang:` rules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_pynvml import Device, FakeNvml
from helpers import build, events, make_settings, wait_for

from monitor import daemon, protocol
from monitor.alerts import alert_for
from monitor.events import Event
from monitor.evidence import Holders
from monitor.gpu import Nvml
from monitor.gpuwatch import GpuWatch
from monitor.hang import HangWatch
from monitor.jobmap import JobMap
from monitor.pidwatch import PidWatch
from monitor.service import Monitor

KEY = b"gpu_lock:0"
HB = protocol.heartbeat_key(KEY)
HOLDER = protocol.holder_key(KEY)

# A worker of the reference client: takes gpu_lock:0, says so, then marks progress `marks` times
# every `every` seconds and waits (its heartbeat thread beating every 30 s) until killed.
WORKER = textwrap.dedent(
    """
    import sys, time, redis
    from monitor.worker.client import GpuLock
    url, marks, every, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    held = GpuLock(redis.Redis.from_url(url), "gpu_lock:0", task_name="tts", heartbeat_interval_s=30,
                   timeout_s=600, task_id="job-42", progress_timeout_s=None if timeout == "-" else float(timeout))
    held.acquire()
    print("held", flush=True)
    for _ in range(marks):
        time.sleep(every)
        held.progress()
    print("marked", flush=True)
    time.sleep(600)
    """
)


class Worker:
    def __init__(self, url: str, marks: int = 0, every_s: float = 0.05, progress_timeout_s: float | None = None):
        timeout = "-" if progress_timeout_s is None else str(progress_timeout_s)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(marks), str(every_s), timeout],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "held\n"

    def marked(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "marked\n"

    def kill(self) -> float:
        os.kill(self.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        self.proc.wait()
        return killed

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture
def workers(redis_server) -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for w in made:
        w.close()


_PID_WATCHES: list[PidWatch] = []


@pytest.fixture(autouse=True)
def stop_pid_watches() -> Iterator[None]:
    yield
    while _PID_WATCHES:
        _PID_WATCHES.pop().stop()


def monitor_with(
    settings: Any, *, devices: list[Device] | None = None, pids: bool = False, jobs: Path | None = None, **kw: Any
) -> Monitor:
    gpus = None
    if devices is not None:
        fake = FakeNvml(devices)
        gpus = GpuWatch(Nvml("auto", load=lambda: fake.module), {}, settings.nvml_busy_grace_s)
    holders = Holders(HangWatch(settings.hang), gpus=gpus, jobs=None if jobs is None else JobMap(jobs))
    monitor = build(settings, gpus=gpus, holders=holders, **kw)
    if pids:
        holders.pids = PidWatch(monitor.holder_exited)
        holders.pids.start()
        _PID_WATCHES.append(holders.pids)
    return monitor


def settings_with(redis_server: Any, tmp_path: Path, **hang: Any) -> Any:
    return make_settings(redis_server.url, tmp_path, hang=hang)


def released(settings: Any) -> list[dict[str, Any]]:
    return events(settings.audit_path, "lock_released")


# --- death seen at once on the holder's host -------------------------------------------------------


def test_a_killed_holder_is_released_at_once_without_waiting_for_its_heartbeat(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings, pids=True)
    workers.append(w := Worker(redis_server.url))
    report = monitor.run_pass()
    assert report is not None
    assert report.error is None
    assert monitor.holders is not None
    assert monitor.holders.pids is not None
    assert KEY in monitor.holders.pids.watching()  # the record names this host and namespace
    assert r.exists(HB)  # a 60 s heartbeat: nothing else would end it for a minute
    killed = w.kill()
    wait_for(lambda: released(settings), timeout_s=10)
    took_s = time.monotonic() - killed
    (event,) = released(settings)
    assert event["reason"] == "heartbeat_dead"
    assert event["heartbeat"] == "dead"
    assert event["outcome"] == "released"
    assert event["holder_exited"] == {"pid": w.proc.pid, "host": protocol.this_process()["host"]}
    assert not r.exists(KEY)
    assert not r.exists(HB)
    assert not r.exists(HOLDER)
    assert took_s < 5  # measured well under a second; see benchmarks/pid_exit.py


def test_a_holder_already_gone_at_the_first_look_is_released_by_that_pass(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings, pids=True)
    workers.append(w := Worker(redis_server.url))
    w.kill()
    assert r.exists(HB)
    report = monitor.run_pass()
    assert report is not None
    (event,) = released(settings)
    assert event["holder_exited"]["pid"] == w.proc.pid
    assert not r.exists(KEY)


def test_a_dry_run_says_what_a_holder_exit_would_release(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings, pids=True, dry_run=True)
    workers.append(w := Worker(redis_server.url))
    w.kill()
    monitor.run_pass()
    monitor.run_pass()  # said once per holding
    (event,) = released(settings)
    assert event["outcome"] == "dry_run"
    assert event["holder_exited"]["pid"] == w.proc.pid
    assert r.exists(KEY)


def test_an_exit_of_an_earlier_holding_never_releases_the_next_one(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings)
    workers.append(w := Worker(redis_server.url))
    monitor.run_pass()
    token = protocol.parse_holder_record(r.get(HOLDER))
    assert token is not None
    w.kill()
    # Its lock goes, and another run of the same task takes the GPU before the exit is acted on.
    r.delete(KEY, HB, HOLDER)
    workers.append(Worker(redis_server.url))
    monitor.holder_exited(KEY, token["token"])
    assert released(settings) == []
    assert r.exists(KEY)


# --- progress ---------------------------------------------------------------------------------------------


def test_a_stalled_holder_is_found_once_and_kept_by_default(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings)
    workers.append(w := Worker(redis_server.url, marks=1, progress_timeout_s=0.3))
    w.marked()  # one mark, then nothing while its heartbeat thread goes on
    wait_for(lambda: monitor.run_pass() and events(settings.audit_path, "holder_stalled"), timeout_s=10)
    monitor.run_pass()
    (found,) = events(settings.audit_path, "holder_stalled")
    assert found["lock_key"] == "gpu_lock:0"
    assert found["heartbeat"] == "alive"
    assert found["finding"]["timeout_from"] == "record"
    assert found["finding"]["progress_timeout_s"] == 0.3
    assert found["finding"]["action"] == "warn"
    assert found["finding"]["silent_s"] >= 0.3
    assert r.exists(KEY)  # warn only
    assert released(settings) == []
    alert = alert_for(Event.HOLDER_STALLED, found, host="h", now=0)
    assert alert is not None
    assert "no progress mark for" in alert.summary


def test_a_stalled_holder_is_released_where_the_rule_says_so(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path, findings={"holder_stalled": {"action": "release", "grace": 0.2}})
    monitor = monitor_with(settings)
    workers.append(w := Worker(redis_server.url, marks=1, progress_timeout_s=0.3))
    w.marked()
    wait_for(lambda: monitor.run_pass() and released(settings), timeout_s=10)
    (event,) = released(settings)
    assert event["reason"] == "holder_stalled"
    assert event["heartbeat"] == "alive"
    assert event["finding"]["since_s"] >= 0.2
    assert not r.exists(KEY)
    assert not r.exists(HOLDER)
    assert alert_for(Event.LOCK_RELEASED, event, host="h", now=0).severity == "critical"  # type: ignore[union-attr]


def test_a_dry_run_says_once_what_a_finding_would_release(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path, findings={"holder_stalled": "release"})
    monitor = monitor_with(settings, dry_run=True)
    workers.append(w := Worker(redis_server.url, marks=1, progress_timeout_s=0.2))
    w.marked()
    wait_for(lambda: monitor.run_pass() and released(settings), timeout_s=10)
    monitor.run_pass()
    (event,) = released(settings)
    assert event["outcome"] == "dry_run"
    assert event["reason"] == "holder_stalled"
    assert r.exists(KEY)


@pytest.mark.parametrize("notifications", ["auto", "off"])
def test_an_honest_slow_task_that_keeps_marking_progress_is_never_released(
    r, redis_server, tmp_path, workers, notifications
):
    r.config_set("notify-keyspace-events", "K$gx" if notifications == "auto" else "")
    settings = make_settings(
        redis_server.url,
        tmp_path,
        hang={"findings": {"holder_stalled": "release"}},
        discovery={"notifications": notifications},
    )
    monitor = monitor_with(settings)
    watcher = daemon.start_watcher(monitor)
    try:
        if notifications == "auto":
            assert watcher is not None
            wait_for(lambda: watcher.progress.complete, timeout_s=10)
            assert monitor.discovery_mode() == "keyspace events"
        # Far longer than its timeout in all, but never that long between two marks.
        workers.append(w := Worker(redis_server.url, marks=30, every_s=0.1, progress_timeout_s=0.6))
        deadline = time.monotonic() + 2.5
        passes = 0
        while time.monotonic() < deadline:
            report = monitor.run_pass()
            assert report is not None
            assert report.error is None
            passes += 1
            time.sleep(0.1)
        w.marked()
        assert passes >= 10
        assert released(settings) == []
        assert events(settings.audit_path, "holder_stalled") == []
        assert r.exists(KEY)
    finally:
        if watcher is not None:
            watcher.stop()
        r.config_set("notify-keyspace-events", "")


# --- GPU evidence (fake NVML) ---------------------------------------------------------------------------


def test_a_second_process_on_a_locked_gpu_is_two_holders(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path, foreign_process_grace=0.05)
    workers.append(w := Worker(redis_server.url))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        device = Device("GPU-aaa", processes=[(w.proc.pid, 1 << 30), (other.pid, 1 << 30)])
        monitor = monitor_with(settings, devices=[device])
        wait_for(lambda: monitor.run_pass() and events(settings.audit_path, "gpu_foreign_process"), timeout_s=10)
        (found,) = events(settings.audit_path, "gpu_foreign_process")
        assert [p["pid"] for p in found["finding"]["foreign"]] == [other.pid]
        assert found["finding"]["pid"] == w.proc.pid
        assert found["gpu"]["uuid"] == "GPU-aaa"
        assert alert_for(Event.GPU_FOREIGN_PROCESS, found, host="h", now=0).severity == "critical"  # type: ignore[union-attr]
        assert r.exists(KEY)  # warn only, by default
    finally:
        other.kill()
        other.wait()


def test_a_holder_absent_from_its_gpu_is_found_and_released_by_its_rule(r, redis_server, tmp_path, workers):
    settings = settings_with(
        redis_server, tmp_path, not_on_gpu_grace=0.05, findings={"holder_not_on_gpu": {"action": "release"}}
    )
    workers.append(Worker(redis_server.url))
    monitor = monitor_with(settings, devices=[Device("GPU-aaa", processes=[])])
    wait_for(lambda: monitor.run_pass() and released(settings), timeout_s=10)
    (found,) = events(settings.audit_path, "holder_not_on_gpu")
    (event,) = released(settings)
    assert event["reason"] == "holder_not_on_gpu"
    assert found["holding"] == event["holding"]
    assert not r.exists(KEY)


def test_the_job_map_names_each_gpus_holder_and_empties_when_it_goes(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    workers.append(w := Worker(redis_server.url))
    monitor = monitor_with(settings, devices=[Device("GPU-aaa", processes=[]), Device("GPU-bbb")], jobs=jobs)
    monitor.run_pass()
    assert (jobs / "0").read_text() == "job-42\n"  # the holder's task id
    assert (jobs / "1").read_text() == ""
    w.kill()
    r.delete(KEY)
    monitor.run_pass()
    assert (jobs / "0").read_text() == ""
    assert monitor.holders is not None
    monitor.holders.close()


# --- where operators see them: status, metrics -----------------------------------------------------------


def test_findings_reach_status_and_metrics(r, redis_server, tmp_path, workers):
    from prometheus_client import generate_latest

    from monitor import metrics, snapshot
    from monitor.cli import status as render

    settings = settings_with(redis_server, tmp_path)
    workers.append(w := Worker(redis_server.url, marks=1, progress_timeout_s=0.2))
    w.marked()
    monitor = monitor_with(settings, devices=[Device("GPU-aaa", processes=[(w.proc.pid, 1 << 30)])])
    exporter = metrics.Metrics(monitor)
    wait_for(lambda: monitor.run_pass() and events(settings.audit_path, "holder_stalled"), timeout_s=10)

    looked = render.look(r, settings, None, settings.name)
    assert looked.findings == {"gpu_lock:0": ["holder_stalled"]}
    doc = render.as_json(snapshot.take(r, settings), looked)
    (lock,) = doc["locks"]
    assert lock["findings"] == ["holder_stalled"]
    table = render.as_table(snapshot.take(r, settings), looked)
    assert "FINDINGS" in table.splitlines()[0]
    assert "holder_stalled" in table.splitlines()[1]

    text = generate_latest(exporter.registry).decode()
    assert 'gpulock_monitor_holder_findings{finding="holder_stalled",lock="gpu_lock:0"} 1.0' in text
    assert 'gpulock_monitor_lock_gpu_info{Hostname="' in text
    assert 'UUID="GPU-aaa"' in text
    assert 'gpulock_monitor_events_total{event="holder_stalled"} 1.0' in text


def test_status_without_a_daemon_or_with_a_malformed_document_shows_no_findings(r, redis_server, tmp_path):
    from monitor.cli import status as render
    from monitor.snapshot import status_ttl_ms

    settings = settings_with(redis_server, tmp_path)
    assert render.look(r, settings, None, "nobody").findings == {}
    key = protocol.monitor_status_key("odd")
    for doc, shown in (
        ('{"findings": [1]}', {}),
        ('{"findings": {"gpu_lock:0": "x", "gpu_lock:1": ["a", 2]}}', {"gpu_lock:1": ["a"]}),
    ):
        r.set(key, doc, px=status_ttl_ms(settings))
        assert render.look(r, settings, None, "odd").findings == shown


def test_with_notifications_a_holder_killed_right_after_acquiring_is_released_without_a_pass(
    r, redis_server, tmp_path, workers
):
    r.config_set("notify-keyspace-events", "K$gx")
    settings = make_settings(redis_server.url, tmp_path, discovery={"notifications": "auto"})
    monitor = monitor_with(settings, pids=True)
    watcher = daemon.start_watcher(monitor)
    try:
        assert watcher is not None
        wait_for(lambda: watcher.progress.complete, timeout_s=10)
        monitor.run_pass()  # the only pass: before the worker exists
        workers.append(w := Worker(redis_server.url))
        w.kill()
        # The lock's event makes the watcher read it; that read starts the watch, which finds the
        # process gone: released with no pass, long before its 60 s heartbeat runs out.
        wait_for(lambda: released(settings), timeout_s=10)
        (event,) = released(settings)
        assert event["holder_exited"]["pid"] == w.proc.pid
        assert not r.exists(KEY)
    finally:
        if watcher is not None:
            watcher.stop()
        r.config_set("notify-keyspace-events", "")


# --- anyone's data -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v":1,"task":"\\ud800","token":"t","heartbeats":true}',  # a lone surrogate: no lock value holds it
        b'{"v":1,"task":"tts","token":"t","pid":2147483648,"pid_ns":1,"start_time":1,"boot_id":"b"}',
        b'{"v":1,"task":"tts","token":"t","pid":18446744073709551616,"start_time":1}',
    ],
)
def test_a_malformed_holder_record_never_stops_a_pass(r, redis_server, tmp_path, raw):
    from helpers import hold

    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings, pids=True)
    r.set(KEY, protocol.lock_value("tts#t"), px=600_000)
    r.set(HOLDER, raw, px=600_000)
    capped = hold(r, 9, age_s=590)  # past the hard cap: released whatever else the pass meets
    report = monitor.run_pass()
    assert report is not None
    assert report.error is None
    assert [e["lock_key"] for e in released(settings)] == [capped.decode()]
    assert r.exists(KEY)


def test_one_locks_failing_evidence_never_stops_a_pass(r, redis_server, tmp_path, workers, monkeypatch):
    from helpers import hold

    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings, pids=True)
    assert monitor.holders is not None
    assert monitor.holders.pids is not None

    def broken(*args: Any) -> bool:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(monitor.holders.pids, "watch", broken)
    monkeypatch.setattr(monitor.holders.hang, "judge", broken)
    workers.append(Worker(redis_server.url))
    capped = hold(r, 9, age_s=590)
    report = monitor.run_pass()
    assert report is not None
    assert report.error is None
    assert [e["lock_key"] for e in released(settings)] == [capped.decode()]


def test_an_exit_of_another_process_with_the_same_token_never_releases_the_holder(r, redis_server, tmp_path):
    """Two processes forked from one client object share a token (an older client, another
    implementation): a watch is of one process of one holding, and only that one's exit counts."""
    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings, pids=True)
    assert monitor.holders is not None
    assert monitor.holders.pids is not None
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        here = protocol.this_process()

        def record_of(proc: subprocess.Popen[bytes]) -> bytes:
            facts: protocol.ProcessFacts = {
                **here,
                "pid": proc.pid,
                "start_time": protocol.process_start_time(proc.pid),
            }
            return protocol.holder_record(task="tts", token="shared", heartbeat_interval_s=30, process=facts)

        r.set(KEY, protocol.lock_value("tts#shared"), px=600_000)
        r.set(HB, "1", px=60_000)
        r.set(HOLDER, record_of(first), px=600_000)
        monitor.run_pass()
        (was,) = monitor.holders.pids.watching().values()
        assert was[1] == first.pid
        r.set(HOLDER, record_of(second), px=600_000)  # the same holding's record, now another process's
        monitor.run_pass()
        (now,) = monitor.holders.pids.watching().values()
        assert now[1] == second.pid
        first.kill()
        first.wait()
        monitor.holder_exited(KEY, was[0])  # a late report of the first process's exit
        assert released(settings) == []
        assert r.exists(KEY)
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


def test_progress_marks_make_the_next_pass_read_the_lock_not_a_read_each(r, redis_server, tmp_path, workers):
    r.config_set("notify-keyspace-events", "K$gx")
    settings = make_settings(redis_server.url, tmp_path, discovery={"notifications": "auto"})
    monitor = monitor_with(settings)
    reads: list[int] = []
    real = monitor.run_keys
    monitor.run_keys = lambda observations, **kw: reads.append(len(observations)) or real(observations, **kw)  # type: ignore[method-assign]
    watcher = daemon.start_watcher(monitor)
    try:
        assert watcher is not None
        wait_for(lambda: watcher.progress.complete, timeout_s=10)
        workers.append(w := Worker(redis_server.url, marks=40, every_s=0.01))
        w.marked()
        assert watcher.candidates() is not None  # the pass's barrier: every event so far is in
        assert watcher.progress.events >= 40  # the marks' events came
        assert sum(reads) <= 2  # the lock's own event read it; 40 progress marks did not
        assert KEY in watcher.changed()  # but the next pass reads it again
    finally:
        if watcher is not None:
            watcher.stop()
        r.config_set("notify-keyspace-events", "")


def test_a_live_process_whose_start_time_reads_otherwise_is_never_taken_for_dead(r, redis_server, tmp_path):
    """The pid names a running process with another start time than the record's: a reused pid, or
    a holder in a time namespace of its own. Unproven either way: left to the heartbeat."""
    settings = settings_with(redis_server, tmp_path)
    monitor = monitor_with(settings, pids=True)
    assert monitor.holders is not None
    assert monitor.holders.pids is not None
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start = protocol.process_start_time(alive.pid)
        assert start is not None
        facts: protocol.ProcessFacts = {**protocol.this_process(), "pid": alive.pid, "start_time": start + 100}
        r.set(KEY, protocol.lock_value("tts#t"), px=600_000)
        r.set(HB, "1", px=60_000)
        r.set(HOLDER, protocol.holder_record(task="tts", token="t", heartbeat_interval_s=30, process=facts))
        monitor.run_pass()
        monitor.run_pass()
        assert released(settings) == []
        assert monitor.holders.pids.watching() == {}
        assert r.exists(KEY)
    finally:
        alive.kill()
        alive.wait()


def test_a_finding_is_said_once_per_holding_across_daemon_runs(r, redis_server, tmp_path, workers):
    settings = settings_with(redis_server, tmp_path)
    workers.append(w := Worker(redis_server.url, marks=1, progress_timeout_s=0.2))
    w.marked()
    first = monitor_with(settings)
    wait_for(lambda: first.run_pass() and events(settings.audit_path, "holder_stalled"), timeout_s=10)
    for _ in range(2):  # the daemon restarted, twice: the holding's record says it was said
        again = monitor_with(settings)
        again.run_pass()
        again.run_pass()
        assert again.holders is not None
        assert KEY in again.holders.current  # still true, and shown
    assert len(events(settings.audit_path, "holder_stalled")) == 1


def test_a_hang_release_never_takes_a_same_value_holding_that_came_since_the_read(r, redis_server, tmp_path):
    """The rule says release, and between the pass's read and its release the lock is taken again
    with the same value (a same-token client): a new expiry, a new holding. The script re-checks value
    and expiry: holder_changed, nothing deleted."""
    settings = settings_with(redis_server, tmp_path, findings={"holder_stalled": "release"})
    monitor = monitor_with(settings)
    value = protocol.lock_value("tts#t")
    r.set(KEY, value, px=600_000)
    r.set(HB, "1", px=60_000)
    r.set(HOLDER, protocol.holder_record(task="tts", token="t", heartbeat_interval_s=30, progress_timeout_s=0.05))
    real = monitor.reaper.release
    retaken: list[int] = []

    def retaken_first(key: bytes, holder: bytes, expiry_ms: int, **kw: Any) -> Any:
        if not retaken:
            r.set(KEY, value, px=500_000)  # the same value, another expiry: another holding
            retaken.append(expiry_ms)
        return real(key, holder, expiry_ms, **kw)

    monitor.reaper.release = retaken_first  # type: ignore[method-assign]
    wait_for(lambda: monitor.run_pass() and retaken, timeout_s=10)
    (skipped,) = events(settings.audit_path, "release_skipped")
    assert skipped["outcome"] == "holder_changed"
    assert skipped["reason"] == "holder_stalled"
    assert released(settings) == []
    assert r.get(KEY) == value
