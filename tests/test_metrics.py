"""What /metrics says between and across passes: released locks leave at once, a failed pass keeps the
last known locks, series whose identity must not change with a lock's tier, config facts for the rules,
and the audit files' state (the HTTP side: test_operations)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from helpers import beat, build, hold, make_settings
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitor.demo.redis_server import RedisServer
from monitor.events import Event
from monitor.metrics import Metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def named(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def lock(key: str) -> tuple[tuple[str, str], ...]:
    return (("lock", key),)


def test_redis_up_and_lock_series_are_absent_before_the_first_pass(settings):
    samples = scrape(Metrics(build(settings)))
    for name in (
        "gpulock_monitor_redis_up",
        "gpulock_monitor_locks_held",
        "gpulock_monitor_lock_held_seconds",
        "gpulock_monitor_lock_info",
    ):
        assert not named(samples, name), name
    # Dated 0 until a pass completes, so that "no pass for N minutes" fires for a daemon that never does.
    assert samples[("gpulock_monitor_last_success_timestamp_seconds", ())] == 0


def test_lock_series_name_the_lock_task_ttl_and_tier_apart_from_held_time(r, settings):
    key = hold(r, 0, "tts_synthesize", age_s=320)  # warning tier
    beat(r, key, age_s=4)
    hold(r, 1, "asr", age_s=10, ttl=False)
    monitor = build(settings)
    metrics = Metrics(monitor)
    metrics.observe(monitor.run_pass())
    samples = scrape(metrics)
    held = named(samples, "gpulock_monitor_lock_held_seconds")
    assert set(held) == {lock("gpu_lock:0"), lock("gpu_lock:1")}  # no tier: a new tier is the same series
    assert 320 <= held[lock("gpu_lock:0")] < 340
    info = named(samples, "gpulock_monitor_lock_info")
    assert info == {
        (("lock", "gpu_lock:0"), ("task", "tts_synthesize"), ("tier", "warning")): 1,
        (("lock", "gpu_lock:1"), ("task", "asr"), ("tier", "ok")): 1,
    }
    ttl = named(samples, "gpulock_monitor_lock_ttl_seconds")
    assert 260 < ttl[lock("gpu_lock:0")] <= 280
    assert ttl[lock("gpu_lock:1")] == -1  # no expiry, as Redis's TTL says
    assert set(named(samples, "gpulock_monitor_lock_heartbeat_age_seconds")) == {lock("gpu_lock:0")}
    assert named(samples, "gpulock_monitor_locks_held") == {
        (("heartbeat", "alive"),): 1,
        (("heartbeat", "dead"),): 0,
        (("heartbeat", "none"),): 1,
    }
    assert samples[("gpulock_monitor_redis_up", ())] == 1


def test_a_lock_released_by_the_pass_leaves_the_gauges_at_once(r, settings):
    hold(r, 0, "legacy", age_s=450)  # past soft_timeout, no heartbeat: released
    hold(r, 1, "tts", age_s=10)
    monitor = build(settings)
    metrics = Metrics(monitor)
    metrics.observe(monitor.run_pass())
    samples = scrape(metrics)
    assert set(named(samples, "gpulock_monitor_lock_held_seconds")) == {lock("gpu_lock:1")}
    assert list(named(samples, "gpulock_monitor_lock_info")) == [
        (("lock", "gpu_lock:1"), ("task", "tts"), ("tier", "ok"))
    ]
    assert named(samples, "gpulock_monitor_locks_held")[(("heartbeat", "none"),)] == 1
    assert (
        samples[("gpulock_monitor_releases_total", (("outcome", "released"), ("reason", "soft_timeout_no_heartbeat")))]
        == 1
    )


def test_a_release_event_between_passes_drops_the_lock_at_once(r, settings):
    hold(r, 0, "tts", age_s=10)
    monitor = build(settings)
    metrics = Metrics(monitor)
    metrics.observe(monitor.run_pass())
    assert set(named(scrape(metrics), "gpulock_monitor_lock_held_seconds")) == {lock("gpu_lock:0")}
    metrics.on_event(Event.LOCK_RELEASED, _released("gpu_lock:0"))  # as a release between passes says
    assert not named(scrape(metrics), "gpulock_monitor_lock_held_seconds")


def _released(key: str) -> dict[str, Any]:
    return {"lock_key": key, "reason": "heartbeat_dead", "outcome": "released"}


def test_a_failed_pass_keeps_the_last_known_locks_and_says_whether_redis_was_the_cause(tmp_path, monkeypatch):
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, protocol=2, socket_timeout=2)
        hold(client, 0, "tts", age_s=10)
        monitor = build(make_settings(server.url, tmp_path), client)
        metrics = Metrics(monitor)
        metrics.observe(monitor.run_pass())
        before = scrape(metrics)

        def broken(report: Any) -> None:
            raise RuntimeError("a bug")

        with monkeypatch.context() as patch:
            patch.setattr(monitor, "_pass", broken)
            report = monitor.run_pass()
        assert report is not None
        assert report.error is not None
        metrics.observe(report)
        after_bug = scrape(metrics)
        server.stop()
        report = monitor.run_pass()
        assert report is not None
        assert report.redis_down
        metrics.observe(report)
        redis_gone = scrape(metrics)
        client.close()
    held = named(before, "gpulock_monitor_lock_held_seconds")
    assert set(held) == {lock("gpu_lock:0")}
    for after in (after_bug, redis_gone):
        # The last pass that completed, as it was (last_success_timestamp_seconds dates it): not "no locks".
        assert named(after, "gpulock_monitor_lock_held_seconds") == held
        assert named(after, "gpulock_monitor_locks_held") == named(before, "gpulock_monitor_locks_held")
        assert (
            after[("gpulock_monitor_last_success_timestamp_seconds", ())]
            == before[("gpulock_monitor_last_success_timestamp_seconds", ())]
        )
    assert after_bug[("gpulock_monitor_redis_up", ())] == 1  # the pass failed, Redis answered
    assert redis_gone[("gpulock_monitor_redis_up", ())] == 0
    assert redis_gone[("gpulock_monitor_pass_errors_total", ())] == 2


def test_a_scrape_follows_passes_the_runner_did_not_report(r, settings):
    # Metrics built beside a monitor whose passes nobody observes (as in tests and tools) still see them.
    hold(r, 0, "tts", age_s=10)
    monitor = build(settings)
    metrics = Metrics(monitor)
    monitor.run_pass()
    samples = scrape(metrics)
    assert set(named(samples, "gpulock_monitor_lock_held_seconds")) == {lock("gpu_lock:0")}
    assert samples[("gpulock_monitor_redis_up", ())] == 1


@pytest.mark.parametrize(
    ("tiers", "expected"),
    [
        (
            {"warning": 300, "soft_timeout": 400, "hard_timeout": 500},
            {"monitor_interval": 0.2, "warning": 300, "soft_timeout": 400, "hard_timeout": 500},
        ),
        ({"warning": 300, "soft_timeout": 400, "hard_timeout": None}, {"warning": 300, "soft_timeout": 400}),
    ],
)
def test_config_seconds_exports_what_the_rules_compare_with(redis_server, tmp_path, tiers, expected):
    settings = make_settings(redis_server.url, tmp_path, gpu_lock_monitor={"timeout_levels": tiers})
    config = {
        labels[0][1]: value
        for labels, value in named(scrape(Metrics(build(settings))), "gpulock_monitor_config_seconds").items()
    }
    assert config["heartbeat_timeout"] == 200
    for setting, value in expected.items():
        assert config[setting] == value
    assert ("hard_timeout" in config) == (tiers["hard_timeout"] is not None)


def test_audit_files_export_pending_lines_failed_writes_and_dropped_lines(settings, tmp_path):
    monitor = build(settings)
    metrics = Metrics(monitor)
    samples = scrape(metrics)
    for file in ("audit", "critical"):
        assert samples[("gpulock_monitor_audit_pending_lines", (("file", file),))] == 0
        assert samples[("gpulock_monitor_audit_write_failures_total", (("file", file),))] == 0
        assert samples[("gpulock_monitor_audit_dropped_lines_total", (("file", file),))] == 0
    audit = monitor.audit.file
    audit.path = tmp_path / "not-a-dir" / "x" / "audit.jsonl"
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    audit.close()
    for n in range(3):
        with pytest.raises(Exception):  # noqa: B017, PT011 - AuditWriteError, whatever the OS says
            audit.write({"n": n})
    samples = scrape(metrics)
    assert samples[("gpulock_monitor_audit_pending_lines", (("file", "audit"),))] == 3
    assert samples[("gpulock_monitor_audit_write_failures_total", (("file", "audit"),))] == 3
    assert samples[("gpulock_monitor_audit_pending_lines", (("file", "critical"),))] == 0
    assert not named(samples, "gpulock_monitor_audit_write_failures")  # the old gauge's name is gone
