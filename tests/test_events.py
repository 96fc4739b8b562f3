"""The event-driven core against real redis-servers with and without keyspace notifications.

Passes here run every 30 s (they never get the chance): whatever is released, the event watcher
released it at its deadline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from helpers import beat, build, events, hold, make_settings, next_message, subscribed, wait_for

from monitor import daemon, notify, protocol
from monitor.demo.redis_server import RedisServer
from monitor.scanner import read_locks
from monitor.service import Monitor
from monitor.watcher import Watcher

HB_INTERVAL_S = 0.3  # a heartbeat lives 0.6 s
SLOW = {"monitor_interval": 30, "timeout_levels": {"warning": 20, "soft_timeout": 30, "hard_timeout": 60}}


def settings_for(url: str, tmp: Path, **discovery: object):
    return make_settings(
        url,
        tmp,
        gpu_lock_monitor={**SLOW, "heartbeat": {"interval": HB_INTERVAL_S, "timeout": 5}},
        discovery={"reconcile_keys_per_s": 100_000, **discovery},
    )


@contextmanager
def notifying(flags: str = "K$gx") -> Iterator[tuple[RedisServer, redis.Redis]]:
    with RedisServer(None, "--notify-keyspace-events", flags) as server:
        client = redis.Redis.from_url(server.url, protocol=2)
        try:
            yield server, client
        finally:
            client.close()


@contextmanager
def watching(monitor: Monitor) -> Iterator[Watcher]:
    watcher = daemon.start_watcher(monitor)
    assert watcher is not None
    try:
        wait_for(lambda: watcher.progress.complete, timeout_s=10)
        yield watcher
    finally:
        watcher.stop()


def legacy_acquire(r: redis.Redis, gpu: int, task: str = "tts", *, heartbeat: bool = True) -> bytes:
    """What the fleet's worker does: SET NX EX, then its heartbeat key with EX 2 * interval."""
    key = protocol.lock_key(gpu)
    assert r.set(key, protocol.lock_value(task), nx=True, ex=600)
    if heartbeat:
        r.set(protocol.heartbeat_key(key), str(time.time()), px=round(2000 * HB_INTERVAL_S))
    return key


# --- the self-test ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "state", "missing"),
    [
        ("K$gx", "on", ""),
        ("KA", "on", ""),
        ("K$g", "on", "x"),
        ("K$", "partial", "gx"),
        ("E$g", "off", "K$gx"),
        ("", "off", "K$gx"),
    ],
)
def test_the_self_test_says_on_partial_or_off_and_which_classes_are_missing(flags, state, missing):
    with notifying(flags) as (_, r):
        found = notify.self_test(r, "t", 0)
        assert r.keys("gpulock_monitor:probe:*") == []  # the probe leaves nothing behind
    assert (found.state, found.missing) == (state, missing)


def test_with_notifications_off_passes_scan_and_the_audit_says_so_once(tmp_path):
    with notifying("") as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        watcher = daemon.start_watcher(monitor)
        assert watcher is not None
        try:
            wait_for(lambda: watcher.progress.state is not None)
            assert watcher.candidates() is None  # the pass SCANs
            legacy_acquire(r, 0)
            report = monitor.run_pass()
        finally:
            watcher.stop()
    assert report is not None
    assert report.error is None
    assert [v.holding.key for v in report.verdicts] == [b"gpu_lock:0"]
    (said,) = events(monitor.settings.audit_path, "keyspace_notifications")
    assert (said["state"], said["discovery"]) == ("off", "scan")


def test_discovery_off_in_the_config_never_subscribes(tmp_path):
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path, notifications="off"))
        assert daemon.start_watcher(monitor) is None
        assert r.pubsub_numpat() == 0
    (said,) = events(monitor.settings.audit_path, "keyspace_notifications")
    assert said["reason"] == "discovery.notifications is off: a SCAN every pass"


# --- deadlines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", ["K$gx", "K$g"])  # expired events or not: the deadline read does it
def test_a_worker_killed_before_any_pass_is_released_at_its_heartbeat_expiry(tmp_path, flags):
    with notifying(flags) as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor), subscribed(r, protocol.release_channel(b"gpu_lock:0")) as notices:
            started = time.monotonic()
            key = legacy_acquire(r, 0)  # and dies at once: its heartbeat is never refreshed
            notice = next_message(notices, timeout_s=10)
            took_s = time.monotonic() - started
        assert r.exists(key) == 0
    assert notice is not None
    assert json.loads(notice["data"])["release_reason"] == "forced_by_monitor"
    # The heartbeat lives 0.6 s; soft_timeout is 30 s and no pass runs before 30 s.
    assert 2 * HB_INTERVAL_S <= took_s < 2 * HB_INTERVAL_S + 2.0, took_s
    (released,) = events(monitor.settings.audit_path, "lock_released")
    assert (released["reason"], released["heartbeat"]) == ("heartbeat_dead", "dead")


def test_a_heartbeat_refreshed_right_before_each_deadline_is_never_released(tmp_path):
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor):
            key = legacy_acquire(r, 0)
            hb_key = protocol.heartbeat_key(key)
            # Refresh when 20 ms of the 600 are left, ten times: 5.8 s past the first expiry.
            for _ in range(10):
                left_ms = r.pttl(hb_key)
                assert left_ms > 0, "the heartbeat ran out under a live worker"
                time.sleep(max(0.0, (left_ms - 20) / 1000))
                r.set(hb_key, str(time.time()), px=round(2000 * HB_INTERVAL_S))
            assert r.get(key) == b"locked_by_tts"
            r.delete(hb_key)  # the worker dies now
            wait_for(lambda: r.exists(key) == 0, timeout_s=5)
    assert [e["reason"] for e in events(monitor.settings.audit_path, "lock_released")] == ["heartbeat_dead"]


def test_a_leftover_heartbeat_never_condemns_the_next_holder_of_the_same_value(tmp_path):
    """Legacy release deletes only the lock; the same task takes it again at once, without
    heartbeats. The leftover expires: the new holding's heartbeat is none, never dead."""
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor):
            key = legacy_acquire(r, 0)
            hb_key = protocol.heartbeat_key(key)
            wait_for(lambda: key in monitor._known, timeout_s=5)
            r.delete(key)
            legacy_acquire(r, 0, heartbeat=False)
            wait_for(lambda: r.exists(hb_key) == 0, timeout_s=5)  # the leftover ran out
            verdicts = monitor.run_keys(read_locks(monitor.client, [key]))
        assert r.get(key) == b"locked_by_tts"
    assert [v.holding.heartbeat.value for v in verdicts] == ["none"]
    assert events(monitor.settings.audit_path, "lock_released") == []


def test_an_event_read_and_a_pass_racing_on_one_lock_release_it_once(tmp_path):
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor):
            key = legacy_acquire(r, 0)
            stop = threading.Event()

            def passes() -> None:
                while not stop.is_set():
                    monitor.run_pass()

            racer = threading.Thread(target=passes)
            racer.start()
            try:
                wait_for(lambda: r.exists(key) == 0, timeout_s=10)
            finally:
                stop.set()
                racer.join(timeout=10)
    released = events(monitor.settings.audit_path, "lock_released")
    assert len(released) == 1, released
    assert events(monitor.settings.audit_path, "release_failed") == []
    assert events(monitor.settings.audit_path, "release_skipped") == []


# --- the index ----------------------------------------------------------------------------------


def test_passes_read_the_index_and_no_scan_once_it_is_complete(tmp_path):
    with notifying() as (server, r):
        for gpu in range(3):
            legacy_acquire(r, gpu, heartbeat=False)
        r.mset({f"celery-task-meta-{n}": b"x" for n in range(200)})  # a keyspace of other things
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            wait_for(lambda: watcher.progress.sweeps >= 1)
            scans = _calls(r, "scan")
            reports = [monitor.run_pass() for _ in range(3)]
            legacy_acquire(r, 7, heartbeat=False)
            later = monitor.run_pass()
            scans_after = _calls(r, "scan")
    assert scans_after == scans  # the reconcile sweeps once an interval (30 s here)
    assert all(rep is not None and rep.error is None for rep in [*reports, later])
    assert sorted(v.holding.key for v in reports[0].verdicts) == [b"gpu_lock:0", b"gpu_lock:1", b"gpu_lock:2"]
    assert b"gpu_lock:7" in {v.holding.key for v in later.verdicts}  # its event added it


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_lock_whose_event_was_missed_is_found_by_the_reconcile_sweep(tmp_path):
    with notifying() as (server, r):
        settings = make_settings(
            server.url,
            tmp_path,
            gpu_lock_monitor={**SLOW, "monitor_interval": 0.5},
            discovery={"reconcile_keys_per_s": 100_000},
        )
        monitor = build(settings)
        with watching(monitor) as watcher:
            r.config_set("notify-keyspace-events", "")  # a gap: this lock raises no event
            legacy_acquire(r, 5, heartbeat=False)
            r.config_set("notify-keyspace-events", "K$gx")
            wait_for(lambda: watcher.progress.found_by_reconcile == 1, timeout_s=10)
            keys, complete = watcher.candidates() or ([], False)
    assert keys == [b"gpu_lock:5"]
    assert complete


def test_a_lost_subscription_is_resubscribed_and_the_index_reseeded(tmp_path):
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            r.client_kill_filter(_type="pubsub")
            wait_for(lambda: watcher.progress.resubscribes >= 2 and watcher.progress.complete, timeout_s=15)
            key = legacy_acquire(r, 3)
            wait_for(lambda: r.exists(key) == 0, timeout_s=10)  # released at its heartbeat's expiry
    assert [e["reason"] for e in events(monitor.settings.audit_path, "lock_released")] == ["heartbeat_dead"]


# --- passes that skip what did not change ---------------------------------------------------------


def test_a_steady_pass_judges_again_only_locks_that_changed_or_reached_a_boundary(
    r, redis_server, tmp_path, monkeypatch
):
    from monitor import verdict

    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 5.0, "soft_timeout": 30, "hard_timeout": 60}},
    )
    steady = hold(r, 0, age_s=0)  # nothing about it changes below
    crossing = hold(r, 1, age_s=4.5)  # passes the warning threshold half a second from now
    beating = hold(r, 2, age_s=0)  # its heartbeat is rewritten
    monitor = build(settings)
    monitor.run_pass()
    monitor.run_pass()  # the records the first pass wrote are read back once
    judged: list[bytes] = []
    real_track = verdict.track

    def counting(obs, *args, **kwargs):
        judged.append(obs.key)
        return real_track(obs, *args, **kwargs)

    monkeypatch.setattr(verdict, "track", counting)
    beat(r, beating)
    report = monitor.run_pass()
    assert judged == [beating]
    assert {v.holding.key for v in report.verdicts} == {steady, crossing, beating}
    held = {v.holding.key: v.holding.held_ms for v in report.verdicts}
    assert events(settings.audit_path, "lock_warning") == []
    judged.clear()
    wait_for(lambda: r.pttl(crossing) < (600 - 5) * 1000, timeout_s=5)
    later = monitor.run_pass()
    assert judged == [crossing]  # its warning boundary fell due; nothing else changed
    assert {v.holding.key: v.holding.held_ms for v in later.verdicts}[steady] > held[steady]  # the same, later
    assert [e["lock_key"] for e in events(settings.audit_path, "lock_warning")] == ["gpu_lock:1"]


def test_metrics_say_how_locks_are_found_and_how_late_a_release_was(tmp_path):
    from monitor.metrics import Metrics

    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        metrics = Metrics(monitor)
        sample = metrics.registry.get_sample_value
        assert sample("gpulock_monitor_discovery_info", {"mode": "scan", "notifications": "off"}) == 1
        with watching(monitor), subscribed(r, protocol.release_channel(b"gpu_lock:0")) as notices:
            legacy_acquire(r, 0)
            assert next_message(notices, timeout_s=10) is not None
            wait_for(lambda: sample("gpulock_monitor_release_delay_seconds_count"))
            assert sample("gpulock_monitor_discovery_info", {"mode": "events", "notifications": "on"}) == 1
            assert sample("gpulock_monitor_subscriptions_total") == 1
            assert sample("gpulock_monitor_keyspace_events_total") >= 2  # the lock's and its heartbeat's
            assert sample("gpulock_monitor_index_locks") == 0  # released: gone from the index
    (released,) = events(monitor.settings.audit_path, "lock_released")
    assert 0 <= released["late_s"] < 1.0  # the heartbeat ran out, the release came right after
    assert sample("gpulock_monitor_release_delay_seconds_sum") == released["late_s"]


# --- health and status say how locks are found ------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "said"), [("K$gx", "keyspace events"), ("", "a SCAN every pass (keyspace notifications off)")]
)
def test_health_and_status_say_how_the_daemon_finds_locks(tmp_path, flags, said):
    from monitor.cli.status import look
    from monitor.health import health_check

    with notifying(flags) as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        watcher = daemon.start_watcher(monitor)
        assert watcher is not None
        try:
            wait_for(lambda: watcher.progress.state is not None and (watcher.progress.complete or not flags))
            monitor.run_pass()
            health = health_check(monitor.settings)
            looked = look(r, monitor.settings, None, monitor.settings.name)
        finally:
            watcher.stop()
    assert health.line.startswith("healthy: ")
    assert f"locks found by {said}" in health.line
    assert looked.discovery == said
    assert looked.daemon_line.endswith(f"; finds locks by {said}")


def test_with_events_a_pass_reads_only_what_changed_since_it_was_last_read(tmp_path, monkeypatch):
    from monitor import service

    with notifying() as (server, r):
        keys = [hold(r, gpu) for gpu in range(3)]
        for key in keys:
            beat(r, key)
        monitor = build(settings_for(server.url, tmp_path))
        read: list[list[bytes]] = []
        real_read = service.read_locks

        def recording(client, candidates, **kwargs):
            read.append(list(candidates))
            return real_read(client, candidates, **kwargs)

        monkeypatch.setattr(service, "read_locks", recording)
        with watching(monitor):
            monitor.run_pass()
            monitor.run_pass()  # what the first pass wrote is read back, once
            read.clear()
            quiet = monitor.run_pass()
            assert read == [[]]  # nothing changed: nothing read
            r.set(protocol.heartbeat_key(keys[1]), b"new beat", ex=120)
            moved = monitor.run_pass()
    assert sorted(v.holding.key for v in quiet.verdicts) == keys
    beats = {v.holding.key: v.holding.hb_value for v in moved.verdicts}
    assert beats[keys[1]] == b"new beat"  # read by the pass or by the watcher before it: not stale
    assert len(moved.verdicts) == 3


def test_every_lock_named_by_a_burst_of_events_is_read_and_released_by_the_watcher(tmp_path):
    """More locks than one read takes (500): none is dropped between batches. Without expired
    events (no x), only the watcher's own reads can find them dead before a pass."""
    with notifying("K$g") as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor):
            pipe = r.pipeline(transaction=False)
            for gpu in range(1200):  # 1,200 workers that die at once, before any pass
                key = protocol.lock_key(gpu)
                pipe.set(key, protocol.lock_value("burst"), ex=600)
                pipe.set(protocol.heartbeat_key(key), b"1", px=round(2000 * HB_INTERVAL_S))
            pipe.execute()
            wait_for(lambda: not r.keys("gpu_lock:*"), timeout_s=10)  # passes run every 30 s
    assert len(events(monitor.settings.audit_path, "lock_released")) == 1200


# --- what the adversarial review found ------------------------------------------------------------


def test_a_lock_without_ttl_taken_again_by_the_same_task_is_a_new_holding(tmp_path):
    """Polling cannot tell a no-TTL lock deleted and set again with the same value from the old one;
    its keyspace events can, and the new holder inherits no held time."""
    with notifying() as (server, r):
        settings = make_settings(
            server.url,
            tmp_path,
            gpu_lock_monitor={**SLOW, "timeout_levels": {"warning": 1.0, "soft_timeout": 2.0, "hard_timeout": 60}},
        )
        monitor = build(settings)
        with watching(monitor), subscribed(r, protocol.release_channel(b"gpu_lock:0")) as notices:
            key = protocol.lock_key(0)
            r.set(key, protocol.lock_value("tts"))  # no TTL
            wait_for(lambda: key in monitor._known, timeout_s=5)
            time.sleep(1.5)  # the first holding ages
            r.delete(key)  # a legacy release
            r.set(key, protocol.lock_value("tts"))  # the same task again, at once
            retaken = time.monotonic()
            notice = next_message(notices, timeout_s=10)
            released_after_s = time.monotonic() - retaken
    assert notice is not None
    assert released_after_s >= 2.0 - 0.05  # its own soft_timeout, not the earlier holding's
    (released,) = events(settings.audit_path, "lock_released")
    assert released["held_s"] >= 2.0


def test_a_stray_beat_of_the_previous_holder_never_condemns_the_next_one(tmp_path):
    """A legacy holder deletes its lock while its heartbeat thread still runs; the next holder (no
    heartbeats) takes the lock, then the old thread beats once more. That write came after the new
    SET, but the heartbeat key was there at the SET: it proves nothing about the new holder."""
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor):
            key = legacy_acquire(r, 0, heartbeat=False)
            hb_key = protocol.heartbeat_key(key)
            r.set(hb_key, str(time.time()), px=10_000)  # its heartbeat, still well within its TTL below
            wait_for(lambda: key in monitor._known, timeout_s=5)
            r.delete(key)
            legacy_acquire(r, 0, task="next", heartbeat=False)
            r.set(hb_key, str(time.time()), px=round(2000 * HB_INTERVAL_S))  # the old thread's last beat
            wait_for(lambda: r.exists(hb_key) == 0, timeout_s=5)
            verdicts = monitor.run_keys(read_locks(monitor.client, [key]))
            assert r.get(key) == b"locked_by_next"
    assert [v.holding.heartbeat.value for v in verdicts] == ["none"]
    assert events(monitor.settings.audit_path, "lock_released") == []


def test_notifications_turned_off_then_on_again_switch_passes_to_scan_and_back(tmp_path):
    with notifying() as (server, r):
        settings = make_settings(server.url, tmp_path, gpu_lock_monitor={**SLOW, "monitor_interval": 0.5})
        monitor = build(settings)
        with watching(monitor) as watcher:
            assert watcher.candidates() is not None
            r.config_set("notify-keyspace-events", "")
            assert watcher.candidates() is None  # this pass SCANs
            assert watcher.quiet() == frozenset()
            r.config_set("notify-keyspace-events", "K$gx")
            wait_for(lambda: watcher.progress.complete, timeout_s=10)
            assert watcher.candidates() is not None
    said = [e["state"] for e in events(settings.audit_path, "keyspace_notifications")]
    assert said == ["on", "off", "on"]


def test_a_key_that_is_not_a_lock_stays_indexed_and_is_audited(tmp_path):
    with notifying() as (server, r):
        r.hset("gpu_lock:stats", "n", 1)  # (hash commands raise no event of the classes used)
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            assert b"gpu_lock:stats" in watcher._index  # the seed SCAN found it
            for _ in range(3):
                monitor.run_pass()
            assert b"gpu_lock:stats" in watcher._index
            assert watcher.progress.found_by_reconcile == 0
    (said,) = events(monitor.settings.audit_path, "invalid_lock")
    assert said["lock_key"] == "gpu_lock:stats"


# --- a holding read twice, released once ------------------------------------------------------------


def test_a_read_from_before_the_release_is_neither_released_nor_audited_again(r, redis_server, tmp_path, monkeypatch):
    """The interleaving injected: the second actor's read of the holding predates the first one's
    release. The tombstone would answer `released` again; this monitor says it once."""
    from monitor import service

    settings = make_settings(redis_server.url, tmp_path, gpu_lock_monitor={"timeout_levels": {"soft_timeout": 400}})
    key = hold(r, 0, age_s=450)  # past soft_timeout, no heartbeat: released at the next look
    monitor = build(settings)
    stale = read_locks(monitor.client, [key])
    assert monitor.run_pass().released == 1
    assert monitor.run_keys(stale) == []  # the event path's read of it, handled after the pass
    monkeypatch.setattr(service, "read_locks", lambda client, keys, **kw: stale)
    assert monitor.run_pass().released == 0  # a pass whose read predates the release
    assert len(events(settings.audit_path, "lock_released")) == 1
    assert events(settings.audit_path, "release_skipped") == []
    assert events(settings.audit_path, "lock_timeout_mismatch") == []  # nor judged as a new holding


def test_a_release_whose_reply_was_lost_is_settled_once_whatever_reads_it_again(r, redis_server, tmp_path, monkeypatch):
    """Lost reply: audited `unknown`. Another read of the holding asks again (its own attempt, so the
    tombstone does not answer it), then the next pass settles it: `released` once."""
    settings = make_settings(redis_server.url, tmp_path, gpu_lock_monitor={"timeout_levels": {"soft_timeout": 400}})
    key = hold(r, 0, age_s=450)
    monitor = build(settings)
    stale = read_locks(monitor.client, [key])
    real_release = monitor.reaper.release
    lost = []

    def losing(*args, **kwargs):
        result = real_release(*args, **kwargs)
        if not lost:
            lost.append(result)
            raise redis.ConnectionError("reply lost")
        return result

    monkeypatch.setattr(monitor.reaper, "release", losing)
    assert monitor.run_pass().error is not None  # the pass stops at the lost reply
    assert not r.exists(key)  # the script ran
    monitor.run_keys(stale)  # another read of the same holding: the tombstone answers
    assert monitor.run_pass().error is None
    outcomes = [e["outcome"] for e in events(settings.audit_path, "lock_released")]
    assert outcomes == ["unknown", "released"]  # said unknown, then settled once, never released twice
