"""The decision rules of DESIGN.md section 3, as a table. No Redis."""

import pytest

from monitor.policy import Action, Heartbeat, Reason, Tier, Tiers, decide, tier_of

T = Tiers(warning_s=300, soft_s=600, hard_s=900)
NO_CAP = Tiers(warning_s=300, soft_s=600, hard_s=None)
ALIVE, DEAD, NONE = Heartbeat.ALIVE, Heartbeat.DEAD, Heartbeat.NONE
KEEP, WARN, RELEASE = Action.KEEP, Action.WARN, Action.RELEASE


@pytest.mark.parametrize(
    ("held_s", "heartbeat", "tiers", "action", "tier", "reason"),
    [
        # rule 1: a dead heartbeat releases now, in every tier
        (0, DEAD, T, RELEASE, Tier.OK, Reason.HEARTBEAT_DEAD),
        (299.999, DEAD, T, RELEASE, Tier.OK, Reason.HEARTBEAT_DEAD),
        (300, DEAD, T, RELEASE, Tier.WARNING, Reason.HEARTBEAT_DEAD),
        (600, DEAD, T, RELEASE, Tier.SOFT, Reason.HEARTBEAT_DEAD),
        (900, DEAD, T, RELEASE, Tier.HARD, Reason.HEARTBEAT_DEAD),
        (5000, DEAD, NO_CAP, RELEASE, Tier.SOFT, Reason.HEARTBEAT_DEAD),
        # rule 2: the hard cap releases whatever the heartbeat says
        (900, ALIVE, T, RELEASE, Tier.HARD, Reason.HARD_TIMEOUT),
        (900, NONE, T, RELEASE, Tier.HARD, Reason.HARD_TIMEOUT),
        (10_000, ALIVE, T, RELEASE, Tier.HARD, Reason.HARD_TIMEOUT),
        (899.999, ALIVE, T, KEEP, Tier.SOFT, Reason.LONG_TASK_PROTECTED),
        # hard_timeout: null disables the cap
        (10_000, ALIVE, NO_CAP, KEEP, Tier.SOFT, Reason.LONG_TASK_PROTECTED),
        (10_000, NONE, NO_CAP, RELEASE, Tier.SOFT, Reason.SOFT_TIMEOUT_NO_HEARTBEAT),
        # rule 3: past soft with no heartbeat ever seen
        (600, NONE, T, RELEASE, Tier.SOFT, Reason.SOFT_TIMEOUT_NO_HEARTBEAT),
        (899.999, NONE, T, RELEASE, Tier.SOFT, Reason.SOFT_TIMEOUT_NO_HEARTBEAT),
        (599.999, NONE, T, WARN, Tier.WARNING, Reason.WARNING_THRESHOLD),
        # rule 4: past soft, alive: protected
        (600, ALIVE, T, KEEP, Tier.SOFT, Reason.LONG_TASK_PROTECTED),
        # rule 5: warning tier
        (300, ALIVE, T, WARN, Tier.WARNING, Reason.WARNING_THRESHOLD),
        (300, NONE, T, WARN, Tier.WARNING, Reason.WARNING_THRESHOLD),
        (599.999, ALIVE, T, WARN, Tier.WARNING, Reason.WARNING_THRESHOLD),
        # rule 6: within limits
        (0, ALIVE, T, KEEP, Tier.OK, Reason.WITHIN_LIMITS),
        (0, NONE, T, KEEP, Tier.OK, Reason.WITHIN_LIMITS),
        (299.999, ALIVE, T, KEEP, Tier.OK, Reason.WITHIN_LIMITS),
        (299.999, NONE, T, KEEP, Tier.OK, Reason.WITHIN_LIMITS),
    ],
)
def test_each_held_time_and_heartbeat_gets_the_design_rules_decision(held_s, heartbeat, tiers, action, tier, reason):
    decision = decide(held_s, heartbeat, tiers)
    assert (decision.action, decision.tier, decision.reason) == (action, tier, reason)


@pytest.mark.parametrize(
    ("held_s", "tier"),
    [(0, Tier.OK), (299.9, Tier.OK), (300, Tier.WARNING), (600, Tier.SOFT), (900, Tier.HARD), (1e9, Tier.HARD)],
)
def test_each_tier_starts_at_its_threshold(held_s, tier):
    assert tier_of(held_s, T) is tier


def test_no_cap_never_reaches_hard():
    assert tier_of(1e12, NO_CAP) is Tier.SOFT
