"""The operator's commands at 3 a.m.: typos refused in one line, `-c` anywhere, `audit` from the end."""

from __future__ import annotations

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
