"""The event-driven core (DESIGN.md section 6): an index of lock keys kept by keyspace
notifications, and each lock re-read at its next deadline instead of at the next pass.

One thread owns a PubSub connection. It subscribes to the keyspace events of the lock pattern, then
seeds the index with one SCAN (a lock present before the subscription is found by the SCAN, one
created after it by its event). A paced background SCAN (`discovery.reconcile_keys_per_s`)
reconciles the index; a resubscription starts a sweep at once and the index counts as complete
again only when that sweep has ended.

Each read names itself on a channel of our own at its end (READ_SCRIPT's mark): Redis delivers
that message after every keyspace event raised before the read. So when the mark arrives the
thread knows exactly which events preceded the read, and a heartbeat write that came after the
lock's last change and before the read proves the heartbeat belongs to the holding read (DESIGN.md
section 3): a worker that dies in its first seconds is `dead` at its heartbeat's expiry, not `none`.

Each lock's next deadline (its heartbeat's expiry, the heartbeat going stale, the next tier) is
scheduled on this thread's clock and the lock re-read right then: Redis emits `expired` only when
it evicts a key, which can lag by minutes, and a read of an expired key evicts it.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import redis

from monitor import notify, protocol, units
from monitor.config import Settings
from monitor.logs import get_logger
from monitor.manual import redis_match
from monitor.notify import NotifyState
from monitor.scanner import READ_BATCH, SCAN_COUNT, Observation, read_locks
from monitor.service import Monitor
from monitor.verdict import next_deadline_ms

log = get_logger("gpulock_monitor.watcher")

# Events after which the key no longer exists.
_GONE = frozenset({b"del", b"expired", b"evicted", b"rename_from", b"move_from", b"unlink"})
# Heartbeat events that are a write by its holder (DESIGN.md section 3: an EXPIRE alone counts).
_HB_WRITES = frozenset({b"set", b"expire", b"pexpire", b"setex", b"psetex", b"rename_to", b"restore", b"copy_to"})
MARK_WAIT_S = 2.0  # a read's mark, or a pass's barrier, that takes longer means the subscription is broken
# How long an event read waits for a pass in progress before it reads again after it.
PASS_WAIT_S = 0.005
# A heartbeat is taken for gone this long after its expiry as read (the read's latency, clocks).
HB_GONE_MARGIN_S = 0.1
RECONCILE_COUNT = 1000
MAX_BACKOFF_S = 5.0


class SubscriptionLostError(redis.ConnectionError):
    """A mark did not come back: the subscription is broken (control flow: resubscribe)."""


@dataclass
class Progress:
    """What the watcher has done, for metrics, status and health."""

    state: NotifyState | None = None
    events: int = 0
    index_size: int = 0
    sweeps: int = 0  # reconcile sweeps ended
    sweep_keys: int = 0  # keys examined by the sweep under way
    found_by_reconcile: int = 0  # locks the events had not announced (a gap, or notifications off then)
    resubscribes: int = 0
    complete: bool = False


class _Key:
    """What this subscription's events and reads told of one lock key: positions in the event
    stream (each default is what nothing told). One object per key, holding the one copy of the key
    every set and heap of the watcher uses (10,000 locks were seven dicts and as many copies)."""

    __slots__ = (
        "deadline",
        "hb_at_set",
        "hb_gone_at",
        "hb_pos",
        "hb_present",
        "hb_written_pos",
        "holder_pos",
        "index_pos",
        "key",
        "lock_pos",
        "read_pos",
    )

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.index_pos: int | None = None  # in the index since the event at this position (0: a SCAN)
        self.lock_pos: int | None = None  # the lock's last event
        self.hb_pos = 0  # any event of the heartbeat key
        # Any event of the holder record (a progress mark): the lock is read again, never judged by it.
        self.holder_pos = 0
        self.hb_written_pos = 0  # a write of the heartbeat (what proves it the holding's)
        self.read_pos = -1  # the last read of the lock saw every event up to here
        self.hb_present = False  # its heartbeat key exists, as far as events and reads tell
        # When it is gone for sure (this thread's monotonic clock): its expiry as last read, where no
        # write came since. Redis raises `expired` only when it evicts a key, which may lag by minutes.
        self.hb_gone_at: float | None = None
        self.hb_at_set = True  # whether it existed when the lock last changed
        self.deadline: float | None = None  # when to read it again (this thread's monotonic clock)

    def forget(self) -> None:
        """What only an unbroken subscription proves (its index membership stays)."""
        self.lock_pos = self.deadline = None
        self.hb_pos = self.holder_pos = self.hb_written_pos = 0
        self.read_pos = -1
        self.hb_present = False
        self.hb_gone_at = None
        self.hb_at_set = True


class Watcher:
    """Start with `start()`; the pass asks `candidates()`; `stop()` ends the thread."""

    def __init__(
        self, monitor: Monitor, settings: Settings, *, db: int, on_state: Callable[[NotifyState], None]
    ) -> None:
        self.monitor = monitor
        # Standalone or Sentinel only: in a cluster each primary raises its own events (daemon.start_watcher).
        assert isinstance(monitor.client, redis.Redis)
        self.client: redis.Redis = monitor.client
        self.settings = settings
        self.db = db
        self.on_state = on_state
        self.id = secrets.token_hex(6)
        self.sync_channel = protocol.keyspace_channel(db, protocol.MONITOR_PREFIX + f"sync:{self.id}".encode())
        self._prefix = protocol.keyspace_channel(db, b"")
        self.progress = Progress()
        self._mutex = threading.Lock()  # the index and the barriers: shared with the pass's thread
        self._index: dict[bytes, _Key] = {}  # the indexed keys (`_Key.index_pos`: when each was taken)
        self._barriers: dict[int, threading.Event] = {}
        self._after_reads: dict[int, threading.Event] = {}  # marks that end a pass's reads
        self._marks = itertools.count(1)
        self._stop = threading.Event()
        self._resubscribe = threading.Event()  # set by a pass that found the subscription wanting
        self._complete = threading.Event()  # progress.complete, to wait on
        self._seed_read = threading.Event()  # this thread has read what its last SCAN seeded
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget what only an unbroken subscription proves."""
        self._seq = 0
        self._seed: set[bytes] = set()  # keys the SCAN seeded that this thread has not read yet
        self._seed_read.clear()
        # Every key this subscription's events or reads told something of (indexed or not).
        self._keys: dict[bytes, _Key] = {}
        for key, st in self._index.items():
            st.forget()
            self._keys[key] = st
        self._relocked: frozenset[bytes] = frozenset()  # as of the last pass's barrier
        self._tainted: frozenset[bytes] = frozenset()  # as of the last pass's barrier
        self._pass_seq = -1  # the position of the last pass's barrier in this subscription
        # Kept as events and reads come (`_touch`), so that a pass's barrier costs what changed, not
        # every lock: indexed locks some event named since their last read (or never read) ...
        self._unread: set[bytes] = set(self._index)
        # ... and those whose holding began, while this subscription watched, with a heartbeat there.
        self._beaten: set[bytes] = set()
        self._changed: frozenset[bytes] | None = None  # _unread as of the last pass's barrier
        self._added: set[bytes] = set()  # keys the index took since that barrier
        self._pass_keys: list[bytes] = []  # what the last candidates() answered
        self._dirty: set[bytes] = set()
        self._deadlines: list[tuple[float, bytes]] = []  # (deadline, key), and some a later read replaced
        self._deadline_count = 0  # keys with a deadline
        self._pending: tuple[int, int, float, list[Observation]] | None = None  # mark, seq, sent, read
        self._cursor = 0
        self._sweep_started: float | None = None
        self._next_step = 0.0

    # --- the pass's side ----------------------------------------------------------------------

    def candidates(self) -> tuple[list[bytes], bool] | None:
        """The indexed keys, and whether they are every lock present now; None: SCAN instead.

        Asks whether notifications are still on (one probe), then waits until the watcher has
        read every event raised before this call (a mark through the subscription)."""
        with self._mutex:
            self._forget_barrier()  # only this pass's barrier says them
        if not self.progress.complete:
            return None
        try:
            state = self._self_test()
        except redis.RedisError as exc:  # not an answer about notifications: this pass SCANs
            log.warning("notification_probe_failed", error=str(exc))
            return None
        if not state.on:
            self._set_state(state)
            self._lost("keyspace notifications are not on any more")
            return None
        n = next(self._marks)
        arrived = threading.Event()
        with self._mutex:
            self._barriers[n] = arrived
        self.client.publish(self.sync_channel, str(n))
        if not arrived.wait(MARK_WAIT_S):
            with self._mutex:
                self._barriers.pop(n, None)
            self._lost("the pass's mark did not come back through the subscription")
            return None
        with self._mutex:
            if not self.progress.complete or self._changed is None:
                self._forget_barrier()
                return None
            # A key the index took after the barrier is not known quiet.
            self._changed = self._changed | self._added if self._added else self._changed
            self._pass_keys = list(self._index)
            return self._pass_keys, True

    def moved_since_barrier(self, keys: list[bytes]) -> frozenset[bytes] | None:
        """After the pass read `keys`: those whose lock some event changed after the pass's barrier.
        Their reads may show a holding that began after it, which the barrier's proofs (relocked,
        tainted, a heartbeat written) do not describe: the pass must not judge them (the watcher
        reads them itself, with their proofs). None: it cannot tell (judge none of them)."""
        with self._mutex:
            if not keys or self._changed is None:
                return frozenset()  # no barrier this pass: it judges without the events' proofs
        n = next(self._marks)
        arrived = threading.Event()
        with self._mutex:
            self._after_reads[n] = arrived
        try:
            self.client.publish(self.sync_channel, str(n))
        except redis.RedisError:
            with self._mutex:
                self._after_reads.pop(n, None)
            raise
        if not arrived.wait(MARK_WAIT_S):
            with self._mutex:
                self._after_reads.pop(n, None)
            self._lost("the mark after a pass's reads did not come back through the subscription")
            return None
        with self._mutex:
            if not self.progress.complete or self._pass_seq < 0 or self._changed is None:
                return None  # resubscribed meanwhile: nothing is known of what came between
            since = self._pass_seq
            found = self._keys
            return frozenset(
                k for k in keys if (st := found.get(k)) is not None and st.lock_pos is not None and st.lock_pos > since
            )

    def _forget_barrier(self) -> None:
        self._changed = None
        self._relocked = self._tainted = frozenset()
        self._pass_keys = []

    def _lost(self, why: str) -> None:
        """The index may be missing events: passes SCAN until the thread has subscribed again."""
        with self._mutex:
            self.progress.complete = False
            self._complete.clear()
            self._forget_barrier()
        self._resubscribe.set()
        log.warning("watcher_resubscribing", reason=why)

    def relocked(self) -> frozenset[bytes]:
        """Locks some event changed since they were last read, as of the last `candidates()`."""
        return self._relocked

    def tainted(self) -> frozenset[bytes]:
        """Locks whose holding began with a heartbeat key there, as of the last `candidates()`."""
        return self._tainted

    def changed(self) -> frozenset[bytes] | None:
        """The indexed locks that are not quiet, as of the last `candidates()`: some event named
        them since they were last read, or they were never read. Every other lock it answered is as
        its last read saw it (the pass need not read it again before a deadline). None: no barrier
        came back, none is known quiet."""
        return self._changed

    def quiet(self) -> frozenset[bytes]:
        """Locks no event named since they were last read, as of the last `candidates()` (what
        `changed()` says the other way round; it costs every lock)."""
        changed = self._changed
        if changed is None:
            return frozenset()
        return frozenset(key for key in self._pass_keys if key not in changed)

    def read_by_pass(self, keys: list[bytes]) -> None:
        """The pass read these after its barrier: they saw every event up to it."""
        with self._mutex:
            if self._pass_seq < 0:
                return  # resubscribed since the barrier: what the read saw may predate a gap
            for key in keys:
                st = self._state(key)
                st.read_pos = self._pass_seq
                self._touch(st)

    def forget_absent(self, absent: list[bytes]) -> None:
        """Keys a pass found gone: out of the index unless an event came for them since."""
        with self._mutex:
            for key in absent:
                st = self._index.get(key)
                if st is None:
                    self._unread.discard(key)
                    self._beaten.discard(key)
                elif st.index_pos is not None and st.index_pos <= self._pass_seq:
                    self._unindex(st)
                    self._touch(st)

    def _state(self, key: bytes) -> _Key:
        """What is known of `key`, made empty when nothing is (under the mutex, or on this thread)."""
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _Key(key)
        return st

    def _touch(self, st: _Key) -> None:
        """Whether the key is unread and whether its holding began beaten, after what just changed
        of it (under the mutex)."""
        key = st.key
        if st.index_pos is not None:
            lock_pos = st.lock_pos
            changed = max(0 if lock_pos is None else lock_pos, st.hb_pos, st.holder_pos)
            if changed > st.read_pos:
                self._unread.add(key)
            else:
                self._unread.discard(key)
            if lock_pos is not None and st.hb_at_set:  # its holding began beaten (_began_beaten)
                self._beaten.add(key)
            else:
                self._beaten.discard(key)
        else:
            self._unread.discard(key)
            self._beaten.discard(key)

    def _take(self, st: _Key, seq: int) -> None:
        """The index takes the key (at this event position; 0: found by a SCAN)."""
        if st.index_pos is None:
            self._added.add(st.key)
            self._index[st.key] = st
        st.index_pos = seq
        self._touch(st)

    def _unindex(self, st: _Key) -> None:
        self._index.pop(st.key, None)
        st.index_pos = None
        self._seeded_read((st.key,))  # out of the index: not to be read

    def _seeded_read(self, keys: Iterable[bytes]) -> None:
        """These seeded keys need no read any more (under the mutex)."""
        if self._seed_read.is_set():
            return
        self._seed.difference_update(keys)
        if not self._seed:
            self._seed = set()
            self._seed_read.set()

    # --- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-watcher", daemon=True)
        self._thread.start()

    def wait_complete(self, timeout_s: float) -> bool:
        """Until the index holds every lock (subscribed and seeded), and then until this thread has
        read and judged the locks its SCAN found, at most `timeout_s` in all; whether the index is
        complete. A first pass that begins then carries what this thread judged rather than read and
        judge every lock a second time beside it (at 10,000 locks that left some 3 MiB more RSS)."""
        deadline = time.monotonic() + timeout_s
        if not self._complete.wait(timeout_s):
            return False
        self._seed_read.wait(max(0.0, deadline - time.monotonic()))
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            subscriptions = self.progress.resubscribes
            try:
                self._session()
                backoff = 0.1
            except redis.RedisError as exc:
                if self.progress.resubscribes != subscriptions:
                    backoff = 0.1  # this session had subscribed: a new outage, not the same one again
                with self._mutex:
                    self.progress.complete = False
                    self._complete.clear()
                    for barrier in self._barriers.values():
                        barrier.set()  # the pass goes on, its index not complete
                    self._barriers.clear()
                    for mark in self._after_reads.values():
                        mark.set()  # and learns that nothing is known (complete is False)
                    self._after_reads.clear()
                log.warning("watcher_interrupted", error=str(exc), retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except Exception:  # a bug here must not end event handling for good; passes go on regardless
                log.exception("watcher_failed")
                with self._mutex:
                    self.progress.complete = False
                    self._complete.clear()
                self._stop.wait(MAX_BACKOFF_S)

    def test_now(self) -> None:
        """Ask once, now, whether notifications are on (the thread asks again when it starts)."""
        try:
            self._set_state(self._self_test())
        except redis.RedisError as exc:
            log.warning("notifications_unknown", error=str(exc))

    def _self_test(self) -> NotifyState:
        try:
            return notify.self_test(self.client, self.id, self.db)
        except redis.exceptions.NoPermissionError as exc:  # the ACL's setting, not an outage
            return NotifyState("off", notify.NEEDED, f"the notification probe was refused: {exc}")

    def _set_state(self, state: NotifyState) -> None:
        before = self.progress.state
        self.progress.state = state
        if before is None or before.state != state.state:
            self.on_state(state)

    def _session(self) -> None:
        state = self._self_test()
        if not state.on and self.settings.configure_notifications:
            notify.configure(self.client)
            state = self._self_test()
        self._set_state(state)
        if not state.on:
            # Passes SCAN; ask again now and then, and switch over when the operator turns them on.
            self._stop.wait(max(self.settings.monitor_interval_s, 1.0))
            return
        pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        try:
            self._subscribe(pubsub)
            self._loop(pubsub)
        finally:
            pubsub.close()
            with self._mutex:
                self.progress.complete = False
                self._complete.clear()

    def _subscribe(self, pubsub: Any) -> None:
        pattern = self.settings.key_pattern.encode()
        pubsub.psubscribe(protocol.keyspace_channel(self.db, pattern))
        pubsub.subscribe(self.sync_channel)
        confirmed, deadline = 0, time.monotonic() + MARK_WAIT_S
        while confirmed < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SubscriptionLostError("no confirmation of the keyspace subscription")
            message = pubsub.get_message(timeout=left)
            if message is not None and message["type"] in ("subscribe", "psubscribe"):
                confirmed += 1
        with self._mutex:
            self._reset()
            self.progress.resubscribes += 1
        # Subscribed first: a lock present before the SCAN is found by it, a later one by its event;
        # so is a heartbeat key (whether one exists when a lock is set decides what proves it ours).
        seeded, beating = [], set()
        for key in self.client.scan_iter(match=self.settings.key_pattern, count=SCAN_COUNT):
            if key.endswith(protocol.HEARTBEAT_SUFFIX):
                beating.add(key[: -len(protocol.HEARTBEAT_SUFFIX)])
            elif protocol.is_lock_candidate(key):
                seeded.append(key)
        seeded = list(dict.fromkeys(seeded))
        with self._mutex:
            for lock in beating:
                self._state(lock).hb_present = True
            for key in seeded:
                if key not in self._index:
                    self._take(self._state(key), 0)
                self._dirty.add(self._index[key].key)
            self._seed = set(self._dirty)
            self._seeded_read(())
            self.progress.index_size = len(self._index)
            self.progress.complete = True
            self._complete.set()
        self._next_step = time.monotonic()
        log.info("watcher_subscribed", locks=len(seeded), state=self.progress.state and self.progress.state.reason)

    def _loop(self, pubsub: Any) -> None:
        while not self._stop.is_set():
            if self._resubscribe.is_set():
                self._resubscribe.clear()
                raise SubscriptionLostError("resubscribing, as a pass asked")
            message = pubsub.get_message(timeout=self._wait_s())
            while message is not None:
                self._on_message(message)
                message = pubsub.get_message(timeout=0.0)
            now = time.monotonic()
            if self._pending is not None and now - self._pending[2] > MARK_WAIT_S:
                raise SubscriptionLostError("a read's mark did not come back")
            self._due(now)
            self._reconcile_step(now)
            self._read_dirty()

    def _wait_s(self) -> float:
        if self._dirty and self._pending is None:
            return 0.0
        nxt = min(self._deadlines[0][0] if self._deadlines else float("inf"), self._next_step)
        return max(0.0, min(0.5, nxt - time.monotonic()))

    # --- events -----------------------------------------------------------------------------------

    def _on_message(self, message: dict[str, Any]) -> None:
        if message["type"] not in ("message", "pmessage"):
            return  # (un)subscribe confirmations
        channel, data = message["channel"], message["data"]
        self._seq += 1
        self.progress.events += 1
        if channel == self.sync_channel:
            self._on_mark(int(data))
            return
        if not channel.startswith(self._prefix):
            return
        key = channel[len(self._prefix) :]
        if key.endswith(protocol.HEARTBEAT_SUFFIX):
            lock = key[: -len(protocol.HEARTBEAT_SUFFIX)]
            with self._mutex:
                st = self._state(lock)
                st.hb_pos = self._seq
                if data in _HB_WRITES:
                    st.hb_written_pos = self._seq
                    st.hb_present = True
                    st.hb_gone_at = None  # its new expiry is not known until a read
                elif data in _GONE:
                    st.hb_written_pos = 0
                    st.hb_present = False
                self._touch(st)
            if st.index_pos is not None:
                self._dirty.add(st.key)
            return
        if key.endswith(protocol.HOLDER_SUFFIX):
            # The holder record changed (a progress mark): the next pass reads the lock again rather
            # than carry it, so the hang findings never judge a stale record. Not read at once: a
            # work loop may mark progress many times a second, and a new holding's record comes with
            # its lock's own event.
            lock = key[: -len(protocol.HOLDER_SUFFIX)]
            with self._mutex:
                st = self._state(lock)
                st.holder_pos = self._seq
                self._touch(st)
            return
        if not protocol.is_lock_candidate(key):
            return
        with self._mutex:
            st = self._state(key)
            st.lock_pos = self._seq
            if data in _GONE:
                self._unindex(st)
                self._dirty.discard(key)
                self._set_deadline(st, None)
                st.hb_pos = st.holder_pos = 0  # what is kept per lock ends with it
                st.read_pos = -1
                st.hb_at_set = True
                self._touch(st)
            else:
                # A heartbeat there now may be an earlier holder's, and its writer may beat once more;
                # one whose last known expiry has passed with no write since is gone, event or not.
                gone = st.hb_gone_at is not None and time.monotonic() > st.hb_gone_at
                st.hb_at_set = (st.hb_present and not gone) or not self._covers_heartbeat(key)
                self._take(st, self._seq)
                self._dirty.add(st.key)
            self.progress.index_size = len(self._index)

    def _on_mark(self, n: int) -> None:
        with self._mutex:
            after_reads = self._after_reads.pop(n, None)
            barrier = None if after_reads is not None else self._barriers.pop(n, None)
        if after_reads is not None:
            after_reads.set()  # every event raised before the pass's reads ended is in
            return
        with self._mutex:
            if barrier is not None:
                # Every event raised before the pass's barrier is in: which locks changed since read.
                self._pass_seq = self._seq
                self._changed = frozenset(self._unread)
                self._relocked = frozenset(key for key in self._unread if self._was_relocked(self._keys.get(key)))
                if not self._unread:
                    self._unread = set()  # a set keeps its largest table: let an emptied one go
                self._tainted = frozenset(self._beaten)
                self._added = set()
        if barrier is not None:
            barrier.set()
            return
        if self._pending is None or self._pending[0] != n:
            return  # a mark of a read given up on
        _, sent_seq, _, observations = self._pending
        self._pending = None
        with self._mutex:
            proven = [self._proven(o) if o.value is not None else o for o in observations]
        valid = [o for o in proven if o.invalid is None and o.value is not None]
        read_mono = time.monotonic()
        # Never wait long on a pass: it may itself be waiting for this thread to take in its mark
        # (Monitor._moved). What a pass held up is read again once it is done.
        verdicts = self.monitor.run_keys(valid, wait_s=PASS_WAIT_S)
        if verdicts is None:
            with self._mutex:
                self._dirty.update(o.key for o in observations if o.key in self._index)
            return
        with self._mutex:
            for obs in proven:
                st = self._state(obs.key)
                st.read_pos = self._seq
                st.hb_present = obs.hb_value is not None
                st.hb_gone_at = (
                    read_mono + units.to_s(obs.hb_expiry_ms - obs.now_ms) + HB_GONE_MARGIN_S
                    if obs.hb_value is not None and obs.hb_expiry_ms >= 0 and st.hb_pos <= sent_seq
                    else None
                )
                if obs.value is None and obs.invalid is None and st.index_pos is not None and st.index_pos <= sent_seq:
                    self._unindex(st)
                self._touch(st)
            self._seeded_read(o.key for o in proven)
            self.progress.index_size = len(self._index)
        for obs in proven:
            self._set_deadline(self._state(obs.key), None)
        for verdict in verdicts:
            due = next_deadline_ms(verdict, self.settings)
            if due is not None:
                at = read_mono + units.to_s(due - verdict.holding.now_ms)
                st = self._state(verdict.holding.key)
                self._set_deadline(st, at)
                heapq.heappush(self._deadlines, (at, st.key))
        if len(self._deadlines) > 2 * self._deadline_count + 1024:
            # Entries a later read replaced stay in the heap until their time: drop them now and then.
            self._deadlines = [(st.deadline, st.key) for st in self._keys.values() if st.deadline is not None]
            heapq.heapify(self._deadlines)

    def _set_deadline(self, st: _Key, at: float | None) -> None:
        self._deadline_count += (at is not None) - (st.deadline is not None)
        st.deadline = at

    def _proven(self, obs: Observation) -> Observation:
        """The read with what the events prove of it (a copy only where they prove something)."""
        st = self._keys.get(obs.key)
        written, relocked, tainted = self._hb_written(st), self._was_relocked(st), self._began_beaten(st)
        if written or relocked or tainted:
            return replace(obs, hb_written=written, relocked=relocked, hb_tainted=tainted)
        return obs

    def _hb_written(self, st: _Key | None) -> bool:
        """Events prove a heartbeat write of this holding: the lock changed while this subscription
        watched, no heartbeat key was there then, and one was written after (before the read's mark).
        A heartbeat there at the lock's change may be an earlier holder's, whose writer may beat
        once more after the new holder's SET: then nothing is proven by events."""
        if st is None or st.lock_pos is None or st.hb_at_set:
            return False
        return st.hb_written_pos > st.lock_pos

    @staticmethod
    def _began_beaten(st: _Key | None) -> bool:
        """The lock's holding began, while this subscription watched, with a heartbeat key there."""
        return st is not None and st.lock_pos is not None and st.hb_at_set

    @staticmethod
    def _was_relocked(st: _Key | None) -> bool:
        """Some event changed the lock since this subscription's last read of it (a lock without a
        TTL set again with the same value is a new holding that polling could not tell apart)."""
        return st is not None and st.lock_pos is not None and st.lock_pos > st.read_pos

    def _covers_heartbeat(self, key: bytes) -> bool:
        """Whether the subscription pattern also names `key`'s heartbeat (else its events never come)."""
        return redis_match(self.settings.key_pattern.encode(), protocol.heartbeat_key(key))

    # --- reads, deadlines, reconcile --------------------------------------------------------------

    def _due(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            at, key = heapq.heappop(self._deadlines)
            st = self._keys.get(key)
            if st is not None and st.deadline == at:
                self._set_deadline(st, None)
                self._dirty.add(key)

    def _read_dirty(self) -> None:
        if self._pending is not None or not self._dirty:
            return
        with self._mutex:
            batch = list(itertools.islice(self._dirty, READ_BATCH))
            self._dirty.difference_update(batch)  # exactly those read: the rest stay due
            if not self._dirty:
                self._dirty = set()  # a set keeps its largest table: let an emptied one go
            keys = [st.key for k in batch if (st := self._index.get(k)) is not None]
            if len(keys) < len(batch):
                self._seeded_read(k for k in batch if k not in self._index)
        if not keys:
            return
        n = next(self._marks)
        self._pending = (n, self._seq, time.monotonic(), [])
        observations = read_locks(self.client, keys, mark=(self.sync_channel, str(n).encode()))
        self._pending = (n, self._seq, self._pending[2], observations)

    def _reconcile_step(self, now: float) -> None:
        if now < self._next_step:
            return
        if self._cursor == 0:
            self._sweep_started = now
            self.progress.sweep_keys = 0
        cursor, found = self.client.scan(self._cursor, match=self.settings.key_pattern, count=RECONCILE_COUNT)
        keys = [k for k in found if isinstance(k, bytes)]
        self._cursor = int(cursor)
        self.progress.sweep_keys += RECONCILE_COUNT
        with self._mutex:
            for key in keys:
                if protocol.is_lock_candidate(key) and key not in self._index:
                    self._take(self._state(key), 0)
                    self._dirty.add(key)
                    self.progress.found_by_reconcile += 1
            self.progress.index_size = len(self._index)
        pace_s = max(0.05, RECONCILE_COUNT / self.settings.reconcile_keys_per_s)
        self._next_step = now + pace_s
        if self._cursor == 0:
            self.progress.sweeps += 1
            started = self._sweep_started if self._sweep_started is not None else now
            # A small keyspace is swept once an interval, not hundreds of times a second.
            self._next_step = max(self._next_step, started + self.settings.monitor_interval_s)


__all__ = ["SCAN_COUNT", "Progress", "Watcher"]
