"""A holder record that promises heartbeats (DESIGN.md section 2): the holder wrote its first
heartbeat with the lock, so a missing heartbeat means it stopped, even where no pass ever saw one
and keyspace notifications are off. Without a matching record, nothing changes: a legacy holding
whose heartbeat is missing stays `none`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import redis
from helpers import build, events, hold, make_settings, wait_for

from monitor import protocol
from monitor.holding import Record, promised, track
from monitor.policy import Heartbeat
from monitor.scanner import Observation, read_locks
from monitor.worker.client import GpuLock

KEY = b"gpu_lock:0"
HB = protocol.heartbeat_key(KEY)
HOLDER = protocol.holder_key(KEY)

# A worker of the reference client that takes the lock, says so, and waits to be killed.
WORKER = textwrap.dedent(
    """
    import sys, time, redis
    from monitor.worker.client import GpuLock
    held = GpuLock(redis.Redis.from_url(sys.argv[1]), "gpu_lock:0", task_name="tts", heartbeat_interval_s=0.3,
                   timeout_s=600).acquire()
    print("held", held.value.decode(), flush=True)
    time.sleep(600)
    """
)


def take(r: redis.Redis, interval_s: float = 30.0) -> GpuLock:
    return GpuLock(r, KEY.decode(), task_name="tts", heartbeat_interval_s=interval_s).acquire()


def test_a_worker_killed_before_any_pass_is_dead_at_heartbeat_expiry_without_notifications(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path)
    monitor = build(settings)  # no watcher: a SCAN every pass, as with notifications off
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, redis_server.url], stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("held "), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not r.exists(HB), timeout_s=10)  # 2 x 0.3 s after the last beat
    assert r.exists(KEY)
    assert r.exists(HOLDER)
    report = monitor.run_pass()  # the first pass ever: no pass saw its heartbeat
    assert report is not None
    assert report.error is None
    released = events(settings.audit_path, "lock_released")
    assert [(e["heartbeat"], e["reason"], e["outcome"]) for e in released] == [("dead", "heartbeat_dead", "released")]
    assert not r.exists(KEY)
    assert not r.exists(HOLDER)  # the release takes the holder record with the lock


def test_a_live_holder_with_a_record_is_kept_and_its_heartbeat_judged_from_the_first_look(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path)
    monitor = build(settings)
    held = take(r)
    try:
        report = monitor.run_pass()
        assert report is not None
        (verdict,) = report.verdicts
        assert verdict.holding.heartbeat is Heartbeat.ALIVE
        assert verdict.holding.record.hb_seen  # the record proves the heartbeat this holding's
        assert r.get(KEY) == held.value
    finally:
        assert held.release()


def test_a_legacy_holding_after_a_record_it_did_not_write_keeps_heartbeat_none(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path)
    held = take(r)
    stale = r.get(HOLDER)
    held._stop_heartbeat()
    r.delete(HB)  # our holder is gone and its heartbeat expired,
    r.delete(KEY)  # then a blind emergency DEL: the record stays behind
    hold(r, 0)  # a legacy worker takes the GPU and writes no heartbeat
    assert r.get(HOLDER) == stale
    report = build(settings).run_pass()
    assert report is not None
    (verdict,) = report.verdicts
    assert verdict.holding.heartbeat is Heartbeat.NONE
    assert verdict.decision.action.value == "keep"
    assert r.exists(KEY)


def test_a_record_that_does_not_promise_heartbeats_proves_nothing(r):
    held = take(r)
    try:
        doc = protocol.parse_holder_record(r.get(HOLDER))
        assert doc is not None
        r.set(
            HOLDER,
            protocol.holder_record(task="tts", token=held.token, heartbeat_interval_s=30).replace(
                b'"heartbeats":true', b'"heartbeats":false'
            ),
            keepttl=True,
        )
        r.delete(HB)
        (obs,) = read_locks(r, [KEY])
        assert obs.holder == r.get(HOLDER)
        assert obs.record_atomic
        assert not promised(obs)
    finally:
        held.release()


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"v":2,"token":"t","task":"tts","heartbeats":true}',
        b'{"v":1,"task":"tts","heartbeats":true}',
    ],
)
def test_no_promise_from_what_is_not_a_record(raw):
    assert not protocol.promises(raw, protocol.lock_value("tts#t"))


def test_the_monitor_release_leaves_a_key_of_another_type_at_the_record(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path)
    held = take(r)
    held._stop_heartbeat()
    r.delete(HOLDER)
    r.hset(HOLDER, "x", "y")  # nobody's record
    r.delete(HB)  # the heartbeat stops; no record promises it, and no pass saw it
    r.pexpire(KEY, 1)
    wait_for(lambda: not r.exists(KEY))
    r.set(KEY, held.value, px=600_000)
    protocol_release = build(settings).reaper.release(KEY, held.value, int(r.pexpiretime(KEY)))
    assert protocol_release.outcome is protocol.Outcome.RELEASED
    assert r.type(HOLDER) == b"hash"


# --- the rule, pure ---------------------------------------------------------------------------------------

NOW = 1_000_000
REC = protocol.holder_record(task="tts", token="t", heartbeat_interval_s=30)
OTHER = protocol.holder_record(task="tts", token="u", heartbeat_interval_s=30)


def obs(**kw) -> Observation:
    base = Observation(KEY, NOW, b"locked_by_tts#t", NOW + 500_000, None, -2, None)
    return replace(base, **kw)


@pytest.mark.parametrize(
    ("observation", "tainted", "expected"),
    [
        (obs(), False, Heartbeat.NONE),  # legacy: never seen
        (obs(holder=REC, record_atomic=True), False, Heartbeat.DEAD),
        # A holding begun under an earlier holder's live writer: its last beat may be what ran out.
        (obs(holder=REC, record_atomic=True), True, Heartbeat.NONE),
        (obs(holder=REC), False, Heartbeat.NONE),  # read apart from the lock (a cluster): no promise
        (obs(holder=OTHER, record_atomic=True), False, Heartbeat.NONE),  # another holding's record
        (obs(hb_written=True), True, Heartbeat.NONE),
        (obs(hb_value=b"1", hb_expiry_ms=NOW + 1000, holder=REC, record_atomic=True), True, Heartbeat.ALIVE),
        (obs(hb_value=b"1", hb_expiry_ms=NOW + 1000), False, Heartbeat.ALIVE),
    ],
)
def test_promise_table(observation, tainted, expected):
    h = track(
        observation,
        None,
        after_ms=None,
        lock_timeout_ms=600_000,
        hb_ttl_ms=60_000,
        hb_timeout_ms=300_000,
        tainted=tainted,
    )
    assert h.heartbeat is expected


def test_a_promised_heartbeat_is_judged_stale_after_the_timeout():
    first = track(
        obs(hb_value=b"1", hb_expiry_ms=NOW + 10**9, holder=REC, record_atomic=True),
        None,
        after_ms=None,
        lock_timeout_ms=600_000,
        hb_ttl_ms=60_000,
        hb_timeout_ms=300_000,
        tainted=False,
    )
    assert first.record.hb_seen
    later = replace(obs(hb_value=b"1", hb_expiry_ms=NOW + 10**9, holder=REC, record_atomic=True), now_ms=NOW + 300_001)
    again = track(later, first.record, after_ms=None, lock_timeout_ms=600_000, hb_ttl_ms=60_000, hb_timeout_ms=300_000)
    assert again.heartbeat is Heartbeat.DEAD
    assert isinstance(first.record, Record)


def test_a_record_read_apart_from_its_lock_promises_nothing():
    from monitor.scanner import _observation

    raw = protocol.holder_record(task="tts", token="t", heartbeat_interval_s=30)
    value = protocol.lock_value("tts#t")
    fields = [value, NOW + 1000, None, -2, None, -3, raw, -3]
    assert promised(_observation(KEY, NOW, fields))
    # Redis Cluster, keys not hash-tagged: the record was read in another slot's script.
    assert not promised(_observation(KEY, NOW, fields, atomic=False))


def test_a_promise_never_condemns_a_holding_begun_under_an_earlier_live_writer(r, redis_server, tmp_path):
    """A legacy worker's lock runs out while its heartbeat thread still beats; the reference client
    takes the GPU; the legacy writer beats once more (a short EX) and ends. Its write runs out before
    the client's next beat: the missing heartbeat is not the promise broken, and the holder is kept."""
    settings = make_settings(redis_server.url, tmp_path, gpu_lock={"lock_timeout": 1})
    monitor = build(settings)
    r.set(KEY, b"locked_by_legacy", px=1500)
    r.set(HB, repr(time.time()), px=500)
    assert monitor.run_pass() is not None
    r.set(HB, repr(time.time()), px=500)  # the legacy writer beats on
    assert monitor.run_pass() is not None  # seen beating: this holding ran out with its writer alive
    while r.exists(KEY):  # its lock runs out under the running writer
        r.set(HB, repr(time.time()), px=500)
        time.sleep(0.05)
    held = GpuLock(r, KEY.decode(), task_name="tts", heartbeat_interval_s=30).acquire()
    try:
        r.set(HB, repr(time.time()), px=50)  # the legacy writer's last beat, after the acquire
        wait_for(lambda: not r.exists(HB))
        report = monitor.run_pass()
        assert report is not None
        assert released(settings) == []
        (verdict,) = report.verdicts
        assert verdict.holding.heartbeat is Heartbeat.NONE
        assert r.get(KEY) == held.value
    finally:
        held.release()


def released(settings) -> list:
    return events(settings.audit_path, "lock_released")
