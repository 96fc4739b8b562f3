"""The atomic release (DESIGN.md section 4): one Lua script re-checks and deletes.

The script is the whole owner check. Python never GETs and then DELs: between a pass's
read and this script, the lock may have been released and re-acquired (possibly by the same
task name) or its heartbeat refreshed, and only a check inside Redis sees that.
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

# KEYS[1] lock, KEYS[2] heartbeat (absent in the cluster fallback, see Reaper.release).
# ARGV[1] holder that must still hold the lock.
# ARGV[2] heartbeat check: "any" (do not check), "absent" (must not exist), "equal" (must equal ARGV[3]).
# ARGV[4] channel, ARGV[5] notice to publish on it.
# ARGV[6] the PTTL observed with the holder, or "" to skip: a TTL only ever falls, so a
#         higher one (or one that appeared) means the same value acquired the lock again.
RELEASE_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value then return {'gone', false} end
if value ~= ARGV[1] then return {'holder_changed', value} end
local seen_pttl = tonumber(ARGV[6])
if seen_pttl then
  local pttl = redis.call('PTTL', KEYS[1])
  if (seen_pttl < 0 and pttl >= 0) or (seen_pttl >= 0 and pttl > seen_pttl) then
    return {'holder_changed', value}
  end
end
local hb = false
if #KEYS > 1 then
  hb = redis.pcall('GET', KEYS[2])
  if type(hb) == 'table' then hb = false end
  if (ARGV[2] == 'absent' and hb) or (ARGV[2] == 'equal' and hb ~= ARGV[3]) then
    return {'heartbeat_revived', value}
  end
end
-- PUBLISH first: nobody can observe the order inside a script, and if it is refused
-- (ACL) the script stops before deleting anything, so a failure never half-releases.
redis.call('PUBLISH', ARGV[4], ARGV[5])
redis.call('DEL', KEYS[1])
if hb then redis.call('DEL', KEYS[2]) end
return {'released', value}
"""


class Outcome(str, Enum):
    RELEASED = "released"
    HOLDER_CHANGED = "holder_changed"
    HEARTBEAT_REVIVED = "heartbeat_revived"
    GONE = "gone"


class HeartbeatCheck(str, Enum):
    ANY = "any"
    ABSENT = "absent"
    EQUAL = "equal"


@dataclass(frozen=True)
class ReleaseResult:
    outcome: Outcome
    current: bytes | None  # the value the script found (the new holder on holder_changed)


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
    """Runs the release script through redis-py's Script (EVALSHA, reloaded on NOSCRIPT)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._cluster = is_cluster(client)
        self._script = client.register_script(RELEASE_SCRIPT)

    def release(
        self,
        lock_key: bytes,
        holder: bytes,
        *,
        heartbeat: HeartbeatCheck = HeartbeatCheck.ANY,
        hb_value: bytes | None = None,
        seen_pttl_ms: int | None = None,
        reason: str = "forced_by_monitor",
    ) -> ReleaseResult:
        """Release `lock_key` if `holder` still holds it (in the holding seen with
        `seen_pttl_ms`, when given) and the heartbeat check passes.

        Connection errors propagate as redis.ConnectionError / TimeoutError (the caller
        retries); an error raised by Redis for the script becomes ReleaseError.
        """
        args = [
            holder,
            heartbeat.value,
            hb_value or b"",
            keys.release_channel(lock_key),
            notice(lock_key, holder, reason, time.time()),
            b"" if seen_pttl_ms is None else str(seen_pttl_ms).encode(),
        ]
        script_keys = [lock_key, keys.heartbeat_key(lock_key)]
        if self._cluster and key_slot(lock_key) != key_slot(script_keys[1]):
            # Redis Cluster, keys not hash-tagged: lock and heartbeat live in different slots and
            # no script may touch both. The lock's checks stay atomic; the heartbeat is checked
            # just before (a refresh in the gap of one round trip goes unseen) and left to expire.
            if heartbeat is not HeartbeatCheck.ANY and self._client.get(script_keys[1]) != hb_value:
                return ReleaseResult(Outcome.HEARTBEAT_REVIVED, None)
            script_keys = script_keys[:1]
        try:
            code, current = self._script(keys=script_keys, args=args)
        except redis.ResponseError as exc:
            raise ReleaseError(f"release script failed: {exc}") from exc
        return ReleaseResult(Outcome(code.decode()), current or None)
