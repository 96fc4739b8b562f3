"""A lock whose holding changes between a pass's barrier and its read (keyspace notifications on).

The barrier tells the pass which events came before it (relocked, tainted, a heartbeat written);
a handover in the milliseconds after it is not among them. The pass must leave such a lock to the
watcher, which reads it with its own proofs: judged with the barrier's, a same-value retake of a lock
without a TTL looks like the old holding whose heartbeat is gone, and a holding begun under a live
heartbeat writer looks untainted. The handover is injected into the pass's own read, so the
interleaving is exact."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from helpers import build, events, wait_for
from test_events import notifying, settings_for, watching

from monitor import protocol, service

KEY, HB = b"gpu_lock:0", b"gpu_lock:0:heartbeat"
VALUE = b"locked_by_tts"  # task names repeat


@contextmanager
def during_the_pass_read(monkeypatch: pytest.MonkeyPatch, act: Callable[[], None]) -> Iterator[None]:
    """`act` runs after the pass's barrier, just before its read of KEY."""
    real = service.read_locks

    def read(client, keys, **kw):  # type: ignore[no-untyped-def]
        if KEY in keys:
            act()
        return real(client, keys, **kw)

    monkeypatch.setattr(service, "read_locks", read)
    yield
    monkeypatch.setattr(service, "read_locks", real)


@contextmanager
def the_second_mark(monkeypatch: pytest.MonkeyPatch, watcher, instead: Callable[[], int]) -> Iterator[list[bytes]]:  # type: ignore[no-untyped-def]
    """The pass's barrier goes through; `instead` stands in for publishing the mark after its reads.
    Yields the marks sent."""
    real_publish = watcher.client.publish
    sent: list[bytes] = []

    def publish(channel, message):  # type: ignore[no-untyped-def]
        if channel == watcher.sync_channel:
            sent.append(message)
            if len(sent) == 2:
                return instead()
        return real_publish(channel, message)

    monkeypatch.setattr(watcher.client, "publish", publish)
    yield sent
    monkeypatch.setattr(watcher.client, "publish", real_publish)


def test_a_same_value_retake_of_a_lock_without_ttl_after_the_barrier_is_never_released(tmp_path, monkeypatch):
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor):
            r.set(KEY, VALUE)  # P: no TTL, its heartbeat seen beating
            for _ in range(3):
                r.set(HB, b"%f" % time.time(), px=600)
                time.sleep(0.05)
            assert monitor.run_pass() is not None  # P judged alive, its heartbeat this holding's

            def handover() -> None:
                r.eval(protocol.LEGACY_RELEASE_SCRIPT, 2, KEY, HB, VALUE)  # P releases: lock and heartbeat
                assert r.set(KEY, VALUE, nx=True)  # H: the same task, no TTL, no heartbeat

            with during_the_pass_read(monkeypatch, handover):
                report = monitor.run_pass()
            assert report is not None
            assert report.error is None
            assert KEY not in {v.holding.key for v in report.judged}  # left to the watcher
            # The watcher's own read, with its proof that the lock was set again: a new holding.
            verdict = wait_for(lambda: monitor._held.get(KEY))
            assert verdict.verdict.holding.heartbeat.value == "none"
            assert monitor.run_pass() is not None
            assert events(monitor.settings.audit_path, "lock_released") == []
            assert r.get(KEY) == VALUE


def test_a_holding_begun_under_a_live_heartbeat_after_the_barrier_stays_tainted(tmp_path, monkeypatch):
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            r.set(KEY, VALUE, ex=600)  # P: a legacy worker beating
            r.set(HB, b"P-%f" % time.time(), px=600)
            wait_for(lambda: KEY in watcher._index)

            def handover() -> None:
                r.delete(KEY)  # P's legacy release deletes only the lock; its writer beats on
                assert r.set(KEY, VALUE, nx=True, ex=600)  # H: same task, no heartbeat of its own

            real_publish = watcher.client.publish

            def beat_then_barrier(channel, message):  # type: ignore[no-untyped-def]
                # P beats just before the pass's barrier, in one MULTI with it: the lock is among the
                # pass's changed ones (the watcher cannot read it first), so the pass reads it.
                if channel != watcher.sync_channel:
                    return real_publish(channel, message)
                pipe = watcher.client.pipeline(transaction=True)
                pipe.set(HB, b"P-%f" % time.time(), px=600)
                pipe.publish(channel, message)
                return pipe.execute()[-1]

            monkeypatch.setattr(watcher.client, "publish", beat_then_barrier)
            with during_the_pass_read(monkeypatch, handover):
                report = monitor.run_pass()
            monkeypatch.setattr(watcher.client, "publish", real_publish)
            assert report is not None
            assert report.error is None
            r.set(HB, b"P-%f" % time.time(), px=300)  # P's writer beats once more, then stops
            wait_for(lambda: not r.exists(HB))
            assert monitor.run_pass() is not None
            held = monitor._held.get(KEY)
            assert held is not None
            assert held.verdict.holding.record.hb_tainted  # never condemned by P's heartbeat
            assert events(monitor.settings.audit_path, "lock_released") == []
            assert r.get(KEY) == VALUE


def test_without_a_barrier_the_pass_judges_every_read(tmp_path):
    """Notifications off: no barrier, nothing left to a watcher; every lock is judged."""
    with notifying("") as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        assert monitor.discovery is None
        r.set(KEY, VALUE, ex=600)
        report = monitor.run_pass()
        assert report is not None
        assert [v.holding.key for v in report.judged] == [KEY]


def test_a_pass_whose_mark_after_its_reads_is_lost_judges_none_of_them(tmp_path, monkeypatch):
    from monitor import watcher as watcher_mod

    monkeypatch.setattr(watcher_mod, "MARK_WAIT_S", 0.3)
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            r.set(KEY, VALUE)  # no TTL: read by every pass
            wait_for(lambda: KEY in watcher._index)
            with the_second_mark(monkeypatch, watcher, lambda: 0) as sent:  # lost on its way
                report = monitor.run_pass()
            assert report is not None
            assert report.error is None
            assert len(sent) >= 2
            assert KEY not in {v.holding.key for v in report.judged}  # nothing known: nothing judged
            assert not watcher.progress.complete or watcher.progress.resubscribes > 1  # it starts over


def test_a_pass_whose_mark_after_its_reads_cannot_be_sent_fails_as_redis_down(tmp_path, monkeypatch):
    import redis

    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            r.set(KEY, VALUE)
            wait_for(lambda: KEY in watcher._index)

            def refused() -> int:
                raise redis.ConnectionError("lost")

            with the_second_mark(monkeypatch, watcher, refused):
                report = monitor.run_pass()
            assert report is not None
            assert report.redis_down
            assert watcher._after_reads == {}


# --- what the watcher believes of a heartbeat it no longer reads ---------------------------------------------


@pytest.mark.parametrize("flags", ["K$g", "K$gx"])
def test_a_leftover_heartbeat_that_ran_out_unseen_does_not_taint_the_next_holding(tmp_path, flags):
    """A legacy release deletes only the lock; its heartbeat runs out later with no read of the lock
    and (without `x`, or before Redis evicts it) no event. The next holding, set after that, began
    with no heartbeat there: its own heartbeat, seen and then gone, is `dead` at once."""
    from helpers import next_message, subscribed

    with notifying(flags) as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            r.set(KEY, b"locked_by_tts", ex=600)  # P, beating
            r.set(HB, str(time.time()), px=400)
            wait_for(lambda: (st := watcher._keys.get(KEY)) is not None and st.hb_gone_at is not None)
            r.delete(KEY)  # P's legacy release: its heartbeat stays, to run out unseen
            gone_at = watcher._keys[KEY].hb_gone_at
            assert gone_at is not None
            while time.monotonic() <= gone_at:
                time.sleep(0.05)
            with subscribed(r, protocol.release_channel(KEY)) as notices:
                r.set(KEY, b"locked_by_asr", nx=True, ex=600)  # X takes the GPU, beats, and is killed
                for _ in range(3):
                    r.set(HB, str(time.time()), px=400)
                    time.sleep(0.1)
                killed = time.monotonic()
                notice = next_message(notices, timeout_s=10)
            assert notice is not None  # at its heartbeat's expiry, not at soft_timeout (30 s)
            assert time.monotonic() - killed < 5
            # The notice is published inside the release script; the audit line follows it.
            (released,) = wait_for(lambda: events(monitor.settings.audit_path, "lock_released"))
            assert released["holder"] == "locked_by_asr"
            assert released["reason"] == "heartbeat_dead"


def test_each_lost_subscription_is_taken_again_as_quickly_as_the_first(tmp_path):
    """The reconnect backoff is for one outage that goes on, not for every interruption since start."""
    with notifying() as (server, r):
        monitor = build(settings_for(server.url, tmp_path))
        with watching(monitor) as watcher:
            gaps = []
            for _ in range(6):
                before = watcher.progress.resubscribes
                t0 = time.monotonic()
                r.client_kill_filter(_type="pubsub")
                wait_for(lambda n=before: watcher.progress.resubscribes > n and watcher.progress.complete)
                gaps.append(time.monotonic() - t0)
            assert max(gaps) < 1.0, gaps  # doubling since the first: 0.1, 0.2, ... 3.2 s
