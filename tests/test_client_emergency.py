"""The client's emergency release (layer 3 of `GpuLock.finish`) on every kind of connection redis-py makes.

The normal release fails because the worker's pool is exhausted (every connection it may make is taken), so
the release can only succeed on a genuinely new connection: one of the same class and settings (TCP, unix
socket, TLS with the same CA, a Sentinel-discovered master), closed once the lock is released.
"""

from __future__ import annotations

import json
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from helpers import next_message, read_jsonl, subscribed, wait_for
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection
from tlsproxy import TlsProxy, server_context

from monitor.demo.redis_server import RedisServer
from monitor.worker import client as client_mod
from monitor.worker.client import GpuLock

KEY = b"gpu_lock:0"


@pytest.fixture(autouse=True)
def fresh_counters(monkeypatch):
    monkeypatch.setattr(client_mod, "COUNTERS", client_mod.Counters())


@pytest.fixture
def made(monkeypatch) -> list[Any]:
    """Every connection a redis-py pool makes during the test, in order."""
    connections: list[Any] = []
    original = redis.ConnectionPool.make_connection

    def spy(pool: redis.ConnectionPool) -> Any:
        connection = original(pool)
        connections.append(connection)
        return connection

    monkeypatch.setattr(redis.ConnectionPool, "make_connection", spy)
    return connections


def emergency_release(
    worker: redis.Redis,
    observer: redis.Redis,
    made: list[Any],
    tmp_path: Path,
    handshakes: Callable[[], int] | None = None,
) -> Any:
    """Acquire through `worker`, exhaust its pool, finish; return the connection the release was made on.
    `handshakes` counts the server's accepted connections, where the test has a way to (TLS): one more."""
    with subscribed(observer, b"gpu_lock:" + KEY) as pubsub:
        held = GpuLock(
            worker, KEY.decode(), task_name="tts", heartbeat_interval_s=30, critical_path=str(tmp_path / "c")
        )
        held.acquire()
        pool = worker.connection_pool
        hog = [pool.get_connection() for _ in range(pool.max_connections)]
        before = len(made)
        accepted = handshakes() if handshakes is not None else 0
        try:
            assert held.finish("normal")
            made_by_finish = made[before:]
        finally:
            for connection in hog:
                pool.release(connection)
            pool.disconnect()
        assert not observer.exists(KEY, KEY + b":heartbeat")
        notice = next_message(pubsub, 5)
    assert notice is not None
    assert json.loads(notice["data"])["release_reason"] == "normal"
    assert client_mod.COUNTERS.normal_release_failures == 1
    assert client_mod.COUNTERS.emergency_releases == 1
    assert not (tmp_path / "c").exists()
    (fresh,) = made_by_finish
    if handshakes is not None:
        assert handshakes() == accepted + 1  # the fresh connection's own handshake
    assert all(fresh is not connection for connection in hog)
    assert not fresh.is_connected  # closed once the lock was released
    return fresh


# --- plain TCP ---------------------------------------------------------------------------------------


def test_emergency_release_over_tcp(r, redis_server, made, tmp_path):
    worker = redis.Redis.from_url(redis_server.url, protocol=2, max_connections=2)
    fresh = emergency_release(worker, r, made, tmp_path)
    assert type(fresh) is redis.Connection
    assert (fresh.host, fresh.port) == ("127.0.0.1", redis_server.port)


def test_emergency_release_from_a_blocking_pool(r, redis_server, made, tmp_path):
    pool = redis.BlockingConnectionPool.from_url(redis_server.url, protocol=2, max_connections=2, timeout=0.1)
    fresh = emergency_release(redis.Redis(connection_pool=pool), r, made, tmp_path)
    assert type(fresh) is redis.Connection


# --- unix socket -------------------------------------------------------------------------------------


@pytest.fixture
def unix_redis() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gl-") as folder:  # short: a socket path has ~100 bytes
        path = Path(folder) / "redis.sock"
        with RedisServer(None, "--unixsocket", str(path), "--unixsocketperm", "700"):
            yield path


def test_emergency_release_over_a_unix_socket(unix_redis, made, tmp_path):
    worker = redis.Redis(unix_socket_path=str(unix_redis), protocol=2, max_connections=2)
    observer = redis.Redis(unix_socket_path=str(unix_redis), protocol=2)
    fresh = emergency_release(worker, observer, made, tmp_path)
    assert type(fresh) is redis.UnixDomainSocketConnection
    assert fresh.path == str(unix_redis)
    observer.close()


# --- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(redis_server, tmp_path) -> Iterator[tuple[TlsProxy, Path]]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = TlsProxy(server_context(ca), redis_server.port)
    try:
        yield proxy, ca_file
    finally:
        proxy.close()


def test_the_tls_proxy_refuses_plain_tcp_and_an_unknown_ca(tls_redis, tmp_path):
    proxy, _ = tls_redis
    once = {"protocol": 2, "socket_timeout": 5, "retry": Retry(NoBackoff(), 0)}
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=proxy.port, **once).ping()
    wait_for(lambda: proxy.refused == 1)
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=proxy.port, ssl=True, ssl_ca_certs=str(other), **once).ping()
    wait_for(lambda: proxy.refused == 2)
    assert proxy.handshakes == 0


def test_emergency_release_over_tls(r, tls_redis, made, tmp_path):
    proxy, ca_file = tls_redis
    worker = redis.Redis(
        host="127.0.0.1",
        port=proxy.port,
        ssl=True,
        ssl_ca_certs=str(ca_file),
        ssl_cert_reqs="required",
        protocol=2,
        max_connections=2,
        socket_timeout=5,
    )
    fresh = emergency_release(worker, r, made, tmp_path, handshakes=lambda: proxy.handshakes)
    assert type(fresh) is redis.SSLConnection
    assert fresh.ca_certs == str(ca_file)
    assert fresh.cert_reqs == ssl.CERT_REQUIRED
    assert (fresh.host, fresh.port) == ("127.0.0.1", proxy.port)
    assert proxy.refused == 0


# --- Sentinel ----------------------------------------------------------------------------------------


def test_emergency_release_through_sentinel(sentinel, made, tmp_path):
    master, port = sentinel
    manager = Sentinel([("127.0.0.1", port)], sentinel_kwargs={"protocol": 2})
    worker = manager.master_for("gpulocks", protocol=2, max_connections=2)
    observer = redis.Redis.from_url(master.url, protocol=2)
    fresh = emergency_release(worker, observer, made, tmp_path)
    assert type(fresh) is SentinelManagedConnection
    assert fresh.connection_pool.service_name == "gpulocks"  # the master is found through the sentinel
    assert (fresh.host, fresh.port) == ("127.0.0.1", master.port)
    observer.close()
    manager.close()


# --- the emergency layer itself fails ----------------------------------------------------------------


def test_unexpected_error_in_the_emergency_release_is_a_critical_record(r, monkeypatch, tmp_path):
    held = GpuLock(r, KEY.decode(), task_name="tts", heartbeat_interval_s=30, critical_path=str(tmp_path / "c.jsonl"))
    held.acquire()
    clients: list[redis.Redis | None] = []

    def release(reason: str = "normal", client: redis.Redis | None = None) -> bool:
        clients.append(client)
        if len(clients) == 1:
            raise redis.ConnectionError("the pooled connection broke")
        raise RuntimeError("a bug in the emergency path")

    monkeypatch.setattr(held, "release", release)
    assert held.finish("normal") is False  # and nothing raised
    (record,) = read_jsonl(tmp_path / "c.jsonl")
    assert record["error_type"] == "RuntimeError"
    assert record["error"] == "a bug in the emergency path"
    assert record["lock_key"] == "gpu_lock:0"
    assert record["holder"] == held.value.decode()
    assert "RuntimeError" in record["traceback"]
    assert clients[0] in (None, r)
    assert clients[1] is not None
    assert clients[1] is not r
    assert r.get(KEY) == held.value  # nothing was released: the record says so
    assert client_mod.COUNTERS.emergency_releases == 1


class BuildOnce(redis.Connection):
    """A connection class whose second construction fails with a non-Redis error."""

    built = 0

    def __init__(self, **kwargs: Any) -> None:
        type(self).built += 1
        if type(self).built > 2:
            raise TypeError("cannot build another connection")
        super().__init__(**kwargs)


def test_a_connection_that_cannot_be_built_is_a_critical_record(r, redis_server, monkeypatch, tmp_path):
    monkeypatch.setattr(BuildOnce, "built", 0)
    pool = redis.ConnectionPool(
        connection_class=BuildOnce, host="127.0.0.1", port=redis_server.port, protocol=2, max_connections=2
    )
    worker = redis.Redis(connection_pool=pool)
    held = GpuLock(worker, KEY.decode(), task_name="tts", heartbeat_interval_s=30, critical_path=str(tmp_path / "c"))
    held.acquire()
    hog = [pool.get_connection() for _ in range(2)]
    try:
        assert held.finish("normal") is False
    finally:
        for connection in hog:
            pool.release(connection)
        pool.disconnect()
    (record,) = read_jsonl(tmp_path / "c")
    assert record["error_type"] == "TypeError"
    assert r.get(KEY) == held.value
