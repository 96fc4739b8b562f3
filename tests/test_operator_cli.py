"""The operator's commands at 3 a.m.: typos refused in one line, `-c` anywhere, `audit` from the end."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import answer_at_terminal, beat, build, config_file, events, hold, make_settings

from monitor import protocol
from monitor.cli import main
from monitor.events import Event


def cli(*args: str, **kw):
    return CliRunner().invoke(main, list(args), **kw)


@pytest.fixture
def cfg(redis_server, tmp_path) -> Path:
    return config_file(tmp_path, redis_server.url, nvml={"enabled": False})


# --- -c before the subcommand ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize(
    "command", [["status"], ["health"], ["audit"], ["config", "check"], ["config", "show"], ["release", "gpu_lock:9"]]
)
def test_config_option_is_taken_before_the_subcommand_as_after_it(r, tmp_path, redis_server, command, where):
    cfg = config_file(tmp_path, redis_server.url, gpu_lock={"key_pattern": "site_a:*"}, nvml={"enabled": False})
    (tmp_path / "audit.jsonl").write_text("")
    args = ["-c", str(cfg), *command] if where == "before" else [*command, "-c", str(cfg)]
    result = cli(*args, env={"GPULOCK_MONITOR_CONFIG": str(tmp_path / "missing.yml")})
    assert "missing.yml" not in result.output
    assert "No such option" not in result.output
    if command[0] == "release":  # only the file's pattern makes this key no lock
        assert "gpu_lock:9 is not under gpu_lock.key_pattern (site_a:*)" in result.output
    if command == ["config", "show"]:
        assert "site_a:*" in result.output


def test_config_option_after_the_subcommand_wins_over_one_before_it(tmp_path, redis_server):
    first = config_file(tmp_path, redis_server.url, gpu_lock={"key_pattern": "site_a:*"})
    second = tmp_path / "second.yml"
    second.write_text(first.read_text().replace("site_a:*", "site_b:*"))
    assert "site_b:*" in cli("-c", str(first), "config", "show", "-c", str(second)).output


# --- typos ---------------------------------------------------------------------------------------


def test_audit_event_that_is_no_event_name_exits_1_naming_the_valid_ones(cfg, tmp_path):
    (tmp_path / "audit.jsonl").write_text('{"event": "lock_released"}\n')
    result = cli("audit", "--event", "lock_relesed", "-c", str(cfg))
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("gpulock-monitor: --event: no event is named lock_relesed (did you mean lock_released?)")
    for event in Event:
        assert event.value in line
    assert cli("audit", "--event", "lock_released", "-c", str(cfg)).exit_code == 0


@pytest.mark.parametrize("typo", ["0", "gpu-lock:0", "gpu_lock:O"])
def test_release_of_a_typo_is_refused_before_anything_is_audited(r, cfg, tmp_path, typo):
    hold(r, 0, "tts", age_s=450)
    result = cli("release", typo, "--yes", "-c", str(cfg))
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("gpulock-monitor: ")
    assert f" {typo} " in line
    assert events(tmp_path / "audit.jsonl") == []
    assert r.exists(b"gpu_lock:0")


def test_release_of_a_lock_not_held_names_the_locks_that_are(r, cfg):
    hold(r, 0, "tts")
    hold(r, 10, "asr")
    result = cli("release", "gpu_lock:O", "--yes", "-c", str(cfg))
    assert result.output.strip() == (
        "gpulock-monitor: nothing released: gpu_lock:O is not held (held now: gpu_lock:0, gpu_lock:10)"
    )


# --- audit from the end -----------------------------------------------------------------------------


def write_log(path: Path, events_: list[str], *, first: int = 0) -> None:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "ts": f"2026-01-01T00:{(first + i) // 60:02d}:{(first + i) % 60:02d}+00:00",
                    "event": e,
                    "n": first + i,
                }
            )
            + "\n"
            for i, e in enumerate(events_)
        )
    )


@pytest.fixture
def history(tmp_path) -> Path:
    """90 events in three files: audit.jsonl.2 (n 0-29), .1 (30-59), the live file (60-89)."""
    live = tmp_path / "audit.jsonl"
    for number, name in enumerate(["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]):
        write_log(live.with_name(name), ["lock_warning", "lock_released"] * 15, first=30 * number)
    return live


def numbers(output: str) -> list[int]:
    return [json.loads(line)["n"] for line in output.splitlines()]


def test_audit_lines_shows_the_last_n_events_the_filters_keep(cfg, history):
    assert numbers(cli("audit", "-n", "3", "--json", "-c", str(cfg)).output) == [87, 88, 89]
    assert numbers(cli("audit", "--lines", "32", "--json", "-c", str(cfg)).output) == list(range(58, 90))
    released = cli("audit", "-n", "20", "--event", "lock_released", "--json", "-c", str(cfg)).output
    assert numbers(released) == list(range(51, 90, 2))
    assert cli("audit", "-n", "0", "-c", str(cfg)).output == ""
    assert len(numbers(cli("audit", "--json", "-c", str(cfg)).output)) == 90  # without -n: everything


def test_audit_lines_that_is_no_count_is_a_usage_error(cfg, history):
    result = cli("audit", "-n", "-1", "-c", str(cfg))
    assert result.exit_code == 2
    assert "Invalid value for '-n' / '--lines'" in result.output


def follow_cli(cfg: Path, *args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "audit", "--follow", "--json", "-c", str(cfg), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    return proc, lines


def test_audit_follow_starts_with_the_last_ten_events_not_the_whole_history(cfg, history):
    proc, lines = follow_cli(cfg)
    try:
        shown = [json.loads(lines.get(timeout=20))["n"] for _ in range(10)]
        assert shown == list(range(80, 90))
        with history.open("a") as f:
            f.write(json.dumps({"event": "appended", "n": 90}) + "\n")
        assert json.loads(lines.get(timeout=20))["n"] == 90
        assert lines.empty()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert "Traceback" not in proc.stderr.read()


def test_audit_follow_since_starts_with_every_event_since_then(cfg, history):
    proc, lines = follow_cli(cfg, "--since", "2026-01-01T00:01:25Z")
    try:
        assert [json.loads(lines.get(timeout=20))["n"] for _ in range(5)] == [85, 86, 87, 88, 89]
        time.sleep(0.5)
        assert lines.empty()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


# --- status says where it looked --------------------------------------------------------------------

HOST = socket.gethostname()


def test_status_with_no_locks_says_where_it_looked(r, redis_server, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/2"  # the locks are in db 2 ...
    cfg = config_file(tmp_path, url, gpu_lock={"key_pattern": "site_a:*"}, nvml={"enabled": False})
    hold(r, 0)  # ... not where this lock is
    lines = cli("status", "-c", str(cfg)).output.splitlines()
    assert lines == [
        "no locks held",
        f"redis: {url} (db 2)  pattern: site_a:*",
        f"config: {cfg}",
        f"no daemon on this host ({HOST}) reported to this redis db",
    ]


def test_status_masks_the_password_and_says_when_no_config_file_was_found(r, redis_server, tmp_path, monkeypatch):
    if Path("/etc/gpulock-monitor/monitor.yml").exists():
        pytest.skip("this host has a system config")
    monkeypatch.chdir(tmp_path)
    url = redis_server.url.replace("redis://", "redis://:hunter2@")
    r.config_set("requirepass", "hunter2")
    try:
        result = cli("status", env={"GPULOCK_MONITOR_REDIS_URL": url, "GPULOCK_MONITOR_CONFIG": ""})
    finally:
        r.config_set("requirepass", "")
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert f"redis: {redis_server.url.replace('redis://', 'redis://:***@')} (db 0)" in result.output
    assert "config: none found, the built-in defaults" in result.output


def test_status_names_the_daemon_on_this_host_and_how_long_ago_it_passed(r, cfg):
    hold(r, 0)
    key = protocol.monitor_status_key(HOST)
    ttl_ms = 600_000  # the status key's TTL for this config; its age is what it has lost of it
    r.set(key, b"{}", px=ttl_ms - 4_000)
    assert cli("status", "-c", str(cfg)).output.splitlines()[-1] == f"daemon on {HOST}: last pass 4.0s ago"
    doc = json.loads(cli("status", "--json", "-c", str(cfg)).output)
    assert doc["daemon"]["name"] == HOST
    assert doc["daemon"]["state"] == "running"
    assert 4.0 <= doc["daemon"]["last_pass_age_s"] < 5
    r.set(key, b"{}", px=ttl_ms - 95_000)  # passes every 0.2 s: 95 s is late
    assert cli("status", "-c", str(cfg)).output.splitlines()[-1] == (
        f"daemon on {HOST}: last pass 1m35s ago, late: is it stalled?"
    )
    r.set(key, json.dumps({"state": "stopped", "stopped_at": "2026-01-01T00:00:00.000+00:00"}), px=ttl_ms - 9_000)
    assert cli("status", "-c", str(cfg)).output.splitlines()[-1] == (
        f"daemon on {HOST}: stopped at 2026-01-01T00:00:00.000+00:00"
    )
    assert json.loads(cli("status", "--json", "-c", str(cfg)).output)["daemon"]["state"] == "stopped"


def test_status_json_says_where_it_looked_beside_the_fields_it_had(r, cfg, redis_server):
    hold(r, 0)
    doc = json.loads(cli("status", "--json", "-c", str(cfg)).output)
    assert doc["version"] == 1
    assert doc["config"] == str(cfg)
    assert doc["redis"] == {"url": redis_server.url, "db": 0, "via": None}
    assert doc["key_pattern"] == "gpu_lock:*"
    assert doc["daemon"] == {"name": HOST, "state": "none", "last_pass_age_s": None, "discovery": None}
    assert set(doc) >= {"redis_time", "auto_recovery", "locks", "invalid", "nvml", "gpus"}


# --- status fits the terminal -----------------------------------------------------------------------


def test_status_sorts_keys_as_people_count(r, cfg):
    for gpu in (10, 2, 1, "1a", 0):
        hold(r, gpu)
    table = cli("status", "-c", str(cfg)).output.splitlines()
    assert [line.split()[0] for line in table[1:6]] == [
        "gpu_lock:0",
        "gpu_lock:1",
        "gpu_lock:1a",
        "gpu_lock:2",
        "gpu_lock:10",
    ]
    doc = json.loads(cli("status", "--json", "-c", str(cfg)).output)
    assert [lock["lock_key"] for lock in doc["locks"]] == [
        "gpu_lock:0",
        "gpu_lock:1",
        "gpu_lock:1a",
        "gpu_lock:2",
        "gpu_lock:10",
    ]


@pytest.mark.parametrize("columns", [60, 80, 100])
def test_status_fits_the_terminal_showing_task_names(r, cfg, columns):
    key = hold(r, 0, "tts_synthesize", age_s=412)
    beat(r, key, age_s=14)
    hold(r, 1, "sdxl_generate_" + "x" * 80, age_s=30)
    hold(r, 12, "asr", age_s=350)
    out = cli("status", "-c", str(cfg), env={"COLUMNS": str(columns)}).output
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "locked_by_" not in out
    assert lines[0].split()[:2] == ["LOCK", "TASK"]
    if columns >= 80:  # keys whole, so that `release` can be given one
        assert [line.split()[0] for line in lines[1:4]] == ["gpu_lock:0", "gpu_lock:1", "gpu_lock:12"]
        assert "alive (14." in lines[1]
    assert lines[2].split()[1].startswith("sdxl_")
    assert lines[2].split()[1].endswith("…")


def test_status_down_a_pipe_cuts_nothing(r, cfg):
    hold(r, 1, "sdxl_generate_" + "x" * 30)
    out = cli("status", "-c", str(cfg), env={"COLUMNS": ""}).output
    assert "sdxl_generate_" + "x" * 30 in out


def test_status_and_release_colour_for_a_terminal_only(r, cfg, redis_server, tmp_path, monkeypatch):
    key = hold(r, 0, "tts", age_s=50)
    hold(r, 1, "asr", age_s=350)  # past the warning
    monitor = build(make_settings(redis_server.url, tmp_path))
    for value in ("1", "2"):  # the monitor sees its heartbeat beat ...
        beat(r, key, value=value)
        monitor.run_pass()
    r.delete(protocol.heartbeat_key(key))  # ... then stop: dead
    status = [sys.executable, "-m", "monitor", "status", "-c", str(cfg)]
    _, _, out = answer_at_terminal(status, "")
    for text, colour in [("dead (", "red"), ("release", "red"), ("warning", "yellow"), ("warn", "yellow")]:
        assert (click.style("", fg=colour, reset=False) + text).encode() in out, text
    _, prompt, out = answer_at_terminal([sys.executable, "-m", "monitor", "release", "gpu_lock:1", "-c", str(cfg)], "y")
    assert b"tier " + click.style("warning", fg="yellow").encode() in prompt
    assert click.style("released gpu_lock:1", fg="green").encode() in out
    assert b"\x1b[" not in subprocess.run(status, capture_output=True, check=True).stdout  # down a pipe
    monkeypatch.setenv("NO_COLOR", "1")
    assert b"\x1b[" not in answer_at_terminal(status, "")[2]


def test_status_through_sentinel_names_the_service_and_the_database_it_selects(sentinel, tmp_path):
    _, port = sentinel
    cfg = config_file(
        tmp_path,
        "redis://127.0.0.1:1/3",  # host and port come from the sentinel; the URL gives the database
        redis={"sentinel": {"service": "gpulocks", "nodes": [f"127.0.0.1:{port}"]}},
        nvml={"enabled": False},
    )
    result = cli("status", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert f"redis: sentinel gpulocks at 127.0.0.1:{port}, redis://127.0.0.1:1/3 (db 3)" in result.output
    doc = json.loads(cli("status", "--json", "-c", str(cfg)).output)
    assert doc["redis"] == {"url": "redis://127.0.0.1:1/3", "db": 3, "via": f"sentinel gpulocks at 127.0.0.1:{port}"}


def test_audit_lines_since_reads_back_only_to_that_time(cfg, tmp_path, monkeypatch):
    live = tmp_path / "audit.jsonl"
    for hour, name in enumerate(["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]):  # an hour each
        times = [f"2026-01-01T{hour:02d}:{minute:02d}:00Z" for minute in range(60)]
        live.with_name(name).write_text(
            "".join(json.dumps({"ts": ts, "n": hour * 60 + i}) + "\n" for i, ts in enumerate(times))
        )
    opened: list[str] = []
    real_open = Path.open

    def recording_open(self, *args, **kw):
        opened.append(self.name)
        return real_open(self, *args, **kw)

    monkeypatch.setattr(Path, "open", recording_open)
    out = cli("audit", "-n", "1000", "--since", "2026-01-01T01:50:00Z", "--json", "-c", str(cfg)).output
    assert numbers(out) == list(range(110, 180))
    assert "audit.jsonl.2" not in opened  # older than --since by more than a clock step: not read
