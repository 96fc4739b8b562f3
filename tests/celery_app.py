"""The Celery app that test_celery.py runs in a real worker: GPU tasks on GpuTask.

Broker and result backend are DB 1 of the test's Redis, the locks DB 0 (as a fleet keeps Celery's
keys beside its locks). The URL comes from $TEST_REDIS_URL, set by the test for the worker.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import Ignore

from monitor.worker.celery_task import GpuTask

URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:1")
app = Celery("gpu_tasks", broker=f"{URL}/1", backend=f"{URL}/1")
app.conf.update(
    gpu_lock_redis_url=f"{URL}/0",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
FAST = {"heartbeat_interval_s": 0.2, "max_wait_s": 30, "poll_max_s": 0.2}


@signals.task_prerun.connect
def _entered(task: Any, **_: Any) -> None:
    task.request.entered = time.time()  # before GpuTask waits for the lock


def _seen(task: Any) -> dict[str, Any]:
    lock = task.gpu_lock
    locks = redis.Redis.from_url(f"{URL}/0")
    return {
        "value": lock.value.decode(),
        "in_redis": (locks.get(lock.key) or b"").decode(),
        "heartbeat": locks.exists(lock.key + b":heartbeat"),
        "pid": os.getpid(),
    }


@app.task(base=GpuTask, bind=True, gpu_lock_options=FAST)
def hold(self: Any, gpu_id: int, seconds: float = 0.0) -> dict[str, Any]:
    start = time.time()
    seen = _seen(self)
    time.sleep(seconds)
    return {**seen, "entered": self.request.entered, "start": start, "end": time.time()}


@app.task(base=GpuTask, gpu_lock_options=FAST)
def fail(gpu_id: int) -> None:
    raise RuntimeError("CUDA out of memory")


@app.task(base=GpuTask, bind=True, gpu_lock_options=FAST, max_retries=1)
def retry_once(self: Any, gpu_id: int) -> int:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return int(self.request.retries)


@app.task(base=GpuTask, gpu_lock_options=FAST)
def ignored(gpu_id: int) -> None:
    raise Ignore()


@app.task(base=GpuTask, gpu_lock_options=FAST, time_limit=1.5)
def hang(gpu_id: int) -> None:
    # Stuck in a CUDA call: Python's SIGTERM handler cannot run, so at the hard time limit the
    # pool's SIGTERM does nothing and its SIGKILL follows. (A task in Python code gets the
    # SIGTERM as an exception, and GpuTask releases the lock itself.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


@app.task(base=GpuTask, gpu_lock_key="gpu_lock:{card}")
def wrong_key(gpu_id: int) -> None:
    pass
