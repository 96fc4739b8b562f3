"""The event-driven core measured: pass cost by discovery mode, and heartbeat expiry -> release.

    python benchmarks/events.py passes [--other-keys 0,1000000] [--locks 10,1000,10000] [--repeat 5] [--holder-records]
    python benchmarks/events.py latency [--volatile-keys 0,1000000] [--trials 40]

Starts its own throwaway redis-server (as the tests do) with notify-keyspace-events K$gx, or none
for the `scan` rows. `passes`: a pass's wall time (half the locks' heartbeats rewritten since the
last one, as at the default 60 s heartbeat and 30 s interval), the daemon's CPU (process time) and
Redis's busy time per pass (INFO commandstats, all commands), the reconcile SCAN's share of Redis
over 10 s, and the daemon's peak RSS; with `--holder-records` each lock is taken as the reference
client takes it, with its holder record (of a process on another host). `latency`: a legacy
worker takes a lock with a 300 ms heartbeat, beats for 6 s and dies; from the heartbeat's expiry
(Redis clock) to the release notice arriving, and to a waiting reference client holding the lock;
with notifications off, passes run every 1 s.
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from monitor import daemon, logs, protocol, units
from monitor.audit import AuditLog, JsonlFile
from monitor.config import Settings
from monitor.demo.redis_server import RedisServer, find_binary
from monitor.evidence import Holders
from monitor.hang import HangWatch
from monitor.service import Monitor
from monitor.worker.client import GpuLock

HB_PX = 300
LIVE_BEATS = 40  # 6 s of a live worker before it dies: passes every 1 s see its heartbeat change


def redis_args(notify: bool) -> list[str]:
    args = ["--notify-keyspace-events", "K$gx" if notify else ""]
    version = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    if " v=7" in version or " v=8" in version:
        args += ["--enable-debug-command", "yes"]
    return args


def populate(admin: redis.Redis, other: int, *, volatile: bool = False) -> None:
    if other:
        admin.execute_command("DEBUG", "POPULATE", other, "celery-task-meta")
    if volatile:  # every one of them with a TTL: Redis's expiry cycle samples them all
        script = "for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end"
        for start in range(0, other, 10_000):
            keys = [f"celery-task-meta:{i}" for i in range(start, min(other, start + 10_000))]
            admin.eval(script, len(keys), *keys, 3_600_000)


def add_locks(admin: redis.Redis, locks: int) -> None:
    pipe = admin.pipeline(transaction=False)
    for i in range(locks):
        pipe.set(f"gpu_lock:{i}", f"locked_by_task_{i}", ex=600)
        pipe.set(f"gpu_lock:{i}:heartbeat", str(time.time()), ex=120)
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()


def add_holder_records(admin: redis.Redis, locks: int) -> None:
    """Each lock as the reference client takes it: its value names its task (one of 8) and token, and
    its holder record names a process on one of the other hosts, 8 GPUs a host (so no pid watch
    begins here)."""
    pipe = admin.pipeline(transaction=False)
    for i in range(locks):
        task, token, host = f"task_{i % 8}", f"{i:032x}", i // 8
        process: protocol.ProcessFacts = {
            "host": f"gpu-node-{host}",
            "pid": 1000 + i,
            "pid_ns": 4026531836,
            "start_time": 81234567 + i,
            "boot_id": f"6b4f3c0e-0000-4000-8000-{host:012x}",
        }
        record = protocol.holder_record(task=task, token=token, heartbeat_interval_s=60, task_id=token, process=process)
        pipe.set(f"gpu_lock:{i}", protocol.lock_value(f"{task}#{token}"), ex=600)
        pipe.set(f"gpu_lock:{i}:holder", record, ex=600)
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()


def beat(admin: redis.Redis, locks: int, *, half: int) -> None:
    """Rewrite every other lock's heartbeat, as its worker does once a heartbeat interval."""
    pipe = admin.pipeline(transaction=False)
    for i in range(half, locks, 2):
        pipe.set(f"gpu_lock:{i}:heartbeat", str(time.time()), ex=120)
    pipe.execute()


def wait_idle(watcher: daemon.Watcher) -> None:
    """Until the watcher has read and judged every lock the events named, and no more events come."""
    seen = -1
    while seen != watcher.progress.events or watcher._dirty or watcher._pending is not None:  # a benchmark looks inside
        seen = watcher.progress.events
        time.sleep(0.2)


def settings_for(url: str, tmp: str, **monitor: object) -> Settings:
    return Settings.from_mapping(
        {
            "redis": {"url": url},
            "audit": {"path": f"{tmp}/a.jsonl", "critical_path": f"{tmp}/c.jsonl"},
            "gpu_lock_monitor": {"monitor_interval": 30, **monitor},
        },
        env={},
    )


def build(settings: Settings, tmp: str) -> Monitor:
    """The monitor as the daemon builds it (daemon.build_monitor), its holder evidence included."""
    client = redis.Redis.from_url(settings.redis_url, protocol=2)
    audit, critical = AuditLog(JsonlFile(Path(tmp) / "a.jsonl")), JsonlFile(Path(tmp) / "c.jsonl")
    return Monitor(settings, client, audit, critical, holders=Holders(HangWatch(settings.hang)))


def minimal_scan_read(client: redis.Redis) -> int:
    """The baseline a pass without notifications is held to: SCAN the keyspace for the lock pattern
    and read the keys a pass reads of each lock, in pipelines of 500 locks, nothing else: the lock
    and its heartbeat (value and TTL), the monitor's record and the holder record. The locks read."""
    locks = [k for k in client.scan_iter(match="gpu_lock:*", count=5000) if protocol.is_lock_candidate(k)]
    for start in range(0, len(locks), 500):
        pipe = client.pipeline(transaction=False)
        for key in locks[start : start + 500]:
            hb = protocol.heartbeat_key(key)
            pipe.get(key).pttl(key).get(hb).pttl(hb).get(protocol.holding_key(key)).get(protocol.holder_key(key))
        pipe.execute()
    return len(locks)


def redis_busy_us(admin: redis.Redis) -> int:
    return sum(int(v.get("usec", 0)) for v in admin.info("commandstats").values())


def scan_busy_us(admin: redis.Redis) -> int:
    return int(admin.info("commandstats").get("cmdstat_scan", {}).get("usec", 0))


def passes(args: argparse.Namespace) -> None:
    gc.set_threshold(*daemon.GC_THRESHOLDS)  # as the daemon runs
    print(
        f"{'mode':>6} {'other keys':>11} {'locks':>7} {'pass ms':>8} {'CPU ms':>7} {'Redis ms':>9} {'reconcile':>10}"
        f" {'event CPU us':>14} {'SCAN+read ms':>13} {'ratio':>6}"
    )
    for mode in args.modes:
        for other in args.other_keys:
            with RedisServer(None, *redis_args(mode == "events")) as server, tempfile.TemporaryDirectory() as tmp:
                admin = redis.Redis.from_url(server.url, protocol=2)
                populate(admin, other)
                for locks in args.locks:
                    admin.delete(*admin.keys("gpu_lock:*")) if locks and admin.keys("gpu_lock:*") else None
                    add_locks(admin, locks)
                    if args.holder_records:
                        add_holder_records(admin, locks)
                    monitor = build(settings_for(server.url, tmp), tmp)
                    watcher = daemon.start_watcher(monitor) if mode == "events" else None
                    if watcher is not None:
                        while not watcher.progress.complete:
                            time.sleep(0.05)
                    for _ in range(3):  # the first writes every record, the second reads them back
                        monitor.run_pass()
                    walls, cpus, busy, per_beat = [], [], [], []
                    for n in range(args.repeat):
                        c0 = time.process_time()
                        beat(admin, locks, half=n % 2)  # workers beat every 60 s, passes run every 30 s
                        if watcher is not None:  # it reads what the events named: timed apart from the pass
                            wait_idle(watcher)
                            per_beat.append((time.process_time() - c0) / max(1, locks // 2))
                        b0, c0, t0 = redis_busy_us(admin), time.process_time(), time.perf_counter()
                        report = monitor.run_pass()
                        walls.append(time.perf_counter() - t0)
                        cpus.append(time.process_time() - c0)
                        busy.append(redis_busy_us(admin) - b0 - 40)  # less the INFO call itself, about
                        assert report is not None
                        assert report.error is None
                        assert len(report.verdicts) == locks
                    share, base, ratio = "-", "-", "-"
                    if watcher is None:  # the same keys by a minimal SCAN and pipelined read, timed alike
                        baseline = []
                        for _ in range(args.repeat):
                            t0 = time.perf_counter()
                            assert minimal_scan_read(admin) == locks
                            baseline.append(time.perf_counter() - t0)
                        base = f"{statistics.median(baseline) * 1000:.1f}"
                        ratio = f"{statistics.median(walls) / statistics.median(baseline):.2f}"
                    event_us = f"{statistics.median(per_beat) * 1e6:.0f}" if per_beat else "-"
                    if watcher is not None:
                        s0 = scan_busy_us(admin)
                        watcher._next_step = 0.0  # a sweep now, paced as configured
                        watcher._cursor = 0
                        time.sleep(10)
                        share = f"{(scan_busy_us(admin) - s0) / 10e6:.2%}"
                        watcher.stop()
                    print(
                        f"{mode:>6} {other:>11,} {locks:>7,} {statistics.median(walls) * 1000:>8.1f}"
                        f" {statistics.median(cpus) * 1000:>7.1f} {statistics.median(busy) / 1000:>9.1f} {share:>10}"
                        f" {event_us:>14} {base:>13} {ratio:>6}"
                    )
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def latency(args: argparse.Namespace) -> None:
    print(
        f"{'mode':>6} {'volatile keys':>14} {'trials':>7} {'release p50':>12} {'p99':>8}"
        f" {'next holder p50':>16} {'p99':>8}"
    )
    for mode in ("events", "scan"):
        for volatile in args.volatile_keys:
            with RedisServer(None, *redis_args(mode == "events")) as server, tempfile.TemporaryDirectory() as tmp:
                admin = redis.Redis.from_url(server.url, protocol=2)
                populate(admin, volatile, volatile=True)
                interval = 30 if mode == "events" else 1
                settings = settings_for(server.url, tmp, monitor_interval=interval, heartbeat={"interval": 0.15})
                monitor = build(settings, tmp)
                watcher = daemon.start_watcher(monitor) if mode == "events" else None
                stop = threading.Event()
                runner = threading.Thread(target=run_passes, args=(monitor, stop, interval))
                runner.start()
                if watcher is not None:
                    while not watcher.progress.complete:
                        time.sleep(0.05)
                released, acquired = [], []
                for trial in range(args.trials):
                    r_ms, a_ms = one_trial(admin, server.url, trial)
                    released.append(r_ms)
                    acquired.append(a_ms)
                stop.set()
                runner.join()
                if watcher is not None:
                    watcher.stop()
                print(
                    f"{mode:>6} {volatile:>14,} {args.trials:>7} {pct(released, 50):>10.1f}ms"
                    f" {pct(released, 99):>6.1f}ms {pct(acquired, 50):>14.1f}ms {pct(acquired, 99):>6.1f}ms"
                )


def run_passes(monitor: Monitor, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        monitor.run_pass()


def one_trial(admin: redis.Redis, url: str, trial: int) -> tuple[float, float]:
    """Ms from the heartbeat's expiry to the release notice, and to a waiter holding the lock."""
    key = protocol.lock_key(f"bench{trial}")
    hb = protocol.heartbeat_key(key)
    waiter_client = redis.Redis.from_url(url, protocol=2)
    got: list[float] = []
    pubsub = admin.pubsub()
    pubsub.subscribe(protocol.release_channel(key))
    while pubsub.get_message(timeout=1) is None:
        pass
    admin.set(key, b"locked_by_bench", ex=600)
    for _ in range(LIVE_BEATS):  # it works a while (a pass every 1 s sees its heartbeat), then dies
        admin.set(hb, str(time.time()), px=HB_PX)
        time.sleep(HB_PX / 2000)
    admin.set(hb, str(time.time()), px=HB_PX)
    expiry_ms = units.redis_time_ms(admin) + admin.pttl(hb)
    offset_ms = units.redis_time_ms(admin) - time.time() * 1000  # Redis clock - this host's

    def wait() -> None:
        lock = GpuLock(waiter_client, protocol.text(key), task_name="next", max_wait_s=60, timeout_s=600)
        lock.acquire()
        got.append(time.time() * 1000 + offset_ms)
        lock.release()

    waiter = threading.Thread(target=wait)
    waiter.start()
    while True:
        message = pubsub.get_message(timeout=60)
        if message is not None and message["type"] == "message":
            noticed = time.time() * 1000 + offset_ms
            break
    waiter.join(timeout=60)
    pubsub.close()
    waiter_client.close()
    return noticed - expiry_ms, (got[0] if got else float("nan")) - expiry_ms


def pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("passes")
    p.add_argument("--other-keys", type=ints, default=[0, 1_000_000])
    p.add_argument("--locks", type=ints, default=[10, 1_000, 10_000])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--modes", type=lambda t: t.split(","), default=["events", "scan"])
    p.add_argument("--holder-records", action="store_true", help="each lock with its holder record")
    q = sub.add_parser("latency")
    q.add_argument("--volatile-keys", type=ints, default=[0, 1_000_000])
    q.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    logs.configure("error", "console")
    version = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, check=True).stdout.split()[2]
    print(f"machine: {platform.machine()}, python {platform.python_version()}, redis-server {version}")
    passes(args) if args.what == "passes" else latency(args)


if __name__ == "__main__":
    main()
