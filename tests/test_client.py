"""The reference worker client against a real Redis."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import pytest
import redis
from helpers import acl_user, build, events, next_message, read_jsonl, subscribed, wait_for

from monitor.demo.redis_server import RedisServer
from monitor.worker import client as client_mod
from monitor.worker.client import AcquireTimeoutError, GpuLock, gpu_lock, release_for_task


@pytest.fixture(autouse=True)
def fresh_counters(monkeypatch):
    monkeypatch.setattr(client_mod, "COUNTERS", client_mod.Counters())


def lock(r, key="gpu_lock:0", **kw) -> GpuLock:
    return GpuLock(
        r, key, task_name=kw.pop("task_name", "tts"), heartbeat_interval_s=kw.pop("heartbeat_interval_s", 0.1), **kw
    )


def test_acquire_writes_unique_value_ttl_and_first_heartbeat(r):
    a = lock(r, timeout_s=30).acquire()
    try:
        assert r.get(b"gpu_lock:0") == a.value
        assert a.value.startswith(b"locked_by_tts#")
        assert 29_000 < r.pttl(b"gpu_lock:0") <= 30_000
        assert r.exists(b"gpu_lock:0:heartbeat")  # written with the lock, never a "none" holding
        float(r.get(b"gpu_lock:0:heartbeat"))
    finally:
        assert a.release()
    assert lock(r).value != a.value
    assert r.exists(b"gpu_lock:0", b"gpu_lock:0:heartbeat") == 0


def test_heartbeat_keeps_refreshing_while_owned(r):
    with lock(r) as held:
        first = r.get(b"gpu_lock:0:heartbeat")
        wait_for(lambda: r.get(b"gpu_lock:0:heartbeat") != first)
        assert 0 < r.pttl(b"gpu_lock:0:heartbeat") <= 200
        assert not held.lost.is_set()


def test_heartbeat_reports_a_lost_lock(r):
    lost = []
    held = lock(r, on_lost=lost.append).acquire()
    r.set(b"gpu_lock:0", b"locked_by_someone_else")  # expired and re-acquired, say
    assert held.lost.wait(5)
    wait_for(lambda: lost)
    assert lost == [held]
    assert client_mod.COUNTERS.ownership_violations == 1
    assert not held.release()  # owner-checked: the other holder's lock stays
    assert r.get(b"gpu_lock:0") == b"locked_by_someone_else"


def test_heartbeat_survives_a_redis_blip(r):
    with lock(r) as held:
        r.client_kill_filter(_type="normal", skipme=True)  # drop every connection but ours
        before = r.get(b"gpu_lock:0:heartbeat")
        wait_for(lambda: r.get(b"gpu_lock:0:heartbeat") != before)
        assert not held.lost.is_set()


def test_waiter_is_woken_by_the_notice_not_by_polling(r):
    holder = lock(r, heartbeat_interval_s=30).acquire()  # no heartbeat scripts during the test
    r.config_resetstat()
    got: list[float] = []
    waiter = lock(r, task_name="asr", poll_min_s=30, poll_max_s=30, max_wait_s=60)
    thread = threading.Thread(target=lambda: got.append(waiter.acquire().acquired_at))
    thread.start()
    with subscribed(r, b"gpu_lock:gpu_lock:0") as pubsub:
        wait_for(lambda: r.pubsub_numsub(b"gpu_lock:gpu_lock:0")[0][1] >= 2)  # the waiter listens
        wait_for(lambda: r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) >= 1)  # and tried
        holder.release()
        notice = json.loads(next_message(pubsub, 5)["data"])
    thread.join(timeout=10)
    assert got, "the waiter did not acquire"
    assert notice["release_reason"] == "normal"
    assert got[0] - notice["timestamp"] < 1.0  # polling alone would take 15-45 s
    waiter.release()


def test_gives_up_after_max_wait(r):
    r.set(b"gpu_lock:0", b"locked_by_forever")
    start = time.monotonic()
    with pytest.raises(AcquireTimeoutError, match=r"still held after 0\.3 s"):
        lock(r, max_wait_s=0.3, poll_min_s=0.05, poll_max_s=0.1).acquire()
    assert time.monotonic() - start < 3


def test_failing_with_block_runs_a_broken_cleanup_and_still_releases_as_task_failure(r):
    cleaned = []

    def broken_cleanup():
        cleaned.append(True)
        raise RuntimeError("cuda context gone")

    with subscribed(r, b"gpu_lock:gpu_lock:0") as pubsub:
        with pytest.raises(ValueError, match="task blew up"), lock(r, cleanup=broken_cleanup):
            raise ValueError("task blew up")
        assert cleaned == [True]
        assert not r.exists(b"gpu_lock:0")
        assert json.loads(next_message(pubsub, 5)["data"])["release_reason"] == "task_failure"


def test_normal_release_fails_then_emergency_release_on_fresh_connection(r, redis_server):
    pool = redis.ConnectionPool.from_url(redis_server.url, protocol=2, max_connections=2)
    starved = redis.Redis(connection_pool=pool)
    held = lock(starved, heartbeat_interval_s=30).acquire()
    hog = [pool.get_connection(), pool.get_connection()]  # the worker's pool is exhausted
    try:
        assert held.finish("normal")
    finally:
        for conn in hog:
            pool.release(conn)
    assert not r.exists(b"gpu_lock:0")
    assert client_mod.COUNTERS.normal_release_failures == 1
    assert client_mod.COUNTERS.emergency_releases == 1


def test_both_releases_fail_writes_critical_record(tmp_path):
    with RedisServer() as own:
        c = redis.Redis.from_url(own.url, protocol=2)
        held = GpuLock(
            c, "gpu_lock:0", task_name="tts", heartbeat_interval_s=30, critical_path=str(tmp_path / "crit.jsonl")
        )
        held.acquire()
        own.stop()
        assert not held.finish("normal")
    (record,) = read_jsonl(tmp_path / "crit.jsonl")
    assert record["lock_key"] == "gpu_lock:0"
    assert record["holder"] == held.value.decode()
    assert record["error_type"] == "ConnectionError"
    assert record["source"] == "client"
    assert client_mod.COUNTERS.emergency_releases == 1


def test_release_script_error_is_counted(r):
    # An ACL that refuses DEL: the release script fails inside Redis, and nothing was released.
    with acl_user(r, "nodel", channels=["*"], commands=["+@all", "-del"]) as nodel:
        held = lock(nodel.client, heartbeat_interval_s=30).acquire()
        with pytest.raises(redis.ResponseError):
            held.release()
    assert client_mod.COUNTERS.release_script_errors == 1
    assert r.get(b"gpu_lock:0") == held.value


def test_warnings_go_through_stdlib_logging(r, caplog, capsys):
    held = lock(r, heartbeat_interval_s=30).acquire()
    r.set(b"gpu_lock:0", b"locked_by_someone_else")  # expired and re-acquired, say
    with caplog.at_level(logging.WARNING, logger="gpulock_monitor.client"):
        assert not held.release()
    (record,) = (rec for rec in caplog.records if rec.name == "gpulock_monitor.client")
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"release_not_owner lock_key=gpu_lock:0 holder={held.value.decode()}"
    assert capsys.readouterr().out == ""


# A worker that never set up logging: it takes the lock, loses it to another holder, releases.
UNCONFIGURED_WORKER = """
import sys
import redis
from monitor.worker.client import GpuLock
r = redis.Redis.from_url(sys.argv[1], protocol=2)
held = GpuLock(r, "gpu_lock:0", task_name="tts", heartbeat_interval_s=30).acquire()
r.set(b"gpu_lock:0", b"locked_by_someone_else")
assert not held.release()
"""


def test_a_worker_without_logging_set_up_gets_warnings_on_stderr_not_stdout(r, redis_server):
    # A worker's stdout may be its output (a pipe, a protocol): the client never writes there.
    result = subprocess.run(
        [sys.executable, "-c", UNCONFIGURED_WORKER, redis_server.url], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "release_not_owner lock_key=gpu_lock:0 holder=locked_by_tts#" in result.stderr


def test_lock_whose_type_changed_is_not_ours(r):
    held = lock(r, heartbeat_interval_s=30).acquire()
    r.delete(b"gpu_lock:0")
    r.hset(b"gpu_lock:0", "x", "y")
    assert not held.release()
    assert client_mod.COUNTERS.ownership_violations == 1
    assert r.type(b"gpu_lock:0") == b"hash"


def test_release_needs_no_access_to_the_monitors_keys(r):
    # A worker's ACL user reaches the lock keys and their channel only.
    with acl_user(r, "worker", keys=["gpu_lock:*"], channels=["gpu_lock:*"], commands=["+@all"]) as worker:
        held = lock(worker.client, heartbeat_interval_s=30).acquire()
        assert held.finish("normal")
    assert not r.exists(b"gpu_lock:0")
    assert client_mod.COUNTERS.emergency_releases == 0


def test_decorator_holds_the_lock_for_the_call_and_release_for_task_releases_once(r):
    @gpu_lock(r, "gpu_lock:1", heartbeat_interval_s=30)
    def synthesize() -> bytes:
        return r.get(b"gpu_lock:1")

    assert synthesize().startswith(b"locked_by_synthesize#")
    assert not r.exists(b"gpu_lock:1")

    held = lock(r, task_id="celery-task-42", heartbeat_interval_s=30).acquire()
    assert release_for_task("celery-task-42")  # what a Celery on_failure handler would call
    assert not r.exists(b"gpu_lock:0")
    assert not release_for_task("celery-task-42")
    assert held.lost.is_set() is False


def test_monitor_sees_client_holdings_as_alive(r, settings):
    with lock(r, heartbeat_interval_s=0.1):
        first = r.get(b"gpu_lock:0:heartbeat")
        wait_for(lambda: r.get(b"gpu_lock:0:heartbeat") != first)  # a refresh, not only the first beat
        report = build(settings).run_pass()
    assert report.verdicts[0].holding.heartbeat.value == "alive"
    assert events(settings.audit_path) == []


def test_retried_try_after_a_lost_reply_finds_its_own_lock(r):
    # The first try succeeded, but the worker never heard: the retry must not wait on itself.
    held = lock(r, heartbeat_interval_s=30)
    assert held._try()
    assert held._try()
    assert lock(r, task_name="other")._try() is False
    assert r.get(b"gpu_lock:0") == held.value


# --- faults: Redis away, a failing callback, an unwritable critical log ----------------------------


@pytest.fixture
def own_redis():
    # Data survives a restart (AOF), as on a production Redis with persistence.
    with RedisServer(None, "--appendonly", "yes", "--appendfsync", "always") as own:
        yield own


def test_heartbeat_rides_out_a_redis_outage(own_redis):
    c = redis.Redis.from_url(own_redis.url, protocol=2)
    held = GpuLock(c, "gpu_lock:0", task_name="tts", heartbeat_interval_s=0.1).acquire()
    try:
        own_redis.stop()
        wait_for(lambda: client_mod.COUNTERS.heartbeat_failures >= 2)
        own_redis.start()
        before = c.get(b"gpu_lock:0:heartbeat")
        wait_for(lambda: c.get(b"gpu_lock:0:heartbeat") != before)
        assert not held.lost.is_set()
    finally:
        assert held.finish("normal")


def test_acquire_waits_out_a_redis_outage_within_max_wait(own_redis):
    c = redis.Redis.from_url(own_redis.url, protocol=2)
    own_redis.stop()
    restarted = threading.Timer(0.5, own_redis.start)
    restarted.start()
    try:
        held = GpuLock(c, "gpu_lock:0", task_name="tts", heartbeat_interval_s=30, max_wait_s=30).acquire()
    finally:
        restarted.join()
    assert c.get(b"gpu_lock:0") == held.value
    assert held.finish("normal")


def test_acquire_gives_up_when_redis_stays_down(own_redis):
    c = redis.Redis.from_url(own_redis.url, protocol=2)
    own_redis.stop()
    with pytest.raises(AcquireTimeoutError, match="gpu_lock:0: Redis unreachable"):
        GpuLock(c, "gpu_lock:0", task_name="tts", max_wait_s=0.3).acquire()


def test_failing_on_lost_callback_is_logged_not_raised(r):
    def on_lost(_lock):
        raise RuntimeError("callback bug")

    held = lock(r, on_lost=on_lost).acquire()
    r.set(b"gpu_lock:0", b"locked_by_someone_else")
    assert held.lost.wait(5)
    assert held._thread is not None
    held._thread.join(5)
    assert not held._thread.is_alive()  # it ended after reporting, without an unhandled exception


def test_unwritable_critical_log_is_logged_not_raised(tmp_path):
    with RedisServer() as own:
        c = redis.Redis.from_url(own.url, protocol=2)
        held = GpuLock(c, "gpu_lock:0", task_name="tts", heartbeat_interval_s=30, critical_path=str(tmp_path))
        held.acquire()
        own.stop()
        assert not held.finish("normal")  # a directory is no log file: the record goes to the log only
    assert list(tmp_path.iterdir()) == []


# --- one acquisition, one holding -------------------------------------------------------------------------


def test_a_reused_lock_object_takes_each_holding_with_a_new_token_and_a_beating_heartbeat(r):
    held = lock(r, heartbeat_interval_s=0.1)
    with held:
        first = held.value
    with held:
        assert held.value != first  # a new holding, never the last one's value
        assert r.get("gpu_lock:0") == held.value
        before = r.get("gpu_lock:0:heartbeat")
        wait_for(lambda: r.get("gpu_lock:0:heartbeat") != before)  # its heartbeat thread beats again
        assert not held.lost.is_set()


def test_a_lock_object_copied_into_a_forked_child_takes_its_own_token(r):
    import os

    held = lock(r)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: acquire with the parent's object, report the value it holds
        try:
            held.acquire()  # the parent's very object (redis-py reconnects after a fork)
            os.write(write, held.value)
            held.release()
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        value = f.read()
    os.waitpid(pid, 0)
    assert value.startswith(b"locked_by_tts#")
    assert value != held.value  # the same object, another process: another holding


def test_the_heartbeat_beats_on_through_a_slow_cleanup(r):
    beats: list[bytes | None] = []

    def cleanup() -> None:  # slower than two heartbeat intervals
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            beats.append(r.get("gpu_lock:0:heartbeat"))
            time.sleep(0.05)

    held = lock(r, heartbeat_interval_s=0.1, cleanup=cleanup)
    with held:
        pass
    assert None not in beats  # the key never ran out while the holder cleaned up
    assert len(set(beats)) > 1  # and was refreshed meanwhile
    assert not r.exists("gpu_lock:0")
