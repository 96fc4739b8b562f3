"""Reading the audit log: rotated files in order, filters, and `tail -F`-style following."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from monitor import units
from monitor.errors import MonitorError
from monitor.events import Event


def parse_since(text: str, now: float) -> float:
    """A start time (epoch seconds) from `2h`, `90m`, `1d12h`, or an ISO 8601 time (UTC if naive)."""
    span_s = units.parse_span(text)
    if span_s is not None:
        return now - span_s
    try:
        return units.parse_iso(text)
    except ValueError:
        raise MonitorError(f"--since: expected a span like 2h or 30m, or an ISO 8601 time, got {text!r}") from None


def check_event(name: str) -> str:
    """`name` if it is an audit event's name; else one line saying which names there are, so a
    typo is not taken for a quiet log."""
    names = [event.value for event in Event]
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise MonitorError(f"--event: no event is named {name}{hint}; the names are {', '.join(names)}")


@dataclass(frozen=True)
class Filter:
    since: float | None = None
    lock: str | None = None
    event: str | None = None

    def __call__(self, record: dict[str, Any]) -> bool:
        if self.event is not None and record.get("event") != self.event:
            return False
        if self.lock is not None and record.get("lock_key") != self.lock:
            return False
        if self.since is not None:
            try:
                ts = units.parse_iso(str(record.get("ts")))
            except ValueError:
                return False
            if ts < self.since:
                return False
        return True


def log_files(path: Path) -> list[Path]:
    """The rotated files oldest first (path.N ... path.1), then the live file."""
    rotated = []
    for candidate in path.parent.glob(path.name + ".*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def parse_lines(data: bytes) -> Iterator[dict[str, Any]]:
    """Records from whole lines; a torn or foreign line is skipped, never fatal."""
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


# How much of a file is read at a time when reading it from its end.
BLOCK = 64 * 1024
# Records are in the order they were written, timed by the writer's clock: reading back to a time,
# a record up to this much older is not yet taken as the end (the clock may have been stepped back).
CLOCK_STEP_S = 600.0


def everything(_record: dict[str, Any]) -> bool:
    return True


def last(
    path: Path, count: int | None, keep: Callable[[dict[str, Any]], bool] = everything, *, since: float | None = None
) -> list[dict[str, Any]]:
    """The last `count` records that `keep` keeps (all of them with None), oldest first. Read
    from the end of the live file, then the rotated files newest first, only as far back as it
    takes: an `audit -n 10` over millions of lines reads a block or two. `since` says how far
    back to look at most (to a record older than it by CLOCK_STEP_S); `keep` still decides."""
    if not log_files(path):
        raise MonitorError(f"no audit log at {path}")
    return _last(path, count, keep, since=since, live=None)


def _last(
    path: Path,
    count: int | None,
    keep: Callable[[dict[str, Any]], bool],
    *,
    since: float | None,
    live: tuple[BinaryIO, int] | None,
) -> list[dict[str, Any]]:
    """`last`, where `live` is the live file already open (its handle, and where its whole
    lines end): a file that was rotated meanwhile is read once, by its inode."""
    found: list[dict[str, Any]] = []
    read_inodes: set[int] = set()

    def take(handle: BinaryIO, end: int) -> bool:
        """Records of `handle` before `end`, last first; False once enough were found."""
        for record in _records_backwards(handle, end):
            if since is not None and _older(record, since - CLOCK_STEP_S):
                return False
            if keep(record):
                found.append(record)
                if count is not None and len(found) >= count:
                    return False
        return True

    going = count is None or count > 0
    if live is not None and going:
        handle, end = live
        read_inodes.add(os.fstat(handle.fileno()).st_ino)
        going = take(handle, end)
    for file in reversed(log_files(path)):  # the live file, then path.1, path.2, ...
        if not going:
            break
        try:
            handle = file.open("rb")
        except FileNotFoundError:  # rotated away while we read the others
            continue
        with handle:
            st = os.fstat(handle.fileno())
            if st.st_ino not in read_inodes:
                read_inodes.add(st.st_ino)
                going = take(handle, st.st_size)
    return found[::-1]


def _older(record: dict[str, Any], since: float) -> bool:
    try:
        return units.parse_iso(str(record.get("ts"))) < since
    except ValueError:
        return False  # a record without a time is no reason to stop looking


def _records_backwards(handle: BinaryIO, end: int) -> Iterator[dict[str, Any]]:
    """The records of the whole lines before offset `end`, last first: the bytes after the
    last newline before `end` are a line still being written (or torn), not a record."""
    pos, carry, whole = end, b"", False  # `whole`: a newline follows `carry`
    while pos > 0:
        size = min(BLOCK, pos)
        pos -= size
        handle.seek(pos)
        parts = (handle.read(size) + carry).split(b"\n")
        # Every part but the first starts after a newline; every part but the last ends at one
        # (the last does when `carry` did).
        if len(parts) > 1:
            for line in reversed(parts[1:] if whole else parts[1:-1]):
                yield from parse_lines(line)
        carry, whole = parts[0], whole or len(parts) > 1
    if whole:
        yield from parse_lines(carry)


def _line_start(handle: BinaryIO, end: int) -> int:
    """Where the line that `end` falls in starts: after the last newline before `end`, or 0."""
    pos = end
    while pos > 0:
        size = min(BLOCK, pos)
        pos -= size
        handle.seek(pos)
        newline = handle.read(size).rfind(b"\n")
        if newline >= 0:
            return pos + newline + 1
    return 0


def read(path: Path) -> Iterator[dict[str, Any]]:
    files = log_files(path)
    if not files:
        raise MonitorError(f"no audit log at {path}")
    for file in files:
        try:
            data = file.read_bytes()
        except FileNotFoundError:  # rotated away while we read the others
            continue
        yield from parse_lines(data[: data.rfind(b"\n") + 1])


def follow(
    path: Path,
    *,
    stop: Callable[[], bool],
    history: bool = True,
    poll_s: float = 0.2,
    lines: int | None = None,
    keep: Callable[[dict[str, Any]], bool] = everything,
    since: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Records as they are appended, across rotations (by rename, or truncation). With
    `history`, first everything already there: the rotated files, then the live file read on
    from the very handle that follows it, so nothing written in between is missed. With `lines`
    or `since`, only the last `lines` records that `keep` keeps (since `since`) of that history,
    read from the end (`last`), then on from the same handle."""
    tail = lines is not None or since is not None
    handle, ino = _open_live(path, at_end=not history or tail)
    if tail:
        end = _line_start(handle, handle.tell()) if handle else 0
        yield from _last(path, lines, keep, since=since, live=(handle, end) if handle else None)
        if handle:
            handle.seek(end)  # a line still being written is read on below, once it is whole
    elif history:
        for file in log_files(path)[: -1 if handle else None]:
            with contextlib.suppress(FileNotFoundError):
                data = file.read_bytes()
                yield from parse_lines(data[: data.rfind(b"\n") + 1])
    pending = b""
    while not stop():
        chunk = handle.read() if handle else b""
        if chunk:
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            yield from parse_lines(pending[:cut])
            pending = pending[cut:]
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            time.sleep(poll_s)
            continue
        if handle is None or st.st_ino != ino or st.st_size < handle.tell():
            # Rotated: drain what the writer added to the old file, then start the new one at 0.
            if handle:
                pending += handle.read()
                yield from parse_lines(pending[: pending.rfind(b"\n") + 1])
                handle.close()
            handle, ino, pending = path.open("rb"), st.st_ino, b""
            continue
        time.sleep(poll_s)
    if handle:
        handle.close()


def _open_live(path: Path, *, at_end: bool) -> tuple[Any, int]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return None, -1
    if at_end:
        handle.seek(0, os.SEEK_END)
    return handle, os.fstat(handle.fileno()).st_ino


def describe(record: dict[str, Any]) -> str:
    """One human line per event."""
    parts = [str(record.get("ts", "?")), f"{record.get('event', '?'):<20}"]
    if "lock_key" in record:
        parts.append(str(record["lock_key"]))
    for name in ("holder", "held_s", "heartbeat", "tier", "reason", "outcome", "operator", "error"):
        value = record.get(name)
        if value is None:
            continue
        if name == "held_s" and isinstance(value, (int, float)):  # as `status` and `release` show it
            parts.append(f"held={units.human(value)}")
        else:
            parts.append(f"{name}={json.dumps(value, ensure_ascii=False)}")
    return "  ".join(parts)
