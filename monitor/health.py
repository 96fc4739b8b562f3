"""Health: healthy (0), degraded (1) or critical (2), with one line of reason.

One pure judgement (`assess`) serves `gpulock-monitor health` (`health_check`, from what the
daemon left in Redis) and the daemon's `/healthz` (from its own memory). The daemon's status
key (`gpulock_monitor:monitor:<monitor.name>`) holds its last pass, or, after a clean stop, that it
stopped (`mark_stopped`). UNKNOWN (3) is `health`'s own: it could not judge (a config it cannot
use, a file it cannot read), as Nagios plugins say.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

import redis

from monitor import protocol, snapshot, units
from monitor.config import Settings
from monitor.connection import Client, connect, redis_down
from monitor.policy import Action, Reason
from monitor.verdict import Verdict

# What the status key says after a clean stop (`state`); a pass's status has no `state`.
STOPPED = "stopped"


class State(IntEnum):
    HEALTHY = 0
    DEGRADED = 1
    CRITICAL = 2
    UNKNOWN = 3  # `health` could not judge: its own error, not the daemon's state


@dataclass(frozen=True)
class Health:
    state: State
    reason: str
    # Nagios performance data, where known: None leaves it out.
    locks: int | None = None
    zombies: int | None = None
    last_pass_age_s: float | None = None
    failing_releases: int | None = None
    # the thresholds of last_pass_age_s: degraded above the first, critical above the second
    age_limits_s: tuple[float, float] | None = None

    @property
    def line(self) -> str:
        return f"{self.state.name.lower()}: {self.reason}"

    @property
    def perfdata(self) -> str:
        """Nagios performance data (`label=value[UOM][;warn;crit]`), space separated: the pass age
        in seconds with the thresholds of degraded and critical."""
        parts = [
            f"{label}={value}"
            for label, value in (("locks", self.locks), ("zombies", self.zombies))
            if value is not None
        ]
        if self.last_pass_age_s is not None:
            limits = "".join(f";{limit:g}" for limit in self.age_limits_s or ())
            parts.append(f"last_pass_age={self.last_pass_age_s:.1f}s{limits}")
        if self.failing_releases is not None:
            parts.append(f"failing_releases={self.failing_releases}")
        return " ".join(parts)

    @property
    def nagios_line(self) -> str:
        """The line a Nagios-style check prints: the state and reason, then `|` and perfdata."""
        perf = self.perfdata
        return f"{self.line} | {perf}" if perf else self.line


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
    stopped: str | None = None,
    discovery: str | None = None,
) -> Health:
    """`redis_error`: Redis could not be asked; `redis_refused` says it answered with a refusal
    (an ACL's NOPERM, WRONGTYPE, ...) rather than being unreachable, loading or busy. Either way
    the monitor cannot do its work: critical. `stopped`: the daemon said it stopped cleanly (the
    reason to give): critical at once, not after its last pass goes stale."""
    interval = settings.monitor_interval_s
    if redis_error is not None:
        what = "redis refused the monitor's commands" if redis_refused else "redis unreachable"
        return Health(State.CRITICAL, f"{what}: {protocol.printable(redis_error, 300)}")
    verdicts = list(verdicts)
    grace = pass_grace_s(interval)
    zombies = sorted(
        ((o, v) for v in verdicts if (o := overdue_s(v, settings)) is not None and o > grace),
        key=lambda pair: -pair[0],
    )
    measured = Health(
        State.HEALTHY,
        "",
        locks=len(verdicts),
        zombies=len(zombies),
        last_pass_age_s=last_pass_age_s,
        failing_releases=failing_releases,
        age_limits_s=(grace, stale_after_s(interval)),
    )

    def judged(state: State, reason: str) -> Health:
        return replace(measured, state=state, reason=reason)

    if stopped is not None:
        return judged(State.CRITICAL, stopped)
    if last_pass_age_s is None:
        return judged(State.CRITICAL, "no monitor pass recorded recently (is the daemon running?)")
    if last_pass_age_s > stale_after_s(interval):
        return judged(State.CRITICAL, f"last successful pass {last_pass_age_s:.0f} s ago")
    if failing_releases:
        return judged(State.CRITICAL, f"{failing_releases} release(s) failing")
    if zombies:
        worst, v = zombies[0]
        return judged(
            State.DEGRADED,
            f"{len(zombies)} zombie lock(s) overdue for release, worst {protocol.text(v.holding.key)} by {worst:.0f} s",
        )
    if last_pass_age_s > grace:
        return judged(State.DEGRADED, f"last successful pass {last_pass_age_s:.0f} s ago")
    found = "" if discovery is None else f", locks found by {protocol.printable(discovery, 100)}"
    return judged(State.HEALTHY, f"{len(verdicts)} lock(s), last pass {last_pass_age_s:.1f} s ago{found}")


def stale_after_s(interval_s: float) -> float:
    """A last pass older than this is critical: the daemon is stuck or gone."""
    return 5 * interval_s + 10


def pass_grace_s(interval_s: float) -> float:
    """How long a pass may be late before the daemon counts as stalled (health, /livez, the
    systemd watchdog): two intervals, and slack for one slow pass."""
    return 2 * interval_s + 10


def health_check(settings: Settings, name: str | None = None) -> Health:
    """`gpulock-monitor health`: judge from what the daemon named `name` (default: this one's,
    `monitor.name` or the host name) left in Redis."""
    name = name or settings.name
    key = protocol.monitor_status_key(name)
    try:
        client = connect(settings)  # a Cluster asks its nodes here already
        pipe = client.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
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
    stopped = None
    discovery = None
    if raw is not None and pttl > 0:
        age = units.to_s(snapshot.status_ttl_ms(settings) - pttl)
        status = _document(raw)
        try:
            failing = int(status.get("failing_releases", 0))
        except (ValueError, TypeError):
            failing = 0
        discovery = status.get("discovery") if isinstance(status.get("discovery"), str) else None
        if status.get("state") == STOPPED:
            when = protocol.printable(str(status.get("stopped_at", "?")), 40)
            who = protocol.printable(name, 100)
            stopped = f"the daemon {who} stopped cleanly at {when} ({max(0.0, age):.0f} s ago)"
            age = None  # no pass is running: there is no last pass to age
    return assess(
        settings,
        redis_error=None,
        last_pass_age_s=age,
        failing_releases=failing,
        verdicts=snap.verdicts,
        stopped=stopped,
        discovery=discovery,
    )


def _document(raw: bytes) -> Mapping[str, Any]:
    try:
        status = json.loads(raw)
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def mark_stopped(client: Client, settings: Settings, identity: Mapping[str, Any], now: float) -> None:
    """At a clean stop: the status key says so, for `health` to tell at once (it would otherwise
    call the daemon healthy until its last pass went stale). Kept as long as a pass's status."""
    document = {**identity, "state": STOPPED, "stopped_at": units.iso(now), "failing_releases": 0}
    client.set(
        protocol.monitor_status_key(settings.name),
        json.dumps(document).encode(),
        px=snapshot.status_ttl_ms(settings),
    )
