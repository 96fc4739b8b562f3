"""Config loading and validation: every error is one line naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import CONFIG_ENV, REDIS_URL_ENV, Settings, find_config, load_settings, read_password, redact_url
from monitor.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_documented_default_config_equals_builtin_defaults():
    documented = load_settings(str(REPO / "monitor.yml"), env={})
    assert documented == Settings.from_mapping({}, env={})
    # DESIGN.md's defaults themselves trip the relation check: with lock_timeout 600 the
    # lock expires before hard_timeout 900 can act. Say so, as for any config.
    (warning,) = documented.warnings
    assert warning.startswith("gpu_lock_monitor.timeout_levels.hard_timeout: 900 s is not below")


def test_fleet_sections_and_fractional_seconds():
    s = Settings.from_mapping(
        {
            "gpu_lock": {"key_pattern": "gpu:*", "lock_timeout": 3600},
            "gpu_lock_monitor": {
                "monitor_interval": 0.25,
                "timeout_levels": {"warning": 1.5, "soft_timeout": 2.5, "hard_timeout": None},
                "heartbeat": {"interval": 0.5, "timeout": 1.25},
                "cleanup": {"max_retry": 5, "retry_delay": 0.1},
            },
        },
        env={},
    )
    assert (s.key_pattern, s.lock_timeout_s, s.monitor_interval_s) == ("gpu:*", 3600.0, 0.25)
    assert (s.warning_s, s.soft_timeout_s, s.hard_timeout_s) == (1.5, 2.5, None)
    assert (s.heartbeat_interval_s, s.heartbeat_timeout_s, s.heartbeat_ttl_s) == (0.5, 1.25, 1.0)
    assert (s.max_retry, s.retry_delay_s) == (5, 0.1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "config: the top level must be a mapping"),
        ({"redis": "x"}, "redis: expected a mapping"),
        ({"redis": {"host": "x"}}, "redis.host: unknown key"),
        ({"redis": {"url": "http://x"}}, "redis.url: expected a redis://"),
        ({"gpu_lock": {"key_pattern": "gpu_lock:0"}}, "gpu_lock.key_pattern: must end with '*'"),
        ({"gpu_lock": {"lock_timeout": "600"}}, "gpu_lock.lock_timeout: expected a number of seconds"),
        ({"gpu_lock": {"lock_timeout": True}}, "gpu_lock.lock_timeout: expected a number"),
        ({"gpu_lock": {"lock_timeout": 0}}, "gpu_lock.lock_timeout: must be a positive number"),
        ({"gpu_lock": {"lock_timeout": float("nan")}}, "gpu_lock.lock_timeout: must be a positive"),
        ({"gpu_lock_monitor": {"monitor_interval": -1}}, "gpu_lock_monitor.monitor_interval: must be a positive"),
        ({"gpu_lock_monitor": {"timeout_levels": {"warn": 1}}}, "gpu_lock_monitor.timeout_levels.warn: unknown key"),
        (
            {"gpu_lock_monitor": {"timeout_levels": {"warning": 700}}},
            "timeout_levels.warning: must be less than soft_timeout",
        ),
        (
            {"gpu_lock_monitor": {"timeout_levels": {"soft_timeout": 900}}},
            "timeout_levels.soft_timeout: must be less than hard_timeout",
        ),
        (
            {"gpu_lock_monitor": {"heartbeat": {"timeout": 60}}},
            "heartbeat.timeout: must be greater than heartbeat.interval",
        ),
        ({"gpu_lock_monitor": {"cleanup": {"max_retry": 0}}}, "cleanup.max_retry: expected an integer >= 1"),
        ({"gpu_lock_monitor": {"cleanup": {"max_retry": 1.5}}}, "cleanup.max_retry: expected an integer"),
        ({"gpu_lock_monitor": {"enabled": "yes"}}, "gpu_lock_monitor.enabled: expected true or false"),
        ({"audit": {"path": ""}}, "audit.path: expected a non-empty string"),
        ({"audit": {"path": "a\0b"}}, "audit.path: expected a non-empty string"),
        ({"audit": {"max_bytes": 10}}, "audit.max_bytes: expected an integer >= 1024"),
        ({"metrics": {"listen": "9464"}}, "metrics.listen: expected HOST:PORT"),
        ({"metrics": {"listen": "127.0.0.1:70000"}}, "metrics.listen: expected HOST:PORT"),
        ({"nvml": {"enabled": "maybe"}}, "nvml.enabled: expected one of auto|true|false"),
        ({"alerts": {"channels": {}}}, "alerts.channels: expected a list"),
        ({"alerts": {"channels": ["x"]}}, "alerts.channels[0]: expected a mapping"),
        ({"alerts": {"channels": [{"type": "pager"}]}}, "alerts.channels[0].type: expected one of"),
        ({"alerts": {"channels": [{"type": "slack", "min_severity": "info"}]}}, "alerts.channels[0].min_severity"),
        ({"logging": {"level": "loud"}}, "logging.level: expected one of"),
        ({"logging": {"format": True}}, "logging.format: expected one of"),
        ({"gpu_lock": {1: 2}}, "gpu_lock.1: unknown key"),
        ({"nvml": {"devices": [0]}}, "nvml.devices: expected a mapping of lock key to device index or UUID"),
        ({"nvml": {"devices": {"gpu_lock:a": "card0"}}}, "nvml.devices.gpu_lock:a: expected a device index"),
        ({"nvml": {"devices": {"gpu_lock:a": -1}}}, "nvml.devices.gpu_lock:a: expected a device index"),
        ({"nvml": {"devices": {"gpu_lock:a": True}}}, "nvml.devices.gpu_lock:a: expected a device index"),
        ({"nvml": {"busy_grace": 0}}, "nvml.busy_grace: must be a positive number"),
    ],
)
def test_invalid_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(raw, env={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_warnings_for_unknown_sections_and_useless_hard_cap():
    s = Settings.from_mapping({"celery": {}, "gpu_lock": {"lock_timeout": 900}}, env={})
    assert any(w.startswith("celery: unknown section") for w in s.warnings)
    assert any("hard_timeout" in w and "lock_timeout" in w for w in s.warnings)


def test_nvml_devices_by_index_or_uuid():
    s = Settings.from_mapping({"nvml": {"devices": {"gpu_lock:n7-0": 0, "gpu_lock:n7-1": "GPU-8a1e"}}}, env={})
    assert s.nvml_devices == {"gpu_lock:n7-0": 0, "gpu_lock:n7-1": "GPU-8a1e"}


def test_nvml_accepts_yaml_booleans():
    assert Settings.from_mapping({"nvml": {"enabled": True}}, env={}).nvml_enabled == "true"
    assert Settings.from_mapping({"nvml": {"enabled": "AUTO"}}, env={}).nvml_enabled == "auto"


def test_env_overrides_redis_url():
    s = Settings.from_mapping({"redis": {"url": "redis://a:1/0"}}, env={REDIS_URL_ENV: "redis://b:2/2"})
    assert s.redis_url == "redis://b:2/2"


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(None, env={}) in (None, Path("/etc/gpulock-monitor/monitor.yml"))
    (tmp_path / "monitor.yml").write_text("{}")
    assert find_config(None, env={}) == Path("monitor.yml")
    (tmp_path / "env.yml").write_text("{}")
    assert find_config(None, env={CONFIG_ENV: "env.yml"}) == Path("env.yml")
    (tmp_path / "flag.yml").write_text("{}")
    assert find_config("flag.yml", env={CONFIG_ENV: "env.yml"}) == Path("flag.yml")


@pytest.mark.parametrize(
    ("flag", "env", "message"),
    [
        ("nope.yml", {}, "--config: config file nope.yml does not exist"),
        (None, {CONFIG_ENV: "gone.yml"}, f"{CONFIG_ENV}: config file gone.yml"),
    ],
)
def test_named_file_must_exist(tmp_path, monkeypatch, flag, env, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_settings(flag, env=env)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("redis:\n  url: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yml: .*line \d+"):
        load_settings(str(bad), env={})


def test_semantic_error_names_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("gpu_lock:\n  lock_timeout: -5\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: gpu_lock\.lock_timeout"):
        load_settings(str(bad), env={})


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bin.yml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(bad), env={})


def test_empty_file_is_defaults(tmp_path):
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_settings(str(empty), env={}) == Settings()


def test_password_file_with_credentials_directory(tmp_path):
    (tmp_path / "redis-password").write_text("s3cret\n")
    s = Settings.from_mapping({"redis": {"password_file": "${CREDENTIALS_DIRECTORY}/redis-password"}}, env={})
    assert read_password(s, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "s3cret"
    with pytest.raises(ConfigError, match=r"redis\.password_file: cannot read"):
        read_password(s, env={"CREDENTIALS_DIRECTORY": str(tmp_path / "missing")})
    assert read_password(Settings(), env={}) is None


def test_redaction():
    assert redact_url("redis://user:pw@host:6380/2") == "redis://user:***@host:6380/2"
    assert redact_url("redis://:pw@host/0") == "redis://:***@host/0"
    assert redact_url("redis://host/0") == "redis://host/0"
    shown = Settings.from_mapping(
        {
            "redis": {"url": "redis://:pw@h/0"},
            "alerts": {
                "channels": [
                    {"type": "dingtalk", "access_token": "T0KEN-VALUE", "secret": "abc", "min_severity": "critical"},
                    {"type": "webhook", "url": "https://hooks/x", "headers": {"Authorization": "Bearer q"}},
                    {
                        "type": "email",
                        "host": "smtp",
                        "from": "a@b",
                        "to": ["c@d"],
                        "password_file": "/run/smtp-password",
                    },
                ]
            },
        },
        env={},
    ).redacted()
    assert shown["redis"]["url"] == "redis://:***@h/0"
    dingtalk, webhook, email = shown["alerts"]["channels"]
    assert dingtalk == {"type": "dingtalk", "access_token": "***", "secret": "***", "min_severity": "critical"}
    assert webhook == {"type": "webhook", "url": "***", "headers": "***"}
    assert email["password_file"] == "/run/smtp-password"
    assert "T0KEN-VALUE" not in repr(shown)
    assert "Bearer" not in repr(shown)
    assert "pw" not in repr(shown)
    assert "abc" not in repr(shown)
