"""`release`: an operator's owner-checked release, through the same script as the daemon's.

Only a lock may be released: a key under `gpu_lock.key_pattern` (matched as Redis MATCH does)
that is not a heartbeat, a holder record or one of the monitor's own keys. Keys and holders are
bytes from end to end; what is shown to the operator goes through `shown` (escaped as `status`
escapes its table), so a holder made of terminal control characters never reaches the terminal raw.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import time
from collections.abc import Callable

from monitor import protocol, units
from monitor.audit import AuditLog
from monitor.config import Settings
from monitor.connection import REDIS_DOWN, Client
from monitor.errors import MonitorError
from monitor.events import Event
from monitor.holding import Holding
from monitor.policy import Heartbeat
from monitor.protocol import HeartbeatCheck, Outcome
from monitor.reaper import Reaper, ReleaseResult
from monitor.scanner import read_locks, scan_candidates
from monitor.snapshot import last_complete_pass_ms
from monitor.verdict import evaluate, lock_fields

RELEASE_REASON = "manual_release"
# What an operator reads of one key or holder: escaped, and cut past this many characters.
SHOWN_LIMIT = 300
# Locks named when the one asked for is not held (a typo: gpu_lock:O for gpu_lock:0).
HELD_NAMED = 8


class NotConfirmed(MonitorError):  # noqa: N818 - control flow (the operator said no), not an error
    """The operator answered no; nothing was done (control flow, not a failure)."""


class LiveHolderError(MonitorError):
    """The holder's heartbeat is alive and --force was not given; nothing was done."""


class NotHeldError(MonitorError):
    """The key is not held: nothing to confirm, release or audit."""


def operator_name() -> str:
    """Who ran the command: the sudo caller when there is one, else the login name."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        return f"uid:{os.getuid()}"


def shown(value: bytes | str) -> str:
    """A key or holder as the operator sees it: cut with its digest when long, and escaped as
    `status` shows it, never raw."""
    return protocol.printable(protocol.shown(value) if isinstance(value, bytes) else value, SHOWN_LIMIT)


def natural_key(key: bytes | str) -> tuple[str | int, ...]:
    """Sort key for lock keys as people count: gpu_lock:2 before gpu_lock:10."""
    text = protocol.text(key) if isinstance(key, bytes) else key
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text)))


def check_lock_key(settings: Settings, lock_key: bytes) -> None:
    """Refuse, before any Redis command, a key that cannot be a lock."""
    pattern = settings.key_pattern
    if not redis_match(pattern.encode(), lock_key):
        raise MonitorError(f"{shown(lock_key)} is not under gpu_lock.key_pattern ({shown(pattern)}): not a lock")
    if lock_key.startswith(protocol.MONITOR_PREFIX):
        raise MonitorError(f"{shown(lock_key)} is the monitor's own key, not a lock")
    for suffix, what in ((protocol.HEARTBEAT_SUFFIX, "a heartbeat key"), (protocol.HOLDER_SUFFIX, "a holder record")):
        if lock_key.endswith(suffix):
            lock = lock_key[: -len(suffix)]
            raise MonitorError(f"{shown(lock_key)} is {what}, not a lock (its lock is {shown(lock)})")


def redis_match(pattern: bytes, key: bytes) -> bool:
    """Whether SCAN MATCH `pattern` yields `key`: Redis's glob (util.c stringmatchlen), byte for
    byte: `*`, `?`, `[...]` with `^` and ranges, backslash escapes; bytes compare as C's signed char."""
    failed: set[tuple[int, int]] = set()  # (pattern, key) positions known not to match

    def match(p: int, k: int) -> bool:
        while p < len(pattern):
            if pattern[p] == ord("*"):
                while p < len(pattern) and pattern[p] == ord("*"):
                    p += 1
                if p == len(pattern):
                    return True
                # As Redis, what follows a `*` is tried against non-empty rests of the key only.
                for rest in range(k, len(key)):
                    if (p, rest) not in failed:
                        if match(p, rest):
                            return True
                        failed.add((p, rest))
                return False
            if k == len(key):
                return False
            p, ok = _one_byte(pattern, p, key[k])
            if not ok:
                return False
            k += 1
        return k == len(key)

    return match(0, 0)


def _one_byte(pattern: bytes, p: int, byte: int) -> tuple[int, bool]:
    """Match `byte` against the pattern element at `p` (not `*`): the next position, and whether
    it matched."""
    if pattern[p] == ord("?"):
        return p + 1, True
    if pattern[p] == ord("["):
        return _char_class(pattern, p + 1, byte)
    if pattern[p] == ord("\\") and p + 1 < len(pattern):
        p += 1
    return p + 1, pattern[p] == byte


def _char_class(pattern: bytes, p: int, byte: int) -> tuple[int, bool]:
    """Match `byte` against the class starting at `pattern[p]` (after `[`): the position after
    the class and whether it matched. An unclosed class runs to the end of the pattern."""
    negate = p < len(pattern) and pattern[p] == ord("^")
    p += negate
    found = False
    while p < len(pattern) and pattern[p] != ord("]"):
        if pattern[p] == ord("\\") and p + 1 < len(pattern):
            p += 1
            found |= pattern[p] == byte
        elif p + 2 < len(pattern) and pattern[p + 1] == ord("-"):
            low, high = sorted((_signed(pattern[p]), _signed(pattern[p + 2])))
            found |= low <= _signed(byte) <= high
            p += 2
        else:
            found |= pattern[p] == byte
        p += 1
    return p + 1, found != negate


def _signed(byte: int) -> int:
    return byte - 256 if byte > 127 else byte


def release(
    client: Client,
    settings: Settings,
    audit: AuditLog,
    lock_key: bytes,
    *,
    holder: bytes | None,
    confirm: Callable[[bytes, str], bool],
    force: bool = False,
    paint: Callable[[str, str], str] | None = None,
) -> ReleaseResult:
    """Release the holding of `lock_key` just read, if it is held by `holder` (or by whoever
    holds it now, once confirmed). The attempt is audited as `manual_release` whatever its
    outcome. A holder whose heartbeat is alive is refused unless `force`; a key that cannot be a
    lock (`check_lock_key`) is refused before Redis is asked anything, and one that is not held
    (`NotHeldError`, naming the locks that are) before anything is audited. `paint(column, text)`
    colours the heartbeat and tier of what `confirm` is shown, as `status` colours its columns."""
    check_lock_key(settings, lock_key)
    (obs,) = read_locks(client, [lock_key])
    if obs.invalid:
        raise MonitorError(f"{shown(lock_key)} is not a lock ({obs.invalid})")
    if obs.value is None:  # nothing was there to confirm or release: a typo, or released already
        raise NotHeldError(f"nothing released: {shown(lock_key)} is not held{_held_now(client, settings)}")
    (verdict,) = evaluate([obs], settings, after_ms=last_complete_pass_ms(client, settings))
    fields = lock_fields(verdict, dry_run=False)
    h = verdict.holding
    if h.heartbeat is Heartbeat.ALIVE and not force:
        raise LiveHolderError(f"{_describe(h, fields)}: its holder looks alive; add --force to release it anyway")
    if not confirm(obs.value, _describe(h, fields, paint)):
        raise NotConfirmed("not confirmed; nothing released")
    # The operator confirmed the holding that was just read: the script must find that very
    # holding (value and expiry), and without --force a heartbeat no livelier than it was.
    try:
        result = Reaper(client).release(
            lock_key,
            holder if holder is not None else obs.value,
            obs.expiry_ms,
            heartbeat=HeartbeatCheck.ANY if force else HeartbeatCheck.CHECK,
            hb_value=h.hb_value,
            hb_expiry_ms=h.hb_expiry_ms,
            reason=RELEASE_REASON,
            attempt=f"manual:{secrets.token_hex(8)}",  # this run's own: another's release is not ours
        )
    except REDIS_DOWN as exc:
        # The script may have run: say so, in the audit and to the operator, instead of guessing.
        _audit(audit, lock_key, holder, "unknown", fields, forced=force)
        raise MonitorError(
            f"connection lost during the release of {shown(lock_key)}: outcome unknown "
            f"(`status` shows whether it is still held): {exc}"
        ) from None
    _audit(audit, lock_key, holder, result.outcome.value, fields, current=result.current, forced=force)
    return result


def _held_now(client: Client, settings: Settings) -> str:
    locks = read_locks(client, scan_candidates(client, settings.key_pattern))
    held = sorted((o.key for o in locks if o.value is not None and not o.invalid), key=natural_key)
    if not held:
        return " (no lock is held)"
    more = f" and {len(held) - HELD_NAMED} more" if len(held) > HELD_NAMED else ""
    return f" (held now: {', '.join(shown(key) for key in held[:HELD_NAMED])}{more})"


def _describe(h: Holding, fields: dict[str, object], paint: Callable[[str, str], str] | None = None) -> str:
    paint = paint or (lambda _column, text: text)
    return (
        f"{shown(h.key)} held by {shown(h.holder)} for {units.human(h.held_s)}, "
        f"heartbeat {paint('HEARTBEAT', str(fields['heartbeat']))}, tier {paint('TIER', str(fields['tier']))}"
    )


def _audit(
    audit: AuditLog,
    lock_key: bytes,
    requested: bytes | None,
    outcome: str,
    fields: dict[str, object],
    *,
    current: bytes | None = None,
    forced: bool = False,
) -> None:
    extra: dict[str, object] = {"lock_key": protocol.shown(lock_key), **fields, "reason": RELEASE_REASON}
    if requested is not None:
        extra["requested_holder"] = protocol.shown(requested)
    if current is not None and outcome != Outcome.RELEASED.value:
        extra["current_holder"] = protocol.shown(current)
    audit.event(
        Event.MANUAL_RELEASE.value,
        sync=True,
        now=time.time(),
        operator=operator_name(),
        outcome=outcome,
        forced=forced,
        **extra,
    )
