"""GpuTask, the Celery base task, under its first name: it lives in `monitor.worker.celery_task`."""

from __future__ import annotations

from monitor.worker.celery_task import GpuTask

__all__ = ["GpuTask"]
