"""Audit and critical-failure logs: append-only JSONL, each line whole or not at all.

A line is encoded in full, then written with one `write` on an O_APPEND descriptor. If the
write fails or comes up short (a full disk), the file is truncated back to where the line
began, so no torn line stays behind, and the event is kept in memory and written again
before the next one: order is kept and nothing is lost while the process lives. Values
from Redis are passed through `protocol.text`, and JSON escapes newlines and quotes, so a hostile
holder string cannot break a line.

Before each write the path is checked against the open descriptor (device and inode, as
`tail -F` does): a file deleted, or renamed away and replaced, under the daemon is reopened
at its path, so the line lands where readers look instead of in an unlinked inode. SIGHUP
(`reopen`) still works, and is what moves the lines on after a rename with no file created.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import traceback
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monitor import __version__, units
from monitor.errors import AuditWriteError

SCHEMA_VERSION = 1
# Events waiting for a failing disk; beyond this the oldest are dropped (and counted).
MAX_PENDING = 10_000


def monitor_identity(name: str | None = None) -> dict[str, Any]:
    """Who wrote an event: the real host name, and `name` (`monitor.name`; the host name when not
    set), which stays the same across a pod's restarts."""
    host = socket.gethostname()
    return {"host": host, "name": name or host, "pid": os.getpid(), "version": __version__}


class JsonlFile:
    """One append-only JSONL file. Thread-safe; `write` raises AuditWriteError on failure."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None, backups: int = 0) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending: deque[bytes] = deque()
        self._reopen = False
        self.dropped = 0
        self.failures = 0
        self.error: str | None = None  # why the last write failed

    def open(self) -> None:
        """Create the file (and its directory) now, so a bad path fails at start-up."""
        with self._lock:
            self._ensure_open()

    def write(self, record: Mapping[str, Any], *, sync: bool = False) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8") + b"\n"
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(line)
            try:
                fd = self._ensure_open()
                while self._pending:
                    if self._full(fd, len(self._pending[0])):
                        self._rotate()
                        fd = self._ensure_open()
                    _append_whole(fd, self._pending[0])
                    self._pending.popleft()
                if sync:
                    os.fsync(fd)
            except OSError as exc:
                self.failures += 1
                self.error = f"{self.path}: {exc.strerror or exc}"
                self._close()
                raise AuditWriteError(self.error) from exc

    def reopen(self) -> None:
        """Close and reopen the file before the next line (after an external logrotate).

        Only sets a flag, so it is safe to call from a signal handler."""
        self._reopen = True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _full(self, fd: int, adding: int) -> bool:
        if self.max_bytes is None:
            return False
        size = os.fstat(fd).st_size
        return size > 0 and size + adding > self.max_bytes

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.<backups>; the oldest is dropped."""
        self._close()
        name = self.path.name
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{name}.1"))
        else:
            os.unlink(self.path)

    def _ensure_open(self) -> int:
        if self._reopen or (self._fd is not None and self._moved(self._fd)):
            self._reopen = False
            self._close()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                _end_with_newline(fd)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def _moved(self, fd: int) -> bool:
        """Whether the line must go to a new file at the path: the open one was deleted, or
        another file now stands at its path. One renamed away with nothing in its place yet (a
        rotation under way) keeps the lines until the new file is created or SIGHUP comes:
        logrotate's `create` fails when the path exists already."""
        held = os.fstat(fd)
        try:
            at_path = os.stat(self.path)
        except OSError:  # nothing reachable at the path
            return held.st_nlink == 0
        return (at_path.st_dev, at_path.st_ino) != (held.st_dev, held.st_ino)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # closing on a failed disk may fail too; nothing to keep
                os.close(fd)


def _append_whole(fd: int, line: bytes) -> None:
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        written = os.write(fd, line)
    except OSError:
        _truncate(fd, start)
        raise
    if written != len(line):
        _truncate(fd, start)
        raise OSError(28, "short write (disk full?)")


def _truncate(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):  # the line stays torn on disk; readers skip non-JSON lines
        os.ftruncate(fd, size)


def _end_with_newline(fd: int) -> None:
    """A file left torn by a crash of another writer gets its last line closed first."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


def critical_record(
    *, lock_key: str, holder: str, exc: BaseException, attempts: int, now: float, **extra: Any
) -> dict[str, Any]:
    """One critical-failure line (DESIGN.md section 5), for the daemon and the worker client."""
    return {
        "v": SCHEMA_VERSION,
        "ts": units.iso(now),
        "timestamp": now,
        "event": "release_failed",
        "lock_key": lock_key,
        "holder": holder,
        "error": str(exc),
        "error_type": exc.__class__.__name__,
        "traceback": "".join(traceback.format_exception(exc)),
        "hostname": socket.gethostname(),
        "attempts": attempts,
        **extra,
    }


class AuditLog:
    """Builds audit events (schema v1, DESIGN.md section 7) and writes them."""

    def __init__(self, file: JsonlFile, *, dry_run: bool = False, name: str | None = None) -> None:
        self.file = file
        self.dry_run = dry_run
        self.identity = monitor_identity(name)

    def event(self, name: str, *, sync: bool = False, now: float, **fields: Any) -> dict[str, Any]:
        record = {"v": SCHEMA_VERSION, "ts": units.iso(now), "event": name, **fields, "monitor": self.identity}
        self.file.write(record, sync=sync)
        return record
