"""The least-privilege ACL users shipped in deploy/, loaded as an aclfile into a Redis of the test's
own: everything the monitor and the reference client do works through the documented URL (database
2), nothing else is allowed, and what no Redis ACL can limit (deploy/README.md) is as said."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from helpers import beat, build, config_file, events, hold, make_settings, wait_for

from monitor.demo.redis_server import RedisServer, find_binary
from monitor.worker.client import GpuLock

REPO = Path(__file__).resolve().parent.parent
ACL = REPO / "deploy" / "redis-acl.conf"
ACL_7 = REPO / "deploy" / "redis-acl-7.conf"
DB = 2  # deploy/README.md's URL ends in /2
# An ACL refusal, sent alone or from inside a script (Redis 6.2 and 7 word it differently).
REFUSED = "no permissions|can't run this command|can't access|No permissions to access"


def redis_7_binary() -> str | None:
    """A Redis 7 server for the selector variant: $REDIS7_SERVER, or redis-server on PATH if it is 7+."""
    for candidate in (os.environ.get("REDIS7_SERVER"), shutil.which("redis-server")):
        if candidate and _major(candidate) >= 7:
            return candidate
    return None


def _major(binary: str) -> int:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return 0
    version = out.partition("v=")[2].split(".")[0]
    return int(version) if version.isdigit() else 0


@dataclass
class AclRedis:
    server: RedisServer
    admin: redis.Redis  # the default user, on database 2
    acl_file: Path
    version: int

    def url(self, user: str) -> str:
        return f"redis://{user}:{user}-pw@127.0.0.1:{self.server.port}/{DB}"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), protocol=2)

    def refusals(self) -> list[dict[str, object]]:
        """ACL LOG entries, less what is asked knowing it may be refused: PEXPIRETIME (the scripts
        fall back to TIME and PTTL) and CLIENT SETINFO, which redis-py sends on every connection
        and whose refusal it ignores (Redis 6.2 logs it as "client"; a refused CLIENT SETNAME, the
        other "client", would fail every connection, and with it the commands under test)."""
        noise = {"pexpiretime", "client", "client|setinfo"}
        return [e for e in self.admin.acl_log() if e["object"] not in noise]


def _binaries() -> list[object]:
    redis_7 = redis_7_binary()
    skip_7 = pytest.mark.skipif(redis_7 is None, reason="no Redis 7 server here (set $REDIS7_SERVER)")
    return [
        pytest.param((ACL, find_binary()), id="6.2+"),
        pytest.param((ACL, redis_7 or ""), id="6.2+-on-7", marks=skip_7),
        pytest.param((ACL_7, redis_7 or ""), id="7+", marks=skip_7),
    ]


@pytest.fixture(params=_binaries())
def acl_redis(request, tmp_path, monkeypatch) -> Iterator[AclRedis]:
    """The shipped file as it is, passwords filled in, loaded by `--aclfile`."""
    source, binary = request.param
    users = []
    for line in source.read_text().splitlines():
        name = line.split()[1]
        users.append(line.replace(">CHANGE-ME", f">{name}-pw"))
    acl_file = tmp_path / "users.acl"
    acl_file.write_text("\n".join(users) + "\n")
    monkeypatch.setenv("REDIS_SERVER", binary)
    with RedisServer(None, "--aclfile", str(acl_file)) as server:
        admin = redis.Redis(port=server.port, db=DB, protocol=2)
        admin.acl_log_reset()
        yield AclRedis(server, admin, source, _major(binary))
        admin.close()


def test_shipped_file_is_an_aclfile_of_user_lines_only():
    # Redis refuses an aclfile with anything else (comments included): the explanations are in the README.
    for path in (ACL, ACL_7):
        lines = path.read_text().splitlines()
        assert [line.split()[:2] for line in lines] == [["user", "gpulock-monitor"], ["user", "gpulock-worker"]]
        assert all(">CHANGE-ME" in line for line in lines)
    readme = (REPO / "deploy" / "README.md").read_text()
    assert "redis-acl.conf" in readme
    assert "redis-acl-7.conf" in readme
    assert "/2" in readme


def test_each_line_pasted_after_acl_setuser_gives_the_same_user(acl_redis):
    for line in acl_redis.acl_file.read_text().splitlines():
        _, name, *rules = line.replace(">CHANGE-ME", f">{line.split()[1]}-pw").split()
        acl_redis.admin.execute_command("ACL", "SETUSER", f"{name}-pasted", *rules)
        loaded, pasted = (acl_redis.admin.acl_getuser(n) for n in (name, f"{name}-pasted"))
        assert pasted == loaded


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args, "-c", str(config)], capture_output=True, text=True, timeout=60
    )


def test_monitor_user_runs_the_daemon_status_health_and_release(acl_redis, tmp_path):
    admin = acl_redis.admin
    zombie = hold(admin, 0, "crashed", age_s=450)  # past soft_timeout, no heartbeat
    alive = hold(admin, 1, "training", age_s=450)
    beat(admin, alive, age_s=1)
    stuck = hold(admin, 2, "stuck", age_s=10)
    admin.set(b"celery-task-meta-1", b"x")
    config = config_file(tmp_path, acl_redis.url("gpulock-monitor"), nvml={"enabled": False})

    run = cli(config, "run", "--once")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not admin.exists(zombie)
    assert admin.exists(alive)
    assert admin.exists(stuck)
    (released,) = events(tmp_path / "audit.jsonl", "lock_released")
    assert released["lock_key"] == "gpu_lock:0"
    assert admin.keys(b"gpulock_monitor:*")  # its records and status: in database 2

    status = cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert "gpu_lock:1" in status.stdout

    health = cli(config, "health")
    assert (health.returncode, health.stdout.split(":")[0]) == (0, "healthy"), health.stdout + health.stderr

    release = cli(config, "release", "gpu_lock:2", "--yes")
    assert release.returncode == 0, release.stdout + release.stderr
    assert not admin.exists(stuck)
    assert events(tmp_path / "audit.jsonl", "manual_release")

    assert acl_redis.refusals() == []
    assert admin.get(b"celery-task-meta-1") == b"x"


def test_monitor_user_is_refused_everything_else(acl_redis):
    admin = acl_redis.admin
    admin.set(b"celery-task-meta-1", b"x")
    admin.set(b"gpu_lock:0", b"locked_by_x", ex=600)
    monitor = acl_redis.client("gpulock-monitor")
    refused = [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("CONFIG", "GET", "requirepass"),
        ("ACL", "LIST"),
        ("KEYS", "*"),
        ("SHUTDOWN", "NOSAVE"),
        ("INFO",),
        ("CLIENT", "LIST"),
        ("SET", "celery-task-meta-1", "y"),
        ("GET", "celery-task-meta-1"),
        ("DEL", "celery-task-meta-1"),
        ("EXPIRE", "gpu_lock:0", "1"),  # no command the monitor does not use, even on its own keys
        ("RENAME", "gpu_lock:0", "gpu_lock:1"),
        ("PUBLISH", "other-channel", "x"),
        # It subscribes to its lock keys' events only, not to the whole keyspace's or other channels.
        ("SUBSCRIBE", "other-channel"),
        ("PSUBSCRIBE", "__keyspace@2__:*"),
        ("PSUBSCRIBE", "__keyspace@0__:gpu_lock:*"),
        # A script runs with the caller's rights: every command in it is checked as if sent alone.
        ("EVAL", "return redis.call('GET', KEYS[1])", "1", "celery-task-meta-1"),
        ("EVAL", "return redis.call('FLUSHALL')", "0"),
        ("EVAL", "return redis.call('KEYS', '*')", "0"),
        ("EVAL", "return redis.call('DEL', KEYS[1])", "1", "celery-task-meta-1"),
    ]
    if acl_redis.acl_file == ACL_7:
        # Redis 7 selectors: SET only on the monitor's own keys; it cannot create or overwrite a lock.
        refused += [
            ("SET", "gpu_lock:0", "locked_by_monitor"),
            ("EVAL", "return redis.call('SET', KEYS[1], 'm')", "1", "gpu_lock:9"),
        ]
    for command in refused:
        with pytest.raises(redis.ResponseError, match=REFUSED):
            monitor.execute_command(*command)
    assert admin.get(b"celery-task-meta-1") == b"x"
    assert admin.get(b"gpu_lock:0") == b"locked_by_x"
    assert admin.ttl(b"gpu_lock:0") > 500
    assert admin.dbsize() == 2
    monitor.close()


def test_what_no_redis_acl_limits_is_as_the_readme_says(acl_redis):
    """deploy/README.md, "What an ACL cannot limit": kept true by this test."""
    admin = acl_redis.admin
    admin.set(b"celery-task-meta-1", b"x")
    monitor = acl_redis.client("gpulock-monitor")
    # SCAN is not limited by key patterns: the names of every key in the database are visible.
    assert b"celery-task-meta-1" in set(monitor.scan_iter(count=1000))
    # SELECT takes any database: ACLs have no per-database rules.
    assert monitor.execute_command("SELECT", "0") is True
    # EVAL runs any script text; only what the script calls is checked.
    assert monitor.eval("return 1 + 1", 0) == 2
    # On Redis 6.2 key patterns cannot separate reading from writing: SET, needed on the monitor's own keys,
    # reaches the locks too. redis-acl-7.conf closes this with a selector.
    if acl_redis.acl_file == ACL:
        assert monitor.set(b"gpu_lock:7", b"locked_by_monitor")
    monitor.close()


def test_worker_user_runs_the_reference_client(acl_redis):
    admin = acl_redis.admin
    worker = acl_redis.client("gpulock-worker")
    first = GpuLock(worker, "gpu_lock:0", task_name="train", heartbeat_interval_s=0.2, max_wait_s=10)
    first.acquire()
    assert admin.get(b"gpu_lock:0") == first.value
    wait_for(lambda: admin.exists(b"gpu_lock:0:heartbeat"))
    took: list[GpuLock] = []
    second = GpuLock(acl_redis.client("gpulock-worker"), "gpu_lock:0", task_name="eval", max_wait_s=10)
    waiter = threading.Thread(target=lambda: took.append(second.acquire()))
    waiter.start()  # waits for the release notice on gpu_lock:gpu_lock:0
    assert first.release() is True
    waiter.join(timeout=15)
    assert took == [second]
    assert admin.get(b"gpu_lock:0") == second.value
    assert second.release() is True
    assert not admin.exists(b"gpu_lock:0")
    assert not first.lost.is_set()
    assert not second.lost.is_set()
    assert acl_redis.refusals() == []
    # A worker sees nothing of the monitor's own keys, and no other key.
    for command in (("GET", "gpulock_monitor:x"), ("SET", "celery-task-meta-1", "y"), ("SCAN", "0"), ("FLUSHALL",)):
        with pytest.raises(redis.ResponseError, match=REFUSED):
            worker.execute_command(*command)
    worker.close()


def test_monitor_user_runs_the_event_driven_core_where_notifications_are_on(acl_redis, tmp_path):
    """Subscribing to the lock keys' events, the probe, the reads' marks: all within the shipped rules."""
    from monitor import daemon, protocol

    admin = acl_redis.admin
    admin.config_set("notify-keyspace-events", "K$gx")
    settings = make_settings(
        acl_redis.url("gpulock-monitor"),
        tmp_path,
        gpu_lock_monitor={"monitor_interval": 30, "heartbeat": {"interval": 0.3, "timeout": 5}},
    )
    monitor = build(settings, acl_redis.client("gpulock-monitor"))
    watcher = daemon.start_watcher(monitor)
    assert watcher is not None
    try:
        wait_for(lambda: watcher.progress.complete, timeout_s=10)
        key = hold(admin, 0, "crashed")
        admin.set(protocol.heartbeat_key(key), b"1", px=600)  # written once, then the worker died
        wait_for(lambda: not admin.exists(key), timeout_s=10)
    finally:
        watcher.stop()
    assert [e["state"] for e in events(settings.audit_path, "keyspace_notifications")] == ["on"]
    assert [e["reason"] for e in events(settings.audit_path, "lock_released")] == ["heartbeat_dead"]
    assert acl_redis.refusals() == []
