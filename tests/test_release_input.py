"""`release` against hostile input: any bytes as key or holder, keys that are not locks, and
holders made of terminal control characters. Real processes, through a pipe and a pty."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import redis
from helpers import LOCK_TIMEOUT_S, answer_at_terminal, beat, config_file, events, hold, make_settings

from monitor import manual, protocol
from monitor.audit import AuditLog, JsonlFile
from monitor.errors import MonitorError

CLI = [sys.executable, "-m", "monitor"]
# A zombie by every rule of the test settings (hard_timeout 500).
ZOMBIE_PX = (LOCK_TIMEOUT_S - 550) * 1000
# Clears the screen, returns to the start of the line and writes over what was there.
EVIL = b"locked_by_\x1b[2J\x1b]0;owned\x07\rEVIL\x9b"


@pytest.fixture
def cfg(redis_server, tmp_path) -> Path:
    return config_file(tmp_path, redis_server.url, nvml={"enabled": False})


def release(cfg: Path, *args: bytes | str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`gpulock-monitor release ...` over a pipe, argv as bytes (as a shell passes them)."""
    argv = [*CLI, "release", *args, "-c", str(cfg)]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)


def refused(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a refusal prints, after checking it is one line and exit 1."""
    assert result.returncode == 1, result
    assert result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("gpulock-monitor: ")
    assert "Traceback" not in line
    return line


def raw_controls(data: bytes) -> list[str]:
    """Terminal control characters in `data`, C1 included (the newlines that end lines aside)."""
    return [c for c in data.decode("utf-8", "replace") if unicodedata.category(c) == "Cc" and c != "\n"]


# --- any bytes ----------------------------------------------------------------------------------


def test_non_utf8_key_is_released(r, cfg, tmp_path):
    key = b"gpu_lock:\xff\xfe"
    r.set(key, b"locked_by_tts", px=ZOMBIE_PX)
    result = release(cfg, key, b"--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "released gpu_lock:\\xff\\xfe (was held by locked_by_tts)\n"
    assert not r.exists(key)
    (event,) = events(tmp_path / "audit.jsonl", "manual_release")
    assert (event["lock_key"], event["outcome"]) == ("gpu_lock:\\xff\\xfe", "released")


def test_non_utf8_holder_is_matched_exactly(r, cfg, tmp_path):
    key = hold(r, 0)
    r.set(key, b"locked_by_\xe9t\xe9", px=ZOMBIE_PX)  # latin-1, not UTF-8
    wrong = release(cfg, key, b"--holder", b"locked_by_\xe9t\xe8")
    line = refused(wrong)
    assert "is held by locked_by_\\xe9t\\xe9 now, not locked_by_\\xe9t\\xe8" in line
    assert r.exists(key)
    right = release(cfg, key, b"--holder", b"locked_by_\xe9t\xe9")
    assert right.returncode == 0, right.stderr
    assert right.stdout.decode() == "released gpu_lock:0 (was held by locked_by_\\xe9t\\xe9)\n"
    assert not r.exists(key)
    outcomes = [(e["requested_holder"], e["outcome"]) for e in events(tmp_path / "audit.jsonl", "manual_release")]
    assert outcomes == [("locked_by_\\xe9t\\xe8", "holder_changed"), ("locked_by_\\xe9t\\xe9", "released")]


# --- keys that are not locks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (b"gpu_lock:0:heartbeat", "a heartbeat key, not a lock"),
        (b"gpu_lock:0:holder", "a holder record, not a lock"),
        (b"celery-task-meta-1", "not under gpu_lock.key_pattern (gpu_lock:*)"),
        (b"gpu_lock", "not under gpu_lock.key_pattern (gpu_lock:*)"),
        (b"gpulock_monitor:holding:{gpu_lock:0}", "not under gpu_lock.key_pattern (gpu_lock:*)"),
    ],
)
def test_keys_that_are_not_locks_are_refused(r, cfg, tmp_path, key, why):
    lock = hold(r, 0, age_s=550)
    beat(r, lock, age_s=110)
    r.set(b"gpu_lock:0:holder", b'{"pid": 1}', px=ZOMBIE_PX)
    r.set(b"celery-task-meta-1", b'{"status": "SUCCESS"}')
    r.set(b"gpu_lock", b"locked_by_tts", px=ZOMBIE_PX)
    r.set(b"gpulock_monitor:holding:{gpu_lock:0}", b"1")
    before = {k: r.dump(k) for k in r.scan_iter()}
    line = refused(release(cfg, key, b"--yes", b"--force"))
    assert why in line
    assert key.decode() in line
    assert {k: r.dump(k) for k in r.scan_iter()} == before
    assert events(tmp_path / "audit.jsonl", "manual_release") == []


def test_monitor_keys_are_refused_under_a_pattern_that_covers_them(r, redis_server, tmp_path):
    cfg = config_file(tmp_path, redis_server.url, gpu_lock={"key_pattern": "g*"}, nvml={"enabled": False})
    record = b"gpulock_monitor:holding:{gpu_lock:0}"
    r.set(record, b"1", px=ZOMBIE_PX)
    line = refused(release(cfg, record, b"--yes"))
    assert "the monitor's own key, not a lock" in line
    assert r.exists(record)
    hold(r, 0, age_s=550)  # a lock under the same pattern is still released
    assert release(cfg, b"gpu_lock:0", b"--yes").returncode == 0
    assert not r.exists(b"gpu_lock:0")


@pytest.mark.parametrize(
    "pattern",
    [b"gpu_lock:*", b"g*", b"gpu_?ock:*", b"gpu_lock:[0-3]*", b"gpu_lock:[^0-3]*", b"gpu_lock:[!a]*",
     b"gpu_lock:\\**", b"gpu_lock:[\\]x]*", b"gpu_lock:[3-1]*", b"gpu_lock:[a*", b"*:*:*", b"**", b"gpu_lock:\\",
     b"gpu_lock:[a-\xff]*", b"gpu_lock:[^\x80-\xfe]*", b"gpu_lock:[^", b"gpu_lock:[]*", b"gpu_lock:[a-]*",
     b"*[0-9]", b"*a*", b"gpu_lock:?*"],
)  # fmt: skip
def test_key_pattern_matches_as_redis_match_does(r, pattern):
    names = [b"gpu_lock:0", b"gpu_lock:2x", b"gpu_lock:9", b"gpu_lock:a", b"gpu_lock:!", b"gpu_lock:*x", b"gpu_lock:]",
             b"gpu_lock:x", b"gpu_lock:", b"gpu_lock:\\", b"gpu_lock:a*", b"gpu_lock:[a", b"gpu_lock:0:heartbeat",
             b"gpuXlock:1", b"gpu_lock:\xff", b"g", b"other", b""]  # fmt: skip
    for name in names:
        r.set(b"k" + name, b"1")
    by_redis = {k[1:] for k in r.scan_iter(match=b"k" + pattern, count=1000)}
    by_us = {name for name in names if manual.redis_match(pattern, name)}
    assert by_us == by_redis


# --- control characters from Redis never reach the terminal raw ---------------------------------


def test_control_characters_in_a_holder_are_escaped_on_success(r, cfg, tmp_path):
    key = hold(r, 0)
    r.set(key, EVIL, px=ZOMBIE_PX)
    result = release(cfg, key, b"--yes")
    assert result.returncode == 0, result.stderr
    assert raw_controls(result.stdout + result.stderr) == []
    assert "\\x1b[2J" in result.stdout.decode()
    assert not r.exists(key)
    (event,) = events(tmp_path / "audit.jsonl", "manual_release")
    assert event["holder"] == EVIL.decode("utf-8", "backslashreplace")  # the audit keeps the value as it was


def test_control_characters_in_a_holder_are_escaped_in_error_lines(r, cfg):
    key = hold(r, 0)
    r.set(key, EVIL, px=ZOMBIE_PX)
    changed = refused(release(cfg, key, b"--holder", b"locked_by_\x1b[31mother\r"))
    assert "is held by" in changed
    not_asked = refused(release(cfg, key))  # off a terminal, without --yes
    assert "not a terminal" in not_asked
    beat(r, key)
    alive = refused(release(cfg, key, b"--yes"))
    assert "add --force" in alive
    gone = refused(release(cfg, key + b"\x1b[2J\r", b"--yes"))  # the operator's own key, echoed
    assert "is not held" in gone
    for line in (changed, not_asked, alive, gone):
        assert raw_controls(line.encode()) == [], line
    assert r.get(key) == EVIL


def test_control_characters_in_a_holder_are_escaped_in_the_prompt(r, cfg, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")  # every control character seen is then the holder's
    key = hold(r, 0)
    r.set(key, EVIL, px=ZOMBIE_PX)
    code, prompt, out = answer_at_terminal([*CLI, "release", "gpu_lock:0", "-c", str(cfg)], "y", raw_output=True)
    assert code == 0, out
    assert b"Release it?" in prompt
    assert b"\\x1b[2J" in prompt
    assert raw_controls(out) == [], out
    assert not r.exists(key)


def test_a_refused_key_never_reaches_redis(tmp_path):
    # Nothing listens on port 1: a refusal that asked Redis anything would fail differently.
    settings = make_settings("redis://127.0.0.1:1/0", tmp_path)
    audit = AuditLog(JsonlFile(tmp_path / "audit.jsonl"))
    with pytest.raises(MonitorError, match=r"not under gpu_lock\.key_pattern"):
        manual.release(redis.Redis(port=1), settings, audit, b"celery-task-meta-1", holder=None, confirm=bool)
    assert not (tmp_path / "audit.jsonl").exists()


def test_holder_records_are_not_lock_candidates():
    # The monitor's passes skip them as they skip heartbeats (DESIGN.md section 2).
    assert not protocol.is_lock_candidate(b"gpu_lock:0:holder")
    assert not protocol.is_lock_candidate(b"gpu_lock:0:heartbeat")
    assert protocol.is_lock_candidate(b"gpu_lock:0")
