"""Kill-and-recover cycles with real processes: how fast does a dead worker's GPU come back?

    python benchmarks/recovery.py [--cycles 20]

Starts a throwaway redis-server and the daemon (heartbeat interval 0.2 s, timeout 1 s, a pass
every 0.2 s). Each cycle: a worker process takes gpu_lock:0, a second worker waits for it,
the first is SIGKILLed. Prints p50/p99 of kill -> monitor release and kill -> next acquire, then
the wake latency of a waiter process (release notice -> its acquire), polling set to 30 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import redis
import yaml

from monitor.demo.redis_server import RedisServer
from monitor.worker.client import GpuLock

HB_S, HB_TIMEOUT_S, INTERVAL_S = 0.2, 1.0, 0.2


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait(predicate, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit("benchmark stalled")
        time.sleep(0.005)
    return value


def worker(url: str, ledger: Path, *extra: str) -> subprocess.Popen[bytes]:
    base = [sys.executable, "-m", "monitor.demo.simworker", "--redis", url, "--gpu", "0", "--ledger", str(ledger)]
    return subprocess.Popen([*base, "--heartbeat-s", str(HB_S), *extra])


def released_event(audit: Path, holder_prefix: str) -> dict[str, object] | None:
    found = [e for e in lines(audit) if e["event"] == "lock_released" and str(e["holder"]).startswith(holder_prefix)]
    return found[0] if found else None


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        audit = tmp / "audit.jsonl"
        config = {
            "redis": {"url": server.url},
            "gpu_lock_monitor": {
                "monitor_interval": INTERVAL_S,
                "timeout_levels": {"warning": 60, "soft_timeout": 120, "hard_timeout": 300},
                "heartbeat": {"interval": HB_S, "timeout": HB_TIMEOUT_S},
            },
            "audit": {"path": str(audit), "critical_path": str(tmp / "critical.jsonl")},
            "metrics": {"enabled": False},
            "logging": {"level": "error", "format": "json"},
        }
        (tmp / "monitor.yml").write_text(yaml.safe_dump(config))
        daemon = subprocess.Popen([sys.executable, "-m", "monitor", "run", "-c", str(tmp / "monitor.yml")])
        to_release, to_acquire = [], []
        try:
            for cycle in range(args.cycles):
                ledger = tmp / f"ledger-{cycle}.jsonl"
                victim = worker(server.url, ledger, "--task-s", "600", "--name", f"victim{cycle}")
                wait(lambda: lines(ledger))  # noqa: B023 - used at once
                waiter = worker(server.url, ledger, "--task-s", "0", "--poll-min-s", "30", "--poll-max-s", "30")
                time.sleep(0.3)  # the waiter is subscribed and blocked
                victim.send_signal(signal.SIGKILL)
                killed = time.time()
                victim.wait()
                waiter.wait(timeout=30)
                holder_prefix = f"locked_by_victim{cycle}#"
                released = wait(lambda: released_event(audit, holder_prefix))  # noqa: B023 - used at once
                acquired = [e for e in lines(ledger) if e["event"] == "acquire"][1]
                to_release.append(datetime.fromisoformat(str(released["ts"])).timestamp() - killed)
                to_acquire.append(float(acquired["t"]) - killed)  # type: ignore[arg-type]
            wake = []
            client = redis.Redis.from_url(server.url, protocol=2)
            for i in range(args.cycles):
                ledger = tmp / f"wake-{i}.jsonl"
                holder = GpuLock(client, "gpu_lock:1", task_name="holder", heartbeat_interval_s=30).acquire()
                base = [sys.executable, "-m", "monitor.demo.simworker", "--redis", server.url, "--gpu", "1"]
                waiter = subprocess.Popen(
                    [*base, "--ledger", str(ledger), "--task-s", "0", "--poll-min-s", "30", "--poll-max-s", "30"]
                )
                wait(lambda: client.pubsub_numsub(b"gpu_lock:gpu_lock:1")[0][1] >= 1)
                time.sleep(0.2)
                sent = time.time()
                holder.release()
                waiter.wait(timeout=30)
                first = next(e for e in lines(ledger) if e["event"] == "acquire")
                wake.append(float(first["t"]) - sent)  # type: ignore[arg-type]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    print(f"machine: {platform.machine()}, python {platform.python_version()}, cycles: {args.cycles}")
    print(f"heartbeat every {HB_S} s (key TTL {2 * HB_S} s), timeout {HB_TIMEOUT_S} s, pass every {INTERVAL_S} s")
    print(f"{'':28}{'p50':>9}{'p99':>9}{'max':>9}")
    for name, values in (
        ("kill -> monitor release", to_release),
        ("kill -> next acquire", to_acquire),
        ("notice -> waiter acquire", wake),
    ):
        ms = [v * 1000 for v in values]
        print(f"{name:28}{pct(ms, 50):>7.0f}ms{pct(ms, 99):>7.0f}ms{max(ms):>7.0f}ms")


if __name__ == "__main__":
    main()
