"""Config loading and validation: every error is one line naming the key path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml
from helpers import events

from monitor.config import (
    CONFIG_ENV,
    FLEET_GPU_LOCK_KEYS,
    FLEET_GPU_LOCK_MONITOR_KEYS,
    FLEET_REDIS_KEYS,
    FOREIGN_LOGGING_KEYS,
    REDIS_URL_ENV,
    Settings,
    find_config,
    load_settings,
    read_password,
)
from monitor.demo.redis_server import RedisServer
from monitor.errors import ConfigError
from monitor.redact import redact_url

REPO = Path(__file__).resolve().parent.parent
FLEET_CONFIG = REPO / "tests" / "data" / "fleet_config.yml"


def test_documented_default_config_equals_builtin_defaults():
    documented = load_settings(str(REPO / "monitor.yml"), env={})
    assert documented == Settings.from_mapping({}, env={})
    # DESIGN.md's defaults themselves trip the relation check: with lock_timeout 600 the
    # lock expires before hard_timeout 900 can act. Say so, as for any config.
    (warning,) = documented.warnings
    assert warning.startswith("gpu_lock_monitor.timeout_levels.hard_timeout: 900 s is not below")


def test_fleet_sections_are_read_with_fractional_seconds():
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
        ({"redis": {"hostname": "x"}}, "redis.hostname: unknown key"),
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


def test_nvml_devices_map_lock_keys_to_a_device_index_or_uuid():
    s = Settings.from_mapping({"nvml": {"devices": {"gpu_lock:n7-0": 0, "gpu_lock:n7-1": "GPU-8a1e"}}}, env={})
    assert s.nvml_devices == {"gpu_lock:n7-0": 0, "gpu_lock:n7-1": "GPU-8a1e"}


def test_nvml_accepts_yaml_booleans():
    assert Settings.from_mapping({"nvml": {"enabled": True}}, env={}).nvml_enabled == "true"
    assert Settings.from_mapping({"nvml": {"enabled": "AUTO"}}, env={}).nvml_enabled == "auto"


def test_env_overrides_redis_url():
    s = Settings.from_mapping({"redis": {"url": "redis://a:1/0"}}, env={REDIS_URL_ENV: "redis://b:2/2"})
    assert s.redis_url == "redis://b:2/2"


def test_config_file_is_found_by_flag_then_environment_then_working_directory(tmp_path, monkeypatch):
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


def test_config_file_that_is_not_text_cannot_be_read(tmp_path):
    bad = tmp_path / "bin.yml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(bad), env={})


def test_empty_file_is_defaults(tmp_path):
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_settings(str(empty), env={}) == Settings()


def test_password_file_is_read_from_the_credentials_directory(tmp_path):
    (tmp_path / "redis-password").write_text("s3cret\n")
    s = Settings.from_mapping({"redis": {"password_file": "${CREDENTIALS_DIRECTORY}/redis-password"}}, env={})
    assert read_password(s, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "s3cret"
    with pytest.raises(ConfigError, match=r"redis\.password_file: cannot read"):
        read_password(s, env={"CREDENTIALS_DIRECTORY": str(tmp_path / "missing")})
    assert read_password(Settings(), env={}) is None


def test_redacted_settings_mask_every_password_token_secret_and_header():
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
    assert webhook == {"type": "webhook", "url": "https://hooks/***", "headers": {"Authorization": "***"}}
    assert email["password_file"] == "/run/smtp-password"
    assert "T0KEN-VALUE" not in repr(shown)
    assert "Bearer" not in repr(shown)
    assert "pw" not in repr(shown)
    assert "abc" not in repr(shown)


# --- the fleet's own config.yml ------------------------------------------------------------


def _with_path(section: str, dotted: str, value: object) -> dict[str, object]:
    """{section: {a: {b: value}}} for "a.b"."""
    tree: object = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return {section: tree}


@pytest.mark.parametrize(
    ("section", "key"),
    [
        *(("gpu_lock", k) for k in sorted(FLEET_GPU_LOCK_KEYS)),
        *(("gpu_lock_monitor", k) for k in sorted(FLEET_GPU_LOCK_MONITOR_KEYS)),
        *(("redis", k) for k in sorted(FLEET_REDIS_KEYS)),
        *(("logging", k) for k in sorted(FOREIGN_LOGGING_KEYS)),
        ("gpu_lock", "heartbeat.enabled"),
        ("gpu_lock_monitor", "health_thresholds.min_success_rate"),
    ],
)
def test_fleet_worker_keys_are_accepted_silently(section, key):
    s = Settings.from_mapping(_with_path(section, key, {"any": ["value", 1]}), env={})
    assert s == Settings.from_mapping({}, env={})
    assert s.warnings == Settings.from_mapping({}, env={}).warnings


def test_the_keys_design_names_are_on_the_lists():
    named = {"poll_interval", "max_wait_time", "exponential_backoff", "max_poll_interval", "use_event_driven"}
    assert named | {"fallback_timeout"} <= FLEET_GPU_LOCK_KEYS
    assert {"heartbeat.enabled", "health_thresholds"} <= FLEET_GPU_LOCK_MONITOR_KEYS


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"gpu_lock": {"poll_intervall": 2}}, "gpu_lock.poll_intervall: unknown key"),
        ({"gpu_lock_monitor": {"poll_interval": 2}}, "gpu_lock_monitor.poll_interval: unknown key"),
        ({"gpu_lock_monitor": {"heartbeat": {"enable": True}}}, "gpu_lock_monitor.heartbeat.enable: unknown key"),
        ({"gpu_lock_monitor": {"health_threshold": {}}}, "gpu_lock_monitor.health_threshold: unknown key"),
        ({"gpu_lock_monitor": {"timeout_levels": {"enabled": True}}}, "timeout_levels.enabled: unknown key"),
        ({"redis": {"db_lock": 2}}, "redis.db_lock: unknown key"),
        ({"logging": {"levels": "info"}}, "logging.levels: unknown key"),
    ],
)
def test_keys_off_the_lists_are_still_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping(raw, env={})


def test_ignored_keys_and_unknown_sections_are_not_expanded():
    raw = {"gpu_lock": {"poll_interval": "${UNSET_VAR}"}, "celery": {"broker_url": "${UNSET_VAR}"}}
    s = Settings.from_mapping(raw, env={})
    assert s.warnings[0] == "celery: unknown section, ignored"


def test_many_unknown_sections_are_one_warning():
    s = Settings.from_mapping({"core": {}, "ocr": {}, "celery": {}}, env={})
    assert s.warnings[0] == "core, ocr, celery: unknown sections, ignored"


def test_fleet_config_file_loads_as_it_is():
    env = {"REDIS_HOST": "10.1.2.3", "REDIS_PASSWORD": "fleet-pw"}
    s = load_settings(str(FLEET_CONFIG), env=env)
    assert s.redis_url == "redis://10.1.2.3:6379/2"
    assert read_password(s, env={}) == "fleet-pw"
    assert (s.lock_timeout_s, s.monitor_interval_s) == (3600.0, 30.0)
    assert (s.warning_s, s.soft_timeout_s, s.hard_timeout_s) == (1800.0, 3600.0, 7200.0)
    assert (s.heartbeat_interval_s, s.heartbeat_timeout_s, s.max_retry, s.retry_delay_s) == (60.0, 300.0, 3, 60.0)
    assert (s.log_level, s.log_format) == ("info", "auto")
    assert s.warnings[0].endswith(": unknown sections, ignored")
    assert s.warnings[0].startswith("core, celery, decoder, ocr, ai_providers, audio_separator_service:")
    assert s.warnings[1].startswith("logging.format: '%(asctime)s")
    assert "hard_timeout: 7200 s is not below gpu_lock.lock_timeout" in s.warnings[2]
    assert len(s.warnings) == 3
    # Without the environment: the file's own defaults.
    assert load_settings(str(FLEET_CONFIG), env={}).redis_url == "redis://redis:6379/2"
    assert read_password(load_settings(str(FLEET_CONFIG), env={}), env={}) is None


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (REDIS_URL_ENV, CONFIG_ENV)}
    for name in ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD"):
        env.pop(name, None)
    return {**env, **extra}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )


def _fleet_config_with_audit(tmp_path: Path) -> Path:
    """The fleet's file plus only where the audit goes (its default, /var/log, is not writable here)."""
    config = tmp_path / "config.yml"
    audit = f"audit:\n  path: {tmp_path / 'audit.jsonl'}\n  critical_path: {tmp_path / 'critical.jsonl'}\n"
    config.write_text(FLEET_CONFIG.read_text() + audit)
    return config


def test_cli_config_check_accepts_the_fleet_config():
    result = _cli("config", "check", "-c", str(FLEET_CONFIG), env=_cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "config ok"
    assert "unknown key" not in result.stderr


def test_cli_run_once_with_the_fleet_config(redis_server, tmp_path):
    # The fleet's locks live in db_locks (2); host and port come from its ${VAR:default}s.
    locks = redis.Redis(host="127.0.0.1", port=redis_server.port, db=2, protocol=2)
    other = redis.Redis(host="127.0.0.1", port=redis_server.port, db=0, protocol=2)
    try:
        locks.flushall()
        # 2000 s into a 3600 s EX: past the fleet's 1800 s warning tier.
        locks.set("gpu_lock:0", "locked_by_tts_synthesize", px=(3600 - 2000) * 1000)
        other.set("gpu_lock:1", "locked_by_elsewhere", px=(3600 - 2000) * 1000)
        env = _cli_env(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_server.port))
        result = _cli("run", "--once", "-c", str(_fleet_config_with_audit(tmp_path)), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        warned = [e["lock_key"] for e in events(tmp_path / "audit.jsonl", "lock_warning")]
        assert warned == ["gpu_lock:0"]
    finally:
        locks.flushall()
        locks.close()
        other.close()


def test_cli_fleet_password_is_sent_and_never_shown(tmp_path):
    secret = "Fleet-Redis-Pw-8841"
    with RedisServer() as own:
        client = redis.Redis(host="127.0.0.1", port=own.port, protocol=2)
        client.config_set("requirepass", secret)
        client.close()
        config = _fleet_config_with_audit(tmp_path)
        base = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(own.port)}
        with_password = _cli_env(**base, REDIS_PASSWORD=secret)
        ran = _cli("run", "--once", "-c", str(config), env=with_password)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        shown = _cli("config", "show", "-c", str(config), env=with_password)
        assert shown.returncode == 0, shown.stderr
        assert yaml.safe_load(shown.stdout)["redis"]["password"] == "***"
        assert yaml.safe_load(shown.stdout)["redis"]["url"] == f"redis://127.0.0.1:{own.port}/2"
        refused = _cli("run", "--once", "-c", str(config), env=_cli_env(**base))
        assert refused.returncode == 1
        assert "Authentication required" in refused.stdout
        for result in (ran, shown, refused):
            assert secret not in result.stdout + result.stderr


# --- ${VAR} expansion ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("plain", {}, "plain"),
        ("${HOST}", {"HOST": "h1"}, "h1"),
        ("${HOST:redis}", {}, "redis"),
        ("${HOST:redis}", {"HOST": "h1"}, "h1"),
        ("${HOST:redis}", {"HOST": ""}, "redis"),
        ("${HOST:-redis}", {}, "redis"),
        ("${HOST:-redis}", {"HOST": ""}, "redis"),
        ("${HOST:-redis}", {"HOST": "h1"}, "h1"),
        ("${HOST:}", {}, ""),
        ("${HOST}", {"HOST": ""}, ""),
        ("redis://${HOST:h}:${PORT:6379}/${DB:2}", {"PORT": "7000"}, "redis://h:7000/2"),
        ("${A}", {"A": "${B}", "B": "no"}, "${B}"),  # one pass: a value is never expanded again
        ("${A:x}", {"A": "$${B:-y}"}, "$${B:-y}"),
        ("$${HOST}", {"HOST": "h1"}, "${HOST}"),
        ("a:${HOST:-b:c}", {}, "a:b:c"),
        ("cost $5", {}, "cost $5"),
    ],
)
def test_environment_references_expand_with_defaults_in_one_pass(value, env, expected):
    s = Settings.from_mapping({"gpu_lock": {"key_pattern": f"{value}*"}}, env=env)
    assert s.key_pattern == f"{expected}*"
    assert type(s.key_pattern) is str


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${NOT_SET}*", "gpu_lock.key_pattern: environment variable NOT_SET is not set"),
        ("${A:${B}}*", "gpu_lock.key_pattern: malformed ${...} reference"),
        ("${A*", "gpu_lock.key_pattern: malformed ${...} reference"),
        ("${1A}*", "gpu_lock.key_pattern: malformed ${...} reference"),
        ("${A-x}*", "gpu_lock.key_pattern: malformed ${...} reference"),
    ],
)
def test_expansion_errors_name_the_key(value, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"gpu_lock": {"key_pattern": value}}, env={})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "env", "attribute", "expected"),
    [
        ({"gpu_lock": {"lock_timeout": "${LT:3600}"}}, {}, "lock_timeout_s", 3600.0),
        ({"gpu_lock": {"lock_timeout": "${LT}"}}, {"LT": "1800.5"}, "lock_timeout_s", 1800.5),
        ({"gpu_lock_monitor": {"enabled": "${ON:false}"}}, {}, "enabled", False),
        ({"gpu_lock_monitor": {"enabled": "${ON:false}"}}, {"ON": "True"}, "enabled", True),
        ({"gpu_lock_monitor": {"timeout_levels": {"hard_timeout": "${H:null}"}}}, {}, "hard_timeout_s", None),
        ({"gpu_lock_monitor": {"cleanup": {"max_retry": "${R:5}"}}}, {}, "max_retry", 5),
        ({"redis": {"sentinel": {"service": "${S:}", "nodes": []}}}, {}, "sentinel_service", None),
        ({"redis": {"sentinel": {"service": "m", "nodes": ["${SN:h:26379}"]}}}, {}, "sentinel_nodes", ("h:26379",)),
        ({"nvml": {"enabled": "${NVML:auto}"}}, {}, "nvml_enabled", "auto"),
        ({"metrics": {"listen": "${ADDR:0.0.0.0}:9464"}}, {}, "metrics_listen", "0.0.0.0:9464"),
        ({"logging": {"level": "${LOG_LEVEL:INFO}"}}, {}, "log_level", "info"),
    ],
)
def test_expanded_values_are_read_as_yaml_scalars(raw, env, attribute, expected):
    assert getattr(Settings.from_mapping(raw, env=env), attribute) == expected


@pytest.mark.parametrize(
    ("raw", "env", "message"),
    [
        ({"gpu_lock": {"lock_timeout": "${LT}"}}, {"LT": "soon"}, "gpu_lock.lock_timeout: expected a number"),
        ({"gpu_lock_monitor": {"enabled": "${ON}"}}, {"ON": "yes"}, "gpu_lock_monitor.enabled: expected true or false"),
        ({"redis": {"port": "${P}"}}, {"P": "http"}, "redis.port: expected a port number 1..65535, got 'http'"),
        ({"redis": {"db_locks": "${DB}"}}, {"DB": "-1"}, "redis.db_locks: expected a database number >= 0, got -1"),
        ({"redis": {"host": "${H}"}}, {"H": ""}, "redis.host: expected a non-empty string"),
    ],
)
def test_bad_expanded_values_name_the_key(raw, env, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(raw, env=env)
    assert str(info.value).startswith(message)


def test_config_show_dumps_expanded_values(tmp_path):
    cfg = tmp_path / "m.yml"
    cfg.write_text("redis:\n  host: ${H:db}\ngpu_lock:\n  key_pattern: ${P:gpu_lock:*}\n")
    shown = yaml.safe_dump(load_settings(str(cfg), env={}).redacted())
    assert yaml.safe_load(shown)["redis"]["url"] == "redis://db:6379/0"


# --- the fleet's redis form -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("redis_section", "env", "url"),
    [
        ({}, {}, "redis://localhost:6379/0"),
        ({"host": "redis"}, {}, "redis://redis:6379/0"),
        ({"host": "redis", "port": 6380}, {}, "redis://redis:6380/0"),
        ({"host": "redis", "port": 6379, "db_locks": 2}, {}, "redis://redis:6379/2"),
        ({"port": 7000, "db": 3}, {}, "redis://localhost:7000/3"),
        ({"host": "redis", "db": 0, "db_locks": 2}, {}, "redis://redis:6379/2"),  # db_locks is the lock DB
        ({"host": "::1", "port": 6379}, {}, "redis://[::1]:6379/0"),
        ({"host": "[fe80::1]"}, {}, "redis://[fe80::1]:6379/0"),
        ({"host": "${REDIS_HOST:redis}", "port": "${REDIS_PORT:6379}", "db_locks": 2}, {}, "redis://redis:6379/2"),
        (
            {"host": "${REDIS_HOST:redis}", "port": "${REDIS_PORT:6379}", "db_locks": "${REDIS_LOCK_DB:2}"},
            {"REDIS_HOST": "10.0.0.7", "REDIS_PORT": "6390", "REDIS_LOCK_DB": "4"},
            "redis://10.0.0.7:6390/4",
        ),
        # Precedence: redis.url beats host/port; $GPULOCK_MONITOR_REDIS_URL beats both.
        ({"url": "redis://u:1/5", "host": "redis", "port": 6380, "db_locks": 2}, {}, "redis://u:1/5"),
        ({"url": "redis://u:1/5", "host": "redis"}, {REDIS_URL_ENV: "redis://e:2/6"}, "redis://e:2/6"),
        ({"host": "redis", "db_locks": 2}, {REDIS_URL_ENV: "redis://e:2/6"}, "redis://e:2/6"),
        ({"host": "redis"}, {REDIS_URL_ENV: ""}, "redis://redis:6379/0"),
    ],
)
def test_redis_host_port_and_db_give_the_url_unless_url_or_environment_is_set(redis_section, env, url):
    assert Settings.from_mapping({"redis": redis_section}, env=env).redis_url == url


def test_url_beside_host_form_says_what_is_not_used():
    s = Settings.from_mapping({"redis": {"url": "redis://u:1/5", "host": "redis", "db_locks": 2}}, env={})
    assert "redis.host, redis.db_locks: not used, redis.url is given" in s.warnings


@pytest.mark.parametrize(
    ("redis_section", "message"),
    [
        ({"port": 0}, "redis.port: expected a port number 1..65535, got 0"),
        ({"port": 65536}, "redis.port: expected a port number 1..65535, got 65536"),
        ({"port": -1}, "redis.port: expected a port number"),
        ({"port": "6379"}, "redis.port: expected a port number"),  # quoted: text, as for every number
        ({"port": True}, "redis.port: expected a port number"),
        ({"port": 6379.5}, "redis.port: expected a port number"),
        ({"db_locks": -1}, "redis.db_locks: expected a database number >= 0, got -1"),
        ({"db_locks": "2"}, "redis.db_locks: expected a database number"),
        ({"db": 1.5}, "redis.db: expected a database number"),
        ({"db": False}, "redis.db: expected a database number"),
        ({"host": ""}, "redis.host: expected a non-empty string"),
        ({"host": 10}, "redis.host: expected a non-empty string"),
        ({"host": "redis host"}, "redis.host: expected a host name or address"),
        ({"host": "user@redis"}, "redis.host: expected a host name or address"),
        ({"host": "redis/2"}, "redis.host: expected a host name or address"),
        ({"host": "[]"}, "redis.host: expected a host name or address"),
        ({"password": 123456}, "redis.password: expected a string (quote it in YAML), got a int"),
        ({"password": "a\nb"}, "redis.password: must not contain NUL or line breaks"),
        ({"password": "pw", "password_file": "/run/pw"}, "redis.password: give password or password_file"),
        ({"password": "pw", "url": "redis://:other@h/2"}, "redis.password: the Redis URL has a password too"),
        ({"url": "http://:pw@h/0"}, "redis.url: expected a redis://, rediss:// or unix:// URL, got 'http://:***@h/0'"),
    ],
)
def test_redis_form_errors_name_the_key(redis_section, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"redis": redis_section}, env={})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert "123456" not in str(info.value)


def test_fleet_password_beside_a_url_password_from_the_environment_is_an_error():
    raw = {"redis": {"host": "r", "password": "pw"}}
    with pytest.raises(ConfigError, match=r"redis\.password: the Redis URL has a password too"):
        Settings.from_mapping(raw, env={REDIS_URL_ENV: "redis://:pw2@e/2"})
    assert Settings.from_mapping(raw, env={REDIS_URL_ENV: "redis://u@e/2"}).redis_url == "redis://u@e/2"


def test_fleet_password_is_masked_everywhere():
    s = Settings.from_mapping({"redis": {"host": "r", "password": "${REDIS_PASSWORD}"}}, env={"REDIS_PASSWORD": "pw9"})
    assert read_password(s, env={}) == "pw9"
    assert s.redacted()["redis"]["password"] == "***"
    assert "pw9" not in repr(s)
    assert "pw9" not in repr(s.redacted())
    assert "pw9" not in s.redis_url
    none = Settings.from_mapping({"redis": {"password": "${REDIS_PASSWORD:}"}}, env={})
    assert none.redis_password is None
    assert none.redacted()["redis"]["password"] is None
    assert read_password(none, env={}) is None


def test_password_file_expands_when_read_with_defaults(tmp_path):
    (tmp_path / "redis-password").write_text("from-file\n")
    s = Settings.from_mapping({"redis": {"password_file": "${CREDS:" + str(tmp_path) + "}/redis-password"}}, env={})
    assert read_password(s, env={}) == "from-file"
    unset = Settings.from_mapping({"redis": {"password_file": "${CREDS}/redis-password"}}, env={})
    with pytest.raises(ConfigError, match=r"redis\.password_file: environment variable CREDS is not set"):
        read_password(unset, env={})


# --- logging: ours and an application's -----------------------------------------------------


@pytest.mark.parametrize(
    ("logging_section", "level", "fmt", "warning"),
    [
        ({"level": "INFO", "format": "JSON"}, "info", "json", None),
        ({"format": "%(asctime)s %(message)s"}, "info", "auto", "logging.format: '%(asctime)s %(message)s' is a Py"),
        ({"format": "{asctime} {message}", "datefmt": "%H:%M"}, "info", "auto", "logging.format: '{asctime}"),
        ({"version": 1, "handlers": {"console": {}}, "root": {"level": "DEBUG"}}, "info", "auto", None),
        ({"level": "debug", "file": "/app/logs/app.log", "max_bytes": 1, "backup_count": 5}, "debug", "auto", None),
    ],
)
def test_logging_section_shared_with_the_application(logging_section, level, fmt, warning):
    s = Settings.from_mapping({"logging": logging_section, "gpu_lock": {"lock_timeout": 1000}}, env={})
    assert (s.log_level, s.log_format) == (level, fmt)
    shown = [w for w in s.warnings if w.startswith("logging")]
    assert len(shown) == (warning is not None)
    assert all(w.startswith(str(warning)) for w in shown)


# --- hostile config files: one clear line, quickly, whatever the file holds ------------------------

LIMITS_ENV = {"GPULOCK_MONITOR_REDIS_URL": "unix:///nonexistent/redis.sock"}  # config check must not need Redis


def _billion_laughs(where: str) -> str:
    """Nine levels of ten aliases each: 10**9 values once expanded, a few hundred bytes written."""
    lines = ['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"lol{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n" + where + "\n"


def _deep(levels: int) -> str:
    return "gpu_lock:\n  key_pattern: " + "[" * levels + "]" * levels + "\n"


HOSTILE_FILES = {
    "billion laughs under a known key": _billion_laughs("gpu_lock:\n  key_pattern: *l8"),
    "billion laughs under an ignored fleet key": _billion_laughs("gpu_lock:\n  poll_interval: *l8"),
    "billion laughs in an unknown section": _billion_laughs("celery: {x: *l8}"),
    "billion laughs in a channel": _billion_laughs("alerts:\n  channels: [{type: email, host: h, from: f, to: *l8}]"),
    "3000 levels of flow nesting": _deep(3000),
    "5000 levels of flow nesting": _deep(5000),
    "5000 levels of mappings": "gpu_lock:\n  key_pattern: " + "{a: " * 5000 + "b" + "}" * 5000 + "\n",
    "nesting built from aliases": "\n".join(
        [f"d0: &d0 {'[' * 40}{']' * 40}"] + [f"d{i}: &d{i} {'[' * 40}*d{i - 1}{']' * 40}" for i in range(1, 30)]
    )
    + "\ngpu_lock: {key_pattern: *d29}\n",
    "a recursive alias": "gpu_lock:\n  key_pattern: &r [*r]\n",
    "a recursive mapping": "gpu_lock_monitor: &m\n  heartbeat: *m\n",
    "an integer of 5000 digits": "gpu_lock:\n  lock_timeout: " + "1" * 5000 + "\n",
    "a python tag": "gpu_lock: !!python/object/apply:os.system ['true']\n",
    "a timestamp out of range": "gpu_lock:\n  key_pattern: 2024-13-45\n",
    "a key of 500 KB": "gpu_lock:\n  " + "k" * 500_000 + ": 1\n",
    "a value of 500 KB": "gpu_lock:\n  lock_timeout: " + "x" * 500_000 + "\n",
    "a value of 500 KB with line breaks": 'gpu_lock:\n  lock_timeout: "' + "x\\n" * 200_000 + '"\n',
    "a list of 100000 values": "gpu_lock:\n  lock_timeout: [" + "1," * 100_000 + "]\n",
    "a key with a line break": 'gpu_lock:\n  "a\\nb": 1\n',
    "a section that is a long list": "redis: [" + "x," * 100_000 + "]\n",
    "many unknown sections": "".join(f"s{i}: 1\n" for i in range(10_000)),
    "control characters": 'gpu_lock:\n  key_pattern: "\\e[31m\\r"\n',
}


@pytest.mark.parametrize("text", HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys())
def test_hostile_config_is_one_short_line_quickly(tmp_path, text):
    config = tmp_path / "m.yml"
    config.write_text(text)
    started = time.monotonic()
    try:
        settings = load_settings(str(config), env={})
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert "\r" not in message
        assert "\x1b" not in message
        assert len(message) < 400, message[:400]
    else:  # the few that are valid: unknown sections, only warned about
        assert all(len(w) < 400 for w in settings.warnings)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("billion laughs under a known key", "more than 10000 values once aliases are expanded"),
        ("5000 levels of flow nesting", "nested more than 64 levels deep (line 2"),
        ("5000 levels of mappings", "nested more than 64 levels deep"),
        ("nesting built from aliases", "nested more than 64 levels deep (aliases expanded)"),
        ("a recursive alias", "an alias refers to a node that contains it"),
        ("an integer of 5000 digits", "a value YAML cannot read"),
        ("a python tag", "could not determine a constructor for the tag"),
        ("a key of 500 KB", "mapping values are not allowed here (line 2, column 500003)"),
    ],
)
def test_hostile_config_errors_say_what_is_wrong(tmp_path, name, message):
    config = tmp_path / "m.yml"
    config.write_text(HOSTILE_FILES[name])
    with pytest.raises(ConfigError) as info:
        load_settings(str(config), env={})
    assert str(info.value).startswith(f"{config}: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    "command", [["config", "check"], ["config", "show"], ["status"], ["health"], ["run", "--once"]]
)
@pytest.mark.parametrize(
    "name", ["billion laughs under a known key", "5000 levels of flow nesting", "a recursive alias", "a key of 500 KB"]
)
def test_every_command_refuses_a_hostile_config_in_one_line(tmp_path, command, name):
    config = tmp_path / "m.yml"
    config.write_text(HOSTILE_FILES[name])
    result = _cli(*command, "-c", str(config), env=_cli_env(**LIMITS_ENV))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    if command == ["health"]:  # a Nagios check: UNKNOWN (3), its line on stdout
        assert (result.returncode, result.stderr) == (3, "")
        (line,) = result.stdout.splitlines()
        assert line.startswith(f"unknown: {config}: ")
    else:
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"gpulock-monitor: {config}: ")
    assert len(line) < 400


def test_a_config_file_over_the_size_limit_is_refused_unread(tmp_path):
    config = tmp_path / "big.yml"
    config.write_text("gpu_lock:\n  lock_timeout: 600\n" + "# padding\n" * 200_000)  # 2 MB of comments
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"big\.yml: larger than 1024 KiB; not a config file$"):
        load_settings(str(config), env={})
    assert time.monotonic() - started < 1
    config.write_text("gpu_lock:\n  lock_timeout: 600\n" + "# padding\n" * 100_000)  # 1 MB: still read
    assert load_settings(str(config), env={}).lock_timeout_s == 600


def test_aliases_and_merge_keys_of_a_normal_config_still_work(tmp_path):
    config = tmp_path / "m.yml"
    config.write_text(
        "defaults: &beat {interval: 30, timeout: 120}\n"
        "tiers: &tiers {warning: 100, soft_timeout: 200}\n"
        "gpu_lock_monitor:\n"
        "  heartbeat: *beat\n"
        "  timeout_levels:\n"
        "    <<: *tiers\n"
        "    hard_timeout: 300\n"
    )
    s = load_settings(str(config), env={})
    assert (s.heartbeat_interval_s, s.heartbeat_timeout_s) == (30, 120)
    assert (s.warning_s, s.soft_timeout_s, s.hard_timeout_s) == (100, 200, 300)


# --- every number range-checked where it is read -------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gpu_lock_monitor.monitor_interval", 1e14),
        ("gpu_lock_monitor.monitor_interval", 100_000_000_000_000),
        ("gpu_lock_monitor.monitor_interval", 1e308),
        ("gpu_lock_monitor.monitor_interval", float("inf")),
        ("gpu_lock_monitor.monitor_interval", 1e-300),
        ("gpu_lock_monitor.monitor_interval", 604_801),
        ("gpu_lock.lock_timeout", 1e308),
        ("gpu_lock.lock_timeout", 10**400),
        ("gpu_lock.lock_timeout", -(10**400)),
        ("gpu_lock.lock_timeout", 31_536_001),
        ("gpu_lock.lock_timeout", float("-inf")),
        ("gpu_lock_monitor.heartbeat.interval", 1e307),
        ("gpu_lock_monitor.heartbeat.timeout", 1e307),
        ("gpu_lock_monitor.timeout_levels.warning", 1e300),
        ("gpu_lock_monitor.timeout_levels.soft_timeout", 1e300),
        ("gpu_lock_monitor.timeout_levels.hard_timeout", 1e300),
        ("gpu_lock_monitor.timeout_levels.hard_timeout", float("nan")),
        ("gpu_lock_monitor.cleanup.retry_delay", 1e12),
        ("gpu_lock_monitor.cleanup.max_retry", 10**9),
        ("audit.max_bytes", 10**30),
        ("audit.backups", 10**9),
        ("nvml.busy_grace", 1e300),
        ("nvml.devices.gpu_lock:0", 10**20),
        ("alerts.redis_down_after", 1e300),
        ("redis.db_locks", 10**20),
        ("redis.port", 10**20),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_key(key, value):
    section, _, rest = key.partition(".")
    raw = _with_path(section, rest, value)
    if key.startswith("nvml.devices"):
        raw = {"nvml": {"devices": {"gpu_lock:0": value}}}
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(raw, env={})
    assert str(info.value).startswith(f"{key}: ")
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("gpu_lock_monitor.monitor_interval", "1.0e+14"),
        ("gpu_lock_monitor.monitor_interval", "100000000000000"),
        ("gpu_lock.lock_timeout", "1.0e+308"),
        ("gpu_lock_monitor.heartbeat.interval", "1.0e+307"),
        ("gpu_lock.lock_timeout", ".inf"),
        ("gpu_lock.lock_timeout", ".nan"),
    ],
)
def test_cli_config_check_refuses_numbers_that_would_overflow_later(tmp_path, key, text):
    section, _, rest = key.partition(".")
    config = tmp_path / "m.yml"
    nested = rest.split(".")
    config.write_text(
        f"{section}:\n"
        + "".join(f"{'  ' * (i + 1)}{k}:\n" for i, k in enumerate(nested[:-1]))
        + f"{'  ' * len(nested)}{nested[-1]}: {text}\n"
    )
    result = _cli("config", "check", "-c", str(config), env=_cli_env(**LIMITS_ENV))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"gpulock-monitor: {config}: {key}: must be a positive number of seconds from 0.001 to ")


@pytest.mark.parametrize(
    ("raw", "env"),
    [
        ({"gpu_lock_monitor": {"monitor_interval": "${I}"}}, {"I": "1e14"}),
        ({"gpu_lock": {"lock_timeout": "${T}"}}, {"T": "1e400"}),
        ({"gpu_lock": {"lock_timeout": "${T}"}}, {"T": "9" * 5000}),
        ({"gpu_lock": {"lock_timeout": "${T}"}}, {"T": "nan"}),
    ],
)
def test_expanded_numbers_are_range_checked_too(raw, env):
    with pytest.raises(ConfigError, match="must be a positive number of seconds from"):
        Settings.from_mapping(raw, env=env)


MAXIMA = {
    "gpu_lock": {"lock_timeout": 31_536_000},
    "gpu_lock_monitor": {
        "monitor_interval": 604_800,
        "timeout_levels": {"warning": 31_535_998, "soft_timeout": 31_535_999, "hard_timeout": 31_536_000},
        "heartbeat": {"interval": 604_800, "timeout": 31_536_000},
        "cleanup": {"max_retry": 100, "retry_delay": 604_800},
    },
    "audit": {"max_bytes": 1 << 40, "backups": 1000},
    "nvml": {"busy_grace": 31_536_000},
    "alerts": {"redis_down_after": 31_536_000},
}


def test_the_maxima_are_accepted():
    s = Settings.from_mapping(MAXIMA, env={})
    assert (s.lock_timeout_s, s.monitor_interval_s, s.heartbeat_interval_s) == (31_536_000, 604_800, 604_800)
    minima = Settings.from_mapping(
        {
            "gpu_lock": {"lock_timeout": 0.001},
            "gpu_lock_monitor": {
                "monitor_interval": 0.001,
                "timeout_levels": {"warning": 0.001, "soft_timeout": 0.002, "hard_timeout": 0.003},
                "heartbeat": {"interval": 0.001, "timeout": 0.002},
                "cleanup": {"retry_delay": 0.001},
            },
        },
        env={},
    )
    assert minima.monitor_interval_s == 0.001


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["health"], ["run", "--once"], ["config", "check"]]
)
def test_every_command_runs_at_the_maxima(redis_server, r, tmp_path, command):
    """No schedule, expiry or wait computed from the largest accepted values overflows."""
    r.set("gpu_lock:0", "locked_by_tts", ex=3600)
    r.set("gpu_lock:0:heartbeat", str(time.time()), ex=120)
    config = tmp_path / "m.yml"
    raw = {
        **MAXIMA,
        "redis": {"url": redis_server.url},
        "audit": {**MAXIMA["audit"], "path": str(tmp_path / "a.jsonl"), "critical_path": str(tmp_path / "c.jsonl")},
        "metrics": {"enabled": False},
        "logging": {"format": "json"},
    }
    config.write_text(yaml.safe_dump(raw))
    result = _cli(*command, "-c", str(config), env=_cli_env())
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Error" not in result.stderr, result.stderr
    assert result.returncode in (0, 1, 2), result.stdout + result.stderr  # health: no pass was made yet


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ({"timeout": float("inf")}, "alerts.channels[0].timeout: expected a positive number"),
        ({"timeout": float("nan")}, "alerts.channels[0].timeout: expected a positive number"),
        ({"timeout": 1e9}, "alerts.channels[0].timeout: expected a positive number from 0.001 to 3600"),
        ({"rate_per_minute": float("nan")}, "alerts.channels[0].rate_per_minute: expected a positive number"),
        ({"rate_per_minute": 1e300}, "alerts.channels[0].rate_per_minute: expected a positive number"),
        ({"retries": 10**9}, "alerts.channels[0].retries: expected an integer >= 0 and <= 100"),
        (
            {"type": "email", "host": "h", "from": "f", "to": ["t"], "port": "abc"},
            "alerts.channels[0].port: expected a port",
        ),
        (
            {"type": "email", "host": "h", "from": "f", "to": ["t"], "port": 99999},
            "alerts.channels[0].port: expected a port",
        ),
        (
            {"to": ["x" * 100_000] * 1000, "type": "email", "host": "h", "from": "f", "tls": "y"},
            "alerts.channels[0].tls",
        ),
        ({"type": "email", "host": "h", "from": "f", "to": "x" * 1_000_000}, "alerts.channels[0].to: expected a list"),
    ],
)
def test_alert_channel_numbers_and_values_are_checked_and_bounded(channel, message):
    full = {"type": "webhook", "url": "https://alerts.example.com/hook", **channel}
    if full["type"] == "email":
        full.pop("url")
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"alerts": {"channels": [full]}}, env={})
    assert str(info.value).startswith(message)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"gpu_lock": {"lock_timeout": "x" * 1_000_000}},
            "gpu_lock.lock_timeout: expected a number of seconds or a span such as 90s, 1m30s or 2h, got 'xxx",
        ),
        ({"gpu_lock": {"lock_timeout": ["x" * 1000] * 100_000}}, "gpu_lock.lock_timeout: expected a number of seconds"),
        ({"gpu_lock": {"key_pattern": "x" * 1_000_000}}, "gpu_lock.key_pattern: must end with '*'"),
        ({"gpu_lock": "x" * 1_000_000}, "gpu_lock: expected a mapping, got 'xxx"),
        ({"gpu_lock": {"k" * 1_000_000: 1}}, "gpu_lock.'kkk"),
        ({"gpu_lock": {"a\nb": 1}}, "gpu_lock.'a\\nb': unknown key"),
        ({"logging": {"level": "x\n" * 100_000}}, "logging.level: expected one of"),
        ({"logging": {"format": "%(message)s" * 100_000}, "gpu_lock": {"lock_timeout": 1000}}, None),
        ({"metrics": {"listen": "h:" + "9" * 100_000}}, "metrics.listen: expected HOST:PORT"),
        ({"redis": {"sentinel": {"service": "m", "nodes": "x" * 1_000_000}}}, "redis.sentinel.nodes: expected a list"),
        ({"nvml": {"devices": {"gpu_lock:0": "x" * 1_000_000}}}, "nvml.devices.gpu_lock:0: expected a device index"),
        ({"alerts": {"channels": ["x" * 1_000_000]}}, "alerts.channels[0]: expected a mapping"),
        ({"gpu_lock": {"key_pattern": "${" + "A" * 1_000_000 + "}*"}}, "gpu_lock.key_pattern: environment variable"),
        ({"x" * 1_000_000: {}}, None),
    ],
)
def test_errors_never_format_an_unbounded_value(raw, message):
    if message is None:  # valid, with a warning that is bounded too
        s = Settings.from_mapping(raw, env={})
        assert all(len(w) < 400 for w in s.warnings)
        return
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(raw, env={})
    shown = str(info.value)
    assert shown.startswith(message), shown[:300]
    assert len(shown) < 400
    assert "\n" not in shown


# --- every URL parsed and validated at config check ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h:abc/0", "redis.url: not a valid URL"),
        ("redis://h:99999/0", "redis.url: not a valid URL"),
        ("redis://[::1/0", "redis.url: not a valid URL"),
        ("redis://[::1:6379/0", "redis.url: not a valid URL"),
        ("redis://h:0/0", "redis.url: expected a port number 1..65535"),
        ("redis://h:-1/0", "redis.url: not a valid URL"),
        ("redis://h/abc", "redis.url: the path is the database number"),
        ("redis://h/0/1", "redis.url: the path is the database number"),
        ("redis://h/99999999999", "redis.url: the path is the database number"),
        ("redis://h/٣", "redis.url: the path is the database number"),  # a digit, not an ASCII one
        ("redis://h/0?db=x", "redis.url: invalid value for db in the URL"),
        ("redis://h/0?db=-1", "redis.url: invalid value for db in the URL"),
        ("redis://h/0?socket_timeout=soon", "redis.url: invalid value for socket_timeout"),
        ("redis://h/0?ssl_ca_cert=/ca.pem", "redis.url: unknown option 'ssl_ca_cert' in the URL"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "redis.url: unknown option 'ssl_ca_certs' in the URL (TLS options need"),
        ("redis://h/0?bogus=1", "redis.url: unknown option 'bogus'"),
        ("redis://h/0?ssl_check_hostname=false", "redis.url: unknown option 'ssl_check_hostname' in the URL (TLS"),
        ("redis://h/0?retry_on_error=x", "redis.url: unknown option 'retry_on_error'"),
        ("redis://h/0?protocol=7", "redis.url: redis-py refuses it (protocol must be either 2 or 3)"),
        ("redis://h/0?max_connections=-1", "redis.url: redis-py refuses it"),
        ("rediss://h/0?ssl_cert_reqs=bogus", "redis.url: redis-py refuses it (Invalid SSL Certificate Requirements"),
        ("redis://h/0 ", "redis.url: a URL has no spaces"),
        ("redis://h/0\n", "redis.url: a URL has no spaces"),
        ("redis:///0?", None),  # no host: redis-py's localhost
        ("redis:h/0", "redis.url: expected a redis://"),
        ("redis:/h/0", "redis.url: expected a redis://"),
        ("REDIS://h/0", "redis.url: expected a redis://"),
        ("http://h/0", "redis.url: expected a redis://"),
        ("unix://", "redis.url: a unix:// URL names the socket's path"),
        ("", "redis.url: expected a non-empty string"),
        (6379, "redis.url: expected a non-empty string"),
    ],
)
def test_redis_urls_are_validated_at_config_check(url, message):
    if message is None:
        assert Settings.from_mapping({"redis": {"url": url}}, env={}).redis_url == url
        return
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"redis": {"url": url}}, env={})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://:pw@10.0.0.1:6380/2",
        "redis://monitor:pw@redis.example.com/15",
        "redis://[::1]:6379/0",
        "redis://[fe80::1%25eth0]:6379",
        "redis://h",
        "redis://h/",
        "redis://h/0?socket_timeout=3&client_name=m&health_check_interval=10",
        "redis://h/0?password=p%40ss&username=u",
        "rediss://h:6380/0?ssl_ca_certs=/etc/ssl/ca.pem&ssl_cert_reqs=required",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=2",
        "unix://:pw@/run/redis/redis.sock?db=2",
    ],
)
def test_good_redis_urls_pass(url):
    assert Settings.from_mapping({"redis": {"url": url}}, env={}).redis_url == url


@pytest.mark.parametrize("url", ["redis://h:abc/0", "redis://h:99999/0", "redis://[::1/0"])
def test_cli_config_check_refuses_a_bad_redis_url_in_one_line(tmp_path, url):
    config = tmp_path / "m.yml"
    config.write_text(yaml.safe_dump({"redis": {"url": url}}))
    result = _cli("config", "check", "-c", str(config), env=_cli_env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"gpulock-monitor: {config}: redis.url: not a valid URL")


def test_the_url_from_the_environment_is_validated_too():
    with pytest.raises(ConfigError, match=r"^\$GPULOCK_MONITOR_REDIS_URL: not a valid URL"):
        Settings.from_mapping({}, env={REDIS_URL_ENV: "redis://h:abc/0"})
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({}, env={REDIS_URL_ENV: "redis//:hunter2@h/0"})
    assert "hunter2" not in str(info.value)


# --- redis.tls ---------------------------------------------------------------------------------------


def test_tls_options_are_read_and_shown():
    raw = {
        "redis": {
            "url": "redis://cache.example.com:6380/2",
            "tls": {"ca_file": "/etc/ssl/redis-ca.pem", "cert_file": "/c.pem", "key_file": "${CREDS:/run}/k.pem"},
        }
    }
    s = Settings.from_mapping(raw, env={})
    assert (s.redis_tls_ca_file, s.redis_tls_cert_file) == ("/etc/ssl/redis-ca.pem", "/c.pem")
    assert s.redis_tls_key_file == "${CREDS:/run}/k.pem"  # expanded when connecting, like password_file
    assert s.uses_tls
    assert s.redacted()["redis"]["tls"] == {
        "ca_file": "/etc/ssl/redis-ca.pem",
        "cert_file": "/c.pem",
        "key_file": "${CREDS:/run}/k.pem",
    }
    assert Settings.from_mapping({"redis": {"url": "rediss://h/0"}}, env={}).uses_tls
    assert not Settings().uses_tls
    assert Settings.from_mapping({"redis": {"tls": {"ca_file": "${NO_CA:}"}}}, env={}).redis_tls_ca_file == "${NO_CA:}"


@pytest.mark.parametrize(
    ("redis_section", "message"),
    [
        ({"tls": {"key_file": "/k.pem"}}, "redis.tls.key_file: give cert_file too"),
        ({"url": "unix:///run/r.sock", "tls": {"ca_file": "/ca.pem"}}, "redis.tls: TLS is not used over a unix://"),
        (
            {"url": "rediss://h/0?ssl_ca_certs=/a.pem", "tls": {"ca_file": "/b.pem"}},
            "redis.tls.ca_file: the Redis URL has ?ssl_ca_certs= too",
        ),
        ({"tls": {"ca": "/ca.pem"}}, "redis.tls.ca: unknown key (expected one of: ca_file, cert_file, key_file)"),
        ({"tls": {"ca_file": 5}}, "redis.tls.ca_file: expected a non-empty string"),
        ({"tls": "yes"}, "redis.tls: expected a mapping"),
    ],
)
def test_bad_tls_options_are_config_errors_naming_the_key(redis_section, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"redis": redis_section}, env={})
    assert str(info.value).startswith(message)


# --- durations as spans (1m30s), as --since takes them ------------------------------------------------


def _duration_keys(spec: object = None, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, Settings field) of every duration the config reads, found in its key tree."""
    from monitor import config

    durations = {config._interval, config._seconds, config._optional_seconds}
    found = []
    for key, entry in (spec or config._SECTIONS).items():  # type: ignore[attr-defined]
        if isinstance(entry, dict):
            found += _duration_keys(entry, f"{prefix}{key}.")
        elif entry[1] in durations:
            found.append((f"{prefix}{key}", entry[0]))
    return found


def test_every_duration_key_is_found():
    keys = dict(_duration_keys())
    assert {"gpu_lock_monitor.monitor_interval", "gpu_lock_monitor.cleanup.retry_delay", "nvml.busy_grace"} <= set(keys)
    assert {"alerts.redis_down_after", "gpu_lock.lock_timeout", "gpu_lock_monitor.heartbeat.timeout"} <= set(keys)


@pytest.mark.parametrize(("key", "field_name"), _duration_keys())
def test_every_duration_accepts_a_span(key, field_name):
    default = getattr(Settings(), field_name)
    if default is None:  # an optional duration that is off by default (hang.progress_timeout)
        default = 90.0
    span = f"{default // 60:g}m{default % 60:g}s"  # 600 -> 10m0s, 30 -> 0m30s
    section, _, rest = key.partition(".")
    assert getattr(Settings.from_mapping(_with_path(section, rest, span), env={}), field_name) == default


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1m30s", 90.0), ("90s", 90.0), ("2h", 7200.0), ("250ms", 0.25), ("1.5m", 90.0), (" 45s ", 45.0), (90, 90.0)],
)
def test_spans_and_plain_numbers_are_seconds(value, seconds):
    raw = {"gpu_lock_monitor": {"monitor_interval": value}}
    assert Settings.from_mapping(raw, env={}).monitor_interval_s == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1m30", "expected a number of seconds or a span such as 90s, 1m30s or 2h, got '1m30'"),
        ("90 s", "expected a number of seconds or a span"),
        ("-5s", "expected a number of seconds or a span"),
        ("1y", "expected a number of seconds or a span"),
        ("0s", "must be a positive number of seconds from 0.001 to 604800 (7 days), got '0s'"),
        ("8d", "must be a positive number of seconds from 0.001 to 604800 (7 days), got '8d'"),
        ("9" * 400 + "w", "must be a positive number of seconds"),
    ],
)
def test_bad_spans_are_one_line_naming_the_key(value, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"gpu_lock_monitor": {"monitor_interval": value}}, env={})
    assert str(info.value).startswith(f"gpu_lock_monitor.monitor_interval: {message}")
    assert len(str(info.value)) < 200


def test_spans_from_the_environment_and_in_alert_channels():
    raw = {
        "gpu_lock_monitor": {"cleanup": {"retry_delay": "${DELAY:1m}"}},
        "alerts": {"channels": [{"type": "webhook", "url": "https://alerts.example.com/h", "timeout": "1m30s"}]},
    }
    s = Settings.from_mapping(raw, env={"DELAY": "2m30s"})
    assert s.retry_delay_s == 150.0
    assert s.alert_channels[0]["timeout"] == 90.0
    assert Settings.from_mapping(raw, env={}).retry_delay_s == 60.0
    too_long = {"alerts": {"channels": [{"type": "webhook", "url": "https://a.example.com/h", "timeout": "2h"}]}}
    with pytest.raises(ConfigError, match=r"^alerts\.channels\[0\]\.timeout: expected a positive number from 0.001"):
        Settings.from_mapping(too_long, env={})


def test_cli_config_check_and_show_take_spans(tmp_path):
    config = tmp_path / "m.yml"
    config.write_text(
        "gpu_lock:\n  lock_timeout: 1h\n"
        "gpu_lock_monitor:\n  monitor_interval: 30s\n"
        "  timeout_levels: {warning: 5m, soft_timeout: 10m, hard_timeout: 15m}\n"
    )
    check = _cli("config", "check", "-c", str(config), env=_cli_env(**LIMITS_ENV))
    assert (check.returncode, check.stdout, check.stderr) == (0, "config ok\n", "")
    shown = yaml.safe_load(_cli("config", "show", "-c", str(config), env=_cli_env(**LIMITS_ENV)).stdout)
    assert shown["gpu_lock"]["lock_timeout"] == 3600.0
    assert shown["gpu_lock_monitor"]["timeout_levels"] == {
        "warning": 300.0,
        "soft_timeout": 600.0,
        "hard_timeout": 900.0,
    }


# --- metrics.listen on every interface -----------------------------------------------------------------


@pytest.mark.parametrize("listen", [":9466", "0.0.0.0:9466", "[::]:9466", "localhost:9466", "127.0.0.1:9464"])
def test_metrics_listen_takes_host_port_or_port_alone(listen):
    assert Settings.from_mapping({"metrics": {"listen": listen}}, env={}).metrics_listen == listen


@pytest.mark.parametrize("listen", ["9466", ":0", ":99999", ":", "a b:9466", "h/x:9466", ":94a6"])
def test_metrics_listen_refuses_what_is_no_address(listen):
    with pytest.raises(ConfigError, match=r"^metrics\.listen: expected HOST:PORT, or :PORT for every interface"):
        Settings.from_mapping({"metrics": {"listen": listen}}, env={})


def test_a_sentinel_still_needs_its_host():
    with pytest.raises(ConfigError, match=r"^redis\.sentinel\.nodes\[0\]: expected HOST:PORT"):
        Settings.from_mapping({"redis": {"sentinel": {"service": "m", "nodes": [":26379"]}}}, env={})


def test_the_daemon_serves_metrics_on_every_interface_with_port_alone(redis_server, tmp_path):
    import threading
    import urllib.request

    from helpers import make_settings, wait_for

    from monitor import daemon
    from monitor.demo.redis_server import free_port

    port = free_port()
    settings = make_settings(redis_server.url, tmp_path, metrics={"enabled": True, "listen": f":{port}"})
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(settings,), kwargs={"stop": stop})
    runner.start()

    def livez() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=2) as response:
                return int(response.status)
        except OSError:
            return 0

    try:
        assert wait_for(lambda: livez() == 200)
    finally:
        stop.set()
        runner.join(timeout=20)


# --- ${CREDENTIALS_DIRECTORY} in file names: the service's config works at a shell too -------------------

DEPLOY_GUIDE = REPO / "deploy" / "README.md"
UNIT = REPO / "deploy" / "systemd" / "gpulock-monitor.service"


def _guide_config() -> dict[str, object]:
    """The monitor.yml that the deploy guide has the operator write."""
    text = DEPLOY_GUIDE.read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    return dict(yaml.safe_load(block))


def test_the_deploy_guides_password_file_is_the_units_credential_inside_and_its_source_outside(tmp_path):
    password_file = _guide_config()["redis"]["password_file"]  # type: ignore[index]
    (credential,) = [line for line in UNIT.read_text().splitlines() if line.startswith("LoadCredential=")]
    name, _, source = credential.removeprefix("LoadCredential=").partition(":")
    s = Settings.from_mapping({"redis": {"password_file": password_file}}, env={})
    (tmp_path / name).write_text("inside\n")
    # Inside the unit, systemd's copy; at a shell on the host, the file the unit copies.
    assert read_password(s, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "inside"
    assert password_file.replace("${CREDENTIALS_DIRECTORY:-/etc/gpulock-monitor}", "/etc/gpulock-monitor") == source
    from monitor.config import expand_path

    assert expand_path(password_file, "redis.password_file", env={}) == source


UNSET_LINE = (
    "redis.password_file: environment variable CREDENTIALS_DIRECTORY is not set here: systemd sets it only "
    "inside the service (LoadCredential=); write ${CREDENTIALS_DIRECTORY:-/etc/gpulock-monitor}/redis-password "
    "so the same config works outside it, or run sudo env CREDENTIALS_DIRECTORY=/etc/gpulock-monitor "
    "gpulock-monitor ..."
)


@pytest.mark.parametrize(
    "command",
    [["config", "check"], ["status"], ["status", "--json"], ["release", "gpu_lock:0", "--yes"], ["run", "--once"]],
)
def test_credentials_directory_unset_at_a_shell_is_one_line_saying_how_to_run(tmp_path, command):
    config = tmp_path / "m.yml"
    config.write_text(
        "redis:\n  url: redis://127.0.0.1:1/2\n  password_file: ${CREDENTIALS_DIRECTORY}/redis-password\n"
        f"audit: {{path: {tmp_path / 'a.jsonl'}, critical_path: {tmp_path / 'c.jsonl'}}}\n"
        "metrics: {enabled: false}\nlogging: {format: json}\n"
    )
    env = _cli_env()
    env.pop("CREDENTIALS_DIRECTORY", None)
    result = _cli(*command, "-c", str(config), env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "config ok" not in result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"gpulock-monitor: {UNSET_LINE}"
    assert not (tmp_path / "a.jsonl").exists() or "manual_release" not in (tmp_path / "a.jsonl").read_text()


def test_config_check_passes_the_guides_form_and_a_set_variable(tmp_path):
    (tmp_path / "redis-password").write_text("pw\n")
    config = tmp_path / "m.yml"
    for value, extra in (
        (f"${{CREDENTIALS_DIRECTORY:-{tmp_path}}}/redis-password", {}),
        ("${CREDENTIALS_DIRECTORY}/redis-password", {"CREDENTIALS_DIRECTORY": str(tmp_path)}),
    ):
        config.write_text(f"redis:\n  password_file: {value}\n")
        result = _cli("config", "check", "-c", str(config), env=_cli_env(**LIMITS_ENV, **extra))
        assert (result.returncode, result.stdout) == (0, "config ok\n"), result.stderr
        assert "password_file" not in result.stderr


def test_any_unset_variable_in_a_late_file_name_says_how_to_give_it():
    s = Settings.from_mapping({"redis": {"tls": {"ca_file": "${PKI_DIR}/ca.pem"}}}, env={})
    from monitor.config import UnsetVariableError, expand_path

    with pytest.raises(UnsetVariableError) as info:
        expand_path(s.redis_tls_ca_file or "", "redis.tls.ca_file", env={})
    assert str(info.value) == (
        "redis.tls.ca_file: environment variable PKI_DIR is not set here (the file name is expanded when the file "
        "is read): write ${PKI_DIR:-default} in the config, or set PKI_DIR for this command"
    )


@pytest.mark.parametrize("value", ["${CREDENTIALS_DIRECTORY/redis-password", "${A:{b}}/x", "/etc/${}/x"])
def test_a_malformed_reference_in_a_late_file_name_is_refused_when_the_config_is_read(value):
    with pytest.raises(ConfigError, match=r"^redis\.password_file: malformed \$\{\.\.\.\} reference"):
        Settings.from_mapping({"redis": {"password_file": value}}, env={})


def test_a_password_file_only_root_can_read_says_to_run_as_root(tmp_path, monkeypatch):
    secret = tmp_path / "redis-password"
    secret.write_text("pw\n")
    s = Settings.from_mapping({"redis": {"password_file": str(secret)}}, env={})

    def denied(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError) as info:
        read_password(s, env={})
    assert str(info.value) == (
        f"redis.password_file: cannot read {secret}: permission denied "
        "(run the command as a user who can read it, e.g. with sudo)"
    )


# --- monitor.name: a stable identity -------------------------------------------------------------------


def test_monitor_name_defaults_to_the_host_name_and_can_be_set():
    import socket

    assert Settings().monitor_name is None
    assert Settings().name == socket.gethostname()
    assert Settings.from_mapping({"monitor": {"name": "gpu-pool-a"}}, env={}).name == "gpu-pool-a"
    from_env = {"monitor": {"name": "${NODE_NAME:}"}}
    assert Settings.from_mapping(from_env, env={"NODE_NAME": "gpu-node-7"}).name == "gpu-node-7"
    assert Settings.from_mapping(from_env, env={}).name == socket.gethostname()  # empty: the host name
    assert Settings.from_mapping({"monitor": {"name": "a"}}, env={}).redacted()["monitor"] == {"name": "a"}


@pytest.mark.parametrize("name", ["a b", "{tag}", "-x", "x" * 254, "gpu\nnode", "ü"])
def test_a_monitor_name_is_a_host_names_characters(name):
    with pytest.raises(ConfigError, match=r"^monitor\.name: expected a name of letters, digits and \. _ - : @"):
        Settings.from_mapping({"monitor": {"name": name}}, env={})


def test_the_audit_says_the_real_host_and_the_name():
    import socket

    from monitor.audit import monitor_identity

    assert monitor_identity("gpu-pool-a")["name"] == "gpu-pool-a"
    assert monitor_identity("gpu-pool-a")["host"] == socket.gethostname()
    assert monitor_identity()["name"] == socket.gethostname()


# --- values from the environment are checked as the file's ---------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["config", "check"], ["status"], ["health"], ["release", "gpu_lock:0", "--yes"], ["run", "--once"]],
)
def test_a_redis_url_without_a_scheme_in_the_environment_is_one_line(tmp_path, command):
    config = tmp_path / "m.yml"
    config.write_text(f"audit: {{path: {tmp_path / 'a.jsonl'}, critical_path: {tmp_path / 'c.jsonl'}}}\n")
    result = _cli(*command, "-c", str(config), env=_cli_env(GPULOCK_MONITOR_REDIS_URL="127.0.0.1:6391"))
    line = f"{config}: $GPULOCK_MONITOR_REDIS_URL: expected a redis://, rediss:// or unix:// URL, got '127.0.0.1:6391'"
    assert "Traceback" not in result.stdout + result.stderr
    if command == ["health"]:  # Nagios: its own error is UNKNOWN, on stdout
        assert (result.returncode, result.stdout, result.stderr) == (3, f"unknown: {line}\n", "")
    else:
        assert (result.returncode, result.stderr) == (1, f"gpulock-monitor: {line}\n")


def test_an_alert_url_from_the_environment_is_checked_as_one_in_the_file(tmp_path):
    config = tmp_path / "m.yml"
    config.write_text("alerts:\n  channels: [{type: slack, url_env: SLACK_HOOK}]\n")
    bad = _cli(
        "config", "check", "-c", str(config), env=_cli_env(**LIMITS_ENV, SLACK_HOOK="hooks.example.com/T0/B0/s3cret")
    )
    assert bad.returncode == 1
    assert bad.stderr == (
        f"gpulock-monitor: {config}: alerts.channels[0].url_env ($SLACK_HOOK): expected an http:// or https:// URL, "
        "got 'hooks.example.com/***'\n"
    )
    good = _cli("config", "check", "-c", str(config), env=_cli_env(**LIMITS_ENV, SLACK_HOOK="https://h.example.com/T0"))
    assert (good.returncode, good.stdout) == (0, "config ok\n"), good.stderr
    unset = _cli("config", "check", "-c", str(config), env=_cli_env(**LIMITS_ENV))  # the service's own variable
    assert (unset.returncode, unset.stdout) == (0, "config ok\n"), unset.stderr


@pytest.mark.parametrize(
    ("section", "meant"),
    [("gpulock_monitor", "gpu_lock_monitor"), ("gpu_locks", "gpu_lock"), ("loging", "logging"), ("alert", "alerts")],
)
def test_a_misspelt_section_is_refused_naming_the_one_meant(section, meant):
    with pytest.raises(ConfigError, match=rf"^{section}: unknown section; did you mean {meant}\?$"):
        Settings.from_mapping({section: {"monitor_interval": 10}}, env={})


@pytest.mark.parametrize("section", ["celery", "core", "ocr", "monitoring", "database", "ai_providers"])
def test_a_foreign_section_is_ignored_with_a_warning(section):
    settings = Settings.from_mapping({section: {"anything": 1}}, env={})
    assert settings.warnings[0] == f"{section}: unknown section, ignored"


# --- hang: ----------------------------------------------------------------------------------------------


def test_hang_defaults_warn_on_every_finding_and_release_nothing():
    from monitor.hang import Finding

    hang = Settings().hang
    assert all(hang.rule(f).action == "warn" for f in Finding)
    assert hang.progress_timeout_s is None
    shown = Settings().redacted()["hang"]["findings"]
    assert set(shown) == {f.value for f in Finding}
    assert {r["action"] for r in shown.values()} == {"warn"}


def test_hang_rules_take_a_word_or_an_action_with_a_grace():
    from monitor.hang import Finding, Rule

    s = Settings.from_mapping(
        {
            "hang": {
                "progress_timeout": "10m",
                "idle_util_pct": 2.5,
                "xid_ignore": [43, 13, 43],
                "findings": {"gpu_xid": "release", "holder_stalled": {"action": "release", "grace": "5m"}},
            }
        },
        env={},
    )
    assert s.hang.rules == {Finding.GPU_XID: Rule("release", 0.0), Finding.HOLDER_STALLED: Rule("release", 300.0)}
    assert s.hang.progress_timeout_s == 600
    assert s.hang.idle_util_pct == 2.5
    assert s.hang.xid_ignore == frozenset({13, 43})
    assert s.redacted()["hang"]["xid_ignore"] == [13, 43]


@pytest.mark.parametrize(
    ("hang", "message"),
    [
        ({"findings": {"gpu_xd": "release"}}, "hang.findings.gpu_xd: unknown finding; did you mean gpu_xid?"),
        (
            {"findings": {"nonsense": "release"}},
            "hang.findings.nonsense: unknown finding (expected one of: holder_stalled",
        ),
        ({"findings": {"gpu_xid": "kill"}}, "hang.findings.gpu_xid.action: expected one of warn|release, got 'kill'"),
        (
            {"findings": {"gpu_xid": {"gace": 1}}},
            "hang.findings.gpu_xid.gace: unknown key (expected one of: action, grace)",
        ),
        ({"findings": {"gpu_xid": {"action": "release", "grace": -1}}}, "hang.findings.gpu_xid.grace:"),
        ({"findings": {"gpu_xid": 3}}, "hang.findings.gpu_xid: expected warn, release or {action, grace}"),
        ({"findings": [1]}, "hang.findings: expected a mapping of finding to {action, grace}"),
        ({"idle_util_pct": 150}, "hang.idle_util_pct: expected a percentage from 0 to 100, got 150"),
        ({"idle_util_pct": True}, "hang.idle_util_pct: expected a percentage"),
        ({"xid_ignore": ["a"]}, "hang.xid_ignore[0]: expected an integer >= 1 and <= 65535"),
        ({"xid_ignore": 13}, "hang.xid_ignore: expected a list of Xid codes"),
        ({"idle_windw": 3}, "hang.idle_windw: unknown key"),
    ],
)
def test_hang_mistakes_are_one_line_naming_the_key(hang, message):
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"hang": hang}, env={})
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
