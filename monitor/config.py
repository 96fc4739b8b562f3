"""Settings: load `monitor.yml`, validate every key, and build one typed object.

The `gpu_lock:` and `gpu_lock_monitor:` sections keep the names of the fleet's existing
`config.yml`, and that whole file can be pointed at as it is: the keys its workers read in
those sections are accepted and ignored (`FLEET_*_KEYS`), its `redis:` form (host, port,
password, db_locks) is understood beside `url`, and `${VAR}`, `${VAR:default}` and
`${VAR:-default}` are expanded in every value the monitor reads. Every error names the key
path and the problem on one line.
"""

from __future__ import annotations

import math
import os
import re
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

# Keys of the fleet's shared config.yml that its workers (and its own in-process monitor) read,
# not the monitor: accepted and ignored, silently. A name is a key path inside its section; it
# covers everything beneath it. Taken from the fleet's config.yml over its history, its config
# loader's defaults (poll_interval .. fallback_timeout, health_thresholds) and the worker-side
# heartbeat block of its lock design (gpu_lock.heartbeat: enabled, interval, timeout).
FLEET_GPU_LOCK_KEYS = frozenset(
    {
        "poll_interval",
        "max_wait_time",
        "exponential_backoff",
        "max_poll_interval",
        "use_event_driven",
        "fallback_timeout",
        "heartbeat",
    }
)
FLEET_GPU_LOCK_MONITOR_KEYS = frozenset({"heartbeat.enabled", "health_thresholds"})
# The databases the fleet's Redis section names for its other users (Celery, workflow state).
FLEET_REDIS_KEYS = frozenset({"db_broker", "db_backend", "db_state_store"})
# `logging:` is also a common name for an application's own logging setup: the keys of Python's
# logging.config.dictConfig schema and of a plain file handler are not ours, and are ignored.
FOREIGN_LOGGING_KEYS = frozenset(
    {
        "version",
        "disable_existing_loggers",
        "incremental",
        "formatters",
        "filters",
        "handlers",
        "loggers",
        "root",
        "datefmt",
        "file",
        "filename",
        "max_bytes",
        "backup_count",
    }
)


@dataclass(frozen=True)
class Settings:
    """The whole effective configuration. Build it with `Settings.from_mapping`."""

    redis_url: str = "redis://localhost:6379/0"
    redis_password_file: str | None = None
    # `redis.password` (the fleet's form): sent with every connection, never shown.
    redis_password: str | None = field(default=None, repr=False)
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
        """Validate a parsed YAML document; `env` supplies `${VAR}` values and the Redis URL override."""
        env = os.environ if env is None else env
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError("config: the top level must be a mapping of sections")
        warnings = []
        unknown = [str(name) for name in raw if name not in _SECTIONS]
        if unknown:
            many = "s" if len(unknown) > 1 else ""
            warnings.append(f"{', '.join(unknown)}: unknown section{many}, ignored")
        values: dict[str, Any] = {}
        for name, spec in _SECTIONS.items():
            _read_section(raw.get(name), name, spec, values, env=env, ignored=_IGNORED.get(name, frozenset()))
        warnings += _redis_address(values)
        warnings += _log_format(values)
        if env.get(REDIS_URL_ENV):
            values["redis_url"] = env[REDIS_URL_ENV]
        if values.get("redis_password"):
            if values.get("redis_password_file"):
                raise ConfigError("redis.password: give password or password_file, not both")
            if urlsplit(values.get("redis_url", "")).password is not None:
                raise ConfigError("redis.password: the Redis URL has a password too; give one of them")
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
                f"({self.lock_timeout_s:g} s): locks set with that EX expire before the cap, which then "
                "only ends locks set with a longer EX"
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
                "password": "***" if self.redis_password else None,
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
    """The Redis password: read from `redis.password_file` (whose `${VAR}`s are expanded now,
    from `env`, not when the config was loaded), else `redis.password`."""
    if not settings.redis_password_file:
        return settings.redis_password
    env = os.environ if env is None else env
    name = os.path.expanduser(str(_expand(settings.redis_password_file, "redis.password_file", env)))
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


# --- ${VAR} expansion ----------------------------------------------------------------------

# `$${` is a literal `${`; a default may not contain `$`, `{` or `}` (no nesting).
_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-?([^${}]*))?\}")


class _FromEnv(str):
    """A config value that `${VAR}` expansion produced: text, which keys that take numbers or
    booleans read as YAML would read the same plain scalar (`${REDIS_PORT:6379}` is a port)."""


def _expand(text: str, path: str, env: Mapping[str, str]) -> str:
    """`text` with each `${VAR}`, `${VAR:default}` or `${VAR:-default}` replaced, in one pass:
    what a variable holds is never expanded again. The default applies when VAR is unset or
    empty; a plain `${VAR}` with VAR unset is an error naming the key and the variable."""
    if "${" not in text:
        return text
    out: list[str] = []
    end = 0
    for match in _REFERENCE.finditer(text):
        out.append(_plain(text[end : match.start()], path))
        end = match.end()
        name, default = match.group(1), match.group(2)
        if name is None:
            out.append("${")
        elif env.get(name):
            out.append(env[name])
        elif default is not None:
            out.append(default)
        elif name in env:
            out.append("")
        else:
            raise ConfigError(
                f"{path}: environment variable {name} is not set (write ${{{name}:default}} to give a default)"
            )
    out.append(_plain(text[end:], path))
    return _FromEnv("".join(out))


def _plain(text: str, path: str) -> str:
    if "${" in text:
        raise ConfigError(
            f"{path}: malformed ${{...}} reference (use ${{VAR}}, ${{VAR:default}} or ${{VAR:-default}}; "
            "a default cannot contain $, { or }; $${ is a literal ${)"
        )
    return text


def _expand_all(value: Any, path: str, env: Mapping[str, str]) -> Any:
    """Strings expanded at any depth; those inside lists and mappings come back as plain text."""
    if isinstance(value, str):
        return _expand(value, path, env)
    if isinstance(value, list):
        return [_text(_expand_all(v, f"{path}[{i}]", env)) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: _text(_expand_all(v, f"{path}.{k}", env)) for k, v in value.items()}
    return value


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, _FromEnv) else value


def _scalar(value: Any) -> Any:
    """An expanded value read as a YAML plain scalar: integer, float, true/false, null, or text."""
    if not isinstance(value, _FromEnv):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("", "~", "null"):
        return None
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return str(value)


# --- validation tables -------------------------------------------------------------------

Converter = Callable[[Any, str], Any]


def _seconds(value: Any, path: str) -> float:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{path}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _optional_seconds(value: Any, path: str) -> float | None:
    value = _scalar(value)
    return None if value is None else _seconds(value, path)


def _count(minimum: int) -> Converter:
    def convert(value: Any, path: str) -> int:
        value = _scalar(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{path}: expected an integer >= {minimum}, got {value!r}")
        return value

    return convert


def _bool(value: Any, path: str) -> bool:
    value = _scalar(value)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{path}: expected a non-empty string, got {_text(value)!r}")
    return str(value)


def _optional_string(value: Any, path: str) -> str | None:
    if value is None or (isinstance(value, _FromEnv) and not value):  # ${VAR:} for "none"
        return None
    return _string(value, path)


def _redis_url(value: Any, path: str) -> str:
    url = _string(value, path)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{path}: expected a redis://, rediss:// or unix:// URL, got {redact_url(url)!r}")
    return url


def _host(value: Any, path: str) -> str:
    host = _string(value, path)
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare or any(c.isspace() or c in "/@?#[]" for c in bare):
        raise ConfigError(f"{path}: expected a host name or address, got {host!r}")
    return f"[{bare}]" if ":" in bare else bare  # an IPv6 address goes in brackets in a URL


def _port(value: Any, path: str) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{path}: expected a port number 1..65535, got {value!r}")
    return value


def _db(value: Any, path: str) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: expected a database number >= 0, got {value!r}")
    return value


def _password(value: Any, path: str) -> str | None:
    """The value itself never appears in an error."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string (quote it in YAML), got a {type(value).__name__}")
    if "\0" in value or "\n" in value or "\r" in value:
        raise ConfigError(f"{path}: must not contain NUL or line breaks")
    return str(value)


# Pseudo-fields of the fleet's redis form: `_redis_address` turns them into `redis_url`.
_ADDRESS_KEYS = {"_redis_host": "host", "_redis_port": "port", "_redis_db": "db", "_redis_db_locks": "db_locks"}


def _redis_address(values: dict[str, Any]) -> list[str]:
    """Precedence: `redis.url`, else the fleet's host/port/db_locks form (db_locks before db),
    else the default URL; $GPULOCK_MONITOR_REDIS_URL, applied after this, beats both."""
    given = {key: values.pop(field) for field, key in _ADDRESS_KEYS.items() if field in values}
    if not given:
        return []
    if "redis_url" in values:
        names = ", ".join(f"redis.{key}" for key in given)
        return [f"{names}: not used, redis.url is given"]
    host = given.get("host", "localhost")
    port = given.get("port", 6379)
    db = given.get("db_locks", given.get("db", 0))
    values["redis_url"] = f"redis://{host}:{port}/{db}"
    return []


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
    value = _scalar(value)
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


_LOG_FORMATS = ("auto", "json", "console")


class _PythonLogFormat(str):
    """A Python logging format string (`%(asctime)s ...`) in `logging.format`: not ours."""


def _log_format_value(value: Any, path: str) -> str:
    if isinstance(value, str) and value.lower() not in _LOG_FORMATS and ("%(" in value or "{" in value):
        return _PythonLogFormat(value)
    return str(_choice(*_LOG_FORMATS)(value, path))


def _log_format(values: dict[str, Any]) -> list[str]:
    """An application's own `logging.format` string is ignored (with a warning: it would not
    apply); ours is auto, json or console."""
    fmt = values.pop("_log_format", None)
    if isinstance(fmt, _PythonLogFormat):
        return [
            f"logging.format: {str(fmt)!r} is a Python logging format, not ours ({'|'.join(_LOG_FORMATS)}); ignored"
        ]
    if fmt is not None:
        values["log_format"] = fmt
    return []


# Each section: key -> (Settings field, converter) or key -> nested section.
Spec = Mapping[str, "tuple[str, Converter] | Spec"]

_SECTIONS: dict[str, Spec] = {
    "redis": {
        "url": ("redis_url", _redis_url),
        "host": ("_redis_host", _host),
        "port": ("_redis_port", _port),
        "db": ("_redis_db", _db),
        "db_locks": ("_redis_db_locks", _db),
        "password": ("redis_password", _password),
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
        "format": ("_log_format", _log_format_value),
    },
}


# Per section: the keys of the fleet's config.yml that are not ours, accepted and ignored.
_IGNORED: dict[str, frozenset[str]] = {
    "redis": FLEET_REDIS_KEYS,
    "gpu_lock": FLEET_GPU_LOCK_KEYS,
    "gpu_lock_monitor": FLEET_GPU_LOCK_MONITOR_KEYS,
    "logging": FOREIGN_LOGGING_KEYS,
}
# Expanded when used, not when loaded (`read_password`): systemd sets $CREDENTIALS_DIRECTORY
# for the service only.
_EXPANDED_LATE = frozenset({"redis.password_file"})


def _read_section(
    raw: Any,
    path: str,
    spec: Spec,
    out: dict[str, Any],
    *,
    env: Mapping[str, str],
    ignored: frozenset[str],
    inner: str = "",
) -> None:
    """Read one (sub)section into `out`; `inner` is `path` below the section, for `ignored`."""
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {raw!r}")
    for key, value in raw.items():
        where = f"{path}.{key}"
        name = f"{inner}{key}"
        if name in ignored:
            continue  # the fleet's workers read it, not the monitor; not even expanded
        entry = spec.get(key) if isinstance(key, str) else None
        if entry is None:
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(spec)})")
        if isinstance(entry, Mapping):
            _read_section(value, where, entry, out, env=env, ignored=ignored, inner=f"{name}.")
        else:
            field_name, convert = entry
            expanded = value if where in _EXPANDED_LATE else _expand_all(value, where, env)
            out[field_name] = convert(expanded, where)
