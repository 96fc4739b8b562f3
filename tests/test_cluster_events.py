"""Keyspace events in Redis Cluster: a watcher per primary, against a real three-node cluster with
notifications on (cluster_watch.py, README "Redis Cluster and Sentinel").

Passes here run every 30 s (they never get the chance): whatever is released, an event watcher
released it at its deadline.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from helpers import build, events, make_settings, next_message, subscribed, wait_for
from redis.cluster import RedisCluster
from redis.crc import key_slot
from test_cluster import SLOTS, form_cluster, node_port, three_nodes
from test_tls import ca, pems, tls_cluster  # noqa: F401 - its fixtures, used below

from monitor import daemon, protocol
from monitor.cluster_watch import ClusterWatcher, Topology, combine
from monitor.connection import connect
from monitor.demo.redis_server import RedisServer
from monitor.notify import NotifyState
from monitor.scanner import _lock_keys
from monitor.service import Monitor

HB_INTERVAL_S = 0.3  # a heartbeat lives 0.6 s
SLOW = {"monitor_interval": 30, "timeout_levels": {"warning": 20, "soft_timeout": 30, "hard_timeout": 60}}
BOUNDS = [0, SLOTS // 3, 2 * SLOTS // 3, SLOTS]  # test_cluster.form_cluster's split of the slots
FLAGS = "K$gx"


def node_of(key: bytes) -> int:
    slot = key_slot(key)
    return next(i for i in range(3) if BOUNDS[i] <= slot < BOUNDS[i + 1])


def tagged_on(node: int, skip: int = 0) -> bytes:
    """A hash-tagged lock key (`gpu_lock:{n}`) whose slot is on `node`."""
    found = (k for n in range(10_000) if node_of(k := f"gpu_lock:{{{n}}}".encode()) == node)
    for _ in range(skip):
        next(found)
    return next(found)


def untagged_on(node: int, *, split: bool) -> bytes:
    """An untagged lock key on `node` whose other keys (heartbeat...) are all on it too, or not."""
    for n in range(10_000):
        key = f"gpu_lock:{n}".encode()
        if node_of(key) == node and any(node_of(k) != node for k in _lock_keys(key)) == split:
            return key
    raise AssertionError("no such key")


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    yield from three_nodes("--notify-keyspace-events", FLAGS)


@pytest.fixture
def direct(cluster) -> Iterator[list[redis.Redis]]:
    """A client of each node alone, each node emptied and notifying."""
    clients = [redis.Redis(port=n.port, protocol=2) for n in cluster]
    for client in clients:
        client.flushall()
        client.config_set("notify-keyspace-events", FLAGS)
    yield clients
    for client in clients:
        client.config_set("notify-keyspace-events", FLAGS)
        client.close()


@pytest.fixture
def rc(cluster, direct) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port, protocol=2)
    yield client
    client.close()


def settings_for(cluster: list[RedisServer], tmp: Path, **monitor: object):
    return make_settings(
        f"redis://127.0.0.1:{cluster[0].port}/0",
        tmp,
        redis={"cluster": True},
        gpu_lock_monitor={**SLOW, "heartbeat": {"interval": HB_INTERVAL_S, "timeout": 5}, **monitor},
        discovery={"reconcile_keys_per_s": 100_000},
    )


def cluster_monitor(cluster: list[RedisServer], tmp: Path, **monitor: object) -> Monitor:
    settings = settings_for(cluster, tmp, **monitor)
    return build(settings, connect(settings))


@contextmanager
def watching(monitor: Monitor) -> Iterator[ClusterWatcher]:
    watcher = daemon.start_watcher(monitor)
    assert isinstance(watcher, ClusterWatcher)
    try:
        wait_for(lambda: watcher.progress.complete, timeout_s=10)
        yield watcher
    finally:
        watcher.stop()


def acquire(rc: RedisCluster, key: bytes, task: str = "tts", *, heartbeat: bool = True) -> bytes:
    """What the fleet's worker does: SET NX EX, then its heartbeat key with EX 2 * interval."""
    assert rc.set(key, protocol.lock_value(task), nx=True, ex=600)
    if heartbeat:
        rc.set(protocol.heartbeat_key(key), str(time.time()), px=round(2000 * HB_INTERVAL_S))
    return key


def scans(direct: list[redis.Redis]) -> list[int]:
    return [int(c.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)) for c in direct]


def names(cluster: list[RedisServer]) -> list[str]:
    return [f"127.0.0.1:{n.port}" for n in cluster]


# --- pure -----------------------------------------------------------------------------------------


def test_the_cluster_is_on_only_where_every_primary_is_and_says_which_are_not():
    on = NotifyState("on", "", "keyspace notifications on")
    no_x = NotifyState("on", "x", "keyspace notifications on (no expired events)")
    off = NotifyState("off", "K$gx", "keyspace notifications are off (notify-keyspace-events lacks K)")
    assert combine({"a:1": on, "b:2": on}).state == "on"
    assert combine({"a:1": on, "b:2": no_x}).missing == "x"
    partial = combine({"a:1": on, "b:2": off, "c:3": on})
    assert (partial.state, partial.missing) == ("partial", "K$gx")
    assert "b:2: keyspace notifications are off" in partial.reason
    assert "a:1" not in partial.reason
    assert combine({"a:1": off, "b:2": off}).state == "off"


def test_the_topology_names_each_slots_primary_and_the_asked_host_where_a_node_gives_none():
    reply = [[0, 99, [b"", 7001, b"id1"]], [100, SLOTS - 1, [b"10.0.0.2", 7002, b"id2", [b"10.0.0.3", 7003, b"id3"]]]]
    topology = Topology.parse(reply, "10.0.0.1")
    owners = topology.owners()
    assert (owners[0], owners[99], owners[100], owners[SLOTS - 1]) == ("10.0.0.1:7001",) * 2 + ("10.0.0.2:7002",) * 2
    assert topology.slots_of("10.0.0.2:7002") == {(100, SLOTS - 1)}


# --- against the cluster ----------------------------------------------------------------------------


def test_every_primary_is_subscribed_and_its_locks_found_without_a_scan_per_pass(cluster, direct, rc, tmp_path):
    monitor = cluster_monitor(cluster, tmp_path)
    with watching(monitor) as watcher:
        assert sorted(watcher.nodes()) == sorted(names(cluster))
        assert all(c.pubsub_numpat() == 1 for c in direct)  # each node has its own subscription
        wait_for(lambda: all(w.progress.sweeps >= 1 for w in watcher.nodes().values()))
        before = scans(direct)
        keys = [acquire(rc, tagged_on(node), heartbeat=False) for node in range(3)]
        keys.append(acquire(rc, untagged_on(1, split=True), heartbeat=False))
        reports = [monitor.run_pass() for _ in range(2)]
        after = scans(direct)
        progress = watcher.progress
        mode = monitor.discovery_mode()
    assert after == before  # found by their events: no node was SCANned by a pass
    for report in reports:
        assert report is not None
        assert report.error is None
        assert sorted(v.holding.key for v in report.verdicts) == sorted(keys)
    assert progress.index_size == 4
    assert mode == "keyspace events"
    (said,) = events(monitor.settings.audit_path, "keyspace_notifications")
    assert (said["state"], said["discovery"]) == ("on", "events")


def test_a_worker_killed_before_any_pass_is_released_at_its_heartbeat_expiry_on_every_node(cluster, rc, tmp_path):
    monitor = cluster_monitor(cluster, tmp_path)
    keys = [tagged_on(node) for node in range(3)] + [untagged_on(2, split=False)]
    with watching(monitor), subscribed(rc, *(protocol.release_channel(k) for k in keys)) as notices:
        started = time.monotonic()
        for key in keys:
            acquire(rc, key)  # and dies at once: its heartbeat is never refreshed
        notified = [next_message(notices, timeout_s=10) for _ in keys]
        took_s = time.monotonic() - started
    assert all(rc.exists(key) == 0 for key in keys)
    assert sorted(json.loads(n["data"])["lock_key"].encode() for n in notified if n) == sorted(keys)
    # The heartbeat lives 0.6 s; soft_timeout is 30 s and no pass runs before 30 s.
    assert 2 * HB_INTERVAL_S <= took_s < 2 * HB_INTERVAL_S + 2.0, took_s
    released = events(monitor.settings.audit_path, "lock_released")
    assert {(e["reason"], e["heartbeat"]) for e in released} == {("heartbeat_dead", "dead")}
    assert len(released) == len(keys)


def test_a_split_lock_is_judged_as_a_pass_judges_it_never_by_what_events_cannot_prove(cluster, rc, tmp_path):
    """Its heartbeat's events come through another node's connection, unordered with the lock's:
    events prove nothing about it. A heartbeat key there before the lock was taken (a legacy
    release leaves it) that never changes while the lock is held condemns nothing."""
    monitor = cluster_monitor(cluster, tmp_path)
    split, whole = untagged_on(0, split=True), untagged_on(0, split=False)
    with watching(monitor):
        rc.set(protocol.heartbeat_key(split), str(time.time()), px=round(2000 * HB_INTERVAL_S))  # the last holder's
        acquire(rc, split, heartbeat=False)  # a legacy worker, no heartbeat of its own
        acquire(rc, whole)  # dies at once; its deadline comes right after the split lock's, on the same node
        wait_for(lambda: rc.exists(whole) == 0, timeout_s=10)
        assert rc.exists(protocol.heartbeat_key(split)) == 0
        report = monitor.run_pass()
    assert report is not None
    assert report.error is None
    (verdict,) = report.verdicts
    assert (verdict.holding.key, verdict.holding.heartbeat.value) == (split, "none")
    assert rc.exists(split) == 1  # kept until soft_timeout, as without events
    assert [e["lock_key"].encode() for e in events(monitor.settings.audit_path, "lock_released")] == [whole]


def test_a_split_lock_seen_beating_is_released_at_its_heartbeat_expiry_by_the_deadline_read(cluster, rc, tmp_path):
    monitor = cluster_monitor(cluster, tmp_path)
    key = untagged_on(1, split=True)
    record = protocol.holding_key(key)
    with watching(monitor), subscribed(rc, protocol.release_channel(key)) as notices:
        acquire(rc, key)
        wait_for(lambda: rc.exists(record), timeout_s=5)  # the watcher read it (its set event)
        # Beats once more: the heartbeat's node tells the lock's node, which reads it again.
        rc.set(protocol.heartbeat_key(key), str(time.time()), px=round(2000 * HB_INTERVAL_S))
        beat_at = time.monotonic()
        notice = next_message(notices, timeout_s=10)  # and dies
        took_s = time.monotonic() - beat_at
    assert notice is not None
    assert 2 * HB_INTERVAL_S <= took_s < 2 * HB_INTERVAL_S + 2.0, took_s
    (released,) = events(monitor.settings.audit_path, "lock_released")
    assert (released["reason"], released["heartbeat"]) == ("heartbeat_dead", "dead")


def test_a_primary_with_notifications_off_makes_every_pass_scan_and_is_named(cluster, direct, rc, tmp_path):
    direct[1].config_set("notify-keyspace-events", "")
    monitor = cluster_monitor(cluster, tmp_path, monitor_interval=0.5)
    watcher = daemon.start_watcher(monitor)
    assert isinstance(watcher, ClusterWatcher)
    try:
        wait_for(lambda: watcher.progress.state is not None)
        assert watcher.candidates() is None  # the pass SCANs
        assert watcher.quiet() == frozenset()
        key = acquire(rc, tagged_on(1), heartbeat=False)
        report = monitor.run_pass()
        assert "keyspace notifications partial" in monitor.discovery_mode()
        direct[1].config_set("notify-keyspace-events", FLAGS)
        wait_for(lambda: watcher.progress.complete, timeout_s=10)
        assert watcher.candidates() is not None
    finally:
        watcher.stop()
    assert report is not None
    assert [v.holding.key for v in report.verdicts] == [key]
    said = events(monitor.settings.audit_path, "keyspace_notifications")
    assert [(e["state"], e["discovery"]) for e in said] == [("partial", "scan"), ("on", "events")]
    assert said[0]["reason"].startswith(f"Redis Cluster: 127.0.0.1:{cluster[1].port}: keyspace notifications are off")
    assert f"127.0.0.1:{cluster[0].port}" not in said[0]["reason"]


def test_a_lock_whose_event_a_node_missed_is_found_by_that_nodes_reconcile(cluster, direct, rc, tmp_path):
    monitor = cluster_monitor(cluster, tmp_path, monitor_interval=0.5)
    with watching(monitor) as watcher:
        node = watcher.nodes()[f"127.0.0.1:{cluster[2].port}"]
        direct[2].config_set("notify-keyspace-events", "")  # a gap: this lock raises no event
        key = acquire(rc, tagged_on(2), heartbeat=False)
        direct[2].config_set("notify-keyspace-events", FLAGS)
        wait_for(lambda: node.progress.found_by_reconcile == 1, timeout_s=10)
        keys, complete = watcher.candidates() or ([], False)
    assert keys == [key]
    assert complete


def test_a_lost_subscription_of_one_node_is_resubscribed_and_its_locks_followed_again(cluster, direct, rc, tmp_path):
    monitor = cluster_monitor(cluster, tmp_path)
    with watching(monitor) as watcher:
        node = watcher.nodes()[f"127.0.0.1:{cluster[2].port}"]
        others = [w.progress.resubscribes for name, w in watcher.nodes().items() if name != node.name]
        direct[2].client_kill_filter(_type="pubsub")
        wait_for(lambda: node.progress.resubscribes >= 2 and node.progress.complete, timeout_s=15)
        key = acquire(rc, tagged_on(2, skip=1))
        wait_for(lambda: rc.exists(key) == 0, timeout_s=10)  # released at its heartbeat's expiry
        assert [w.progress.resubscribes for name, w in watcher.nodes().items() if name != node.name] == others
    assert [e["reason"] for e in events(monitor.settings.audit_path, "lock_released")] == ["heartbeat_dead"]


# --- topology changes -------------------------------------------------------------------------------


def move_slot(cluster: list[RedisServer], slot: int, src: int, dst: int) -> None:
    """Reshard: `slot` and its keys from node `src` to node `dst`, as redis-cli --cluster does."""
    clients = [redis.Redis(port=n.port, protocol=2) for n in cluster]
    ids = [c.execute_command("CLUSTER", "MYID") for c in clients]
    clients[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
    clients[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
    keys = clients[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if keys:
        clients[src].execute_command("MIGRATE", "127.0.0.1", cluster[dst].port, "", 0, 5000, "KEYS", *keys)
    for client in clients:
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
    for client in clients:
        client.close()


def test_a_resharded_slot_is_followed_to_its_new_primary(cluster, direct, rc, tmp_path):
    monitor = cluster_monitor(cluster, tmp_path)
    held = tagged_on(1)
    slot = key_slot(held)
    later = held + b":b"  # another lock of the same slot
    assert key_slot(later) == slot
    acquire(rc, held, heartbeat=False)
    try:
        with watching(monitor) as watcher:
            src, dst = (watcher.nodes()[f"127.0.0.1:{cluster[i].port}"] for i in (1, 2))
            move_slot(cluster, slot, 1, 2)
            wait_for(lambda: watcher.owner_of(held) == dst.name, timeout_s=10)
            wait_for(lambda: dst.progress.complete and src.progress.complete, timeout_s=10)
            found = watcher.candidates()
            assert found is not None
            assert found[0].count(held) == 1  # indexed by its new node, and only there
            with subscribed(rc, protocol.release_channel(later)) as notices:
                acquire(rc, later)  # on the new node, and dies at once
                notice = next_message(notices, timeout_s=10)
    finally:
        move_slot(cluster, slot, 2, 1)
    assert notice is not None
    (released,) = events(monitor.settings.audit_path, "lock_released")
    assert (released["lock_key"].encode(), released["reason"]) == (later, "heartbeat_dead")


@pytest.fixture
def replicated(tmp_path) -> Iterator[list[RedisServer]]:
    """Three primaries and a replica of the first, its own cluster (a failover changes it)."""
    taken: set[int] = set()
    args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--notify-keyspace-events", FLAGS)
    nodes = [RedisServer(node_port(taken), *args) for _ in range(4)]
    try:
        form_cluster(nodes[:3])
        replica = nodes[3]
        replica.start()
        r = redis.Redis(port=replica.port, protocol=2)
        r.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0].port, nodes[0].port + 10000)
        first = redis.Redis(port=nodes[0].port, protocol=2)
        first_id = first.execute_command("CLUSTER", "MYID")
        wait_for(lambda: first_id in r.execute_command("CLUSTER", "NODES"), timeout_s=30)
        r.execute_command("CLUSTER", "REPLICATE", first_id)
        wait_for(lambda: r.info("replication").get("master_link_status") == "up", timeout_s=30)
        wait_for(lambda: first.info("replication")["connected_slaves"] == 1, timeout_s=30)
        yield nodes
    finally:
        for node in nodes:
            node.close()


@pytest.mark.slow
def test_a_failover_subscribes_the_new_primary_and_its_locks_are_followed(replicated, tmp_path):
    old, promoted = replicated[0], replicated[3]
    rc = RedisCluster(host="127.0.0.1", port=replicated[1].port, protocol=2)
    monitor = cluster_monitor(replicated[1:], tmp_path)  # reached through a node that stays a primary
    try:
        with watching(monitor) as watcher:
            assert sorted(watcher.nodes()) == sorted(names(replicated[:3]))
            redis.Redis(port=promoted.port, protocol=2).execute_command("CLUSTER", "FAILOVER")
            wait_for(lambda: sorted(watcher.nodes()) == sorted(names(replicated[1:])), timeout_s=20)
            wait_for(lambda: watcher.progress.complete, timeout_s=10)
            key = tagged_on(0)  # its slot is the promoted node's now
            with subscribed(rc, protocol.release_channel(key)) as notices:
                started = time.monotonic()
                acquire(rc, key)  # and dies at once
                notice = next_message(notices, timeout_s=10)
                took_s = time.monotonic() - started
    finally:
        rc.close()
    assert notice is not None
    assert took_s < 2 * HB_INTERVAL_S + 2.0, took_s
    (released,) = events(monitor.settings.audit_path, "lock_released")
    assert (released["reason"], released["heartbeat"]) == ("heartbeat_dead", "dead")
    assert f"127.0.0.1:{old.port}" not in watcher.nodes()


def test_the_shipped_monitor_rules_with_database_0_and_cluster_slots_run_the_events_on_every_node(
    cluster, direct, rc, tmp_path
):
    """README "Redis Cluster and Sentinel": a cluster has database 0 only, and the topology is read
    with CLUSTER SLOTS (redis-py reads it too)."""
    line = (Path(__file__).resolve().parent.parent / "deploy" / "redis-acl-7.conf").read_text().splitlines()[0]
    assert line.startswith("user gpulock-monitor ")
    rules = re.findall(r"\([^)]*\)|\S+", line.replace("@2__", "@0__").replace(">CHANGE-ME", ">monitor-pw"))[2:]
    for client in direct:
        client.execute_command("ACL", "SETUSER", "gpulock-monitor", *rules, "+cluster|slots", "+command")
    try:
        url = f"redis://gpulock-monitor:monitor-pw@127.0.0.1:{cluster[0].port}/0"
        settings = make_settings(
            url,
            tmp_path,
            redis={"cluster": True},
            gpu_lock_monitor={**SLOW, "heartbeat": {"interval": HB_INTERVAL_S, "timeout": 5}},
        )
        monitor = build(settings, connect(settings))
        keys = [tagged_on(node) for node in range(3)]
        with watching(monitor) as watcher, subscribed(rc, *(protocol.release_channel(k) for k in keys)) as notices:
            assert watcher.progress.state is not None
            assert watcher.progress.state.on
            for key in keys:
                acquire(rc, key)
            notified = [next_message(notices, timeout_s=10) for _ in keys]
            report = monitor.run_pass()
        refused = [c.acl_log() for c in direct]
    finally:
        for client in direct:
            client.acl_deluser("gpulock-monitor")
            client.acl_log_reset()
    assert all(notified)
    assert report is not None
    assert report.error is None
    assert refused == [[], [], []]


def test_every_primarys_own_connection_is_tls_where_the_cluster_is(tls_cluster, pems, tmp_path):  # noqa: F811
    """The per-node connections take the cluster client's settings: TLS, CA, every node."""
    for tls in tls_cluster:
        plain = redis.Redis(port=tls.target_port, protocol=2)
        plain.config_set("notify-keyspace-events", FLAGS)
        plain.close()
    settings = make_settings(
        f"redis://127.0.0.1:{tls_cluster[0].port}/0",
        tmp_path,
        redis={"cluster": True, "tls": {"ca_file": str(pems["ca"])}},
        gpu_lock_monitor={**SLOW, "heartbeat": {"interval": HB_INTERVAL_S, "timeout": 5}},
    )
    monitor = build(settings, connect(settings, env={}))
    with watching(monitor) as watcher:
        assert sorted(watcher.nodes()) == sorted(f"127.0.0.1:{tls.port}" for tls in tls_cluster)
        assert watcher.progress.state is not None
        assert watcher.progress.state.on
        key = tagged_on(2)
        with subscribed(monitor.client, protocol.release_channel(key)) as notices:
            acquire(monitor.client, key)
            assert next_message(notices, timeout_s=10) is not None
    for w in watcher.nodes().values():
        assert type(w.node_client.connection_pool.get_connection()) is redis.SSLConnection
