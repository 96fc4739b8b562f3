"""Time monitor passes at 10 / 1,000 / 10,000 locks and count their Redis round trips.

    python benchmarks/pass_timing.py [--other-keys N] [--repeat N]

Starts its own throwaway redis-server (as the tests do). Every lock has a heartbeat; the
keyspace also holds N unrelated keys, as a lock DB shared with Celery does. Prints one row
per size: median and worst pass time, round trips, Redis commands per pass, and how long the
longest SCAN and the longest read script held Redis (its single thread serves no one else
meanwhile), from SLOWLOG in one extra pass.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import redis

from monitor import logs
from monitor.audit import AuditLog, JsonlFile
from monitor.config import Settings
from monitor.demo.redis_server import RedisServer
from monitor.service import Monitor


class CountingConnection(redis.Connection):
    sends = 0

    def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


def fill(client: redis.Redis, locks: int, other: int) -> None:
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for i in range(locks):
        pipe.set(f"gpu_lock:{i}", f"locked_by_task_{i}", ex=600)
        pipe.set(f"gpu_lock:{i}:heartbeat", str(time.time()), ex=120)
        if len(pipe) >= 10_000:
            pipe.execute()
    for i in range(other):
        pipe.set(f"celery-task-meta-{i}", "x")
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()


def longest_commands_us(admin: redis.Redis, monitor: Monitor) -> dict[str, int]:
    """Server-side duration of the longest SCAN and script call of one pass, in microseconds."""
    admin.config_set("slowlog-log-slower-than", 0)
    admin.config_set("slowlog-max-len", 100_000)
    admin.slowlog_reset()
    monitor.run_pass()
    entries = admin.slowlog_get(100_000)
    admin.config_set("slowlog-log-slower-than", 10_000)
    longest = {"scan": 0, "script": 0}
    for entry in entries:
        name = entry["command"].split(b" ", 1)[0].upper()
        kind = "scan" if name == b"SCAN" else "script" if name in (b"EVALSHA", b"EVAL") else None
        if kind is not None:
            longest[kind] = max(longest[kind], int(entry["duration"]))
    return longest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other-keys", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    logs.configure("error", "console")
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    print(f"unrelated keys in the keyspace: {args.other_keys:,}; passes per size: {args.repeat}")
    print(
        f"{'locks':>7} {'median ms':>10} {'max ms':>8} {'round trips':>12} {'commands':>9}"
        f" {'longest SCAN us':>16} {'longest script us':>18}"
    )
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_mapping(
            {"redis": {"url": server.url}, "audit": {"path": f"{tmp}/a.jsonl", "critical_path": f"{tmp}/c.jsonl"}},
            env={},
        )
        admin = redis.Redis.from_url(server.url, protocol=2)
        pool = redis.ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=server.port, protocol=2)
        client = redis.Redis(connection_pool=pool)
        for locks in (10, 1_000, 10_000):
            fill(admin, locks, args.other_keys)
            monitor = Monitor(
                settings, client, AuditLog(JsonlFile(Path(tmp) / "a.jsonl")), JsonlFile(Path(tmp) / "c.jsonl")
            )
            monitor.run_pass()  # first pass writes every record; steady state is what repeats
            times, trips, commands = [], [], []
            for _ in range(args.repeat):
                CountingConnection.sends = 0
                before = int(admin.info("stats")["total_commands_processed"])
                t0 = time.perf_counter()
                report = monitor.run_pass()
                times.append((time.perf_counter() - t0) * 1000)
                assert report is not None
                assert report.error is None
                assert len(report.verdicts) == locks
                trips.append(CountingConnection.sends)
                commands.append(int(admin.info("stats")["total_commands_processed"]) - before - 1)
            longest = longest_commands_us(admin, monitor)
            print(
                f"{locks:>7,} {statistics.median(times):>10.1f} {max(times):>8.1f} {max(trips):>12} {max(commands):>9,}"
                f" {longest['scan']:>16,} {longest['script']:>18,}"
            )


if __name__ == "__main__":
    main()
