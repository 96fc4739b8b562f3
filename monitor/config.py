"""Settings: load `monitor.yml`, validate every key, and build one typed object.

The `gpu_lock:` and `gpu_lock_monitor:` sections keep the names of the fleet's existing
`config.yml`, so those sections can be copied over as they are. Every error names the key
path and the problem on one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from monitor import channels
from monitor.errors import ConfigError

CONFIG_ENV = "GPULOCK_MONITOR_CONFIG"
REDIS_URL_ENV = "GPULOCK_MONITOR_REDIS_URL"
SYSTEM_CONFIG = Path("/etc/gpulock-monitor/monitor.yml")
ALERT_CHANNEL_TYPES = ("webhook", "slack", "dingtalk", "email")
SEVERITIES = ("warning", "critical")


@dataclass(frozen=True)
class Settings:
    """The whole effective configuration. Build it with `Settings.from_mapping`."""

    redis_url: str = "redis://localhost:6379/0"
    redis_password_file: str | None = None
    redis_cluster: bool = False
    sentinel_service: str | None = None
    sentinel_nodes: tuple[str, ...] = ()
    key_pattern: str = "gpu_lock:*"
    lock_timeout_s: float = 600.0
    monitor_interval_s: float = 30.0
    warning_s: float = 300.0
    soft_timeout_s: float = 600.0
    hard_timeout_s: float | None = 900.0
    heartbeat_interval_s: float = 60.0
    heartbeat_timeout_s: float = 300.0
    max_retry: int = 3
    retry_delay_s: float = 60.0
    enabled: bool = True
    auto_recovery: bool = True
    audit_path: str = "/var/log/gpulock-monitor/audit.jsonl"
    critical_path: str = "/var/log/gpulock-monitor/critical_failures.jsonl"
    audit_max_bytes: int = 104_857_600
    audit_backups: int = 10
    metrics_enabled: bool = True
    metrics_listen: str = "127.0.0.1:9464"
    nvml_enabled: str = "auto"
    nvml_devices: Mapping[str, int | str] = field(default_factory=dict)
    nvml_busy_grace_s: float = 60.0
    alert_channels: tuple[Mapping[str, Any], ...] = ()
    redis_down_alert_s: float = 60.0
    log_level: str = "info"
    log_format: str = "auto"
    # Non-fatal findings (unknown sections, risky but legal values), for the caller to log.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_mapping(cls, raw: Any, env: Mapping[str, str] | None = None) -> Settings:
        """Validate a parsed YAML document; `env` supplies the Redis URL override."""
        env = os.environ if env is None else env
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError("config: the top level must be a mapping of sections")
        warnings = [f"{name}: unknown section, ignored" for name in raw if name not in _SECTIONS]
        values: dict[str, Any] = {}
        for name, spec in _SECTIONS.items():
            _read_section(raw.get(name), name, spec, values)
        if env.get(REDIS_URL_ENV):
            values["redis_url"] = env[REDIS_URL_ENV]
        settings = cls(**values, warnings=tuple(warnings))
        return settings._checked()

    def _checked(self) -> Settings:
        tiers = "gpu_lock_monitor.timeout_levels"
        if self.warning_s >= self.soft_timeout_s:
            raise ConfigError(f"{tiers}.warning: must be less than soft_timeout ({self.soft_timeout_s:g})")
        if self.hard_timeout_s is not None and self.soft_timeout_s >= self.hard_timeout_s:
            raise ConfigError(f"{tiers}.soft_timeout: must be less than hard_timeout ({self.hard_timeout_s:g})")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                "gpu_lock_monitor.heartbeat.timeout: must be greater than heartbeat.interval "
                f"({self.heartbeat_interval_s:g})"
            )
        if bool(self.sentinel_service) != bool(self.sentinel_nodes):
            raise ConfigError("redis.sentinel: give both service and nodes, or neither")
        if self.redis_cluster and self.sentinel_service:
            raise ConfigError("redis.cluster: a cluster is not reached through sentinels; use one or the other")
        extra = []
        if self.hard_timeout_s is not None and self.hard_timeout_s >= self.lock_timeout_s:
            extra.append(
                f"{tiers}.hard_timeout: {self.hard_timeout_s:g} s is not below gpu_lock.lock_timeout "
                f"({self.lock_timeout_s:g} s); Redis expiry frees the lock first, the hard tier never fires"
            )
        if not extra:
            return self
        return Settings(**{**self.__dict__, "warnings": self.warnings + tuple(extra)})

    @property
    def heartbeat_ttl_s(self) -> float:
        """The expiry workers give their heartbeat key (DESIGN.md section 2)."""
        return 2 * self.heartbeat_interval_s

    def redacted(self) -> dict[str, Any]:
        """The effective config as `monitor.yml` sections, with secrets masked."""
        return {
            "redis": {
                "url": redact_url(self.redis_url),
                "password_file": self.redis_password_file,
                "cluster": self.redis_cluster,
                "sentinel": {"service": self.sentinel_service, "nodes": list(self.sentinel_nodes)},
            },
            "gpu_lock": {"key_pattern": self.key_pattern, "lock_timeout": self.lock_timeout_s},
            "gpu_lock_monitor": {
                "monitor_interval": self.monitor_interval_s,
                "timeout_levels": {
                    "warning": self.warning_s,
                    "soft_timeout": self.soft_timeout_s,
                    "hard_timeout": self.hard_timeout_s,
                },
                "heartbeat": {"interval": self.heartbeat_interval_s, "timeout": self.heartbeat_timeout_s},
                "cleanup": {"max_retry": self.max_retry, "retry_delay": self.retry_delay_s},
                "enabled": self.enabled,
                "auto_recovery": self.auto_recovery,
            },
            "audit": {
                "path": self.audit_path,
                "critical_path": self.critical_path,
                "max_bytes": self.audit_max_bytes,
                "backups": self.audit_backups,
            },
            "metrics": {"enabled": self.metrics_enabled, "listen": self.metrics_listen},
            "nvml": {
                "enabled": self.nvml_enabled,
                "devices": dict(self.nvml_devices),
                "busy_grace": self.nvml_busy_grace_s,
            },
            "alerts": {
                "channels": [_redact_channel(c) for c in self.alert_channels],
                "redis_down_after": self.redis_down_alert_s,
            },
            "logging": {"level": self.log_level, "format": self.log_format},
        }


def find_config(explicit: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The config file to use: --config, then $GPULOCK_MONITOR_CONFIG, ./monitor.yml, /etc.

    A file named explicitly (flag or env) must exist; the two fallbacks are optional, and
    None means "run on defaults".
    """
    env = os.environ if env is None else env
    for source, name in (("--config", explicit), (CONFIG_ENV, env.get(CONFIG_ENV))):
        if name:
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"{source}: config file {name} does not exist")
            return path
    for path in (Path("monitor.yml"), SYSTEM_CONFIG):
        if path.is_file():
            return path
    return None


def load_settings(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Find, parse and validate the config; every failure is one ConfigError line."""
    path = find_config(explicit, env)
    if path is None:
        return Settings.from_mapping({}, env)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {problem}{where}") from None
    try:
        return Settings.from_mapping(raw, env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_password(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The Redis password from `redis.password_file` (env vars in the path are expanded)."""
    if not settings.redis_password_file:
        return None
    env = os.environ if env is None else env
    name = _expand(settings.redis_password_file, env)
    try:
        return Path(name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"redis.password_file: cannot read {name}: {exc.__class__.__name__}") from None


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# --- validation tables -------------------------------------------------------------------

Converter = Callable[[Any, str], Any]


def _seconds(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{path}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _optional_seconds(value: Any, path: str) -> float | None:
    return None if value is None else _seconds(value, path)


def _count(minimum: int) -> Converter:
    def convert(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{path}: expected an integer >= {minimum}, got {value!r}")
        return value

    return convert


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{path}: expected a non-empty string, got {value!r}")
    return value


def _optional_string(value: Any, path: str) -> str | None:
    return None if value is None else _string(value, path)


def _redis_url(value: Any, path: str) -> str:
    url = _string(value, path)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{path}: expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return url


def _nodes(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of HOST:PORT, got {value!r}")
    return tuple(_listen(node, f"{path}[{i}]") for i, node in enumerate(value))


def _key_pattern(value: Any, path: str) -> str:
    pattern = _string(value, path)
    if not pattern.endswith("*"):
        raise ConfigError(f"{path}: must end with '*' to match every lock, got {pattern!r}")
    return pattern


def _listen(value: Any, path: str) -> str:
    listen = _string(value, path)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{path}: expected HOST:PORT, got {listen!r}")
    return listen


def _choice(*options: Any) -> Converter:
    def convert(value: Any, path: str) -> Any:
        if isinstance(value, str):
            value = value.lower()
        if value not in options:
            shown = "|".join(str(o).lower() for o in options)
            raise ConfigError(f"{path}: expected one of {shown}, got {value!r}")
        return value

    return convert


def _nvml(value: Any, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(_choice("auto", "true", "false")(value, path))


def _devices(value: Any, path: str) -> dict[str, int | str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping of lock key to device index or UUID, got {value!r}")
    for key, target in value.items():
        ok = (isinstance(target, int) and not isinstance(target, bool) and target >= 0) or (
            isinstance(target, str) and target.startswith(("GPU-", "MIG-"))
        )
        if not isinstance(key, str) or not ok:
            raise ConfigError(f"{path}.{key}: expected a device index (0, 1, ...) or a UUID (GPU-...), got {target!r}")
    return dict(value)


def _channels(value: Any, path: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of channels, got {value!r}")
    for i, channel in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(channel, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {channel!r}")
        _choice(*ALERT_CHANNEL_TYPES)(channel.get("type"), f"{where}.type")
        _choice(*SEVERITIES)(channel.get("min_severity", "warning"), f"{where}.min_severity")
        channels.validate(channel, where)
    return tuple(value)


def _redact_channel(channel: Mapping[str, Any]) -> dict[str, Any]:
    """Secrets (and headers, which carry tokens) masked; *_file and *_env names kept."""
    return {k: "***" if (k in channels.SECRETS or k == "headers") and v else v for k, v in channel.items()}


def _expand(name: str, env: Mapping[str, str]) -> str:
    for var, value in env.items():
        name = name.replace("${" + var + "}", value)
    return os.path.expanduser(name)


# Each section: key -> (Settings field, converter) or key -> nested section.
Spec = Mapping[str, "tuple[str, Converter] | Spec"]

_SECTIONS: dict[str, Spec] = {
    "redis": {
        "url": ("redis_url", _redis_url),
        "password_file": ("redis_password_file", _optional_string),
        "cluster": ("redis_cluster", _bool),
        "sentinel": {"service": ("sentinel_service", _optional_string), "nodes": ("sentinel_nodes", _nodes)},
    },
    "gpu_lock": {"key_pattern": ("key_pattern", _key_pattern), "lock_timeout": ("lock_timeout_s", _seconds)},
    "gpu_lock_monitor": {
        "monitor_interval": ("monitor_interval_s", _seconds),
        "timeout_levels": {
            "warning": ("warning_s", _seconds),
            "soft_timeout": ("soft_timeout_s", _seconds),
            "hard_timeout": ("hard_timeout_s", _optional_seconds),
        },
        "heartbeat": {
            "interval": ("heartbeat_interval_s", _seconds),
            "timeout": ("heartbeat_timeout_s", _seconds),
        },
        "cleanup": {"max_retry": ("max_retry", _count(1)), "retry_delay": ("retry_delay_s", _seconds)},
        "enabled": ("enabled", _bool),
        "auto_recovery": ("auto_recovery", _bool),
    },
    "audit": {
        "path": ("audit_path", _string),
        "critical_path": ("critical_path", _string),
        "max_bytes": ("audit_max_bytes", _count(1024)),
        "backups": ("audit_backups", _count(0)),
    },
    "metrics": {"enabled": ("metrics_enabled", _bool), "listen": ("metrics_listen", _listen)},
    "nvml": {
        "enabled": ("nvml_enabled", _nvml),
        "devices": ("nvml_devices", _devices),
        "busy_grace": ("nvml_busy_grace_s", _seconds),
    },
    "alerts": {"channels": ("alert_channels", _channels), "redis_down_after": ("redis_down_alert_s", _seconds)},
    "logging": {
        "level": ("log_level", _choice("debug", "info", "warning", "error")),
        "format": ("log_format", _choice("auto", "json", "console")),
    },
}


def _read_section(raw: Any, path: str, spec: Spec, out: dict[str, Any]) -> None:
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {raw!r}")
    for key, value in raw.items():
        where = f"{path}.{key}"
        entry = spec.get(key) if isinstance(key, str) else None
        if entry is None:
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(spec)})")
        if isinstance(entry, Mapping):
            _read_section(value, where, entry, out)
        else:
            name, convert = entry
            out[name] = convert(value, where)
