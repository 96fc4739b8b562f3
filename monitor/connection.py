"""The Redis client the monitor and its commands use."""

from __future__ import annotations

from collections.abc import Mapping

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from monitor.config import Settings, read_password

# Failures the daemon rides out (keeps running, backs off); anything else is a bug or a
# refusal (e.g. ACL) and is reported as such.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


def connect(settings: Settings, env: Mapping[str, str] | None = None) -> redis.Redis:
    """A client for `redis.url`; no I/O happens until the first command."""
    password = read_password(settings, env)
    extra = {"password": password} if password is not None else {}
    return redis.Redis.from_url(
        settings.redis_url,
        # RESP2 works on every Redis the fleet may run; redis-py 8 would send HELLO 3.
        protocol=2,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        # One quick retry rides over a pooled connection that a Redis restart closed; longer
        # outages are the daemon's to handle (audit, back off), not the client's to hide.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        client_name="gpulock-monitor",
        **extra,
    )
