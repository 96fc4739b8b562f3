"""Are keyspace notifications on? Asked of Redis by a probe key and the events it raises.

Notifications are the operator's setting (`notify-keyspace-events`): the monitor never changes it
unless `discovery.configure_notifications` says so. The event-driven core needs keyspace events
(K) of string commands ($) and generic ones (g: del, expire, rename); expired events (x) are used
where they come, never relied on (Redis emits them only when it evicts a key, which can lag).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from monitor import protocol

# Event name -> the notify-keyspace-events class that emits it.
_CLASS_OF = {"set": "$", "expire": "g", "del": "g", "expired": "x"}
NEEDED = "K$g"
WAIT_S = 2.0
_END = b"gpulock-monitor:probe-end"


@dataclass(frozen=True)
class NotifyState:
    state: str  # on | partial | off
    missing: str  # classes missing of NEEDED (+ "x" when expired events do not come)
    reason: str

    @property
    def on(self) -> bool:
        return self.state == "on"


def self_test(client: redis.Redis, monitor_id: str, db: int) -> NotifyState:
    """Set, delete, and let expire a probe key of our own; see which events arrive. Only
    commands the monitor's ACL has anyway (SET and DEL on its own keys, GET, PUBLISH, SUBSCRIBE)."""
    key = protocol.probe_key(monitor_id)
    channel = protocol.keyspace_channel(db, key)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    try:
        pubsub.subscribe(channel)
        _await_subscription(pubsub)
        client.set(key, b"1", px=60_000)
        client.delete(key)
        client.set(key, b"1", px=1)
        time.sleep(0.002)
        client.get(key)  # a read of an expired key evicts it: an `expired` event where x is on
        # Delivered after every event the commands above raised: no waiting for events that will not come.
        client.publish(channel, _END)
        seen = _events(pubsub)
    finally:
        pubsub.close()
    return judge(seen)


def judge(seen: set[str]) -> NotifyState:
    """on, partial or off from the probe's events. Pure."""
    classes = {_CLASS_OF[e] for e in seen if e in _CLASS_OF}
    missing = "".join(c for c in "$g" if c not in classes)
    optional = "" if "x" in classes else "x"
    if not seen:
        return NotifyState("off", "K$g" + optional, "keyspace notifications are off (notify-keyspace-events lacks K)")
    if missing:
        return NotifyState(
            "partial", missing + optional, f"keyspace notifications lack class(es) {missing!r} (needed: {NEEDED})"
        )
    note = "" if not optional else " (no expired events: deadlines are re-read, not awaited)"
    return NotifyState("on", optional, f"keyspace notifications on{note}")


def configure(client: redis.Redis) -> None:
    """Merge the needed classes into notify-keyspace-events (only when the operator opted in)."""
    raw = client.config_get("notify-keyspace-events").get("notify-keyspace-events") or ""
    current = raw.decode() if isinstance(raw, bytes) else str(raw)
    wanted = "".join(sorted(set(current) | set("K$gx")))
    if "A" in current:  # "A" already stands for every class
        wanted = "".join(sorted(set(current) | set("K")))
    client.config_set("notify-keyspace-events", wanted)


def _await_subscription(pubsub: redis.client.PubSub) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=deadline - time.monotonic())
        if message is not None and message["type"] in ("subscribe", "psubscribe"):
            return
    raise redis.TimeoutError("no confirmation of the notification probe's subscription")


def _events(pubsub: redis.client.PubSub) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + WAIT_S
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == "message":
            data = message["data"]
            if data == _END:
                return seen
            seen.add(data.decode() if isinstance(data, bytes) else str(data))
    raise redis.TimeoutError("the notification probe's own message did not come back")
