"""Observation: find every lock with SCAN and read it in batches, on Redis's clock.

A batch is one read-only Lua script, not a pipeline of five commands per lock: redis-py spends
most of a pass packing and parsing commands, and one script reply per 500 locks cuts a pass
over 10,000 locks several times over (see README "Performance"). The script also reads Redis
`TIME`, so every observation is stamped by the Redis clock at the moment its batch was read.

Round trips for one pass over N candidate keys in a keyspace of K keys:
ceil(K / SCAN_COUNT) + 1 SCAN calls (at least 1) and ceil(N / READ_BATCH) script calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from monitor import keys
from monitor.connection import Client, is_cluster

SCAN_COUNT = 5000
READ_BATCH = 500
_PER_KEY = 5  # lock value, lock PTTL, heartbeat value, heartbeat PTTL, monitor record

# KEYS[1] the monitor's holdings hash, then each lock key followed by its heartbeat key.
# A non-string key reads as the integer 0, which no GET can return.
READ_SCRIPT = """
local t = redis.call('TIME')
local out = {t[1], t[2]}
local function get(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then return 0 end
  return v
end
for i = 2, #KEYS, 2 do
  local lock, hb = KEYS[i], KEYS[i + 1]
  out[#out + 1] = get(lock)
  out[#out + 1] = redis.call('PTTL', lock)
  out[#out + 1] = get(hb)
  out[#out + 1] = redis.call('PTTL', hb)
  out[#out + 1] = redis.call('HGET', KEYS[1], lock)
end
return out
"""


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


def scan_candidates(client: Client, pattern: str) -> list[bytes]:
    """Every key matching `pattern` that could be a lock, deduplicated, in SCAN order."""
    seen: dict[bytes, None] = {}
    for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
        if keys.is_lock_candidate(key):
            seen.setdefault(key, None)
    return list(seen)


def read_locks(client: Client, candidates: Iterable[bytes]) -> list[Observation]:
    """Read every candidate, READ_BATCH keys per round trip; connection errors propagate."""
    read = _read_cluster_batch if is_cluster(client) else _read_batch
    observations: list[Observation] = []
    for batch in _batches(list(candidates), READ_BATCH):
        observations += read(client, batch)
    return observations


def _read_batch(client: Client, batch: list[bytes]) -> list[Observation]:
    script_keys = [keys.HOLDINGS_HASH]
    for key in batch:
        script_keys += [key, keys.heartbeat_key(key)]
    reply: list[Any] = client.register_script(READ_SCRIPT)(keys=script_keys)
    now_ms = int(reply[0]) * 1000 + int(reply[1]) // 1000
    return [_observation(key, now_ms, reply[2 + i * _PER_KEY : 2 + (i + 1) * _PER_KEY]) for i, key in enumerate(batch)]


def _read_cluster_batch(client: Client, batch: list[bytes]) -> list[Observation]:
    """In a cluster a script may only touch keys of one slot, and a lock, its heartbeat and the
    monitor's hash rarely share one: a pipeline instead, which redis-py splits by node (one
    round trip per node), after TIME from one node: cluster nodes' clocks agree to NTP accuracy,
    and a clock read just before the keys errs towards a younger lock."""
    seconds, micros = client.time()  # not allowed in a cluster pipeline; read just before it
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    pipe = client.pipeline()
    for key in batch:
        pipe.get(key)
        pipe.pttl(key)
        pipe.get(keys.heartbeat_key(key))
        pipe.pttl(keys.heartbeat_key(key))
    pipe.hmget(keys.HOLDINGS_HASH, batch)
    replies = pipe.execute(raise_on_error=False)
    records = _raise_if_error(replies[-1])
    observations = []
    for i, key in enumerate(batch):
        value, pttl, hb_value, hb_pttl = (_as_script_reply(r) for r in replies[i * 4 : (i + 1) * 4])
        observations.append(_observation(key, now_ms, [value, pttl, hb_value, hb_pttl, records[i]]))
    return observations


def _observation(key: bytes, now_ms: int, fields: list[Any]) -> Observation:
    value, pttl, hb_value, hb_pttl, record = fields
    if value == 0:  # a hash or list under the lock pattern is not a lock
        return Observation(key, now_ms, None, -2, None, -2, record, "not a string key")
    if hb_value == 0:  # a non-string heartbeat key proves nothing
        hb_value, hb_pttl = None, -2
    return Observation(key, now_ms, value, int(pttl), hb_value, int(hb_pttl), record)


def _as_script_reply(reply: Any) -> Any:
    """A pipeline reply as the read script would give it: WRONGTYPE becomes 0."""
    if isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE"):
        return 0
    return _raise_if_error(reply)


def _raise_if_error(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


def _batches(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
