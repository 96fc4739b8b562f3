"""Running as a service: sd_notify, watchdog, metrics and /healthz, SIGHUP, the unit (the ACL: test_acl)."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from helpers import beat, build, config_file, events, hold, make_settings, wait_for
from prometheus_client.parser import text_string_to_metric_families

from monitor import daemon, systemd
from monitor.audit import JsonlFile
from monitor.demo.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "gpulock-monitor.service"


# --- sd_notify --------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(20)
    yield sock, str(path)
    sock.close()


def test_notify_sends_datagrams(notify_socket):
    sock, path = notify_socket
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": path})
    assert sock.recv(100) == b"READY=1"
    assert not systemd.notify("READY=1", env={})
    assert not systemd.notify("READY=1", env={"NOTIFY_SOCKET": path + ".missing"})


def test_notify_reaches_an_abstract_socket():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"gpulock-test-{os.getpid()}"
    sock.bind("\0" + name)
    try:
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("env", "period"),
    [
        ({"WATCHDOG_USEC": "120000000"}, 60.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_period_is_half_the_timeout_and_only_for_this_process(env, period):
    assert systemd.watchdog_period_s(env) == period


def test_daemon_speaks_sd_notify(r, redis_server, tmp_path, notify_socket):
    sock, path = notify_socket
    hold(r, 0)
    config = config_file(tmp_path, redis_server.url, metrics={"enabled": False})
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "-c", str(config)], env=env, stdout=subprocess.DEVNULL
    )
    seen: list[str] = []
    try:
        while not ("READY=1" in seen and seen.count("WATCHDOG=1") >= 2):
            seen.append(sock.recv(200).decode())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        sock.settimeout(2)
        while "STOPPING=1" not in seen:
            seen.append(sock.recv(200).decode())
    statuses = [m for m in seen if m.startswith("STATUS=")]
    assert statuses
    assert re.fullmatch(r"STATUS=1 locks, 0 released, pass \d+ ms", statuses[0])
    assert seen.index(statuses[0]) < seen.index("READY=1")
    assert proc.returncode == 0


def test_watchdog_stops_when_a_pass_hangs(settings, r):
    clock = [0.0]
    monitor = build(settings, mono=lambda: clock[0])
    runner = daemon.Runner(monitor)
    runner()
    assert runner.progressing()
    clock[0] = 2 * settings.monitor_interval_s + 9  # a pass started and never returned
    assert runner.progressing()
    clock[0] = 2 * settings.monitor_interval_s + 11
    assert not runner.progressing()
    health = runner.health()
    assert (health.state.name, health.reason) == ("CRITICAL", "last successful pass 11 s ago")


# --- metrics and /healthz ----------------------------------------------------------------------


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except urllib.error.URLError:  # not listening (yet)
        return 0, ""


def test_metrics_and_healthz(r, redis_server, tmp_path):
    port = free_port()
    dead_hook = {"type": "webhook", "url": f"http://127.0.0.1:{free_port()}/", "retries": 0}
    settings = make_settings(
        redis_server.url,
        tmp_path,
        metrics={"enabled": True, "listen": f"127.0.0.1:{port}"},
        alerts={"channels": [dead_hook]},
    )
    key = hold(r, 0, "tts", age_s=10)
    beat(r, key, age_s=3)
    hold(r, 1, "legacy", age_s=450)
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(settings,), kwargs={"stop": stop})
    runner.start()
    try:
        wait_for(lambda: events(settings.audit_path, "lock_released"))
        wait_for(lambda: "gpulock_monitor_releases_total" in scrape(port, "/metrics")[1])
        wait_for(lambda: "gpulock_monitor_lock_held_seconds{" in scrape(port, "/metrics")[1])  # the pass is over
        wait_for(lambda: 'gpulock_monitor_alerts_failed_total{channel="webhook[0]"} 1.0' in scrape(port, "/metrics")[1])
        code, body = scrape(port, "/metrics")
        health_code, health_body = scrape(port, "/healthz")
        missing_code, _ = scrape(port, "/nope")
    finally:
        stop.set()
        runner.join(timeout=20)
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("gpulock_monitor_build_info", (("version", __import__("monitor").__version__),))] == 1
    assert (
        samples[("gpulock_monitor_releases_total", (("outcome", "released"), ("reason", "soft_timeout_no_heartbeat")))]
        == 1
    )
    assert samples[("gpulock_monitor_events_total", (("event", "lock_released"),))] == 1
    assert samples[("gpulock_monitor_redis_up", ())] == 1
    assert samples[("gpulock_monitor_alerts_sent_total", (("channel", "webhook[0]"),))] == 0
    assert 10 <= samples[("gpulock_monitor_lock_held_seconds", (("lock", "gpu_lock:0"),))] < 60
    assert samples[("gpulock_monitor_lock_info", (("lock", "gpu_lock:0"), ("task", "tts"), ("tier", "ok")))] == 1
    assert ("gpulock_monitor_lock_held_seconds", (("lock", "gpu_lock:1"),)) not in samples  # released
    assert 3 <= samples[("gpulock_monitor_lock_heartbeat_age_seconds", (("lock", "gpu_lock:0"),))] < 60
    assert samples[("gpulock_monitor_locks_held", (("heartbeat", "alive"),))] >= 1
    assert samples[("gpulock_monitor_last_success_timestamp_seconds", ())] > time.time() - 60
    assert samples[("gpulock_monitor_pass_duration_seconds_count", ())] >= 1
    assert not any(name.endswith("_created") for name, _ in samples)
    assert all(name.startswith("gpulock_monitor_") for name, _ in samples)
    assert health_code == 200
    assert json.loads(health_body)["state"] == "healthy"
    assert missing_code == 404


def test_healthz_is_503_when_redis_is_gone(tmp_path):

    port = free_port()
    with RedisServer() as own:
        settings = make_settings(own.url, tmp_path, metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        stop = threading.Event()
        runner = threading.Thread(target=daemon.run, args=(settings,), kwargs={"stop": stop})
        runner.start()
        try:
            wait_for(lambda: scrape(port, "/healthz")[0] == 200)
            own.stop()
            wait_for(lambda: scrape(port, "/healthz")[0] == 503)
            doc = json.loads(scrape(port, "/healthz")[1])

            def redis_up() -> list[str]:
                lines = scrape(port, "/metrics")[1].splitlines()
                return [line for line in lines if line.startswith("gpulock_monitor_redis_up ")]

            # The gauge follows the pass that found Redis gone, a moment after /healthz does.
            up = wait_for(lambda: redis_up() if redis_up() == ["gpulock_monitor_redis_up 0.0"] else None)
        finally:
            stop.set()
            runner.join(timeout=20)
    assert doc["state"] == "critical"
    assert doc["reason"].startswith("redis unreachable")
    assert up == ["gpulock_monitor_redis_up 0.0"]


def test_metrics_port_taken_is_one_line(redis_server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_file(tmp_path, redis_server.url, metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        result = subprocess.run(
            [sys.executable, "-m", "monitor", "run", "-c", str(config)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"gpulock-monitor: metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_idle_connections_cost_no_thread_and_scrapes_still_answer(r, redis_server, tmp_path, monkeypatch):
    from monitor import metrics

    monkeypatch.setattr(metrics, "IDLE_TIMEOUT_S", 3.0)
    port = free_port()
    settings = make_settings(redis_server.url, tmp_path, metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(settings,), kwargs={"stop": stop})
    runner.start()
    idle: list[socket.socket] = []
    try:
        wait_for(lambda: scrape(port, "/healthz")[0] == 200)
        before = threading.active_count()
        for n in range(300):  # more than metrics.MAX_CONNECTIONS: the longest idle make room
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if n % 10 == 0:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request, never finished
            idle.append(sock)
        time.sleep(0.5)
        during = threading.active_count()
        started = time.monotonic()
        code, body = scrape(port, "/metrics")
        health_code, health_body = scrape(port, "/healthz")
        answered_s = time.monotonic() - started
        # The newest idle connection is closed by the server once IDLE_TIMEOUT_S passed without a request.
        assert idle[-1].recv(1) == b""
        closed_after_s = time.monotonic() - started
    finally:
        for sock in idle:
            sock.close()
        stop.set()
        runner.join(timeout=20)
    assert during <= before + 1, (before, during)
    assert code == 200
    assert "gpulock_monitor_redis_up 1.0" in body
    assert (health_code, json.loads(health_body)["state"]) == (200, "healthy")
    assert answered_s < 2
    assert 2 < closed_after_s < 8


def test_metrics_server_answers_only_what_it_serves(r, redis_server, tmp_path):
    from monitor import metrics

    port = free_port()
    monitor = build(make_settings(redis_server.url, tmp_path))
    stop = metrics.serve(f"127.0.0.1:{port}", metrics.Metrics(monitor), lambda: 1 / 0)

    def ask(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            return reply

    try:
        head = ask(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        post = ask(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        junk = ask(b"\x16\x03\x01 not http\r\n\r\n")
        huge = ask(b"GET /" + b"a" * 20000)
        broken = ask(b"GET /healthz HTTP/1.0\n\n")  # bare newlines, and a health callback that fails
        plain = ask(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    finally:
        stop()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")  # no body
    assert post.startswith(b"HTTP/1.1 405 ")
    assert junk.startswith(b"HTTP/1.1 400 ")
    assert huge.startswith(b"HTTP/1.1 400 ")
    assert broken.startswith(b"HTTP/1.1 500 ")
    assert plain.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"gpulock_monitor_build_info" in plain
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_request_trickled_in_is_cut_off(r, redis_server, tmp_path, monkeypatch):
    from monitor import metrics

    monkeypatch.setattr(metrics, "IDLE_TIMEOUT_S", 1.0)
    port = free_port()
    stop = metrics.serve(f"127.0.0.1:{port}", metrics.Metrics(build(make_settings(redis_server.url, tmp_path))), None)

    def trickle() -> float | None:
        """Seconds until the server closed a request sent a byte every 0.1 s; None if it never did."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            started = time.monotonic()
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"y" * 100:
                try:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.1)
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                        return time.monotonic() - started
                except BlockingIOError:  # nothing to read: still open
                    continue
                except OSError:  # a reset, or a broken pipe
                    return time.monotonic() - started
        return None

    try:
        cut_after_s = trickle()
    finally:
        stop()
    assert cut_after_s is not None
    assert 1.0 <= cut_after_s < 4.0


# --- audit rotation -----------------------------------------------------------------------------


def test_size_rotation_under_a_stream_of_events_loses_and_doubles_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    f = JsonlFile(path, max_bytes=4096, backups=1000)

    def writer(n: int) -> None:
        for i in range(250):
            f.write({"writer": n, "i": i})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from monitor.audit_read import read

    seen = [(e["writer"], e["i"]) for e in read(path)]
    assert sorted(seen) == [(n, i) for n in range(4) for i in range(250)]
    for n in range(4):  # each writer's events in order, across files
        assert [i for w, i in seen if w == n] == list(range(250))
    assert len(list(tmp_path.iterdir())) > 5


def test_sighup_reopens_after_external_rotation(r, redis_server, tmp_path):
    # Tiers of a fraction of a second: the locks, taken while the daemon runs, age in real time.
    tiers = {"warning": 0.05, "soft_timeout": 0.1, "hard_timeout": 5}
    config = config_file(
        tmp_path, redis_server.url, metrics={"enabled": False}, gpu_lock_monitor={"timeout_levels": tiers}
    )
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "-c", str(config)], stdout=subprocess.PIPE, text=True
    )
    logged: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [logged.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        wait_for(lambda: events(audit, "monitor_started"))
        audit.rename(tmp_path / "audit.jsonl.1")  # logrotate's rename
        hold(r, 0)
        wait_for(lambda: not r.exists(b"gpu_lock:0"))
        proc.send_signal(signal.SIGHUP)
        while "audit_reopened" not in logged.get(timeout=20):  # fails at the timeout, never hangs
            pass
        hold(r, 1)
        wait_for(lambda: events(audit, "lock_released"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        reader.join(timeout=5)
    assert proc.returncode == 0
    # A pass may see a lock between warning and soft_timeout: its warning is in whichever file
    # was open then, and is not what this test is about.
    rotated = [e["event"] for e in events(tmp_path / "audit.jsonl.1") if e["event"] != "lock_warning"]
    current = [e["event"] for e in events(audit) if e["event"] != "lock_warning"]
    assert rotated == ["monitor_started", "keyspace_notifications", "lock_released"]
    assert current == ["lock_released", "monitor_stopped"]


# --- the unit ---------------------------------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this machine"
)


@pytest.fixture
def installed_unit(tmp_path) -> Path:
    # Verify the unit as installed: ExecStart pointing at this environment's console script.
    script = shutil.which("gpulock-monitor") or str(Path(sys.executable).parent / "gpulock-monitor")
    unit = tmp_path / "gpulock-monitor.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/gpulock-monitor", script))
    return unit


@needs_systemd_analyze
def test_unit_verifies_silently(installed_unit):
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed_unit)], capture_output=True, text=True, cwd=installed_unit.parent
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_unit_exposure_is_at_most_2_with_only_nvidia_devices_allowed(installed_unit):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(installed_unit)],
        capture_output=True, text=True, cwd=installed_unit.parent,
    )  # fmt: skip
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout).group(1))
    assert score <= 2.0, result.stdout
    text = UNIT.read_text()
    assert "PrivateDevices=" not in text
    assert "DevicePolicy=closed" in text
    assert "DeviceAllow=char-nvidia-frontend rw" in text
    assert "LoadCredential=redis-password:" in text
    assert "Type=notify" in text
    assert "WatchdogSec=" in text


def test_livez_fails_only_on_a_hung_pass_and_readyz_while_redis_is_down_or_before_a_pass(tmp_path):
    """Kubernetes restarts on /livez and routes on /readyz: a Redis outage must fail only the latter."""
    from monitor import metrics
    from monitor.daemon import Runner

    port = free_port()
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, protocol=2, socket_timeout=2)
        monitor = build(make_settings(server.url, tmp_path), client)
        runner = Runner(monitor)
        stop = metrics.serve(
            f"127.0.0.1:{port}", metrics.Metrics(monitor), runner.health, live=runner.live, ready=runner.is_ready
        )

        def probe(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                    return reply.status, reply.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        try:
            before = probe("/livez"), probe("/readyz")
            runner()
            after_pass = probe("/livez"), probe("/readyz")
            server.stop()
            runner()
            redis_down = probe("/livez"), probe("/readyz")
            started = monitor.mono()
            monitor.mono = lambda: started + 60  # no pass completed for a minute: hung
            hung = probe("/livez")
        finally:
            stop()
    assert before == ((200, "ok: passes completing\n"), (503, "failing: no pass completed yet\n"))
    assert after_pass == ((200, "ok: passes completing\n"), (200, "ok: redis reachable, passes completing\n"))
    assert redis_down[0] == (200, "ok: passes completing\n")
    assert redis_down[1][0] == 503
    assert redis_down[1][1].startswith("failing: redis unavailable: ")
    assert hung[0] == 503
    assert hung[1].startswith("failing: no pass completed for 6")
