"""`status`: every lock as the monitor sees it now, as a table or a stable JSON document.

Read-only: it runs the same observation and rules as a pass and writes nothing to Redis.
"""

from __future__ import annotations

from typing import Any

from monitor import protocol, units
from monitor.gpu import GpuInfo
from monitor.snapshot import Snapshot, would_do

JSON_VERSION = 1
CELL_LIMIT = 48  # characters of a key or holder in a table cell


def as_json(snapshot: Snapshot) -> dict[str, Any]:
    now = snapshot.redis_time_ms
    return {
        "version": JSON_VERSION,
        "redis_time": None if now is None else units.iso(units.to_s(now)),
        "auto_recovery": not snapshot.dry_run,
        "locks": [
            {
                "lock_key": protocol.text(h.key),
                "holder": protocol.shown(h.holder),
                "task_name": protocol.shown(protocol.task_name(h.holder)),
                "held_s": round(h.held_s, 3),
                "ttl_s": round(units.to_s(h.pttl_ms), 3) if h.pttl_ms >= 0 else None,
                "heartbeat": h.heartbeat.value,
                "heartbeat_age_s": None if h.hb_age_s is None else round(h.hb_age_s, 3),
                "tier": v.decision.tier.value,
                "action": v.decision.action.value,
                "reason": v.decision.reason.value,
                "gpu": None if (g := snapshot.gpu_of(v)) is None else g.as_dict(),
            }
            for v in snapshot.verdicts
            for h in (v.holding,)
        ],
        "invalid": [{"lock_key": protocol.text(o.key), "reason": o.invalid} for o in snapshot.invalid],
        "nvml": {"available": bool(snapshot.gpus), "reason": None if snapshot.gpus else snapshot.nvml_reason},
        "gpus": [g.as_dict() for _, g in sorted(snapshot.gpus.items())],
    }


def as_table(snapshot: Snapshot) -> str:
    if not snapshot.verdicts and not snapshot.invalid:
        return "no locks held"
    with_gpus = bool(snapshot.gpus)
    header: tuple[str, ...] = ("LOCK", "HOLDER", "HELD", "HEARTBEAT", "TIER", "WOULD DO", "WHY")
    if with_gpus:
        header += ("GPU", "MEM", "UTIL", "PROCS")
    rows = [header]
    for v in snapshot.verdicts:
        h = v.holding
        heartbeat = h.heartbeat.value if h.hb_age_s is None else f"{h.heartbeat.value} ({units.human(h.hb_age_s)} ago)"
        row: tuple[str, ...] = (
            protocol.printable(protocol.text(h.key), CELL_LIMIT),
            protocol.printable(protocol.shown(h.holder), CELL_LIMIT),
            units.human(h.held_s),
            heartbeat,
            v.decision.tier.value,
            would_do(v, snapshot.dry_run),
            v.decision.reason.value,
        )
        if with_gpus:
            row += gpu_cells(snapshot.gpu_of(v))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for o in snapshot.invalid:
        lines.append(f"not a lock: {protocol.printable(protocol.text(o.key), CELL_LIMIT)} ({o.invalid})")
    locked = {g.index for v in snapshot.verdicts if (g := snapshot.gpu_of(v)) is not None}
    for index, g in sorted(snapshot.gpus.items()):
        if index not in locked:
            mem, util, procs = gpu_cells(g)[1:]
            busy = " <- busy with no lock held" if g.processes else ""
            lines.append(f"gpu {index} ({g.name or '?'}): no lock; {mem}, util {util}, {procs} processes{busy}")
    return "\n".join(lines)


def gpu_cells(g: GpuInfo | None) -> tuple[str, str, str, str]:
    """GPU, MEM, UTIL, PROCS for one table row; '-' where there is no local GPU or no data."""
    if g is None:
        return ("-", "-", "-", "-")
    gib = 1024**3
    mem = (
        "-"
        if g.memory_used_bytes is None or g.memory_total_bytes is None
        else f"{g.memory_used_bytes / gib:.1f}/{g.memory_total_bytes / gib:.0f}G"
    )
    util = "-" if g.utilization_pct is None else f"{g.utilization_pct}%"
    procs = "-" if g.processes is None else str(len(g.processes))
    return (str(g.index), mem, util, procs)
