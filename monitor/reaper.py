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

import time
from dataclasses import dataclass
from typing import TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from monitor import protocol
from monitor.errors import ReleaseError

# A plain (or Sentinel-found) Redis, or a Redis Cluster: connection.Client, spelled here so that
# the worker client, which releases through this module, loads no config or connection code.
Client: TypeAlias = "redis.Redis | RedisCluster"


@dataclass(frozen=True)
class ReleaseResult:
    outcome: protocol.Outcome
    current: bytes | None  # the value the script found (the new holder on holder_changed)
    notice_error: str | None = None  # the lock was deleted but the protocol.notice was refused


class Reaper:
    """Runs the release script through redis-py's Script (EVALSHA, reloaded on NOSCRIPT).

    The client must not retry commands by itself (connection.connect builds it so): a script
    whose reply was lost is not re-run blindly; the caller learns `ReplyLost` and a later call
    answers from the tombstone what the first did.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._script = client.register_script(protocol.RELEASE_SCRIPT)

    def release(
        self,
        lock_key: bytes,
        holder: bytes,
        expiry_ms: int,
        *,
        heartbeat: protocol.HeartbeatCheck = protocol.HeartbeatCheck.ANY,
        hb_value: bytes | None = None,
        hb_expiry_ms: int = -2,
        reason: str = "forced_by_monitor",
        attempt: str = "monitor",
        bookkeeping: bool = True,
    ) -> ReleaseResult:
        """Release the holding (`holder`, `expiry_ms`) of `lock_key` if it still holds the lock
        and, with protocol.HeartbeatCheck.CHECK, its heartbeat is gone or unchanged since it was read.

        `attempt` names who asks for which holding: the same attempt repeated after a lost reply
        is answered from the tombstone. Without `bookkeeping` (the worker client, whose ACL may
        not reach the monitor's keys) no record or tombstone is touched.

        Connection errors propagate as redis.ConnectionError / TimeoutError (the outcome is then
        unknown); an error raised by Redis for the script becomes ReleaseError.
        """
        hb_key = protocol.heartbeat_key(lock_key)
        layout: dict[str, list[bytes]] = {"h": [hb_key]}
        if bookkeeping:
            layout["r"] = [protocol.holding_key(lock_key), protocol.released_key(lock_key)]
            layout["o"] = [protocol.holder_key(lock_key)]  # a worker drops its own (token-checked)
        if self._cluster:
            slot = key_slot(lock_key)
            if "r" in layout and key_slot(layout["r"][0]) != slot:
                del layout["r"]  # an odd key that no record key shares a slot with
            if "o" in layout and key_slot(layout["o"][0]) != slot:
                del layout["o"]  # untagged keys: the holder record expires with the lock's old expiry
            if key_slot(hb_key) != slot:
                # Keys not hash-tagged: the heartbeat is in another slot, out of the script's
                # reach. It is re-checked one round trip before (a refresh in that gap goes
                # unseen) and left to expire (README "Redis Cluster").
                if heartbeat is protocol.HeartbeatCheck.CHECK and self._heartbeat_moved(hb_key, hb_value, hb_expiry_ms):
                    return ReleaseResult(protocol.Outcome.HEARTBEAT_REVIVED, holder)
                del layout["h"]
        args = [
            holder,
            str(expiry_ms).encode(),
            heartbeat.value,
            hb_value or b"",
            str(hb_expiry_ms).encode(),
            protocol.release_channel(lock_key),
            protocol.notice(lock_key, holder, reason, time.time()),
            protocol.TOMBSTONE_TTL_MS,
            "".join(layout),
            attempt,
        ]
        try:
            code, current, notice_error = self._script(
                keys=[lock_key, *(k for ks in layout.values() for k in ks)], args=args
            )
        except redis.ResponseError as exc:
            raise ReleaseError(f"release script failed: {exc}") from exc
        outcome = protocol.outcome_of(code)
        error = notice_error.decode("utf-8", "backslashreplace") if notice_error else None
        return ReleaseResult(outcome, current or None, error)

    def _heartbeat_moved(self, hb_key: bytes, hb_value: bytes | None, hb_expiry_ms: int) -> bool:
        _, _, value, expiry = self._client.eval(protocol.READ_SCRIPT, 1, hb_key)
        if value == 0:
            value = None
        return value is not None and (value != hb_value or int(expiry) != hb_expiry_ms)
