"""The release script against a real Redis: every outcome, the notice, and its errors.

The holding to release is named by its identity as a pass reads it (value and absolute expiry);
each test reads it with the same read script the daemon uses.
"""

from __future__ import annotations

import json
import time

import pytest
import redis
from helpers import acl_user, beat, hold, next_message, subscribed, wait_for

from monitor import protocol
from monitor.demo.redis_server import RedisServer, free_port
from monitor.errors import ReleaseError
from monitor.protocol import HeartbeatCheck, Outcome
from monitor.reaper import Reaper
from monitor.scanner import Observation, read_locks


@pytest.fixture
def reaper(r):
    return Reaper(r)


def look(r, key: bytes) -> Observation:
    (obs,) = read_locks(r, [key])
    return obs


def release_seen(reaper: Reaper, obs: Observation, check: HeartbeatCheck = HeartbeatCheck.CHECK):
    """Release the holding `obs` saw, as the daemon does."""
    assert obs.value is not None
    return reaper.release(
        obs.key, obs.value, obs.expiry_ms, heartbeat=check, hb_value=obs.hb_value, hb_expiry_ms=obs.hb_expiry_ms
    )


def test_release_deletes_lock_and_heartbeat_and_publishes_notice(r, reaper):
    key = hold(r, 0, "tts_synthesize")
    beat(r, key, value="1.5")
    with subscribed(r, protocol.release_channel(key)) as pubsub:
        result = release_seen(reaper, look(r, key))
        assert result.outcome is Outcome.RELEASED
        assert result.current == b"locked_by_tts_synthesize"
        assert result.notice_error is None
        assert r.exists(key, key + b":heartbeat") == 0
        message = next_message(pubsub, 5)
        assert message["channel"] == b"gpu_lock:gpu_lock:0"
        notice = json.loads(message["data"])
        assert notice["event_type"] == "lock_released"
        assert notice["lock_key"] == "gpu_lock:0"
        assert notice["task_name"] == "tts_synthesize"
        assert notice["release_reason"] == "forced_by_monitor"
        assert isinstance(notice["timestamp"], float)


def test_release_of_a_lock_that_is_gone_answers_gone(r, reaper):
    result = reaper.release(b"gpu_lock:9", b"locked_by_x", 123)
    assert (result.outcome, result.current) == (Outcome.GONE, None)


def test_holder_changed_deletes_nothing(r, reaper):
    key = hold(r, 0, "old_task")
    seen = look(r, key)
    hold(r, 0, "new_task")
    beat(r, key)
    result = release_seen(reaper, seen, HeartbeatCheck.ANY)
    assert (result.outcome, result.current) == (Outcome.HOLDER_CHANGED, b"locked_by_new_task")
    assert r.get(key) == b"locked_by_new_task"
    assert r.exists(key + b":heartbeat")


@pytest.mark.parametrize("pause_s", [0.0, 0.01, 1.2])
@pytest.mark.parametrize("new_ex_ms", [600_000, 30_000, None], ids=["same-ex", "shorter-ex", "no-ttl"])
def test_same_value_reacquired_after_any_pause_is_holder_changed(r, reaper, pause_s, new_ex_ms):
    # Values are task names: the holding observed ended and the same task took the lock again,
    # however long the daemon (or an operator at a prompt) paused between reading and releasing.
    key = hold(r, 0, "tts", age_s=500)
    seen = look(r, key)
    r.delete(key)
    if pause_s:
        time.sleep(pause_s)  # the pause is the point: the old "PTTL only falls" check failed after it
    r.set(key, b"locked_by_tts", px=new_ex_ms)
    result = release_seen(reaper, seen, HeartbeatCheck.ANY)
    assert result.outcome is Outcome.HOLDER_CHANGED
    assert r.get(key) == b"locked_by_tts"


def test_same_holding_is_released_however_long_after_the_read(r, reaper):
    key = hold(r, 0, "tts", age_s=100)
    seen = look(r, key)
    time.sleep(0.05)  # the TTL falls meanwhile: still the same holding
    assert release_seen(reaper, seen).outcome is Outcome.RELEASED


def test_lock_without_ttl_seen_without_ttl_is_released(r, reaper):
    key = hold(r, 0, ttl=False)
    assert release_seen(reaper, look(r, key)).outcome is Outcome.RELEASED


def test_repeated_call_answers_what_the_first_did(r, reaper):
    # A reply lost on the way back: the caller asks again with the same identity.
    key = hold(r, 0)
    seen = look(r, key)
    with subscribed(r, protocol.release_channel(key)) as pubsub:
        assert release_seen(reaper, seen).outcome is Outcome.RELEASED
        again = release_seen(reaper, seen)
        assert (again.outcome, again.current) == (Outcome.RELEASED, b"locked_by_tts")
        assert next_message(pubsub, 5) is not None
        assert pubsub.get_message(timeout=0.2) is None  # one notice, not two


def test_repeated_call_after_a_same_value_retake_answers_released_and_spares_the_new_holding(r, reaper):
    # Without a TTL, value and expiry (-1) repeat exactly: the attempt, not the lock, is what the
    # tombstone remembers. A new attempt on the new holding releases it.
    key = hold(r, 0, ttl=False)
    seen = look(r, key)
    with subscribed(r, protocol.release_channel(key)) as pubsub:
        assert release_seen(reaper, seen).outcome is Outcome.RELEASED
        hold(r, 0, ttl=False)
        assert release_seen(reaper, seen).outcome is Outcome.RELEASED  # what the first call did
        assert r.exists(key)
        assert next_message(pubsub, 5) is not None
        assert pubsub.get_message(timeout=0.2) is None
        again = reaper.release(key, b"locked_by_tts", -1, attempt="monitor:2")
        assert again.outcome is Outcome.RELEASED
        assert not r.exists(key)


def test_tombstone_of_another_attempt_does_not_answer(r, reaper):
    # The lock was released by someone else (an operator, a worker): the monitor's own repeated
    # attempt must not claim that release.
    key = hold(r, 0)
    seen = look(r, key)
    assert reaper.release(key, seen.value, seen.expiry_ms, attempt="manual:1").outcome is Outcome.RELEASED
    assert reaper.release(key, seen.value, seen.expiry_ms, attempt="monitor:1").outcome is Outcome.GONE


@pytest.mark.parametrize(("check", "mark"), [(HeartbeatCheck.ANY, b"+released"), (HeartbeatCheck.CHECK, b"-released")])
def test_release_marks_whether_a_live_heartbeat_was_ignored(r, reaper, check, mark):
    # The next holding must know an earlier heartbeat writer may live on (holding.taints).
    key = hold(r, 0)
    beat(r, key)
    assert release_seen(reaper, look(r, key), check).outcome is Outcome.RELEASED
    assert r.get(protocol.holding_key(key)) == mark


def test_heartbeat_appeared_is_revived(r, reaper):
    key = hold(r, 0)
    seen = look(r, key)
    beat(r, key)
    assert release_seen(reaper, seen).outcome is Outcome.HEARTBEAT_REVIVED
    assert r.exists(key, key + b":heartbeat") == 2


def test_heartbeat_rewritten_is_revived(r, reaper):
    key = hold(r, 0)
    beat(r, key, value="1.0")
    seen = look(r, key)
    beat(r, key, value="2.0")
    assert release_seen(reaper, seen).outcome is Outcome.HEARTBEAT_REVIVED
    assert r.exists(key)


def test_heartbeat_refreshed_by_expire_alone_is_revived(r, reaper):
    key = hold(r, 0)
    beat(r, key, value="1.0", interval_s=30)
    seen = look(r, key)
    r.pexpire(key + b":heartbeat", 120_000)  # value unchanged, expiry moved: a refresh
    assert release_seen(reaper, seen).outcome is Outcome.HEARTBEAT_REVIVED
    assert r.exists(key)


def test_heartbeat_that_expired_since_the_read_is_still_dead(r, reaper):
    key = hold(r, 0)
    beat(r, key, value="1.0", interval_s=0.025)
    seen = look(r, key)
    wait_for(lambda: not r.exists(key + b":heartbeat"))
    result = release_seen(reaper, seen)
    assert result.outcome is Outcome.RELEASED
    assert not r.exists(key)


def test_hard_cap_ignores_heartbeat(r, reaper):
    key = hold(r, 0)
    seen = look(r, key)
    beat(r, key)
    assert release_seen(reaper, seen, HeartbeatCheck.ANY).outcome is Outcome.RELEASED
    assert r.exists(key, key + b":heartbeat") == 0


def test_non_string_heartbeat_counts_as_absent_and_is_left_alone(r, reaper):
    key = hold(r, 0)
    r.hset(key + b":heartbeat", "a", "b")
    assert release_seen(reaper, look(r, key)).outcome is Outcome.RELEASED
    assert r.type(key + b":heartbeat") == b"hash"


def test_binary_holder_released_exactly(r, reaper):
    key = b"gpu_lock:\xff\n"
    value = b'locked_by_\x00\xfe"\n'
    r.set(key, value)
    assert release_seen(reaper, look(r, key)).outcome is Outcome.RELEASED
    assert not r.exists(key)


def test_lock_whose_type_changed_is_holder_changed(r, reaper):
    key = hold(r, 0)
    seen = look(r, key)
    r.delete(key)
    r.hset(key, "a", "b")
    result = release_seen(reaper, seen)
    assert (result.outcome, result.current) == (Outcome.HOLDER_CHANGED, None)
    assert r.type(key) == b"hash"


def test_script_reloaded_after_script_flush(r, reaper):
    key = hold(r, 0)
    seen = look(r, key)
    r.script_flush()
    assert release_seen(reaper, seen).outcome is Outcome.RELEASED


def test_acl_refusal_is_a_release_error(r):
    key = hold(r, 0)
    with acl_user(r, "noeval", commands=["+@all", "-evalsha", "-eval"]) as noeval, pytest.raises(ReleaseError):
        release_seen(Reaper(noeval.client), look(r, key))
    assert r.exists(key)


def test_del_refused_publishes_nothing(r):
    # An ACL that lets the script run but refuses DEL: nothing deleted, no notice sent.
    key = hold(r, 0)
    with subscribed(r, protocol.release_channel(key)) as pubsub:
        with acl_user(r, "nodel", channels=["*"], commands=["+@all", "-del"]) as nodel, pytest.raises(ReleaseError):
            release_seen(Reaper(nodel.client), look(r, key))
        assert r.exists(key)
        assert pubsub.get_message(timeout=0.3) is None


def test_read_only_replica_after_failover_publishes_nothing(redis_server, r):
    # A monitor still talking to a node that became a replica: the DEL is refused, and waiters
    # subscribed there are not woken for a lock that is still held.
    key = hold(r, 0)
    with RedisServer(free_port(), "--replicaof", "127.0.0.1", str(redis_server.port)) as replica:
        on_replica = redis.Redis.from_url(replica.url, protocol=2)
        wait_for(lambda: on_replica.get(key) == b"locked_by_tts")
        with subscribed(on_replica, protocol.release_channel(key)) as pubsub:
            with pytest.raises(ReleaseError, match="read only replica"):
                release_seen(Reaper(on_replica), look(on_replica, key))
            assert pubsub.get_message(timeout=0.3) is None
        on_replica.close()
    assert r.get(key) == b"locked_by_tts"


def test_unknown_script_answer_is_a_release_error(r, monkeypatch):
    reaper = Reaper(r)
    monkeypatch.setattr(reaper, "_script", lambda **_: [b"exploded", None, None])
    with pytest.raises(ReleaseError, match="exploded"):
        reaper.release(b"gpu_lock:0", b"v", 1)


def test_refused_notice_still_reports_the_release(r):
    # PUBLISH refused (an ACL without the channel): the lock is gone; the result says the
    # notice was not sent, for the audit, instead of failing a release that happened.
    key = hold(r, 0)
    with acl_user(r, "nopub", commands=["+@all", "-publish"]) as nopub:
        result = release_seen(Reaper(nopub.client), look(r, key))
    assert result.outcome is Outcome.RELEASED
    assert result.notice_error is not None
    assert "can't run this command" in result.notice_error
    assert not r.exists(key)
