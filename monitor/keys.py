"""The lock protocol's key and channel names (DESIGN.md section 2), as bytes.

Keys and values are handled as bytes end to end: Redis holds arbitrary bytes, and a
lock value that is not UTF-8 must still be compared and released exactly.
"""

import hashlib

LOCK_VALUE_PREFIX = b"locked_by_"
HEARTBEAT_SUFFIX = b":heartbeat"
# The record a holder may write beside its lock (DESIGN.md section 2): data, not a lock.
HOLDER_SUFFIX = b":holder"
# Existing waiters subscribe to "gpu_lock:" + the lock key, so the prefix appears twice.
RELEASE_CHANNEL_PREFIX = b"gpu_lock:"
# Everything the monitor itself remembers lives under this prefix.
MONITOR_PREFIX = b"gpulock_monitor:"
HOLDING_PREFIX = MONITOR_PREFIX + b"holding:"
RELEASED_PREFIX = MONITOR_PREFIX + b"released:"
# The last lock_timeout_mismatch an acting monitor found, for `config check` to show.
MISMATCH_KEY = MONITOR_PREFIX + b"lock_timeout_mismatch"


def heartbeat_key(lock_key: bytes) -> bytes:
    return lock_key + HEARTBEAT_SUFFIX


def holding_key(lock_key: bytes) -> bytes:
    """Where the monitor keeps what it knows of the lock's current holding.

    The key hashes to the lock's own Redis Cluster slot (the lock's hash tag, or the whole lock
    key as one), so the release script can check and delete it with the lock atomically.
    """
    return HOLDING_PREFIX + _same_slot(lock_key)


def released_key(lock_key: bytes) -> bytes:
    """Where the release script leaves what it released (in the lock's slot, as holding_key)."""
    return RELEASED_PREFIX + _same_slot(lock_key)


def last_pass_key(pattern: str) -> bytes:
    """Redis-clock ms when the last complete pass over `pattern` of an acting monitor began: a
    holding without a record began after it (DESIGN.md section 3, held time)."""
    return MONITOR_PREFIX + b"last_complete_pass_ms:" + pattern.encode()


def _same_slot(lock_key: bytes) -> bytes:
    return lock_key if _hash_tag(lock_key) is not None else b"{" + lock_key + b"}"


def _hash_tag(key: bytes) -> bytes | None:
    """The part of `key` Redis Cluster hashes when it is not the whole key."""
    start = key.find(b"{")
    if start < 0:
        return None
    end = key.find(b"}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def release_channel(lock_key: bytes) -> bytes:
    return RELEASE_CHANNEL_PREFIX + lock_key


def is_lock_candidate(key: bytes) -> bool:
    """False for keys that match the pattern but are not locks by name."""
    return not key.endswith((HEARTBEAT_SUFFIX, HOLDER_SUFFIX)) and not key.startswith(MONITOR_PREFIX)


def task_name(value: bytes) -> bytes:
    """The task name inside a lock value; the value itself when it lacks the prefix."""
    if value.startswith(LOCK_VALUE_PREFIX):
        return value[len(LOCK_VALUE_PREFIX) :]
    return value


def text(data: bytes) -> str:
    """Redis bytes as printable text: invalid UTF-8 becomes backslash escapes, never an error."""
    return data.decode("utf-8", "backslashreplace")


# Values from Redis are data that anyone with write access controls: a 10 MB lock value must not
# become a 10 MB record, audit line or alert. Longer ones are kept as a digest (records) or cut
# with their length and digest (what people read).
LONGEST_KEPT = 200


def fingerprint(data: bytes) -> bytes:
    """`data`, or a digest of it when it is long; the release scripts compute the same (`fp`)."""
    if len(data) <= LONGEST_KEPT:
        return data
    return b"\x00sha1:" + hashlib.sha1(data, usedforsecurity=False).hexdigest().encode() + b":%d" % len(data)


def shown(data: bytes) -> str:
    """`text(data)`, cut when long, saying how long it was and its digest (to tell values apart)."""
    if len(data) <= LONGEST_KEPT:
        return text(data)
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()[:12]
    return f"{text(data[:LONGEST_KEPT])}... ({len(data)} bytes, sha1 {digest})"


def monitor_status_key(host: str) -> bytes:
    """Where the daemon on `host` leaves its last pass summary (read by `health`)."""
    return MONITOR_PREFIX + b"monitor:" + host.encode()
