"""The lock protocol (DESIGN.md sections 2 and 4), shared by the worker client and the daemon.

Key templates, the release channel and notice, the heartbeat's TTL rule, and every Lua script
that reads or writes protocol keys: one home, so worker and monitor cannot drift apart. Stdlib
only (the worker imports it).

Keys and values are handled as bytes end to end: Redis holds arbitrary bytes, and a
lock value that is not UTF-8 must still be compared and released exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from collections.abc import Mapping
from enum import Enum
from typing import TypedDict

from monitor.errors import ReleaseError

# The fleet's lock keys are "gpu_lock:<gpu_id>"; `gpu_lock.key_pattern` may choose others.
LOCK_KEY_PREFIX = "gpu_lock:"
DEFAULT_KEY_PATTERN = LOCK_KEY_PREFIX + "*"
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


def lock_key(gpu_id: object) -> bytes:
    return f"{LOCK_KEY_PREFIX}{gpu_id}".encode()


def lock_value(task_name: str) -> bytes:
    """What a worker running `task_name` writes into the lock."""
    return LOCK_VALUE_PREFIX + task_name.encode()


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


def printable(text_: str, limit: int) -> str:
    """Text on one terminal line for people: control characters escaped (Redis data is anyone's
    data, and a holder of escape sequences must not reach a terminal raw), cut at `limit`."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text_)
    return escaped if len(escaped) <= limit else escaped[: limit - 1] + "…"


def probe_key(monitor_id: str) -> bytes:
    """The key whose keyspace events tell whether notifications are on (notify.self_test)."""
    return MONITOR_PREFIX + f"probe:{monitor_id}".encode()


def keyspace_channel(db: int, key_or_pattern: bytes) -> bytes:
    """The channel of keyspace events for a key (or a PSUBSCRIBE pattern) in database `db`. The
    monitor also publishes its own sync marks on such a channel of a key of its own."""
    return f"__keyspace@{db}__:".encode() + key_or_pattern


def monitor_status_key(host: str) -> bytes:
    """Where the daemon on `host` leaves its last pass summary (read by `health`)."""
    return MONITOR_PREFIX + b"monitor:" + host.encode()


def heartbeat_ttl_ms(interval_s: float) -> int:
    """Workers write the heartbeat with EX = 2 * interval, refreshed every interval."""
    return round(2 * interval_s * 1000)


# --- Lua scripts ---------------------------------------------------------------------------------
# Building blocks first (EXPIRY_LUA, FINGERPRINT_LUA), then each script with its KEYS and ARGV.

# `expiry(key)`: absolute expiry in Redis-clock ms, -1 without a TTL, -2 when the key is absent.
# PEXPIRETIME (Redis 7) is exact. Before it, PTTL counts from the server's clock at that call:
# read between two TIMEs that show the same millisecond, TIME + PTTL is exact too (a millisecond
# boundary falls between them about once in a thousand reads; the read is then made again).
EXPIRY_LUA = """
local exact = nil
local function ms(t) return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
local function expiry(key)
  if exact ~= false then
    local e = redis.pcall('PEXPIRETIME', key)
    if type(e) == 'number' then exact = true return e end
    exact = false
  end
  local before, pttl, after
  for _ = 1, 8 do
    before = ms(redis.call('TIME'))
    pttl = redis.call('PTTL', key)
    if pttl < 0 then return pttl end
    after = ms(redis.call('TIME'))
    if before == after then break end
  end
  return after + pttl
end
"""


# `fp(value)`: fingerprint in Lua (the value, or its digest beyond LONGEST_KEPT bytes).
FINGERPRINT_LUA = """
local function fp(v)
  if #v <= 200 then return v end
  return '\\0sha1:' .. redis.sha1hex(v) .. ':' .. #v
end
"""


# KEYS: any keys; for each, its string value (0 when it is not a string, false when absent)
# and its expiry, or -3 where ARGV[1] has "-" at its place (a record: only its value counts).
# Replies start with Redis TIME (seconds, microseconds). With ARGV[2], the read ends by
# publishing ARGV[3] on that channel: Redis delivers it after every keyspace event raised before
# the read, so the event watcher knows what it has seen when the read happened (watcher.py).
READ_SCRIPT = (
    EXPIRY_LUA
    + """
local t = redis.call('TIME')
local out = {t[1], t[2]}
local want = ARGV[1] or ''
for i = 1, #KEYS do
  local v = redis.pcall('GET', KEYS[i])
  if type(v) == 'table' then v = 0 end
  out[#out + 1] = v
  if string.sub(want, i, i) == '-' then out[#out + 1] = -3 else out[#out + 1] = expiry(KEYS[i]) end
end
if ARGV[2] then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return out
"""
)


# Per lock: the lock and its heartbeat with their expiries, the holding's record and the holder
# record by value.
READ_WANT = "ee--"


TOMBSTONE_TTL_MS = 600_000


# KEYS[1] lock, then what ARGV[9] names, in this order: "h" its heartbeat, "r" the holding's record
# and the tombstone key, "o" the holder record (in Redis Cluster a key in another slot is left out).
# ARGV[1] holder, ARGV[2] its expiry as observed (-1: no TTL), ARGV[3] "check" or "any" for the
# heartbeat, ARGV[4] heartbeat value as observed ("" absent), ARGV[5] its expiry, ARGV[6]
# channel, ARGV[7] notice, ARGV[8] tombstone ms, ARGV[10] the attempt (who, which holding).
RELEASE_SCRIPT = (
    EXPIRY_LUA
    + FINGERPRINT_LUA
    + """
local hb_key, rec_key, tomb_key, own_key, n = false, false, false, false, 2
if string.find(ARGV[9], 'h', 1, true) then hb_key = KEYS[n] n = n + 1 end
if string.find(ARGV[9], 'r', 1, true) then rec_key, tomb_key = KEYS[n], KEYS[n + 1] n = n + 2 end
if string.find(ARGV[9], 'o', 1, true) then own_key = KEYS[n] end
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
-- The holder record goes with the lock: whoever wrote it, it describes no holding now. A key of
-- another type there is nobody's record: left alone.
if own_key and type(redis.pcall('GET', own_key)) == 'string' then redis.call('DEL', own_key) end
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


def notice(lock_key: bytes, holder: bytes, reason: str, timestamp: float) -> bytes:
    """The release notice in the workers' format (DESIGN.md section 2)."""
    return json.dumps(
        {
            "event_type": "lock_released",
            "lock_key": text(lock_key),
            "task_name": text(task_name(holder)),
            "release_reason": reason,
            "timestamp": timestamp,
        }
    ).encode()


# KEYS lock, heartbeat; ARGV value, heartbeat value, heartbeat ttl ms.
HEARTBEAT_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""


# Compare-and-set of holding records. ARGV[1] "h" when KEYS[1] and KEYS[2] are the last-pass
# and the monitor-status keys (then ARGV[3] is when this pass began, "" unless the pass was
# complete, ARGV[4] the status, ARGV[5] its ms to live); ARGV[2] is unused. Then pairs of
# KEYS (a lock, its record key) with five ARGV from ARGV[6] each: holder (fingerprint), expiry, the record as
# read ("" none), the new record, its ms to live. A record is written only while the lock still
# has that holding and nobody changed the record since it was read.
PERSIST_SCRIPT = (
    EXPIRY_LUA
    + FINGERPRINT_LUA
    + """
local first = 1
if ARGV[1] == 'h' then first = 3 end
local skipped = 0
for i = first, #KEYS, 2 do
  local a = 6 + (i - first) / 2 * 5
  local v = redis.pcall('GET', KEYS[i])
  local ok = type(v) == 'string' and fp(v) == ARGV[a] and expiry(KEYS[i]) == tonumber(ARGV[a + 1])
  local stored = redis.pcall('GET', KEYS[i + 1])
  if type(stored) ~= 'string' then stored = '' end
  if ok and stored == ARGV[a + 2] then
    redis.call('SET', KEYS[i + 1], ARGV[a + 3], 'PX', ARGV[a + 4])
  else
    skipped = skipped + 1
  end
end
if first == 3 then
  if ARGV[3] ~= '' and tonumber(ARGV[3]) > (tonumber(redis.call('GET', KEYS[1]) or '0') or 0) then
    redis.call('SET', KEYS[1], ARGV[3])
  end
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
end
return skipped
"""
)


RAISE_TO_SCRIPT = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tonumber(ARGV[1]) > last then redis.call('SET', KEYS[1], ARGV[1]) end
"""


# What the fleet's existing workers run to release (DESIGN.md section 2): the value checked, then
# lock and heartbeat deleted. The demo's simulated workers and the fleet tests use it.
LEGACY_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1], KEYS[2]) end
return 0
"""


def outcome_of(code: bytes) -> Outcome:
    """The release script's return code as a named outcome; anything else is an error."""
    try:
        return Outcome(code.decode("ascii", "replace"))
    except ValueError:
        raise ReleaseError(f"release script answered {code!r}") from None


# --- The holder record (DESIGN.md section 2) ---------------------------------------------------------
# `<lock_key>:holder`: what a holder that knows the protocol says of itself, written in the same
# script as the lock and expiring with it to the millisecond. Optional: legacy workers write none,
# so nothing may depend on it being there. It names the process (host, pid, the pid namespace that
# pid means something in, the process's start time against pid reuse), the GPU where known, the
# task, and the token that ties it to the lock's value; the work's last progress mark lives here
# too (the heartbeat's value stays a bare timestamp for the workers that read it). Its format is
# HolderRecord's. A field may be added without changing `v`; `v` changes only when a reader of
# version 1 would misread a record.

HOLDER_RECORD_VERSION = 1
# A record is a few hundred bytes; anyone who can write the key controls it, and the monitor
# parses one per lock per pass: a larger one is not a record.
HOLDER_RECORD_MAX_BYTES = 65536


class ProcessFacts(TypedDict):
    """Where a holder runs: enough to find it on its host, and to tell it from a later process
    that got the same pid."""

    host: str
    pid: int
    pid_ns: int | None
    start_time: int | None
    boot_id: str | None


class HolderRecord(TypedDict):
    """The holder record: one JSON object, as `holder_record` writes it for example


        {"v":1,"host":"gpu-node-3","pid":4242,"pid_ns":4026531836,"start_time":81234567,
         "gpu_uuid":"GPU-5f0c...","task":"tts_synthesize","task_id":"c0ffee...","token":"9b1e2f...",
         "heartbeat_interval_s":60,"heartbeats":true,"progress_ms":null,"progress_timeout_s":null,
         "boot_id":"6b4f3c0e-..."}

    A field the holder does not know is null. A progress mark rewrites the object inside Redis
    (cjson): field order, spacing and the form of numbers (60.0 becomes 60) may change, never a
    value. Read back by `parse_holder_record`, a field of the wrong type is None too.
    """

    v: int
    host: str | None  # socket.gethostname() of the holder
    pid: int | None
    pid_ns: int | None  # the inode of /proc/<pid>/ns/pid: a pid means something only in its namespace
    start_time: int | None  # /proc/<pid>/stat field 22, clock ticks after boot: tells a reused pid
    gpu_uuid: str | None  # NVML's UUID (GPU-..., MIG-...) when the holder knows which GPU it uses
    task: str | None
    task_id: str | None
    token: str  # the lock value is lock_value(task + "#" + token): the record is that holding's
    heartbeat_interval_s: float | None
    heartbeats: bool  # true: the holder refreshes <lock_key>:heartbeat; a missing one means dead
    progress_ms: int | None  # the last progress mark, Redis-clock ms (TIME inside PROGRESS_SCRIPT)
    progress_timeout_s: float | None  # how long the holder may go without a mark
    boot_id: str | None  # /proc/sys/kernel/random/boot_id: names this host's kernel (and boot) beyond doubt


# The record's field names, in the order the builder writes them.
HOLDER_FIELDS: tuple[str, ...] = (
    "v",
    "host",
    "pid",
    "pid_ns",
    "start_time",
    "gpu_uuid",
    "task",
    "task_id",
    "token",
    "heartbeat_interval_s",
    "heartbeats",
    "progress_ms",
    "progress_timeout_s",
    "boot_id",
)

_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# NVML's forms: a GPU, a MIG instance, and the MIG form of drivers before R470.
_GPU_UUID = re.compile(rf"GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+")


def holder_key(lock_key: bytes) -> bytes:
    return lock_key + HOLDER_SUFFIX


def is_gpu_uuid(text_: str) -> bool:
    """True for a whole NVML UUID (CUDA also takes unique prefixes, which name no GPU for NVML)."""
    return _GPU_UUID.fullmatch(text_) is not None


def visible_gpu_uuid(environ: Mapping[str, str] | None = None) -> str | None:
    """The GPU this process uses, when CUDA_VISIBLE_DEVICES names exactly one, by its UUID; None
    for an index, a list or nothing (which GPU an index means is not known outside the process)."""
    env = os.environ if environ is None else environ
    entries = [e.strip() for e in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return entries[0] if len(entries) == 1 and is_gpu_uuid(entries[0]) else None


def pid_namespace(pid: int | str = "self") -> int | None:
    """The inode of the process's pid namespace (/proc/<pid>/ns/pid); None where /proc has none."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def process_start_time(pid: int | str = "self") -> int | None:
    """When the process started, in clock ticks after boot (/proc/<pid>/stat field 22): with the
    pid, it names one process, never a later one that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
        # The command name (field 2) is in parentheses and may hold spaces and parentheses itself.
        return int(data[data.rindex(b")") + 2 :].split()[22 - 3])
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str | None:
    """This kernel's boot id: one per boot of one host, shared by its containers; None without /proc."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def this_process() -> ProcessFacts:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_ns": pid_namespace(),
        "start_time": process_start_time(),
        "boot_id": boot_id(),
    }


def holder_record(
    *,
    task: str,
    token: str,
    heartbeat_interval_s: float,
    task_id: str | None = None,
    gpu_uuid: str | None = None,
    progress_timeout_s: float | None = None,
    process: ProcessFacts | None = None,
) -> bytes:
    """The record a holder writes with its lock (`process`: this one unless given)."""
    facts = this_process() if process is None else process
    record: HolderRecord = {
        "v": HOLDER_RECORD_VERSION,
        "host": facts["host"],
        "pid": facts["pid"],
        "pid_ns": facts["pid_ns"],
        "start_time": facts["start_time"],
        "gpu_uuid": gpu_uuid,
        "task": task,
        "task_id": task_id,
        "token": token,
        "heartbeat_interval_s": heartbeat_interval_s,
        "heartbeats": True,
        "progress_ms": None,
        "progress_timeout_s": progress_timeout_s,
        "boot_id": facts["boot_id"],
    }
    data = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > HOLDER_RECORD_MAX_BYTES:
        raise ValueError(f"holder record of {len(data)} bytes: readers ignore one over {HOLDER_RECORD_MAX_BYTES}")
    return data


def parse_holder_record(raw: object) -> HolderRecord | None:
    """The record in `raw` (as GET returns it), or None when it is not one: absent, not JSON, not an
    object, another version, no token, too large. A field of the wrong type reads as absent (None;
    `heartbeats` as False: only a promise counts). Never raises: the key is anyone's data."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, bytes) or len(raw) > HOLDER_RECORD_MAX_BYTES:
        return None
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(doc, dict) or _int(doc.get("v"), 1) != HOLDER_RECORD_VERSION:
        return None
    token = _str(doc.get("token"))
    if not token:
        return None
    return {
        "v": HOLDER_RECORD_VERSION,
        "host": _str(doc.get("host")),
        "pid": _int(doc.get("pid"), 1, _MAX_PID),
        "pid_ns": _int(doc.get("pid_ns"), 1),
        "start_time": _int(doc.get("start_time"), 0),
        "gpu_uuid": _str(doc.get("gpu_uuid")),
        "task": _str(doc.get("task")),
        "task_id": _str(doc.get("task_id")),
        "token": token,
        "heartbeat_interval_s": _seconds(doc.get("heartbeat_interval_s")),
        "heartbeats": doc.get("heartbeats") is True,
        "progress_ms": _int(doc.get("progress_ms"), 0),
        "progress_timeout_s": _seconds(doc.get("progress_timeout_s")),
        "boot_id": _str(doc.get("boot_id")),
    }


def holder_record_matches(record: HolderRecord, value: bytes) -> bool:
    """True when `record` was written with the lock value `value`. A record outlives its holding when
    the lock goes without it (a legacy worker's delete, the monitor's release, a crash): the next
    holding, a legacy one included, must not be judged by it."""
    if record["task"] is None:
        return False
    try:
        return value == lock_value(f"{record['task']}#{record['token']}")
    except UnicodeEncodeError:  # a record built by hand, not parsed: never an error
        return False


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")


def _str(value: object) -> str | None:
    # JSON may carry lone surrogates ("\ud800"), which no UTF-8 lock value can hold: not a string.
    if not isinstance(value, str):
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


# Linux's pid limit (PID_MAX_LIMIT, 2**22); inodes and clock ticks fit in 64 bits.
_MAX_PID = 4_194_304
_MAX_U64 = 2**64 - 1


def _int(value: object, least: int, most: int = _MAX_U64) -> int | None:
    # Integral floats too: Redis's cjson writes every number back as a double.
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and least <= value <= most else None


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


# KEYS lock, heartbeat, holder record; ARGV value, lock ttl ms, heartbeat value, heartbeat ttl ms,
# record. Returns the lock's absolute expiry (with the value, the holding's identity for the release
# script), or 0. The first heartbeat is written with the lock: the monitor counts it as alive from the
# start, and its first refresh proves it this holding's (DESIGN.md section 3). Finding our own value
# means an earlier try succeeded but its reply was lost to a dropped connection: that try's lock is
# ours, so say so instead of waiting on ourselves. The record is written in the same script as the
# lock (no moment has the lock without it), expiring at the lock's own expiry to the millisecond
# (SET PXAT, Redis 6.2; before it, PX with the lock's PTTL, within a millisecond).
ACQUIRE_WITH_HOLDER_SCRIPT = (
    EXPIRY_LUA
    + """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
local e = expiry(KEYS[1])
if e < 0 then  -- a lock somebody made persistent: the record still goes, in its own time
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[2])
  return e
end
local set = redis.pcall('SET', KEYS[3], ARGV[5], 'PXAT', e)
if type(set) == 'table' and set.err then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', math.max(1, redis.call('PTTL', KEYS[1])))
end
return e
"""
)


# `own(raw, token)`: the record decoded, when `raw` is a record with that token; else nil.
_OWN_RECORD_LUA = """
local function own(raw, token)
  if type(raw) ~= 'string' then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' and rec['token'] == token then return rec end
  return nil
end
"""


# KEYS lock, holder record; ARGV value, token. Marks progress: the record's progress_ms becomes
# Redis's TIME in ms, never earlier than the mark already there (a failover to a server whose clock
# is behind cannot move it back), keeping the record's expiry. Only while the lock holds this very
# value: returns the mark, 0 when the lock is not this holding's, -1 when its record is not there.
PROGRESS_SCRIPT = (
    _OWN_RECORD_LUA
    + """
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local rec = own(redis.pcall('GET', KEYS[2]), ARGV[2])
if not rec then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = rec['progress_ms']
if type(last) == 'number' and last > now then now = last end
rec['progress_ms'] = now
redis.call('SET', KEYS[2], cjson.encode(rec), 'KEEPTTL')
return now
"""
)


# KEYS holder record; ARGV token. Deletes the record only while it is that holding's (the next
# holder may have written its own since): 1 when deleted, else 0.
DROP_HOLDER_SCRIPT = (
    _OWN_RECORD_LUA
    + """
if own(redis.pcall('GET', KEYS[1]), ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""
)


def own_record(raw: bytes | None, value: bytes) -> HolderRecord | None:
    """The holder record in `raw` (as GET returns it) when it is the one of the holding whose lock
    value is `value`; None for anything else, an earlier holding's record included."""
    if raw is None:
        return None
    record = parse_holder_record(raw)
    return record if record is not None and holder_record_matches(record, value) else None


def promises(raw: bytes, value: bytes) -> bool:
    """True when `raw` is the holder record of the holding whose lock value is `value` and it
    promises heartbeats: its holder wrote the first one with the lock (ACQUIRE_WITH_HOLDER_SCRIPT).
    Asked only of a holding whose heartbeat no look has proved yet (holding.promised)."""
    record = own_record(raw, value)
    return record is not None and record["heartbeats"]
