"""Judgement of every lock, shared by the daemon's pass, `status`, `health` and `release`. Pure.

From what was observed (and what monitors remembered of each holding) to a holding with its
held time and heartbeat state, and the rules' decision.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monitor import protocol, units
from monitor.config import Settings
from monitor.holding import Holding, Record, evolve, taints, track
from monitor.policy import Decision, Reason, Tiers, decide
from monitor.scanner import Observation


@dataclass(frozen=True, slots=True)
class Verdict:
    holding: Holding
    decision: Decision
    stored: bytes | None = None  # the record as read from Redis (compare-and-set against it)


def tiers(settings: Settings) -> Tiers:
    return Tiers(settings.warning_s, settings.soft_timeout_s, settings.hard_timeout_s)


def evaluate(
    observations: list[Observation],
    settings: Settings,
    *,
    after_ms: int | None = None,
    remembered: Mapping[bytes, Record] | None = None,
) -> list[Verdict]:
    """Holdings and decisions for every present, valid lock. Pure.

    A holding's record is the one read from Redis, else the one in `remembered` (what this
    monitor saw); what either says was already audited counts. `after_ms` is when the last
    complete pass that recorded every holding then present began.
    """
    limits = tiers(settings)
    remembered = remembered or {}
    verdicts = []
    for obs in observations:
        if obs.invalid or obs.value is None:
            continue
        mine = remembered.get(obs.key)
        # What this monitor wrote reads back as the record it keeps: no parse (most locks a pass reads).
        stored = mine if mine is not None and obs.record is not None and obs.record == mine._json else None
        if stored is None:
            stored = Record.loads(obs.record)
        if obs.relocked and obs.expiry_ms < 0:
            stored = mine = None  # set again since the last look: what was known is of another holding
        ours = [r for r in (stored, mine) if r is not None and r.is_holding(obs.value, obs.expiry_ms)]
        prev = ours[0] if ours else None
        if prev is not None and len(ours) == 2 and not ours[1].notified <= prev.notified:
            prev = evolve(prev, notified=prev.notified | ours[1].notified)
        # Only a new holding can be tainted by what came before it.
        tainted = prev is None and (
            obs.hb_tainted or taints(obs.record, obs.now_ms) or (mine is not None and mine.ran_out_beating(obs.now_ms))
        )
        holding = track(
            obs,
            prev,
            after_ms=after_ms,
            lock_timeout_ms=units.to_ms(settings.lock_timeout_s),
            hb_ttl_ms=protocol.heartbeat_ttl_ms(settings.heartbeat_interval_s),
            hb_timeout_ms=units.to_ms(settings.heartbeat_timeout_s),
            tainted=tainted,
        )
        decision = decide(holding.held_s, holding.heartbeat, limits)
        verdicts.append(Verdict(holding, _DECISIONS.setdefault(decision, decision), obs.record))
    return verdicts


# Decisions repeat: one object for each, however many locks share it.
_DECISIONS: dict[Decision, Decision] = {}


def lock_fields(verdict: Verdict, *, dry_run: bool) -> dict[str, Any]:
    """The lock part of an audit event (DESIGN.md section 7)."""
    h, d = verdict.holding, verdict.decision
    return {
        "lock_key": protocol.shown(h.key),
        "holder": protocol.shown(h.holder),
        "held_s": round(h.held_s, 3),
        "heartbeat": h.heartbeat.value,
        "heartbeat_age_s": None if h.hb_age_s is None else round(h.hb_age_s, 3),
        "tier": d.tier.value,
        "reason": d.reason.value,
        "dry_run": dry_run,
        # Which holding: Redis-clock ms when a monitor first saw it. Values repeat; this does not.
        "holding": h.id,
    }


def next_deadline_ms(verdict: Verdict, settings: Settings) -> int | None:
    """The next Redis-clock ms at which this holding's decision can change without any write to
    Redis: its heartbeat runs out, goes stale, or its held time crosses a tier. None: never. Pure.

    A key is gone only after its expiry ms (Redis expires when now > expiry), hence the + 1.
    """
    h = verdict.holding
    now = h.now_ms
    hb_timeout_ms, tiers_ms = _bounds_ms(
        settings.heartbeat_timeout_s, settings.warning_s, settings.soft_timeout_s, settings.hard_timeout_s
    )
    start = now - h.held_ms
    candidates = [start + tier_ms for tier_ms in tiers_ms]
    if settings.hard_timeout_s is None:  # a protected task past twice soft_timeout is said (long_task_overrun)
        candidates.append(start + units.to_ms(2 * settings.soft_timeout_s))
    if h.expiry_ms >= 0:
        candidates.append(h.expiry_ms + 1)  # gone then, with or without an `expired` event
    if h.hb_value is not None:
        if h.hb_expiry_ms >= 0:
            candidates.append(h.hb_expiry_ms + 1)
        observed = h.record.hb_observed_ms
        if h.record.hb_seen and observed is not None:  # stale once watched unchanged this long
            candidates.append(observed + hb_timeout_ms + 1)
    return min((c for c in candidates if c > now), default=None)


@functools.lru_cache(maxsize=16)
def _bounds_ms(hb_timeout_s: float, *tiers_s: float | None) -> tuple[int, tuple[int, ...]]:
    return units.to_ms(hb_timeout_s), tuple(units.to_ms(t) for t in tiers_s if t is not None)


def due_ms(verdict: Verdict, before: Record | None, settings: Settings) -> int | None:
    """When the release the rules now decide fell due (Redis-clock ms), where the monitor can
    tell: the heartbeat's expiry or staleness as last seen (`before`), or the tier's boundary.
    `now - due` is how late the monitor acted (README "How it finds locks"). Pure."""
    h, reason = verdict.holding, verdict.decision.reason
    start = h.now_ms - h.held_ms
    if reason is Reason.HARD_TIMEOUT and settings.hard_timeout_s is not None:
        return start + units.to_ms(settings.hard_timeout_s)
    if reason is Reason.SOFT_TIMEOUT_NO_HEARTBEAT:
        return start + units.to_ms(settings.soft_timeout_s)
    if reason is not Reason.HEARTBEAT_DEAD or before is None or not before.is_holding(h.holder, h.expiry_ms):
        return None
    if h.hb_value is None and before.hb_expiry_ms is not None and before.hb_expiry_ms >= 0:
        return before.hb_expiry_ms  # it ran out then
    if before.hb_observed_ms is not None:
        return before.hb_observed_ms + units.to_ms(settings.heartbeat_timeout_s)  # it went stale then
    return None
