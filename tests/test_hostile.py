"""Hostile data in Redis: huge values and junk keys under the lock pattern are bounded in what
the monitor stores, audits and prints, and junk is not said again at every start."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from helpers import build, config_file, events

from monitor import invalid, protocol
from monitor.cli import main
from monitor.invalid import SHOWN, Said, digest, to_say


def junk(n: int, start: int = 0) -> dict[bytes, str]:
    return {f"gpu_lock:junk{i}".encode(): "not a string key" for i in range(start, start + n)}


@pytest.mark.parametrize(
    ("said", "found", "named", "summary", "summed_up"),
    [
        (Said(), {}, 0, None, 0),
        (Said(), junk(3), 3, None, 0),
        (Said(), junk(SHOWN), SHOWN, None, 0),
        (Said(), junk(SHOWN + 5), SHOWN, 5, 5),
        (Said(), junk(100_000), SHOWN, 100_000 - SHOWN, 100_000 - SHOWN),
        # said before (a restart): nothing new
        (Said(frozenset(digest(k) for k in junk(3)), 0), junk(3), 0, None, 0),
        (Said(frozenset(digest(k) for k in junk(SHOWN)), 80), junk(100), 0, None, 80),
        # more junk: the count changed, one summary
        (Said(frozenset(digest(k) for k in junk(SHOWN)), 80), junk(120), 0, 100, 100),
        # a named key went: a new one takes its place in the named set
        (Said(frozenset(digest(k) for k in junk(SHOWN)), 0), junk(SHOWN, start=1), 1, None, 0),
    ],
)
def test_new_invalid_keys_are_named_up_to_a_limit_the_rest_counted_on_change(said, found, named, summary, summed_up):
    new_said, new, count = to_say(said, found)
    assert len(new) == named
    assert count == summary
    assert new_said.summed_up == summed_up
    assert len(new_said.keys) <= SHOWN


@pytest.mark.parametrize("raw", [None, b"junk", b"[]", b'{"keys": 3}'])
def test_unreadable_memory_of_invalid_keys_is_nothing_said(raw):
    assert Said.loads(raw) == Said()


def test_junk_keys_are_said_once_across_restarts(r, settings):
    pipe = r.pipeline()
    for i in range(100):
        pipe.hset(f"gpu_lock:junk{i}", "a", "b")
    pipe.execute()
    for _ in range(3):  # three daemon starts, two passes each
        monitor = build(settings)
        assert monitor.run_pass().error is None
        assert monitor.run_pass().error is None
    found = events(settings.audit_path, "invalid_lock")
    assert len([e for e in found if e["lock_key"] is not None]) == SHOWN
    (summary,) = [e for e in found if e["lock_key"] is None]
    assert summary["count"] == 100 - SHOWN
    assert Said.loads(r.get(invalid.SAID_KEY)).summed_up == 100 - SHOWN


def test_huge_lock_value_is_bounded_in_record_audit_and_status(r, settings, redis_server, tmp_path):
    value = b"locked_by_" + b"\xff\x1b[31m" * 1_000_000  # 6 MB, not UTF-8, with terminal escapes
    r.set(b"gpu_lock:0", value, px=(600 - 350) * 1000)  # past warning: audited
    monitor = build(settings)
    report = monitor.run_pass()
    assert report is not None
    assert report.error is None
    record = r.get(protocol.holding_key(b"gpu_lock:0"))
    assert record is not None
    assert len(record) < 2000
    (warning,) = events(settings.audit_path, "lock_warning")
    assert len(warning["holder"]) < 400
    assert "6000010 bytes, sha1" in warning["holder"]
    assert (tmp_path / "audit.jsonl").stat().st_size < 10_000
    assert monitor.run_pass().error is None  # the record still matches the holding
    assert len(events(settings.audit_path, "lock_warning")) == 1
    cfg = config_file(tmp_path, redis_server.url, nvml={"enabled": False})
    shown = CliRunner().invoke(main, ["status", "-c", str(cfg)])
    assert shown.exit_code == 0
    assert len(shown.output) < 2000
    assert "\x1b" not in shown.output


def test_huge_value_released_once_and_its_repeat_answered(r, settings):
    value = b"locked_by_" + b"x" * 3_000_000
    r.set(b"gpu_lock:0", value, px=(600 - 450) * 1000)  # past soft, no heartbeat: released
    monitor = build(settings)
    assert monitor.run_pass().error is None
    assert not r.exists(b"gpu_lock:0")
    (released,) = events(settings.audit_path, "lock_released")
    assert len(released["holder"]) < 400
    assert len(r.get(protocol.released_key(b"gpu_lock:0")) or b"") < 200  # the tombstone: a digest


def test_short_values_are_kept_as_they_are():
    hold_value = b"locked_by_tts"
    assert protocol.fingerprint(hold_value) == hold_value
    assert protocol.shown(hold_value) == "locked_by_tts"
