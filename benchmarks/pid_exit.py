"""A holder's kill -9 -> PidWatch's on_exit, on both paths (pidfd, /proc polling).

    python benchmarks/pid_exit.py [--kills 50] [--poll-s 0.25,0.05]

Each trial starts a child (`sleep`), watches it, sends SIGKILL and takes the time from just before
the kill to the callback's first line (time.perf_counter on both sides), then reaps the child. The
child is left unreaped until the callback came: the zombie is what both paths see. The polling
path's latency is the poll interval's phase at the kill: about uniform in [0, poll_s]. With 50
kills the p99 is the slowest one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import threading
import time

from monitor import protocol
from monitor.pidwatch import PidWatch

SLEEP = shutil.which("sleep") or "/bin/sleep"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(kills: int, *, pidfd: bool, poll_s: float) -> list[float]:
    seen: dict[bytes, float] = {}
    arrived = threading.Event()

    def on_exit(key: bytes, token: str) -> None:
        seen[key] = time.perf_counter()
        arrived.set()

    watch = PidWatch(on_exit, poll_s=poll_s, **({} if pidfd else {"pidfd_open": None}))
    watch.start()
    latencies = []
    try:
        for i in range(kills):
            child = subprocess.Popen([SLEEP, "600"])
            start = protocol.process_start_time(child.pid)
            assert start is not None
            key = b"gpu_lock:%d" % i
            arrived.clear()
            assert watch.watch(key, "t", child.pid, start)
            # A random phase against the polling interval, as a real death has.
            time.sleep(poll_s * (i % 7) / 7 if not pidfd else 0.005)
            before = time.perf_counter()
            os.kill(child.pid, signal.SIGKILL)
            if not arrived.wait(10):
                raise RuntimeError(f"no on_exit for {key!r} within 10 s")
            latencies.append((seen[key] - before) * 1000)
            child.wait()
    finally:
        watch.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--poll-s", default="0.25,0.05", help="the /proc path's intervals, comma-separated")
    args = parser.parse_args()
    print(f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"kill -9 -> on_exit over {args.kills} kills (ms)")
    print(f"{'path':<24} {'p50':>8} {'p99':>8} {'max':>8}")
    rows = [("pidfd", True, 0.25)] + [(f"/proc every {p} s", False, float(p)) for p in args.poll_s.split(",")]
    for name, pidfd, poll_s in rows:
        if pidfd and not hasattr(os, "pidfd_open"):
            print(f"{name:<24} (no os.pidfd_open here)")
            continue
        ms = measure(args.kills, pidfd=pidfd, poll_s=poll_s)
        print(f"{name:<24} {statistics.median(ms):8.2f} {percentile(ms, 99):8.2f} {max(ms):8.2f}")


if __name__ == "__main__":
    main()
