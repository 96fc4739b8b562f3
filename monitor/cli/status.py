"""`status`: every lock as the monitor sees it now, as a table or a stable JSON document.

Read-only: it runs the same observation and rules as a pass and writes nothing to Redis. It says
what it looked at (config, Redis and its database, the key pattern, the daemon on this host), so a
`status` pointed at the wrong place does not read as "all is well".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis

from monitor import protocol, units
from monitor.config import Settings
from monitor.connection import Client, is_cluster
from monitor.gpu import GpuInfo
from monitor.health import STOPPED, pass_grace_s
from monitor.manual import natural_key
from monitor.redact import redact_url
from monitor.snapshot import Snapshot, status_ttl_ms, would_do
from monitor.verdict import Verdict

JSON_VERSION = 1
CELL_LIMIT = 48  # characters of a key or holder in a table cell
# To fit a terminal, these columns are cut, in this order, down to so many characters each; the
# others stay whole. A task name is the first to give way; a lock key, which `release` needs, the last.
CUTS = (("TASK", 12), ("WHY", 14), ("LOCK", 16), ("TASK", 6), ("WHY", 8))
GAP = "  "


@dataclass(frozen=True)
class LookedAt:
    """Where `status` looked, and what the daemon on this host last said there."""

    config: str | None  # the config file; None: none was found, the built-in defaults
    url: str  # redis.url, its password masked
    db: int  # the database the client selects
    via: str | None  # how the server is found besides its URL: "sentinel SERVICE at NODES", "cluster"
    key_pattern: str
    name: str  # the daemon's (monitor.name, by default the host name)
    daemon: str  # running | late | stopped | none
    last_pass_age_s: float | None
    stopped_at: str | None = None
    discovery: str | None = None  # how the daemon finds locks, as it said
    # The hung-holder findings true at the daemon's last pass, by lock (README "Hung holders").
    findings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def where(self) -> list[str]:
        config = "none found, the built-in defaults" if self.config is None else self.config
        redis_ = self.url if self.via is None else f"{self.via}, {self.url}"
        return [f"redis: {redis_} (db {self.db})  pattern: {self.key_pattern}", f"config: {config}"]

    @property
    def daemon_line(self) -> str:
        name = protocol.printable(self.name, 100)
        if self.daemon == "none":
            return f"no daemon on this host ({name}) reported to this redis db"
        if self.daemon == STOPPED:
            return f"daemon on {name}: stopped at {protocol.printable(self.stopped_at or '?', 40)}"
        assert self.last_pass_age_s is not None
        late = ", late: is it stalled?" if self.daemon == "late" else ""
        found = "" if self.discovery is None else f"; finds locks by {protocol.printable(self.discovery, 100)}"
        return f"daemon on {name}: last pass {units.human(self.last_pass_age_s)} ago{late}{found}"

    def as_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "redis": {"url": self.url, "db": self.db, "via": self.via},
            "key_pattern": self.key_pattern,
            "daemon": {
                "name": self.name,
                "state": self.daemon,
                "last_pass_age_s": None if self.last_pass_age_s is None else round(self.last_pass_age_s, 3),
                "discovery": self.discovery,
            },
        }


def look(client: Client, settings: Settings, config: Path | None, name: str) -> LookedAt:
    """What `status` reads besides the locks: the status key the daemon named `name` leaves each
    pass (aged by its TTL on Redis's clock, as `health` does), and where that is."""
    key = protocol.monitor_status_key(name)
    pipe = client.pipeline(transaction=False)
    pipe.get(key)
    pipe.pttl(key)
    raw, pttl = pipe.execute()
    age = units.to_s(status_ttl_ms(settings) - pttl) if raw is not None and pttl > 0 else None
    said = _document(raw)
    if age is None:
        daemon = "none"
    elif said.get("state") == STOPPED:
        daemon, age = STOPPED, None
    else:
        daemon = "late" if age > pass_grace_s(settings.monitor_interval_s) else "running"
    return LookedAt(
        config=None if config is None else str(config.resolve()),
        url=redact_url(settings.redis_url),
        db=_db(client),
        via=_via(client, settings),
        key_pattern=settings.key_pattern,
        name=name,
        daemon=daemon,
        last_pass_age_s=age,
        stopped_at=str(said.get("stopped_at", "?")) if daemon == STOPPED else None,
        discovery=said["discovery"] if daemon != "none" and isinstance(said.get("discovery"), str) else None,
        findings=_findings(said) if daemon in ("running", "late") else {},
    )


def _findings(said: dict[str, Any]) -> dict[str, list[str]]:
    """The daemon's findings by lock, as it wrote them; anything malformed is left out (data)."""
    raw = said.get("findings")
    if not isinstance(raw, dict):
        return {}
    return {
        str(lock): [str(name) for name in names if isinstance(name, str)]
        for lock, names in raw.items()
        if isinstance(names, list)
    }


def _db(client: Client) -> int:
    """The database the client really selects (the URL's path or ?db=, Sentinel's too)."""
    if isinstance(client, redis.Redis):
        return int(client.connection_pool.connection_kwargs.get("db") or 0)
    return 0  # a Cluster has only database 0


def _via(client: Client, settings: Settings) -> str | None:
    if settings.sentinel_service:
        return f"sentinel {settings.sentinel_service} at {','.join(settings.sentinel_nodes)}"
    return "cluster" if is_cluster(client) else None


def _document(raw: bytes | None) -> dict[str, Any]:
    try:
        said = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return said if isinstance(said, dict) else {}


def locks(snapshot: Snapshot) -> list[Verdict]:
    """The locks in the order people count them: gpu_lock:2 before gpu_lock:10."""
    return sorted(snapshot.verdicts, key=lambda v: natural_key(v.holding.key))


def as_json(snapshot: Snapshot, looked_at: LookedAt | None = None) -> dict[str, Any]:
    now = snapshot.redis_time_ms
    findings = {} if looked_at is None else looked_at.findings
    return {
        "version": JSON_VERSION,
        "redis_time": None if now is None else units.iso(units.to_s(now)),
        "auto_recovery": not snapshot.dry_run,
        **({} if looked_at is None else looked_at.as_json()),
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
                "findings": findings.get(protocol.text(h.key), []),
            }
            for v in locks(snapshot)
            for h in (v.holding,)
        ],
        "invalid": [{"lock_key": protocol.text(o.key), "reason": o.invalid} for o in snapshot.invalid],
        "nvml": {"available": bool(snapshot.gpus), "reason": None if snapshot.gpus else snapshot.nvml_reason},
        "gpus": [g.as_dict() for _, g in sorted(snapshot.gpus.items())],
    }


# A cell's colour on a terminal, by its column and first word: what needs a look is yellow, what
# is or will be released red.
_COLOURS: dict[str, dict[str, str]] = {
    "HEARTBEAT": {"dead": "red"},
    "TIER": {"warning": "yellow", "soft": "yellow", "hard": "red"},
    "WOULD DO": {"warn": "yellow", "release": "red"},
}


def painter(colour: bool) -> Callable[[str, str], str]:
    """`paint(column, text)`: the text in its column's colour (`status`'s and `release`'s)."""

    def paint(column: str, text: str) -> str:
        fg = _COLOURS.get(column, {}).get(text.split(" ", 1)[0])
        return click.style(text, fg=fg) if colour and fg else text

    return paint


def as_table(
    snapshot: Snapshot, looked_at: LookedAt | None = None, *, width: int | None = None, colour: bool = False
) -> str:
    """The table, cut to `width` columns when given (a terminal's); coloured with `colour`."""

    def paint(text: str, fg: str | None) -> str:
        return click.style(text, fg=fg) if colour and fg else text

    def fit(line: str) -> str:
        return line if width is None or len(line) <= width else line[: max(width - 1, 0)] + "…"

    lines: list[str] = []
    if snapshot.verdicts:
        lines += _lock_rows(snapshot, width, painter(colour), {} if looked_at is None else looked_at.findings)
    elif not snapshot.invalid:
        lines.append("no locks held")
    for o in snapshot.invalid:
        lines.append(fit(f"not a lock: {protocol.printable(protocol.text(o.key), CELL_LIMIT)} ({o.invalid})"))
    locked = {g.index for v in snapshot.verdicts if (g := snapshot.gpu_of(v)) is not None}
    for index, g in sorted(snapshot.gpus.items()):
        if index not in locked:
            mem, util, procs = gpu_cells(g)[1:]
            busy = " <- busy with no lock held" if g.processes else ""
            lines.append(fit(f"gpu {index} ({g.name or '?'}): no lock; {mem}, util {util}, {procs} processes{busy}"))
    if looked_at is not None:
        lines += [fit(line) for line in looked_at.where]
        daemon_colour = {"running": None, "late": "red", STOPPED: "red", "none": "yellow"}[looked_at.daemon]
        lines.append(paint(fit(looked_at.daemon_line), daemon_colour))
    return "\n".join(lines)


def _lock_rows(
    snapshot: Snapshot, width: int | None, paint: Callable[[str, str], str], findings: dict[str, list[str]]
) -> list[str]:
    with_gpus = bool(snapshot.gpus)
    header: tuple[str, ...] = ("LOCK", "TASK", "HELD", "HEARTBEAT", "TIER", "WOULD DO", "WHY")
    if with_gpus:
        header += ("GPU", "MEM", "UTIL", "PROCS")
    if findings:
        header += ("FINDINGS",)
    rows = []
    for v in locks(snapshot):
        h = v.holding
        heartbeat = h.heartbeat.value if h.hb_age_s is None else f"{h.heartbeat.value} ({units.human(h.hb_age_s)} ago)"
        row: tuple[str, ...] = (
            protocol.printable(protocol.text(h.key), CELL_LIMIT),
            protocol.printable(protocol.shown(protocol.task_name(h.holder)), CELL_LIMIT),
            units.human(h.held_s),
            heartbeat,
            v.decision.tier.value,
            would_do(v, snapshot.dry_run),
            v.decision.reason.value,
        )
        if with_gpus:
            row += gpu_cells(snapshot.gpu_of(v))
        if findings:
            row += (protocol.printable(",".join(findings.get(protocol.text(h.key), [])) or "-", CELL_LIMIT),)
        rows.append(row)
    widths = _widths(header, [header, *rows], width)
    return [_line(header, row, widths, width, paint) for row in [header, *rows]]


def _widths(header: Sequence[str], rows: Sequence[Sequence[str]], width: int | None) -> list[int]:
    """Each column's width: its longest cell, less what the cuttable columns give up (CUTS)
    for the table to fit in `width`."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    if width is None:
        return widths
    over = sum(widths) + len(GAP) * (len(widths) - 1) - width
    for column, keep in CUTS:
        if over <= 0:
            break
        if column in header:
            i = header.index(column)
            cut = min(over, max(widths[i] - max(keep, len(column)), 0))
            widths[i] -= cut
            over -= cut
    return widths


def _line(
    header: Sequence[str],
    cells: Sequence[str],
    widths: Sequence[int],
    width: int | None,
    paint: Callable[[str, str], str],
) -> str:
    """One row: each cell cut to its column's width; at the terminal's edge, the row itself.
    Cells are padded outside their colour, so colour never shifts a column."""
    out, used = [], 0
    for i, (column, cell, w) in enumerate(zip(header, cells, widths, strict=True)):
        text = cell if len(cell) <= w else cell[: w - 1] + "…"
        gap = GAP if i else ""
        room = None if width is None else width - used - len(gap)
        if room is not None and len(text) > room:
            if room > 0:
                out.append(gap + paint(column, text[: room - 1] + "…"))
            break
        pad = " " * (w - len(text))
        out.append(gap + paint(column, text) + pad)
        used += len(gap) + w
    return "".join(out).rstrip()


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
