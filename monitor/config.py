"""Settings: load `monitor.yml`, validate every key, and build one typed object.

The `gpu_lock:` and `gpu_lock_monitor:` sections keep the names of the fleet's existing
`config.yml`, and that whole file can be pointed at as it is: the keys its workers read in
those sections are accepted and ignored (`FLEET_*_KEYS`), its `redis:` form (host, port,
password, db_locks) is understood beside `url`, and `${VAR}`, `${VAR:default}` and
`${VAR:-default}` are expanded in every value the monitor reads. Every error names the key
path and the problem on one line.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import redis
import yaml

from monitor import channels, protocol, units
from monitor.errors import ConfigError
from monitor.redact import label, redact, redact_service_url, redact_url, short

if TYPE_CHECKING:
    from monitor.hang import HangSettings

CONFIG_ENV = "GPULOCK_MONITOR_CONFIG"
REDIS_URL_ENV = "GPULOCK_MONITOR_REDIS_URL"
SYSTEM_CONFIG = Path("/etc/gpulock-monitor/monitor.yml")
ALERT_CHANNEL_TYPES = ("webhook", "slack", "dingtalk", "email", "apprise")
SEVERITIES = ("warning", "critical")

# --- limits (README "Configuration" lists them) ---------------------------------------------
# The file: a real monitor.yml is a few KiB; the fleet's whole config.yml a few dozen.
MAX_CONFIG_BYTES = 1024 * 1024
# YAML nesting, counted with aliases expanded; and values after alias expansion (billion laughs).
MAX_DEPTH = 64
# A real config holds a few hundred values; 10,000 bounds parsing to well under a second.
MAX_NODES = 10_000
# Seconds: every interval and timeout is finite, at least a millisecond, and at most a week
# (how often something is done: monitor_interval, heartbeat.interval, cleanup.retry_delay) or a
# year (how long something may last: lock_timeout, the tiers, heartbeat.timeout, the graces).
# Beyond those no schedule, expiry or wait the monitor computes can overflow.
MIN_SECONDS = 0.001
MAX_INTERVAL_S = 7 * 86400
MAX_TIMEOUT_S = 365 * 86400
MAX_RETRIES = 100
MAX_AUDIT_BYTES = 1 << 40
MAX_AUDIT_BACKUPS = 1000
MAX_DB = (1 << 31) - 1
# Alert channels: a send may wait at most an hour, retry at most MAX_RETRIES times.
MAX_CHANNEL_TIMEOUT_S = 3600
MAX_RATE_PER_MINUTE = 1_000_000

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
    # `redis.tls`: PEM files (their `${VAR}`s expanded when connecting, like password_file).
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    key_pattern: str = protocol.DEFAULT_KEY_PATTERN
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
    notifications: str = "auto"  # auto: keyspace notifications where Redis has them on; off: SCAN each pass
    configure_notifications: bool = False  # merge the classes needed into notify-keyspace-events
    reconcile_keys_per_s: int = 2000
    # `hang:` (README "Hung holders"): thresholds of the findings and what each one does.
    hang_progress_timeout_s: float | None = None
    hang_not_on_gpu_grace_s: float = 120.0
    hang_idle_window_s: float = 300.0
    hang_idle_util_pct: float = 5.0
    hang_foreign_process_grace_s: float = 30.0
    hang_xid_ignore: tuple[int, ...] = ()
    hang_rules: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # finding -> (action, grace_s)
    # dcgm-exporter's --hpc-job-mapping-dir: the monitor writes each local GPU's holder there.
    job_mapping_dir: str | None = None
    alert_channels: tuple[Mapping[str, Any], ...] = ()
    redis_down_alert_s: float = 60.0
    log_level: str = "info"
    log_format: str = "auto"
    # `monitor.name`: the daemon's stable identity (its status key, `health --host`); None: the
    # host name, which on Kubernetes changes with every pod.
    monitor_name: str | None = None
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
        unknown = [_key(name) for name in raw if name not in _SECTIONS]
        for name in unknown:
            # A foreign section (the fleet's own config.yml has many) is ignored; a near miss of one
            # of ours is a typo that would silently drop every setting in it.
            close = difflib.get_close_matches(name, list(_SECTIONS), n=1, cutoff=0.85)
            if close:
                raise ConfigError(f"{name}: unknown section; did you mean {close[0]}?")
        if unknown:
            many = "s" if len(unknown) > 1 else ""
            names = ", ".join(unknown[:12]) + (f" and {len(unknown) - 12} more" if len(unknown) > 12 else "")
            warnings.append(f"{names}: unknown section{many}, ignored")
        values: dict[str, Any] = {}
        for name, spec in _SECTIONS.items():
            _read_section(raw.get(name), name, spec, values, env=env, ignored=_IGNORED.get(name, frozenset()))
        warnings += _redis_address(values)
        warnings += _log_format(values)
        if env.get(REDIS_URL_ENV):
            values["redis_url"] = _redis_url(env[REDIS_URL_ENV], f"${REDIS_URL_ENV}")
        _channel_urls_from_env(values.get("alert_channels", ()), env)
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
        self._check_tls()
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

    def _check_tls(self) -> None:
        if self.redis_tls_key_file and not self.redis_tls_cert_file:
            raise ConfigError("redis.tls.key_file: give cert_file too (the client certificate the key belongs to)")
        url = urlsplit(self.redis_url)
        if self.uses_tls and url.scheme == "unix":
            raise ConfigError("redis.tls: TLS is not used over a unix:// socket; remove redis.tls or use rediss://")
        given = {name for name, _ in parse_qsl(url.query, keep_blank_values=True)}
        for key, option in (("ca_file", "ssl_ca_certs"), ("cert_file", "ssl_certfile"), ("key_file", "ssl_keyfile")):
            if getattr(self, f"redis_tls_{key}") and option in given:
                raise ConfigError(f"redis.tls.{key}: the Redis URL has ?{option}= too; give one of them")

    @property
    def uses_tls(self) -> bool:
        """TLS to Redis: a rediss:// URL, or any `redis.tls` file given."""
        tls_files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        return urlsplit(self.redis_url).scheme == "rediss" or any(tls_files)

    @property
    def name(self) -> str:
        """This monitor's name: `monitor.name`, else the host name."""
        return self.monitor_name or socket.gethostname()

    @property
    def hang(self) -> HangSettings:
        """The `hang:` section as the findings engine takes it."""
        from monitor.hang import Finding, HangSettings, Rule  # noqa: PLC0415 - the daemon's, not every command's

        return HangSettings(
            progress_timeout_s=self.hang_progress_timeout_s,
            not_on_gpu_grace_s=self.hang_not_on_gpu_grace_s,
            idle_window_s=self.hang_idle_window_s,
            idle_util_pct=self.hang_idle_util_pct,
            rules={Finding(name): Rule(action, grace) for name, (action, grace) in self.hang_rules.items()},
            foreign_process_grace_s=self.hang_foreign_process_grace_s,
            xid_ignore=frozenset(self.hang_xid_ignore),
        )

    @property
    def heartbeat_ttl_s(self) -> float:
        """The expiry workers give their heartbeat key (DESIGN.md section 2)."""
        return units.to_s(protocol.heartbeat_ttl_ms(self.heartbeat_interval_s))

    def redacted(self) -> dict[str, Any]:
        """The effective config as `monitor.yml` sections, with secrets masked."""
        return _shown(_SECTIONS, self)


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
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {short(str(exc), 160)}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a config file")
    try:
        raw = parse_yaml(text)
        return Settings.from_mapping(raw, env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_yaml(text: str) -> Any:
    """A YAML document as plain data, with bounds: safe tags only, at most MAX_DEPTH levels of
    nesting and MAX_NODES values once aliases are expanded, no recursive aliases. Any failure
    is one ConfigError line, without the document's values in it."""
    try:
        return _load_bounded(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{_one_line(problem)}{where}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"invalid YAML: {_one_line(first)}") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise ConfigError(f"a value YAML cannot read: {short(str(exc), 120)}") from None
    except RecursionError:  # bounded above; kept so no traceback can ever come from here
        raise ConfigError(f"YAML nested more than {MAX_DEPTH} levels deep") from None


def _load_bounded(text: str) -> Any:
    loader = _BoundedLoader(text)  # its reader refuses control characters here already
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (pure Python: its composer's recursion is the one we bound), which
    stops composing past MAX_DEPTH levels instead of running into Python's recursion limit, and
    past MAX_NODES values instead of parsing a megabyte of them."""

    _depth = 0
    _nodes = 0  # composed so far: parsing stops at MAX_NODES, not after reading the whole file

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_NODES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values", mark)
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
            assert node is not None  # an event is there: only a document's end gives None
            return node
        finally:
            self._depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """The document as it will be built, aliases expanded: at most MAX_NODES values and
    MAX_DEPTH levels, and no alias inside the node it names. Linear in the composed graph."""
    expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) below and with it
    open_nodes: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in expanded:
            size, height = expanded[key]
        else:
            if key in open_nodes:
                raise _expansion_error(node, "an alias refers to a node that contains it")
            if depth > MAX_DEPTH:
                raise _expansion_error(node, f"nested more than {MAX_DEPTH} levels deep (aliases expanded)")
            open_nodes.add(key)
            size, height = 1, 1
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            for child in children:
                child_size, child_height = walk(child, depth + 1)
                size += child_size
                height = max(height, child_height + 1)
                if size > MAX_NODES:
                    raise _expansion_error(node, f"more than {MAX_NODES} values once aliases are expanded")
            open_nodes.discard(key)
            expanded[key] = (size, height)
        if depth + height - 1 > MAX_DEPTH:
            raise _expansion_error(node, f"nested more than {MAX_DEPTH} levels deep (aliases expanded)")
        return size, height

    walk(root, 1)


def _expansion_error(node: yaml.Node, problem: str) -> yaml.MarkedYAMLError:
    return yaml.composer.ComposerError(None, None, problem, node.start_mark)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


class UnsetVariableError(ConfigError):
    """A `${VAR}` with no default whose variable is not set. In a file name expanded when it is
    read (`redis.password_file`, `redis.tls.*`), the config cannot work where the command runs:
    `config check` says so as an error, not a warning."""

    def __init__(self, message: str, *, variable: str) -> None:
        super().__init__(message)
        self.variable = variable


# systemd sets it for the service only (LoadCredential=); the deploy guide's credential source.
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
CREDENTIALS_SOURCE_DIR = "/etc/gpulock-monitor"


def read_password(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The Redis password: read from `redis.password_file` (whose `${VAR}`s are expanded now,
    from `env`, not when the config was loaded), else `redis.password`."""
    if not settings.redis_password_file:
        return settings.redis_password
    env = os.environ if env is None else env
    name = expand_path(settings.redis_password_file, "redis.password_file", env)
    try:
        return Path(name).read_text(encoding="utf-8").strip()
    except PermissionError:
        raise ConfigError(
            f"redis.password_file: cannot read {label(name, 200)}: permission denied "
            "(run the command as a user who can read it, e.g. with sudo)"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"redis.password_file: cannot read {label(name, 200)}: {exc.__class__.__name__}") from None


def expand_path(value: str, path: str, env: Mapping[str, str] | None = None) -> str:
    """A file name from the config whose `${VAR}`s are expanded when used (systemd sets
    $CREDENTIALS_DIRECTORY for the service only), `~` included. An unset variable is one line
    that says how to run the command where it is not set."""
    env = os.environ if env is None else env
    try:
        return os.path.expanduser(str(_expand(value, path, env)))
    except UnsetVariableError as exc:
        raise UnsetVariableError(_unset_here(value, path, exc.variable), variable=exc.variable) from None


def _unset_here(value: str, path: str, variable: str) -> str:
    shown = _key(variable)
    if variable != CREDENTIALS_ENV:
        return (
            f"{path}: environment variable {shown} is not set here (the file name is expanded when the file is "
            f"read): write ${{{shown}:-default}} in the config, or set {shown} for this command"
        )
    fallback = value.replace(f"${{{CREDENTIALS_ENV}}}", f"${{{CREDENTIALS_ENV}:-{CREDENTIALS_SOURCE_DIR}}}", 1)
    return (
        f"{path}: environment variable {CREDENTIALS_ENV} is not set here: systemd sets it only inside the "
        f"service (LoadCredential=); write {label(fallback, 120)} so the same config works outside it, or run "
        f"sudo env {CREDENTIALS_ENV}={CREDENTIALS_SOURCE_DIR} gpulock-monitor ..."
    )


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
            shown = _key(name)
            raise UnsetVariableError(
                f"{path}: environment variable {shown} is not set (write ${{{shown}:default}} to give a default)",
                variable=name,
            )
    out.append(_plain(text[end:], path))
    return _FromEnv("".join(out))


def _check_references(value: Any, path: str) -> None:
    """A late-expanded value's `${...}` references are well formed (checked when the config is
    read, although the variables are looked up only when the file is)."""
    if isinstance(value, str) and "${" in value:
        end = 0
        for match in _REFERENCE.finditer(value):
            _plain(value[end : match.start()], path)
            end = match.end()
        _plain(value[end:], path)


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds_upto(maximum: int, *, optional: bool = False) -> Converter:
    """A number of seconds in MIN_SECONDS..maximum (finite; fractions allowed), or a span with
    units as `--since` takes it (`90s`, `1m30s`, `2h`, `250ms`); `optional` also takes null.
    The check compares before converting: an integer too large for a float is out of range,
    not an OverflowError."""
    span = f"{MIN_SECONDS:g} to {maximum} ({maximum // 86400} days)"

    def convert(value: Any, path: str) -> float | None:
        value = _scalar(value)
        if optional and value is None:
            return None
        given = value
        if isinstance(value, str) and (seconds := units.parse_span(value.strip())) is not None:
            value = seconds
        if not _is_number(value):
            raise ConfigError(
                f"{path}: expected a number of seconds or a span such as 90s, 1m30s or 2h, got {short(given)}"
            )
        if not MIN_SECONDS <= value <= maximum:  # NaN and infinities fail this too
            raise ConfigError(f"{path}: must be a positive number of seconds from {span}, got {short(given)}")
        return float(value)

    return convert


_interval = _seconds_upto(MAX_INTERVAL_S)
_seconds = _seconds_upto(MAX_TIMEOUT_S)
_optional_seconds = _seconds_upto(MAX_TIMEOUT_S, optional=True)


def _count(minimum: int, maximum: int) -> Converter:
    def convert(value: Any, path: str) -> int:
        value = _scalar(value)
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise ConfigError(f"{path}: expected an integer >= {minimum} and <= {maximum}, got {short(value)}")
        return value

    return convert


def _bool(value: Any, path: str) -> bool:
    value = _scalar(value)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {short(value)}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{path}: expected a non-empty string, got {short(_text(value))}")
    return str(value)


def _optional_string(value: Any, path: str) -> str | None:
    if value is None or (isinstance(value, _FromEnv) and not value):  # ${VAR:} for "none"
        return None
    return _string(value, path)


# What redis-py accepts in a URL's query, besides its own parsers (URL_QUERY_ARGUMENT_PARSERS):
# the connection's keyword arguments that are plain text.
_URL_TEXT_OPTIONS = frozenset(
    {"client_name", "username", "password", "lib_name", "lib_version", "encoding", "encoding_errors"}
)
_URL_TLS_OPTIONS = frozenset(
    {
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_ca_data",
        "ssl_password",
        "ssl_ciphers",
        "ssl_validate_ocsp",
        "ssl_validate_ocsp_stapled",
    }
)


def _redis_url(value: Any, path: str) -> str:
    """Parsed and checked now, as redis-py will read it: scheme, host, port, database, options.
    Errors show the URL redacted."""
    url = _string(value, path)
    shown = short(redact_url(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # `[::1` (no closing bracket), a port that is not a number or too big
        raise ConfigError(f"{path}: not a valid URL ({_one_line(str(exc))}): {shown}") from None
    if parts.scheme not in ("redis", "rediss", "unix") or not url.startswith(f"{parts.scheme}://"):
        raise ConfigError(f"{path}: expected a redis://, rediss:// or unix:// URL, got {shown}")
    if any(c.isspace() for c in url):
        raise ConfigError(f"{path}: a URL has no spaces or line breaks (percent-encode them): {shown}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{path}: a unix:// URL names the socket's path (unix:///run/redis.sock): {shown}")
    else:
        if port == 0:
            raise ConfigError(f"{path}: expected a port number 1..65535: {shown}")
        if parts.hostname is None and parts.netloc.rpartition("@")[2]:
            raise ConfigError(f"{path}: expected a host name or address: {shown}")
        db = parts.path[1:] if parts.path.startswith("/") else parts.path
        if db and not _is_db_number(db):
            raise ConfigError(f"{path}: the path is the database number (/0, /2, ...): {shown}")
    _url_options(parts.query, parts.scheme, path, shown)
    try:  # what redis-py itself checks as it builds a connection (no I/O): option values, TLS flags
        redis.ConnectionPool.from_url(url).make_connection()
    except (TypeError, ValueError, redis.RedisError) as exc:
        raise ConfigError(f"{path}: redis-py refuses it ({_one_line(redact(str(exc)))[:120]}): {shown}") from None
    return url


def _is_db_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_DB


def _url_options(query: str, scheme: str, path: str, shown: str) -> None:
    """The URL's `?name=value` options: names redis-py takes, values its parsers accept."""
    parsers: Mapping[str, Any] = redis.connection.URL_QUERY_ARGUMENT_PARSERS
    tls = _URL_TLS_OPTIONS | {name for name in parsers if name.startswith("ssl_")}
    allowed = (parsers.keys() - tls - {"retry_on_error"}) | _URL_TEXT_OPTIONS | (tls if scheme == "rediss" else set())
    for name, option in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            hint = " (TLS options need rediss://, or use redis.tls)" if name in tls else ""
            raise ConfigError(f"{path}: unknown option {short(name, 40)} in the URL{hint}: {shown}")
        try:
            if name in parsers:
                parsers[name](option)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: invalid value for {name} in the URL: {shown}") from None
        if name == "db" and not _is_db_number(option.strip()):
            raise ConfigError(f"{path}: invalid value for db in the URL: {shown}")


def _host(value: Any, path: str) -> str:
    host = _string(value, path)
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare or any(c.isspace() or c in "/@?#[]" for c in bare):
        raise ConfigError(f"{path}: expected a host name or address, got {short(host)}")
    return f"[{bare}]" if ":" in bare else bare  # an IPv6 address goes in brackets in a URL


def _port(value: Any, path: str) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{path}: expected a port number 1..65535, got {short(value)}")
    return value


def _db(value: Any, path: str) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DB:
        raise ConfigError(f"{path}: expected a database number >= 0, got {short(value)}")
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
        raise ConfigError(f"{path}: expected a list of HOST:PORT, got {short(value)}")
    return tuple(_listen(node, f"{path}[{i}]") for i, node in enumerate(value))


def _key_pattern(value: Any, path: str) -> str:
    pattern = _string(value, path)
    if not pattern.endswith("*"):
        raise ConfigError(f"{path}: must end with '*' to match every lock, got {short(pattern)}")
    return pattern


def _listen(value: Any, path: str) -> str:
    listen = _string(value, path)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not _is_port(port):
        raise ConfigError(f"{path}: expected HOST:PORT, got {short(listen)}")
    return listen


def _bind_address(value: Any, path: str) -> str:
    """Where a server listens: HOST:PORT, or :PORT for every interface."""
    listen = _string(value, path)
    host, sep, port = listen.rpartition(":")
    if not sep or not _is_port(port) or any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(f"{path}: expected HOST:PORT, or :PORT for every interface, got {short(listen)}")
    return listen


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536


def _choice(*options: Any) -> Converter:
    def convert(value: Any, path: str) -> Any:
        if isinstance(value, str):
            value = value.lower()
        if value not in options:
            shown = "|".join(str(o).lower() for o in options)
            raise ConfigError(f"{path}: expected one of {shown}, got {short(value)}")
        return value

    return convert


def _nvml(value: Any, path: str) -> str:
    value = _scalar(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(_choice("auto", "true", "false")(value, path))


def _devices(value: Any, path: str) -> dict[str, int | str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping of lock key to device index or UUID, got {short(value)}")
    for key, target in value.items():
        index = isinstance(target, int) and not isinstance(target, bool) and 0 <= target < 65536
        uuid = isinstance(target, str) and target.startswith(("GPU-", "MIG-")) and len(target) <= 200
        if not isinstance(key, str) or not (index or uuid):
            raise ConfigError(
                f"{path}.{_key(key)}: expected a device index (0, 1, ...) or a UUID (GPU-...), got {short(target)}"
            )
    return dict(value)


# The findings of `hang.findings`, as monitor.hang.Finding names them (kept here: loading the
# config must not load the NVML and /proc code).
HANG_FINDINGS = ("holder_stalled", "holder_not_on_gpu", "gpu_idle_held", "gpu_foreign_process", "gpu_xid")
_HANG_ACTIONS = ("warn", "release")


def _hang_rules(value: Any, path: str) -> dict[str, tuple[str, float]]:
    """`hang.findings`: per finding, `warn` or `release`, and how long it must last before a release."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping of finding to {{action, grace}}, got {short(value)}")
    rules = {}
    for name, rule in value.items():
        where = f"{path}.{_key(name)}"
        if name not in HANG_FINDINGS:
            close = difflib.get_close_matches(str(name), HANG_FINDINGS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (expected one of: {', '.join(HANG_FINDINGS)})"
            raise ConfigError(f"{where}: unknown finding{hint}")
        given = {"action": rule} if isinstance(rule, str) else rule  # `gpu_xid: release`: no grace
        if not isinstance(given, Mapping):
            raise ConfigError(f"{where}: expected warn, release or {{action, grace}}, got {short(rule)}")
        for key in given:
            if key not in ("action", "grace"):
                raise ConfigError(f"{where}.{_key(key)}: unknown key (expected one of: action, grace)")
        action = _choice(*_HANG_ACTIONS)(given.get("action", "warn"), f"{where}.action")
        grace = given.get("grace", 0)
        grace_s = 0.0 if grace in (0, "0") else _seconds(grace, f"{where}.grace")
        rules[str(name)] = (str(action), float(grace_s or 0.0))
    return rules


def _percent(value: Any, path: str) -> float:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ConfigError(f"{path}: expected a percentage from 0 to 100, got {short(value)}")
    return float(value)


def _xid_codes(value: Any, path: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of Xid codes, got {short(value)}")
    codes = []
    for i, code in enumerate(value):
        codes.append(_count(1, 65535)(code, f"{path}[{i}]"))
    return tuple(sorted(set(codes)))


def _channels(value: Any, path: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of channels, got {short(value)}")
    value = [_span_timeout(channel) for channel in value]
    for i, channel in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(channel, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {short(channel)}")
        _choice(*ALERT_CHANNEL_TYPES)(channel.get("type"), f"{where}.type")
        _choice(*SEVERITIES)(channel.get("min_severity", "warning"), f"{where}.min_severity")
        channels.validate(channel, where)
        _channel_numbers(channel, where)
        for key in ("url",):
            if key in channel:
                _alert_url(channel[key], f"{where}.{key}")
    return tuple(value)


def _span_timeout(channel: Any) -> Any:
    """A channel's `timeout` written as a span (`5s`, `1m`) becomes its seconds, as every other
    duration of the config; anything else is left for the checks to refuse."""
    timeout = channel.get("timeout") if isinstance(channel, Mapping) else None
    if isinstance(timeout, str) and (seconds := units.parse_span(timeout.strip())) is not None:
        return {**channel, "timeout": seconds}
    return channel


def _channel_numbers(channel: Mapping[str, Any], where: str) -> None:
    """Every number a channel reads, range-checked here, where the config is read."""
    for key, low, high in (
        ("timeout", MIN_SECONDS, MAX_CHANNEL_TIMEOUT_S),
        ("rate_per_minute", MIN_SECONDS, MAX_RATE_PER_MINUTE),
    ):
        value = channel.get(key, high)
        if not _is_number(value) or not low <= value <= high:
            raise ConfigError(f"{where}.{key}: expected a positive number from {low:g} to {high}, got {short(value)}")
    if "retries" in channel:
        _count(0, MAX_RETRIES)(channel["retries"], f"{where}.retries")
    if "port" in channel:
        _port(channel["port"], f"{where}.port")


def _channel_urls_from_env(raw_channels: tuple[Mapping[str, Any], ...], env: Mapping[str, str]) -> None:
    """An alert URL given as `url_env` is checked as one written in the file, when its variable is
    set here (one that is not is said by `run`, which reads it: a shell may lack the service's
    environment)."""
    for i, channel in enumerate(raw_channels):
        var = channel.get("url_env")
        if isinstance(var, str) and env.get(var):
            _alert_url(env[var], f"alerts.channels[{i}].url_env (${_key(var)})")


def _alert_url(value: Any, path: str) -> str:
    """An alert channel's URL: http(s) with a host. Errors show it with path and query masked
    (webhooks, Slack and DingTalk carry their secret there)."""
    url = _string(value, path)
    shown = short(redact_url(url, path=True))
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigError(f"{path}: not a valid URL: {shown}") from None
    if parts.scheme not in ("http", "https") or not url.startswith(f"{parts.scheme}://") or not parts.hostname:
        raise ConfigError(f"{path}: expected an http:// or https:// URL, got {shown}")
    if any(c.isspace() for c in url):
        raise ConfigError(f"{path}: a URL has no spaces or line breaks (percent-encode them): {shown}")
    return url


def _redact_channel(channel: Mapping[str, Any]) -> dict[str, Any]:
    """Secrets masked; an alert URL shows its scheme and host only, headers their names only;
    *_file and *_env names kept. What comes out is still a valid channel."""
    shown: dict[str, Any] = {}
    for key, value in channel.items():
        if key == "url" and isinstance(value, str):
            shown[key] = redact_url(value, path=True)
        elif key == "headers" and isinstance(value, Mapping):
            shown[key] = dict.fromkeys(value, "***")
        elif key == "urls" and isinstance(value, list):  # apprise: a token may be anywhere in one
            shown[key] = [redact_service_url(url) for url in value]
        elif key in channels.SECRETS and value:
            shown[key] = "***"
        else:
            shown[key] = value
    return shown


def _key(key: Any) -> str:
    """A key as shown in an error's key path: itself when short and printable, else a short repr."""
    return label(key)


_LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

# A monitor's name is part of a Redis key and of `health` output: a host name's characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}")


def _monitor_name(value: Any, path: str) -> str | None:
    if value is None or (isinstance(value, _FromEnv) and not value):  # ${POD_NAME:} for "the host name"
        return None
    return monitor_name(_text(value), path)


def monitor_name(value: Any, path: str) -> str:
    """A monitor's name (`monitor.name`, `health --host`), checked; one ConfigError line if not one."""
    name = _string(value, path)
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{path}: expected a name of letters, digits and . _ - : @ (at most 253, as a host name), got {short(name)}"
        )
    return name


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
        ours = "|".join(_LOG_FORMATS)
        return [f"logging.format: {short(str(fmt))} is a Python logging format, not ours ({ours}); ignored"]
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
        "tls": {
            "ca_file": ("redis_tls_ca_file", _optional_string),
            "cert_file": ("redis_tls_cert_file", _optional_string),
            "key_file": ("redis_tls_key_file", _optional_string),
        },
    },
    "gpu_lock": {"key_pattern": ("key_pattern", _key_pattern), "lock_timeout": ("lock_timeout_s", _seconds)},
    "gpu_lock_monitor": {
        "monitor_interval": ("monitor_interval_s", _interval),
        "timeout_levels": {
            "warning": ("warning_s", _seconds),
            "soft_timeout": ("soft_timeout_s", _seconds),
            "hard_timeout": ("hard_timeout_s", _optional_seconds),
        },
        "heartbeat": {
            "interval": ("heartbeat_interval_s", _interval),
            "timeout": ("heartbeat_timeout_s", _seconds),
        },
        "cleanup": {"max_retry": ("max_retry", _count(1, MAX_RETRIES)), "retry_delay": ("retry_delay_s", _interval)},
        "enabled": ("enabled", _bool),
        "auto_recovery": ("auto_recovery", _bool),
    },
    "audit": {
        "path": ("audit_path", _string),
        "critical_path": ("critical_path", _string),
        "max_bytes": ("audit_max_bytes", _count(1024, MAX_AUDIT_BYTES)),
        "backups": ("audit_backups", _count(0, MAX_AUDIT_BACKUPS)),
    },
    "metrics": {"enabled": ("metrics_enabled", _bool), "listen": ("metrics_listen", _bind_address)},
    "nvml": {
        "enabled": ("nvml_enabled", _nvml),
        "devices": ("nvml_devices", _devices),
        "busy_grace": ("nvml_busy_grace_s", _seconds),
    },
    "discovery": {
        "notifications": ("notifications", _choice("auto", "off")),
        "configure_notifications": ("configure_notifications", _bool),
        "reconcile_keys_per_s": ("reconcile_keys_per_s", _count(10, 1_000_000)),
    },
    "hang": {
        "progress_timeout": ("hang_progress_timeout_s", _optional_seconds),
        "not_on_gpu_grace": ("hang_not_on_gpu_grace_s", _seconds),
        "idle_window": ("hang_idle_window_s", _seconds),
        "idle_util_pct": ("hang_idle_util_pct", _percent),
        "foreign_process_grace": ("hang_foreign_process_grace_s", _seconds),
        "xid_ignore": ("hang_xid_ignore", _xid_codes),
        "job_mapping_dir": ("job_mapping_dir", _optional_string),
        "findings": ("hang_rules", _hang_rules),
    },
    "alerts": {"channels": ("alert_channels", _channels), "redis_down_after": ("redis_down_alert_s", _seconds)},
    "logging": {
        "level": ("log_level", _choice(*LOG_LEVELS)),
        "format": ("_log_format", _log_format_value),
    },
    "monitor": {"name": ("monitor_name", _monitor_name)},
}


# How `config show` prints a field where its value is not shown as it is; fields whose names
# start with "_" are inputs folded into others (host, port and db into the URL) and not shown.
_SHOWN_AS: dict[str, Callable[[Any], Any]] = {
    "redis_url": redact_url,
    "redis_password": lambda password: "***" if password else None,
    "sentinel_nodes": list,
    "nvml_devices": dict,
    "alert_channels": lambda channels: [_redact_channel(c) for c in channels],
    "hang_xid_ignore": list,
    # Every finding with what it does, the defaults included.
    "hang_rules": lambda rules: {
        name: {"action": rules.get(name, ("warn", 0.0))[0], "grace": rules.get(name, ("warn", 0.0))[1]}
        for name in HANG_FINDINGS
    },
}
_SHOWN_FIELD = {"_log_format": "log_format"}


def _shown(spec: Spec, settings: Settings) -> dict[str, Any]:
    """`spec`'s tree with the values of `settings`: what `config show` prints."""
    out: dict[str, Any] = {}
    for key, entry in spec.items():
        if isinstance(entry, Mapping):
            out[key] = _shown(entry, settings)
            continue
        field_name = _SHOWN_FIELD.get(entry[0], entry[0])
        if field_name.startswith("_"):
            continue
        value = getattr(settings, field_name)
        out[key] = _SHOWN_AS[field_name](value) if field_name in _SHOWN_AS else value
    return out


# Per section: the keys of the fleet's config.yml that are not ours, accepted and ignored.
_IGNORED: dict[str, frozenset[str]] = {
    "redis": FLEET_REDIS_KEYS,
    "gpu_lock": FLEET_GPU_LOCK_KEYS,
    "gpu_lock_monitor": FLEET_GPU_LOCK_MONITOR_KEYS,
    "logging": FOREIGN_LOGGING_KEYS,
}
# Expanded when used, not when loaded (`read_password`): systemd sets $CREDENTIALS_DIRECTORY
# for the service only.
_EXPANDED_LATE = frozenset({"redis.password_file", "redis.tls.ca_file", "redis.tls.cert_file", "redis.tls.key_file"})


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
        raise ConfigError(f"{path}: expected a mapping, got {short(raw)}")
    for key, value in raw.items():
        where = f"{path}.{_key(key)}"
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
            if where in _EXPANDED_LATE:
                _check_references(value, where)
                expanded = value
            else:
                expanded = _expand_all(value, where, env)
            out[field_name] = convert(expanded, where)
