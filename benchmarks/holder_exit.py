"""A holder's kill -9 on the monitor's own host -> its lock released, and -> the next holder holding it.

    python benchmarks/holder_exit.py [--trials 30] [--interval 2]

Everything is real and on this host: a throwaway redis-server (notify-keyspace-events K$gx), a
`gpulock-monitor run` daemon (subprocess, its own config file, passes every --interval seconds), a
worker process that takes `gpu_lock:0` with the reference client (monitor.worker.client.GpuLock) and
holds it, and here a second reference client waiting in `acquire()` for the same lock. The worker is
sent SIGKILL (and reaped at once, as its parent would). Measured here, on this process's
time.perf_counter: from just before the kill to the release notice arriving on `gpu_lock:gpu_lock:0`
(subscribed before the kill), and to the waiting client's `acquire()` returning. Rows:

- `pid watch`: the worker's holder record names this host and pid namespace; the worker is killed
  once the daemon watches its process (it holds a pidfd of it: /proc/<daemon>/fdinfo), 50-300 ms
  later. The daemon starts watching a holder at the first read that sees its holder record: the read
  its lock's keyspace event causes, milliseconds after the lock is taken.
- `pid watch, killed at once`: the same worker killed right after acquiring (a few ms): the read its
  lock's event causes starts the watch, which finds the process gone, and the lock is released. Without
  keyspace notifications that read would be the next pass.
- `heartbeat only (1 s)`: the worker's holder record names another host (host name and boot id
  replaced), so the daemon cannot watch its pid and only the heartbeat ends the holding; the worker
  beats every 1 s (TTL 2 s) instead of the default 60 s, so the table fills in minutes. It is killed
  1.5-2.5 s after acquiring; the release comes when its heartbeat expires (the event-driven core reads
  the lock at that deadline): 1-2 s after the kill here, 60-120 s at the default interval.

The audit says which path released each trial (`holder_exited` in the lock_released event: the pid
watch; without it, the heartbeat): the last column counts the trials the pid watch released. Each
trial takes the lock at a random phase against the daemon's passes. With fewer than 100 trials the
p99 is the slowest trial.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from monitor import protocol
from monitor.demo.redis_server import RedisServer, find_binary
from monitor.worker.client import GpuLock

KEY = "gpu_lock:0"
WAIT_S = 30.0  # the most any trial waits for a release or the next holder


class ElsewhereLock(GpuLock):
    """The reference client, its holder record saying it runs on another host."""

    def holder_record(self) -> bytes:
        facts = protocol.this_process()
        facts["host"] = "another-host"
        facts["boot_id"] = "00000000-0000-0000-0000-000000000000"
        return protocol.holder_record(
            task=self.task_name, token=self.token, heartbeat_interval_s=self.heartbeat_interval_s, process=facts
        )


def worker(url: str, heartbeat_s: float, elsewhere: bool) -> None:
    """The holder (`holder_exit.py worker ...`): connected, it says `ready`; a line on stdin makes it
    take the lock, say `held <token>`, and hold it until it is killed."""
    client = redis.Redis.from_url(url, protocol=2)
    client.ping()
    print("ready", flush=True)
    sys.stdin.readline()
    kind = ElsewhereLock if elsewhere else GpuLock
    lock = kind(client, KEY, task_name="bench", heartbeat_interval_s=heartbeat_s, max_wait_s=WAIT_S)
    lock.acquire()
    print(f"held {lock.token}", flush=True)
    while True:
        time.sleep(3600)


@dataclass
class Row:
    name: str
    heartbeat_s: float
    elsewhere: bool = False
    at_once: bool = False
    released_ms: list[float] = field(default_factory=list)
    next_ms: list[float] = field(default_factory=list)
    watched_ms: list[float] = field(default_factory=list)  # acquire -> the daemon holds a pidfd of it
    tokens: list[str] = field(default_factory=list)
    missed: int = 0  # trials with no release notice or no next holder within WAIT_S


def config(tmp: Path, url: str, interval_s: float) -> Path:
    raw = {
        "redis": {"url": url},
        "gpu_lock_monitor": {"monitor_interval": interval_s},
        "audit": {"path": str(tmp / "audit.jsonl"), "critical_path": str(tmp / "critical.jsonl")},
        "metrics": {"enabled": False},
        "nvml": {"enabled": False},
        "logging": {"level": "warning", "format": "json"},
    }
    path = tmp / "monitor.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_daemon(tmp: Path, url: str, interval_s: float) -> subprocess.Popen[bytes]:
    log = (tmp / "daemon.log").open("wb")
    cmd = [sys.executable, "-m", "monitor", "run", "-c", str(config(tmp, url, interval_s))]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    client = redis.Redis.from_url(url, protocol=2)
    deadline = time.monotonic() + 30
    while not client.exists(protocol.last_pass_key("gpu_lock:*")):  # its first pass is done
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not start: {(tmp / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.05)
    client.close()
    return proc


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def holds_pidfd(daemon_pid: int, pid: int) -> bool:
    """True when process `daemon_pid` has a pidfd of process `pid` open (the pid watch's)."""
    fdinfo = Path(f"/proc/{daemon_pid}/fdinfo")
    wanted = f"Pid:\t{pid}\n"
    try:
        fds = os.listdir(fdinfo)
    except OSError:
        return False
    for fd in fds:
        try:
            if wanted in (fdinfo / fd).read_text():
                return True
        except OSError:
            continue
    return False


class Listener(threading.Thread):
    """Subscribed to the lock's release channel when made; the time of the first notice after."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.pubsub: Any = client.pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(protocol.release_channel(KEY.encode()))
        while self.pubsub.get_message(timeout=5) is None:  # the confirmation
            pass
        self.at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            if message is not None:
                self.at = time.perf_counter()
                break
        self.pubsub.close()


class Waiter(threading.Thread):
    """A second reference client in `acquire()`; the time it returned (then it releases at once)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.lock = GpuLock(client, KEY, task_name="next", max_wait_s=WAIT_S)
        self.at: float | None = None

    def run(self) -> None:
        try:
            self.lock.acquire()
        except Exception as exc:  # noqa: BLE001 - a trial that failed is counted, the run goes on
            print(f"  waiter: {exc}", file=sys.stderr)
            return
        self.at = time.perf_counter()
        self.lock.release()


def subscribers(client: redis.Redis) -> int:
    channel = protocol.release_channel(KEY.encode())
    return int(dict(client.pubsub_numsub(channel)).get(channel, 0))


def trial(row: Row, url: str, daemon: subprocess.Popen[bytes], client: redis.Redis, interval_s: float) -> None:
    cmd = [sys.executable, __file__, "worker", url, str(row.heartbeat_s), "1" if row.elsewhere else "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        if proc.stdout.readline() != "ready\n":
            raise RuntimeError("the worker did not start")
        listener = Listener(client)  # subscribed before the lock is even taken
        time.sleep(random.uniform(0, interval_s))  # a random phase against the daemon's passes
        proc.stdin.write("go\n")
        proc.stdin.flush()
        held = proc.stdout.readline().split()
        acquired = time.perf_counter()
        if held[:1] != ["held"]:
            raise RuntimeError(f"the worker did not take the lock: {held}")
        row.tokens.append(held[1])
        if not row.at_once and not row.elsewhere:
            while not holds_pidfd(daemon.pid, proc.pid):
                if time.perf_counter() - acquired > WAIT_S:
                    raise RuntimeError("the daemon never watched the worker")
                time.sleep(0.005)
            row.watched_ms.append((time.perf_counter() - acquired) * 1000)
            time.sleep(random.uniform(0.05, 0.3))
        elif row.elsewhere:
            time.sleep(random.uniform(1.5, 2.5))  # a random phase against its 1 s heartbeat
        waiter = Waiter(redis.Redis.from_url(url, protocol=2))
        waiter.start()
        while subscribers(client) < 2:  # the waiter is subscribed too: no notice can pass it by
            time.sleep(0.001)
        listener.start()
        before = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped at once, as its parent would
        listener.join(WAIT_S + 5)
        waiter.join(WAIT_S + 5)
        waiter.lock.client.close()
        if listener.at is None or waiter.at is None:
            row.missed += 1
            return
        row.released_ms.append((listener.at - before) * 1000)
        row.next_ms.append((waiter.at - before) * 1000)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()


def by_pid_watch(audit: Path, tokens: list[str]) -> int:
    """How many of these holdings the audit says the pid watch released (`holder_exited`)."""
    released = [json.loads(line) for line in audit.read_text().splitlines() if '"lock_released"' in line]
    ours = set(tokens)
    return sum(
        1
        for e in released
        if e.get("holder_exited") and re.sub(r".*#", "", str(e.get("holder"))) in ours and e["outcome"] == "released"
    )


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run_row(row: Row, trials: int, interval_s: float) -> None:
    with (
        RedisServer(None, "--notify-keyspace-events", "K$gx") as server,
        tempfile.TemporaryDirectory() as tmp_name,
    ):
        tmp = Path(tmp_name)
        daemon = start_daemon(tmp, server.url, interval_s)
        client = redis.Redis.from_url(server.url, protocol=2)
        try:
            for _ in range(trials):
                trial(row, server.url, daemon, client, interval_s)
        finally:
            stop_daemon(daemon)
            client.close()
        pid_watch = by_pid_watch(tmp / "audit.jsonl", row.tokens)
    r, n = row.released_ms, row.next_ms
    if not r:
        print(f"{row.name:<26} no trial completed ({row.missed} missed)")
        return
    watched = f"{statistics.median(row.watched_ms):.0f}/{max(row.watched_ms):.0f}" if row.watched_ms else "-"
    print(
        f"{row.name:<26} {len(r):>6} {statistics.median(r):>11.1f} {pct(r, 99):>8.1f} {max(r):>8.1f}"
        f" {statistics.median(n):>9.1f} {pct(n, 99):>8.1f} {max(n):>8.1f} {watched:>15}"
        f" {f'{pid_watch}/{len(row.tokens)}':>12}" + (f"  ({row.missed} missed)" if row.missed else "")
    )


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.0, help="the daemon's monitor_interval, seconds")
    parser.add_argument("--rows", default="watched,at-once,heartbeat", help="which rows, comma-separated")
    args = parser.parse_args()
    said = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    version = said.split()[2].removeprefix("v=")
    print(
        f"{platform.machine()}, Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" redis-server {version}; pidfd: {hasattr(os, 'pidfd_open')}; passes every {args.interval:g} s"
    )
    print("kill -9 -> release notice, and -> the next holder's acquire() returning (ms)")
    print(
        f"{'row':<26} {'trials':>6} {'release p50':>11} {'p99':>8} {'max':>8} {'next p50':>9} {'p99':>8} {'max':>8}"
        f" {'watched p50/max':>15} {'by pid watch':>12}"
    )
    rows = {
        "watched": Row("pid watch", 60),
        "at-once": Row("pid watch, killed at once", 60, at_once=True),
        "heartbeat": Row("heartbeat only (1 s)", 1, elsewhere=True),
    }
    for name in args.rows.split(","):
        run_row(rows[name], args.trials, args.interval)


if __name__ == "__main__":
    main()
