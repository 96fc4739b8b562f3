"""Observation: find every lock with SCAN and read it in batches, on Redis's clock.

A batch is one read-only Lua script, not a pipeline of commands per lock: redis-py spends
most of a pass packing and parsing commands, and one script reply per 500 locks cuts a pass
over 10,000 locks several times over (see README "Performance"). The script also reads Redis
`TIME`, so every observation is stamped by the Redis clock at the moment its batch was read.

A key's expiry is read as an absolute Redis-clock millisecond, exactly (PEXPIRETIME where the
server has it, TIME + PTTL otherwise): together with the value it is the identity of a holding
(DESIGN.md section 3), which a remaining TTL alone is not.

Round trips for one pass over N candidate keys in a keyspace of K keys:
ceil(K / SCAN_COUNT) + 1 SCAN calls (at least 1, the first with TIME) and ceil(N / READ_BATCH)
script calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot
from redis.exceptions import NoScriptError

from monitor import protocol, units
from monitor.connection import Client, is_cluster

SCAN_COUNT = 5000
READ_BATCH = 500


@dataclass(frozen=True)
class Observation:
    """What one pass read about one candidate key. Pure data: no decisions here."""

    key: bytes
    now_ms: int
    value: bytes | None  # None: gone between SCAN and GET
    expiry_ms: int  # absolute Redis-clock ms; -1 no expiry, -2 gone
    hb_value: bytes | None  # None: absent, or not a string
    hb_expiry_ms: int
    record: bytes | None  # what the monitor persisted about the holding (protocol.holding_key)
    invalid: str | None = None  # why this key is not a lock (e.g. wrong type)
    # Keyspace events prove a heartbeat write after this holding began and before this read.
    hb_written: bool = False
    # Keyspace events changed the lock since it was last read: for a lock without a TTL, a new holding.
    relocked: bool = False
    # Keyspace events showed a heartbeat key there when this holding began: an earlier holder's
    # writer may still beat on it, so no heartbeat can condemn this holding (holding.taints).
    hb_tainted: bool = False
    # The holder record (`<lock>:holder`) as read, when the holder wrote one (DESIGN.md section 2).
    holder: bytes | None = None
    # It was read in the same atomic read as the lock and its heartbeat: only then can its promise
    # of heartbeats count (holding.promised, judged only where it matters).
    record_atomic: bool = False

    @property
    def pttl_ms(self) -> int:
        """The lock's remaining TTL as PTTL would say it."""
        return self.expiry_ms if self.expiry_ms < 0 else max(0, self.expiry_ms - self.now_ms)


def scan_candidates(client: Client, pattern: str) -> list[bytes]:
    """Every key matching `pattern` that could be a lock, deduplicated, in SCAN order."""
    seen: dict[bytes, None] = {}
    for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
        if protocol.is_lock_candidate(key):
            seen.setdefault(key, None)
    return list(seen)


def read_locks(
    client: Client, candidates: Iterable[bytes], *, mark: tuple[bytes, bytes] | None = None
) -> list[Observation]:
    """Read every candidate, READ_BATCH keys per round trip; connection errors propagate.

    With `mark` (channel, message; at most READ_BATCH candidates, standalone Redis) the read
    ends by publishing the message on the channel, in the same script (see watcher.py)."""
    if mark is not None:
        return _read_batch(client, list(candidates), mark)
    read = _read_cluster_batch if is_cluster(client) else _read_batch
    observations: list[Observation] = []
    for batch in _batches(list(candidates), READ_BATCH):
        observations += read(client, batch)
    return observations


def _lock_keys(key: bytes) -> list[bytes]:
    return [key, protocol.heartbeat_key(key), protocol.holding_key(key), protocol.holder_key(key)]


_FIELDS = 2 * len(protocol.READ_WANT)


def _read_batch(client: Client, batch: list[bytes], mark: tuple[bytes, bytes] | None = None) -> list[Observation]:
    script_keys = [k for key in batch for k in _lock_keys(key)]
    args: list[bytes | str] = [protocol.READ_WANT * len(batch)]
    if mark is not None:
        args += mark
    read = client.register_script(protocol.READ_SCRIPT)
    reply: list[Any] = read(keys=script_keys, args=args)
    now_ms = units.ms_of_time(reply[0], reply[1])
    return [_observation(key, now_ms, reply[2 + i * _FIELDS : 2 + (i + 1) * _FIELDS]) for i, key in enumerate(batch)]


def _read_cluster_batch(client: Client, batch: list[bytes]) -> list[Observation]:
    """In a cluster a script may only touch keys of one slot: one script call per slot's keys of
    each lock (the lock and its record share a slot; an untagged heartbeat is elsewhere), in a
    pipeline that redis-py splits by node. Nodes' clocks agree to NTP accuracy. The script goes
    by its digest (SCRIPT LOAD reaches every primary), loaded again once if a node lost it."""
    sha = hashlib.sha1(protocol.READ_SCRIPT.encode(), usedforsecurity=False).hexdigest()
    groups: list[tuple[list[bytes], str]] = []  # keys of one slot, and what to read of each
    for key in batch:
        by_slot: dict[int, tuple[list[bytes], list[str]]] = {}
        for k, want in zip(_lock_keys(key), protocol.READ_WANT, strict=True):
            ks, wants = by_slot.setdefault(key_slot(k), ([], []))
            ks.append(k)
            wants.append(want)
        groups += [(ks, "".join(wants)) for ks, wants in by_slot.values()]
    for attempt in range(2):
        pipe = client.pipeline()
        for group, want in groups:
            pipe.execute_command("EVALSHA", sha, len(group), *group, want)  # ClusterPipeline has no evalsha()
        replies = pipe.execute(raise_on_error=False)
        if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
            client.script_load(protocol.READ_SCRIPT)
            continue
        break
    found: dict[bytes, tuple[int, Any, Any]] = {}
    for (group, _), reply in zip(groups, replies, strict=True):
        if isinstance(reply, Exception):
            raise reply
        for i, k in enumerate(group):
            found[k] = (units.ms_of_time(reply[0], reply[1]), reply[2 + 2 * i], reply[3 + 2 * i])
    observations = []
    for key in batch:
        keys = _lock_keys(key)
        lock, hb, rec, own = (found[k] for k in keys)
        # Only a read of one slot is one moment: a promise read apart from the lock proves nothing.
        atomic = key_slot(keys[1]) == key_slot(keys[3]) == key_slot(key)
        fields = [lock[1], lock[2], hb[1], hb[2], rec[1], rec[2], own[1], own[2]]
        observations.append(_observation(key, lock[0], fields, atomic=atomic))
    return observations


def _observation(key: bytes, now_ms: int, fields: list[Any], *, atomic: bool = True) -> Observation:
    value, expiry, hb_value, hb_expiry, record, _, holder, _ = fields
    if value == 0:  # a hash or list under the lock pattern is not a lock
        return Observation(key, now_ms, None, -2, None, -2, None, "not a string key")
    if hb_value == 0:  # a non-string heartbeat key proves nothing
        hb_value, hb_expiry = None, -2
    holder = holder if isinstance(holder, bytes) else None
    return Observation(
        key,
        now_ms,
        value,
        int(expiry),
        hb_value,
        int(hb_expiry),
        record if isinstance(record, bytes) else None,
        holder=holder,
        record_atomic=atomic and holder is not None,
    )


def _batches(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
