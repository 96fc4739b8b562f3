"""The daemon as operators run it: a subprocess, driven by config, Redis keys and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import yaml
from helpers import (
    FAST_HB_S,
    FAST_HB_TIMEOUT_S,
    FAST_INTERVAL_S,
    events,
    fast_config,
    hold,
    holding_records,
    next_message,
    start_daemon,
    stop_daemon,
    subscribed,
    wait_for,
)

from monitor.demo.redis_server import RedisServer

pytestmark = pytest.mark.slow

HB_INTERVAL_S = FAST_HB_S
HB_TIMEOUT_S = FAST_HB_TIMEOUT_S
INTERVAL_S = FAST_INTERVAL_S


def write_config(tmp: Path, url: str, **monitor: object) -> Path:
    """Tiers far away: these tests are about the heartbeat rule and the daemon's life cycle."""
    tiers = {"warning": 100, "soft_timeout": 200, "hard_timeout": 300}
    return fast_config(tmp, url, timeout_levels=tiers, cleanup={"max_retry": 2, "retry_delay": 0.1}, **monitor)


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60, **kw)


def started(audit: Path) -> bool:
    return bool(events(audit, "monitor_started"))


def test_crashed_holder_released_within_heartbeat_timeout_plus_interval(r, redis_server, tmp_path):
    config = write_config(tmp_path, redis_server.url)
    audit = tmp_path / "audit.jsonl"
    key = hold(r, 0, "tts_synthesize")
    with subscribed(r, b"gpu_lock:gpu_lock:0") as pubsub:
        proc = start_daemon(config)
        try:
            wait_for(lambda: started(audit))
            for _ in range(8):  # a healthy worker: heartbeats, and the monitor keeps its lock
                r.set(key + b":heartbeat", str(time.time()), px=int(2000 * HB_INTERVAL_S))
                time.sleep(HB_INTERVAL_S)
            assert r.exists(key)
            crashed_at = time.monotonic()  # SIGKILL: no more heartbeats, no release
            message = next_message(pubsub, HB_TIMEOUT_S + INTERVAL_S + 5)
            recovered_s = time.monotonic() - crashed_at
        finally:
            code, out = stop_daemon(proc)
    assert message is not None, out
    assert json.loads(message["data"])["release_reason"] == "forced_by_monitor"
    assert recovered_s <= HB_TIMEOUT_S + INTERVAL_S + 1.0, recovered_s
    assert not r.exists(key)
    (released,) = events(audit, "lock_released")
    assert released["reason"] == "heartbeat_dead"
    assert code == 0
    assert [e["event"] for e in events(audit)][-1] == "monitor_stopped"
    pubsub.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(r, redis_server, tmp_path, sig):
    config = write_config(tmp_path, redis_server.url)
    proc = start_daemon(config)
    wait_for(lambda: started(tmp_path / "audit.jsonl"))
    proc.send_signal(sig)
    code, out = stop_daemon(proc)
    assert code == 0, out
    assert "Traceback" not in out
    assert [e["event"] for e in events(tmp_path / "audit.jsonl")] == [
        "monitor_started",
        "keyspace_notifications",
        "monitor_stopped",
    ]
    for line in out.splitlines():  # JSON logs for journald
        json.loads(line)


def test_redis_stopped_and_restarted_under_running_daemon(tmp_path):
    with RedisServer() as own:
        client = redis.Redis.from_url(own.url, protocol=2)
        audit = tmp_path / "audit.jsonl"
        proc = start_daemon(write_config(tmp_path, own.url))
        try:
            wait_for(lambda: started(audit))
            own.stop()
            wait_for(lambda: events(audit, "redis_unavailable"))
            time.sleep(1.0)  # several passes fail while Redis is away; the daemon must stay up
            assert proc.poll() is None
            own.start()
            wait_for(lambda: events(audit, "redis_recovered"))
            # After the outage, a worker takes a GPU, beats a few times and crashes. (A lock
            # taken after the daemon's complete passes cannot be faked old through its TTL.)
            key = hold(client, 0)
            for _ in range(4):
                client.set(key + b":heartbeat", str(time.time()), px=int(2000 * HB_INTERVAL_S))
                time.sleep(HB_INTERVAL_S)
            wait_for(lambda: not client.exists(key))
        finally:
            code, out = stop_daemon(proc)
        assert code == 0, out
        names = [e["event"] for e in events(audit)]
        assert names.count("redis_unavailable") == 1
        assert names.count("redis_recovered") == 1
        assert names.index("redis_unavailable") < names.index("redis_recovered") < names.index("lock_released")
        assert events(audit, "lock_released")[0]["reason"] == "heartbeat_dead"
        assert "Traceback" not in out


def test_once_releases_zombie_and_exits_zero(r, redis_server, tmp_path):
    hold(r, 0, age_s=250)
    hold(r, 1, age_s=10)
    result = cli("run", "--once", "-c", str(write_config(tmp_path, redis_server.url)))
    assert result.returncode == 0, result.stderr
    assert not r.exists(b"gpu_lock:0")
    assert r.exists(b"gpu_lock:1")
    assert [e["event"] for e in events(tmp_path / "audit.jsonl")] == [
        "monitor_started",
        "lock_released",
        "monitor_stopped",
    ]


def test_once_dry_run_releases_nothing(r, redis_server, tmp_path):
    hold(r, 0, age_s=250)
    result = cli("run", "--once", "--dry-run", "-c", str(write_config(tmp_path, redis_server.url)))
    assert result.returncode == 0, result.stderr
    assert r.exists(b"gpu_lock:0")
    (event,) = events(tmp_path / "audit.jsonl", "lock_released")
    assert event["dry_run"] is True


def test_once_without_redis_fails_with_one_line(tmp_path):
    from monitor.demo.redis_server import free_port

    result = cli("run", "--once", "-c", str(write_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert [e["event"] for e in events(tmp_path / "audit.jsonl")] == [
        "monitor_started",
        "redis_unavailable",
        "monitor_stopped",
    ]


def test_disabled_monitor_exits_zero_doing_nothing(r, redis_server, tmp_path):
    hold(r, 0, age_s=250)
    result = cli("run", "-c", str(write_config(tmp_path, redis_server.url, enabled=False)))
    assert result.returncode == 0
    assert r.exists(b"gpu_lock:0")
    assert "monitor_disabled" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "gpu_lock_monitor:\n  monitor_interval: soon\n",
            "gpu_lock_monitor.monitor_interval: expected a number of seconds",
        ),
        ("gpu_lock:\n  bogus: 1\n", "gpu_lock.bogus: unknown key"),
        ("redis: [\n", "line 2"),
    ],
)
def test_bad_config_is_one_line_and_nonzero(tmp_path, content, message):
    config = tmp_path / "bad.yml"
    config.write_text(content)
    result = cli("run", "-c", str(config))
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert message in line
    assert line.startswith("gpulock-monitor: ")


def test_missing_config_is_one_line(tmp_path):
    result = cli("run", "-c", str(tmp_path / "nope.yml"))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("does not exist")
    assert len(result.stderr.splitlines()) == 1


def test_unwritable_audit_path_is_one_line(redis_server, tmp_path):
    (tmp_path / "file").write_text("")
    config = write_config(tmp_path, redis_server.url)
    raw = yaml.safe_load(config.read_text())
    raw["audit"]["path"] = str(tmp_path / "file" / "audit.jsonl")
    config.write_text(yaml.safe_dump(raw))
    result = cli("run", "--once", "-c", str(config))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("gpulock-monitor: audit.path: cannot open")


def test_run_takes_its_config_and_redis_url_from_the_environment(r, redis_server, tmp_path):
    config = write_config(tmp_path, "redis://127.0.0.1:1/0")  # wrong on purpose: the env wins
    hold(r, 0, age_s=250)
    env = {**os.environ, "GPULOCK_MONITOR_CONFIG": str(config), "GPULOCK_MONITOR_REDIS_URL": redis_server.url}
    result = cli("run", "--once", env=env)
    assert result.returncode == 0, result.stderr
    assert not r.exists(b"gpu_lock:0")


def test_scheduler_skips_no_pass_silently_when_pass_is_slow(r, redis_server, tmp_path):
    # Passes run back to back on one job; the daemon keeps its interval under load.
    pipe = r.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"gpu_lock:{i}", "locked_by_x", ex=600)
    pipe.execute()
    stop = threading.Event()
    from monitor import daemon
    from monitor.config import load_settings

    settings = load_settings(str(write_config(tmp_path, redis_server.url)), env={})
    runner = threading.Thread(target=daemon.run, args=(settings,), kwargs={"stop": stop})
    runner.start()
    wait_for(lambda: len(holding_records(r)) == 2000)  # a whole pass was done and remembered
    stop.set()
    runner.join(timeout=20)
    assert not runner.is_alive()
    assert [e["event"] for e in events(tmp_path / "audit.jsonl")] == [
        "monitor_started",
        "keyspace_notifications",
        "monitor_stopped",
    ]


# --- the audit file under a running daemon, and lines that could not be written ---------------------


def released_keys(audit: Path) -> list[str]:
    return [e["lock_key"] for e in events(audit, "lock_released")]


def crashed_holder(r: redis.Redis, gpu: int) -> None:
    """A worker that heartbeats while the monitor watches, then dies (released within ~1 s)."""
    key = hold(r, gpu)
    for _ in range(4):
        r.set(key + b":heartbeat", str(time.time()), px=int(2000 * HB_INTERVAL_S))
        time.sleep(HB_INTERVAL_S)


def test_audit_file_deleted_or_replaced_under_the_daemon_loses_no_event(r, redis_server, tmp_path):
    audit = tmp_path / "audit.jsonl"
    proc = start_daemon(write_config(tmp_path, redis_server.url))
    try:
        wait_for(lambda: started(audit) or proc.poll() is not None)
        audit.unlink()  # no SIGHUP follows
        crashed_holder(r, 0)
        wait_for(lambda: released_keys(audit) == ["gpu_lock:0"], timeout_s=10)
        audit.rename(tmp_path / "audit.jsonl.1")
        audit.write_text("")  # replaced by a new, empty file (logrotate's `create`)
        crashed_holder(r, 1)
        wait_for(lambda: released_keys(audit) == ["gpu_lock:1"], timeout_s=10)
    finally:
        code, out = stop_daemon(proc)
    assert code == 0, out
    assert released_keys(tmp_path / "audit.jsonl.1") == ["gpu_lock:0"]
    assert [e["event"] for e in events(audit)] == ["lock_released", "monitor_stopped"]


def dev_full_config(tmp_path: Path, url: str) -> Path:
    config = write_config(tmp_path, url)
    raw = yaml.safe_load(config.read_text())
    raw["audit"]["path"] = "/dev/full"  # opens, then refuses every write: a full disk
    config.write_text(yaml.safe_dump(raw))
    return config


def test_once_on_a_full_audit_disk_releases_and_exits_nonzero(r, redis_server, tmp_path):
    hold(r, 0, age_s=350)
    result = cli("run", "--once", "-c", str(dev_full_config(tmp_path, redis_server.url)))
    assert result.returncode == 1
    assert not r.exists(b"gpu_lock:0")  # the release stands; its line is what is missing
    (line,) = result.stderr.splitlines()
    assert line == (
        "gpulock-monitor: 3 line(s) not written: /dev/full: No space left on device (the log on stdout has them)"
    )
    logged = [json.loads(entry)["event"] for entry in result.stdout.splitlines()]
    assert {"monitor_started", "lock_released", "monitor_stopped", "audit_write_failed"} <= set(logged)


def test_daemon_stopped_with_lines_unwritten_exits_nonzero(r, redis_server, tmp_path, capfd):
    from monitor import daemon
    from monitor.config import load_settings

    settings = load_settings(str(dev_full_config(tmp_path, redis_server.url)), env={})
    stop = threading.Event()
    codes: list[int] = []
    hold(r, 0, age_s=350)  # past hard_timeout: released at the first pass
    runner = threading.Thread(target=lambda: codes.append(daemon.run(settings, stop=stop)))
    runner.start()
    wait_for(lambda: not r.exists(b"gpu_lock:0"))
    stop.set()
    runner.join(timeout=20)
    assert codes == [1]
    assert "line(s) not written: /dev/full: No space left on device" in capfd.readouterr().err


def test_critical_lines_unwritten_are_counted(settings, capsys):
    from helpers import build

    from monitor import daemon
    from monitor.errors import AuditWriteError

    monitor = build(settings)
    monitor.critical.path = Path("/dev/full")
    with pytest.raises(AuditWriteError):
        monitor.critical.write({"event": "release_failed"})
    assert daemon._unwritten(monitor) == 1
    assert capsys.readouterr().err == (
        "gpulock-monitor: 1 line(s) not written: /dev/full: No space left on device (the log on stdout has them)\n"
    )
