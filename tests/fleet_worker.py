"""A worker of the fleet's ORIGINAL lock protocol (DESIGN.md section 2), not our reference client.

    python tests/fleet_worker.py --redis URL --gpu 0 --task tts_synthesize --record FILE
        [--config FLEET.yml] [--heartbeat-s S] [--tasks N] [--run-s S] [--durations 0.2,0.5,3] [--seed N]

What it does, as the fleet's workers do:
- acquire: `SET gpu_lock:<id> locked_by_<task> NX EX <lock_timeout>`, the EX read from its own
  config file (`gpu_lock.lock_timeout`) at EVERY acquire, and 600 when it cannot read it;
- wait: SUBSCRIBE to `gpu_lock:<lock_key>` (the prefix twice) before the first try, then try again on
  every notice or after a poll interval that grows from `--poll-s` to `--max-poll-s`;
- heartbeat (only with `--heartbeat-s` > 0): a thread writes `<lock>:heartbeat` = str(time.time())
  with an expiry of 2 * interval, every interval, from the acquire on;
- release: GET, and if the value is still its own, DEL of the lock key ONLY (the heartbeat key is
  left to expire by itself), then PUBLISH the release notice. The value is the task name, so a
  legacy worker cannot tell its own holding from another run of the same task.

Inside its critical section it does `INCR gpu_inuse:<id>` (a key outside the lock pattern) on
entry and `DECR` on exit: a value above 1 on entry, or above 0 on exit, means two holders used the
GPU at once. Each holding is one JSON line (one O_APPEND write) in the record file. Exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from typing import Any

import redis
import yaml

# What a fleet worker falls back to when it cannot read its config.
DEFAULT_LOCK_TIMEOUT_S = 600
INUSE_PREFIX = "gpu_inuse:"


def read_lock_timeout(config: str | None) -> int:
    """`gpu_lock.lock_timeout` from a fleet config.yml; 600 when it cannot be read."""
    if config is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        with open(config, encoding="utf-8") as f:
            return int(yaml.safe_load(f)["gpu_lock"]["lock_timeout"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return DEFAULT_LOCK_TIMEOUT_S


class LegacyGpuLock:
    """One acquisition of a GPU lock, the way the fleet's existing workers take it."""

    def __init__(
        self,
        client: redis.Redis,
        gpu: int | str,
        task_name: str,
        *,
        lock_timeout: int = DEFAULT_LOCK_TIMEOUT_S,
        heartbeat_interval: float = 0.0,
        poll_interval: float = 0.05,
        max_poll_interval: float = 1.0,
        backoff: float = 1.5,
        max_wait_time: float = 300.0,
    ) -> None:
        self.client = client
        self.lock_key = f"gpu_lock:{gpu}"
        self.heartbeat_key = f"{self.lock_key}:heartbeat"
        self.channel = f"gpu_lock:{self.lock_key}"
        self.task_name = task_name
        self.value = f"locked_by_{task_name}"
        self.lock_timeout = lock_timeout
        self.heartbeat_interval = heartbeat_interval
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.backoff = backoff
        self.max_wait_time = max_wait_time
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """One try; on success the heartbeat (if any) is written before this returns."""
        if not self.client.set(self.lock_key, self.value, nx=True, ex=self.lock_timeout):
            return False
        if self.heartbeat_interval > 0:
            self._beat()
            self._beater = threading.Thread(target=self._beat_loop, daemon=True)
            self._beater.start()
        return True

    def acquire(self) -> bool:
        """Wait for the lock (woken by release notices, polling with backoff); False at max_wait_time."""
        pubsub = self.client.pubsub()
        pubsub.subscribe(self.channel)
        try:
            deadline = time.monotonic() + self.max_wait_time
            poll = self.poll_interval
            while not self.try_acquire():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = min(left, poll * random.uniform(0.8, 1.2))
                if self._notice(pubsub, wait):
                    continue  # a holder let go: try at once, at the same pace
                poll = min(poll * self.backoff, self.max_poll_interval)
            return True
        finally:
            pubsub.close()

    @staticmethod
    def _notice(pubsub: Any, timeout: float) -> bool:
        """True when a release notice arrived within `timeout` seconds (others are drained)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            if message is not None and message["type"] == "message":
                return True
        return False

    def _beat(self) -> None:
        self.client.set(self.heartbeat_key, str(time.time()), px=round(2000 * self.heartbeat_interval))

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            self._beat()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
            self._beater = None

    def release(self) -> bool:
        """Stop beating, delete the lock key only if it still holds our value, announce it.

        Returns whether the lock still held our value: evidence only, since another run of the
        same task holds the same value."""
        self.stop_heartbeat()
        still_held = self.client.get(self.lock_key) == self.value.encode()
        if still_held:
            self.client.delete(self.lock_key)
            notice = {
                "event_type": "lock_released",
                "lock_key": self.lock_key,
                "task_name": self.task_name,
                "release_reason": "normal",
                "timestamp": time.time(),
            }
            self.client.publish(self.channel, json.dumps(notice))
        return still_held


def record(path: str, **fields: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps({"pid": os.getpid(), **fields}) + "\n").encode())
    finally:
        os.close(fd)


def run_task(client: redis.Redis, args: argparse.Namespace, duration: float, seq: int) -> None:
    """One task: wait for the GPU, use it for `duration` seconds, release, record the holding."""
    lock = LegacyGpuLock(
        client,
        args.gpu,
        args.task,
        lock_timeout=read_lock_timeout(args.config),
        heartbeat_interval=args.heartbeat_s,
        poll_interval=args.poll_s,
        max_poll_interval=args.max_poll_s,
        max_wait_time=args.max_wait_s,
    )
    fields = {"worker": args.name, "seq": seq, "gpu": args.gpu, "lock_key": lock.lock_key, "value": lock.value}
    fields |= {"ex": lock.lock_timeout, "heartbeat_s": args.heartbeat_s, "duration": duration}
    asked = time.time()
    if not lock.acquire():
        record(args.record, event="gave_up", asked=asked, end=time.time(), **fields)
        return
    start = time.time()
    inuse_key = f"{INUSE_PREFIX}{args.gpu}"
    entered = int(client.incr(inuse_key))
    time.sleep(duration)  # the GPU work
    left = int(client.decr(inuse_key))
    end = time.time()
    still_held = lock.release()
    record(
        args.record,
        event="holding",
        asked=asked,
        start=start,
        end=end,
        still_held=still_held,
        inuse_on_entry=entered,
        inuse_on_exit=left,
        overlap=entered > 1 or left > 0,
        **fields,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/fleet_worker.py")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--gpu", type=int, required=True)
    parser.add_argument("--task", required=True, help="the Celery task name: the lock value is locked_by_<task>")
    parser.add_argument("--record", required=True, help="JSONL file: one line per holding")
    parser.add_argument("--config", help="fleet config.yml with gpu_lock.lock_timeout (EX 600 if unreadable)")
    parser.add_argument("--heartbeat-s", type=float, default=0.0, help="0: no heartbeat")
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--run-s", type=float, default=None, help="start no task after this many seconds")
    parser.add_argument("--durations", default="0.5", help="comma-separated hold times, one drawn per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poll-s", type=float, default=0.05)
    parser.add_argument("--max-poll-s", type=float, default=1.0)
    parser.add_argument("--max-wait-s", type=float, default=300.0)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    args.name = args.name or f"{args.task}@{os.getpid()}"
    durations = [float(d) for d in args.durations.split(",")]
    rng = random.Random(args.seed)
    client = redis.Redis.from_url(args.redis, protocol=2)
    began = time.monotonic()
    for seq in range(args.tasks):
        if args.run_s is not None and time.monotonic() - began >= args.run_s:
            break
        run_task(client, args, rng.choice(durations), seq)
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
