"""Held time and heartbeat state of one holding, from an observation and what was remembered.

A holding is one acquisition: the lock's value together with its absolute expiry on Redis's
clock. Values repeat (task names), expiries do not: a re-acquire by the same task name, however
soon, has a later expiry and is a new holding with nothing inherited.

Held time is a lower bound the monitor can prove, on Redis's clock only. The holding began no
later than the first time a monitor saw it, and no later than `expiry - lock_timeout` (because
`gpu_lock.lock_timeout` is the shortest EX any worker uses). When the holding was absent at a
complete pass that began at T, it began after T; a TTL inference that dates it before T was made
with too long a `lock_timeout` and is dropped (a lock_timeout_mismatch).

A heartbeat belongs to a holding only when the monitor saw it appear or change while it watched the
holding, or keyspace events showed it written after the holding began: written during it. A
heartbeat that may be the previous holder's leftover protects the holding (it counts as alive) but
can never make it dead. Nor can any heartbeat of a holding that began while an earlier holder's
heartbeat was still being written (its lock ran out under it, or the monitor capped it alive): that
writer may still be beating on the shared key, so such a holding is "tainted" and left to the soft
and hard tiers. Liveness is read from the key, never from the worker's clock inside it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from monitor import units
from monitor.policy import Heartbeat
from monitor.protocol import fingerprint, promises
from monitor.scanner import Observation

_T = TypeVar("_T")

# What the release script leaves in the record key of a holding it released: "+" when the holder's
# heartbeat was still there at a release that ignored it (the hard cap, --force), "-" otherwise.
RELEASED_MARK = b"released"


_NOTHING: frozenset[str] = frozenset()  # one empty set for every record that notified nothing


@dataclass(frozen=True, slots=True)
class Record:
    """What monitors know about one holding, kept in Redis by the acting monitor.

    Only facts go here (what was seen, when, on Redis's clock), never conclusions that depend on
    a monitor's config, so replicas with other settings read the same record the same way.
    """

    holder: bytes  # protocol.fingerprint of the value: a hostile 10 MB value is not copied around
    expiry_ms: int  # with `holder`, the holding's identity; -1 for a lock without a TTL
    first_seen_ms: int
    after_ms: int | None = None  # absent at a complete pass that began then: began later
    hb_value: bytes | None = None  # the heartbeat at the last look, fingerprinted (None: absent)
    hb_expiry_ms: int | None = None
    hb_observed_ms: int | None = None  # when that heartbeat version was first seen
    hb_seen: bool = False  # a heartbeat of this holding was seen
    hb_refreshed_ms: int | None = None  # its last write, as late as the evidence allows
    hb_tainted: bool = False  # began while an earlier holder's heartbeat writer may have lived on
    seen_ms: int | None = None  # last look, for a lock without a TTL (whose identity repeats)
    notified: frozenset[str] = _NOTHING
    # The JSON, made once when first asked for: a steady pass compares records with what Redis holds.
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def ran_out_beating(self, now_ms: int) -> bool:
        """Its lock expired by its TTL with its heartbeat there at the last look (see `taints`)."""
        return self.hb_value is not None and 0 <= self.expiry_ms <= now_ms

    def is_holding(self, value: bytes, expiry_ms: int) -> bool:
        return self.holder == fingerprint(value) and self.expiry_ms == expiry_ms

    def dumps(self) -> bytes:
        data = self._json
        if data is None:
            data = self._encode()
            object.__setattr__(self, "_json", data)
        return data

    def _encode(self) -> bytes:
        # latin-1 maps bytes to code points one to one, so any value survives JSON.
        return json.dumps(
            {
                "holder": self.holder.decode("latin-1"),
                "expiry_ms": self.expiry_ms,
                "first_seen_ms": self.first_seen_ms,
                "after_ms": self.after_ms,
                "hb_value": None if self.hb_value is None else self.hb_value.decode("latin-1"),
                "hb_expiry_ms": self.hb_expiry_ms,
                "hb_observed_ms": self.hb_observed_ms,
                "hb_seen": self.hb_seen,
                "hb_refreshed_ms": self.hb_refreshed_ms,
                "hb_tainted": self.hb_tainted,
                "seen_ms": self.seen_ms,
                "notified": sorted(self.notified),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def loads(cls, raw: bytes | None) -> Record | None:
        """The record, or None when absent, a release mark or unreadable (then nothing is known)."""
        if raw is None or raw[1:] == RELEASED_MARK:
            return None
        return _parsed(raw)

    @classmethod
    def _parse(cls, raw: bytes) -> Record | None:
        try:
            data = json.loads(raw)
            hb_value = data["hb_value"]
            return cls(
                holder=data["holder"].encode("latin-1"),
                expiry_ms=int(data["expiry_ms"]),
                first_seen_ms=int(data["first_seen_ms"]),
                after_ms=_int_or_none(data["after_ms"]),
                hb_value=None if hb_value is None else hb_value.encode("latin-1"),
                hb_expiry_ms=_int_or_none(data["hb_expiry_ms"]),
                hb_observed_ms=_int_or_none(data["hb_observed_ms"]),
                hb_seen=bool(data["hb_seen"]),
                hb_refreshed_ms=_int_or_none(data["hb_refreshed_ms"]),
                hb_tainted=bool(data["hb_tainted"]),
                seen_ms=_int_or_none(data["seen_ms"]),
                notified=frozenset(str(n) for n in data["notified"]) or _NOTHING,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


# A record read again (by `status`, or a lock re-read after its own record changed elsewhere) is
# parsed once. A monitor's own records need no parse: `verdict.evaluate` recognises their bytes.
@functools.lru_cache(maxsize=512)
def _parsed(raw: bytes) -> Record | None:
    return Record._parse(raw)


_FIELDS: dict[type, tuple[str, ...]] = {}
_set = object.__setattr__


def evolve(obj: _T, **changes: Any) -> _T:
    """`dataclasses.replace` for the frozen Record and Holding, without running `__init__` (its
    frozen assignments were most of a pass over 10,000 locks). A Record's JSON is not carried."""
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls) if f.name != "_json")  # type: ignore[arg-type]
    new = object.__new__(cls)
    for name in names:
        _set(new, name, changes[name] if name in changes else getattr(obj, name))
    if cls is Record:
        _set(new, "_json", None)
    return new


def shifted(h: Holding, now_ms: int) -> Holding:
    """`h` looked at again at `now_ms` with nothing changed in Redis: only the clock moved."""
    moved = now_ms - h.now_ms
    age = None if h.hb_age_ms is None else h.hb_age_ms + moved
    return evolve(h, new=False, now_ms=now_ms, held_ms=h.held_ms + moved, hb_age_ms=age)


def taints(raw: bytes | None, now_ms: int) -> bool:
    """Whether what the record key held before a new holding says an earlier holder's heartbeat
    writer may still be running: the monitor released it ignoring a live heartbeat, or its lock
    ran out (not released) while its heartbeat was there at the last look."""
    if raw == b"+" + RELEASED_MARK:
        return True
    before = Record.loads(raw)
    return before is not None and before.ran_out_beating(now_ms)


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class Holding:
    """One lock as the policy sees it."""

    key: bytes
    holder: bytes
    now_ms: int
    held_ms: int  # a proven lower bound
    heartbeat: Heartbeat
    hb_age_ms: int | None  # None: no heartbeat of this holding known
    hb_value: bytes | None  # the heartbeat as observed (the release script re-checks it)
    hb_expiry_ms: int
    expiry_ms: int  # the lock's, as observed (the release script re-checks it)
    record: Record  # the updated record to persist
    new: bool  # this look is the first at this holding
    ttl_mismatch: bool = False  # the lock's TTL contradicts gpu_lock.lock_timeout

    @property
    def held_s(self) -> float:
        return units.to_s(self.held_ms)

    @property
    def hb_age_s(self) -> float | None:
        return None if self.hb_age_ms is None else units.to_s(self.hb_age_ms)

    @property
    def pttl_ms(self) -> int:
        return self.expiry_ms if self.expiry_ms < 0 else max(0, self.expiry_ms - self.now_ms)

    @property
    def id(self) -> int:
        """Which holding, for audit and alert deduplication: when a monitor first saw it."""
        return self.record.first_seen_ms


def track(
    obs: Observation,
    prev: Record | None,
    *,
    after_ms: int | None,
    lock_timeout_ms: int,
    hb_ttl_ms: int,
    hb_timeout_ms: int,
    tainted: bool = False,
) -> Holding:
    """Combine an observation of a present lock with what was known of it. Pure.

    `prev` is ignored unless it describes this very holding; `after_ms` is when the last
    complete pass that would have recorded this holding began (None: no such pass known);
    `tainted` says a new holding began under an earlier holder's live heartbeat (see `taints`).
    """
    assert obs.value is not None
    now = obs.now_ms
    if prev is not None and not prev.is_holding(obs.value, obs.expiry_ms):
        prev = None
    if prev is not None and prev.expiry_ms < 0 and after_ms is not None and (prev.seen_ms or 0) < after_ms:
        prev = None  # a lock without a TTL that a later complete pass did not see: it went and came back
    rec = prev or Record(
        holder=fingerprint(obs.value), expiry_ms=obs.expiry_ms, first_seen_ms=now, after_ms=after_ms, hb_tainted=tainted
    )
    if obs.expiry_ms < 0:
        rec = evolve(rec, seen_ms=now)
    latest_start = rec.first_seen_ms
    mismatch = False
    if obs.expiry_ms >= 0:
        ttl_start = obs.expiry_ms - lock_timeout_ms
        mismatch = rec.after_ms is not None and ttl_start < rec.after_ms
        if not mismatch:
            latest_start = min(latest_start, ttl_start)
    state, age, rec = _heartbeat(obs, rec, prev, hb_ttl_ms=hb_ttl_ms, hb_timeout_ms=hb_timeout_ms)
    # The record's equal objects where it has them: what is kept of 10,000 locks holds one of each.
    value = rec.holder if rec.holder == obs.value else obs.value
    hb_expiry_ms = obs.hb_expiry_ms if rec.hb_expiry_ms is None else rec.hb_expiry_ms
    return Holding(
        key=obs.key,
        holder=value,
        now_ms=now,
        held_ms=max(0, now - latest_start),
        heartbeat=state,
        hb_age_ms=age,
        hb_value=obs.hb_value,
        hb_expiry_ms=hb_expiry_ms,
        expiry_ms=rec.expiry_ms,
        record=rec,
        new=prev is None,
        ttl_mismatch=mismatch,
    )


def promised(obs: Observation) -> bool:
    """The lock's holder record is this holding's and promises heartbeats, read with the lock in one
    script: its holder wrote the first heartbeat with the lock (DESIGN.md section 2)."""
    return obs.record_atomic and obs.holder is not None and obs.value is not None and promises(obs.holder, obs.value)


def _heartbeat(
    obs: Observation, rec: Record, prev: Record | None, *, hb_ttl_ms: int, hb_timeout_ms: int
) -> tuple[Heartbeat, int | None, Record]:
    now = obs.now_ms
    if obs.hb_value is None:
        rec = evolve(rec, hb_value=None, hb_expiry_ms=None, hb_observed_ms=None)
        if not rec.hb_seen and not rec.hb_tainted and (obs.hb_written or promised(obs)):
            # Written and gone between two looks (keyspace events), or written with the lock by a
            # holder whose record promises heartbeats. Never where the holding began under an
            # earlier holder's live writer: that writer's last beat may be what just ran out.
            rec = evolve(rec, hb_seen=True)
        if not rec.hb_seen or rec.hb_tainted:
            return Heartbeat.NONE, None, rec
        # Seen during this holding, now gone: dead, whatever timestamp it last held.
        refreshed = rec.hb_refreshed_ms
        return Heartbeat.DEAD, None if refreshed is None else max(0, now - refreshed), rec
    hb = fingerprint(obs.hb_value)
    if prev is not None and prev.hb_value == hb and prev.hb_expiry_ms == obs.hb_expiry_ms:
        observed = prev.hb_observed_ms if prev.hb_observed_ms is not None else now
        hb_expiry = prev.hb_expiry_ms
        seen_change = False
    else:
        observed, hb_expiry = now, obs.hb_expiry_ms
        # It appeared or changed since a look during this holding: written during it.
        seen_change = prev is not None
    # Or keyspace events showed a write of it after the holding began, or the holder's record says
    # it wrote one with the lock (asked only of a holding whose heartbeat no look has proved yet).
    seen_change = seen_change or obs.hb_written or (not rec.hb_seen and promised(obs))
    # Workers set the key with EX 2 * heartbeat.interval, so its expiry dates the last write; that
    # date only ever makes it look fresher (an age to show), it proves nothing about whose it is.
    written = None
    if hb_expiry is not None and 0 <= obs.hb_expiry_ms - now <= hb_ttl_ms:
        written = hb_expiry - hb_ttl_ms
    rec = evolve(rec, hb_value=hb, hb_expiry_ms=hb_expiry, hb_observed_ms=observed)
    age = max(0, now - (written if written is not None else observed))
    if not (rec.hb_seen or seen_change) or rec.hb_tainted:
        # Maybe an earlier holder's: it protects, it never condemns.
        return Heartbeat.ALIVE, age, rec
    rec = evolve(rec, hb_seen=True, hb_refreshed_ms=now - age)
    # Stale only when watched unchanged past the timeout: never judged by the worker's clock.
    if now - max(observed, written if written is not None else observed) > hb_timeout_ms:
        return Heartbeat.DEAD, age, rec
    return Heartbeat.ALIVE, age, rec
