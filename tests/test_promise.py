"""Never release a live holder: passes under injected interleavings and faults, on a real Redis.

Each test forces the timing a real fleet produces now and then: a daemon paused between its read
and its release, a reply lost on the network, replicas with other settings taking turns.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import pytest
from helpers import beat, build, events, hold, make_settings, next_message, subscribed, wait_for
from proxy import ReplyDroppingProxy

from monitor import logs, protocol
from monitor.connection import connect
from monitor.errors import ReleaseError
from monitor.holding import Record
from monitor.protocol import RELEASE_SCRIPT, HeartbeatCheck, Outcome
from monitor.reaper import Reaper
from monitor.scanner import read_locks


def test_daemon_paused_between_read_and_release_spares_a_same_value_reacquire(r, settings):
    # The zombie is read, then (while the daemon is paused) its worker's successor, a run of the
    # same task, takes the lock with the same value. The release must find a new holding.
    key = hold(r, 0, "tts", age_s=450)  # past soft_timeout, no heartbeat: to be released
    monitor = build(settings)
    release = monitor.reaper.release

    def paused_then_release(*args, **kwargs):
        r.delete(key)
        r.set(key, b"locked_by_tts", ex=600)
        return release(*args, **kwargs)

    monitor.reaper.release = paused_then_release  # type: ignore[method-assign]
    report = monitor.run_pass()
    assert report is not None
    assert report.error is None
    monitor.reaper.release = release  # type: ignore[method-assign]
    assert r.get(key) == b"locked_by_tts"
    (skipped,) = events(settings.audit_path, "release_skipped")
    assert skipped["outcome"] == "holder_changed"
    assert monitor.run_pass().error is None  # the new holding is young: kept
    assert r.get(key) == b"locked_by_tts"
    assert events(settings.audit_path, "lock_released") == []


def test_lost_release_reply_is_unknown_then_settled_once(r, redis_server, tmp_path):
    with ReplyDroppingProxy(redis_server.port) as proxy:
        settings = make_settings(proxy.url, tmp_path)
        key = hold(r, 0, "tts", age_s=450)
        r.script_load(RELEASE_SCRIPT)  # so the EVALSHA whose reply is lost really runs
        with subscribed(r, protocol.release_channel(key)) as pubsub:
            monitor = build(settings, connect(settings))
            proxy.drop_reply_to(hashlib.sha1(RELEASE_SCRIPT.encode(), usedforsecurity=False).hexdigest().encode())
            first = monitor.run_pass()
            assert proxy.dropped.is_set()
            assert first is not None
            assert first.error is not None
            assert not r.exists(key)  # it ran: the lock is gone though the reply never came
            (unknown,) = events(settings.audit_path, "lock_released")
            assert unknown["outcome"] == "unknown"
            assert "settles" not in unknown
            assert events(settings.audit_path, "release_failed") == []
            second = monitor.run_pass()
            assert second is not None
            assert second.error is None
            _, released = events(settings.audit_path, "lock_released")
            assert (released["outcome"], released["settles"]) == ("released", "unknown")
            assert events(settings.audit_path, "release_skipped") == []
            assert next_message(pubsub, 5) is not None
            assert pubsub.get_message(timeout=0.2) is None  # announced once


def test_replicas_with_other_settings_share_one_record_and_one_warning(r, redis_server, tmp_path):
    # An acting monitor, a dry-run replica and an acting replica with another lock_timeout take
    # turns over a long task with a live heartbeat; then the worker dies.
    acting = build(make_settings(redis_server.url, tmp_path / "a"))
    # The dry run's lock_timeout is too long (it would release; it may not); the other acting
    # replica's is shorter than the workers' EX (a weaker but true lower bound).
    dry = build(make_settings(redis_server.url, tmp_path / "b", gpu_lock={"lock_timeout": 900}), dry_run=True)
    other = build(make_settings(redis_server.url, tmp_path / "c", gpu_lock={"lock_timeout": 450}))
    for path in ("a", "b", "c"):
        (tmp_path / path).mkdir(exist_ok=True)
    key = hold(r, 0, "tts", age_s=350)  # past warning (300), heartbeat alive
    beat(r, key)
    record_key = protocol.holding_key(key)
    for _ in range(5):
        assert acting.run_pass().error is None
        stored = r.get(record_key)
        assert dry.run_pass().error is None
        assert r.get(record_key) == stored  # a dry run writes nothing
        assert other.run_pass().error is None
        beat(r, key)  # the worker's next beat
    record = Record.loads(r.get(record_key))
    assert record is not None
    warnings = [e for d in ("a", "c") for e in events(tmp_path / d / "audit.jsonl", "lock_warning")]
    assert len(warnings) == 1  # one holding, one warning, whichever acting replica said it
    assert len({e["holding"] for e in warnings}) == 1
    assert len(events(tmp_path / "b" / "audit.jsonl", "lock_released")) == 1  # its own, in dry run
    assert r.exists(key)
    r.delete(key + b":heartbeat")  # the worker is killed: its heartbeat is gone
    assert acting.run_pass().error is None
    (released,) = events(tmp_path / "a" / "audit.jsonl", "lock_released")
    assert released["reason"] == "heartbeat_dead"
    assert not r.exists(key)


def test_acting_monitor_never_resurrects_a_released_record(r, redis_server, tmp_path):
    # Replica A (long tiers) reads the lock and keeps it; before A writes its record back, replica
    # B (short tiers) releases it. A's compare-and-set finds the holding gone and writes nothing:
    # the release mark stays.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build(make_settings(redis_server.url, tmp_path / "a"))
    b = build(
        make_settings(
            redis_server.url,
            tmp_path / "b",
            gpu_lock_monitor={"timeout_levels": {"warning": 10, "soft_timeout": 20, "hard_timeout": 30}},
        )
    )
    key = hold(r, 0, "tts", age_s=100)
    act = a._act

    def b_releases_first(verdict, report):
        assert b.run_pass().error is None
        return act(verdict, report)

    a._act = b_releases_first  # type: ignore[method-assign]
    assert a.run_pass().error is None
    assert not r.exists(key)
    assert len(events(tmp_path / "b" / "audit.jsonl", "lock_released")) == 1
    assert r.get(protocol.holding_key(key)) == b"-released"  # not a record brought back


@pytest.mark.parametrize("lock_timeout", [20, 60])
def test_mismatch_is_audited_once_and_shown_by_config_check(r, redis_server, tmp_path, lock_timeout):
    from click.testing import CliRunner

    from monitor.cli import main

    settings = make_settings(redis_server.url, tmp_path, gpu_lock={"lock_timeout": lock_timeout})
    monitor = build(settings)
    assert monitor.run_pass().error is None  # complete, no lock
    r.set(b"gpu_lock:0", b"locked_by_tts", ex=5)  # a worker with a shorter EX than configured
    for _ in range(3):
        assert monitor.run_pass().error is None
    (mismatch,) = events(settings.audit_path, "lock_timeout_mismatch")
    assert mismatch["lock_timeout_s"] == lock_timeout
    assert 5 <= mismatch["worker_ex_at_most_s"] < 10
    assert mismatch["held_s"] < 5
    assert json.loads(r.get(protocol.MISMATCH_KEY))["lock_key"] == "gpu_lock:0"
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"redis: {{url: '{redis_server.url}'}}\ngpu_lock: {{lock_timeout: {lock_timeout}}}\n")
    result = CliRunner().invoke(main, ["config", "check", "-c", str(cfg)])
    assert result.exit_code == 0
    assert "gpu_lock.lock_timeout" in result.stderr
    assert "gpu_lock:0 was set with at most" in result.stderr
    fixed = tmp_path / "fixed.yml"
    fixed.write_text(f"redis: {{url: '{redis_server.url}'}}\ngpu_lock: {{lock_timeout: 5}}\n")
    result = CliRunner().invoke(main, ["config", "check", "-c", str(fixed)])
    assert "was set with at most" not in result.stderr


@pytest.mark.parametrize("ended", ["lock ran out", "released alive"])
def test_earlier_holders_heartbeat_writer_living_on_never_condemns_the_next(r, redis_server, tmp_path, ended):
    # W1 keeps beating on the shared heartbeat key after its holding ended: its lock's EX ran out
    # mid-task, or the hard cap released it while its heartbeat thread was alive. W2 (a legacy
    # worker, no heartbeat) holds the lock meanwhile. When W1 finally stops, W2 is not dead.
    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock={"lock_timeout": 1},
        gpu_lock_monitor={
            "timeout_levels": {"warning": 30, "soft_timeout": 40, "hard_timeout": 50},
            "heartbeat": {"interval": 0.5, "timeout": 1.5},
        },
    )
    monitor = build(settings)
    key, hb = b"gpu_lock:0", b"gpu_lock:0:heartbeat"

    def w1_beats() -> None:
        r.set(hb, str(time.time()), px=1000)

    if ended == "lock ran out":
        r.set(key, b"locked_by_tts", px=1000)
        w1_beats()
        assert monitor.run_pass().error is None  # sees W1 and its heartbeat
        wait_for(lambda: not r.exists(key))  # W1's EX runs out; W1 runs on
    else:  # the hard cap, or an operator's --force: the same script, heartbeat ignored
        r.set(key, b"locked_by_tts", ex=1800)
        w1_beats()
        (seen,) = read_locks(r, [key])
        result = Reaper(r).release(key, seen.value, seen.expiry_ms, heartbeat=HeartbeatCheck.ANY)
        assert result.outcome is Outcome.RELEASED
        w1_beats()
    r.set(key, b"locked_by_asr", ex=1800)  # W2, two seconds of holding at most below
    for _ in range(3):
        w1_beats()  # W1's heartbeat thread, still running
        assert monitor.run_pass().error is None
    wait_for(lambda: not r.exists(hb))  # W1 stops at last
    assert monitor.run_pass().error is None
    assert r.get(key) == b"locked_by_asr"
    w2 = [e for e in events(settings.audit_path) if e.get("holder") == "locked_by_asr"]
    assert [e for e in w2 if e["event"] == "lock_released"] == []


def test_lock_without_ttl_released_then_retaken_by_the_same_task_starts_afresh(r, redis_server, tmp_path):
    # A no-TTL lock is timed from first sight; once the monitor released it, the same task name
    # taking it again is a new holding (new `holding` id, so alerts are not deduplicated away),
    # not the old one released a second time.
    settings = make_settings(
        redis_server.url,
        tmp_path,
        gpu_lock_monitor={"timeout_levels": {"warning": 0.1, "soft_timeout": 0.2, "hard_timeout": 30}},
    )
    monitor = build(settings)
    key = hold(r, 0, "tts", ttl=False)
    assert monitor.run_pass().error is None
    wait_for(lambda: monitor.run_pass() and not r.exists(key))  # past soft, no heartbeat: released
    (first,) = events(settings.audit_path, "lock_released")
    retaken = time.monotonic()
    hold(r, 0, "tts", ttl=False)  # the same task, a moment later
    assert monitor.run_pass().error is None
    assert r.exists(key)  # inheriting the old holding's first sight would release it at once
    wait_for(lambda: monitor.run_pass() and not r.exists(key))
    second = events(settings.audit_path, "lock_released")[1]
    assert second["holding"] != first["holding"]
    assert 0.2 <= second["held_s"] <= time.monotonic() - retaken + 0.05


# --- the exception paths of the release and its audit ---------------------------------------------


def test_release_whose_audit_line_cannot_be_written_still_happens_and_is_logged(r, redis_server, tmp_path, capsys):
    settings = make_settings(redis_server.url, tmp_path, audit={"path": "/dev/full"})  # a full disk
    key = hold(r, 0, "tts", age_s=450)
    logs.configure("info", "json", stream=sys.stdout)  # sys.stdout is capsys's now
    report = build(settings).run_pass()
    assert report is not None
    assert report.error is None
    assert not r.exists(key)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    failed = [line for line in lines if line["event"] == "audit_write_failed"]
    assert [line["audit_event"] for line in failed] == ["lock_released"]
    assert any(line["event"] == "lock_released" and line["lock_key"] == "gpu_lock:0" for line in lines)


def test_settle_refused_is_audited_and_the_pass_goes_on(r, redis_server, tmp_path):
    with ReplyDroppingProxy(redis_server.port) as proxy:
        settings = make_settings(proxy.url, tmp_path)
        key = hold(r, 0, "tts", age_s=450)
        r.script_load(RELEASE_SCRIPT)
        monitor = build(settings, connect(settings))
        proxy.drop_reply_to(hashlib.sha1(RELEASE_SCRIPT.encode(), usedforsecurity=False).hexdigest().encode())
        assert monitor.run_pass().error is not None  # the reply is lost: unknown
        refused = ReleaseError("release script failed: READONLY You can't write against a read only replica.")

        def refuse(*args, **kwargs):
            raise refused

        monitor.reaper.release = refuse  # type: ignore[method-assign]
        report = monitor.run_pass()
        assert report is not None
        assert report.error is None  # the refusal does not stop the pass
        assert [e["outcome"] for e in events(settings.audit_path, "lock_released")] == ["unknown"]
        failed = events(settings.audit_path, "release_failed")
        assert [(e["outcome"], e["settles"]) for e in failed] == [("unknown", "unknown")]
        assert "READONLY" in failed[-1]["error"]
        assert not r.exists(key)  # it had run the first time
        assert monitor.run_pass().error is None  # nothing left to settle


def test_manual_release_whose_reply_is_lost_says_unknown(r, redis_server, tmp_path):
    from monitor import manual
    from monitor.audit import AuditLog, JsonlFile
    from monitor.errors import MonitorError

    with ReplyDroppingProxy(redis_server.port) as proxy:
        settings = make_settings(proxy.url, tmp_path)
        key = hold(r, 0, "tts", age_s=450)
        r.script_load(RELEASE_SCRIPT)
        proxy.drop_reply_to(hashlib.sha1(RELEASE_SCRIPT.encode(), usedforsecurity=False).hexdigest().encode())
        audit = AuditLog(JsonlFile(tmp_path / "manual.jsonl"))
        with pytest.raises(MonitorError, match="outcome unknown"):
            manual.release(connect(settings), settings, audit, key, holder=None, confirm=lambda *_: True)
    (event,) = events(tmp_path / "manual.jsonl", "manual_release")
    assert event["outcome"] == "unknown"
    assert not r.exists(key)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (None, False),
        (b"not json", False),
        (b'{"lock_key": "gpu_lock:0"}', False),
        (b'{"lock_key": "gpu_lock:0", "worker_ex_at_most_s": 700}', False),  # no longer applies
        (b'{"lock_key": "gpu_lock:0", "worker_ex_at_most_s": 20}', True),
    ],
)
def test_mismatch_warning_reads_what_the_daemon_left(r, settings, raw, shown):
    from monitor.snapshot import mismatch_warning

    if raw is not None:
        r.set(protocol.MISMATCH_KEY, raw)
    assert (mismatch_warning(r, settings) is not None) is shown


@pytest.mark.parametrize(("raw", "expected"), [(None, None), (b"junk", None), (b"1795000000000", 1795000000000)])
def test_last_complete_pass_tolerates_junk(r, settings, raw, expected):
    from monitor.snapshot import last_complete_pass_ms

    if raw is not None:
        r.set(protocol.last_pass_key(settings.key_pattern), raw)
    assert last_complete_pass_ms(r, settings) == expected
