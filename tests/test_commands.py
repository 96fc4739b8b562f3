"""status, release, audit and health, through the command line."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from helpers import beat, build, config_file, events, hold, make_settings, subscribed

from monitor import protocol
from monitor.cli import main
from monitor.demo.redis_server import RedisServer, free_port
from monitor.units import human


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def cfg(redis_server, tmp_path) -> Path:
    # The table tests are about locks, on any host: GPU columns are tested in test_gpu.
    return config_file(tmp_path, redis_server.url, nvml={"enabled": False})


# --- status ---------------------------------------------------------------------------------


def test_status_table_and_json_show_each_lock_with_holder_age_heartbeat_and_decision(r, cfg):
    key = hold(r, 0, "tts_synthesize", age_s=450)
    beat(r, key, age_s=5)
    hold(r, 1, "legacy", age_s=450)
    hold(r, 2, "fresh", age_s=1)
    r.hset(b"gpu_lock:weird", "a", "b")
    table = cli("status", "-c", str(cfg))
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["LOCK", "TASK", "HELD", "HEARTBEAT", "TIER", "WOULD", "DO", "WHY"]
    row = {line.split()[0]: line for line in lines[1:4]}
    # The CLI runs a moment after the keys were set: the ages may have grown by a little.
    held = re.search(r"  7m(\d\d)s  ", row["gpu_lock:0"])
    assert held, row["gpu_lock:0"]
    assert 30 <= int(held.group(1)) < 40
    beat_age = re.search(r"alive \((\d+\.\d)s ago\)", row["gpu_lock:0"])
    assert beat_age, row["gpu_lock:0"]
    assert 5.0 <= float(beat_age.group(1)) < 15.0
    assert "keep" in row["gpu_lock:0"]
    assert "release" in row["gpu_lock:1"]
    assert "soft_timeout_no_heartbeat" in row["gpu_lock:1"]
    assert "within_limits" in row["gpu_lock:2"]
    assert lines[4] == "not a lock: gpu_lock:weird (not a string key)"
    doc = json.loads(cli("status", "--json", "-c", str(cfg)).output)
    assert doc["version"] == 1
    assert [lock["lock_key"] for lock in doc["locks"]] == ["gpu_lock:0", "gpu_lock:1", "gpu_lock:2"]
    first = doc["locks"][0]
    assert first["task_name"] == "tts_synthesize"
    assert first["heartbeat"] == "alive"
    assert 449 < first["held_s"] < 460
    assert first["tier"] == "soft"
    assert (first["action"], first["reason"]) == ("keep", "long_task_protected")
    assert doc["invalid"] == [{"lock_key": "gpu_lock:weird", "reason": "not a string key"}]


def test_status_never_writes(r, cfg):
    hold(r, 0, age_s=450)
    r.config_resetstat()
    before = r.dbsize()
    assert cli("status", "-c", str(cfg)).exit_code == 0
    stats = r.info("commandstats")
    writes = {"cmdstat_set", "cmdstat_hset", "cmdstat_del", "cmdstat_hdel", "cmdstat_publish", "cmdstat_expire"}
    assert not writes & set(stats)
    assert r.dbsize() == before


def test_status_says_no_locks_held_and_escapes_control_characters(r, cfg):
    assert cli("status", "-c", str(cfg)).output.splitlines()[0] == "no locks held"
    r.set(b"gpu_lock:0", b"locked_by_\n\x1b[31mred" + b"x" * 100)
    out = cli("status", "-c", str(cfg)).output
    assert "\x1b" not in out
    assert len(out.splitlines()) == 2 + 3  # the table, and where it looked


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0.0s"), (59.94, "59.9s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (90000, "1d01h")],
)
def test_human_durations_show_the_two_largest_units(seconds, text):
    assert human(seconds) == text


def test_status_without_redis_is_one_line(tmp_path):
    cfg = config_file(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    result = cli("status", "-c", str(cfg))
    assert result.exit_code == 1
    assert len(result.output.splitlines()) == 1
    assert result.output.startswith("gpulock-monitor: redis: ")


# --- release ------------------------------------------------------------------------------------


def test_release_with_the_holder_named_deletes_notifies_waiters_and_audits_the_operator(r, cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    hold(r, 0, "tts", age_s=10)
    with subscribed(r, b"gpu_lock:gpu_lock:0") as pubsub:
        result = cli("release", "gpu_lock:0", "--holder", "locked_by_tts", "--yes", "-c", str(cfg))
        assert result.exit_code == 0, result.output
        assert result.output.strip() == "released gpu_lock:0 (was held by locked_by_tts)"
        assert not r.exists(b"gpu_lock:0")
        notice = json.loads(pubsub.get_message(timeout=5)["data"])
    assert notice["release_reason"] == "manual_release"
    (event,) = events(tmp_path / "audit.jsonl", "manual_release")
    assert (event["operator"], event["outcome"], event["holder"]) == ("alice", "released", "locked_by_tts")
    assert event["requested_holder"] == "locked_by_tts"
    assert event["held_s"] >= 10


def test_release_wrong_holder_releases_nothing(r, cfg, tmp_path):
    hold(r, 0, "new_task")
    result = cli("release", "gpu_lock:0", "--holder", "locked_by_old", "--yes", "-c", str(cfg))
    assert result.exit_code == 1
    assert "nothing released: gpu_lock:0 is held by locked_by_new_task now, not locked_by_old" in result.output
    assert r.exists(b"gpu_lock:0")
    assert events(tmp_path / "audit.jsonl", "manual_release")[0]["outcome"] == "holder_changed"


def test_release_of_a_lock_not_held_exits_1_and_audits_nothing(r, cfg, tmp_path):
    result = cli("release", "gpu_lock:7", "--yes", "-c", str(cfg))
    assert result.exit_code == 1
    assert result.output.strip() == "gpulock-monitor: nothing released: gpu_lock:7 is not held (no lock is held)"
    assert events(tmp_path / "audit.jsonl") == []


def test_release_of_a_lock_gone_after_it_was_confirmed_exits_1_and_audits_gone(r, cfg, tmp_path, monkeypatch):
    hold(r, 7, "tts", age_s=450)
    monkeypatch.setattr("monitor.cli.commands._interactive", lambda: True)
    monkeypatch.setattr("click.confirm", lambda *a, **kw: r.delete(b"gpu_lock:7") == 1)  # its holder was faster
    result = cli("release", "gpu_lock:7", "-c", str(cfg))
    assert result.exit_code == 1
    assert result.output.strip() == "gpulock-monitor: nothing released: gpu_lock:7 is not held"
    assert events(tmp_path / "audit.jsonl", "manual_release")[0]["outcome"] == "gone"


def test_release_of_a_key_that_is_not_a_string_is_refused_as_not_a_lock(r, cfg):
    r.rpush(b"gpu_lock:list", "x")
    result = cli("release", "gpu_lock:list", "--yes", "-c", str(cfg))
    assert result.exit_code == 1
    assert "gpu_lock:list is not a lock (not a string key)" in result.output


def test_release_asks_on_a_terminal(r, cfg, monkeypatch):
    hold(r, 0, "tts")
    monkeypatch.setattr("monitor.cli.commands._interactive", lambda: True)
    runner = CliRunner()
    no = runner.invoke(main, ["release", "gpu_lock:0", "-c", str(cfg)], input="n\n")
    assert no.exit_code == 1
    assert "gpu_lock:0 held by locked_by_tts" in no.output
    assert "not confirmed; nothing released" in no.output
    assert r.exists(b"gpu_lock:0")
    yes = runner.invoke(main, ["release", "gpu_lock:0", "-c", str(cfg)], input="y\n")
    assert yes.exit_code == 0, yes.output
    assert not r.exists(b"gpu_lock:0")


def test_release_confirmed_while_the_same_task_retook_the_lock_spares_the_new_holding(r, cfg, redis_server, tmp_path):
    # Without --holder, the operator confirms the holding that was read; a re-acquire by the
    # same task name between read and release is a different holding and is left alone.
    from monitor import manual
    from monitor.audit import AuditLog, JsonlFile

    hold(r, 0, "tts", age_s=300)
    settings = make_settings(redis_server.url, tmp_path)

    def confirm_while_reacquired(current, description):
        hold(r, 0, "tts")
        return True

    client = redis.Redis.from_url(redis_server.url, protocol=2)
    result = manual.release(
        client,
        settings,
        AuditLog(JsonlFile(tmp_path / "a.jsonl")),
        b"gpu_lock:0",
        holder=None,
        confirm=confirm_while_reacquired,
    )
    assert result.outcome.value == "holder_changed"
    assert r.exists(b"gpu_lock:0")


def test_release_refuses_without_writable_audit(r, redis_server, tmp_path):
    (tmp_path / "file").write_text("")
    cfg = config_file(tmp_path, redis_server.url, audit={"path": str(tmp_path / "file" / "a.jsonl")})
    hold(r, 0)
    result = cli("release", "gpu_lock:0", "--yes", "-c", str(cfg))
    assert result.exit_code == 1
    assert "audit.path: cannot open" in result.output
    assert r.exists(b"gpu_lock:0")


# --- audit --------------------------------------------------------------------------------------


def audit_lines(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_audit_reads_rotated_files_in_order_with_filters(cfg, tmp_path):
    base = tmp_path / "audit.jsonl"
    audit_lines(
        base.with_name("audit.jsonl.2"),
        [{"ts": "2026-01-01T00:00:00+00:00", "event": "lock_warning", "lock_key": "gpu_lock:0"}],
    )
    audit_lines(
        base.with_name("audit.jsonl.1"),
        [{"ts": "2026-01-02T00:00:00+00:00", "event": "lock_released", "lock_key": "gpu_lock:0"}],
    )
    base.write_text(
        json.dumps({"ts": "2026-01-03T00:00:00+00:00", "event": "lock_released", "lock_key": "gpu_lock:1"})
        + '\n{"ts": "2026-01-03T00:00:01+00:00", "event": "torn'
    )
    everything = cli("audit", "--json", "-c", str(cfg))
    assert everything.exit_code == 0
    assert [json.loads(x)["ts"][:10] for x in everything.output.splitlines()] == [
        "2026-01-01",
        "2026-01-02",
        "2026-01-03",
    ]
    released = cli("audit", "--event", "lock_released", "--json", "-c", str(cfg)).output.splitlines()
    assert len(released) == 2
    lock0 = cli("audit", "--lock", "gpu_lock:0", "--since", "2026-01-01T12:00:00", "--json", "-c", str(cfg)).output
    assert [json.loads(x)["event"] for x in lock0.splitlines()] == ["lock_released"]
    human_out = cli("audit", "-c", str(cfg)).output.splitlines()
    assert human_out[0].startswith("2026-01-01T00:00:00+00:00  lock_warning")
    assert cli("audit", "--since", "1h", "-c", str(cfg)).output == ""


@pytest.mark.parametrize("bad", ["yesterday", "5x", "h2"])
def test_audit_since_that_is_no_time_or_span_exits_1_saying_what_is_expected(cfg, tmp_path, bad):
    (tmp_path / "audit.jsonl").write_text("")
    result = cli("audit", "--since", bad, "-c", str(cfg))
    assert result.exit_code == 1
    assert "--since: expected a span like 2h or 30m" in result.output


def test_audit_without_a_log_exits_1_saying_so(cfg):
    result = cli("audit", "-c", str(cfg))
    assert result.exit_code == 1
    assert "no audit log at" in result.output


def test_audit_follow_shows_appended_lines_and_goes_on_after_rotation(cfg, tmp_path):
    path = tmp_path / "audit.jsonl"
    audit_lines(path, [{"ts": "2026-01-01T00:00:00+00:00", "event": "old"}])
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "audit", "--follow", "--json", "-c", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()

    def next_event() -> str:
        return json.loads(lines.get(timeout=20))["event"]  # a missed line fails here, never hangs

    try:
        assert next_event() == "old"
        with path.open("a") as f:
            f.write(json.dumps({"ts": "2026-01-01T00:00:01+00:00", "event": "appended"}) + "\n")
        assert next_event() == "appended"
        path.rename(path.with_name("audit.jsonl.1"))  # logrotate
        audit_lines(path, [{"ts": "2026-01-01T00:00:02+00:00", "event": "after_rotation"}])
        assert next_event() == "after_rotation"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


# --- health -------------------------------------------------------------------------------------


def test_health_critical_without_daemon_then_healthy_after_pass(r, redis_server, cfg, tmp_path):
    result = cli("health", "-c", str(cfg))
    assert result.exit_code == 2
    assert result.output.strip() == (
        "critical: no monitor pass recorded recently (is the daemon running?) | locks=0 zombies=0 failing_releases=0"
    )
    hold(r, 0)
    build(make_settings(redis_server.url, tmp_path)).run_pass()
    result = cli("health", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("healthy: 1 lock(s), last pass")


def test_health_degraded_by_zombie_in_dry_run(r, redis_server, tmp_path):
    cfg = config_file(tmp_path, redis_server.url, gpu_lock_monitor={"auto_recovery": False})
    hold(r, 3, age_s=450)  # 50 s past soft with no heartbeat, and the monitor may not release
    build(make_settings(redis_server.url, tmp_path, gpu_lock_monitor={"auto_recovery": False})).run_pass()
    result = cli("health", "-c", str(cfg))
    assert result.exit_code == 1
    reason, _, perf = result.output.strip().partition(" | ")
    assert reason == "degraded: 1 zombie lock(s) overdue for release, worst gpu_lock:3 by 50 s"
    assert perf.startswith("locks=1 zombies=1 last_pass_age=")


def test_health_critical_when_releases_fail(r, redis_server, tmp_path):
    cfg = config_file(tmp_path, redis_server.url)
    r.set(protocol.monitor_status_key(os.uname().nodename), json.dumps({"failing_releases": 2}), px=600_000)
    result = cli("health", "-c", str(cfg))
    assert result.exit_code == 2
    assert result.output.startswith("critical: 2 release(s) failing | locks=0 zombies=0 last_pass_age=")
    assert result.output.strip().endswith(" failing_releases=2")


def test_health_critical_when_last_pass_is_old(r, redis_server, tmp_path):
    cfg = config_file(tmp_path, redis_server.url)
    r.set(protocol.monitor_status_key(os.uname().nodename), b"{}", px=600_000 - 30_000)  # written 30 s ago
    result = cli("health", "-c", str(cfg))
    assert result.exit_code == 2
    assert result.output.startswith("critical: last successful pass 30 s ago")
    r.set(protocol.monitor_status_key(os.uname().nodename), b"not json", px=600_000 - 2_000)
    assert cli("health", "-c", str(cfg)).exit_code == 0


def test_health_critical_when_redis_down(tmp_path):
    with RedisServer() as own:
        cfg = config_file(tmp_path, own.url)
        own.stop()
        result = cli("health", "-c", str(cfg))
    assert result.exit_code == 2
    assert result.output.startswith("critical: redis unreachable:")


def test_health_as_a_subprocess_prints_one_line_and_exits_with_the_nagios_code(r, cfg):
    result = subprocess.run([sys.executable, "-m", "monitor", "health", "-c", str(cfg)], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr == ""


def test_follow_misses_nothing_written_while_history_is_read(tmp_path):
    from monitor import audit_read

    path = tmp_path / "audit.jsonl"
    audit_lines(path.with_name("audit.jsonl.1"), [{"event": "rotated"}])
    audit_lines(path, [{"event": "old"}])
    done = []
    records = audit_read.follow(path, stop=lambda: bool(done), poll_s=0.01)
    assert next(records)["event"] == "rotated"
    assert next(records)["event"] == "old"
    with path.open("a") as f:  # written the instant after the history was shown
        f.write(json.dumps({"event": "in_between"}) + "\n" + '{"event": "tor')
    assert next(records)["event"] == "in_between"
    with path.open("a") as f:
        f.write('n"}\n')  # the torn line completes
    assert next(records)["event"] == "torn"
    path.write_text(json.dumps({"event": "after_truncation"}) + "\n")  # copytruncate-style rotation
    assert next(records)["event"] == "after_truncation"
    done.append(True)
    assert list(records) == []


def test_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path):
    from monitor import audit_read

    path = tmp_path / "audit.jsonl"
    records = audit_read.follow(path, stop=lambda: False, poll_s=0.01)
    threading.Timer(0.1, lambda: audit_lines(path, [{"event": "first"}])).start()
    assert next(records)["event"] == "first"
