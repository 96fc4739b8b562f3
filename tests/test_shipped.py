"""`config example` and `deploy ...` print the package's copies of monitor.yml and deploy/ files: each
copy is the repository's file byte for byte (the wheel carries them: tests/test_packaging.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from monitor.cli import main, shipped
from monitor.config import Settings

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "monitor" / "data"


@pytest.mark.parametrize(("copy", "original"), sorted(shipped.REPO_PATHS.items()))
def test_each_package_copy_is_the_repository_file_byte_for_byte(copy, original):
    assert shipped.read(copy) == (REPO / original).read_bytes(), (
        f"monitor/data/{copy} differs from {original}: after changing {original}, run "
        f"`cp {original} monitor/data/{copy}`"
    )


def test_the_package_ships_no_other_data():
    assert {p.name for p in DATA.iterdir()} == set(shipped.REPO_PATHS)


@pytest.mark.parametrize(
    ("args", "copy"),
    [
        (["config", "example"], "monitor.yml"),
        (["deploy", "systemd-unit"], "gpulock-monitor.service"),
        (["deploy", "redis-acl"], "redis-acl.conf"),
        (["deploy", "redis-acl", "--redis-7"], "redis-acl-7.conf"),
    ],
)
def test_commands_print_the_shipped_files_exactly(args, copy):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == (REPO / shipped.REPO_PATHS[copy]).read_bytes()


def test_config_example_is_the_default_config(tmp_path):
    text = CliRunner().invoke(main, ["config", "example"]).stdout
    assert Settings.from_mapping(yaml.safe_load(text), env={}) == Settings.from_mapping({}, env={})
    path = tmp_path / "monitor.yml"
    path.write_text(text)
    check = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert "config ok" in check.stdout, check.output


def test_an_unknown_shipped_file_is_refused():
    with pytest.raises(KeyError):
        shipped.read("../setup.cfg")
