"""Monitor passes against a real Redis: decisions become audited actions, once each."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import redis
from helpers import (
    acl_user,
    beat,
    build,
    events,
    hold,
    make_settings,
    next_message,
    read_jsonl,
    subscribed,
    wait_for,
)

from monitor import logs, protocol
from monitor.audit import monitor_identity
from monitor.holding import Record
from monitor.protocol import TOMBSTONE_TTL_MS
from monitor.reaper import Reaper
from monitor.scanner import READ_BATCH, SCAN_COUNT, read_locks
from monitor.service import NO_TTL_RECORD_MS, RECORD_MARGIN_MS


def released_keys(settings) -> list[str]:
    return [e["lock_key"] for e in events(settings.audit_path, "lock_released")]


def test_fresh_lock_is_kept_and_not_audited(r, settings):
    hold(r, 0)
    report = build(settings).run_pass()
    assert report.error is None
    assert [v.decision.action.value for v in report.verdicts] == ["keep"]
    assert events(settings.audit_path) == []
    assert r.exists(b"gpu_lock:0")


def test_dead_heartbeat_released_with_full_audit_event(r, settings):
    key = hold(r, 0, "tts_synthesize", age_s=10)
    monitor = build(settings)
    monitor.run_pass()
    beat(r, key)  # seen to appear during the holding: this holding's heartbeat
    monitor.run_pass()
    r.delete(key + b":heartbeat")  # the worker died; its heartbeat key expired
    report = monitor.run_pass()
    assert report.released == 1
    assert not r.exists(key)
    (event,) = events(settings.audit_path, "lock_released")
    assert event["v"] == 1
    assert event["ts"].endswith("+00:00")
    assert event["lock_key"] == "gpu_lock:0"
    assert event["holder"] == "locked_by_tts_synthesize"
    assert event["heartbeat"] == "dead"
    assert event["reason"] == "heartbeat_dead"
    assert event["tier"] == "ok"
    assert event["dry_run"] is False
    assert event["outcome"] == "released"
    assert 10 <= event["held_s"] < 30
    assert event["heartbeat_age_s"] is not None
    assert set(event["monitor"]) == {"host", "name", "pid", "version"}


def test_legacy_lock_released_at_soft_timeout(r, settings):
    hold(r, 0, age_s=399)
    hold(r, 1, age_s=401)
    build(settings).run_pass()
    assert released_keys(settings) == ["gpu_lock:1"]
    assert r.exists(b"gpu_lock:0")


def test_alive_long_task_protected_once_then_released_at_hard(r, redis_server, tmp_path):
    # The hard cap a second after the holding's age when first seen: the same holding reaches it
    # in real time (any change to the lock's TTL would make it another holding).
    s = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 300, "soft_timeout": 400, "hard_timeout": 451}},
    )
    key = hold(r, 0, age_s=450)
    monitor = build(s)
    for _ in range(3):
        beat(r, key)
        monitor.run_pass()
    assert r.exists(key)
    assert len(events(s.audit_path, "long_task_protected")) == 1
    time.sleep(1.05)  # the same holding, now past the hard cap
    beat(r, key)
    monitor.run_pass()
    assert not r.exists(key)
    (event,) = events(s.audit_path, "lock_released")
    assert (event["reason"], event["heartbeat"], event["tier"]) == ("hard_timeout", "alive", "hard")


def test_warning_once_per_holding_even_across_restarts(r, redis_server, tmp_path):
    # Warn after 0.3 s of real time: a holding taken after a complete pass cannot be faked older.
    s = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 0.3, "soft_timeout": 400, "hard_timeout": 500}},
    )
    hold(r, 0)
    time.sleep(0.35)
    build(s).run_pass()
    build(s).run_pass()  # a restarted monitor remembers, through Redis, that it warned
    assert len(events(s.audit_path, "lock_warning")) == 1
    hold(r, 0)  # the same task name acquires again: a new holding
    build(s).run_pass()
    assert len(events(s.audit_path, "lock_warning")) == 1  # new, not yet 0.3 s old
    time.sleep(0.35)
    build(s).run_pass()
    build(s).run_pass()
    warnings = events(s.audit_path, "lock_warning")
    assert len(warnings) == 2
    assert warnings[0]["holding"] != warnings[1]["holding"]


def test_hard_timeout_null_never_caps_alive_holder(r, redis_server, tmp_path):
    s = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 300, "soft_timeout": 400, "hard_timeout": None}},
    )
    key = hold(r, 0, age_s=599)
    beat(r, key)
    report = build(s).run_pass()
    assert report.error is None
    assert [(v.decision.action.value, v.decision.reason.value) for v in report.verdicts] == [
        ("keep", "long_task_protected")
    ]
    assert r.exists(key)


def test_heartbeat_from_skewed_clock_is_alive(r, settings):
    key = hold(r, 0, age_s=450)
    monitor = build(settings)
    for offset in (-600, 600, -600):
        beat(r, key, value=str(time.time() + offset))
        report = monitor.run_pass()
    assert report.verdicts[0].holding.heartbeat.value == "alive"
    assert r.exists(key)
    assert events(settings.audit_path, "lock_released") == []


def test_lock_without_ttl_released_after_soft_timeout_of_observation(r, redis_server, tmp_path):
    s = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 0.1, "soft_timeout": 0.3, "hard_timeout": 5}},
    )
    key = hold(r, 0, ttl=False)
    monitor = build(s)
    monitor.run_pass()
    assert r.exists(key)
    time.sleep(0.35)  # held time of a TTL-less lock is counted from first sight, on Redis's clock
    build(s).run_pass()  # a restarted monitor continues that count
    assert not r.exists(key)
    assert [e["event"] for e in events(s.audit_path)] == ["lock_released"]


def test_dry_run_decides_and_records_but_releases_nothing(r, settings):
    hold(r, 0, age_s=450)
    monitor = build(settings, dry_run=True)
    monitor.run_pass()
    monitor.run_pass()
    assert r.exists(b"gpu_lock:0")
    (event,) = events(settings.audit_path, "lock_released")
    assert event["dry_run"] is True
    assert event["outcome"] == "dry_run"


def test_auto_recovery_false_is_a_dry_run(r, redis_server, tmp_path):
    s = make_settings(redis_server.url, tmp_path, gpu_lock_monitor={"auto_recovery": False})
    hold(r, 0, age_s=450)
    build(s).run_pass()
    assert r.exists(b"gpu_lock:0")
    assert events(s.audit_path, "lock_released")[0]["dry_run"] is True


def test_malformed_data_is_skipped_and_audited(r, settings):
    r.hset(b"gpu_lock:hash", "a", "b")
    r.rpush(b"gpu_lock:list", "x")
    r.set(b"gpu_lock:bin", b'locked_by_\xff\n"}{', px=100_000)  # 500 s old, binary, newline, quotes
    r.set(b"gpu_lock:0:heartbeat", b"garbage")  # a heartbeat key is not a lock
    r.set(b"gpu_lock:1", b"locked_by_x", px=100_000)
    r.hset(b"gpu_lock:1:heartbeat", "not", "a string")
    monitor = build(settings)
    report = monitor.run_pass()
    monitor.run_pass()
    assert report.invalid == 2
    invalid = events(settings.audit_path, "invalid_lock")
    assert sorted(e["lock_key"] for e in invalid) == ["gpu_lock:hash", "gpu_lock:list"]
    released = {e["lock_key"]: e for e in events(settings.audit_path, "lock_released")}
    assert set(released) == {"gpu_lock:bin", "gpu_lock:1"}
    assert released["gpu_lock:bin"]["holder"] == 'locked_by_\\xff\n"}{'
    assert released["gpu_lock:1"]["heartbeat"] == "none"
    for line in Path(settings.audit_path).read_bytes().splitlines():
        json.loads(line)
    assert r.type(b"gpu_lock:hash") == b"hash"


def test_records_expire_with_their_locks_and_releases_mark_them(r, settings):
    live, no_ttl, zombie = hold(r, 0), hold(r, 1, ttl=False), hold(r, 2, age_s=450)
    (obs,) = read_locks(r, [live])
    monitor = build(settings)
    monitor.run_pass()
    assert released_keys(settings) == ["gpu_lock:2"]
    # A record names its holding (value and expiry) and lives as long as its lock, plus a margin.
    record = Record.loads(r.get(protocol.holding_key(live)))
    assert (record.holder, record.expiry_ms) == (b"locked_by_tts", obs.expiry_ms)
    lock_pttl, record_pttl = r.pttl(live), r.pttl(protocol.holding_key(live))
    assert lock_pttl < record_pttl <= lock_pttl + RECORD_MARGIN_MS + 1000  # + the pass's own time
    # A lock without a TTL: its record lasts a day after the last pass that saw it.
    assert Record.loads(r.get(protocol.holding_key(no_ttl))).expiry_ms == -1
    assert NO_TTL_RECORD_MS - 10_000 < r.pttl(protocol.holding_key(no_ttl)) <= NO_TTL_RECORD_MS
    # A released holding's record is replaced by a mark, and its release by the attempt's
    # tombstone: both expire.
    assert r.get(protocol.holding_key(zombie)) == b"-released"
    assert 0 < r.pttl(protocol.holding_key(zombie)) <= TOMBSTONE_TTL_MS
    assert r.get(protocol.released_key(zombie)).endswith(b":locked_by_tts")
    assert 0 < r.pttl(protocol.released_key(zombie)) <= TOMBSTONE_TTL_MS
    # Its owner releases the live lock: the record is left to expire, never rewritten or extended.
    stored = r.get(protocol.holding_key(live))
    r.delete(live)
    monitor.run_pass()
    assert r.get(protocol.holding_key(live)) == stored
    assert r.pttl(protocol.holding_key(live)) <= record_pttl
    # Every key the monitor wrote expires, except the mark of the last complete pass.
    mine = list(r.scan_iter(match=b"gpulock_monitor:*"))
    assert [k for k in mine if r.pttl(k) < 0] == [protocol.last_pass_key(settings.key_pattern)]


class CountingConnection(redis.Connection):
    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


def test_pass_over_1000_locks_takes_bounded_round_trips(r, redis_server, settings):
    pipe = r.pipeline(transaction=False)
    for i in range(1000):
        pipe.set(f"gpu_lock:{i}", f"locked_by_task{i}", ex=600)
        pipe.set(f"gpu_lock:{i}:heartbeat", str(time.time()), ex=120)
    for i in range(3000):
        pipe.set(f"celery-task-meta-{i}", "x")  # the unrelated keys a lock DB also holds
    pipe.execute()
    pool = redis.ConnectionPool(
        connection_class=CountingConnection, host="127.0.0.1", port=redis_server.port, protocol=2
    )
    client = redis.Redis(connection_pool=pool)
    monitor = build(settings, client)
    client.ping()  # connection set-up is not part of the pass
    r.config_resetstat()
    CountingConnection.sends = 0
    report = monitor.run_pass()
    assert report.error is None
    assert len(report.verdicts) == 1000
    start = 1  # TIME and the last complete pass's mark, in one pipeline
    scans = -(-5000 // SCAN_COUNT) + 1  # at most
    reads = -(-1000 // READ_BATCH)
    persists = -(-1000 // READ_BATCH)  # 1,000 new records; the last call also writes the status
    load = 2 * 2  # once per client, for each of the read and persist scripts: NOSCRIPT, SCRIPT LOAD
    print(f"\nfirst pass: {CountingConnection.sends} round trips")
    assert CountingConnection.sends <= start + scans + reads + persists + load, CountingConnection.sends
    stats = r.info("commandstats")
    assert "cmdstat_keys" not in stats
    # Reads: lock, heartbeat, record and holder record of each lock; compare-and-set: lock and
    # record of each record written; the last-pass mark, at the start and where the persist script raises it.
    assert stats["cmdstat_get"]["calls"] == 4 * 1000 + 2 * 1000 + 2 + 1  # + what was said of invalid keys
    assert stats["cmdstat_set"]["calls"] == 1000 + 2  # the records, the mark and the status
    # A steady pass: nothing changed, no record written back, the scripts already loaded. The
    # keyspace now holds the records, the mark and the status key too.
    CountingConnection.sends = 0
    r.config_resetstat()
    monitor.run_pass()
    scans = -(-(5000 + 1000 + 2) // SCAN_COUNT) + 1
    print(f"steady pass: {CountingConnection.sends} round trips")
    assert CountingConnection.sends <= start + scans + reads + 1, CountingConnection.sends
    stats = r.info("commandstats")
    assert stats["cmdstat_get"]["calls"] == 4 * 1000 + 2
    assert stats["cmdstat_set"]["calls"] == 2  # the mark and the status: no record


class RacingReaper(Reaper):
    """Runs `interleave` between the pass's observation and the release script."""

    def __init__(self, client, interleave):
        super().__init__(client)
        self.interleave = interleave

    def release(self, *args, **kwargs):
        self.interleave()
        return super().release(*args, **kwargs)


def test_race_holder_changes_before_release(r, settings):
    key = hold(r, 0, "old", age_s=450)
    monitor = build(settings, reaper=RacingReaper(r, lambda: hold(r, 0, "new") and beat(r, key)))
    monitor.run_pass()
    assert r.get(key) == b"locked_by_new"
    assert r.exists(key + b":heartbeat")
    (event,) = events(settings.audit_path, "release_skipped")
    assert (event["outcome"], event["holder"], event["current_holder"]) == (
        "holder_changed",
        "locked_by_old",
        "locked_by_new",
    )
    assert events(settings.audit_path, "lock_released") == []


def test_race_same_task_name_reacquires_before_release(r, settings):
    key = hold(r, 0, "tts", age_s=450)
    monitor = build(settings, reaper=RacingReaper(r, lambda: r.delete(key) and hold(r, 0, "tts")))
    monitor.run_pass()
    assert r.exists(key)
    assert events(settings.audit_path, "release_skipped")[0]["outcome"] == "holder_changed"


def test_race_heartbeat_refreshed_before_release(r, settings):
    key = hold(r, 0, age_s=10)
    monitor = build(settings)
    monitor.run_pass()
    beat(r, key, value="1")  # seen to appear during the holding: its own heartbeat
    monitor.run_pass()
    r.delete(key + b":heartbeat")
    monitor.reaper = RacingReaper(r, lambda: beat(r, key, value="2"))
    monitor.run_pass()
    assert r.exists(key)
    assert events(settings.audit_path, "release_skipped")[0]["outcome"] == "heartbeat_revived"


def test_race_lock_released_by_owner_before_release(r, settings):
    key = hold(r, 0, age_s=450)
    monitor = build(settings, reaper=RacingReaper(r, lambda: r.delete(key)))
    monitor.run_pass()
    assert events(settings.audit_path, "release_skipped")[0]["outcome"] == "gone"
    assert not r.exists(protocol.holding_key(key))  # nothing kept about a holding that is gone
    assert not r.exists(protocol.released_key(key))  # nor claimed released


def test_release_refused_retries_then_writes_critical_record(r, redis_server, tmp_path):
    s = make_settings(redis_server.url, tmp_path, gpu_lock_monitor={"cleanup": {"max_retry": 2, "retry_delay": 0.01}})
    key = hold(r, 0, "stuck", age_s=450)
    clock = [0.0]
    # A user that may not DEL (as a read-only replica refuses it): the script fails at its first
    # write, the DEL, before anything changed.
    with (
        acl_user(r, "nodel", channels=["*"], commands=["+@all", "-del"]) as nodel,
        subscribed(r, b"gpu_lock:gpu_lock:0") as pubsub,
    ):
        monitor = build(s, nodel.client, reaper=Reaper(nodel.client), mono=lambda: clock[0])
        monitor.run_pass()
        monitor.run_pass()  # retry_delay not yet passed: no attempt
        clock[0] = 1.0
        monitor.run_pass()
        clock[0] = 2.0
        monitor.run_pass()  # attempts continue, the critical record is not repeated
        assert r.get(key) == b"locked_by_stuck"
        assert pubsub.get_message(timeout=0.2) is None  # no waiter woken by any of the attempts
    failed = events(s.audit_path, "release_failed")
    assert [e["attempt"] for e in failed] == [1, 2, 3]
    assert [e["retries_spent"] for e in failed] == [False, True, True]
    (critical,) = read_jsonl(s.critical_path)
    assert critical["lock_key"] == "gpu_lock:0"
    assert critical["holder"] == "locked_by_stuck"
    assert critical["attempts"] == 2
    assert critical["error_type"] == "ReleaseError"
    assert "Traceback" in critical["traceback"]
    assert critical["hostname"]
    assert critical["timestamp"] > 0


def test_redis_lost_during_release_aborts_pass(r, settings):
    from monitor.demo.redis_server import RedisServer

    with RedisServer() as own:
        client = redis.Redis.from_url(own.url, protocol=2)
        s = make_settings(own.url, Path(settings.audit_path).parent)
        hold(client, 0, age_s=450)
        hold(client, 1, age_s=450)
        monitor = build(s, client, reaper=RacingReaper(client, own.stop))
        report = monitor.run_pass()
        assert report.error.startswith("redis unavailable")
        assert report.released == 0
        audited = events(s.audit_path)
        assert [e["event"] for e in audited] == ["lock_released", "redis_unavailable"]
        assert audited[0]["outcome"] == "unknown"  # the script may have run: the next pass asks
        own.start()
        monitor.reaper = Reaper(client)
        wait_for_pass = [monitor.run_pass() for _ in range(3)]
        assert any(p is not None and p.error is None for p in wait_for_pass)
        assert "redis_recovered" in [e["event"] for e in events(s.audit_path)]


def test_unwritable_audit_keeps_daemon_running_and_events_pending(r, settings, tmp_path):
    hold(r, 0, age_s=450)
    monitor = build(settings)
    (tmp_path / "plain-file").write_text("")
    monitor.audit.file.path = tmp_path / "plain-file" / "audit.jsonl"  # its parent is not a directory
    report = monitor.run_pass()
    assert report.error is None
    assert report.released == 1
    assert monitor.audit.file.pending == 1
    monitor.audit.file.path = tmp_path / "audit-later.jsonl"
    hold(r, 1, age_s=450)
    monitor.run_pass()
    assert [e["lock_key"] for e in events(tmp_path / "audit-later.jsonl")] == ["gpu_lock:0", "gpu_lock:1"]


@pytest.mark.parametrize("n", [READ_BATCH + 1])
def test_batches_cover_every_lock(r, settings, n):
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"gpu_lock:{i}", "locked_by_x", px=100_000)
    pipe.execute()
    report = build(settings).run_pass()
    assert report.released == n
    locks = [f"gpu_lock:{i}".encode() for i in range(n)]
    # What remains: each release's mark and tombstone (both expire), the status, the pass mark.
    assert set(r.scan_iter(count=10_000)) == {
        protocol.monitor_status_key(monitor_host()),
        protocol.last_pass_key(settings.key_pattern),
        *(protocol.holding_key(k) for k in locks),
        *(protocol.released_key(k) for k in locks),
    }
    assert set(r.mget([protocol.holding_key(k) for k in locks])) == {b"-released"}


def test_stale_heartbeat_released_only_if_still_unchanged(r, redis_server, tmp_path):
    s = make_settings(redis_server.url, tmp_path, gpu_lock_monitor={"heartbeat": {"interval": 0.1, "timeout": 0.3}})
    key = hold(r, 0, age_s=5)
    monitor = build(s)
    assert monitor.run_pass().verdicts[0].holding.heartbeat.value == "none"
    r.set(key + b":heartbeat", b"1.0")  # set once during the holding, no expiry, never refreshed
    assert monitor.run_pass().verdicts[0].holding.heartbeat.value == "alive"
    time.sleep(0.35)  # Redis's clock must pass heartbeat.timeout
    report = monitor.run_pass()
    assert report.released == 1
    (event,) = events(s.audit_path, "lock_released")
    assert (event["heartbeat"], event["reason"]) == ("dead", "heartbeat_dead")
    assert event["heartbeat_age_s"] >= 0.3


def test_critical_record_that_cannot_be_written_is_logged_and_kept(r, redis_server, tmp_path, capsys):
    (tmp_path / "plain-file").write_text("")
    s = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"cleanup": {"max_retry": 1, "retry_delay": 0.01}},
        audit={"critical_path": str(tmp_path / "plain-file" / "critical.jsonl")},
    )
    hold(r, 0, "stuck", age_s=450)
    logs.configure("info", "json", stream=sys.stdout)  # sys.stdout is capsys's now
    with acl_user(r, "nodel", channels=["*"], commands=["+@all", "-del"]) as nodel:
        monitor = build(s, nodel.client)
        report = monitor.run_pass()
    assert report.error is None
    assert monitor.critical.pending == 1
    out = capsys.readouterr().out
    assert "critical_write_failed" in out
    assert "locked_by_stuck" in out
    assert events(s.audit_path, "release_failed")[0]["retries_spent"] is True


def monitor_host() -> str:
    return str(monitor_identity()["host"])


def test_status_key_summarises_the_last_pass_and_ages_on_redis_clock(r, settings):
    hold(r, 0)
    build(settings).run_pass()
    key = protocol.monitor_status_key(monitor_host())
    status = json.loads(r.get(key))
    assert status["locks"] == 1
    assert status["failing_releases"] == 0
    assert status["monitor_interval_s"] == settings.monitor_interval_s
    assert 0 < r.pttl(key) <= 600_000


def test_two_replicas_release_each_zombie_once(r, redis_server, tmp_path):
    # Replica A's whole pass (it releases both zombies, and a waiter takes GPU 0) runs between
    # replica B's observation and B's releases: B must delete nothing and announce nothing.
    a = build(make_settings(redis_server.url, tmp_path / "a"))
    b_settings = make_settings(redis_server.url, tmp_path / "b")
    zombies = [hold(r, 0, "dead", age_s=450), hold(r, 1, "dead", age_s=450)]
    a_done = []

    def replica_a_acts_first() -> None:
        if not a_done:
            a_done.append(a.run_pass())
            hold(r, 0, "waiter")

    b = build(b_settings, reaper=RacingReaper(r, replica_a_acts_first))
    with subscribed(r, *(protocol.release_channel(k) for k in zombies)) as pubsub:
        b.run_pass()
        notices = list(iter(lambda: next_message(pubsub, 0.5), None))
    released = sorted(e["lock_key"] for e in events(tmp_path / "a" / "audit.jsonl", "lock_released"))
    assert released == ["gpu_lock:0", "gpu_lock:1"]
    assert events(b_settings.audit_path, "lock_released") == []
    outcomes = {e["lock_key"]: e["outcome"] for e in events(b_settings.audit_path, "release_skipped")}
    assert outcomes == {"gpu_lock:0": "holder_changed", "gpu_lock:1": "gone"}
    assert r.get(b"gpu_lock:0") == b"locked_by_waiter"
    assert sorted(m["channel"] for m in notices) == [b"gpu_lock:gpu_lock:0", b"gpu_lock:gpu_lock:1"]


def test_replicas_sharing_a_record_never_claim_each_others_release(r, redis_server, tmp_path):
    # Both replicas know the holdings from the same stored record (the same first sight): B's
    # release attempt is still not A's, and A's tombstone must not answer B `released`.
    a = build(make_settings(redis_server.url, tmp_path / "a"))
    b_settings = make_settings(redis_server.url, tmp_path / "b")
    crashed = [hold(r, 0, "dead", age_s=10), hold(r, 1, "dead", age_s=10)]
    a.run_pass()
    for key in crashed:
        beat(r, key)  # appears during the holdings: their own heartbeats
    a.run_pass()
    for key in crashed:
        r.delete(key + b":heartbeat")  # both workers die
    a_done = []

    def replica_a_acts_first() -> None:
        if not a_done:
            a_done.append(a.run_pass())
            hold(r, 0, "waiter")

    b = build(b_settings, reaper=RacingReaper(r, replica_a_acts_first))
    report = b.run_pass()
    assert {v.holding.id for v in report.verdicts} == {v.holding.id for v in a_done[0].verdicts}
    released = sorted(e["lock_key"] for e in events(tmp_path / "a" / "audit.jsonl", "lock_released"))
    assert released == ["gpu_lock:0", "gpu_lock:1"]
    assert events(b_settings.audit_path, "lock_released") == []
    outcomes = {e["lock_key"]: e["outcome"] for e in events(b_settings.audit_path, "release_skipped")}
    assert outcomes == {"gpu_lock:0": "holder_changed", "gpu_lock:1": "gone"}


# --- passes that carry what events say did not change ------------------------------------------


class QuietIndex:
    """A discovery that says every lock is quiet after the first pass (as the event watcher does
    when no event named them since they were last read), recording what each pass reads."""

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys
        self.read: list[list[bytes]] = []
        self.first = True

    def candidates(self) -> tuple[list[bytes], bool]:
        return list(self.keys), True

    def changed(self) -> frozenset[bytes] | None:
        changed, self.first = (frozenset(self.keys) if self.first else frozenset()), False
        return changed

    def quiet(self) -> frozenset[bytes]:
        raise AssertionError("a discovery that says changed() is not asked quiet()")

    def relocked(self) -> frozenset[bytes]:
        return frozenset()

    def tainted(self) -> frozenset[bytes]:
        return frozenset()

    def read_by_pass(self, keys: list[bytes]) -> None:
        self.read.append(list(keys))

    def forget_absent(self, absent: list[bytes]) -> None:
        pass


def test_a_lock_carried_unread_is_read_and_decided_when_its_boundary_falls_due(r, redis_server, tmp_path):
    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 5.0, "soft_timeout": 30, "hard_timeout": 60}},
    )
    steady = hold(r, 0, age_s=0)
    crossing = hold(r, 1, age_s=4.4)  # crosses the warning threshold about 0.6 s from now
    monitor = build(settings)
    monitor.discovery = index = QuietIndex([steady, crossing])
    first = monitor.run_pass()
    carried = monitor.run_pass()
    assert index.read == [[steady, crossing], []]  # nothing changed, nothing due: nothing read
    assert carried.error is None
    assert carried.locks == 2
    before = {v.holding.key: v.holding.held_ms for v in first.verdicts}
    after = {v.holding.key: v.holding.held_ms for v in carried.verdicts}
    assert after[steady] >= before[steady]  # the same verdicts, later
    assert after[crossing] >= before[crossing]
    assert events(settings.audit_path, "lock_warning") == []
    wait_for(lambda: r.pttl(crossing) < (600 - 5) * 1000, timeout_s=5)
    due = monitor.run_pass()
    assert index.read[-1] == [crossing]  # its boundary fell due: read and judged again, alone
    assert {v.holding.key: v.decision.action.value for v in due.verdicts} == {steady: "keep", crossing: "warn"}
    assert [e["lock_key"] for e in events(settings.audit_path, "lock_warning")] == ["gpu_lock:1"]


def test_without_a_hard_cap_a_carried_protected_task_is_said_to_overrun_at_twice_soft_timeout(
    r, redis_server, tmp_path
):
    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 0.5, "soft_timeout": 1.0, "hard_timeout": None}},
    )
    key = hold(r, 0, age_s=0)
    beat(r, key)  # alive (its heartbeat outlives the test): protected past soft_timeout
    monitor = build(settings)
    monitor.discovery = index = QuietIndex([key])
    monitor.run_pass()
    time.sleep(1.1)
    assert [v.decision.reason.value for v in monitor.run_pass().verdicts] == ["long_task_protected"]
    monitor.run_pass()
    assert index.read == [[key], [key], []]  # protected, then carried: nothing due before 2 x soft
    assert events(settings.audit_path, "long_task_overrun") == []
    time.sleep(max(0.0, 2.05 - 1.1))
    monitor.run_pass()
    assert index.read[-1] == [key]
    assert len(events(settings.audit_path, "long_task_overrun")) == 1
