"""The operator's commands at 3 a.m.: typos refused in one line, `-c` anywhere, `audit` from the end."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import config_file, events, hold

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
