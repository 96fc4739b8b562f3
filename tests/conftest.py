"""Fixtures: a real redis-server per session, flushed for every test; a real sentinel."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import make_settings, wait_for

from monitor.config import Settings
from monitor.demo.redis_server import RedisServer, find_binary, free_port


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, protocol=2)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return make_settings(redis_server.url, tmp_path)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[RedisServer, int]]:
    """A master and a sentinel process watching it as `gpulocks`: (master, sentinel port)."""
    with RedisServer() as master:
        port = free_port()
        conf = tmp_path / "sentinel.conf"  # sentinel rewrites its own config: a file of ours
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor gpulocks 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds gpulocks 1000\n"
        )
        proc = subprocess.Popen([find_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        try:
            probe = redis.Redis(port=port, protocol=2)
            wait_for(lambda: _knows_master(probe))
            probe.close()
            yield master, port
        finally:
            proc.kill()
            proc.wait(timeout=10)


def _knows_master(probe: redis.Redis) -> bool:
    try:
        return probe.sentinel_get_master_addr_by_name("gpulocks") is not None
    except redis.ConnectionError:
        return False
