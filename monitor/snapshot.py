"""What Redis holds now, read without writing: every lock judged, and what the daemon left there.

`status`, `health`, `release` and `config check` read through here; the pass reads what it
remembers of its last complete pass (`last_complete_pass_ms`) here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from monitor import protocol, units
from monitor.config import Settings
from monitor.connection import Client
from monitor.gpu import GpuInfo, Nvml, device_for
from monitor.scanner import Observation, read_locks, scan_candidates
from monitor.verdict import Verdict, evaluate


@dataclass(frozen=True)
class Snapshot:
    redis_time_ms: int | None  # None when there was nothing to read
    verdicts: list[Verdict]
    invalid: list[Observation]
    dry_run: bool
    gpus: dict[int, GpuInfo] = field(default_factory=dict)
    nvml_reason: str | None = None  # why there is no GPU data
    devices: Mapping[str, int | str] = field(default_factory=dict)

    def gpu_of(self, verdict: Verdict) -> GpuInfo | None:
        return device_for(verdict.holding.key, self.devices, self.gpus)


def take(client: Client, settings: Settings, nvml: Nvml | None = None) -> Snapshot:
    observations = read_locks(client, scan_candidates(client, settings.key_pattern))
    return Snapshot(
        redis_time_ms=observations[0].now_ms if observations else None,
        # As the daemon judges: a holding absent at its last complete pass began after it.
        verdicts=sorted(
            evaluate(observations, settings, after_ms=last_complete_pass_ms(client, settings)),
            key=lambda v: v.holding.key,
        ),
        invalid=[o for o in observations if o.invalid],
        dry_run=not settings.auto_recovery,
        gpus=nvml.snapshot() if nvml is not None else {},
        nvml_reason=nvml.reason if nvml is not None else "not queried",
        devices=settings.nvml_devices,
    )


def would_do(verdict: Verdict, dry_run: bool) -> str:
    action = verdict.decision.action.value
    return f"{action} (dry run)" if dry_run and action == "release" else action


def status_ttl_ms(settings: Settings) -> int:
    """Lifetime of the daemon's status key: long enough to see a stalled daemon as stale."""
    return units.to_ms(max(10 * settings.monitor_interval_s, 600))


def mismatch_warning(client: Client, settings: Settings) -> str | None:
    """What the acting monitor last found of a worker EX shorter than gpu_lock.lock_timeout,
    while it still applies to this config; None when nothing was found."""
    raw = client.get(protocol.MISMATCH_KEY)
    if raw is None:
        return None
    try:
        found = json.loads(raw)
        ex_s, lock = float(found["worker_ex_at_most_s"]), str(found["lock_key"])
    except (ValueError, TypeError, KeyError):
        return None
    if ex_s >= settings.lock_timeout_s:
        return None
    return (
        f"gpu_lock.lock_timeout: {settings.lock_timeout_s:g} s is longer than the EX of a worker "
        f"({lock} was set with at most {ex_s:g} s); it must be the shortest EX in use"
    )


def last_complete_pass_ms(client: Client, settings: Settings) -> int | None:
    """When the last complete pass of an acting monitor began (Redis-clock ms), if known."""
    raw = client.get(protocol.last_pass_key(settings.key_pattern))
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None
