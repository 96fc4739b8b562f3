"""Keyspace events in Redis Cluster: one event watcher per primary (DESIGN.md section 6).

A cluster node raises keyspace events only for the keys it holds, and a SUBSCRIBE reaches only the
node it is sent to (redis-py's ClusterPubSub picks one node per channel). So each primary gets its
own `watcher.Watcher`, over a client connected to that node alone: it PSUBSCRIBEs
`__keyspace@0__:<key_pattern>` there (a cluster has database 0 only), seeds its index with a SCAN
of that node, reconciles that node with the paced SCAN, runs the notification self-test there (a
probe key hash-tagged into one of the node's own slots) and publishes its marks there. Redis
delivers a PUBLISH to the node's own subscribers in order with the events the node raised before
it (a PUBLISH is also broadcast to the other nodes, where nobody listens to it), so a read and its
mark stay ordered with the events of the node that holds the key, as on a single Redis.

A read is one script on the lock's node, declaring no keys and naming them as arguments: a script
may touch keys of several slots as long as they all live on the node it runs on (Redis 6 and 7), so
one read and one mark cover every lock of a batch whose keys are on that node, as READ_SCRIPT does
on a single Redis. `NodeClient` answers READ_SCRIPT with it (the standalone watcher reads through
`scanner.read_locks`, which registers READ_SCRIPT on the watcher's client).

A lock whose heartbeat (or any key its read takes) lives on another node - an untagged
`gpu_lock:0` and `gpu_lock:0:heartbeat` on two primaries - cannot be read in one moment with its
heartbeat, and the heartbeat's events come through another connection, unordered with the lock's.
Such a lock is "split": the key read on the other node is read first, apart; nothing the events
would prove is claimed for it (no proven heartbeat write, no taint, never "quiet" to a pass: every
pass reads it), so it is judged as a SCAN pass judges it, at every pass and at its deadlines (its
heartbeat's expiry, learned from the read). Hash-tagged keys (`gpu_lock:{0}`) are never split; an
untagged lock is split only when its keys' slots are on different primaries.

`ClusterWatcher` follows the topology (CLUSTER SLOTS, at every pass and every TOPOLOGY_EVERY_S):
a new primary (a failover, a node added) gets a watcher; a node that is no longer a primary loses
its own; a node whose slots changed subscribes again and reseeds. It answers the pass as the
standalone watcher does (service.Discovery), from all of them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot

from monitor import notify, protocol
from monitor.config import Settings
from monitor.logs import get_logger
from monitor.notify import NotifyState
from monitor.scanner import Observation, _lock_keys
from monitor.service import Monitor
from monitor.watcher import Progress, Watcher

log = get_logger("gpulock_monitor.cluster_watch")

SLOTS = 16384
TOPOLOGY_EVERY_S = 1.0
# What keyspace events prove about a lock's heartbeat: never claimed for a split lock.
_PROOFS = ("hb_written", "hb_tainted", "record_atomic")
# A lock's keys whose writes make the watcher read the lock again, where they are on another node.
_SIDE_KEYS = (protocol.HEARTBEAT_SUFFIX, protocol.HOLDER_SUFFIX)

# READ_SCRIPT's reply for keys named in ARGV instead of KEYS (ARGV[1] what to read of each key,
# ARGV[2] and ARGV[3] the mark's channel and message, '' for none, then the keys). Every key must
# be on this node: a key of a slot elsewhere (moved, or migrating) fails the whole read.
NODE_READ_SCRIPT = (
    protocol.EXPIRY_LUA
    + """
local t = redis.call('TIME')
local out = {t[1], t[2]}
local want = ARGV[1]
for i = 4, #ARGV do
  local v = redis.pcall('GET', ARGV[i])
  if type(v) == 'table' then
    if not string.find(tostring(v.err), 'WRONGTYPE', 1, true) then return redis.error_reply(tostring(v.err)) end
    v = 0
  end
  out[#out + 1] = v
  if string.sub(want, i - 3, i - 3) == '-' then out[#out + 1] = -3 else out[#out + 1] = expiry(ARGV[i]) end
end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return out
"""
)


@dataclass(frozen=True)
class Topology:
    """Which primary ("host:port") serves each slot, from CLUSTER SLOTS."""

    ranges: tuple[tuple[int, int, str], ...]
    addresses: tuple[tuple[str, str, int], ...]  # name, host, port

    @classmethod
    def parse(cls, reply: Sequence[Any], asked_host: str) -> Topology:
        ranges, addresses = [], {}
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            if host in ("", "?"):  # "the address you reached me at"
                host = asked_host
            port = int(primary[1])
            name = f"{host}:{port}"
            ranges.append((start, end, name))
            addresses[name] = (host, port)
        return cls(tuple(sorted(ranges)), tuple(sorted((n, h, p) for n, (h, p) in addresses.items())))

    def owners(self) -> list[str | None]:
        owner: list[str | None] = [None] * SLOTS
        for start, end, name in self.ranges:
            owner[start : end + 1] = [name] * (end - start + 1)
        return owner

    def slots_of(self, name: str) -> frozenset[tuple[int, int]]:
        return frozenset((start, end) for start, end, n in self.ranges if n == name)


def tag_for(owned: Iterable[tuple[int, int]]) -> str | None:
    """A hash tag whose slot is one of `owned` (None: no slot at all)."""
    ranges = list(owned)
    if not ranges:
        return None
    for n in itertools.count():
        slot = key_slot(str(n).encode())
        if any(start <= slot <= end for start, end in ranges):
            return str(n)
    return None  # pragma: no cover - itertools.count() does not end


def combine(states: dict[str, NotifyState]) -> NotifyState:
    """One answer for the cluster from each primary's: `on` only where every primary says on;
    otherwise the nodes that do not, by name (passes then SCAN every primary). Pure."""
    missing = "".join(c for c in "K$gx" if any(c in s.missing for s in states.values()))
    wanting = {name: s for name, s in sorted(states.items()) if not s.on}
    if not wanting:
        note = " (no expired events: deadlines are re-read, not awaited)" if "x" in missing else ""
        return NotifyState("on", missing, f"keyspace notifications on in every primary of the cluster{note}")
    said = "; ".join(f"{name}: {s.reason}" for name, s in wanting.items())
    if len(wanting) < len(states):
        said += f" (on in the {len(states) - len(wanting)} other primaries)"
    kind = "off" if len(wanting) == len(states) and all(s.state == "off" for s in wanting.values()) else "partial"
    return NotifyState(kind, missing, f"Redis Cluster: {said}")


class _NodeRead(Script):
    """READ_SCRIPT as the node watcher's read runs it (scanner.read_locks with a mark)."""

    def __init__(self, client: NodeClient) -> None:
        super().__init__(client, NODE_READ_SCRIPT)
        self.node = client

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        return self.node.cluster_watch.read(self.node, list(keys or ()), list(args or ()))


class NodeClient(redis.Redis):
    """A client of one primary alone (its own connection pool, the cluster's connection settings)."""

    def __init__(self, watch: ClusterWatcher, name: str, pool: redis.ConnectionPool) -> None:
        super().__init__(connection_pool=pool)
        self.cluster_watch = watch
        self.name = name
        self.node_script = Script(self, NODE_READ_SCRIPT)
        self.read_apart: frozenset[bytes] = frozenset()  # locks of the last read with keys read elsewhere

    def register_script(self, script: Any) -> Script:
        if script == protocol.READ_SCRIPT:
            return _NodeRead(self)
        return super().register_script(script)


class _NodeMonitor:
    """The monitor as one node's watcher sees it: that node's client; what the watcher decides
    goes to the monitor, less what events cannot prove of split locks."""

    def __init__(self, monitor: Monitor, client: NodeClient, watch: ClusterWatcher) -> None:
        self._monitor = monitor
        self._watch = watch
        self.client = client

    def run_keys(self, observations: list[Observation], *, wait_s: float | None = None) -> Any:
        # The watcher judges the observations of its last read (one at a time).
        return self._monitor.run_keys(self._watch.unproven(observations, self.client.read_apart), wait_s=wait_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._monitor, name)


class NodeWatcher(Watcher):
    """The event watcher of one primary."""

    def __init__(self, watch: ClusterWatcher, name: str, host: str, client: NodeClient, monitor: Monitor) -> None:
        self.watch = watch
        self.name = name
        self.host = host
        self.node_client = client
        proxy = cast("Monitor", _NodeMonitor(monitor, client, watch))
        super().__init__(proxy, watch.settings, db=0, on_state=lambda _state: watch.say())

    def _self_test(self) -> NotifyState:
        tag = self.watch.tag_of(self.name)
        if tag is None:
            return NotifyState("off", notify.NEEDED, "the node serves no slots")
        try:
            # The probe key in one of this node's own slots: its events are raised here.
            return notify.self_test(self.client, f"{{{tag}}}{self.id}", 0)
        except redis.exceptions.NoPermissionError as exc:  # the ACL's setting, not an outage
            return NotifyState("off", notify.NEEDED, f"the notification probe was refused: {exc}")

    def _on_message(self, message: dict[str, Any]) -> None:
        super()._on_message(message)
        if message["type"] != "pmessage":
            return
        key = message["channel"][len(self._prefix) :]
        for suffix in _SIDE_KEYS:
            if key.endswith(suffix):
                # A split lock's heartbeat or holder record, here: its lock's node reads it again
                # (never proving anything by it).
                lock = key[: -len(suffix)]
                owner = self.watch.owner_of(lock)
                if owner is not None and owner != self.name:
                    self.watch.poke(owner, lock)
                return

    def wake(self, lock: bytes) -> None:
        """Read `lock` soon, if it is indexed here (another node saw its heartbeat written)."""
        with self._mutex:
            if lock not in self._index:
                return
            self._dirty.add(lock)
        try:  # a mark no read waits for wakes the thread: it reads what is due at once
            self.client.publish(self.sync_channel, b"0")
        except redis.RedisError as exc:  # this node's trouble, not the caller's: read at its next turn
            log.debug("cluster_wake_failed", node=self.name, error=str(exc))

    def resync(self, why: str) -> None:
        """Subscribe again and reseed (the node's slots changed)."""
        self._lost(why)


class ClusterWatcher:
    """service.Discovery over every primary of a Redis Cluster; `start()`, `stop()` as Watcher."""

    def __init__(self, monitor: Monitor, settings: Settings, *, on_state: Callable[[NotifyState], None]) -> None:
        assert isinstance(monitor.client, RedisCluster)
        self.monitor = monitor
        self.cluster: RedisCluster = monitor.client
        self.settings = settings
        self.on_state = on_state
        self._mutex = threading.Lock()  # nodes and topology: the pass's, the follower's and the watchers' threads
        self._say_lock = threading.Lock()
        self._nodes: dict[str, NodeWatcher] = {}
        self._topology: Topology | None = None
        # Per slot its primary, and which locks span primaries by that map: replaced together.
        self._slots: tuple[list[str | None], dict[bytes, bool]] = ([None] * SLOTS, {})
        self._tags: dict[str, str | None] = {}
        self._retired = Progress()  # counters of the watchers of nodes gone
        self._said: NotifyState | None = None
        self._barrier = False  # the last candidates() had every node's barrier
        self._found: dict[str, list[bytes]] = {}  # each node's indexed keys, as of then
        self._split_keys: frozenset[bytes] = frozenset()  # those of split locks
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- topology ---------------------------------------------------------------------------------

    def nodes(self) -> dict[str, NodeWatcher]:
        with self._mutex:
            return dict(self._nodes)

    def _read_topology(self) -> Topology:
        """CLUSTER SLOTS from the first node that answers: ours first, then redis-py's."""
        asked: list[tuple[str, redis.Redis]] = [(w.host, w.node_client) for w in self.nodes().values()]
        asked += [(n.host, self.cluster.get_redis_connection(n)) for n in self.cluster.get_nodes()]  # type: ignore[no-untyped-call]
        error: Exception | None = None
        for host, client in asked:
            try:
                reply = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except redis.RedisError as exc:
                error = exc
                continue
            return Topology.parse(reply, host)
        raise error if error is not None else redis.ConnectionError("no cluster node to ask for its slots")

    def follow(self) -> bool:
        """Read the topology and follow it; True when it changed since the last look."""
        topology = self._read_topology()
        with self._mutex:
            before = self._topology
            if topology == before:
                return False
            self._topology = topology
            self._slots = (topology.owners(), {})
            self._tags = {}
            names = {name for name, _, _ in topology.addresses}
            gone = [w for name, w in self._nodes.items() if name not in names]
            moved = [
                w
                for name, w in self._nodes.items()
                if name in names and before is not None and before.slots_of(name) != topology.slots_of(name)
            ]
            added = [self._node(name, host, port) for name, host, port in topology.addresses if name not in self._nodes]
            for w in gone:
                del self._nodes[w.name]
                self._retire(w.progress)
            for w in added:
                self._nodes[w.name] = w
            started = self._started
            # Under the mutex: a pass that sees the new slots sees those nodes' indexes incomplete.
            for w in gone:
                w.stop(timeout_s=0)
            for w in moved:
                w.resync("the cluster's slots moved")
        if started:
            for w in added:
                w.start()
        if before is not None:
            log.warning(
                "cluster_topology_changed",
                primaries=sorted(names),
                subscribed=[w.name for w in added],
                dropped=[w.name for w in gone],
                resubscribing=[w.name for w in moved],
            )
        self.say()
        return True

    def _node(self, name: str, host: str, port: int) -> NodeWatcher:
        manager = self.cluster.nodes_manager
        base = manager.create_redis_node(host, port, **manager.connection_kwargs)  # type: ignore[no-untyped-call]
        return NodeWatcher(self, name, host, NodeClient(self, name, base.connection_pool), self.monitor)

    def _retire(self, p: Progress) -> None:
        r = self._retired
        r.events += p.events
        r.sweeps += p.sweeps
        r.found_by_reconcile += p.found_by_reconcile
        r.resubscribes += p.resubscribes

    def tag_of(self, name: str) -> str | None:
        """A hash tag in one of the node's slots (for its probe key)."""
        with self._mutex:
            if name not in self._tags:
                self._tags[name] = tag_for(self._topology.slots_of(name)) if self._topology else None
            return self._tags[name]

    def owner_of(self, key: bytes) -> str | None:
        return self._slots[0][key_slot(key)]

    def is_split(self, key: bytes) -> bool:
        """Some key a read of this lock takes is on another primary than the lock."""
        owner, known = self._slots
        split = known.get(key)
        if split is None:
            here = owner[key_slot(key)]
            split = any(owner[key_slot(k)] != here for k in _lock_keys(key)[1:])
            if len(known) > 100_000:
                known.clear()
            known[key] = split
        return split

    def poke(self, owner: str, lock: bytes) -> None:
        """`owner`'s watcher reads `lock` soon (its heartbeat was written on another node)."""
        w = self.nodes().get(owner)
        if w is not None:
            w.wake(lock)

    def unproven(
        self, observations: list[Observation], read_apart: frozenset[bytes] = frozenset()
    ) -> list[Observation]:
        """Split locks' observations, and those of locks `read_apart` (some key of theirs read on
        another node, whatever the slot map says now), without what events would prove."""
        names = {f.name for f in fields(Observation)}
        off: dict[str, Any] = {name: False for name in _PROOFS if name in names}
        return [replace(o, **off) if o.key in read_apart or self.is_split(o.key) else o for o in observations]

    # --- the node watchers' reads -------------------------------------------------------------------

    def read(self, client: NodeClient, keys: list[bytes], args: list[Any]) -> list[Any]:
        """READ_SCRIPT's reply for `keys` read through `client`'s node, with its mark there; keys of
        other nodes (a split lock's) are read first, apart, on theirs."""
        want = args[0] if isinstance(args[0], str) else args[0].decode()
        mark = [args[1], args[2]] if len(args) >= 3 else ["", ""]
        nodes = self.nodes()
        per_lock = len(protocol.READ_WANT)
        local: list[int] = []
        remote: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            owner = self.owner_of(key)
            # The lock itself is always read here, with the mark: a lock whose slot is not here
            # (any more) fails the read, and the watcher subscribes again.
            if i % per_lock == 0 or owner is None or owner == client.name or owner not in nodes:
                local.append(i)
            else:
                remote.setdefault(owner, []).append(i)
        values: list[Any] = [None] * (2 * len(keys))

        def fill(on: NodeClient, idx: list[int], end: Sequence[Any]) -> list[Any]:
            reply: list[Any] = on.node_script(args=["".join(want[i] for i in idx), *end, *(keys[i] for i in idx)])
            for j, i in enumerate(idx):
                values[2 * i : 2 * i + 2] = reply[2 + 2 * j : 4 + 2 * j]
            return reply

        client.read_apart = frozenset(keys[i - i % per_lock] for idx in remote.values() for i in idx)
        for owner, idx in remote.items():
            fill(nodes[owner].node_client, idx, ["", ""])
        reply = fill(client, local, mark)
        return [reply[0], reply[1], *values]

    # --- notifications ----------------------------------------------------------------------------

    def _combined(self) -> NotifyState | None:
        states = {name: w.progress.state for name, w in self.nodes().items()}
        if not states or any(s is None for s in states.values()):
            return None
        return combine(cast(dict[str, NotifyState], states))

    def say(self) -> None:
        """Tell `on_state` when the cluster's answer changed (every primary has answered)."""
        with self._say_lock:
            state = self._combined()
            if state is None or (
                self._said is not None and (self._said.state, self._said.reason) == (state.state, state.reason)
            ):
                return
            self._said = state
            self.on_state(state)

    def test_now(self) -> None:
        """Find the primaries and ask each, now, whether notifications are on."""
        try:
            self.follow()
        except redis.RedisError as exc:
            log.warning("notifications_unknown", error=str(exc))
            return
        for w in self.nodes().values():
            w.test_now()

    # --- service.Discovery ------------------------------------------------------------------------

    def candidates(self) -> tuple[list[bytes], bool] | None:
        """Every primary's indexed keys, and whether each index is complete; None: SCAN instead
        (the topology changed, or some primary's watcher cannot answer)."""
        self._barrier = False
        try:
            if self.follow():
                return None  # the changed nodes subscribe again: this pass SCANs
        except redis.RedisError as exc:
            log.warning("cluster_topology_unknown", error=str(exc))
            return None
        nodes = self.nodes()
        found = {name: w.candidates() for name, w in nodes.items()}  # each node's probe and barrier
        keys: dict[bytes, None] = {}
        complete = bool(nodes)
        for f in found.values():
            if f is None:
                return None
            keys.update(dict.fromkeys(f[0]))
            complete = complete and f[1]
        if not nodes:
            return None
        self._found = {name: f[0] for name, f in found.items() if f is not None}
        self._split_keys = frozenset(k for k in keys if self.is_split(k))
        self._barrier = True
        return list(keys), complete

    def _union(self, part: Callable[[NodeWatcher], frozenset[bytes]]) -> frozenset[bytes]:
        if not self._barrier:
            return frozenset()
        return frozenset().union(*(part(w) for w in self.nodes().values()))

    def changed(self) -> frozenset[bytes] | None:
        """The indexed locks that are not quiet (service.Discovery), split locks always among them
        (their heartbeat's events are another node's); None: nothing is known quiet."""
        if not self._barrier:
            return None
        parts: list[frozenset[bytes]] = [self._split_keys]
        for name, w in self.nodes().items():
            changed = getattr(w, "changed", None)
            if changed is not None:
                found = changed()
                if found is None:
                    return None
                parts.append(found)
            else:  # a watcher that says only which locks are quiet
                parts.append(frozenset(self._found.get(name, ())) - w.quiet())
        return frozenset().union(*parts)

    def quiet(self) -> frozenset[bytes]:
        """As Watcher.quiet, less split locks."""
        if not self._barrier or not all(hasattr(w, "quiet") for w in self.nodes().values()):
            return frozenset()
        return self._union(lambda w: w.quiet()) - self._split_keys

    def relocked(self) -> frozenset[bytes]:
        """As Watcher.relocked (a lock and its record share a node: its events are in order)."""
        return self._union(lambda w: w.relocked())

    def tainted(self) -> frozenset[bytes]:
        """As Watcher.tainted, less split locks."""
        return self._union(lambda w: w.tainted()) - self._split_keys

    def moved_since_barrier(self, keys: list[bytes]) -> frozenset[bytes] | None:
        """As Watcher.moved_since_barrier, asked of each key's primary (its events are in order there)."""
        if not self._barrier:
            return frozenset()
        nodes = self.nodes()
        by_node: dict[str, list[bytes]] = {}
        for key in keys:
            owner = self.owner_of(key)
            if owner not in nodes:
                return None  # the topology moved under the pass: nothing is known of this key
            by_node.setdefault(owner, []).append(key)
        moved: set[bytes] = set()
        for name, part in by_node.items():
            found = nodes[name].moved_since_barrier(part)
            if found is None:
                return None
            moved |= found
        return frozenset(moved)

    def read_by_pass(self, keys: list[bytes]) -> None:
        nodes = self.nodes()
        by_node: dict[str, list[bytes]] = {}
        for key in keys:
            owner = self.owner_of(key)
            if owner in nodes:
                by_node.setdefault(owner, []).append(key)
        for name, part in by_node.items():
            nodes[name].read_by_pass(part)

    def forget_absent(self, absent: list[bytes]) -> None:
        for w in self.nodes().values():
            w.forget_absent(absent)

    # --- progress, start, stop ----------------------------------------------------------------------

    @property
    def progress(self) -> Progress:
        """Every primary's watcher together (counters include nodes since gone)."""
        nodes = list(self.nodes().values())
        parts = [w.progress for w in nodes]
        r = self._retired
        return Progress(
            state=self._combined(),
            events=r.events + sum(p.events for p in parts),
            index_size=sum(p.index_size for p in parts),
            sweeps=r.sweeps + sum(p.sweeps for p in parts),
            sweep_keys=sum(p.sweep_keys for p in parts),
            found_by_reconcile=r.found_by_reconcile + sum(p.found_by_reconcile for p in parts),
            resubscribes=r.resubscribes + sum(p.resubscribes for p in parts),
            complete=bool(parts) and all(p.complete for p in parts),
        )

    def start(self) -> None:
        with self._mutex:
            self._started = True
            nodes = list(self._nodes.values())
        for w in nodes:
            w.start()
        self._thread = threading.Thread(target=self._follow_loop, name="cluster-topology", daemon=True)
        self._thread.start()

    def _follow_loop(self) -> None:
        while not self._stop.wait(TOPOLOGY_EVERY_S):
            try:
                self.follow()
            except redis.RedisError as exc:
                log.debug("cluster_topology_unknown", error=str(exc))
            except Exception:  # a bug here must not end following the topology
                log.exception("cluster_topology_failed")

    def wait_complete(self, timeout_s: float) -> bool:
        """Until every primary's index is complete, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        for w in self.nodes().values():
            if not w.wait_complete(max(0.0, deadline - time.monotonic())):
                return False
        return bool(self.nodes())

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for w in self.nodes().values():
            w.stop(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)


__all__ = ["NODE_READ_SCRIPT", "ClusterWatcher", "NodeWatcher", "Topology", "combine"]
