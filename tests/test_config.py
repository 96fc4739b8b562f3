"""Config loading and validation: every error is one line naming the key path."""

from __future__ import annotations

import os
import subprocess
import sys
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
    redact_url,
)
from monitor.errors import ConfigError
from monitor.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
FLEET_CONFIG = REPO / "tests" / "data" / "fleet_config.yml"


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
def test_expansion(value, env, expected):
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
def test_redis_address_forms(redis_section, env, url):
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
