"""The reference worker client: the lock protocol done right, for new workers and for our tests.

    with GpuLock(redis_client, "gpu_lock:0", task_name="tts_synthesize") as lock:
        run_on_gpu(stop_if=lock.lost.is_set)

What it fixes in the workers this protocol comes from:
- waiters subscribe to the release channel before their first try (no lost wake-up), each
  waiter with its own PubSub (never shared across threads);
- a heartbeat thread keeps `<lock>:heartbeat` fresh while the lock is owned, rides out Redis
  blips, and reports a lost lock instead of dying silently;
- every release is an owner-checked script, the emergency one included: never a blind DEL;
- the value is `locked_by_<task>#<token>`, unique per acquisition, so owner checks are exact;
- a holder record (`<lock>:holder`: host, pid, pid namespace, process start time, GPU UUID, task,
  token) is written in the same script as the lock and expires with it, so the monitor can find the
  process; `lock.progress()` marks in it that the work moved forward (DESIGN.md section 2).

It logs through the standard library (logger `gpulock_monitor.client`), each message the event's
name and its fields: a worker's own logging set-up decides where they go, and a worker that set up
none gets warnings and worse on stderr (Python's last-resort handler), never on its stdout.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import redis

from monitor import protocol, units
from monitor.audit import JsonlFile, critical_record
from monitor.errors import AuditWriteError, MonitorError, ReleaseError
from monitor.reaper import Reaper

log = logging.getLogger("gpulock_monitor.client")

P = ParamSpec("P")
R = TypeVar("R")


class AcquireTimeoutError(MonitorError):
    """The lock stayed held by others for all of `max_wait_s`."""


@dataclass
class Counters:
    """Process-wide counts of what went wrong on the release path."""

    normal_release_failures: int = 0
    emergency_releases: int = 0
    release_script_errors: int = 0
    ownership_violations: int = 0
    heartbeat_failures: int = 0  # refreshes that hit a Redis error (retried at the next interval)


COUNTERS = Counters()
_BY_TASK: dict[str, GpuLock] = {}
_BY_TASK_LOCK = threading.Lock()


class GpuLock:
    """One acquisition of one GPU lock. Use as a context manager (or acquire/release)."""

    def __init__(
        self,
        client: redis.Redis,
        lock_key: str,
        *,
        task_name: str,
        timeout_s: float = 600,
        heartbeat_interval_s: float = 60,
        max_wait_s: float = 300,
        poll_min_s: float = 0.05,
        poll_max_s: float = 5.0,
        task_id: str | None = None,
        cleanup: Callable[[], None] | None = None,
        on_lost: Callable[[GpuLock], None] | None = None,
        critical_path: str | None = None,
        gpu_uuid: str | None = None,
        progress_timeout_s: float | None = None,
    ) -> None:
        if gpu_uuid is not None and not protocol.is_gpu_uuid(gpu_uuid):
            raise ValueError(f"gpu_uuid {gpu_uuid!r} is not a GPU UUID as NVML names it (GPU-..., MIG-...)")
        if progress_timeout_s is not None and not progress_timeout_s > 0:
            raise ValueError(f"progress_timeout_s must be positive, not {progress_timeout_s!r}")
        self.client = client
        self.key = lock_key.encode()
        self.holder_key = protocol.holder_key(self.key)
        self.task_name = task_name
        self._new_holding()
        self.timeout_ms = units.to_ms(timeout_s)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_wait_s = max_wait_s
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.task_id = task_id
        self.cleanup = cleanup
        self.on_lost = on_lost
        self.critical_path = critical_path
        # None: CUDA_VISIBLE_DEVICES's, when it names one GPU by UUID (read when the lock is taken).
        self.gpu_uuid = gpu_uuid
        self.progress_timeout_s = progress_timeout_s
        self.progress_ms: int | None = None  # the last progress mark, Redis-clock ms
        self.progress_failures = 0  # marks that hit a Redis error (the work went on)
        self.lost = threading.Event()  # set when the heartbeat finds the lock no longer ours
        self.acquired_at: float | None = None
        self.expiry_ms = -2  # the lock's absolute expiry on Redis's clock, once acquired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: bytes | None = None
        self._progress_refused = False
        self._acquire = client.register_script(protocol.ACQUIRE_WITH_HOLDER_SCRIPT)
        self._beat = client.register_script(protocol.HEARTBEAT_SCRIPT)
        self._progress = client.register_script(protocol.PROGRESS_SCRIPT)

    # --- acquire ----------------------------------------------------------------------------------

    def acquire(self) -> GpuLock:
        """Wait up to `max_wait_s` for the lock: woken by release notices, polling as a fallback,
        riding out Redis restarts (resubscribing) until the deadline."""
        deadline = time.monotonic() + self.max_wait_s
        delay = self.poll_min_s
        if self.acquired_at is not None or self._made_in != os.getpid():
            # Used before, or copied into a forked child: each acquisition is a holding of its own,
            # with its own token (two processes with one token could both "own" the lock).
            self._new_holding()
        self._record = self.holder_record()  # of the process that takes the lock, not of its parent
        while True:
            try:
                self._wait_and_take(deadline)
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AcquireTimeoutError(f"{protocol.text(self.key)}: Redis unreachable: {exc}") from exc
                log.warning("acquire_retry lock_key=%s error=%s", protocol.text(self.key), exc)
                time.sleep(min(left, delay))
                delay = min(delay * 2, self.poll_max_s)
        self.acquired_at = time.time()
        if self.task_id is not None:
            with _BY_TASK_LOCK:
                _BY_TASK[self.task_id] = self
        self._thread = threading.Thread(target=self._heartbeat, name=f"heartbeat {self.key!r}", daemon=True)
        self._thread.start()
        return self

    def _wait_and_take(self, deadline: float) -> None:
        pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        try:
            # Subscribed (and confirmed) before the first try: a release after it cannot be missed.
            pubsub.subscribe(protocol.release_channel(self.key))
            while pubsub.get_message(timeout=max(0.0, deadline - time.monotonic())) is None:
                if time.monotonic() >= deadline:
                    raise AcquireTimeoutError(
                        f"{protocol.text(self.key)}: could not subscribe within {self.max_wait_s:g} s"
                    )
            delay = self.poll_min_s
            while not self._try():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AcquireTimeoutError(f"{protocol.text(self.key)} still held after {self.max_wait_s:g} s")
                _wait_for_message(pubsub, min(left, delay * random.uniform(0.5, 1.5)))
                delay = min(delay * 2, self.poll_max_s)
        finally:
            pubsub.close()

    def _new_holding(self) -> None:
        self.token = uuid.uuid4().hex[:12]
        self.value = protocol.lock_value(f"{self.task_name}#{self.token}")
        self._made_in = os.getpid()
        self._stop = threading.Event()  # a heartbeat stopped for an earlier holding stays stopped
        self.lost = threading.Event()
        self.acquired_at = None

    def holder_record(self) -> bytes:
        """The holder record this process writes with the lock (protocol.holder_record)."""
        return protocol.holder_record(
            task=self.task_name,
            token=self.token,
            heartbeat_interval_s=self.heartbeat_interval_s,
            task_id=self.task_id,
            gpu_uuid=self.gpu_uuid if self.gpu_uuid is not None else protocol.visible_gpu_uuid(),
            progress_timeout_s=self.progress_timeout_s,
        )

    def _try(self) -> bool:
        if self._record is None:
            self._record = self.holder_record()
        hb_ms = protocol.heartbeat_ttl_ms(self.heartbeat_interval_s)
        keys_ = [self.key, protocol.heartbeat_key(self.key), self.holder_key]
        args: list[bytes | str | int] = [self.value, self.timeout_ms, repr(time.time()), hb_ms, self._record]
        expiry = int(self._acquire(keys=keys_, args=args))
        if expiry == 0:
            return False
        self.expiry_ms = expiry
        return True

    # --- progress -----------------------------------------------------------------------------------

    def progress(self) -> bool:
        """Mark that the work moved forward: the holder record's `progress_ms` becomes Redis's
        clock now (never earlier than the last mark). One script call, owner-checked: False, and
        nothing written, when the lock is no longer this holding's or its record is gone; False
        too on a Redis error (counted, logged: a progress mark is evidence, not the work)."""
        try:
            mark = int(self._progress(keys=[self.key, self.holder_key], args=[self.value, self.token]))
        except redis.RedisError as exc:
            self.progress_failures += 1
            log.warning("progress_failed lock_key=%s error=%s", protocol.text(self.key), exc)
            return False
        if mark > 0:
            self.progress_ms = mark
            return True
        if not self._progress_refused:  # a work loop marks often: say it once
            self._progress_refused = True
            why = "not_owner" if mark == 0 else "no_record"
            log.warning(
                "progress_refused lock_key=%s holder=%s reason=%s",
                protocol.text(self.key),
                protocol.text(self.value),
                why,
            )
        return False

    # --- heartbeat ----------------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        hb_ms = protocol.heartbeat_ttl_ms(self.heartbeat_interval_s)
        keys_ = [self.key, protocol.heartbeat_key(self.key)]
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                owned = self._beat(keys=keys_, args=[self.value, repr(time.time()), hb_ms])
            except redis.RedisError as exc:
                # A blip: redis-py reconnects on the next call; the key's 2x TTL covers one miss.
                COUNTERS.heartbeat_failures += 1
                log.warning("heartbeat_failed lock_key=%s error=%s", protocol.text(self.key), exc)
                continue
            if not owned:
                COUNTERS.ownership_violations += 1
                self.lost.set()
                log.error("lock_lost lock_key=%s holder=%s", protocol.text(self.key), protocol.text(self.value))
                if self.on_lost is not None:
                    try:
                        self.on_lost(self)
                    except Exception:  # the task's callback must not kill the thread silently
                        log.exception("on_lost_failed lock_key=%s", protocol.text(self.key))
                return

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # --- release --------------------------------------------------------------------------------------

    def release(self, reason: str = "normal", client: redis.Redis | None = None) -> bool:
        """Identity-checked release, by the monitor's own script; False when the lock was no
        longer this holding (nothing deleted)."""
        self._stop_heartbeat()
        client = client or self.client
        try:
            # No bookkeeping keys: a worker's ACL need not reach the monitor's own keys.
            result = Reaper(client).release(self.key, self.value, self.expiry_ms, reason=reason, bookkeeping=False)
        except ReleaseError as exc:
            COUNTERS.release_script_errors += 1
            raise redis.ResponseError(str(exc)) from exc
        self._drop_record(client)
        done = result.outcome is protocol.Outcome.RELEASED
        if self.task_id is not None:
            with _BY_TASK_LOCK:
                _BY_TASK.pop(self.task_id, None)
        if not done:
            COUNTERS.ownership_violations += 1
            log.warning("release_not_owner lock_key=%s holder=%s", protocol.text(self.key), protocol.text(self.value))
        return bool(done)

    def _drop_record(self, client: redis.Redis) -> None:
        """Delete this holding's record, if it is still there and still this holding's.

        The release script deletes the lock and its heartbeat only; the record would otherwise stay
        until the lock's expiry (beside a legacy worker's next holding, which writes none). Whatever
        the release answered: if the lock was taken from us, our record is stale all the more. It
        runs after the release notice, so a waiter is not delayed, and the script leaves a record
        the next holder has written since. Best effort: the record expires with the lock anyway.
        """
        try:
            client.register_script(protocol.DROP_HOLDER_SCRIPT)(keys=[self.holder_key], args=[self.token])
        except redis.RedisError as exc:
            log.info("holder_record_left lock_key=%s error=%s", protocol.text(self.key), exc)

    def __enter__(self) -> GpuLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish("normal" if exc_type is None else "task_failure")

    def finish(self, reason: str) -> bool:
        """The three-layer `finally`: cleanup hook, owner-checked release, emergency release. The
        heartbeat beats on through the cleanup: the holder is alive, and its record promised beats."""
        if self.cleanup is not None:  # 1: e.g. free GPU memory; its failure must not keep the lock
            try:
                self.cleanup()
            except Exception:
                log.exception("cleanup_failed lock_key=%s", protocol.text(self.key))
        try:  # 2
            return self.release(reason)
        except redis.RedisError as exc:
            COUNTERS.normal_release_failures += 1
            log.warning("release_failed lock_key=%s error=%s", protocol.text(self.key), exc)
        COUNTERS.emergency_releases += 1
        pool: redis.ConnectionPool | None = None
        try:  # 3: the same owner-checked script on a new connection; never a blind DEL
            pool = _fresh_pool(self.client)
            return self.release(reason, client=redis.Redis(connection_pool=pool))
        except Exception as exc:  # noqa: BLE001 - whatever it is, it ends in the critical record, not out of `finally`
            self._critical(exc)
            return False
        finally:
            if pool is not None:
                try:
                    pool.disconnect()
                except Exception:
                    log.exception("emergency_close_failed lock_key=%s", protocol.text(self.key))

    def _critical(self, exc: Exception) -> None:
        record = critical_record(
            lock_key=protocol.text(self.key),
            holder=protocol.text(self.value),
            exc=exc,
            attempts=2,
            now=time.time(),
            source="client",
        )
        log.critical(
            "release_failed_critical lock_key=%s holder=%s error_type=%s error=%s",
            record["lock_key"],
            record["holder"],
            record["error_type"],
            record["error"],
        )
        if self.critical_path:
            try:
                JsonlFile(self.critical_path).write(record, sync=True)
            except AuditWriteError:
                log.exception("critical_write_failed path=%s record=%s", self.critical_path, record)


def gpu_lock(client: redis.Redis, lock_key: str, **options: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: run the function holding `lock_key` (task_name defaults to its name)."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with GpuLock(client, lock_key, **{"task_name": func.__name__, **options}):
                return func(*args, **kwargs)

        return wrapper

    return decorate


def release_for_task(task_id: str, reason: str = "task_failure") -> bool:
    """For a task framework's failure callback (Celery `on_failure`): release, owner-checked,
    the lock that task `task_id` holds in this process. False when it holds none."""
    with _BY_TASK_LOCK:
        lock = _BY_TASK.get(task_id)
    return lock.finish(reason) if lock is not None else False


def _fresh_pool(client: redis.Redis) -> redis.ConnectionPool:
    """A new pool that makes connections exactly as `client`'s pool does, sharing none of them.

    `connection_kwargs` alone is not enough: the connection class is kept apart from them, and without it a
    unix socket path, TLS options or a Sentinel pool's master-discovery proxy reach a plain TCP `Connection`.
    Given the class, every kind redis-py offers is rebuilt as it was: `UnixDomainSocketConnection` on the same
    path, `SSLConnection` with the same CA and checks, `SentinelManagedConnection` asking the same Sentinels
    for the master (its kwargs carry the original pool's proxy). `pool.make_connection()` on the client's own
    pool would also do, but it takes one of that pool's `max_connections` for good, and fails when it is full.
    """
    pool = client.connection_pool
    return redis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **pool.connection_kwargs)


def _wait_for_message(pubsub: Any, timeout_s: float) -> None:
    """Return when a release notice arrives or `timeout_s` passes, whichever is first."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if pubsub.get_message(ignore_subscribe_messages=True, timeout=left) is not None:
            return
