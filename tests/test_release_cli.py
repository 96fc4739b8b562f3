"""`gpulock-monitor release` as operators run it: at a terminal, over a pipe, and against a
holder that is alive. Real processes: the prompt is answered through a pseudo-terminal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import answer_at_terminal, beat, config_file, events, hold

CLI = [sys.executable, "-m", "monitor"]


@pytest.fixture
def cfg(redis_server, tmp_path) -> Path:
    return config_file(tmp_path, redis_server.url, nvml={"enabled": False})


def piped(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """As over ssh without a tty, from cron or Ansible: stdin is a pipe."""
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


def at_terminal(*args: str, answer: str) -> tuple[int, str]:
    """Run with stdin on a pseudo-terminal; answer the prompt once it is shown."""
    code, _, out = answer_at_terminal([*CLI, *args], answer)
    return code, re.sub(r"\x1b\[[0-9;]*m", "", out.decode(errors="replace"))  # its colours


def test_off_a_terminal_without_yes_releases_nothing(r, cfg, tmp_path):
    hold(r, 4, "tts", age_s=450)  # a zombie by every rule, still not released unasked
    result = piped("release", "gpu_lock:4", "-c", str(cfg), stdin="no\n")
    assert result.returncode == 1
    assert "not a terminal; add --yes (or --holder VALUE)" in result.stderr
    assert "Traceback" not in result.stderr
    assert r.get(b"gpu_lock:4") == b"locked_by_tts"
    assert events(tmp_path / "audit.jsonl", "manual_release") == []


def test_off_a_terminal_with_yes_releases(r, cfg, tmp_path):
    hold(r, 4, "tts", age_s=450)
    result = piped("release", "gpu_lock:4", "--yes", "-c", str(cfg), stdin="")
    assert result.returncode == 0, result.stderr
    assert not r.exists(b"gpu_lock:4")
    (event,) = events(tmp_path / "audit.jsonl", "manual_release")
    assert (event["outcome"], event["forced"]) == ("released", False)


def test_off_a_terminal_holder_is_the_confirmation(r, cfg):
    hold(r, 4, "tts", age_s=450)
    result = piped("release", "gpu_lock:4", "--holder", "locked_by_tts", "-c", str(cfg), stdin="")
    assert result.returncode == 0, result.stderr
    assert not r.exists(b"gpu_lock:4")


def test_live_holder_needs_force(r, cfg, tmp_path):
    key = hold(r, 4, "tts", age_s=30)
    beat(r, key)
    refused = piped("release", "gpu_lock:4", "--yes", "-c", str(cfg), stdin="")
    assert refused.returncode == 1
    assert "heartbeat alive" in refused.stderr
    assert "add --force" in refused.stderr
    assert r.exists(key)
    forced = piped("release", "gpu_lock:4", "--yes", "--force", "-c", str(cfg), stdin="")
    assert forced.returncode == 0, forced.stderr
    assert not r.exists(key)
    (event,) = events(tmp_path / "audit.jsonl", "manual_release")
    assert (event["outcome"], event["forced"], event["heartbeat"]) == ("released", True, "alive")


@pytest.mark.parametrize(("answer", "released"), [("n", False), ("y", True)])
def test_prompt_at_a_terminal_releases_only_on_yes(r, cfg, answer, released):
    hold(r, 4, "tts", age_s=450)
    code, out = at_terminal("release", "gpu_lock:4", "-c", str(cfg), answer=answer)
    # Held time as `status` and `audit` show it (was `450.012 s`).
    assert re.search(r"gpu_lock:4 held by locked_by_tts for 7m\d\ds, heartbeat none, tier soft\. Release it\?", out)
    assert (code == 0) is released, out
    assert (not r.exists(b"gpu_lock:4")) is released


def test_prompt_answered_while_the_same_task_took_the_lock_again(r, cfg):
    # The operator confirmed the holding that was shown; a new run of the same task that took
    # the lock while the prompt waited is another holding, and is left alone.
    hold(r, 4, "tts", age_s=450)

    def same_task_takes_it_again() -> None:
        r.delete(b"gpu_lock:4")
        r.set(b"gpu_lock:4", b"locked_by_tts", ex=600)  # same value, new holding

    code, prompt, _ = answer_at_terminal(
        [*CLI, "release", "gpu_lock:4", "-c", str(cfg)], "y", before_answer=same_task_takes_it_again
    )
    assert prompt
    assert code == 1
    assert r.get(b"gpu_lock:4") == b"locked_by_tts"
    assert r.pttl(b"gpu_lock:4") > 590_000
