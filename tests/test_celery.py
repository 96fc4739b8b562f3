"""GpuTask in a real Celery worker (prefork pool, Redis broker), and in eager mode for its errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from helpers import (
    FAST_HB_TIMEOUT_S,
    FAST_INTERVAL_S,
    events,
    fast_daemon,
    next_message,
    stop_daemon,
    subscribed,
    wait_for,
)

from monitor import protocol
from monitor.demo.redis_server import RedisServer
from monitor.errors import MonitorError

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    # Its own server: the shared one is flushed before each test, which would take the
    # broker's queue bindings from under a running worker.
    with RedisServer() as own:
        yield own


@pytest.fixture(scope="module")
def base_url(server: RedisServer) -> str:
    return server.url.rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def app(base_url: str) -> ModuleType:
    os.environ["TEST_REDIS_URL"] = base_url
    return importlib.import_module("celery_app")


@pytest.fixture(scope="module")
def worker(app: ModuleType, base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    args = ["-A", "celery_app", "worker", "--pool=prefork", "--concurrency=2", "--loglevel=INFO"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", *args],
            cwd=TESTS, env={**os.environ, "TEST_REDIS_URL": base_url}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        app.hold.delay(gpu_id=99).get(timeout=60)  # returns once the worker is up
        yield log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def locks(base_url: str, worker: Path) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{base_url}/0")
    yield client
    client.close()


CHANNEL_0 = protocol.release_channel(b"gpu_lock:0")


def reasons(pubsub: Any, count: int) -> list[str]:
    out = []
    for _ in range(count):
        message = next_message(pubsub, 30)
        assert message is not None, f"only {out} released"
        out.append(json.loads(message["data"])["release_reason"])
    return out


def test_task_runs_holding_its_gpu_with_a_heartbeat(app, locks):
    with subscribed(locks, CHANNEL_0) as pubsub:
        seen = app.hold.delay(gpu_id=0).get(timeout=30)
        assert reasons(pubsub, 1) == ["normal"]
    assert seen["value"].startswith("locked_by_celery_app.hold#")
    assert seen["in_redis"] == seen["value"]
    assert seen["heartbeat"] == 1
    assert locks.exists(b"gpu_lock:0", b"gpu_lock:0:heartbeat") == 0


def test_failing_task_releases_as_task_failure(app, locks):
    with subscribed(locks, CHANNEL_0) as pubsub:
        result = app.fail.delay(gpu_id=0)
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            result.get(timeout=30)
        assert reasons(pubsub, 1) == ["task_failure"]
    assert locks.exists(b"gpu_lock:0") == 0


def test_retry_releases_then_holds_again(app, locks):
    with subscribed(locks, CHANNEL_0) as pubsub:
        assert app.retry_once.delay(gpu_id=0).get(timeout=30) == 1
        assert reasons(pubsub, 2) == ["task_retry", "normal"]


def test_ignored_task_still_releases(app, locks):
    # Celery calls neither on_failure nor after_return for Ignore: only __call__ sees it end.
    with subscribed(locks, CHANNEL_0) as pubsub:
        app.ignored.delay(gpu_id=0)
        assert reasons(pubsub, 1) == ["task_failure"]
    assert locks.exists(b"gpu_lock:0") == 0


def test_two_pool_processes_take_one_gpu_in_turn(app, locks):
    first_result = app.hold.delay(gpu_id=1, seconds=1.0)
    wait_for(lambda: locks.exists(b"gpu_lock:1"), timeout_s=30)  # the first holds GPU 1: now the second
    second_result = app.hold.delay(gpu_id=1)  # goes to the other, idle pool process and waits there
    first, second = first_result.get(timeout=60), second_result.get(timeout=60)
    assert second["entered"] < first["end"], "the second never waited: nothing contended"
    assert second["start"] >= first["end"] - 0.005, "both held GPU 1 at once"


def test_hard_time_limit_kill_is_recovered_by_the_monitor(app, locks, base_url, tmp_path):
    daemon = fast_daemon(tmp_path, f"{base_url}/0")
    try:
        app.hang.delay(gpu_id=2)
        wait_for(lambda: locks.exists(b"gpu_lock:2:heartbeat"), timeout_s=30)
        holder = locks.get(b"gpu_lock:2")
        started = time.time()
        (released,) = wait_for(lambda: events(tmp_path / "audit.jsonl", "lock_released"), timeout_s=30)
        # The pool replaced the killed process: the GPU is usable again at once.
        assert app.hold.delay(gpu_id=2).get(timeout=30)["in_redis"].startswith("locked_by_celery_app.hold#")
    finally:
        _, out = stop_daemon(daemon)
    assert released["holder"] == holder.decode()
    assert released["reason"] == "heartbeat_dead"
    recovery_s = datetime.fromisoformat(released["ts"]).timestamp() - started
    # time limit 1.5 s, then the heartbeat key (0.4 s) expires, then a pass: slack for a loaded machine.
    assert recovery_s <= 1.5 + FAST_HB_TIMEOUT_S + FAST_INTERVAL_S + 3.0, recovery_s
    print(f"\ntask start -> monitor release, 1.5 s hard time limit: {recovery_s * 1000:.0f} ms")
    assert "Traceback" not in out


# --- in-process (eager): the task's own errors ------------------------------------------------------


@pytest.fixture
def eager(app: ModuleType, redis_server: RedisServer) -> Iterator[ModuleType]:
    app.app.conf.update(task_always_eager=True, gpu_lock_redis_url=redis_server.url)
    yield app
    app.app.conf.update(task_always_eager=False)


def test_eager_run_holds_and_releases(eager, r):
    seen = eager.hold.apply(kwargs={"gpu_id": 3}).get()
    assert seen["value"].startswith("locked_by_celery_app.hold#")
    assert r.exists(b"gpu_lock:3") == 0


def test_lock_key_template_takes_an_argument_given_by_position(eager, r):
    with subscribed(r, protocol.release_channel(b"gpu_lock:4")) as pubsub:
        eager.hold.apply(args=(4,)).get()  # hold(gpu_id=4), passed by position
        assert json.loads(next_message(pubsub, 5)["data"])["lock_key"] == "gpu_lock:4"


def test_key_template_needs_its_argument(eager, r):
    with pytest.raises(MonitorError, match=r"gpu_lock_key 'gpu_lock:\{card\}' needs argument 'card'"):
        eager.wrong_key.apply(kwargs={"gpu_id": 0}, throw=True)
    assert r.keys(b"gpu_lock:*") == []


def test_task_without_a_redis_url_fails_saying_to_set_it(eager):
    eager.app.conf.update(gpu_lock_redis_url=None)
    with pytest.raises(MonitorError, match="set gpu_lock_redis_url"):
        eager.hold.apply(kwargs={"gpu_id": 0}, throw=True)


def test_without_celery_the_import_says_what_to_install():
    code = "import sys; sys.modules['celery'] = None; import monitor.celery_task"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    needs = "ImportError: monitor.worker.celery_task needs Celery: pip install 'gpulock-monitor[celery]'"
    assert needs in result.stderr


def test_call_with_arguments_the_task_does_not_take_leaks_no_lock(eager, r):
    with pytest.raises(TypeError):
        eager.hold.apply(kwargs={"gpu_id": 5, "bogus": 1}, throw=True)
    assert r.exists(b"gpu_lock:5") == 0
