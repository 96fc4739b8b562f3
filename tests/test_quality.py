"""Lint, types and docs are part of the suite, so the README's one test command checks them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_lint_passes():
    result = run("ruff", "check", "monitor", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_is_ruff_formatted():
    result = run("ruff", "format", "--check", "monitor", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes():
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme)
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("gpulock-monitor demo")
    assert "--cov=monitor --cov-branch" in tests
    assert "--cov-fail-under=90" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()
