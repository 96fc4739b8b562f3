"""The reference worker client, under its first name: it lives in `monitor.worker.client`."""

from __future__ import annotations

from monitor.worker.client import COUNTERS, AcquireTimeoutError, Counters, GpuLock, gpu_lock, release_for_task

__all__ = ["COUNTERS", "AcquireTimeoutError", "Counters", "GpuLock", "gpu_lock", "release_for_task"]
