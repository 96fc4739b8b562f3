"""The decision rules of DESIGN.md section 3, as one pure function. Imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Heartbeat(str, Enum):
    """What the heartbeat says of one holding (DESIGN.md section 3)."""

    ALIVE = "alive"
    DEAD = "dead"
    NONE = "none"


class Action(str, Enum):
    KEEP = "keep"
    WARN = "warn"
    RELEASE = "release"


class Tier(str, Enum):
    OK = "ok"
    WARNING = "warning"
    SOFT = "soft"
    HARD = "hard"


class Reason(str, Enum):
    HEARTBEAT_DEAD = "heartbeat_dead"
    HARD_TIMEOUT = "hard_timeout"
    SOFT_TIMEOUT_NO_HEARTBEAT = "soft_timeout_no_heartbeat"
    LONG_TASK_PROTECTED = "long_task_protected"
    WARNING_THRESHOLD = "warning_threshold"
    WITHIN_LIMITS = "within_limits"
    # A hung-holder finding whose `hang:` rule is release (monitor.hang.Finding names them).
    HOLDER_STALLED = "holder_stalled"
    HOLDER_NOT_ON_GPU = "holder_not_on_gpu"
    GPU_IDLE_HELD = "gpu_idle_held"
    GPU_FOREIGN_PROCESS = "gpu_foreign_process"
    GPU_XID = "gpu_xid"


@dataclass(frozen=True)
class Tiers:
    warning_s: float
    soft_s: float
    hard_s: float | None  # None: no cap


@dataclass(frozen=True)
class Decision:
    action: Action
    tier: Tier
    reason: Reason


def tier_of(held_s: float, tiers: Tiers) -> Tier:
    if tiers.hard_s is not None and held_s >= tiers.hard_s:
        return Tier.HARD
    if held_s >= tiers.soft_s:
        return Tier.SOFT
    if held_s >= tiers.warning_s:
        return Tier.WARNING
    return Tier.OK


def decide(held_s: float, heartbeat: Heartbeat, tiers: Tiers) -> Decision:
    """Keep, warn or release one lock; the rule numbers are those of DESIGN.md section 3."""
    tier = tier_of(held_s, tiers)
    if heartbeat is Heartbeat.DEAD:  # 1
        return Decision(Action.RELEASE, tier, Reason.HEARTBEAT_DEAD)
    if tier is Tier.HARD:  # 2
        return Decision(Action.RELEASE, tier, Reason.HARD_TIMEOUT)
    if tier is Tier.SOFT:
        if heartbeat is Heartbeat.NONE:  # 3
            return Decision(Action.RELEASE, tier, Reason.SOFT_TIMEOUT_NO_HEARTBEAT)
        return Decision(Action.KEEP, tier, Reason.LONG_TASK_PROTECTED)  # 4
    if tier is Tier.WARNING:  # 5
        return Decision(Action.WARN, tier, Reason.WARNING_THRESHOLD)
    return Decision(Action.KEEP, tier, Reason.WITHIN_LIMITS)  # 6
