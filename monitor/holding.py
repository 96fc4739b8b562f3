"""Held time and heartbeat state of one lock, from an observation and what was remembered.

All times are Redis `TIME` milliseconds; a worker's own clock is never read. Two sources
give the start of a holding: the lock's remaining PTTL against `gpu_lock.lock_timeout`
(workers SET EX lock_timeout and never renew), and the moment the monitor first saw this
value (kept in Redis, so it survives restarts and is shared by replicas). A PTTL that says
the lock was set later than the remembered start means the same value acquired it again.

A heartbeat is judged by its key, not its content: it is alive while it exists and changed
(or was set, by its own PTTL) within `heartbeat.timeout`; dead if it was seen during this
holding and then expired or went stale; none if it was never seen during this holding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import Enum

from monitor.scanner import Observation

# PTTL-derived times jitter by a millisecond between passes; a start this much later is a
# re-acquire, and smaller moves are not worth a write.
REACQUIRE_SLACK_MS = 1000


class Heartbeat(str, Enum):
    ALIVE = "alive"
    DEAD = "dead"
    NONE = "none"


@dataclass(frozen=True)
class Record:
    """What the monitor remembers about a holding between passes (and restarts)."""

    holder: bytes
    since_ms: int
    hb_seen: bool = False
    hb_value: bytes | None = None
    hb_refreshed_ms: int | None = None
    notified: frozenset[str] = field(default_factory=frozenset)

    def dumps(self) -> bytes:
        # latin-1 maps bytes to code points one to one, so any value survives JSON.
        return json.dumps(
            {
                "holder": self.holder.decode("latin-1"),
                "since_ms": self.since_ms,
                "hb_seen": self.hb_seen,
                "hb_value": None if self.hb_value is None else self.hb_value.decode("latin-1"),
                "hb_refreshed_ms": self.hb_refreshed_ms,
                "notified": sorted(self.notified),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def loads(cls, raw: bytes | None) -> Record | None:
        """The record, or None when absent or unreadable (then the holding starts afresh)."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            hb_value = data["hb_value"]
            return cls(
                holder=data["holder"].encode("latin-1"),
                since_ms=int(data["since_ms"]),
                hb_seen=bool(data["hb_seen"]),
                hb_value=None if hb_value is None else hb_value.encode("latin-1"),
                hb_refreshed_ms=None if data["hb_refreshed_ms"] is None else int(data["hb_refreshed_ms"]),
                notified=frozenset(data["notified"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass(frozen=True)
class Holding:
    """One lock as the policy sees it."""

    key: bytes
    holder: bytes
    now_ms: int
    held_ms: int
    heartbeat: Heartbeat
    hb_age_ms: int | None  # None: never seen during this holding
    hb_value: bytes | None  # the heartbeat as observed (the release script re-checks it)
    pttl_ms: int
    record: Record  # the updated record to persist
    new: bool  # this pass saw the holding for the first time

    @property
    def held_s(self) -> float:
        return self.held_ms / 1000

    @property
    def hb_age_s(self) -> float | None:
        return None if self.hb_age_ms is None else self.hb_age_ms / 1000


def track(obs: Observation, *, lock_timeout_ms: int, hb_ttl_ms: int, hb_timeout_ms: int) -> Holding:
    """Combine an observation of a present lock with its record. Pure."""
    assert obs.value is not None
    now = obs.now_ms
    prev = Record.loads(obs.record)
    ttl_start = _start_from_ttl(now, obs.pttl_ms, lock_timeout_ms)
    new = (
        prev is None
        or prev.holder != obs.value
        or (ttl_start is not None and ttl_start > prev.since_ms + REACQUIRE_SLACK_MS)
    )
    if new or prev is None:
        rec = Record(holder=obs.value, since_ms=now if ttl_start is None else ttl_start)
    elif ttl_start is not None and ttl_start < prev.since_ms - REACQUIRE_SLACK_MS:
        rec = replace(prev, since_ms=ttl_start)  # first seen without a TTL, older than it looked
    else:
        rec = prev  # PTTL-derived starts jitter by a millisecond; a steady holding is not rewritten

    if obs.hb_value is None:
        state = Heartbeat.DEAD if rec.hb_seen else Heartbeat.NONE
        refreshed = rec.hb_refreshed_ms
        rec = replace(rec, hb_value=None)
    else:
        ttl_set = _start_from_ttl(now, obs.hb_pttl_ms, hb_ttl_ms)
        if not rec.hb_seen or obs.hb_value != rec.hb_value:
            # A new value: refreshed since the last pass; its PTTL tells when, else assume now.
            refreshed = now if ttl_set is None else ttl_set
            refreshed = max(refreshed, rec.hb_refreshed_ms or refreshed)
        else:
            refreshed = rec.hb_refreshed_ms or now
            if ttl_set is not None and ttl_set > refreshed + REACQUIRE_SLACK_MS:
                refreshed = ttl_set  # the same value, re-set later (refreshed by EXPIRE alone)
        rec = replace(rec, hb_seen=True, hb_value=obs.hb_value, hb_refreshed_ms=refreshed)
        state = Heartbeat.ALIVE if now - refreshed <= hb_timeout_ms else Heartbeat.DEAD

    return Holding(
        key=obs.key,
        holder=obs.value,
        now_ms=now,
        held_ms=max(0, now - rec.since_ms),
        heartbeat=state,
        hb_age_ms=None if refreshed is None else max(0, now - refreshed),
        hb_value=obs.hb_value,
        pttl_ms=obs.pttl_ms,
        record=rec,
        new=new,
    )


def _start_from_ttl(now_ms: int, pttl_ms: int, full_ttl_ms: int) -> int | None:
    """When a key set with EX full_ttl was set, judged by its PTTL; None if PTTL cannot say."""
    if 0 < pttl_ms <= full_ttl_ms:
        return now_ms - (full_ttl_ms - pttl_ms)
    return None
