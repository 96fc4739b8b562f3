"""The `gpulock-monitor` command line: thin commands over the core.

Bad input ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
import redis
import yaml

from monitor import __version__, audit_read, daemon, logs, manual, snapshot
from monitor.cli import status as render
from monitor.config import LOG_LEVELS, Settings, UnsetVariableError, find_config, load_settings, monitor_name
from monitor.connection import connect
from monitor.errors import MonitorError
from monitor.gpu import Nvml
from monitor.health import State, health_check
from monitor.protocol import Outcome

F = TypeVar("F", bound=Callable[..., Any])

FOLLOW_LINES = 10  # what `audit --follow` shows of the past, as `tail -f`

CONFIG_HELP = "Config file (default: $GPULOCK_MONITOR_CONFIG, ./monitor.yml, /etc/gpulock-monitor/monitor.yml)."


def _config_before_the_command(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`-c` after the command, else the one given before it (`gpulock-monitor -c FILE status`)."""
    if value is not None:
        return value
    given: str | None = ctx.find_root().params.get("config_path")
    return given


config_option = click.option(
    "-c", "--config", "config_path", metavar="FILE", help=CONFIG_HELP, callback=_config_before_the_command
)


def _one_line_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MonitorError as exc:
            click.echo(f"gpulock-monitor: {exc}", err=True)
            sys.exit(1)
        except redis.RedisError as exc:
            click.echo(f"gpulock-monitor: redis: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:  # e.g. the audit file filled the disk right after a release
            click.echo(f"gpulock-monitor: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _interactive() -> bool:
    return sys.stdin.isatty()


def _colour() -> bool:
    """Colour for people at a terminal, unless they said NO_COLOR (no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _terminal_width() -> int | None:
    """The width to fit a table in: the terminal's, or $COLUMNS; None (no limit) down a pipe."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return shutil.get_terminal_size().columns
    return None


def _settings(config_path: str | None, log_level: str | None = None) -> Settings:
    settings = load_settings(config_path)
    logs.configure(log_level or settings.log_level, settings.log_format, stream=sys.stdout)
    log = logs.get_logger("gpulock_monitor")
    for warning in settings.warnings:
        log.warning("config_warning", detail=warning)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="gpulock-monitor")
@click.option("-c", "--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def main(config_path: str | None) -> None:
    """Find GPU locks whose holders died, and release them safely."""
    # `config_path` is read by each command's own -c (`config_option`), which wins over this one.


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Do one pass and exit.")
@click.option("--dry-run", is_flag=True, help="Decide and audit everything, release nothing.")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Log at this level and above (default: logging.level of the config).",
)
@_one_line_errors
def run(config_path: str | None, once: bool, dry_run: bool, log_level: str | None) -> None:
    """Run the monitor daemon."""
    settings = _settings(config_path, None if log_level is None else log_level.lower())
    sys.exit(daemon.run(settings, dry_run=dry_run, once=once))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="A stable JSON document instead of the table.")
@_one_line_errors
def status(config_path: str | None, as_json: bool) -> None:
    """Every lock: holder, held time, heartbeat, tier, and what the monitor would do. Read-only."""
    settings = load_settings(config_path)
    logs.configure("warning", "console", stream=sys.stderr)  # keep stdout for the table or JSON
    client = connect(settings)
    snap = snapshot.take(client, settings, Nvml(settings.nvml_enabled))
    looked_at = render.look(client, settings, find_config(config_path), settings.name)  # monitor.name
    if as_json:
        click.echo(json.dumps(render.as_json(snap, looked_at), indent=2, ensure_ascii=False))
    else:
        click.echo(render.as_table(snap, looked_at, width=_terminal_width(), colour=_colour()))


@main.command()
@click.argument("lock_key")
@config_option
@click.option("--holder", metavar="VALUE", help="Release only if the lock still has this value.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Release even a holder whose heartbeat is alive.")
@_one_line_errors
def release(lock_key: str, config_path: str | None, holder: str | None, yes: bool, force: bool) -> None:
    """Release LOCK_KEY now: identity-checked, audited as manual_release.

    Off a terminal (ssh without a tty, cron, Ansible) it needs --yes or --holder: nothing answers
    a prompt there, and a release nobody confirmed must not happen by default.
    """
    settings = load_settings(config_path)
    # argv as the bytes the shell passed: Python decoded them with surrogateescape.
    key = os.fsencode(lock_key)
    wanted = None if holder is None else os.fsencode(holder)
    manual.check_lock_key(settings, key)  # before the audit files: a refusal writes nothing
    audit, _ = daemon.open_logs(settings, dry_run=False)  # no audit, no release

    def confirm(current: bytes, description: str) -> bool:
        if yes:
            return True
        if _interactive():
            return click.confirm(f"{description}. Release it?", default=False)
        if wanted is not None:
            return True  # the operator named the value to release: that is the confirmation
        raise MonitorError(f"{description}: not a terminal; add --yes (or --holder VALUE) to release it")

    # Only a prompt is coloured: what is raised may end up in a log.
    paint = render.painter(_colour()) if _interactive() and not yes else None
    result = manual.release(
        connect(settings), settings, audit, key, holder=wanted, confirm=confirm, force=force, paint=paint
    )
    shown_key, now = manual.shown(key), manual.shown(result.current or b"")
    if result.outcome is Outcome.RELEASED:
        done = f"released {shown_key}"
        click.echo(f"{click.style(done, fg='green') if _colour() else done} (was held by {now})")
        return
    why = {
        Outcome.GONE: f"{shown_key} is not held",
        Outcome.HOLDER_CHANGED: f"{shown_key} is held by {now} now"
        + ("" if wanted is None else f", not {manual.shown(wanted)}")
        + " (a new holding)",
        Outcome.HEARTBEAT_REVIVED: f"{shown_key}: heartbeat revived",
    }[result.outcome]
    raise MonitorError(f"nothing released: {why}")


@main.command()
@config_option
@click.option("--since", metavar="WHEN", help="Only events since then: 2h, 30m, 1d, or an ISO 8601 time.")
@click.option("--lock", "lock_key", metavar="KEY", help="Only events about this lock.")
@click.option("--event", "event_name", metavar="NAME", help="Only events with this name.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events, across rotations.")
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    metavar="N",
    help="Only the last N events (that the other options keep). Default with --follow: 10, or all since --since.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON lines as stored.")
@_one_line_errors
def audit(
    config_path: str | None,
    since: str | None,
    lock_key: str | None,
    event_name: str | None,
    follow: bool,
    lines: int | None,
    as_json: bool,
) -> None:
    """Read the audit log, rotated files included."""
    settings = load_settings(config_path)
    path = Path(settings.audit_path)
    start = None if since is None else audit_read.parse_since(since, time.time())
    keep = audit_read.Filter(
        since=start,
        lock=lock_key,
        event=None if event_name is None else audit_read.check_event(event_name),
    )

    def show(record: dict[str, Any]) -> None:
        if keep(record):
            click.echo(json.dumps(record, ensure_ascii=False) if as_json else audit_read.describe(record))

    records: Iterable[dict[str, Any]]
    if follow:  # as `tail -f`: the last few, not the whole history of every rotated file
        if lines is None and start is None:
            lines = FOLLOW_LINES
        records = audit_read.follow(path, stop=lambda: False, lines=lines, keep=keep, since=start)
    elif lines is not None:
        records = audit_read.last(path, lines, keep, since=start)
    else:
        records = audit_read.read(path)
    try:
        for record in records:
            show(record)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `audit | head`
        sys.stderr.close()


class _NagiosCommand(click.Command):
    """A usage error exits 3 (UNKNOWN to Nagios), not click's 2, which Nagios reads as CRITICAL."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            # click declares exit_code on the class; this one error (and its hints) exits 3.
            exc.exit_code = int(State.UNKNOWN)  # type: ignore[misc]
            raise


@main.command(cls=_NagiosCommand)
@config_option
@click.option(
    "--host",
    "name",
    metavar="NAME",
    help="Check the daemon of that name (its monitor.name, by default its host name), e.g. from a bastion.",
)
def health(config_path: str | None, name: str | None) -> None:
    """Exit 0 healthy, 1 degraded, 2 critical, 3 unknown (health itself could not check), with one
    line of reason and, after a `|`, Nagios performance data."""
    try:
        settings = load_settings(config_path)
        result = health_check(settings, None if name is None else monitor_name(name, "--host"))
    except (MonitorError, OSError) as exc:  # its own trouble (config, a file it cannot read): not the daemon's
        click.echo(f"unknown: {exc}")
        sys.exit(int(State.UNKNOWN))
    click.echo(result.nagios_line)
    sys.exit(int(result.state))


@main.group()
def config() -> None:
    """Validate or show the configuration."""


@config.command("check")
@config_option
@_one_line_errors
def config_check(config_path: str | None) -> None:
    """Validate the config file; exit 0 when it is valid.

    Where Redis answers, also say what the daemon found that contradicts the config.
    """
    settings = load_settings(config_path)
    warnings = list(settings.warnings)
    found: str | None = None
    try:
        client = connect(settings)
    except UnsetVariableError:  # status, health and release would stop on it here too: an error
        raise
    except MonitorError as exc:  # e.g. a redis.tls file that cannot be read: the config cannot work
        warnings.append(str(exc))
    else:
        with contextlib.suppress(redis.RedisError):  # validating the file must not depend on Redis
            found = snapshot.mismatch_warning(client, settings)
    if found is not None:
        warnings.append(found)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("config ok")


@config.command("show")
@config_option
@_one_line_errors
def config_show(config_path: str | None) -> None:
    """Print the effective config (defaults filled in, secrets redacted)."""
    click.echo(yaml.safe_dump(load_settings(config_path).redacted(), sort_keys=False), nl=False)


@main.command()
@_one_line_errors
def demo() -> None:
    """A self-contained tour on a throwaway local Redis with simulated workers."""
    from monitor.demo import tour  # noqa: PLC0415 - keeps the demo off the daemon's import path

    sys.exit(tour.run())


# --- files shipped with the package (monitor/data/, copies of the repository's) ------------------------


@config.command("example")
def config_example() -> None:
    """Print the documented default config.

    Every key with its default and its meaning: start /etc/gpulock-monitor/monitor.yml from it."""
    from monitor.cli import shipped  # noqa: PLC0415 - only these commands read the shipped files

    click.echo(shipped.read("monitor.yml"), nl=False)


@main.group()
def deploy() -> None:
    """Print the deployment files of this version (as in the repository's deploy/)."""


@deploy.command("systemd-unit")
def deploy_systemd_unit() -> None:
    """Print the systemd unit.

    Install it as /etc/systemd/system/gpulock-monitor.service (deploy/README.md, step by step)."""
    from monitor.cli import shipped  # noqa: PLC0415 - only these commands read the shipped files

    click.echo(shipped.read("gpulock-monitor.service"), nl=False)


@deploy.command("redis-acl")
@click.option("--redis-7", "redis_7", is_flag=True, help="The tighter file for Redis 7 and newer.")
def deploy_redis_acl(redis_7: bool) -> None:
    """Print the Redis ACL users.

    In Redis's aclfile format: the monitor's user and one for workers; replace both CHANGE-ME
    passwords (deploy/README.md, "Redis ACL")."""
    from monitor.cli import shipped  # noqa: PLC0415 - only these commands read the shipped files

    click.echo(shipped.read("redis-acl-7.conf" if redis_7 else "redis-acl.conf"), nl=False)
