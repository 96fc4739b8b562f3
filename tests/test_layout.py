"""What each part of the package loads: a GPU worker imports the worker side without the daemon.

Each import runs in a fresh interpreter, so what another test loaded cannot hide a dependency.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The daemon's own modules and its third-party dependencies: none is for a worker.
DAEMON_ONLY = frozenset(
    {
        "yaml",
        "structlog",
        "apscheduler",
        "click",
        "prometheus_client",
        "monitor.config",
        "monitor.channels",
        "monitor.connection",
        "monitor.logs",
    }
)


def loaded(statement: str) -> set[str]:
    """The modules in sys.modules after `statement`, run in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(result.stdout))


# What the worker side may load of ours: the protocol and the release script it shares with the
# daemon, the critical-failure record, and itself.
WORKER_MAY_LOAD = frozenset(
    {
        "monitor",
        "monitor.protocol",
        "monitor.errors",
        "monitor.units",
        "monitor.reaper",
        "monitor.audit",
        "monitor.worker",
        "monitor.worker.client",
        "monitor.worker.celery_task",
        "monitor.client",
        "monitor.celery_task",
    }
)


def ours(modules: set[str]) -> set[str]:
    return {name for name in modules if name == "monitor" or name.startswith("monitor.")}


@pytest.mark.parametrize("module", ["monitor.worker", "monitor.worker.client", "monitor.client"])
def test_the_worker_client_loads_nothing_of_the_daemon(module):
    modules = loaded(f"import {module}")
    assert not modules & DAEMON_ONLY, sorted(modules & DAEMON_ONLY)
    assert ours(modules) <= WORKER_MAY_LOAD, sorted(ours(modules) - WORKER_MAY_LOAD)
    assert "monitor.worker.celery_task" not in modules  # Celery is an extra: only GpuTask's users load it


@pytest.mark.parametrize("module", ["monitor.worker.celery_task", "monitor.celery_task"])
def test_the_celery_task_loads_nothing_of_the_daemon_beyond_celery(module):
    pytest.importorskip("celery")
    # Celery itself loads some of them (click, yaml): those are Celery's, not ours.
    celerys = loaded("from celery import Task\nfrom celery.exceptions import Retry")
    modules = loaded(f"import {module}")
    assert not modules & (DAEMON_ONLY - celerys), sorted(modules & (DAEMON_ONLY - celerys))
    assert ours(modules) <= WORKER_MAY_LOAD, sorted(ours(modules) - WORKER_MAY_LOAD)


def test_policy_loads_nothing_but_itself():
    modules = loaded("import monitor.policy")
    assert "redis" not in modules
    assert ours(modules) == {"monitor", "monitor.policy"}


def test_the_old_names_are_the_same_objects():
    import monitor.client
    import monitor.worker
    import monitor.worker.client

    for name in ("COUNTERS", "AcquireTimeoutError", "Counters", "GpuLock", "gpu_lock", "release_for_task"):
        assert getattr(monitor.client, name) is getattr(monitor.worker.client, name)
        assert getattr(monitor.worker, name) is getattr(monitor.worker.client, name)
    assert monitor.client.GpuLock is monitor.worker.client.GpuLock


def test_the_old_celery_name_is_the_same_object():
    pytest.importorskip("celery")
    import monitor.celery_task
    import monitor.worker.celery_task

    assert monitor.celery_task.GpuTask is monitor.worker.celery_task.GpuTask
