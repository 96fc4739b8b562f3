"""Property-based: whatever the config file or the bytes in Redis, every command ends with exit 0
or one line on stderr and a non-zero exit, never a traceback and never a hang, and a daemon pass
never fails on data.

Examples are few and bounded so the suite stays fast; Hypothesis shrinks a failure to its core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml
from click.testing import CliRunner, Result
from helpers import build, config_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.cli import main

# A config check asks Redis what the daemon found: never a host from a random config.
NO_REDIS = {"GPULOCK_MONITOR_REDIS_URL": "unix:///nonexistent/redis.sock"}
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

SECTIONS = {
    "redis": ["url", "password_file", "cluster", "sentinel", "host", "port", "db_locks", "password", "tls"],
    "gpu_lock": ["key_pattern", "lock_timeout", "poll_interval"],
    "gpu_lock_monitor": ["monitor_interval", "timeout_levels", "heartbeat", "cleanup", "enabled", "auto_recovery"],
    "audit": ["path", "critical_path", "max_bytes", "backups"],
    "metrics": ["enabled", "listen"],
    "nvml": ["enabled", "devices", "busy_grace"],
    "alerts": ["channels", "redis_down_after"],
    "logging": ["level", "format"],
}
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e14, 1e308, 1e307, -0.0, 0.5, 30, 600, 65536, "redis://h:abc/0", "redis://[::1", "${X:-1}"]),
    st.text(max_size=40),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A YAML document: our sections with their own (and stray) keys, or raw text."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=200))
    doc = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "celery"]), max_size=4, unique=True)):
        names = SECTIONS.get(section, ["x"])
        keys_ = draw(st.lists(st.sampled_from([*names, "typo"]), max_size=4, unique=True))
        doc[section] = {k: draw(VALUES) for k in keys_}
    return yaml.safe_dump(doc, allow_unicode=True)


def one_line_or_ok(result: Result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@FUZZ
@given(text=documents())
def test_any_config_file_is_ok_or_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "monitor.yml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    started = time.monotonic()
    for command in (["config", "check"], ["config", "show"]):
        one_line_or_ok(CliRunner().invoke(main, [*command, "-c", str(path)], env=NO_REDIS))
    assert time.monotonic() - started < 5


KEY_TAILS = st.binary(min_size=1, max_size=40).filter(lambda b: not b.endswith((b":heartbeat", b":holder")))
BYTES = st.binary(max_size=300)


@FUZZ
@given(tail=KEY_TAILS, value=BYTES, hb=st.none() | BYTES, ttl_ms=st.none() | st.integers(1, 10**9))
def test_any_bytes_in_redis_survive_a_pass_status_and_release(r, redis_server, tmp_path, tail, value, hb, ttl_ms):
    r.flushall()
    key = b"gpu_lock:" + tail
    r.set(key, value, px=ttl_ms)
    if hb is not None:
        r.set(key + b":heartbeat", hb, px=ttl_ms)
    cfg = config_file(tmp_path, redis_server.url, nvml={"enabled": False})
    monitor = build(_settings_for(cfg))
    for _ in range(2):
        report = monitor.run_pass()
        assert report is not None
        assert report.error is None, report.error
    one_line_or_ok(CliRunner().invoke(main, ["status", "-c", str(cfg)]))
    one_line_or_ok(CliRunner().invoke(main, ["status", "--json", "-c", str(cfg)]))
    as_typed = os.fsdecode(key)  # what a shell hands the command for these bytes
    one_line_or_ok(CliRunner().invoke(main, ["release", as_typed, "--yes", "--force", "-c", str(cfg)]))


def _settings_for(cfg: Path):
    from monitor.config import load_settings

    return load_settings(str(cfg), env={})
