"""PidWatch with real processes, on both paths (pidfd, /proc polling), and `watchable`'s table."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_for

from monitor import pidwatch, protocol
from monitor.pidwatch import PidWatch, ProcessHiddenError

WAIT_S = 10.0  # generous: a loaded 2-core CI box; the pidfd path takes milliseconds

PATHS = ["pidfd", "proc"]


class Exits:
    """on_exit's record: every call in order, and an Event per lock key."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.calls: list[tuple[bytes, str, str]] = []
        self.events: dict[bytes, threading.Event] = {}
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def __call__(self, key: bytes, token: str) -> None:
        with self._lock:
            self.calls.append((key, token, threading.current_thread().name))
        self.event(key).set()
        if key == self.fail_on:
            raise RuntimeError("the callback's own bug")

    def event(self, key: bytes) -> threading.Event:
        with self._lock:
            return self.events.setdefault(key, threading.Event())

    def wait(self, key: bytes) -> None:
        assert self.event(key).wait(WAIT_S), f"no on_exit for {key!r} within {WAIT_S} s"


def make_watch(path: str, on_exit: Callable[[bytes, str], None], **kwargs: object) -> PidWatch:
    if path == "pidfd":
        assert hasattr(os, "pidfd_open"), "this host has no pidfd_open: the pidfd path is not tested"
        return PidWatch(on_exit, **kwargs)  # type: ignore[arg-type]
    return PidWatch(on_exit, pidfd_open=None, poll_s=0.02, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def spawn() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "600"])
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()


@pytest.fixture
def watches() -> Iterator[list[PidWatch]]:
    made: list[PidWatch] = []
    yield made
    for watch in made:
        watch.stop()


def started(child: subprocess.Popen[bytes]) -> int:
    start = protocol.process_start_time(child.pid)
    assert start is not None
    return start


def state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rindex(b")") + 2 :].split()[0].decode()


def zombie(child: subprocess.Popen[bytes]) -> None:
    """Kill `child` and leave it unreaped: a zombie."""
    child.send_signal(signal.SIGKILL)
    wait_for(lambda: state(child.pid) == "Z")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- exits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_kill_9_of_a_watched_child_calls_on_exit_once_from_the_watcher_thread(path, spawn, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    watch.start()
    child = spawn()
    assert watch.watch(b"gpu_lock:0", "tok-0", child.pid, started(child))
    assert watch.watching() == {b"gpu_lock:0": ("tok-0", child.pid)}
    child.send_signal(signal.SIGKILL)
    exits.wait(b"gpu_lock:0")
    child.wait()
    # A second process watched and ended later: the first is not reported again.
    other = spawn()
    assert watch.watch(b"gpu_lock:1", "tok-1", other.pid, started(other))
    other.kill()
    exits.wait(b"gpu_lock:1")
    assert exits.calls == [(b"gpu_lock:0", "tok-0", "pidwatch"), (b"gpu_lock:1", "tok-1", "pidwatch")]
    assert watch.watching() == {}
    assert watch.uses_pidfd is (path == "pidfd")


@pytest.mark.parametrize("path", PATHS)
def test_a_normal_exit_is_an_exit(path, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    watch.start()
    # It exits when its stdin closes: no signal involved.
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    try:
        assert watch.watch(b"gpu_lock:0", "t", child.pid, started(child))
        assert child.stdin is not None
        child.stdin.close()
        exits.wait(b"gpu_lock:0")
        assert child.wait(timeout=WAIT_S) == 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("path", PATHS)
def test_a_zombie_counts_as_exited(path, spawn, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    watch.start()
    # Watched, then killed and never reaped while on_exit is awaited.
    child = spawn()
    assert watch.watch(b"gpu_lock:0", "t", child.pid, started(child))
    start = started(child)
    zombie(child)
    exits.wait(b"gpu_lock:0")
    assert state(child.pid) == "Z"
    # Already a zombie when watched: not running, so False, and no callback.
    assert not watch.watch(b"gpu_lock:1", "t", child.pid, start)
    assert watch.watching() == {}
    assert [call[0] for call in exits.calls] == [b"gpu_lock:0"]


@pytest.mark.parametrize("path", PATHS)
def test_a_reused_pid_is_not_the_recorded_process(path, spawn, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    child = spawn()
    fds = open_fds()
    # The record's process started at another time: the pid names somebody else now, or the holder
    # reads its start time in a time namespace of its own. Neither watched nor said dead.
    for start in (started(child) + 1, started(child) - 1):
        with pytest.raises(pidwatch.StartTimeMismatchError):
            watch.watch(b"gpu_lock:0", "t", child.pid, start)
    assert watch.watching() == {}
    assert open_fds() == fds  # the pidfd opened for the check is closed again


@pytest.mark.parametrize("path", PATHS)
def test_a_process_already_gone_is_not_watched(path, spawn, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    child = spawn()
    start = started(child)
    child.kill()
    child.wait()
    assert not watch.watch(b"gpu_lock:0", "t", child.pid, start)
    assert watch.watching() == {}


@pytest.mark.parametrize("path", PATHS)
def test_unwatch_before_the_exit_means_no_callback(path, spawn, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    watch.start()
    quiet, sentinel = spawn(), spawn()
    assert watch.watch(b"gpu_lock:0", "t0", quiet.pid, started(quiet))
    assert watch.watch(b"gpu_lock:1", "t1", sentinel.pid, started(sentinel))
    watch.unwatch(b"gpu_lock:0")
    watch.unwatch(b"gpu_lock:9")  # never watched: nothing happens
    assert watch.watching() == {b"gpu_lock:1": ("t1", sentinel.pid)}
    zombie(quiet)  # dead (and never reaped) before the sentinel dies: a report would come first
    sentinel.kill()
    exits.wait(b"gpu_lock:1")
    assert [call[0] for call in exits.calls] == [b"gpu_lock:1"]


@pytest.mark.parametrize("path", PATHS)
def test_a_new_watch_of_a_key_replaces_the_old(path, spawn, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    watch.start()
    first, second = spawn(), spawn()
    assert watch.watch(b"gpu_lock:0", "old", first.pid, started(first))
    assert watch.watch(b"gpu_lock:0", "new", second.pid, started(second))
    zombie(first)
    second.kill()
    exits.wait(b"gpu_lock:0")
    assert [call[:2] for call in exits.calls] == [(b"gpu_lock:0", "new")]
    # A watch of a process already gone drops the key's earlier one too: that holding is over.
    third, fourth = spawn(), spawn()
    assert watch.watch(b"gpu_lock:1", "a", third.pid, started(third))
    with pytest.raises(pidwatch.StartTimeMismatchError):  # unproven: the earlier watch stays
        watch.watch(b"gpu_lock:1", "b", third.pid, started(third) + 1)
    assert watch.watching() == {b"gpu_lock:1": ("a", third.pid)}
    gone = started(fourth)
    zombie(fourth)
    assert not watch.watch(b"gpu_lock:1", "c", fourth.pid, gone)
    assert watch.watching() == {}


@pytest.mark.parametrize("path", PATHS)
def test_a_raising_callback_does_not_stop_later_notifications(path, spawn, watches, capsys, caplog):
    exits = Exits(fail_on=b"gpu_lock:0")
    watch = make_watch(path, exits)
    watches.append(watch)
    watch.start()
    first, second = spawn(), spawn()
    assert watch.watch(b"gpu_lock:0", "t0", first.pid, started(first))
    assert watch.watch(b"gpu_lock:1", "t1", second.pid, started(second))
    first.kill()
    exits.wait(b"gpu_lock:0")
    first.wait()
    second.kill()
    exits.wait(b"gpu_lock:1")
    assert [call[0] for call in exits.calls] == [b"gpu_lock:0", b"gpu_lock:1"]
    captured = capsys.readouterr()
    logged = captured.out + captured.err + caplog.text
    assert "pidwatch_callback_failed" in logged
    assert "the callback's own bug" in logged


@pytest.mark.parametrize("path", PATHS)
def test_watches_made_before_start_are_watched_from_start(path, spawn, watches):
    exits = Exits()
    watch = make_watch(path, exits)
    watches.append(watch)
    child = spawn()
    assert watch.watch(b"gpu_lock:0", "t", child.pid, started(child))
    zombie(child)
    watch.start()
    watch.start()  # a second start is a no-op
    exits.wait(b"gpu_lock:0")
    assert len(exits.calls) == 1


@pytest.mark.parametrize("path", PATHS)
def test_stop_forgets_every_watch_and_closes_its_descriptors(path, spawn):
    exits = Exits()
    fds = open_fds()
    watch = make_watch(path, exits)
    first, second = spawn(), spawn()
    assert watch.watch(b"gpu_lock:0", "t", first.pid, started(first))
    watch.unwatch(b"gpu_lock:0")  # not started: its pidfd is closed at once
    assert watch.watch(b"gpu_lock:0", "t", first.pid, started(first))
    watch.start()
    assert watch.watch(b"gpu_lock:1", "t", second.pid, started(second))
    watch.unwatch(b"gpu_lock:1")  # started: the thread closes it
    watch.stop()
    assert watch.watching() == {}
    assert open_fds() == fds
    # And it starts again, fresh.
    watch.start()
    assert watch.watch(b"gpu_lock:2", "t", second.pid, started(second))
    second.kill()
    exits.wait(b"gpu_lock:2")
    assert [call[0] for call in exits.calls] == [b"gpu_lock:2"]
    watch.stop()
    watch.stop()  # stopping twice is harmless
    assert open_fds() == fds


def test_a_watch_unwatched_by_an_earlier_callback_of_the_same_round_is_not_reported(spawn, tmp_path, watches):
    calls: list[bytes] = []

    def on_exit(key: bytes, token: str) -> None:
        calls.append(key)
        watch.unwatch(b"gpu_lock:1")

    watch = PidWatch(on_exit, pidfd_open=None, poll_s=0.02, proc=tmp_path)
    watches.append(watch)
    first, second = spawn(), spawn()
    stats = [fake_proc(tmp_path, first), fake_proc(tmp_path, second)]
    assert watch.watch(b"gpu_lock:0", "t", first.pid, started(first))
    assert watch.watch(b"gpu_lock:1", "t", second.pid, started(second))
    for stat in stats:  # both gone before the thread's first look: one round finds both
        stat.unlink()
    first.kill()
    second.kill()
    first.wait()
    second.wait()
    watch.start()
    wait_for(lambda: watch.watching() == {})
    watch.stop()  # joins the thread: its round is over
    assert calls == [b"gpu_lock:0"]


def test_stop_from_inside_on_exit_does_not_deadlock(spawn):
    done = threading.Event()

    def on_exit(key: bytes, token: str) -> None:
        watch.stop()
        done.set()

    watch = PidWatch(on_exit)
    watch.start()
    child, later = spawn(), spawn()
    assert watch.watch(b"gpu_lock:0", "t", child.pid, started(child))
    child.kill()
    assert done.wait(WAIT_S)
    assert watch.watching() == {}
    # Started again: one thread watches, whatever the stopped one was doing.
    exits = Exits()
    watch._on_exit = exits
    watch.start()
    assert watch.watch(b"gpu_lock:1", "t", later.pid, started(later))
    later.kill()
    exits.wait(b"gpu_lock:1")
    watch.stop()
    assert [call[0] for call in exits.calls] == [b"gpu_lock:1"]
    wait_for(lambda: not any(t.name == "pidwatch" for t in threading.enumerate()))  # the stopped one ended too


def test_poll_s_must_be_positive():
    with pytest.raises(ValueError, match="poll_s"):
        PidWatch(lambda key, token: None, poll_s=0)


# --- pidfd refused or failing --------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOSYS])
def test_pidfd_refused_falls_back_to_proc_for_good(code, spawn, watches):
    tried: list[int] = []

    def refused(pid: int) -> int:
        tried.append(pid)
        raise OSError(code, os.strerror(code))

    exits = Exits()
    watch = PidWatch(exits, pidfd_open=refused, poll_s=0.02)
    watches.append(watch)
    watch.start()
    assert watch.uses_pidfd
    first, second = spawn(), spawn()
    assert watch.watch(b"gpu_lock:0", "t", first.pid, started(first))
    assert not watch.uses_pidfd
    assert watch.watch(b"gpu_lock:1", "t", second.pid, started(second))
    assert tried == [first.pid]  # not asked again
    first.kill()
    exits.wait(b"gpu_lock:0")


def test_another_pidfd_failure_polls_that_one_process(spawn, watches):
    def out_of_fds(pid: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    exits = Exits()
    watch = PidWatch(exits, pidfd_open=out_of_fds, poll_s=0.02)
    watches.append(watch)
    watch.start()
    child = spawn()
    assert watch.watch(b"gpu_lock:0", "t", child.pid, started(child))
    assert watch.uses_pidfd  # the next watch tries pidfd again
    child.kill()
    exits.wait(b"gpu_lock:0")


# --- a /proc we may not read ---------------------------------------------------------------------


def fake_proc(root: Path, child: subprocess.Popen[bytes], stat: bytes | None = None) -> Path:
    entry = root / str(child.pid)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "stat").write_bytes(Path(f"/proc/{child.pid}/stat").read_bytes() if stat is None else stat)
    return entry / "stat"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stat", [None, b"garbage", b"1 (sleep) S"])
def test_a_live_process_whose_stat_is_hidden_is_neither_watched_nor_dead(path, stat, spawn, tmp_path):
    child = spawn()
    proc = tmp_path / "proc"
    proc.mkdir()
    if stat is not None:
        fake_proc(proc, child, stat)
    watch = make_watch(path, Exits(), proc=proc)
    fds = open_fds()
    with pytest.raises(ProcessHiddenError, match="hidden"):
        watch.watch(b"gpu_lock:0", "t", child.pid, started(child))
    assert watch.watching() == {}
    assert open_fds() == fds


@pytest.mark.parametrize("path", PATHS)
def test_a_dead_process_whose_stat_is_hidden_is_gone(path, spawn, tmp_path):
    child = spawn()
    start = started(child)
    zombie(child)  # a pidfd of a zombie is readable; kill(pid, 0) still finds it, so reap it for "proc"
    if path == "proc":
        child.wait()
    watch = make_watch(path, Exits(), proc=tmp_path)
    assert not watch.watch(b"gpu_lock:0", "t", child.pid, start)


def test_a_polled_process_that_becomes_hidden_is_kept_until_it_is_gone(spawn, tmp_path, watches):
    exits = Exits()
    watch = PidWatch(exits, pidfd_open=None, poll_s=0.02, proc=tmp_path)
    watches.append(watch)
    hidden, sentinel = spawn(), spawn()
    fake_proc(tmp_path, hidden)
    sentinel_stat = fake_proc(tmp_path, sentinel)
    watch.start()
    assert watch.watch(b"gpu_lock:0", "t0", hidden.pid, started(hidden))
    assert watch.watch(b"gpu_lock:1", "t1", sentinel.pid, started(sentinel))
    # Hidden first, then the sentinel a zombie: a poll that sees the sentinel go sees the hidden one.
    (tmp_path / str(hidden.pid) / "stat").unlink()
    data = sentinel_stat.read_bytes()
    end = data.rindex(b")") + 2
    sentinel_stat.write_bytes(data[:end] + b"Z" + data[end + 1 :])
    exits.wait(b"gpu_lock:1")
    assert watch.watching() == {b"gpu_lock:0": ("t0", hidden.pid)}
    hidden.kill()
    hidden.wait()
    exits.wait(b"gpu_lock:0")
    assert [call[0] for call in exits.calls] == [b"gpu_lock:1", b"gpu_lock:0"]


def test_exists_reads_a_refused_signal_as_a_process(monkeypatch):
    def refused(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "not yours")

    monkeypatch.setattr(pidwatch.os, "kill", refused)
    assert pidwatch._exists(12345)


# --- boot id -------------------------------------------------------------------------------------


def test_boot_id():
    assert protocol.boot_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# --- watchable -----------------------------------------------------------------------------------

NS = 4026531836
BOOT = "6b4f3c0e-8b7a-4e0c-9d2e-1f0a2b3c4d5e"


def record(**fields: object) -> protocol.HolderRecord:
    base: dict[str, object] = {
        "v": 1,
        "host": "gpu-node-3",
        "pid": 4242,
        "pid_ns": NS,
        "start_time": 81234567,
        "gpu_uuid": None,
        "task": "tts",
        "task_id": None,
        "token": "tok",
        "heartbeat_interval_s": 60.0,
        "heartbeats": True,
        "progress_ms": None,
        "progress_timeout_s": None,
        "boot_id": BOOT,
    }
    base.update(fields)
    return base  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("fields", "ours", "expected"),
    [
        ({}, {}, True),
        ({"host": "another-name"}, {}, True),  # the boot id decides, not the name
        ({"boot_id": "another-boot"}, {}, False),  # another host, or this one booted since
        ({"boot_id": None}, {}, False),  # no boot id: a host name proves nothing, never guess
        ({"boot_id": ""}, {}, False),
        ({}, {"boot_id": "another-boot"}, False),
        ({"pid_ns": NS + 1}, {}, False),  # a container's pid namespace
        ({"pid_ns": None}, {}, False),  # never guess
        ({"pid": None}, {}, False),
        ({"start_time": None}, {}, False),  # nothing guards against pid reuse
    ],
)
def test_watchable(fields, ours, expected):
    kwargs: dict[str, object] = {"pid_ns": NS, "boot_id": BOOT}
    kwargs.update(ours)
    assert pidwatch.watchable(record(**fields), **kwargs) is expected  # type: ignore[arg-type]


def test_watchable_defaults_to_this_process(monkeypatch):
    here = protocol.this_process()
    mine = record(pid=here["pid"], pid_ns=here["pid_ns"], start_time=here["start_time"], boot_id=here["boot_id"])
    assert pidwatch.watchable(mine)
    assert not pidwatch.watchable(record(**{**mine, "boot_id": BOOT}))
    monkeypatch.setattr(protocol, "boot_id", lambda: None)
    assert not pidwatch.watchable(mine)  # ours unknown: no guess
    monkeypatch.setattr(protocol, "pid_namespace", lambda pid="self": None)
    assert not pidwatch.watchable(mine)


ZOMBIE_LEADER = """
import ctypes, threading, time
threading.Thread(target=lambda: time.sleep(600)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)  # the main thread ends; the process goes on in the other
"""


def test_a_zombie_leader_whose_threads_run_on_is_alive_to_a_pidfd(watches):
    exits = Exits()
    watch = make_watch("pidfd", exits)
    watches.append(watch)
    watch.start()
    proc = subprocess.Popen([sys.executable, "-c", ZOMBIE_LEADER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        start = protocol.process_start_time(proc.pid)
        assert start is not None
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
        assert watch.watch(b"gpu_lock:0", "t", proc.pid, start)  # /proc says zombie; the pidfd, alive
        proc.kill()
        exits.wait(b"gpu_lock:0")
    finally:
        proc.kill()
        proc.wait()
