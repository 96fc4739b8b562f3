"""Held time and heartbeat state from successive looks at one lock. No Redis: the clock is data.

Each scenario is a list of looks, fed to `track` one after the other with the record the previous
look produced, as successive passes (or a restarted monitor reading Redis) do. Times are seconds
relative to the last look; expiries are absolute, as the read script reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from monitor.holding import RELEASED_MARK, Record, taints, track
from monitor.policy import Heartbeat
from monitor.scanner import Observation

LOCK_MS = 600_000  # gpu_lock.lock_timeout: the shortest EX in use
HB_TTL_MS = 120_000  # 2 * heartbeat.interval
HB_TIMEOUT_MS = 300_000
NOW = 1_700_000_000_000
V = b"locked_by_tts"


def ms(seconds: float) -> int:
    return NOW + round(seconds * 1000)


@dataclass(frozen=True)
class Look:
    at: float  # seconds relative to NOW
    expiry: int  # absolute ms, -1 no TTL
    hb: bytes | None = None
    hb_expiry: int = -2
    value: bytes = V

    def observation(self, record: bytes | None = None) -> Observation:
        return Observation(b"gpu_lock:0", ms(self.at), self.value, self.expiry, self.hb, self.hb_expiry, record)


def lock(set_at: float, ex: float) -> int:
    """The absolute expiry of a lock SET with EX `ex` at `set_at`."""
    return ms(set_at + ex)


def run(*looks: Look, after: float | None = None, record: Record | None = None):
    holding = None
    prev = record
    for look in looks:
        holding = track(
            look.observation(),
            prev,
            after_ms=None if after is None else ms(after),
            lock_timeout_ms=LOCK_MS,
            hb_ttl_ms=HB_TTL_MS,
            hb_timeout_ms=HB_TIMEOUT_MS,
        )
        prev = holding.record
    assert holding is not None
    return holding


E600 = lock(-450, 600)  # set 450 s ago with the shortest EX
E1800 = lock(-100, 1800)  # set 100 s ago by a worker with a longer EX
E20 = lock(-0.5, 20)  # set 0.5 s ago with an EX shorter than configured (a misconfiguration)


# --- held time: a lower bound -----------------------------------------------------------------

HELD = [
    # (id, looks, after (s) or None, expected held s, mismatch)
    ("ttl inference, shortest EX", [Look(0, E600)], None, 450, False),
    ("longer EX: first sight only", [Look(0, E1800)], None, 0, False),
    ("longer EX: time since first sight", [Look(-42, E1800), Look(0, E1800)], None, 42, False),
    ("no TTL: first sight", [Look(-7, -1), Look(0, -1)], None, 7, False),
    ("shorter EX after a complete pass: first sight wins", [Look(0, E20)], -1, 0, True),
    ("shorter EX, later look", [Look(-3, E20), Look(0, E20)], -4, 3, True),
    ("shortest EX, set after a complete pass: consistent", [Look(0, lock(-0.5, 600))], -1, 0.5, False),
    ("ttl inference older than first sight", [Look(-10, E600), Look(0, E600)], None, 450, False),
    ("no pass known: the ttl inference stands", [Look(0, E20)], None, 580.5, False),
    ("pass long before: consistent", [Look(0, E600)], -3600, 450, False),
]


@pytest.mark.parametrize(("looks", "after", "held_s", "mismatch"), [h[1:] for h in HELD], ids=[h[0] for h in HELD])
def test_held_time_is_a_lower_bound(looks, after, held_s, mismatch):
    h = run(*looks, after=after)
    assert h.held_ms == round(held_s * 1000)
    assert h.ttl_mismatch is mismatch


@pytest.mark.parametrize(
    ("second", "new"),
    [
        (Look(0, E600), False),
        (Look(0, E600 + 1), True),  # re-acquired a millisecond later: a new holding
        (Look(0, lock(-0.001, 600)), True),  # re-acquired by the same task a moment ago
        (Look(0, -1), True),  # TTL gone: PERSIST or a new SET without EX
        (Look(0, E600, value=b"locked_by_asr"), True),
    ],
)
def test_identity_is_value_and_expiry(second, new):
    first = run(Look(-60, E600), after=-3600)
    h = run(second, record=first.record, after=-3600)
    assert h.new is new
    if new:
        assert h.record.first_seen_ms == NOW
        assert h.record.notified == frozenset()
    else:
        assert h.record.first_seen_ms == ms(-60)


def test_same_value_reacquired_after_a_release_starts_afresh():
    # The old holding had 500 s behind it and a warning; a new run of the same task took the
    # lock a millisecond after the old one let go: nothing of the old holding carries over.
    old = run(Look(-1, lock(-501, 600)))
    assert old.held_ms == 500_000
    warned = replace(old.record, notified=frozenset({"lock_warning"}))
    new = run(Look(0, lock(-0.001, 600)), record=warned)
    assert new.new
    assert new.held_ms == 1
    assert new.record.notified == frozenset()


def test_restart_keeps_first_sight_of_a_lock_without_ttl():
    first = run(Look(-700, -1))
    restarted = run(Look(0, -1), record=first.record)  # only what it reads back from Redis
    assert restarted.held_ms == 700_000


# --- heartbeat: belongs to the holding only when proven ------------------------------------------

HB_OLD = lock(-110, 120)  # a leftover: written 110 s ago by the previous holder
HB_FRESH = lock(-1, 120)  # written a second ago

HEARTBEAT = [
    # (id, looks, expected state, expected age s or None)
    ("never any", [Look(-5, E600), Look(0, E600)], Heartbeat.NONE, None),
    ("written after the lock (shortest EX)", [Look(0, lock(-60, 600), b"t", lock(-59, 120))], Heartbeat.ALIVE, 59),
    ("fresh, provably after the start", [Look(0, E600, b"t", HB_FRESH)], Heartbeat.ALIVE, 1),
    # The next holder (no heartbeat of its own) finds the previous holder's key...
    ("leftover present: protects", [Look(0, lock(-5, 600), b"t", HB_OLD)], Heartbeat.ALIVE, 110),
    # ...which then expires: the new holding never had a heartbeat, it is not dead.
    (
        "leftover expired: none, never dead",
        [Look(-5, lock(-10, 600), b"t", HB_OLD), Look(0, lock(-10, 600))],
        Heartbeat.NONE,
        None,
    ),
    (
        "leftover then the holder's own first beat",
        [Look(-5, lock(-10, 600), b"t", HB_OLD), Look(0, lock(-10, 600), b"u", lock(-1, 120))],
        Heartbeat.ALIVE,
        1,
    ),
    (
        "appeared during the holding, then expired",
        [Look(-200, E1800), Look(-150, E1800, b"t", lock(-151, 120)), Look(0, E1800)],
        Heartbeat.DEAD,
        151,
    ),
    (
        "refreshed by EXPIRE alone (same value, later expiry)",
        [Look(-100, E1800, b"t", lock(-101, 120)), Look(0, E1800, b"t", lock(-1, 120))],
        Heartbeat.ALIVE,
        1,
    ),
    (
        "unchanged past heartbeat.timeout: stale",
        [
            Look(-301, E1800, b"t", lock(-400, 10_000)),
            Look(-300, E1800, b"t", lock(-400, 10_000)),
            Look(0, E1800, b"t", lock(-400, 10_000)),
        ],
        Heartbeat.ALIVE,  # never proven to be this holding's: it protects, never condemns
        301,
    ),
]


@pytest.mark.parametrize(("looks", "state", "age_s"), [h[1:] for h in HEARTBEAT], ids=[h[0] for h in HEARTBEAT])
def test_heartbeat_state_and_age_follow_from_the_looks_at_a_holding(looks, state, age_s):
    h = run(*looks)
    assert h.heartbeat is state
    assert h.hb_age_ms == (None if age_s is None else round(age_s * 1000))


def test_leftover_written_in_the_millisecond_the_holding_began_is_no_proof():
    # Written with the lock by the reference client, or the previous holder's last beat in the
    # same millisecond: Redis cannot tell which. It protects; its first refresh proves it.
    first = run(Look(-1, lock(-60, 600), b"t", lock(-60, 120)))
    assert first.heartbeat is Heartbeat.ALIVE
    assert not first.record.hb_seen
    gone = run(Look(0, lock(-60, 600)), record=first.record)
    assert gone.heartbeat is Heartbeat.NONE
    refreshed = run(Look(0, lock(-60, 600), b"u", lock(-0.5, 120)), record=first.record)
    assert refreshed.record.hb_seen


def test_written_with_the_lock_then_refreshed_is_alive():
    set_at = -450
    looks = [
        Look(-60, lock(set_at, 600), b"1", lock(-61, 120)),
        Look(0, lock(set_at, 600), b"2", lock(-1, 120)),
    ]
    assert run(*looks).heartbeat is Heartbeat.ALIVE


@pytest.mark.parametrize(
    "values",
    [
        [b"1699999400.0", b"1700000600.0"],  # a worker clock 10 minutes off, either way
        [b"not a number", b"\xff\x00"],
    ],
)
def test_liveness_never_reads_the_workers_clock(values):
    looks = [Look(-60 + 60 * i, E1800, v, lock(-60 + 60 * i - 1, 120)) for i, v in enumerate(values)]
    h = run(*looks)
    assert h.heartbeat is Heartbeat.ALIVE
    assert h.hb_age_ms == 1000


def test_proven_heartbeat_that_expired_is_dead_whatever_it_said():
    looks = [Look(-130, E1800, b"9999999999", lock(-131, 120)), Look(-70, E1800, b"9999999999", lock(-71, 120))]
    h = run(*looks, Look(0, E1800))
    assert h.heartbeat is Heartbeat.DEAD
    assert h.hb_age_ms == 71_000  # its last write: 71 s ago, by its expiry


def test_proven_heartbeat_unchanged_past_timeout_is_dead():
    # Set once with a long expiry, never refreshed: dead when watched unchanged past the timeout.
    hb = lock(-1, 10_000)
    first = run(Look(-302, E1800), Look(-301, E1800, b"t", hb))  # appeared during the holding
    assert first.heartbeat is Heartbeat.ALIVE
    assert run(Look(0, E1800, b"t", hb), record=first.record).heartbeat is Heartbeat.DEAD
    assert run(Look(-1, E1800, b"t", hb), record=first.record).heartbeat is Heartbeat.ALIVE


def test_heartbeat_living_longer_than_configured_proves_nothing_by_its_expiry():
    # A worker with a longer heartbeat interval than heartbeat.interval: its expiry cannot date it.
    h = run(Look(0, lock(-5, 600), b"t", lock(-100, 400)))
    assert h.heartbeat is Heartbeat.ALIVE
    assert not h.record.hb_seen


def test_dead_survives_a_monitor_restart():
    seen = run(Look(-200, E1800), Look(-150, E1800, b"t", lock(-151, 120)))
    restarted = run(Look(0, E1800), record=seen.record)
    assert restarted.heartbeat is Heartbeat.DEAD


# --- records -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b"not json", b"{}", b'{"holder": 3}', b"[]", b"+" + RELEASED_MARK, b"-" + RELEASED_MARK]
)
def test_unreadable_record_or_tombstone_is_nothing_known(raw):
    assert Record.loads(raw) is None


def test_record_round_trips_any_bytes():
    rec = Record(
        holder=bytes(range(256)),
        expiry_ms=5,
        first_seen_ms=3,
        after_ms=1,
        hb_value=b'\n"\xff',
        hb_expiry_ms=9,
        hb_observed_ms=4,
        hb_seen=True,
        hb_refreshed_ms=7,
        notified=frozenset({"a"}),
    )
    assert Record.loads(rec.dumps()) == rec


def test_steady_holding_leaves_the_record_unchanged():
    hb = lock(-8, 120)
    first = run(Look(-7, E600, b"t", hb))
    again = run(Look(0, E600, b"t", hb), record=first.record)
    assert again.record == first.record
    assert not again.new


# --- an earlier holder's heartbeat writer may live on ----------------------------------------------


def test_lock_that_ran_out_under_a_beating_holder_taints_the_next_holding():
    # W1's lock expired by its TTL while W1 still ran and beat; W2 (no heartbeat) took the lock.
    # W1's beats change the shared key during W2's holding, then W1 stops: W2 is not dead.
    w1 = run(Look(-10, lock(-20, 12), b"1", lock(-10, 120)))
    assert w1.heartbeat is Heartbeat.ALIVE
    assert taints(w1.record.dumps(), ms(-5))  # expired at -8 with its heartbeat there
    w2_expiry = lock(-7, 1800)
    looks = [
        Look(-5, w2_expiry, b"2", lock(-6, 120)),  # W1's beat after W2 began
        Look(-3, w2_expiry, b"3", lock(-4, 120)),
        Look(0, w2_expiry),  # W1 stopped; its key is gone
    ]
    holding = None
    for i, look in enumerate(looks):
        holding = track(
            look.observation(),
            holding.record if holding else None,
            after_ms=None,
            lock_timeout_ms=LOCK_MS,
            hb_ttl_ms=HB_TTL_MS,
            hb_timeout_ms=HB_TIMEOUT_MS,
            tainted=i == 0,
        )
    assert holding is not None
    assert holding.heartbeat is Heartbeat.NONE  # left to the soft and hard tiers


@pytest.mark.parametrize(
    ("raw_before", "tainted"),
    [
        (b"+" + RELEASED_MARK, True),  # capped or forced while its heartbeat was there
        (b"-" + RELEASED_MARK, False),  # released dead
        (None, False),
        (Record(V, lock(-20, 30), ms(-20), hb_value=b"t", hb_expiry_ms=lock(-1, 120)).dumps(), False),  # released
        (Record(V, lock(-20, 12), ms(-20), hb_value=b"t", hb_expiry_ms=lock(-1, 120)).dumps(), True),  # ran out
        (Record(V, lock(-20, 12), ms(-20)).dumps(), False),  # ran out, no heartbeat at the last look
    ],
)
def test_only_a_release_or_run_out_under_a_live_heartbeat_taints_the_next_holding(raw_before, tainted):
    assert taints(raw_before, NOW) is tainted


def test_heartbeat_with_a_longer_interval_than_configured_never_condemns_the_next_holder():
    # W1 beats with EX 4 s (interval 2) where the monitor is told 1 s (EX 2): its leftover, as it
    # ages, looks written after W2 began by its expiry. Only a change the monitor saw proves anything.
    w2 = lock(-3.5, 600)
    leftover = lock(-4, 4)
    h = run(Look(-1.5, w2, b"t", leftover), Look(-0.5, w2, b"t", leftover), Look(0, w2))
    assert h.heartbeat is Heartbeat.NONE


def test_lock_without_ttl_gone_at_a_complete_pass_and_back_is_a_new_holding():
    # Same value, no TTL: the identity repeats, so a complete pass that did not see it ends it.
    first = run(Look(-100, -1))
    back = run(Look(0, -1), record=first.record, after=-50)
    assert back.new
    assert back.held_ms == 0
    seen_by_it = run(Look(-49, -1), record=first.record, after=-120)
    still = run(Look(0, -1), record=seen_by_it.record, after=-50)  # that pass saw it: continues
    assert not still.new
    assert still.held_ms == 100_000
