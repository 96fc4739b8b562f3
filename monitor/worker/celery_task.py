"""A Celery base task that holds a GPU lock for each run: `pip install 'gpulock-monitor[celery]'`.

    @app.task(base=GpuTask, gpu_lock_key="gpu_lock:{gpu_id}", gpu_lock_redis_url="redis://gpu-redis/2")
    def synthesize(text, gpu_id):
        ...

The lock wraps `__call__`, the one place Celery runs for every outcome: success, an exception,
`self.retry()`, and the `Ignore`/`Reject` outcomes after which Celery calls neither `on_failure` nor
`after_return` (a lock released there would leak, with a live heartbeat, until the hard timeout).
At a hard time limit the pool ends the process (SIGTERM, then SIGKILL): a task that cannot release
in between (stuck in a CUDA call) stops heartbeating, and the monitor frees the GPU.

The lock's holder record is written by the pool process that runs the task (its pid, not the
worker's main process), with the task's name and id; `self.gpu_lock.progress()` marks progress in
it, and `gpu_lock_options={"progress_timeout_s": ...}` says how long the task may go without a mark.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import redis

try:
    from celery import Task
    from celery.exceptions import Retry
except ImportError as exc:  # the optional extra is not installed: say which one
    raise ImportError(
        f"monitor.worker.celery_task needs Celery: pip install 'gpulock-monitor[celery]' ({exc})"
    ) from exc

from monitor import protocol
from monitor.errors import MonitorError
from monitor.worker.client import GpuLock

# One client per process: a prefork pool forks after the task class exists, and a connection
# pool must not be shared across a fork.
_CLIENTS: dict[tuple[int, str], redis.Redis] = {}


class GpuTask(Task):  # type: ignore[misc]
    """Runs each call holding `gpu_lock_key`, formatted with the call's arguments by name."""

    gpu_lock_key: str = protocol.LOCK_KEY_PREFIX + "{gpu_id}"
    gpu_lock_redis_url: str | None = None  # None: the app's `gpu_lock_redis_url` setting
    gpu_lock_options: dict[str, Any] = {}  # noqa: RUF012 - read-only, overridden per task

    @property
    def gpu_lock(self) -> GpuLock | None:
        """The lock the current run holds: in long loops, check `gpu_lock.lost` and mark
        `gpu_lock.progress()`."""
        return getattr(self.request, "gpu_lock", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lock = GpuLock(
            self._redis(),
            self._lock_key(args, kwargs),
            task_name=self.name,
            task_id=self.request.id,
            **self.gpu_lock_options,
        ).acquire()
        self.request.gpu_lock = lock
        reason = "task_failure"
        try:
            result = super().__call__(*args, **kwargs)
            reason = "normal"
            return result
        except Retry:
            reason = "task_retry"
            raise
        finally:
            self.request.gpu_lock = None
            lock.finish(reason)

    def _lock_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # By name, whether the caller passed gpu_id by position or by keyword.
        try:
            named = inspect.signature(self.run).bind_partial(*args, **kwargs).arguments
        except TypeError:  # arguments the task does not take: Celery's own call reports it
            named = dict(kwargs)
        try:
            return self.gpu_lock_key.format(**named)
        except (KeyError, IndexError) as exc:
            raise MonitorError(f"{self.name}: gpu_lock_key {self.gpu_lock_key!r} needs argument {exc}") from None

    def _redis(self) -> redis.Redis:
        url = self.gpu_lock_redis_url or self.app.conf.get("gpu_lock_redis_url")
        if not url:
            raise MonitorError(f"{self.name}: set gpu_lock_redis_url on the task or in the app's config")
        key = (os.getpid(), url)
        if key not in _CLIENTS:
            _CLIENTS[key] = redis.Redis.from_url(url)
        return _CLIENTS[key]
