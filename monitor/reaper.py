"""The atomic release (DESIGN.md section 4): one Lua script re-checks and deletes.

The script is the whole owner check. Python never GETs and then DELs: between a pass's read
and this script the lock may have been released and re-acquired (by the same task name, so the
same value) or its heartbeat refreshed, and only a check inside Redis sees that. The holding is
checked by identity, value and absolute expiry, so a daemon paused for any length of time
between its read and this script cannot release a newer holding of the same value.

A release leaves a tombstone naming the attempt (who asked, for which holding) for
TOMBSTONE_TTL_MS: the same attempt repeated after a lost reply answers `released` again instead
of `gone`, without touching whatever holds the lock now.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum

import redis
from redis.crc import key_slot

from monitor import keys
from monitor.connection import Client, is_cluster
from monitor.errors import ReleaseError
from monitor.scanner import EXPIRY_LUA, FINGERPRINT_LUA, READ_SCRIPT

TOMBSTONE_TTL_MS = 600_000

# KEYS[1] lock, then what ARGV[9] names: "h" its heartbeat, "r" the holding's record and the
# tombstone key (in Redis Cluster a key in another slot is left out).
# ARGV[1] holder, ARGV[2] its expiry as observed (-1: no TTL), ARGV[3] "check" or "any" for the
# heartbeat, ARGV[4] heartbeat value as observed ("" absent), ARGV[5] its expiry, ARGV[6]
# channel, ARGV[7] notice, ARGV[8] tombstone ms, ARGV[10] the attempt (who, which holding).
RELEASE_SCRIPT = (
    EXPIRY_LUA
    + FINGERPRINT_LUA
    + """
local hb_key, rec_key, tomb_key, n = false, false, false, 2
if string.find(ARGV[9], 'h', 1, true) then hb_key = KEYS[n] n = n + 1 end
if string.find(ARGV[9], 'r', 1, true) then rec_key, tomb_key = KEYS[n], KEYS[n + 1] end
local tomb = ARGV[10] .. ':' .. ARGV[2] .. ':' .. fp(ARGV[1])
if tomb_key and redis.pcall('GET', tomb_key) == tomb then return {'released', ARGV[1], false} end
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' then return {'holder_changed', false, false} end
if not value then return {'gone', false, false} end
if value ~= ARGV[1] or expiry(KEYS[1]) ~= tonumber(ARGV[2]) then
  return {'holder_changed', value, false}
end
local hb = hb_key and redis.pcall('GET', hb_key)
if type(hb) == 'table' then hb = false end  -- not a string: no heartbeat, and not ours to delete
-- Gone since the read: still dead. Present: it must be the very write that was judged.
if ARGV[3] == 'check' and hb and (hb ~= ARGV[4] or expiry(hb_key) ~= tonumber(ARGV[5])) then
  return {'heartbeat_revived', value, false}
end
-- DEL first: where it is refused (a read-only replica after a failover, an ACL) the script
-- stops here, and no notice announces a lock that is still held.
redis.call('DEL', KEYS[1])
if hb then redis.pcall('DEL', hb_key) end
if rec_key then
  -- "+": released while its heartbeat was there and not judged dead; its writer may live on.
  local mark = (ARGV[3] == 'any' and hb) and '+released' or '-released'
  redis.pcall('SET', rec_key, mark, 'PX', ARGV[8])
  redis.pcall('SET', tomb_key, tomb, 'PX', ARGV[8])
end
local sent = redis.pcall('PUBLISH', ARGV[6], ARGV[7])
if type(sent) == 'table' then return {'released', value, sent.err} end
return {'released', value, false}
"""
)


class Outcome(str, Enum):
    RELEASED = "released"
    HOLDER_CHANGED = "holder_changed"
    HEARTBEAT_REVIVED = "heartbeat_revived"
    GONE = "gone"


class HeartbeatCheck(str, Enum):
    ANY = "any"  # the hard cap and operators: whatever the heartbeat does
    CHECK = "check"  # it must still be the write that was observed, or gone


@dataclass(frozen=True)
class ReleaseResult:
    outcome: Outcome
    current: bytes | None  # the value the script found (the new holder on holder_changed)
    notice_error: str | None = None  # the lock was deleted but the notice was refused


def notice(lock_key: bytes, holder: bytes, reason: str, timestamp: float) -> bytes:
    """The release notice in the workers' format (DESIGN.md section 2)."""
    return json.dumps(
        {
            "event_type": "lock_released",
            "lock_key": keys.text(lock_key),
            "task_name": keys.text(keys.task_name(holder)),
            "release_reason": reason,
            "timestamp": timestamp,
        }
    ).encode()


class Reaper:
    """Runs the release script through redis-py's Script (EVALSHA, reloaded on NOSCRIPT).

    The client must not retry commands by itself (connection.connect builds it so): a script
    whose reply was lost is not re-run blindly; the caller learns `ReplyLost` and a later call
    answers from the tombstone what the first did.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._cluster = is_cluster(client)
        self._script = client.register_script(RELEASE_SCRIPT)

    def release(
        self,
        lock_key: bytes,
        holder: bytes,
        expiry_ms: int,
        *,
        heartbeat: HeartbeatCheck = HeartbeatCheck.ANY,
        hb_value: bytes | None = None,
        hb_expiry_ms: int = -2,
        reason: str = "forced_by_monitor",
        attempt: str = "monitor",
        bookkeeping: bool = True,
    ) -> ReleaseResult:
        """Release the holding (`holder`, `expiry_ms`) of `lock_key` if it still holds the lock
        and, with HeartbeatCheck.CHECK, its heartbeat is gone or unchanged since it was read.

        `attempt` names who asks for which holding: the same attempt repeated after a lost reply
        is answered from the tombstone. Without `bookkeeping` (the worker client, whose ACL may
        not reach the monitor's keys) no record or tombstone is touched.

        Connection errors propagate as redis.ConnectionError / TimeoutError (the outcome is then
        unknown); an error raised by Redis for the script becomes ReleaseError.
        """
        hb_key = keys.heartbeat_key(lock_key)
        layout: dict[str, list[bytes]] = {"h": [hb_key]}
        if bookkeeping:
            layout["r"] = [keys.holding_key(lock_key), keys.released_key(lock_key)]
        if self._cluster:
            slot = key_slot(lock_key)
            if "r" in layout and key_slot(layout["r"][0]) != slot:
                del layout["r"]  # an odd key that no record key shares a slot with
            if key_slot(hb_key) != slot:
                # Keys not hash-tagged: the heartbeat is in another slot, out of the script's
                # reach. It is re-checked one round trip before (a refresh in that gap goes
                # unseen) and left to expire (README "Redis Cluster").
                if heartbeat is HeartbeatCheck.CHECK and self._heartbeat_moved(hb_key, hb_value, hb_expiry_ms):
                    return ReleaseResult(Outcome.HEARTBEAT_REVIVED, holder)
                del layout["h"]
        args = [
            holder,
            str(expiry_ms).encode(),
            heartbeat.value,
            hb_value or b"",
            str(hb_expiry_ms).encode(),
            keys.release_channel(lock_key),
            notice(lock_key, holder, reason, time.time()),
            TOMBSTONE_TTL_MS,
            "".join(layout),
            attempt,
        ]
        try:
            code, current, notice_error = self._script(
                keys=[lock_key, *(k for ks in layout.values() for k in ks)], args=args
            )
        except redis.ResponseError as exc:
            raise ReleaseError(f"release script failed: {exc}") from exc
        try:
            outcome = Outcome(code.decode())
        except ValueError:
            raise ReleaseError(f"release script answered {code!r}") from None
        error = notice_error.decode("utf-8", "backslashreplace") if notice_error else None
        return ReleaseResult(outcome, current or None, error)

    def _heartbeat_moved(self, hb_key: bytes, hb_value: bytes | None, hb_expiry_ms: int) -> bool:
        _, _, value, expiry = self._client.eval(READ_SCRIPT, 1, hb_key)
        if value == 0:
            value = None
        return value is not None and (value != hb_value or int(expiry) != hb_expiry_ms)
