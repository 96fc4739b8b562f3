"""Redis Sentinel: the monitor finds the master through a real sentinel process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from helpers import config_file, events, hold

from monitor.config import Settings
from monitor.errors import ConfigError


def test_monitor_reaches_the_master_through_sentinel(sentinel, tmp_path):
    master, port = sentinel
    client = redis.Redis.from_url(master.url, protocol=2)
    hold(client, 0, age_s=450)
    cfg = config_file(
        tmp_path,
        "redis://127.0.0.1:1/0",  # host and port come from the sentinel; the URL gives the DB
        redis={"sentinel": {"service": "gpulocks", "nodes": [f"127.0.0.1:{port}"]}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--once", "-c", str(cfg)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not client.exists(b"gpu_lock:0")
    assert [e["lock_key"] for e in events(tmp_path / "audit.jsonl", "lock_released")] == ["gpu_lock:0"]


@pytest.mark.parametrize(
    ("sentinel_cfg", "message"),
    [
        ({"service": "gpulocks"}, "redis.sentinel: give both service and nodes, or neither"),
        ({"nodes": ["127.0.0.1:26379"]}, "redis.sentinel: give both service and nodes, or neither"),
        ({"service": "s", "nodes": "127.0.0.1:26379"}, "redis.sentinel.nodes: expected a list of HOST:PORT"),
        ({"service": "s", "nodes": ["nowhere"]}, r"redis.sentinel.nodes\[0\]: expected HOST:PORT"),
        ({"service": "s", "nodes": ["h:26379"], "cluster": True}, "redis.cluster: a cluster is not reached through"),
    ],
)
def test_bad_sentinel_options_are_config_errors(sentinel_cfg, message):
    cluster = sentinel_cfg.pop("cluster", False)
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping({"redis": {"sentinel": sentinel_cfg, "cluster": cluster}}, env={})
