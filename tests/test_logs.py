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
