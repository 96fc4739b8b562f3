"""The daemon's memory: RSS of a real `gpulock-monitor run` watching N locks.

    python benchmarks/rss.py [--locks 10000] [--passes 15] [--notifications on|off] [--holder-records]

Starts its own throwaway redis-server (notify-keyspace-events K$gx, or none with `off`), takes N
locks with heartbeats (with `--holder-records`, as the reference client takes them: each with its
holder record, of a process on another host), starts the daemon as a subprocess (metrics on, a
pass every second, JSON logs at warning) and waits for it to finish `--passes` passes, rewriting
half of the heartbeats before each, as workers beating every 60 s do between passes 30 s apart.
Prints the daemon's RSS then, scrapes /metrics once (a Prometheus server does) and prints its RSS
and its peak (VmRSS, VmHWM) after; and the same with no locks for comparison.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis
import yaml

from monitor import protocol
from monitor.demo.redis_server import RedisServer, find_binary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from events import add_holder_records, add_locks, beat  # a sibling script, not a package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp: Path, url: str, port: int, notifications: str) -> Path:
    raw = {
        "redis": {"url": url},
        "gpu_lock_monitor": {"monitor_interval": 1},
        "audit": {"path": str(tmp / "audit.jsonl"), "critical_path": str(tmp / "critical.jsonl")},
        "metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        "nvml": {"enabled": False},
        "logging": {"level": "warning", "format": "json"},
        "discovery": {"notifications": "auto" if notifications == "on" else "off"},
    }
    path = tmp / "monitor.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def status_kb(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def passes_done(admin: redis.Redis) -> int:
    """The start of the last complete pass (Redis-clock ms): it moves once a pass."""
    raw = admin.get(protocol.last_pass_key("gpu_lock:*"))
    return 0 if raw is None else int(raw)


def measure(locks: int, passes: int, notifications: str, *, records: bool) -> tuple[float, float, float, int]:
    flags = "K$gx" if notifications == "on" else ""
    with RedisServer(None, "--notify-keyspace-events", flags) as server, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        admin = redis.Redis.from_url(server.url, protocol=2)
        add_locks(admin, locks)
        if records:
            add_holder_records(admin, locks)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "-c", str(config(tmp, server.url, port, notifications))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            seen, marks = 0, 0
            deadline = time.monotonic() + 60 + passes * 5
            while marks < passes and time.monotonic() < deadline:
                mark = passes_done(admin)
                if mark != seen:  # a pass completed: the workers beat before the next one
                    seen, marks = mark, marks + 1
                    beat(admin, locks, half=marks % 2)
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited with {proc.returncode}")
                time.sleep(0.05)
            before = status_kb(proc.pid)["VmRSS"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
                response.read()
            time.sleep(0.5)
            kb = status_kb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return before / 1024, kb["VmRSS"] / 1024, kb["VmHWM"] / 1024, marks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--locks", type=int, default=10_000)
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--notifications", choices=["on", "off"], default="on")
    parser.add_argument("--holder-records", action="store_true")
    args = parser.parse_args()
    version = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, check=True).stdout.split()[2]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, redis {version}")
    print(f"{'locks':>7} {'passes':>7} {'RSS MiB':>8} {'scraped':>8} {'peak MiB':>9}")
    for locks in (0, args.locks):
        before, rss, peak, done = measure(locks, args.passes, args.notifications, records=args.holder_records)
        print(f"{locks:>7,} {done:>7} {before:>8.1f} {rss:>8.1f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
