"""The worker side of the lock protocol: what a GPU worker imports, without the daemon.

`monitor.worker.client` is the reference client (`GpuLock`, `gpu_lock`, `release_for_task`);
`monitor.worker.celery_task` is `GpuTask`, the Celery base task (the `celery` extra). Both write
the holder record beside the lock and mark progress in it (`GpuLock.progress`). They load
the protocol, the release script, the critical-failure record and redis-py: no configuration,
structlog, scheduler, alert channels or metrics. `monitor.client` and `monitor.celery_task`
re-export them under their old names.
"""

from __future__ import annotations

from monitor.worker.client import COUNTERS, AcquireTimeoutError, Counters, GpuLock, gpu_lock, release_for_task

__all__ = ["COUNTERS", "AcquireTimeoutError", "Counters", "GpuLock", "gpu_lock", "release_for_task"]
