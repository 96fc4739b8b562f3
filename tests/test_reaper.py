"""The release script against a real Redis: every outcome, the notice, and its errors."""

from __future__ import annotations

import json

import pytest
import redis
from helpers import beat, hold, next_message

from monitor.errors import ReleaseError
from monitor.reaper import HeartbeatCheck, Outcome, Reaper


@pytest.fixture
def reaper(r):
    return Reaper(r)


def test_release_deletes_lock_and_heartbeat_and_publishes_notice(r, reaper):
    key = hold(r, 0, "tts_synthesize")
    beat(r, key, value="1.5")
    pubsub = r.pubsub()
    pubsub.subscribe(b"gpu_lock:gpu_lock:0")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # the server has it before we go on
    result = reaper.release(key, b"locked_by_tts_synthesize", heartbeat=HeartbeatCheck.EQUAL, hb_value=b"1.5")
    assert result.outcome is Outcome.RELEASED
    assert result.current == b"locked_by_tts_synthesize"
    assert r.exists(key, key + b":heartbeat") == 0
    message = next_message(pubsub, 5)
    assert message["channel"] == b"gpu_lock:gpu_lock:0"
    notice = json.loads(message["data"])
    assert notice["event_type"] == "lock_released"
    assert notice["lock_key"] == "gpu_lock:0"
    assert notice["task_name"] == "tts_synthesize"
    assert notice["release_reason"] == "forced_by_monitor"
    assert isinstance(notice["timestamp"], float)
    pubsub.close()


def test_gone(r, reaper):
    result = reaper.release(b"gpu_lock:9", b"locked_by_x")
    assert (result.outcome, result.current) == (Outcome.GONE, None)


def test_holder_changed_deletes_nothing(r, reaper):
    key = hold(r, 0, "new_task")
    beat(r, key)
    result = reaper.release(key, b"locked_by_old_task")
    assert (result.outcome, result.current) == (Outcome.HOLDER_CHANGED, b"locked_by_new_task")
    assert r.get(key) == b"locked_by_new_task"
    assert r.exists(key + b":heartbeat")


@pytest.mark.parametrize("seen_pttl", [100_000, -1])
def test_same_value_reacquired_is_holder_changed(r, reaper, seen_pttl):
    # Existing workers' values are task names, so a re-acquire keeps the value; the TTL,
    # which only ever falls, shows the new holding.
    key = hold(r, 0, "tts", age_s=0)
    result = reaper.release(key, b"locked_by_tts", seen_pttl_ms=seen_pttl)
    assert result.outcome is Outcome.HOLDER_CHANGED
    assert r.exists(key)


def test_same_holding_with_falling_ttl_is_released(r, reaper):
    key = hold(r, 0, "tts", age_s=100)
    seen = r.pttl(key)
    assert reaper.release(key, b"locked_by_tts", seen_pttl_ms=seen).outcome is Outcome.RELEASED


def test_lock_without_ttl_seen_without_ttl_is_released(r, reaper):
    key = hold(r, 0, ttl=False)
    assert reaper.release(key, b"locked_by_tts", seen_pttl_ms=-1).outcome is Outcome.RELEASED


def test_heartbeat_appeared_is_revived(r, reaper):
    key = hold(r, 0)
    beat(r, key)
    result = reaper.release(key, b"locked_by_tts", heartbeat=HeartbeatCheck.ABSENT)
    assert result.outcome is Outcome.HEARTBEAT_REVIVED
    assert r.exists(key, key + b":heartbeat") == 2


def test_heartbeat_refreshed_is_revived(r, reaper):
    key = hold(r, 0)
    beat(r, key, value="2.0")
    result = reaper.release(key, b"locked_by_tts", heartbeat=HeartbeatCheck.EQUAL, hb_value=b"1.0")
    assert result.outcome is Outcome.HEARTBEAT_REVIVED
    assert r.exists(key)


def test_hard_cap_ignores_heartbeat(r, reaper):
    key = hold(r, 0)
    beat(r, key)
    assert reaper.release(key, b"locked_by_tts", heartbeat=HeartbeatCheck.ANY).outcome is Outcome.RELEASED
    assert r.exists(key, key + b":heartbeat") == 0


def test_non_string_heartbeat_counts_as_absent_and_is_left_alone(r, reaper):
    key = hold(r, 0)
    r.hset(key + b":heartbeat", "a", "b")
    assert reaper.release(key, b"locked_by_tts", heartbeat=HeartbeatCheck.ABSENT).outcome is Outcome.RELEASED
    assert r.type(key + b":heartbeat") == b"hash"


def test_binary_holder_released_exactly(r, reaper):
    key = b"gpu_lock:\xff\n"
    value = b'locked_by_\x00\xfe"\n'
    r.set(key, value)
    assert reaper.release(key, value).outcome is Outcome.RELEASED
    assert not r.exists(key)


def test_wrong_type_lock_is_a_release_error(r, reaper):
    r.hset(b"gpu_lock:0", "a", "b")
    with pytest.raises(ReleaseError, match="WRONGTYPE"):
        reaper.release(b"gpu_lock:0", b"locked_by_tts")
    assert r.type(b"gpu_lock:0") == b"hash"


def test_script_reloaded_after_script_flush(r, reaper):
    key = hold(r, 0)
    r.script_flush()
    assert reaper.release(key, b"locked_by_tts").outcome is Outcome.RELEASED


def test_acl_refusal_is_a_release_error(r, redis_server):
    r.acl_setuser("noeval", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-evalsha", "-eval"])
    key = hold(r, 0)
    limited = redis.Redis(host="127.0.0.1", port=redis_server.port, username="noeval", password="pw", protocol=2)
    try:
        with pytest.raises(ReleaseError):
            Reaper(limited).release(key, b"locked_by_tts")
    finally:
        limited.close()
        r.acl_deluser("noeval")
    assert r.exists(key)
