"""The command line: help, version, config commands, one-line errors, and the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import acl_user

from monitor import __version__
from monitor.cli import main

REPO = Path(__file__).resolve().parent.parent


def invoke(*args: str, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def test_version_option_prints_the_package_version():
    assert invoke("--version").output.strip() == f"gpulock-monitor, version {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["run"],
        ["status"],
        ["release"],
        ["audit"],
        ["health"],
        ["config"],
        ["config", "check"],
        ["config", "show"],
        ["demo"],
    ],
)
def test_every_command_has_help(args):
    result = invoke(*args, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


# `config check` also asks Redis what the daemon found; these configs name no test server.
NO_REDIS = {"GPULOCK_MONITOR_REDIS_URL": "unix:///nonexistent/redis.sock"}


def test_config_check_of_the_shipped_config_is_ok_with_a_hard_timeout_warning():
    result = CliRunner().invoke(main, ["config", "check", "-c", str(REPO / "monitor.yml")], env=NO_REDIS)
    assert result.exit_code == 0
    assert result.stdout.strip() == "config ok"
    assert "warning: gpu_lock_monitor.timeout_levels.hard_timeout" in result.stderr


def test_config_check_of_an_invalid_config_exits_1_with_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("gpu_lock_monitor:\n  timeout_levels: {warning: 700}\n")
    result = CliRunner().invoke(main, ["config", "check", "-c", str(bad)])
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == f"gpulock-monitor: {bad}: gpu_lock_monitor.timeout_levels.warning: must be less than soft_timeout (600)"
    )


def test_config_show_redacts_and_round_trips(tmp_path):
    cfg = tmp_path / "m.yml"
    cfg.write_text("redis:\n  url: redis://:hunter2@db:6380/2\ngpu_lock_monitor:\n  monitor_interval: 5\n")
    result = invoke("config", "show", "-c", str(cfg))
    assert "hunter2" not in result.output
    shown = yaml.safe_load(result.output)
    assert shown["redis"]["url"] == "redis://:***@db:6380/2"
    assert shown["gpu_lock_monitor"]["monitor_interval"] == 5
    # What `show` prints is itself a valid config (the password aside).
    again = tmp_path / "again.yml"
    again.write_text(result.output)
    assert CliRunner().invoke(main, ["config", "check", "-c", str(again)], env=NO_REDIS).exit_code == 0


def test_unknown_option_is_a_usage_error():
    result = CliRunner().invoke(main, ["run", "--bogus"])
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_redis_refusal_is_one_line(tmp_path, r):
    cfg = tmp_path / "m.yml"
    with acl_user(r, "noscan", commands=["+@all", "-scan"]) as noscan:
        cfg.write_text(
            yaml.safe_dump(
                {
                    "redis": {"url": noscan.url},
                    "audit": {"path": str(tmp_path / "a.jsonl"), "critical_path": str(tmp_path / "c.jsonl")},
                }
            )
        )
        result = CliRunner().invoke(main, ["run", "--once", "-c", str(cfg)])
    assert result.exit_code == 1
    assert "pass_failed" in result.stdout
    assert "NoPermissionError" in result.stdout


def test_installed_console_script_runs():
    script = shutil.which("gpulock-monitor") or str(Path(sys.executable).parent / "gpulock-monitor")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert __version__ in result.stdout


@pytest.mark.slow
def test_demo_tells_all_four_stories():
    result = subprocess.run([sys.executable, "-m", "monitor", "demo"], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "gpu_lock:0  held" in out
    assert "reason=heartbeat_dead" in out
    assert "reason=soft_timeout_no_heartbeat" in out
    assert "long_task_protected   gpu_lock:2" in out
    assert "reason=hard_timeout" in out
    assert "notice  gpu_lock:gpu_lock:0 forced_by_monitor" in out
    assert "alert   critical" in out
    assert "released (hard_timeout)" in out
    assert "Traceback" not in out + result.stderr
