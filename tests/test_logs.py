"""Logging: JSON lines for journald, stdlib loggers through the same renderer, no locals."""

from __future__ import annotations

import io
import json
import logging

from monitor import logs


def test_json_lines_include_stdlib_loggers_and_plain_tracebacks():
    out = io.StringIO()
    logs.configure("info", "auto", stream=out)  # not a TTY: JSON
    logs.get_logger("gpulock_monitor").info("lock_released", lock_key="gpu_lock:0")
    logging.getLogger("apscheduler.scheduler").warning("Execution of job skipped")
    logging.getLogger("apscheduler.scheduler").info("Added job")  # below the third-party floor
    secret = "hunter2"  # a local variable that must never reach the logs
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger("gpulock_monitor").exception("pass_failed")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["lock_released", "Execution of job skipped", "pass_failed"]
    assert records[0]["lock_key"] == "gpu_lock:0"
    assert records[1]["logger"] == "apscheduler.scheduler"
    assert records[1]["level"] == "warning"
    assert "RuntimeError: boom" in records[2]["exception"]
    assert secret not in out.getvalue()


def test_console_format_on_request():
    out = io.StringIO()
    logs.configure("debug", "console", stream=out)
    logs.get_logger("gpulock_monitor").debug("pass_done", locks=3)
    line = out.getvalue()
    assert "pass_done" in line
    assert "locks=3" in line
    assert not line.startswith("{")


def test_secrets_in_log_events_are_redacted(capsys):
    import json
    import sys

    from monitor import logs

    logs.configure("info", "json", stream=sys.stdout)
    logs.get_logger("t").warning("send_failed", url="redis://user:hunter2@db:6379/0", error="?token=abc123 failed")
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "hunter2" not in line["url"]
    assert "abc123" not in line["error"]


# --- journald: each line's syslog priority, so `journalctl -p warning` finds warnings ------------------


def test_journal_lines_start_with_their_syslog_priority():
    out = io.StringIO()
    logs.configure("debug", "json", stream=out, journal=True)
    log = logs.get_logger("gpulock_monitor")
    log.debug("pass_done")
    log.info("lock_released")
    log.warning("lock_warning")
    log.error("release_failed")
    log.critical("critical_failure")
    logging.getLogger("redis").warning("from the standard library")
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
    assert [json.loads(line[3:])["event"] for line in lines][:5] == [
        "pass_done",
        "lock_released",
        "lock_warning",
        "release_failed",
        "critical_failure",
    ]


def test_every_line_of_a_console_traceback_keeps_the_priority():
    out = io.StringIO()
    logs.configure("info", "console", stream=out, journal=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger("gpulock_monitor").exception("pass_failed")
    lines = out.getvalue().splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)


def test_the_journal_is_recognised_by_the_streams_device_and_inode(tmp_path):
    import os

    with (tmp_path / "out").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.writes_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.writes_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.writes_to_journal(stream, {})
    assert not logs.writes_to_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_without_the_journal_lines_are_plain_json():
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logs.get_logger("gpulock_monitor").warning("lock_warning")
    assert out.getvalue().startswith("{")


def _run_once(config, env_extra, *args):
    import os
    import subprocess
    import sys

    out = config.parent / "stdout"
    with out.open("w") as stream:
        env = {**os.environ, **env_extra(stream)}
        env.pop("GPULOCK_MONITOR_CONFIG", None)
        command = [sys.executable, "-m", "monitor", "run", "--once", "-c", str(config), *args]
        result = subprocess.run(command, stdout=stream, stderr=subprocess.PIPE, text=True, timeout=60, env=env)
    return result, out.read_text()


def test_the_daemon_under_systemd_prefixes_priorities_and_takes_log_level(redis_server, tmp_path):
    import os

    from helpers import config_file

    config = config_file(tmp_path, redis_server.url, gpu_lock_monitor={"timeout_levels": {"hard_timeout": 900}})

    def journal(stream):
        st = os.fstat(stream.fileno())
        return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}

    result, out = _run_once(config, journal)
    assert result.returncode == 0, result.stderr
    (warning,) = [line for line in out.splitlines() if "config_warning" in line]
    assert warning.startswith('<4>{"detail": "gpu_lock_monitor.timeout_levels.hard_timeout: ')
    # Not the journal (the variable names another stream): plain lines.
    result, out = _run_once(config, lambda stream: {"JOURNAL_STREAM": "1:1"})
    assert out.startswith("{")
    # --log-level overrides logging.level: error hides the config warning.
    result, out = _run_once(config, lambda stream: {}, "--log-level", "ERROR")
    assert result.returncode == 0, result.stderr
    assert "config_warning" not in out
    result, _ = _run_once(config, lambda stream: {}, "--log-level", "loud")
    assert result.returncode == 2
    assert "Invalid value for '--log-level': 'loud' is not one of 'debug', 'info', 'warning', 'error'" in result.stderr
    assert "Traceback" not in result.stderr


# --- a pass still running when the next is due: our event, not APScheduler's raw line --------------------


def test_a_pass_still_running_is_said_with_how_long_it_has_run():
    import threading
    import time

    from helpers import wait_for

    from monitor import daemon
    from monitor.config import Settings

    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    gate = threading.Event()

    class HungMonitor:
        settings = Settings.from_mapping({"gpu_lock_monitor": {"monitor_interval": 0.05}}, env={})
        mono = staticmethod(time.monotonic)

        def run_pass(self) -> None:
            gate.wait(20)

    runner = daemon.Runner(HungMonitor())  # type: ignore[arg-type]
    scheduler = daemon._scheduler(runner, HungMonitor.settings)
    scheduler.start()
    try:
        wait_for(lambda: out.getvalue().count("pass_skipped_still_running") >= 3)
    finally:
        gate.set()
        scheduler.shutdown(wait=True)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    skipped = [r for r in records if r["event"] == "pass_skipped_still_running"]
    assert all(r["level"] == "warning" for r in skipped)
    assert skipped[-1]["running_s"] >= 0.1
    assert skipped[-1]["monitor_interval_s"] == 0.05
    assert "maximum number of running instances" not in out.getvalue()


def test_apschedulers_own_skip_line_is_dropped_and_its_other_warnings_kept():
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    scheduler_log = logging.getLogger("apscheduler.scheduler")
    scheduler_log.warning('Execution of job "%s" skipped: maximum number of running instances reached (%d)', "pass", 1)
    scheduler_log.warning("Run time of job %s was missed by %s", "pass", "0:00:01")
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["event"].startswith("Run time of job pass was missed")
