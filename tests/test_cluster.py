"""Redis Cluster: three real redis-server nodes, slots assigned, the monitor working across them.

Lock keys that are not hash-tagged put a lock (`gpu_lock:0`) and its heartbeat
(`gpu_lock:0:heartbeat`) in different slots: the release then checks the lock atomically in a
single-key script and the heartbeat just before (see README "Redis Cluster"). Hash-tagged keys
(`gpu_lock:{0}`) keep both in one slot and get the full script.

Keyspace events on every primary (cluster_watch.py), with notifications on, a failover and a
resharding: tests/test_cluster_events.py, which forms its clusters with `form_cluster`.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator

import pytest
import redis
from click.testing import CliRunner
from helpers import beat, build, config_file, events, hold, make_settings, subscribed, wait_for
from redis.cluster import RedisCluster
from redis.crc import key_slot

from monitor import protocol
from monitor.cli import main
from monitor.demo.redis_server import RedisServer, free_port
from monitor.holding import Record
from monitor.protocol import HeartbeatCheck, Outcome
from monitor.reaper import Reaper
from monitor.scanner import read_locks

SLOTS = 16384


def node_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free and below 65536 too."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and not {port, port + 10000} & taken:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            taken.update({port, port + 10000})
            return port


def form_cluster(nodes: list[RedisServer], settled: Callable[[list[redis.Redis]], bool] | None = None) -> None:
    """Start the nodes, split the slots between them, introduce them, and wait until the cluster
    is up (and `settled`, when given)."""
    for node in nodes:
        node.start()
    clients = [redis.Redis(port=n.port, protocol=2) for n in nodes]
    bounds = [0, SLOTS // 3, 2 * SLOTS // 3, SLOTS]
    for client, lo, hi in zip(clients, bounds, bounds[1:], strict=False):
        client.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi))
    for node in nodes[1:]:  # the bus port explicitly: a node may announce another client port
        clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.port + 10000)

    def up() -> bool:
        ok = all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients)
        return ok and (settled is None or settled(clients))

    wait_for(up, timeout_s=30)


def three_nodes(*args: str) -> Iterator[list[RedisServer]]:
    """A formed cluster of three primaries, each started with `args` too; closed after."""
    taken: set[int] = set()
    nodes = [
        RedisServer(node_port(taken), "--cluster-enabled", "yes", "--cluster-node-timeout", "2000", *args)
        for _ in range(3)
    ]
    try:
        form_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    yield from three_nodes()


@pytest.fixture
def rc(cluster) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port, protocol=2)
    for node in cluster:
        redis.Redis(port=node.port, protocol=2).flushall()
    yield client
    client.close()


@pytest.fixture
def csettings(cluster, tmp_path):
    return make_settings(f"redis://127.0.0.1:{cluster[0].port}/0", tmp_path, redis={"cluster": True})


def test_untagged_keys_really_are_in_different_slots():
    assert key_slot(b"gpu_lock:0") != key_slot(b"gpu_lock:0:heartbeat")
    assert key_slot(b"gpu_lock:{0}") == key_slot(b"gpu_lock:{0}:heartbeat")


def test_passes_across_the_cluster_release_zombies_keep_the_alive_and_record_in_each_locks_slot(rc, csettings):
    from monitor.connection import connect

    client = connect(csettings)
    assert isinstance(client, RedisCluster)
    legacy = hold(rc, 0, "legacy", age_s=450)  # untagged, no heartbeat, past soft
    alive = hold(rc, 1, "alive", age_s=450)
    beat(rc, alive)
    tagged = hold(rc, "{2}", "tagged", age_s=10)
    crashed = hold(rc, 3, "crashed", age_s=10)
    rc.hset(b"gpu_lock:weird", "a", "b")
    for i in range(300):
        rc.set(f"celery-task-meta-{i}", "x")  # unrelated keys on every node
    monitor = build(csettings, client)
    first = monitor.run_pass()
    assert first.error is None
    assert first.invalid == 1
    assert len(first.verdicts) == 4
    assert not rc.exists(legacy)
    beat(rc, tagged)  # heartbeats seen to appear during their holdings: theirs
    beat(rc, crashed)
    second = monitor.run_pass()
    assert second.error is None
    assert second.released_keys == set()
    assert {v.holding.key: v.holding.heartbeat.value for v in second.verdicts}[crashed] == "alive"
    rc.delete(crashed + b":heartbeat")  # the crashed worker's heartbeat expires
    rc.delete(tagged + b":heartbeat")  # so does the tagged one's
    third = monitor.run_pass()
    assert third.error is None
    assert third.released_keys == {crashed, tagged}
    assert rc.exists(alive)
    assert not rc.exists(tagged + b":heartbeat")
    released = {e["lock_key"]: e for e in events(csettings.audit_path, "lock_released")}
    assert set(released) == {"gpu_lock:0", "gpu_lock:3", "gpu_lock:{2}"}
    assert released["gpu_lock:3"]["reason"] == "heartbeat_dead"
    # Records in each lock's own slot: the live holding's, and release marks for the others.
    assert Record.loads(rc.get(protocol.holding_key(alive))).holder == b"locked_by_alive"
    for key in (legacy, crashed, tagged):
        assert rc.get(protocol.holding_key(key)) == b"-released"
        assert key_slot(protocol.holding_key(key)) == key_slot(key)


def test_release_fallback_keeps_its_owner_and_heartbeat_checks(rc, csettings):
    client = RedisCluster(host="127.0.0.1", port=rc.get_default_node().port, protocol=2)
    reaper = Reaper(client)
    key = hold(rc, 0, "new_holder")
    holder = b"locked_by_new_holder"
    (obs,) = read_locks(client, [key])
    expiry = obs.expiry_ms
    assert reaper.release(key, b"locked_by_old", expiry).outcome is Outcome.HOLDER_CHANGED
    # The same value with another expiry is another holding (a re-acquire by the same task name).
    assert reaper.release(key, holder, expiry - 1000).outcome is Outcome.HOLDER_CHANGED
    # The heartbeat, in another slot, is re-checked just before the script: a changed value, the
    # same value re-set later (an EXPIRE alone), or one that appeared since it was read absent.
    beat(rc, key, value="2.0")
    (obs,) = read_locks(client, [key])
    for hb_value, hb_expiry in ((b"1.0", obs.hb_expiry_ms), (b"2.0", obs.hb_expiry_ms - 1000), (None, -2)):
        result = reaper.release(
            key, holder, expiry, heartbeat=HeartbeatCheck.CHECK, hb_value=hb_value, hb_expiry_ms=hb_expiry
        )
        assert result.outcome is Outcome.HEARTBEAT_REVIVED, (hb_value, hb_expiry)
    assert rc.exists(key)
    with subscribed(rc, b"gpu_lock:gpu_lock:0") as pubsub:
        assert reaper.release(key, holder, expiry, heartbeat=HeartbeatCheck.ANY).outcome is Outcome.RELEASED
        assert not rc.exists(key)
        assert rc.exists(key + b":heartbeat")  # in another slot: left to expire
        message = wait_for(lambda: pubsub.get_message(timeout=1))
        assert json.loads(message["data"])["release_reason"] == "forced_by_monitor"
    # The tombstone is in the lock's slot: the same attempt repeated (a lost reply) answers what it
    # did; anyone else's attempt finds the lock gone.
    assert reaper.release(key, holder, expiry).outcome is Outcome.RELEASED
    assert reaper.release(key, holder, expiry, attempt="another").outcome is Outcome.GONE
    # With the check, the very heartbeat write that was read lets the release through.
    other = hold(rc, 5, "checked")
    beat(rc, other, value="1.0")
    (obs,) = read_locks(client, [other])
    result = reaper.release(
        other,
        obs.value,
        obs.expiry_ms,
        heartbeat=HeartbeatCheck.CHECK,
        hb_value=obs.hb_value,
        hb_expiry_ms=obs.hb_expiry_ms,
    )
    assert result.outcome is Outcome.RELEASED
    assert not rc.exists(other)


def test_status_through_any_cluster_node_lists_the_locks_and_releases_nothing(rc, cluster, tmp_path):
    hold(rc, 0, "tts", age_s=450)
    cfg = config_file(tmp_path, f"redis://127.0.0.1:{cluster[1].port}/0", redis={"cluster": True})
    result = CliRunner().invoke(main, ["status", "--json", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    (lock,) = json.loads(result.stdout)["locks"]
    assert (lock["lock_key"], lock["action"]) == ("gpu_lock:0", "release")
    assert rc.exists(b"gpu_lock:0")
