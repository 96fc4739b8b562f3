"""Held time and heartbeat state from observations and records. No Redis: the clock is data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from monitor.holding import REACQUIRE_SLACK_MS, Heartbeat, Record, track
from monitor.scanner import Observation

LOCK_MS = 600_000
HB_TTL_MS = 120_000
HB_TIMEOUT_MS = 300_000
NOW = 1_700_000_000_000


def obs(*, now=NOW, value=b"locked_by_tts", pttl=LOCK_MS, hb=None, hb_pttl=-2, record=None) -> Observation:
    return Observation(b"gpu_lock:0", now, value, pttl, hb, hb_pttl, record.dumps() if record else None)


def run(o: Observation):
    return track(o, lock_timeout_ms=LOCK_MS, hb_ttl_ms=HB_TTL_MS, hb_timeout_ms=HB_TIMEOUT_MS)


def chain(*observations: Observation):
    """Feed each observation the record the previous one produced, as successive passes do."""
    holding = None
    for o in observations:
        holding = run(o if holding is None else replace(o, record=holding.record.dumps()))
    return holding


@pytest.mark.parametrize(
    ("pttl", "held_ms"),
    [(LOCK_MS, 0), (LOCK_MS - 1, 1), (LOCK_MS - 450_000, 450_000), (1, LOCK_MS - 1)],
)
def test_held_time_from_ttl(pttl, held_ms):
    h = run(obs(pttl=pttl))
    assert h.held_ms == held_ms
    assert h.new


@pytest.mark.parametrize("pttl", [-1, LOCK_MS + 1, 3_600_000])
def test_ttl_that_cannot_tell_falls_back_to_first_seen(pttl):
    first = run(obs(pttl=pttl))
    assert first.held_ms == 0
    later = chain(obs(pttl=pttl), obs(now=NOW + 42_000, pttl=pttl))
    assert later.held_ms == 42_000
    assert not later.new


def test_monitor_restart_keeps_held_time_of_lock_without_ttl():
    first = run(obs(pttl=-1))
    # A new monitor process: nothing in memory, only the record it reads back from Redis.
    restarted = run(obs(now=NOW + 700_000, pttl=-1, record=first.record))
    assert restarted.held_ms == 700_000


def test_lock_already_old_when_monitor_starts():
    assert run(obs(pttl=LOCK_MS - 500_000)).held_ms == 500_000


def test_same_value_reacquiring_restarts_held_time():
    old = run(obs(pttl=LOCK_MS - 500_000))
    again = run(obs(now=NOW + 10_000, pttl=LOCK_MS - 2_000, record=old.record))
    assert again.new
    assert again.held_ms == 2_000


def test_ttl_jitter_within_slack_is_the_same_holding():
    old = run(obs(pttl=LOCK_MS - 500_000))
    later = run(obs(now=NOW + 10_000, pttl=LOCK_MS - 510_000 + REACQUIRE_SLACK_MS, record=old.record))
    assert not later.new
    assert later.held_ms == 510_000


def test_other_holder_is_a_new_holding():
    old = run(obs(pttl=-1))
    other = run(
        obs(
            now=NOW + 50_000,
            pttl=-1,
            value=b"locked_by_asr",
            record=replace(old.record, notified=frozenset({"lock_warning"})),
        )
    )
    assert other.new
    assert other.held_ms == 0
    assert other.record.notified == frozenset()


def test_no_heartbeat_ever_is_none():
    h = chain(obs(), obs(now=NOW + 1000))
    assert h.heartbeat is Heartbeat.NONE
    assert h.hb_age_ms is None


def test_refreshed_heartbeat_is_alive_whatever_its_content():
    # The values are a worker's clock, 10 minutes off in either direction, or no clock at all.
    values = [b"1699999400.0", b"1700000600.0", b"not a number", b"\xff\x00"]
    observations = [
        obs(now=NOW + i * 60_000, pttl=LOCK_MS - i * 60_000, hb=v, hb_pttl=HB_TTL_MS - 100)
        for i, v in enumerate(values)
    ]
    h = chain(*observations)
    assert h.heartbeat is Heartbeat.ALIVE
    assert h.hb_age_ms == 100


def test_heartbeat_that_expired_is_dead():
    h = chain(obs(hb=b"1.0", hb_pttl=HB_TTL_MS), obs(now=NOW + 130_000, pttl=LOCK_MS - 130_000))
    assert h.heartbeat is Heartbeat.DEAD
    assert h.hb_age_ms == 130_000


def test_dead_survives_monitor_restart():
    seen = run(obs(hb=b"1.0", hb_pttl=HB_TTL_MS))
    restarted = run(obs(now=NOW + 200_000, pttl=LOCK_MS - 200_000, record=seen.record))
    assert restarted.heartbeat is Heartbeat.DEAD


def test_heartbeat_key_that_stays_unchanged_goes_stale():
    # A worker that set its heartbeat once with a long expiry and stopped refreshing.
    first = run(obs(hb=b"1.0", hb_pttl=-1))
    assert first.heartbeat is Heartbeat.ALIVE
    still = run(obs(now=NOW + HB_TIMEOUT_MS, pttl=LOCK_MS - HB_TIMEOUT_MS, hb=b"1.0", hb_pttl=-1, record=first.record))
    assert still.heartbeat is Heartbeat.ALIVE
    stale = run(
        obs(now=NOW + HB_TIMEOUT_MS + 1, pttl=LOCK_MS - HB_TIMEOUT_MS - 1, hb=b"1.0", hb_pttl=-1, record=first.record)
    )
    assert stale.heartbeat is Heartbeat.DEAD


def test_heartbeat_age_from_its_ttl():
    h = run(obs(hb=b"x", hb_pttl=HB_TTL_MS - 30_000))
    assert h.hb_age_ms == 30_000
    assert h.heartbeat is Heartbeat.ALIVE


def test_heartbeat_of_previous_holding_does_not_count_for_new_one():
    old = run(obs(hb=b"1.0", hb_pttl=HB_TTL_MS))
    new = run(obs(now=NOW + 1000, value=b"locked_by_asr", record=old.record))
    assert new.heartbeat is Heartbeat.NONE


@pytest.mark.parametrize("raw", [b"not json", b"{}", b'{"holder": 3}', b"[]"])
def test_unreadable_record_starts_afresh(raw):
    h = track(
        Observation(b"gpu_lock:0", NOW, b"v", -1, None, -2, raw),
        lock_timeout_ms=LOCK_MS,
        hb_ttl_ms=HB_TTL_MS,
        hb_timeout_ms=HB_TIMEOUT_MS,
    )
    assert h.new
    assert h.held_ms == 0


def test_record_round_trips_any_bytes():
    rec = Record(
        holder=bytes(range(256)),
        since_ms=5,
        hb_seen=True,
        hb_value=b'\n"\xff',
        hb_refreshed_ms=7,
        notified=frozenset({"a"}),
    )
    assert Record.loads(rec.dumps()) == rec


@pytest.mark.parametrize("jitter_ms", [-1, 1, -REACQUIRE_SLACK_MS, REACQUIRE_SLACK_MS])
def test_millisecond_jitter_leaves_the_record_unchanged(jitter_ms):
    first = run(obs(pttl=LOCK_MS - 5000, hb=b"1.0", hb_pttl=HB_TTL_MS - 1000))
    again = run(
        obs(
            now=NOW + 7000,
            pttl=LOCK_MS - 12_000 + jitter_ms,
            hb=b"1.0",
            hb_pttl=HB_TTL_MS - 8000 - jitter_ms,
            record=first.record,
        )
    )
    assert again.record == first.record
    assert not again.new
