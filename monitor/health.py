"""Health: healthy (0), degraded (1) or critical (2), with one line of reason.

One pure judgement (`assess`) serves `gpulock-monitor health` (`health_check`, from what the
daemon left in Redis) and the daemon's `/healthz` (from its own memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

import redis

from monitor import protocol, snapshot, units
from monitor.audit import monitor_identity
from monitor.config import Settings
from monitor.connection import connect, redis_down
from monitor.policy import Action, Reason
from monitor.verdict import Verdict


class State(IntEnum):
    HEALTHY = 0
    DEGRADED = 1
    CRITICAL = 2


@dataclass(frozen=True)
class Health:
    state: State
    reason: str

    @property
    def line(self) -> str:
        return f"{self.state.name.lower()}: {self.reason}"


def overdue_s(verdict: Verdict, settings: Settings) -> float | None:
    """How long a lock the rules release has been releasable; None when the rules keep it."""
    h, d = verdict.holding, verdict.decision
    if d.action is not Action.RELEASE:
        return None
    if d.reason is Reason.HARD_TIMEOUT:
        assert settings.hard_timeout_s is not None
        since = h.held_s - settings.hard_timeout_s
    elif d.reason is Reason.SOFT_TIMEOUT_NO_HEARTBEAT:
        since = h.held_s - settings.soft_timeout_s
    else:  # dead: its key expired (TTL) or went stale (timeout), whichever came first
        since = (h.hb_age_s or 0.0) - min(settings.heartbeat_ttl_s, settings.heartbeat_timeout_s)
    return max(0.0, since)


def assess(
    settings: Settings,
    *,
    redis_error: str | None,
    last_pass_age_s: float | None,
    failing_releases: int,
    verdicts: Iterable[Verdict],
    redis_refused: bool = False,
) -> Health:
    """`redis_error`: Redis could not be asked; `redis_refused` says it answered with a refusal
    (an ACL's NOPERM, WRONGTYPE, ...) rather than being unreachable, loading or busy. Either way
    the monitor cannot do its work: critical."""
    interval = settings.monitor_interval_s
    if redis_error is not None:
        what = "redis refused the monitor's commands" if redis_refused else "redis unreachable"
        return Health(State.CRITICAL, f"{what}: {protocol.printable(redis_error, 300)}")
    if last_pass_age_s is None:
        return Health(State.CRITICAL, "no monitor pass recorded recently (is the daemon running?)")
    if last_pass_age_s > 5 * interval + 10:
        return Health(State.CRITICAL, f"last successful pass {last_pass_age_s:.0f} s ago")
    if failing_releases:
        return Health(State.CRITICAL, f"{failing_releases} release(s) failing")
    verdicts = list(verdicts)
    grace = pass_grace_s(interval)
    zombies = sorted(
        ((o, v) for v in verdicts if (o := overdue_s(v, settings)) is not None and o > grace),
        key=lambda pair: -pair[0],
    )
    if zombies:
        worst, v = zombies[0]
        return Health(
            State.DEGRADED,
            f"{len(zombies)} zombie lock(s) overdue for release, worst {protocol.text(v.holding.key)} by {worst:.0f} s",
        )
    if last_pass_age_s > grace:
        return Health(State.DEGRADED, f"last successful pass {last_pass_age_s:.0f} s ago")
    return Health(State.HEALTHY, f"{len(verdicts)} lock(s), last pass {last_pass_age_s:.1f} s ago")


def pass_grace_s(interval_s: float) -> float:
    """How long a pass may be late before the daemon counts as stalled (health, /livez, the
    systemd watchdog): two intervals, and slack for one slow pass."""
    return 2 * interval_s + 10


def health_check(settings: Settings) -> Health:
    """`gpulock-monitor health`: judge from what the daemon on this host left in Redis."""
    host = str(monitor_identity()["host"])
    try:
        client = connect(settings)  # a Cluster asks its nodes here already
        pipe = client.pipeline(transaction=False)
        pipe.get(protocol.monitor_status_key(host))
        pipe.pttl(protocol.monitor_status_key(host))
        raw, pttl = pipe.execute()
        snap = snapshot.take(client, settings)
    except redis.RedisError as exc:  # unreachable, or any refusal (NOPERM, BUSY, WRONGTYPE...): critical
        return assess(
            settings,
            redis_error=str(exc),
            redis_refused=not redis_down(exc),
            last_pass_age_s=None,
            failing_releases=0,
            verdicts=[],
        )
    age = None
    failing = 0
    if raw is not None and pttl > 0:
        age = units.to_s(snapshot.status_ttl_ms(settings) - pttl)
        try:
            failing = int(json.loads(raw).get("failing_releases", 0))
        except (ValueError, AttributeError, TypeError):
            failing = 0
    return assess(settings, redis_error=None, last_pass_age_s=age, failing_releases=failing, verdicts=snap.verdicts)
