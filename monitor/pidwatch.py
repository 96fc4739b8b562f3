"""A holder's death seen at once, on the holder's own host (issue 14, DESIGN.md section 6).

Where a holder record (`<lock_key>:holder`, protocol.HolderRecord) names this host and a pid in this
process's pid namespace, the monitor need not wait for the heartbeat's TTL: it watches the process
itself and hears of its exit within milliseconds.

How: a pidfd (`os.pidfd_open`, Linux >= 5.3, Python >= 3.9) becomes readable when its process exits;
one daemon thread polls every pidfd plus a wake-up pipe (watch, unwatch, stop). The pidfd is opened
FIRST and the process's start time (/proc/<pid>/stat field 22) checked against the record's AFTER:
a pid reused between the record and the open has another start time, so a pidfd that passes the
check is provably the recorded process, and nothing later can swap it. Where pidfd_open is missing or
refused (ENOSYS on kernels before 5.3; EPERM from a seccomp filter), the thread instead reads
/proc/<pid>/stat every `poll_s`: gone, another start time (the pid was reused) or a zombie all mean
the holder exited. A zombie (exited, not yet reaped by its parent) counts as exited on both paths.

What it cannot see, by design (the heartbeat and the tiers still judge these):
- a holder on another host, or in another pid namespace (a container's pid means another process on
  the host): `watchable` says False and nothing is watched;
- a holder that hangs without exiting (a spinning kernel, a deadlock): it is alive; that is the hang
  findings' job;
- a process it may not look at: see below. Then `watch` raises `ProcessHiddenError`, never a guess.

Permissions. pidfd_open needs no ptrace rights: any process in our pid namespace can be opened,
another user's included. Reading /proc/<pid>/stat of another user's process works on a default /proc,
but NOT under hidepid: systemd's `ProtectProc=invisible` (and `noaccess`) hides other users'
processes from a service without CAP_SYS_PTRACE, so their start time cannot be checked, and the watch
is refused (`ProcessHiddenError`). deploy/systemd/gpulock-monitor.service sets `ProtectProc=invisible` and
`DynamicUser=yes`: workers run as other users, so this module can watch nobody there until the unit
says `ProtectProc=default` (PrivateUsers=yes does not matter: it does not change the pid namespace).
pidfd_open is in systemd's `@process` set, itself in `@system-service`; a systemd too old to list it
returns EPERM (SystemCallErrorNumber=EPERM) and the /proc path takes over.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from monitor import protocol
from monitor.logs import get_logger

log = get_logger("gpulock_monitor.pidwatch")

PidfdOpen = Callable[[int], int]

# /proc/<pid>/stat states of a process that has exited: zombie, dead.
_EXITED_STATES = frozenset({"Z", "X", "x"})
# pidfd_open errors that mean "never on this host": no such system call, or a seccomp filter's refusal.
_PIDFD_UNAVAILABLE = frozenset({errno.ENOSYS, errno.EPERM})


class StartTimeMismatchError(OSError):
    """The pid names a process whose start time is not the record's: the recorded process is gone
    and its pid reused, or the holder reads its own start time otherwise (a time namespace of its
    own shifts /proc's start times). Which, nothing here can tell: neither watched nor reported dead."""


class ProcessHiddenError(OSError):
    """The process exists but cannot be proven to be the recorded one (its /proc entry is hidden from
    this monitor, e.g. systemd's ProtectProc=invisible): neither watched nor reported dead."""


def watchable(record: protocol.HolderRecord, *, pid_ns: int | None = None, boot_id: str | None = None) -> bool:
    """True only when `record`'s pid means a process this monitor can watch: the record's boot id is
    this host's (a host name proves nothing: cloned images share one, and every bare-metal host's
    first pid namespace has the same inode), its pid is in this process's pid namespace, and it
    gives the start time that guards against pid reuse. A field missing on either side is False:
    never guess. `pid_ns` and `boot_id` default to this process's."""
    if record["pid"] is None or record["pid_ns"] is None or record["start_time"] is None:
        return False
    ours_ns = protocol.pid_namespace() if pid_ns is None else pid_ns
    if ours_ns is None or record["pid_ns"] != ours_ns:
        return False
    ours_boot = protocol.boot_id() if boot_id is None else boot_id
    return bool(record["boot_id"]) and ours_boot is not None and record["boot_id"] == ours_boot


@dataclass(eq=False)
class _Watch:
    key: bytes
    token: str
    pid: int
    start_time: int
    fd: int | None  # the pidfd; None: polled through /proc


class PidWatch:
    """Calls `on_exit(key, token)` once when a watched process exits, from one daemon thread.

    `watch` before or after `start`; `stop` ends the thread and forgets every watch (no callback for
    them). An exception raised by `on_exit` is logged and the thread goes on. `pidfd_open`: "auto"
    (os.pidfd_open where Python has it), a callable of the same contract, or None to poll /proc only.
    """

    def __init__(
        self,
        on_exit: Callable[[bytes, str], None],
        *,
        poll_s: float = 0.25,
        proc: Path = Path("/proc"),
        pidfd_open: PidfdOpen | Literal["auto"] | None = "auto",
    ) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be positive, not {poll_s!r}")
        self._on_exit = on_exit
        self.poll_s = poll_s
        self._proc = proc
        self._pidfd_open: PidfdOpen | None = getattr(os, "pidfd_open", None) if pidfd_open == "auto" else pidfd_open
        self._lock = threading.Lock()
        self._watches: dict[bytes, _Watch] = {}
        self._closing: list[int] = []  # pidfds of dropped watches, closed by the thread (not mid-poll)
        self._thread: threading.Thread | None = None
        self._run_id = 0  # which thread may run: start and stop move it on
        self._wake: tuple[int, int] | None = None

    @property
    def uses_pidfd(self) -> bool:
        """False once pidfd_open is known missing or refused here: new watches poll /proc."""
        return self._pidfd_open is not None

    # --- the callers' side -----------------------------------------------------------------------

    def watch(self, key: bytes, token: str, pid: int, start_time: int) -> bool:
        """Watch process `pid` that started at `start_time` (clock ticks after boot) for the holding
        `token` of lock `key`, replacing any earlier watch of `key`. False, and no callback, when that
        process is not running: gone, or a zombie; an earlier watch of `key` is dropped then too (a
        new holding supersedes it). Raises ProcessHiddenError when the process exists but its /proc
        entry is hidden from us, and StartTimeMismatchError when the pid names a process with another
        start time: in both, its identity cannot be proven, and nothing is said of it."""
        try:
            fd = self._open(pid)
        except ProcessLookupError:
            fd, alive = None, False
        else:
            try:
                alive = self._verify(pid, start_time, fd)
            except BaseException:
                _close(fd)
                raise
        if not alive:
            _close(fd)
            self.unwatch(key)
            return False
        with self._lock:
            old = self._watches.pop(key, None)
            self._watches[key] = _Watch(key, token, pid, start_time, fd)
            if old is not None:
                self._retire(old)
            self._poke()
        return True

    def unwatch(self, key: bytes) -> None:
        """Stop watching `key`: no callback for it after this returns (one already running may end)."""
        with self._lock:
            old = self._watches.pop(key, None)
            if old is not None:
                self._retire(old)
                self._poke()

    def watching(self) -> dict[bytes, tuple[str, int]]:
        """Every watched lock key: (token, pid)."""
        with self._lock:
            return {key: (w.token, w.pid) for key, w in self._watches.items()}

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wake = (read, write)
            self._run_id += 1
            self._thread = threading.Thread(target=self._run, args=(read, self._run_id), name="pidwatch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            thread = self._thread
            self._run_id += 1
            self._poke()
        if thread is not None and thread is not threading.current_thread():  # on_exit may stop us
            thread.join()
        with self._lock:
            for w in self._watches.values():
                _close(w.fd)
            self._watches.clear()
            for fd in self._closing:
                os.close(fd)
            self._closing.clear()
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
            self._wake, self._thread = None, None

    # --- watch -----------------------------------------------------------------------------------

    def _open(self, pid: int) -> int | None:
        """A pidfd for `pid`, or None to poll /proc (raises ProcessLookupError when there is no pid)."""
        opener = self._pidfd_open
        if opener is None:
            return None
        try:
            return opener(pid)
        except ProcessLookupError:
            raise
        except OSError as exc:
            if exc.errno in _PIDFD_UNAVAILABLE:
                self._pidfd_open = None
                log.warning("pidfd_unavailable", error=str(exc), fallback="proc", poll_s=self.poll_s)
            else:  # out of descriptors, a thread's id: this one watch polls
                log.warning("pidfd_open_failed", pid=pid, error=str(exc), fallback="proc")
            return None

    def _verify(self, pid: int, start_time: int, fd: int | None) -> bool:
        facts = self._stat(pid)
        if facts is None:
            # No /proc entry: gone (a pidfd that was opened is readable by now), or hidden from us.
            exists = not _exited(fd) if fd is not None else _exists(pid)
            if exists:
                raise ProcessHiddenError(errno.EACCES, f"process {pid} exists but {self._proc}/{pid}/stat is hidden")
            return False
        state, started = facts
        # With a pidfd its readability says it: a thread-group leader that is a zombie while its other
        # threads run (pthread_exit in main) has not exited. Without one, /proc's state is all there is.
        if _exited(fd) if fd is not None else state in _EXITED_STATES:
            return False
        if started != start_time:
            raise StartTimeMismatchError(errno.ESRCH, f"process {pid} started at {started}, not {start_time}")
        return True

    def _stat(self, pid: int) -> tuple[str, int] | None:
        """(state, start time) from /proc/<pid>/stat; None when there is none we can read."""
        try:
            data = (self._proc / str(pid) / "stat").read_bytes()
            # The command name (field 2) is in parentheses and may hold spaces and parentheses.
            fields = data[data.rindex(b")") + 2 :].split()
            return fields[0].decode("ascii", "replace"), int(fields[22 - 3])
        except (OSError, ValueError, IndexError):
            return None

    def _gone(self, w: _Watch) -> bool:
        """The /proc path's judgement of one watch."""
        facts = self._stat(w.pid)
        if facts is None:
            # Hidden now (its credentials changed under hidepid) is not proof of exit: keep waiting.
            return not _exists(w.pid)
        state, started = facts
        return started != w.start_time or state in _EXITED_STATES

    # --- the thread ------------------------------------------------------------------------------

    def _retire(self, w: _Watch) -> None:
        """Under the lock: a dropped watch's pidfd is closed by the thread (never while it polls it)."""
        if w.fd is None:
            return
        if self._thread is not None:
            self._closing.append(w.fd)
        else:
            os.close(w.fd)

    def _poke(self) -> None:
        """Under the lock: wake the thread to take the watches in again."""
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):  # the pipe is full: wake-ups enough
                os.write(self._wake[1], b"\0")

    def _run(self, wake: int, run_id: int) -> None:
        next_poll = time.monotonic()
        while True:
            with self._lock:
                if self._run_id != run_id:
                    return
                for fd in self._closing:
                    os.close(fd)
                self._closing.clear()
                by_fd = {w.fd: w for w in self._watches.values() if w.fd is not None}
                polled = [w for w in self._watches.values() if w.fd is None]
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            timeout = math.ceil(max(0.0, next_poll - time.monotonic()) * 1000) if polled else None
            exited: list[_Watch] = []
            for fd, _ in poller.poll(timeout):
                if fd == wake:
                    _drain(wake)
                else:
                    exited.append(by_fd[fd])
            if polled and time.monotonic() >= next_poll:
                exited.extend(w for w in polled if self._gone(w))
                next_poll = time.monotonic() + self.poll_s
            for w in exited:
                self._fire(w)

    def _fire(self, w: _Watch) -> None:
        with self._lock:
            if self._watches.get(w.key) is not w:  # unwatched or replaced meanwhile
                return
            del self._watches[w.key]
            _close(w.fd)
        try:
            self._on_exit(w.key, w.token)
        except Exception:
            log.exception("pidwatch_callback_failed", lock_key=protocol.shown(w.key), pid=w.pid)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _exited(pidfd: int) -> bool:
    """True when the pidfd's process has exited (a zombie included)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _exists(pid: int) -> bool:
    """True when some process has `pid` in our namespace (another user's too: EPERM says it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _drain(fd: int) -> None:
    # One read empties the pipe (64 KiB); wake-ups beyond it only wake the thread once more.
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 65536)
