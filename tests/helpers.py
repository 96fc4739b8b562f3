"""Helpers shared by the tests: settings, monitors, audit reading, awaiting, lock writing, release
notice subscriptions, limited Redis users."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from monitor import protocol
from monitor.audit import AuditLog, JsonlFile
from monitor.config import Settings
from monitor.service import Monitor

# Fast tiers for tests: a lock's age is set through its PTTL (lock_timeout - age), so no
# test has to wait for time to pass unless it is about the daemon's timing itself.
LOCK_TIMEOUT_S = 600


def make_settings(url: str, tmp: Path, **sections: Any) -> Settings:
    raw: dict[str, Any] = {
        "redis": {"url": url},
        "gpu_lock": {"lock_timeout": LOCK_TIMEOUT_S},
        "gpu_lock_monitor": {
            "monitor_interval": 0.2,
            "timeout_levels": {"warning": 300, "soft_timeout": 400, "hard_timeout": 500},
            "heartbeat": {"interval": 60, "timeout": 200},
            "cleanup": {"max_retry": 2, "retry_delay": 0.05},
        },
        "audit": {"path": str(tmp / "audit.jsonl"), "critical_path": str(tmp / "critical.jsonl")},
        "metrics": {"enabled": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return Settings.from_mapping(raw, env={})


def build(settings: Settings, client: redis.Redis | None = None, *, dry_run: bool = False, **kw: Any) -> Monitor:
    audit_file = JsonlFile(settings.audit_path)
    critical = JsonlFile(settings.critical_path)
    client = client or redis.Redis.from_url(settings.redis_url, protocol=2)
    return Monitor(settings, client, AuditLog(audit_file, dry_run=dry_run), critical, **kw)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_bytes().splitlines() if line.strip()]


def events(path: str | Path, name: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(path) if name is None or e["event"] == name]


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.02) -> Any:
    """Poll until `predicate` returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def hold(client: redis.Redis, gpu: int | str, task: str = "tts", *, age_s: float = 0.0, ttl: bool = True) -> bytes:
    """Set a lock as an existing worker would, `age_s` seconds into its TTL."""
    key = f"gpu_lock:{gpu}".encode()
    value = f"locked_by_{task}".encode()
    if ttl:
        client.set(key, value, px=int((LOCK_TIMEOUT_S - age_s) * 1000))
    else:
        client.set(key, value)
    return key


def beat(
    client: redis.Redis, key: bytes, *, age_s: float = 0.0, interval_s: float = 60, value: str | None = None
) -> None:
    """Write a heartbeat as a worker would, `age_s` seconds after its last refresh."""
    client.set(
        key + b":heartbeat", value if value is not None else str(time.time()), px=int((2 * interval_s - age_s) * 1000)
    )


def holding_records(client: redis.Redis) -> dict[bytes, bytes]:
    """What the monitor keeps per holding (protocol.holding_key), by record key: records and marks."""
    return {key: client.get(key) for key in client.scan_iter(match=protocol.HOLDING_PREFIX + b"*", count=5000)}


@contextmanager
def subscribed(client: Any, *channels: bytes | str, timeout_s: float = 5.0) -> Iterator[Any]:
    """A PubSub on `channels` (release channels: `protocol.release_channel(key)`), yielded once the
    server has confirmed every subscription, so that nothing published afterwards can be missed;
    closed on leaving. Fails the test when the confirmations do not come within `timeout_s`."""
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(*channels)
        expected = {c.encode() if isinstance(c, str) else c for c in channels}
        confirmed: set[bytes] = set()
        deadline = time.monotonic() + timeout_s
        while confirmed != expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"subscription to {sorted(expected - confirmed)} not confirmed within {timeout_s} s"
                )
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] != "subscribe":
                raise AssertionError(f"expected a subscribe confirmation, got {message!r}")
            confirmed.add(message["channel"])
        yield pubsub
    finally:
        pubsub.close()


def next_message(pubsub: Any, timeout_s: float) -> dict[str, Any] | None:
    """The next published message (subscribe confirmations skipped), or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None:
            return dict(message)
    return None


@dataclass(frozen=True)
class AclUser:
    """A Redis ACL user made by `acl_user`: its URL (the admin client's host, port and database) and
    a client that logs in as it."""

    url: str
    client: redis.Redis


@contextmanager
def acl_user(
    admin: redis.Redis,
    name: str,
    *,
    commands: list[str],
    keys: list[str] | None = None,
    channels: list[str] | None = None,
) -> Iterator[AclUser]:
    """ACL SETUSER `name` with password `<name>-pw`, `commands` (e.g. ["+@all", "-del"]), `keys`
    (every key unless given) and, when given, exactly `channels` (Redis 6.2 starts a user with every
    channel, 7 with none); the client is closed and the user deleted on leaving."""
    password = f"{name}-pw"
    rules: dict[str, Any] = {"keys": keys if keys is not None else ["*"], "commands": commands}
    if channels is not None:
        rules.update(channels=channels, reset_channels=True)
    admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], **rules)
    at = admin.connection_pool.connection_kwargs
    url = f"redis://{name}:{password}@{at['host']}:{at['port']}/{at.get('db', 0)}"
    client = redis.Redis.from_url(url, protocol=2)
    try:
        yield AclUser(url, client)
    finally:
        client.close()
        admin.acl_deluser(name)


def config_file(tmp: Path, url: str, **sections: Any) -> Path:
    """A monitor.yml for the command line: `make_settings` written out, JSON logs."""
    raw = make_settings(url, tmp, **sections).redacted()
    raw["redis"]["url"] = url  # redacted() masks a password in the URL
    raw["logging"]["format"] = "json"
    path = tmp / "monitor.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- the daemon as a real process -------------------------------------------------------------------

# A daemon tuned for crash-recovery tests: workers beat every FAST_HB_S (their key lives twice that).
FAST_HB_S = 0.2
FAST_HB_TIMEOUT_S = 1.0
FAST_INTERVAL_S = 0.2


def start_daemon(config: Path, *extra: str) -> subprocess.Popen[str]:
    """`gpulock-monitor run` as a subprocess; its output (stderr too) is collected by `stop_daemon`."""
    return subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "-c", str(config), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def stop_daemon(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM (unless it already exited), then its exit code and output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def fast_config(tmp: Path, url: str, **monitor: Any) -> Path:
    """A monitor.yml with the FAST_* heartbeat settings and tiers of a few seconds."""
    return config_file(
        tmp,
        url,
        gpu_lock_monitor={
            "monitor_interval": FAST_INTERVAL_S,
            "timeout_levels": {"warning": 2, "soft_timeout": 3, "hard_timeout": 30},
            "heartbeat": {"interval": FAST_HB_S, "timeout": FAST_HB_TIMEOUT_S},
            **monitor,
        },
    )


def fast_daemon(tmp: Path, url: str) -> subprocess.Popen[str]:
    """A started daemon on `fast_config`."""
    proc = start_daemon(fast_config(tmp, url))
    wait_for(lambda: events(tmp / "audit.jsonl", "monitor_started") or proc.poll() is not None)
    assert proc.poll() is None, stop_daemon(proc)[1]
    return proc


def answer_at_terminal(
    argv: list[str],
    answer: str,
    *,
    before_answer: Callable[[], None] | None = None,
    raw_output: bool = False,
    timeout_s: float = 60,
) -> tuple[int, bytes, bytes]:
    """Run `argv` with a pseudo-terminal as stdin, stdout and stderr; answer its confirmation
    prompt once shown (after `before_answer`). Returns the exit code, the output up to the
    prompt, and all of it. `raw_output` turns the terminal's own \\n -> \\r\\n off, so that every
    control character seen comes from the program."""
    import os
    import pty
    import select
    import termios

    leader, follower = pty.openpty()
    if raw_output:
        attrs = termios.tcgetattr(follower)
        attrs[1] &= ~termios.OPOST
        termios.tcsetattr(follower, termios.TCSANOW, attrs)
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    out, prompt = b"", b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not prompt and b"Release it?" in out:
                prompt = out
                if before_answer is not None:
                    before_answer()
                os.write(leader, answer.encode() + b"\n")
            if select.select([leader], [], [], 0.1)[0]:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(leader)
    return proc.wait(timeout=10), prompt, out
