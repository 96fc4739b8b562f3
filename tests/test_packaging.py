"""The sdist carries what the tests and the deploy artefacts need; the wheel built from it carries the
package whole, its type marker and the licence; the Containerfile copies enough to build it."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

from monitor.cli import shipped

REPO = Path(__file__).resolve().parent.parent
# What a working tree has that is not the project's: never copied into the build.
JUNK = (
    ".git", ".venv", "venv", "build", "dist", "htmlcov", "__pycache__", "*.egg-info", "*.py[cod]", ".coverage*",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
)  # fmt: skip
# Directories the sdist carries whole, beside the package.
SHIPPED_DIRS = ("tests", "deploy", "benchmarks", ".ci")
HOME = "https://github.com/gpulock-monitor/gpulock-monitor"

pytestmark = pytest.mark.slow  # each build takes a few seconds


def build(source: Path, out: Path, *what: str) -> None:
    # No isolation: the build backend comes from the test extra, not from the network.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", *what, "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a checkout has it (the working tree without caches and environments)."""
    copy = tmp_path_factory.mktemp("source") / "gpulock-monitor"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(*JUNK))
    return copy


@pytest.fixture(scope="module")
def dists(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist, and the wheel built from that sdist (as pip builds one from PyPI's sdist)."""
    out = tmp_path_factory.mktemp("dist")
    build(source, out)
    (sdist,) = out.glob("gpulock[-_]monitor-*.tar.gz")  # setuptools < 69 keeps the hyphen
    (wheel,) = out.glob("gpulock_monitor-*-py3-none-any.whl")
    return sdist, wheel


def sdist_files(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = {name.split("/", 1)[0] for name in names}
    assert len(top) == 1, top
    return {name.split("/", 1)[1] for name in names}


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as whl:
        return set(whl.namelist())


def metadata(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        return list(HeaderParser().parsestr(whl.read(name).decode()).items())


def test_sdist_has_the_tests_and_the_deploy_artefacts(source, dists):
    sdist, _ = dists
    files = sdist_files(sdist)
    for wanted in (
        "tests/conftest.py",
        "tests/helpers.py",
        "tests/data/fleet_config.yml",
        "monitor.yml",
        "LICENSE",
        "README.md",
        "Containerfile",
        "deploy/systemd/gpulock-monitor.service",
        "deploy/prometheus/rules.yml",
        "deploy/prometheus/rules_test.yml",
        "deploy/grafana/gpulock-monitor.json",
        "deploy/kubernetes/deployment.yaml",
        ".ci/run",
        "setup.cfg",
        "pyproject.toml",
    ):
        assert wanted in files, wanted
    # Whole: every file of those directories and of the package, and the documents a checkout has.
    have = files_under(source)
    shipped = {f for f in have if f.split("/", 1)[0] in (*SHIPPED_DIRS, "monitor")}
    shipped |= {f for f in ("CHANGELOG.md", "CONTRIBUTING.md") if f in have}
    assert shipped <= files, sorted(shipped - files)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_wheel_has_the_whole_package(source, dists):
    _, wheel = dists
    files = wheel_files(wheel)
    modules = {f for f in files_under(source) if f.startswith("monitor/") and f.endswith(".py")}
    assert modules, "no package in the source"
    assert modules <= files, sorted(modules - files)
    packages = {str(Path(f).parent) for f in modules if f.endswith("/__init__.py")}
    assert all(f"{p}/__init__.py" in files for p in packages)
    assert "monitor/py.typed" in files
    assert not [f for f in files if f.startswith("tests/")]
    licences = [f for f in files if re.fullmatch(r"gpulock_monitor-[^/]+\.dist-info/(licenses/)?LICENSE", f)]
    assert licences, sorted(f for f in files if ".dist-info/" in f)
    with zipfile.ZipFile(wheel) as whl:
        assert whl.read(licences[0]).decode() == (REPO / "LICENSE").read_text()


def test_wheel_carries_monitor_yml_and_the_deploy_files(dists):
    # `config example` and `deploy ...` print them from an installed wheel, with no checkout at hand.
    _, wheel = dists
    with zipfile.ZipFile(wheel) as whl:
        for copy, original in shipped.REPO_PATHS.items():
            assert whl.read(f"monitor/data/{copy}") == (REPO / original).read_bytes(), copy


def test_an_installed_wheel_prints_the_config_and_the_unit(dists, tmp_path):
    """The wheel in a fresh virtual environment, run away from any checkout (its dependencies are this
    environment's, reached through a path entry: the package itself can only come from the wheel)."""
    _, wheel = dists
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    Path(purelib, "dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    away = tmp_path / "elsewhere"
    away.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([venv / "bin" / "gpulock-monitor", *args], capture_output=True, cwd=away, timeout=60)

    where = subprocess.run([python, "-c", "import monitor; print(monitor.__file__)"], capture_output=True, cwd=away)
    assert where.stdout.decode().startswith(purelib), where
    for args, original in (
        (("config", "example"), "monitor.yml"),
        (("deploy", "systemd-unit"), "deploy/systemd/gpulock-monitor.service"),
        (("deploy", "redis-acl", "--redis-7"), "deploy/redis-acl-7.conf"),
    ):
        result = run(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (REPO / original).read_bytes(), args
    (away / "monitor.yml").write_bytes(run("config", "example").stdout)
    check = run("config", "check", "-c", str(away / "monitor.yml"))
    assert check.returncode == 0, check.stderr
    assert check.stdout == b"config ok\n"


def test_wheel_metadata(dists):
    _, wheel = dists
    meta = metadata(wheel)
    classifiers = {value for key, value in meta if key == "Classifier"}
    for wanted in (
        "Intended Audience :: System Administrators",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: System :: Monitoring",
    ):
        assert wanted in classifiers, wanted
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    urls = dict(value.split(", ", 1) for key, value in meta if key == "Project-URL")
    assert urls["Source"] == HOME
    assert urls["Changelog"].startswith(HOME + "/")
    assert all(url.startswith("https://") for url in urls.values()), urls
    assert ("License-File", "LICENSE") in meta


def test_setup_cfg_metadata_is_absolute():
    # PyPI shows project_urls as links: a path relative to the repository would lead nowhere.
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    for line in cfg["metadata"]["project_urls"].strip().splitlines():
        _, url = (part.strip() for part in line.split("=", 1))
        assert url.startswith(HOME), line
    assert cfg["metadata"]["license_files"].split() == ["LICENSE"]
    assert "Copyright (c) 2026 the gpulock-monitor authors" in (REPO / "LICENSE").read_text()


# --- the Containerfile ------------------------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Containerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_containerfile_runs_the_daemon_unprivileged():
    steps = containerfile()
    bases = [args for op, args in steps if op == "FROM"]
    assert bases
    assert all(re.fullmatch(r"python:3\.1[0-2]-slim( AS \w+)?", base) for base in bases), bases
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    users = [args for op, args in final if op == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["gpulock-monitor", "run"]') in final
    assert ("EXPOSE", "9464") in final


def test_containerfile_copies_enough_to_build_the_wheel(source, dists, tmp_path):
    # Its build stage copies named files only (no .venv or .git into the image): the wheel built from
    # exactly those must be the wheel built from the sdist.
    steps = containerfile()
    first_stage = steps[: next(i for i, (op, _) in enumerate(steps) if op == "FROM" and i > 0)]
    context = tmp_path / "context"
    context.mkdir()
    for op, args in first_stage:
        if op != "COPY":
            continue
        *sources, destination = args.split()
        assert destination.startswith("./"), args
        for name in sources:
            origin = source / name
            target = context / destination / name if destination.endswith("/") else context / destination
            if origin.is_dir():
                shutil.copytree(origin, target)
            else:
                shutil.copy2(origin, target)
    out = tmp_path / "out"
    build(context, out, "--wheel")
    (wheel,) = out.glob("*.whl")
    assert wheel_files(wheel) == wheel_files(dists[1])
