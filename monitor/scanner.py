"""Observation: find every lock with SCAN and read it, in pipelines, on Redis's clock.

Round trips for one pass over N candidate keys in a keyspace of K keys:
ceil(K / SCAN_COUNT) + 1 SCAN calls (at least 1) and ceil(N / READ_BATCH) read pipelines.
Each read pipeline carries TIME, so every observation is stamped by the Redis clock
at the moment its batch was read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis

from monitor import keys

SCAN_COUNT = 1000
READ_BATCH = 500
_PER_KEY = 5  # GET lock, PTTL lock, GET heartbeat, PTTL heartbeat, HGET record


@dataclass(frozen=True)
class Observation:
    """What one pass read about one candidate key. Pure data: no decisions here."""

    key: bytes
    now_ms: int
    value: bytes | None  # None: gone between SCAN and GET
    pttl_ms: int  # Redis PTTL: -1 no expiry, -2 gone
    hb_value: bytes | None  # None: absent, or not a string
    hb_pttl_ms: int
    record: bytes | None  # what the monitor persisted about this lock
    invalid: str | None = None  # why this key is not a lock (e.g. wrong type)


def scan_candidates(client: redis.Redis, pattern: str) -> list[bytes]:
    """Every key matching `pattern` that could be a lock, deduplicated, in SCAN order."""
    seen: dict[bytes, None] = {}
    for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
        if keys.is_lock_candidate(key):
            seen.setdefault(key, None)
    return list(seen)


def read_locks(client: redis.Redis, candidates: Iterable[bytes]) -> list[Observation]:
    """Read every candidate in pipelines of READ_BATCH keys; connection errors propagate."""
    observations: list[Observation] = []
    for batch in _batches(list(candidates), READ_BATCH):
        pipe = client.pipeline(transaction=False)
        pipe.time()
        for key in batch:
            hb_key = keys.heartbeat_key(key)
            pipe.get(key)
            pipe.pttl(key)
            pipe.get(hb_key)
            pipe.pttl(hb_key)
            pipe.hget(keys.HOLDINGS_HASH, key)
        replies = pipe.execute(raise_on_error=False)
        seconds, micros = _reply(replies[0])
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        for i, key in enumerate(batch):
            observations.append(_observation(key, now_ms, replies[1 + i * _PER_KEY : 1 + (i + 1) * _PER_KEY]))
    return observations


def _observation(key: bytes, now_ms: int, replies: list[object]) -> Observation:
    value, pttl, hb_value, hb_pttl, record = replies
    record = _reply(record)
    if _is_wrongtype(value):
        # A hash or list under the lock pattern is not a lock.
        return Observation(key, now_ms, None, -2, None, -2, record, invalid="not a string key")  # type: ignore[arg-type]
    if _is_wrongtype(hb_value):
        hb_value, hb_pttl = None, -2  # a non-string heartbeat key proves nothing
    value = _reply(value)
    hb_value = _reply(hb_value)
    return Observation(
        key=key,
        now_ms=now_ms,
        value=_bytes_or_none(value),
        pttl_ms=int(_reply(pttl)),  # type: ignore[call-overload]
        hb_value=_bytes_or_none(hb_value),
        hb_pttl_ms=int(_reply(hb_pttl)),  # type: ignore[call-overload]
        record=record,  # type: ignore[arg-type]
    )


def _reply(reply: object) -> object:
    """A pipeline reply, re-raising anything that is not a per-key type error."""
    if isinstance(reply, Exception):
        raise reply
    return reply


def _bytes_or_none(reply: object) -> bytes | None:
    return reply if isinstance(reply, bytes) else None


def _is_wrongtype(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE")


def _batches(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
