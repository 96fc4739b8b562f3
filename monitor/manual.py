"""`release`: an operator's owner-checked release, through the same script as the daemon's."""

from __future__ import annotations

import getpass
import os
import secrets
import time
from collections.abc import Callable

from monitor import keys
from monitor.audit import AuditLog
from monitor.config import Settings
from monitor.connection import REDIS_DOWN, Client
from monitor.errors import MonitorError
from monitor.holding import Heartbeat
from monitor.reaper import HeartbeatCheck, Outcome, Reaper, ReleaseResult
from monitor.scanner import read_locks
from monitor.service import evaluate, last_complete_pass_ms, lock_fields

RELEASE_REASON = "manual_release"


class NotConfirmed(MonitorError):  # noqa: N818 - control flow (the operator said no), not an error
    """The operator answered no; nothing was done (control flow, not a failure)."""


class LiveHolderError(MonitorError):
    """The holder's heartbeat is alive and --force was not given; nothing was done."""


def operator_name() -> str:
    """Who ran the command: the sudo caller when there is one, else the login name."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        return f"uid:{os.getuid()}"


def release(
    client: Client,
    settings: Settings,
    audit: AuditLog,
    lock_key: bytes,
    *,
    holder: bytes | None,
    confirm: Callable[[bytes, str], bool],
    force: bool = False,
) -> ReleaseResult:
    """Release the holding of `lock_key` just read, if it is held by `holder` (or by whoever
    holds it now, once confirmed). The attempt is audited as `manual_release` whatever its
    outcome. A holder whose heartbeat is alive is refused unless `force`."""
    (obs,) = read_locks(client, [lock_key])
    if obs.invalid:
        raise MonitorError(f"{keys.text(lock_key)} is not a lock ({obs.invalid})")
    if obs.value is None:
        _audit(audit, lock_key, holder, Outcome.GONE.value, {})
        return ReleaseResult(Outcome.GONE, None)
    (verdict,) = evaluate([obs], settings, after_ms=last_complete_pass_ms(client, settings))
    fields = lock_fields(verdict, dry_run=False)
    h = verdict.holding
    if h.heartbeat is Heartbeat.ALIVE and not force:
        raise LiveHolderError(f"{_describe(fields)}: its holder looks alive; add --force to release it anyway")
    if not confirm(obs.value, _describe(fields)):
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
            f"connection lost during the release of {keys.text(lock_key)}: outcome unknown "
            f"(`status` shows whether it is still held): {exc}"
        ) from None
    _audit(audit, lock_key, holder, result.outcome.value, fields, current=result.current, forced=force)
    return result


def _describe(fields: dict[str, object]) -> str:
    return (
        f"{fields['lock_key']} held by {fields['holder']} for {fields['held_s']} s, "
        f"heartbeat {fields['heartbeat']}, tier {fields['tier']}"
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
    extra: dict[str, object] = {"lock_key": keys.text(lock_key), **fields, "reason": RELEASE_REASON}
    if requested is not None:
        extra["requested_holder"] = keys.text(requested)
    if current is not None and outcome != Outcome.RELEASED.value:
        extra["current_holder"] = keys.text(current)
    audit.event(
        "manual_release",
        sync=True,
        now=time.time(),
        operator=operator_name(),
        outcome=outcome,
        forced=forced,
        **extra,
    )
