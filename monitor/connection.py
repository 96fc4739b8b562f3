"""The Redis client the monitor and its commands use.

TLS (DESIGN.md: `redis.tls`): a rediss:// URL, or any of `redis.tls.ca_file`, `cert_file`,
`key_file`, makes every connection TLS (plain, to the master Sentinel names, and to each
Cluster node), verifying the server's certificate and host name against `ca_file` (or the
system's CAs) and presenting `cert_file`/`key_file` when given. The files are read here,
when connecting: one ConfigError line if one cannot be read or loaded.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from monitor.config import Settings, expand_path, read_password
from monitor.errors import ConfigError
from monitor.redact import label, redact, short

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
    until the first command, except for a Cluster, whose nodes are asked for the slot map here."""
    password = read_password(settings, env)
    extra: dict[str, Any] = {"password": password} if password is not None else {}
    extra.update(tls_options(settings, env))
    url = settings.redis_url
    if settings.uses_tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://") :]  # redis.tls given: the URL's own scheme says plain
    if settings.sentinel_service:
        return _through_sentinel(settings, extra)
    if settings.redis_cluster:
        # The URL names any one node; the client discovers the others and follows MOVED. Unlike
        # the others, this client talks to Redis as it is built: no node reachable (down, or a
        # TLS handshake refused) is Redis being down, as for any client, not a bare exception.
        try:
            return RedisCluster.from_url(
                url, protocol=2, socket_timeout=5, socket_connect_timeout=5, retry=NO_RETRY, **extra
            )
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"redis cluster: {redact(str(exc))[:300]}") from None
    return redis.Redis.from_url(
        url,
        # RESP2 works on every Redis the fleet may run; redis-py 8 would send HELLO 3.
        protocol=2,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=NO_RETRY,
        client_name="gpulock-monitor",
        **extra,
    )


def tls_options(settings: Settings, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """redis-py's ssl_* keyword arguments for `redis.tls` ({} without TLS). Each file is
    expanded (`${CREDENTIALS_DIRECTORY}`), checked readable, and loaded once here, so a wrong
    file is one line naming its key, not a handshake error on every pass."""
    if not settings.uses_tls:
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    files = {}
    for key, option in (("ca_file", "ssl_ca_certs"), ("cert_file", "ssl_certfile"), ("key_file", "ssl_keyfile")):
        value = getattr(settings, f"redis_tls_{key}")
        if value:
            files[key] = options[option] = _readable(expand_path(value, f"redis.tls.{key}", env), key)
    context = ssl.create_default_context()
    try:
        if "ca_file" in files:
            context.load_verify_locations(cafile=files["ca_file"])
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"redis.tls.ca_file: not a PEM CA certificate: {label(files['ca_file'], 200)} ({_why(exc)})"
        ) from None
    try:
        if "cert_file" in files:
            # An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
            context.load_cert_chain(files["cert_file"], files.get("key_file"), password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"redis.tls.cert_file: cannot load the client certificate and key {label(files['cert_file'], 200)} "
            f"(a PEM certificate, and its unencrypted key in key_file or the same file): {_why(exc)}"
        ) from None
    return options


def _readable(name: str, key: str) -> str:
    path = Path(name)
    if not path.exists():
        raise ConfigError(f"redis.tls.{key}: {label(name, 200)} does not exist")
    if not path.is_file():
        raise ConfigError(f"redis.tls.{key}: {label(name, 200)} is not a readable file")
    if not os.access(path, os.R_OK):
        raise ConfigError(
            f"redis.tls.{key}: {label(name, 200)} is not a readable file "
            "(run the command as a user who can read it, e.g. with sudo)"
        )
    return name


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted key file")


def _why(exc: BaseException) -> str:
    return short(getattr(exc, "reason", None) or str(exc) or type(exc).__name__, 80).strip("'\"")


def _through_sentinel(settings: Settings, extra: dict[str, Any]) -> redis.Redis:
    """The master of `redis.sentinel.service`, found (and re-found after a failover) through the
    sentinels; `redis.url` still gives the database, user and password. With TLS, the sentinels
    are reached over TLS too, with the same CA and client certificate."""
    url = urlsplit(settings.redis_url)
    tls = {key: value for key, value in extra.items() if key.startswith("ssl_")}
    if settings.uses_tls:
        tls["ssl"] = True
    options = {
        "db": int(url.path.strip("/") or 0),
        "username": unquote(url.username) if url.username else None,
        "password": unquote(url.password) if url.password else None,
        **extra,
        **tls,
    }
    nodes = [(host, int(port)) for host, _, port in (n.rpartition(":") for n in settings.sentinel_nodes)]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        nodes,
        socket_timeout=5,
        socket_connect_timeout=5,
        protocol=2,
        sentinel_kwargs={"socket_timeout": 5, "socket_connect_timeout": 5, "protocol": 2, **tls},
    )
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
