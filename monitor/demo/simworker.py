"""A simulated GPU worker process, for the end-to-end tests and the recovery benchmark.

    python -m monitor.simworker --redis URL --gpu 0 --ledger FILE [--tasks N] [--task-s S] ...

Each task takes the GPU's lock with the reference client, writes `acquire` and `release` lines
to the ledger (one O_APPEND write each, so concurrent workers never interleave), and holds it
for `--task-s` seconds. Killed with SIGKILL it leaves its lock behind, as a real worker would.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import redis

from monitor import protocol
from monitor.worker.client import GpuLock


def record(ledger: str, **fields: object) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps({"t": time.time(), "pid": os.getpid(), **fields}) + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitor.simworker")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--gpu", type=int, required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--task-s", type=float, default=1.0)
    parser.add_argument("--heartbeat-s", type=float, default=0.25)
    parser.add_argument("--max-wait-s", type=float, default=60)
    parser.add_argument("--poll-min-s", type=float, default=0.05)
    parser.add_argument("--poll-max-s", type=float, default=2.0)
    parser.add_argument("--name", default="sim_task")
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis, protocol=2)
    for _ in range(args.tasks):
        lock = GpuLock(
            client,
            protocol.text(protocol.lock_key(args.gpu)),
            task_name=args.name,
            timeout_s=600,
            heartbeat_interval_s=args.heartbeat_s,
            max_wait_s=args.max_wait_s,
            poll_min_s=args.poll_min_s,
            poll_max_s=args.poll_max_s,
        )
        with lock:
            record(args.ledger, gpu=args.gpu, event="acquire", value=lock.value.decode())
            deadline = time.monotonic() + args.task_s
            while time.monotonic() < deadline and not lock.lost.is_set():
                time.sleep(0.01)
            record(args.ledger, gpu=args.gpu, event="release", value=lock.value.decode(), lost=lock.lost.is_set())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
