"""The Redis client the monitor and its commands use."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeAlias
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from monitor.config import Settings, read_password

# Failures the daemon rides out (keeps running, backs off); anything else is a bug or a
# refusal (e.g. ACL) and is reported as such. A Redis loading its dataset answers LOADING,
# which redis-py raises as BusyLoadingError, a ConnectionError: it is down until loaded.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)

# A Redis running a script past busy-reply-threshold (lua-time-limit) answers every other
# command "BUSY ...", which redis-py raises as a plain ResponseError: down until the script ends
# (or SCRIPT KILL). In a pipeline redis-py prefixes the reply with the command that got it.
_BUSY_REPLY = re.compile(r"(?:Command # \d+ \(.*\) of pipeline caused error: )?BUSY ", re.DOTALL)


def redis_down(exc: BaseException) -> bool:
    """True for the failures the daemon rides out: REDIS_DOWN, and a BUSY Redis."""
    if isinstance(exc, REDIS_DOWN):
        return True
    return isinstance(exc, redis.ResponseError) and _BUSY_REPLY.match(str(exc)) is not None


# No command is re-sent by redis-py itself: a command whose reply was lost may have run, and
# re-running a release blindly would mis-report it (DESIGN.md section 4). A connection a Redis
# restart closed fails one pass, which the daemon audits and retries; the release script answers
# a repeated call from its tombstone.
NO_RETRY = Retry(NoBackoff(), 0)

# What every module takes: a plain (or Sentinel-found) Redis, or a Redis Cluster.
Client: TypeAlias = "redis.Redis | RedisCluster"


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def connect(settings: Settings, env: Mapping[str, str] | None = None) -> Client:
    """A client for `redis.url` (or the master that `redis.sentinel` names); no I/O happens
    until the first command."""
    password = read_password(settings, env)
    extra = {"password": password} if password is not None else {}
    if settings.sentinel_service:
        return _through_sentinel(settings, extra)
    if settings.redis_cluster:
        # The URL names any one node; the client discovers the others and follows MOVED.
        return RedisCluster.from_url(
            settings.redis_url, protocol=2, socket_timeout=5, socket_connect_timeout=5, retry=NO_RETRY, **extra
        )
    return redis.Redis.from_url(
        settings.redis_url,
        # RESP2 works on every Redis the fleet may run; redis-py 8 would send HELLO 3.
        protocol=2,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=NO_RETRY,
        client_name="gpulock-monitor",
        **extra,
    )


def _through_sentinel(settings: Settings, extra: dict[str, str]) -> redis.Redis:
    """The master of `redis.sentinel.service`, found (and re-found after a failover) through the
    sentinels; `redis.url` still gives the database, user and password."""
    url = urlsplit(settings.redis_url)
    options = {
        "db": int(url.path.strip("/") or 0),
        "username": url.username,
        "password": url.password,
        **extra,
    }
    nodes = [(host, int(port)) for host, _, port in (n.rpartition(":") for n in settings.sentinel_nodes)]
    sentinel = Sentinel(nodes, socket_timeout=5, socket_connect_timeout=5, protocol=2)  # type: ignore[no-untyped-call]
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.sentinel_service,
        protocol=2,
        socket_timeout=5,
        socket_connect_timeout=5,
        retry=NO_RETRY,
        client_name="gpulock-monitor",
        **options,
    )
    return master
