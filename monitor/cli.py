"""The `gpulock-monitor` command line: thin commands over the core.

Bad input ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import redis
import yaml

from monitor import __version__, daemon, logs
from monitor.config import Settings, load_settings
from monitor.errors import MonitorError

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    help="Config file (default: $GPULOCK_MONITOR_CONFIG, ./monitor.yml, /etc/gpulock-monitor/monitor.yml).",
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

    return wrapper  # type: ignore[return-value]


def _settings(config_path: str | None) -> Settings:
    settings = load_settings(config_path)
    logs.configure(settings.log_level, settings.log_format, stream=sys.stdout)
    log = logs.get_logger("gpulock_monitor")
    for warning in settings.warnings:
        log.warning("config_warning", detail=warning)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="gpulock-monitor")
def main() -> None:
    """Find GPU locks whose holders died, and release them safely."""


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Do one pass and exit.")
@click.option("--dry-run", is_flag=True, help="Decide and audit everything, release nothing.")
@_one_line_errors
def run(config_path: str | None, once: bool, dry_run: bool) -> None:
    """Run the monitor daemon."""
    sys.exit(daemon.run(_settings(config_path), dry_run=dry_run, once=once))


@main.group()
def config() -> None:
    """Validate or show the configuration."""


@config.command("check")
@config_option
@_one_line_errors
def config_check(config_path: str | None) -> None:
    """Validate the config file; exit 0 when it is valid."""
    settings = load_settings(config_path)
    for warning in settings.warnings:
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
    from monitor import demo as tour  # noqa: PLC0415 - keeps the demo off the daemon's import path

    sys.exit(tour.run())
