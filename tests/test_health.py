"""Health: assess and overdue_s checked by tables (no Redis); `health` and a pass against a Redis
that refuses (ACL, WRONGTYPE), runs a long script (BUSY) or loads its data (LOADING)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from helpers import acl_user, build, config_file, events, hold, make_settings, wait_for
from redis._parsers.base import BaseParser
from redis.client import Pipeline

from monitor import logs, protocol
from monitor.audit import monitor_identity
from monitor.cli import main
from monitor.config import Settings
from monitor.connection import connect, redis_down
from monitor.demo.redis_server import RedisServer, find_binary, free_port
from monitor.health import State, assess, health_check, mark_stopped, overdue_s
from monitor.holding import Holding, Record
from monitor.policy import Action, Decision, Heartbeat, Reason, Tier
from monitor.verdict import Verdict

# interval 30, warning 300, soft 600, hard 900; heartbeat interval 60 (key TTL 120), timeout 300
SETTINGS = Settings.from_mapping({}, env={})


def verdict(held_s: float, action: Action, reason: Reason, hb_age_s: float | None = None) -> Verdict:
    holding = Holding(
        key=b"gpu_lock:0",
        holder=b"locked_by_x",
        now_ms=0,
        held_ms=int(held_s * 1000),
        heartbeat=Heartbeat.NONE if hb_age_s is None else Heartbeat.DEAD,
        hb_age_ms=None if hb_age_s is None else int(hb_age_s * 1000),
        hb_value=None,
        hb_expiry_ms=-2,
        expiry_ms=-1,
        record=Record(holder=b"locked_by_x", expiry_ms=-1, first_seen_ms=0),
        new=False,
    )
    return Verdict(holding, Decision(action, Tier.OK, reason))


@pytest.mark.parametrize(
    ("v", "overdue"),
    [
        (verdict(100, Action.KEEP, Reason.WITHIN_LIMITS), None),
        (verdict(700, Action.KEEP, Reason.LONG_TASK_PROTECTED), None),
        (verdict(350, Action.WARN, Reason.WARNING_THRESHOLD), None),
        (verdict(950, Action.RELEASE, Reason.HARD_TIMEOUT), 50.0),
        (verdict(610, Action.RELEASE, Reason.SOFT_TIMEOUT_NO_HEARTBEAT), 10.0),
        # dead: releasable once its key expired (TTL 120 s < timeout 300 s)
        (verdict(50, Action.RELEASE, Reason.HEARTBEAT_DEAD, hb_age_s=150), 30.0),
        (verdict(50, Action.RELEASE, Reason.HEARTBEAT_DEAD, hb_age_s=100), 0.0),
        (verdict(50, Action.RELEASE, Reason.HEARTBEAT_DEAD), 0.0),  # age unknown: just now
    ],
)
def test_overdue_s_counts_from_when_the_rules_first_release(v, overdue):
    assert overdue_s(v, SETTINGS) == overdue


ZOMBIE = verdict(700, Action.RELEASE, Reason.SOFT_TIMEOUT_NO_HEARTBEAT)  # 100 s overdue
FRESH_ZOMBIE = verdict(610, Action.RELEASE, Reason.SOFT_TIMEOUT_NO_HEARTBEAT)  # 10 s: within grace
HELD = verdict(100, Action.KEEP, Reason.WITHIN_LIMITS)


@pytest.mark.parametrize(
    ("kw", "state", "reason"),
    [
        ({"redis_error": "Connection refused"}, State.CRITICAL, "redis unreachable: Connection refused"),
        ({"last_pass_age_s": None}, State.CRITICAL, "no monitor pass recorded recently (is the daemon running?)"),
        ({"last_pass_age_s": 161}, State.CRITICAL, "last successful pass 161 s ago"),  # > 5 x 30 + 10
        ({"failing_releases": 2}, State.CRITICAL, "2 release(s) failing"),
        (
            {"verdicts": [HELD, FRESH_ZOMBIE, ZOMBIE]},
            State.DEGRADED,
            "1 zombie lock(s) overdue for release, worst gpu_lock:0 by 100 s",
        ),
        ({"last_pass_age_s": 71}, State.DEGRADED, "last successful pass 71 s ago"),  # > 2 x 30 + 10
        ({"last_pass_age_s": 65}, State.HEALTHY, "0 lock(s), last pass 65.0 s ago"),
        ({"verdicts": [HELD, FRESH_ZOMBIE]}, State.HEALTHY, "2 lock(s), last pass 1.0 s ago"),
    ],
)
def test_assess_gives_each_conditions_state_and_reason(kw, state, reason):
    args = {"redis_error": None, "last_pass_age_s": 1.0, "failing_releases": 0, "verdicts": [], **kw}
    health = assess(SETTINGS, **args)
    assert (health.state, health.reason) == (state, reason)
    assert health.line == f"{state.name.lower()}: {reason}"


@pytest.mark.parametrize(
    ("kw", "line"),
    [
        (
            {},
            "healthy: 0 lock(s), last pass 1.0 s ago | locks=0 zombies=0 last_pass_age=1.0s;70;160 failing_releases=0",
        ),
        (
            {"verdicts": [HELD, FRESH_ZOMBIE, ZOMBIE], "last_pass_age_s": 4.25},
            "degraded: 1 zombie lock(s) overdue for release, worst gpu_lock:0 by 100 s"
            " | locks=3 zombies=1 last_pass_age=4.2s;70;160 failing_releases=0",
        ),
        (
            {"failing_releases": 2},
            "critical: 2 release(s) failing | locks=0 zombies=0 last_pass_age=1.0s;70;160 failing_releases=2",
        ),
        (
            {"last_pass_age_s": None},
            "critical: no monitor pass recorded recently (is the daemon running?)"
            " | locks=0 zombies=0 failing_releases=0",
        ),
        ({"redis_error": "Connection refused"}, "critical: redis unreachable: Connection refused"),
        (
            {
                "stopped": "the daemon n7 stopped cleanly at 2026-01-01T00:00:00.000+00:00 (5 s ago)",
                "last_pass_age_s": None,
            },
            "critical: the daemon n7 stopped cleanly at 2026-01-01T00:00:00.000+00:00 (5 s ago)"
            " | locks=0 zombies=0 failing_releases=0",
        ),
    ],
)
def test_health_line_ends_in_nagios_perfdata_of_what_is_known(kw, line):
    args = {"redis_error": None, "last_pass_age_s": 1.0, "failing_releases": 0, "verdicts": [], **kw}
    assert assess(SETTINGS, **args).nagios_line == line


def test_a_clean_stop_is_critical_at_once_and_says_when(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path)
    monitor = build(settings)
    monitor.run_pass()
    assert health_check(settings).state is State.HEALTHY
    mark_stopped(r, settings, monitor.audit.identity, now=1_795_000_000.0)
    result = health_check(settings)
    assert result.state is State.CRITICAL
    assert result.reason == f"the daemon {settings.name} stopped cleanly at 2026-11-18T11:06:40.000+00:00 (0 s ago)"
    assert 0 < r.pttl(protocol.monitor_status_key(settings.name)) <= 600_000  # goes the way of any status
    monitor.run_pass()  # started again: its first pass says so
    assert health_check(settings).state is State.HEALTHY


def test_health_of_another_monitor_by_name(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path)
    r.set(protocol.monitor_status_key("gpu-node-9"), json.dumps({"failing_releases": 0}), px=600_000 - 2_000)
    other = health_check(settings, "gpu-node-9")
    assert (other.state, other.reason) == (State.HEALTHY, "0 lock(s), last pass 2.0 s ago")
    assert health_check(settings).state is State.CRITICAL  # this host's daemon left nothing
    named = make_settings(redis_server.url, tmp_path, monitor={"name": "gpu-node-9"})
    assert health_check(named).state is State.HEALTHY


# --- `gpulock-monitor health` against a Redis that refuses or is busy -----------------------------


def health(cfg: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["health", "-c", str(cfg)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_health_is_critical_when_an_acl_refuses_a_command(r, redis_server, tmp_path):
    hold(r, 0)
    build(make_settings(redis_server.url, tmp_path)).run_pass()  # the daemon's status is fresh
    # A user with every right but SCAN: `health` cannot see the locks.
    with acl_user(r, "noscan", channels=["*"], commands=["+@all", "-scan"]) as noscan:
        code, output = health(config_file(tmp_path, noscan.url))
    assert code == 2, output
    assert output.startswith("critical: redis refused the monitor's commands: ")
    assert "NOPERM" in output or "no permissions" in output
    assert len(output.splitlines()) == 1


def test_health_is_critical_on_any_redis_error(r, redis_server, tmp_path):
    # The daemon's status key holds a hash: GET answers WRONGTYPE, a ResponseError.
    r.hset(protocol.monitor_status_key(str(monitor_identity()["host"])), "a", "b")
    code, output = health(config_file(tmp_path, redis_server.url))
    assert code == 2, output
    assert output.startswith("critical: redis refused the monitor's commands: ")
    assert "WRONGTYPE" in output


def test_health_reason_is_one_printable_line():
    reason = assess(
        SETTINGS,
        redis_error="ERR bad key 'gpu_lock:\x1b[2J\r\nx'" + "y" * 1000,
        redis_refused=True,
        last_pass_age_s=None,
        failing_releases=0,
        verdicts=[],
    ).line
    assert reason.startswith("critical: redis refused the monitor's commands: ERR bad key 'gpu_lock:\\x1b[2J\\r\\nx'")
    assert reason.isprintable()
    assert len(reason) < 400


# --- a BUSY Redis (a long script) and a LOADING one are unavailable, not a bug ----------------------


@pytest.fixture
def busy_server() -> Iterator[RedisServer]:
    """A Redis of this test's own that answers BUSY 100 ms into a script."""
    with RedisServer(None, "--lua-time-limit", "100") as server:
        yield server


class Hog:
    """A script that loops until SCRIPT KILL, run from its own connection and thread."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.client = redis.Redis(port=server.port, protocol=2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ended: BaseException | None = None

    def _run(self) -> None:
        try:
            self.client.eval("while true do end", 0)
        except redis.RedisError as exc:
            self.ended = exc

    def __enter__(self) -> Hog:
        self.thread.start()
        probe = redis.Redis(port=self.server.port, protocol=2)
        wait_for(lambda: _busy(probe))
        probe.close()
        return self

    def kill(self) -> None:
        redis.Redis(port=self.server.port, protocol=2).script_kill()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.kill()
        self.client.close()


def _busy(probe: redis.Redis) -> bool:
    try:
        probe.ping()
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY ")
    return False


def test_busy_redis_is_audited_unavailable_once_without_traceback(busy_server, tmp_path, capsys):
    settings = make_settings(busy_server.url, tmp_path)
    client = connect(settings)
    direct = redis.Redis(port=busy_server.port, protocol=2)
    monitor = build(settings, client)
    assert monitor.run_pass().error is None
    logs.configure("info", "json", stream=sys.stdout)  # sys.stdout is capsys's now
    with Hog(busy_server) as hog:
        reports = [monitor.run_pass() for _ in range(6)]  # backing off: some passes are skipped
        code, output = health(config_file(tmp_path, busy_server.url))
        hog.kill()
    assert isinstance(hog.ended, redis.ResponseError)
    wait_for(lambda: (report := monitor.run_pass()) is not None and report.error is None)
    out = capsys.readouterr().out
    ran = [report for report in reports if report is not None]
    assert len(ran) >= 2
    assert all(report.error.startswith("redis unavailable: ") for report in ran)
    assert all("BUSY Redis is busy running a script" in report.error for report in ran)
    (unavailable,) = events(settings.audit_path, "redis_unavailable")
    assert "BUSY Redis is busy running a script" in unavailable["error"]
    assert len(events(settings.audit_path, "redis_recovered")) == 1
    assert "Traceback" not in out
    assert "pass_failed" not in out
    assert '"event": "redis_unavailable"' in out
    assert code == 2
    assert output.startswith("critical: redis unreachable: BUSY Redis is busy running a script")
    direct.close()


@pytest.mark.parametrize(
    ("reply", "down"),
    [
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", True),
        ("LOADING Redis is loading the dataset in memory", True),
        ("NOPERM this user has no permissions to run the 'scan' command", False),
        ("BUSYKEY Target key name already exists.", False),
        ("BUSYGROUP Consumer Group name already exists", False),
        ("ERR unknown command 'BUSY'", False),
    ],
)
def test_redis_down_classifies_replies_as_redis_py_raises_them(reply, down):
    # The exception redis-py's own parser makes of the reply, alone and inside a pipeline.
    exc = BaseParser.parse_error(reply)
    assert redis_down(exc) is down
    if isinstance(exc, redis.ResponseError):
        Pipeline.annotate_exception(None, exc, 1, ("TIME",))  # type: ignore[arg-type]
        assert str(exc).startswith("Command # 1 (TIME) of pipeline caused error: ")
        assert redis_down(exc) is down


def _answers_loading(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"-LOADING ")
    except OSError:
        return False


def test_loading_redis_is_audited_unavailable_once_without_traceback(tmp_path, capsys):
    """A Redis started on a large dump answers LOADING until it has read it."""
    with RedisServer(None, "--rdbcompression", "no") as seed:
        seed_client = redis.Redis(port=seed.port, protocol=2)
        # MSET, not DEBUG POPULATE: Redis 7 refuses DEBUG unless enable-debug-command is set.
        filler = b"x" * 1000
        for start in range(0, 20_000, 1_000):  # 20 MB
            seed_client.mset({f"filler:{i}": filler for i in range(start, start + 1_000)})
        seed_client.save()
        seed_client.close()
        port = free_port()
        loading = subprocess.Popen(
            [find_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(seed.dir), "--save", "",
             "--key-load-delay", "150"],  # 150 us a key: about 3 s of LOADING
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: _answers_loading(port), interval_s=0.01)
            settings = make_settings(f"redis://127.0.0.1:{port}/0", tmp_path)
            monitor = build(settings, connect(settings))
            logs.configure("info", "json", stream=sys.stdout)  # sys.stdout is capsys's now
            report = monitor.run_pass()
            wait_for(lambda: (r := monitor.run_pass()) is not None and r.error is None, timeout_s=60)
        finally:
            loading.kill()
            loading.wait(timeout=10)
    out = capsys.readouterr().out
    assert report is not None
    assert report.error.startswith("redis unavailable: "), report.error
    assert "loading" in report.error.lower()
    assert len(events(settings.audit_path, "redis_unavailable")) == 1
    assert len(events(settings.audit_path, "redis_recovered")) == 1
    assert "Traceback" not in out


# --- `gpulock-monitor health` as a Nagios check: --host, perfdata, UNKNOWN for its own errors -------------


def test_health_prints_perfdata_after_a_bar(r, redis_server, tmp_path):
    hold(r, 0)
    build(make_settings(redis_server.url, tmp_path)).run_pass()
    code, output = health(config_file(tmp_path, redis_server.url))
    assert code == 0, output
    reason, perf = output.rstrip("\n").split(" | ")
    assert reason.startswith("healthy: 1 lock(s), last pass ")
    locks, zombies, age, failing = perf.split(" ")
    assert (locks, zombies, failing) == ("locks=1", "zombies=0", "failing_releases=0")
    value, warn, crit = age.removeprefix("last_pass_age=").split(";")
    assert value.endswith("s")
    assert 0 <= float(value[:-1]) < 60
    assert (warn, crit) == ("10.4", "11")  # 2 x 0.2 + 10 and 5 x 0.2 + 10: degraded and critical


def test_health_host_checks_another_monitors_status_key(r, redis_server, tmp_path):
    cfg = config_file(tmp_path, redis_server.url)
    r.set(protocol.monitor_status_key("gpu-node-9"), json.dumps({"failing_releases": 1}), px=600_000 - 1_000)
    result = CliRunner().invoke(main, ["health", "-c", str(cfg), "--host", "gpu-node-9"])
    assert result.exit_code == 2
    assert result.output.startswith("critical: 1 release(s) failing | ")
    own = CliRunner().invoke(main, ["health", "-c", str(cfg)])
    assert own.output.startswith("critical: no monitor pass recorded recently")


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (
            ["-c", "/nonexistent/monitor.yml"],
            {},
            "unknown: --config: config file /nonexistent/monitor.yml does not exist",
        ),
        (["--host", "gpu node"], {}, "unknown: --host: expected a name of letters, digits and . _ - : @"),
        (
            [],
            {"CREDENTIALS_DIRECTORY": None},
            "unknown: redis.password_file: environment variable CREDENTIALS_DIRECTORY",
        ),
    ],
)
def test_health_says_unknown_and_exits_3_when_it_cannot_check(tmp_path, args, env, line):
    cfg = tmp_path / "m.yml"
    cfg.write_text("redis:\n  url: redis://127.0.0.1:1/0\n  password_file: ${CREDENTIALS_DIRECTORY}/redis-password\n")
    command = [sys.executable, "-m", "monitor", "health", "-c", str(cfg), *args]
    environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith(line)
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr == ""


def test_health_usage_errors_are_unknown_too():
    result = CliRunner().invoke(main, ["health", "--no-such-option"])
    assert result.exit_code == 3
    assert "No such option" in result.output


# --- what the daemon leaves for `health`: its name, and a clean stop --------------------------------------


def _daemon(settings: Settings, **kw: object) -> tuple[threading.Thread, threading.Event]:
    from monitor import daemon

    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(settings,), kwargs={"stop": stop, **kw})
    runner.start()
    return runner, stop


def test_a_daemon_stopped_cleanly_is_critical_at_once(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path)
    runner, stop = _daemon(settings)
    try:
        wait_for(lambda: health_check(settings).state is State.HEALTHY)
    finally:
        stop.set()
        runner.join(timeout=20)
    result = health_check(settings)
    assert result.state is State.CRITICAL
    assert result.reason.startswith(f"the daemon {settings.name} stopped cleanly at 20")
    assert events(settings.audit_path, "monitor_stopped")
    code, output = health(config_file(tmp_path, redis_server.url))
    assert code == 2
    assert output.startswith(f"critical: the daemon {settings.name} stopped cleanly at ")


def test_monitor_name_names_the_status_key_and_stands_beside_the_host_in_the_audit(r, redis_server, tmp_path):
    settings = make_settings(redis_server.url, tmp_path, monitor={"name": "gpu-pool-a"})
    runner, _ = _daemon(settings, once=True)
    runner.join(timeout=20)
    assert r.exists(protocol.monitor_status_key("gpu-pool-a"))
    assert not r.exists(protocol.monitor_status_key(socket.gethostname()))
    (started,) = events(settings.audit_path, "monitor_started")
    assert started["monitor"]["name"] == "gpu-pool-a"
    assert started["monitor"]["host"] == socket.gethostname()
    assert health_check(settings).state is State.HEALTHY
    cfg = config_file(tmp_path, redis_server.url)  # no monitor.name: this host's name, whose key is empty
    assert health(cfg)[0] == 2
    result = CliRunner().invoke(main, ["health", "-c", str(cfg), "--host", "gpu-pool-a"])
    assert result.exit_code == 0, result.output
    named = config_file(tmp_path, redis_server.url, monitor={"name": "gpu-pool-a"})
    status = CliRunner().invoke(main, ["status", "--json", "-c", str(named)])
    daemon = json.loads(status.stdout)["daemon"]
    assert (daemon["name"], daemon["state"]) == ("gpu-pool-a", "running")


def test_status_and_health_date_a_holding_as_the_daemon_does_after_its_last_complete_pass(r, redis_server, tmp_path):
    """A lock absent at the last complete pass began after it, whatever its TTL suggests: `status`
    must not show it older (nor `health` count it overdue) than the daemon judges it."""
    from monitor import snapshot

    settings = make_settings(redis_server.url, tmp_path)
    build(settings).run_pass()  # complete: its start is the mark
    key = hold(r, 0, age_s=350)  # its TTL says 350 s old (a worker with a shorter EX than lock_timeout)
    (verdict,) = snapshot.take(r, settings).verdicts
    assert verdict.holding.key == key
    assert verdict.holding.held_s < 5
    assert verdict.decision.tier.value == "ok"
