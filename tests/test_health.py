"""health.assess and overdue_s: pure functions, checked by tables (no Redis)."""

from __future__ import annotations

import pytest

from monitor.config import Settings
from monitor.health import State, assess, overdue_s
from monitor.holding import Heartbeat, Holding, Record
from monitor.policy import Action, Decision, Reason, Tier
from monitor.service import Verdict

# interval 30, warning 300, soft 600, hard 900; heartbeat interval 60 (key TTL 120), timeout 300
SETTINGS = Settings.from_mapping({}, env={})


def verdict(held_s: float, action: Action, reason: Reason, hb_age_s: float | None = None) -> Verdict:
    holding = Holding(
        key=b"gpu_lock:0",
        holder=b"locked_by_x",
        now_ms=0,
        held_ms=int(held_s * 1000),
        heartbeat=Heartbeat.NONE if hb_age_s is None else Heartbeat.DEAD,
        hb_age_ms=None if hb_age_s is None else int(hb_age_s * 1000),
        hb_value=None,
        hb_expiry_ms=-2,
        expiry_ms=-1,
        record=Record(holder=b"locked_by_x", expiry_ms=-1, first_seen_ms=0),
        new=False,
    )
    return Verdict(holding, Decision(action, Tier.OK, reason))


@pytest.mark.parametrize(
    ("v", "overdue"),
    [
        (verdict(100, Action.KEEP, Reason.WITHIN_LIMITS), None),
        (verdict(700, Action.KEEP, Reason.LONG_TASK_PROTECTED), None),
        (verdict(350, Action.WARN, Reason.WARNING_THRESHOLD), None),
        (verdict(950, Action.RELEASE, Reason.HARD_TIMEOUT), 50.0),
        (verdict(610, Action.RELEASE, Reason.SOFT_TIMEOUT_NO_HEARTBEAT), 10.0),
        # dead: releasable once its key expired (TTL 120 s < timeout 300 s)
        (verdict(50, Action.RELEASE, Reason.HEARTBEAT_DEAD, hb_age_s=150), 30.0),
        (verdict(50, Action.RELEASE, Reason.HEARTBEAT_DEAD, hb_age_s=100), 0.0),
        (verdict(50, Action.RELEASE, Reason.HEARTBEAT_DEAD), 0.0),  # age unknown: just now
    ],
)
def test_overdue_s(v, overdue):
    assert overdue_s(v, SETTINGS) == overdue


ZOMBIE = verdict(700, Action.RELEASE, Reason.SOFT_TIMEOUT_NO_HEARTBEAT)  # 100 s overdue
FRESH_ZOMBIE = verdict(610, Action.RELEASE, Reason.SOFT_TIMEOUT_NO_HEARTBEAT)  # 10 s: within grace
HELD = verdict(100, Action.KEEP, Reason.WITHIN_LIMITS)


@pytest.mark.parametrize(
    ("kw", "state", "reason"),
    [
        ({"redis_error": "Connection refused"}, State.CRITICAL, "redis unreachable: Connection refused"),
        ({"last_pass_age_s": None}, State.CRITICAL, "no monitor pass recorded recently (is the daemon running?)"),
        ({"last_pass_age_s": 161}, State.CRITICAL, "last successful pass 161 s ago"),  # > 5 x 30 + 10
        ({"failing_releases": 2}, State.CRITICAL, "2 release(s) failing"),
        (
            {"verdicts": [HELD, FRESH_ZOMBIE, ZOMBIE]},
            State.DEGRADED,
            "1 zombie lock(s) overdue for release, worst gpu_lock:0 by 100 s",
        ),
        ({"last_pass_age_s": 66}, State.DEGRADED, "last successful pass 66 s ago"),  # > 2 x 30 + 5
        ({"last_pass_age_s": 65}, State.HEALTHY, "0 lock(s), last pass 65.0 s ago"),
        ({"verdicts": [HELD, FRESH_ZOMBIE]}, State.HEALTHY, "2 lock(s), last pass 1.0 s ago"),
    ],
)
def test_assess(kw, state, reason):
    args = {"redis_error": None, "last_pass_age_s": 1.0, "failing_releases": 0, "verdicts": [], **kw}
    health = assess(SETTINGS, **args)
    assert (health.state, health.reason) == (state, reason)
    assert health.line == f"{state.name.lower()}: {reason}"
