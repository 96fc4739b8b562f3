"""The holder record `<lock_key>:holder` (DESIGN.md section 2): written with the lock by the
reference client and GpuTask, expiring with it, and the progress marks kept in it."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from helpers import acl_user, wait_for

from monitor import protocol
from monitor.demo.redis_server import RedisServer
from monitor.worker import client as client_mod
from monitor.worker.client import GpuLock

KEY = b"gpu_lock:0"
HB = protocol.heartbeat_key(KEY)
HOLDER = protocol.holder_key(KEY)
UUID = "GPU-5f0c1a3e-8d2b-4c6f-9a7e-0b1c2d3e4f50"
BOOT = "6b4f3c0e-8b7a-4e0c-9d2e-1f0a2b3c4d5e"
PROCESS: protocol.ProcessFacts = {
    "host": "gpu-node-3",
    "pid": 4242,
    "pid_ns": 4026531836,
    "start_time": 81234567,
    "boot_id": BOOT,
}


@pytest.fixture(autouse=True)
def fresh_counters(monkeypatch):
    monkeypatch.setattr(client_mod, "COUNTERS", client_mod.Counters())


def lock(r: redis.Redis, **kw: Any) -> GpuLock:
    # A heartbeat every 30 s: no refresh runs during a test unless it asks for one.
    return GpuLock(r, KEY.decode(), task_name=kw.pop("task_name", "tts"), **{"heartbeat_interval_s": 30, **kw})


def record(r: redis.Redis) -> protocol.HolderRecord:
    parsed = protocol.parse_holder_record(r.get(HOLDER))
    assert parsed is not None, r.get(HOLDER)
    return parsed


def expiries(r: redis.Redis, *keys: bytes) -> list[int]:
    """Each key's absolute expiry in Redis-clock ms, all read in one script (PEXPIRETIME or TIME + PTTL)."""
    out = r.eval(protocol.READ_SCRIPT, len(keys), *keys)
    return [int(e) for e in out[3::2]]


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return seconds * 1000 + micros // 1000


def uptime_ticks() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")


# --- the format --------------------------------------------------------------------------------------


def test_builder_writes_every_field_in_order_and_parse_reads_it_back():
    raw = protocol.holder_record(
        task="tts_synthesize",
        token="9b1e2f3a4c5d",
        heartbeat_interval_s=60,
        task_id="c0ffee",
        gpu_uuid=UUID,
        progress_timeout_s=120,
        process=PROCESS,
    )
    doc = json.loads(raw)
    assert list(doc) == list(protocol.HOLDER_FIELDS)
    assert doc == {
        "v": 1,
        "host": "gpu-node-3",
        "pid": 4242,
        "pid_ns": 4026531836,
        "start_time": 81234567,
        "gpu_uuid": UUID,
        "task": "tts_synthesize",
        "task_id": "c0ffee",
        "token": "9b1e2f3a4c5d",
        "heartbeat_interval_s": 60,
        "heartbeats": True,
        "progress_ms": None,
        "progress_timeout_s": 120,
        "boot_id": BOOT,
    }
    assert b" " not in raw  # compact: it is read once per lock per pass
    assert protocol.parse_holder_record(raw) == doc
    assert protocol.parse_holder_record(raw.decode()) == doc
    assert set(protocol.HolderRecord.__annotations__) == set(protocol.HOLDER_FIELDS)


def test_builder_describes_this_process_unless_told():
    doc = json.loads(protocol.holder_record(task="t", token="x", heartbeat_interval_s=1))
    assert doc["host"] == socket.gethostname()
    assert doc["pid"] == os.getpid()
    assert doc["pid_ns"] == os.stat("/proc/self/ns/pid").st_ino
    assert doc["start_time"] == protocol.process_start_time(os.getpid())
    assert doc["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_builder_refuses_what_no_reader_would_take():
    with pytest.raises(ValueError, match="Out of range"):
        protocol.holder_record(task="t", token="x", heartbeat_interval_s=math.nan, process=PROCESS)
    with pytest.raises(ValueError, match="readers ignore one over 65536"):
        protocol.holder_record(task="t" * 70_000, token="x", heartbeat_interval_s=1, process=PROCESS)


GOOD = json.loads(protocol.holder_record(task="tts", token="abc", heartbeat_interval_s=1, process=PROCESS))


def variant(**fields: Any) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        None,
        0,
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b'"a string"',
        b"{",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than json can go
        b'{"v": 1, "token": "abc", "pid": NaN}',
        b'{"v": 1, "token": "abc", "pid": 1' + b"0" * 5000 + b"}",  # more digits than int() takes
        variant(v=2),
        variant(v="1"),
        variant(v=True),
        variant(v=None),
        variant(token=""),
        variant(token=7),
        variant(token=None),
        b'{"token": "abc"}',
        b"x" * (protocol.HOLDER_RECORD_MAX_BYTES + 1),
        variant(host="h" * protocol.HOLDER_RECORD_MAX_BYTES),
    ],
    ids=repr,
)
def test_parse_takes_garbage_as_no_record(raw):
    assert protocol.parse_holder_record(raw) is None


@pytest.mark.parametrize(
    ("fields", "reads"),
    [
        ({"pid": "4242"}, {"pid": None}),
        ({"pid": True}, {"pid": None}),
        ({"pid": 0}, {"pid": None}),
        ({"pid": -1}, {"pid": None}),
        ({"pid": 4242.0}, {"pid": 4242}),  # Redis's cjson writes numbers back as doubles
        ({"pid": 4242.5}, {"pid": None}),
        ({"pid_ns": [1]}, {"pid_ns": None}),
        ({"start_time": 0}, {"start_time": 0}),
        ({"start_time": -5}, {"start_time": None}),
        ({"host": 7}, {"host": None}),
        ({"gpu_uuid": {"a": 1}}, {"gpu_uuid": None}),
        ({"heartbeats": "yes"}, {"heartbeats": False}),
        ({"heartbeats": 1}, {"heartbeats": False}),
        ({"heartbeat_interval_s": 0}, {"heartbeat_interval_s": None}),
        ({"heartbeat_interval_s": "60"}, {"heartbeat_interval_s": None}),
        ({"progress_ms": 1.7e12}, {"progress_ms": 1_700_000_000_000}),
        ({"progress_ms": -1}, {"progress_ms": None}),
        ({"progress_timeout_s": 0.25}, {"progress_timeout_s": 0.25}),
        ({"progress_timeout_s": False}, {"progress_timeout_s": None}),
        ({"task": None, "task_id": 12}, {"task": None, "task_id": None}),
    ],
)
def test_parse_reads_a_field_of_the_wrong_type_as_absent(fields, reads):
    assert protocol.parse_holder_record(variant(**fields)) == {**GOOD, **reads}


def test_parse_keeps_only_the_fields_it_knows():
    parsed = protocol.parse_holder_record(variant(future_field="x"))
    assert parsed == GOOD


def test_parse_reads_a_number_too_large_for_a_float_as_absent():
    parsed = protocol.parse_holder_record(b'{"v":1,"token":"abc","heartbeat_interval_s":1e400,"pid":1e400}')
    assert parsed is not None
    assert (parsed["heartbeat_interval_s"], parsed["pid"]) == (None, None)  # json reads both as inf


@pytest.mark.parametrize(
    ("task", "token", "value", "matches"),
    [
        ("tts", "abc", b"locked_by_tts#abc", True),
        ("a#b", "abc", b"locked_by_a#b#abc", True),  # a task name may hold the separator
        ("tts", "abc", b"locked_by_tts#abd", False),  # the next holding of the same task
        ("tts", "abc", b"locked_by_tts", False),  # a legacy worker's lock beside a stale record
        (None, "abc", b"locked_by_None#abc", False),
    ],
)
def test_a_record_belongs_to_the_lock_value_it_was_written_with(task, token, value, matches):
    parsed = protocol.parse_holder_record(variant(task=task, token=token))
    assert parsed is not None
    assert protocol.holder_record_matches(parsed, value) is matches


@pytest.mark.parametrize(
    ("env", "uuid"),
    [
        ({"CUDA_VISIBLE_DEVICES": UUID}, UUID),
        ({"CUDA_VISIBLE_DEVICES": f" {UUID} "}, UUID),
        ({"CUDA_VISIBLE_DEVICES": UUID.lower().replace("gpu-", "GPU-")}, UUID.lower().replace("gpu-", "GPU-")),
        ({"CUDA_VISIBLE_DEVICES": "MIG-" + UUID[4:]}, "MIG-" + UUID[4:]),
        ({"CUDA_VISIBLE_DEVICES": f"MIG-{UUID}/1/0"}, f"MIG-{UUID}/1/0"),  # drivers before R470
        ({"CUDA_VISIBLE_DEVICES": "0"}, None),  # an index: which GPU it is, only CUDA knows
        ({"CUDA_VISIBLE_DEVICES": f"{UUID},GPU-00000000-0000-0000-0000-000000000000"}, None),
        ({"CUDA_VISIBLE_DEVICES": "GPU-5f0c1a3e"}, None),  # a prefix CUDA accepts; NVML names none
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({}, None),
    ],
)
def test_the_gpu_is_known_when_cuda_visible_devices_names_one_uuid(env, uuid):
    assert protocol.visible_gpu_uuid(env) == uuid


def test_process_facts_of_another_process_and_of_none():
    # A command name with spaces and parentheses: the stat line must be split after the last ")".
    child = subprocess.Popen(
        [sys.executable, "-c", "open('/proc/self/comm','w').write('a) b (c'); import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        wait_for(lambda: Path(f"/proc/{child.pid}/comm").read_text().strip() == "a) b (c")
        started = protocol.process_start_time(child.pid)
        assert started is not None
        assert protocol.process_start_time() is not None
        assert protocol.process_start_time() <= started  # this test's process is the older
        assert abs(started - uptime_ticks()) < 30 * os.sysconf("SC_CLK_TCK")  # started just now
        assert protocol.pid_namespace(child.pid) == protocol.pid_namespace()
    finally:
        child.communicate(timeout=10)
    assert protocol.process_start_time(child.pid) is None  # reaped: no /proc entry
    assert protocol.pid_namespace(child.pid) is None


# --- written with the lock, expiring with it -----------------------------------------------------------


def test_the_record_is_set_in_the_same_script_as_the_lock(r, redis_server):
    """MONITOR lists each command a script runs, tagged lua, right after the script's call: the
    record's SET must come between the lock's SET and the next command of any client."""
    watcher = redis.Redis.from_url(redis_server.url, protocol=2)
    seen: list[dict[str, Any]] = []
    with watcher.monitor() as feed:
        held = lock(r).acquire()
        r.ping()  # the end mark: every command of the acquire came before it
        for command in feed.listen():
            seen.append(command)
            if command["command"] == "PING":
                break
    held.release()
    watcher.close()
    sets = [i for i, c in enumerate(seen) if c["command"].startswith(("SET gpu_lock:0 ", "SET gpu_lock:0:holder "))]
    assert [seen[i]["command"].split()[1] for i in sets] == ["gpu_lock:0", "gpu_lock:0:holder"]  # once each
    first, last = sets
    assert all(c["client_type"] == "lua" for c in seen[first : last + 1]), seen[first : last + 1]


def test_no_reader_sees_a_lock_without_its_record(r):
    """Locks taken and released back to back (each release wakes the next waiter) while another
    client reads lock and record together, in one script, as fast as it can."""
    stop = threading.Event()
    samples: list[list[bytes | None]] = []
    both = "return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or false}"

    def read() -> None:
        reader = redis.Redis(connection_pool=r.connection_pool)
        while not stop.is_set():
            samples.append(reader.eval(both, 2, KEY, HOLDER))

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for n in range(40):
            lock(r, task_name=f"task{n % 3}").acquire().release()
    finally:
        stop.set()
        thread.join(10)
    held = [(value, raw) for value, raw in samples if value]
    assert held, "the reader never saw a lock"
    for value, raw in held:
        parsed = protocol.parse_holder_record(raw)
        assert parsed is not None, raw
        assert protocol.holder_record_matches(parsed, value), (value, raw)


def test_the_record_expires_with_the_lock_to_the_millisecond(r):
    held = lock(r, timeout_s=30).acquire()
    lock_expiry, record_expiry = expiries(r, KEY, HOLDER)
    assert lock_expiry == record_expiry == held.expiry_ms
    # A retried try after a lost reply finds its own lock: the record is written again, at the
    # lock's first expiry, not a fresh TTL.
    time.sleep(0.01)
    assert held._try()
    assert expiries(r, KEY, HOLDER) == [lock_expiry, lock_expiry]
    held.release()


def test_without_set_pxat_the_record_still_expires_with_the_lock(r):
    # Before Redis 6.2 SET has no PXAT: the script falls back to the lock's PTTL (same ms but for a
    # millisecond boundary between the two commands).
    script = protocol.ACQUIRE_WITH_HOLDER_SCRIPT.replace("'PXAT'", "'NO-SUCH-OPTION'")
    assert script != protocol.ACQUIRE_WITH_HOLDER_SCRIPT
    expiry = r.eval(script, 3, KEY, HB, HOLDER, b"locked_by_tts#abc", 30_000, "1.0", 1000, b"{}")
    lock_expiry, record_expiry = expiries(r, KEY, HOLDER)
    assert lock_expiry == expiry
    assert abs(record_expiry - lock_expiry) <= 1


def test_a_persistent_lock_of_ours_still_gets_a_record_that_expires(r):
    # Found our own value with no TTL (somebody PERSISTed it after a lost reply): the record is not
    # made persistent with it.
    r.set(KEY, b"locked_by_tts#abc")
    args = [b"locked_by_tts#abc", 5000, "1.0", 1000, b"{}"]
    assert r.eval(protocol.ACQUIRE_WITH_HOLDER_SCRIPT, 3, KEY, HB, HOLDER, *args) == -1
    assert 0 < r.pttl(HOLDER) <= 5000


def test_an_expired_lock_takes_its_record_with_it(r):
    held = lock(r, timeout_s=0.4, heartbeat_interval_s=0.05).acquire()
    both = "return {redis.call('EXISTS', KEYS[1]), redis.call('EXISTS', KEYS[2])}"
    samples = []
    while True:
        samples.append(r.eval(both, 2, KEY, HOLDER))
        if samples[-1] == [0, 0] or len(samples) > 10_000:
            break
        assert samples[-1] == [1, 1], samples[-1]
        time.sleep(0.005)
    assert samples[-1] == [0, 0]
    assert held.lost.wait(5)  # the heartbeat found the lock gone
    held.release()


# --- released: the record goes with the holding --------------------------------------------------------


def test_release_deletes_the_holdings_record(r):
    held = lock(r).acquire()
    assert r.exists(HOLDER)
    assert held.release()
    assert r.exists(KEY, HB, HOLDER) == 0


def test_a_lock_taken_from_us_leaves_no_stale_record_of_ours(r):
    held = lock(r).acquire()
    r.set(KEY, b"locked_by_legacy")  # a legacy worker's blind emergency DEL, then its SET
    assert not held.release()
    assert r.get(KEY) == b"locked_by_legacy"
    assert not r.exists(HOLDER)  # ours is gone: the legacy holding has none


def test_release_leaves_the_next_holders_record(r):
    held = lock(r).acquire()
    nxt = lock(r, task_name="asr")
    # The next holder took the lock between our release and our record's deletion.
    r.delete(KEY)
    assert nxt._try()
    theirs = r.get(HOLDER)
    assert not held.release()
    assert r.get(HOLDER) == theirs
    assert record(r)["token"] == nxt.token
    assert nxt.release()


def test_a_record_that_cannot_be_deleted_does_not_fail_the_release(r, caplog):
    held = lock(r).acquire()
    r.delete(HOLDER)
    r.hset(HOLDER, "x", "y")  # not a record: the script leaves it
    assert held.release()
    assert r.type(HOLDER) == b"hash"
    r.delete(HOLDER)

    held = lock(r).acquire()
    # A worker whose ACL reaches the lock and its heartbeat only: the record's deletion is refused.
    with (
        acl_user(r, "nohold", keys=["gpu_lock:0", "gpu_lock:0:heartbeat"], channels=["*"], commands=["+@all"]) as user,
        caplog.at_level(logging.INFO, logger="gpulock_monitor.client"),
    ):
        assert held.release(client=user.client)
    assert "holder_record_left lock_key=gpu_lock:0 error=" in caplog.text
    assert not r.exists(KEY)
    assert r.exists(HOLDER)  # left to expire at the lock's expiry


# --- progress marks --------------------------------------------------------------------------------------


def test_progress_writes_redis_time_into_the_record_with_one_script_call(r):
    held = lock(r, progress_timeout_s=90).acquire()
    try:
        before = record(r)
        assert before["progress_ms"] is None
        assert before["progress_timeout_s"] == 90
        expiry = expiries(r, HOLDER)
        start = redis_ms(r)
        assert held.progress()
        end = redis_ms(r)
        after = record(r)
        assert start <= after["progress_ms"] <= end
        assert held.progress_ms == after["progress_ms"]
        assert {**after, "progress_ms": None} == before  # nothing else changed
        assert expiries(r, HOLDER) == expiry  # nor the record's expiry
        # Once the script is loaded (the first call's NOSCRIPT and SCRIPT LOAD), a mark is one call.
        r.config_resetstat()
        assert held.progress()
        stats = r.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1
        assert {name for name in stats if not name.startswith(("cmdstat_info", "cmdstat_config"))} == {
            "cmdstat_evalsha",
            "cmdstat_get",  # inside the script: the lock, the record
            "cmdstat_time",
            "cmdstat_set",
        }
    finally:
        held.release()


def test_progress_marks_only_move_forward(r):
    with lock(r) as held:
        marks = []
        for _ in range(5):
            assert held.progress()
            marks.append(record(r)["progress_ms"])
            time.sleep(0.003)
        assert marks == sorted(marks)
        assert marks[-1] > marks[0]
        # After a failover to a server whose clock is behind, a mark never goes back.
        ahead = marks[-1] + 600_000
        doc = json.loads(r.get(HOLDER))
        r.set(HOLDER, json.dumps({**doc, "progress_ms": ahead}), keepttl=True)
        assert held.progress()
        assert record(r)["progress_ms"] == ahead == held.progress_ms


def test_progress_is_refused_once_the_lock_is_someone_elses(r, caplog):
    held = lock(r).acquire()
    assert held.progress()
    mark = held.progress_ms
    r.set(KEY, b"locked_by_someone_else")  # expired and re-acquired, say (by a legacy worker)
    raw, ttl = r.get(HOLDER), expiries(r, HOLDER)
    with caplog.at_level(logging.WARNING, logger="gpulock_monitor.client"):
        assert held.progress() is False
        assert held.progress() is False
    assert (r.get(HOLDER), expiries(r, HOLDER)) == (raw, ttl)  # nothing written
    assert held.progress_ms == mark
    said = [rec.getMessage() for rec in caplog.records if rec.name == "gpulock_monitor.client"]
    assert said == [f"progress_refused lock_key=gpu_lock:0 holder={held.value.decode()} reason=not_owner"]
    held.release()
    assert held.progress() is False  # released: nothing to mark


def test_progress_is_refused_without_this_holdings_record(r):
    held = lock(r).acquire()
    other = protocol.holder_record(task="tts", token="someone", heartbeat_interval_s=1)
    r.set(HOLDER, other, keepttl=True)
    assert held.progress() is False
    assert r.get(HOLDER) == other
    r.set(HOLDER, b"{not json", keepttl=True)
    assert held.progress() is False
    r.delete(HOLDER)
    assert held.progress() is False
    assert not r.exists(HOLDER)
    assert r.get(KEY) == held.value  # the lock itself is untouched
    held.release()


def test_progress_rides_out_redis_errors(tmp_path):
    with RedisServer() as own:
        c = redis.Redis.from_url(own.url, protocol=2)
        held = GpuLock(c, "gpu_lock:0", task_name="tts", heartbeat_interval_s=30).acquire()
        own.stop()
        assert held.progress() is False  # the work goes on; the mark is lost
        assert held.progress_failures == 1


def test_options_are_checked_when_the_lock_is_made(r):
    with pytest.raises(ValueError, match="gpu_uuid '0' is not a GPU UUID"):
        lock(r, gpu_uuid="0")
    with pytest.raises(ValueError, match="progress_timeout_s must be positive"):
        lock(r, progress_timeout_s=0)
    with lock(r, gpu_uuid=UUID, task_id="job-1") as held:
        assert record(r)["gpu_uuid"] == UUID
        assert record(r)["task_id"] == "job-1"
        assert record(r)["token"] == held.token


# --- a real worker process -------------------------------------------------------------------------------

# Takes the lock, marks progress `marks` times, says so, then stops marking while its heartbeat
# thread goes on (a hung work loop), until told to release.
WORKER = """
import os, sys, time
import redis
from monitor.worker.client import GpuLock
r = redis.Redis.from_url(sys.argv[1], protocol=2)
held = GpuLock(r, "gpu_lock:0", task_name="tts", task_id="job-7", heartbeat_interval_s=0.1,
               progress_timeout_s=5).acquire()
for _ in range(int(sys.argv[2])):
    assert held.progress()
    time.sleep(0.01)
print("held", os.getpid(), flush=True)
sys.stdin.readline()
assert held.release()
"""


def run_worker(command: list[str], url: str, marks: int) -> subprocess.Popen[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": UUID}
    return subprocess.Popen(
        [*command, sys.executable, "-c", WORKER, url, str(marks)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def finish(worker: subprocess.Popen[str]) -> None:
    assert worker.stdin is not None
    worker.stdin.write("\n")
    worker.stdin.flush()
    assert worker.wait(timeout=30) == 0


def test_a_worker_process_record_names_its_process_and_its_stalled_progress(r, redis_server):
    worker = run_worker([], redis_server.url, marks=3)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().split() == ["held", str(worker.pid)]
        rec = record(r)
        assert rec["pid"] == worker.pid
        assert rec["host"] == socket.gethostname()
        assert rec["pid_ns"] == os.stat(f"/proc/{worker.pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino
        assert rec["start_time"] == protocol.process_start_time(worker.pid)
        assert abs(rec["start_time"] - uptime_ticks()) < 30 * os.sysconf("SC_CLK_TCK")
        assert (rec["task"], rec["task_id"], rec["gpu_uuid"]) == ("tts", "job-7", UUID)
        assert protocol.holder_record_matches(rec, r.get(KEY))
        assert (rec["heartbeats"], rec["heartbeat_interval_s"], rec["progress_timeout_s"]) == (True, 0.1, 5)
        # Its work loop stopped marking; its heartbeat thread did not.
        mark, beat = rec["progress_ms"], r.get(HB)
        assert mark is not None
        assert mark <= redis_ms(r)
        wait_for(lambda: r.get(HB) != beat)
        wait_for(lambda: r.get(HB) != beat)
        assert record(r)["progress_ms"] == mark
    finally:
        finish(worker)
    assert r.exists(KEY, HB, HOLDER) == 0


# A process in a pid namespace of its own, as in a container (unprivileged, through a user namespace).
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]


def test_a_worker_in_another_pid_namespace_says_so(r, redis_server):
    """A container's pid means nothing on the host: its record carries its own namespace."""
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged pid namespaces here: {probe.stderr.decode().strip()}")
    worker = run_worker(UNSHARE, redis_server.url, 0)
    try:
        assert worker.stdout is not None
        inner_pid = int(worker.stdout.readline().split()[1])
        # unshare forked the worker: its pid on the host is unshare's child.
        (host_pid,) = map(int, Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split())
        rec = record(r)
        assert rec["pid"] == inner_pid != host_pid
        assert rec["pid_ns"] == os.stat(f"/proc/{host_pid}/ns/pid").st_ino
        assert rec["pid_ns"] != protocol.pid_namespace()
        assert rec["start_time"] == protocol.process_start_time(host_pid)
    finally:
        finish(worker)


# --- GpuTask --------------------------------------------------------------------------------------------

CELERY_APP = """
import os, time
from celery import Celery
from monitor.worker.celery_task import GpuTask

URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:1")
app = Celery("holder_tasks", broker=f"{URL}/1", backend=f"{URL}/1")
app.conf.update(
    gpu_lock_redis_url=f"{URL}/0",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(base=GpuTask, bind=True, gpu_lock_options={"heartbeat_interval_s": 0.2, "progress_timeout_s": 30})
def work(self, gpu_id, seconds=0.0):
    lock = self.gpu_lock
    before = lock.client.get(lock.holder_key).decode()
    marked = lock.progress()
    after = lock.client.get(lock.holder_key).decode()
    time.sleep(seconds)
    return {"pid": os.getpid(), "id": self.request.id, "value": lock.value.decode(), "before": before,
            "marked": marked, "progress_ms": lock.progress_ms, "after": after}
"""


@pytest.fixture(scope="module")
def celery_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("celery")
    where = tmp_path_factory.mktemp("holder_celery")
    (where / "holder_celery_app.py").write_text(CELERY_APP)
    return where


@pytest.fixture
def eager(celery_dir: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(celery_dir))
    tasks = importlib.import_module("holder_celery_app")
    tasks.app.conf.update(task_always_eager=True, gpu_lock_redis_url=redis_server.url)
    yield tasks
    tasks.app.conf.update(task_always_eager=False)


def test_gpu_task_writes_a_record_and_marks_progress_in_it(eager, r):
    result = eager.work.apply(kwargs={"gpu_id": 0})
    out = result.get()
    before = protocol.parse_holder_record(out["before"])
    after = protocol.parse_holder_record(out["after"])
    assert before is not None
    assert after is not None
    assert protocol.holder_record_matches(before, out["value"].encode())
    assert (before["task"], before["task_id"], before["pid"]) == ("holder_celery_app.work", result.id, os.getpid())
    assert (before["progress_ms"], before["progress_timeout_s"]) == (None, 30)
    assert out["marked"] is True
    assert after["progress_ms"] == out["progress_ms"] is not None
    assert r.exists(KEY, HB, HOLDER) == 0  # released with the task


@pytest.mark.slow
def test_gpu_task_in_a_prefork_worker_names_the_pool_process(celery_dir: Path, tmp_path: Path):
    pytest.importorskip("celery")
    with RedisServer() as own:  # its own: the shared one is flushed under a running worker
        base = own.url.rsplit("/", 1)[0]
        env = {**os.environ, "TEST_REDIS_URL": base, "PYTHONPATH": str(celery_dir)}
        args = ["-A", "holder_celery_app", "worker", "--pool=prefork", "--concurrency=1", "--loglevel=INFO"]
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with (tmp_path / "worker.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", *args], cwd=celery_dir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        locks = redis.Redis.from_url(f"{base}/0", protocol=2)
        try:
            from celery import Celery

            client_app = Celery("holder_tasks", broker=f"{base}/1", backend=f"{base}/1")
            result = client_app.send_task("holder_celery_app.work", kwargs={"gpu_id": 0, "seconds": 1.0})
            raw = wait_for(lambda: locks.get(HOLDER), timeout_s=60)
            seen = protocol.parse_holder_record(raw)
            out = result.get(timeout=60)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            locks.close()
    assert seen is not None
    assert seen["pid"] == out["pid"] != proc.pid  # the pool process that ran the task
    assert seen["task_id"] == out["id"] == result.id
    assert seen["start_time"] is not None
    assert seen["pid_ns"] == protocol.pid_namespace()
    assert out["marked"] is True
