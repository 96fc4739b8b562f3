"""`gpulock-monitor demo`: the daemon against simulated workers on a throwaway Redis.

Four GPUs, four stories, second-scale timeouts:
  gpu_lock:0  a worker that heartbeats, then crashes          -> released when its heartbeat expires
  gpu_lock:1  a legacy worker that never heartbeats, and hangs  -> released at the soft timeout
  gpu_lock:2  a long task that heartbeats and finishes          -> warned, protected, never released
  gpu_lock:3  a task whose heartbeat thread lives on but hangs  -> released at the hard cap
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import redis

from monitor import daemon, logs, protocol
from monitor.config import Settings
from monitor.demo.redis_server import RedisServer

HB_INTERVAL_S = 0.5
TIMEOUT_S = 60.0
SETTINGS = {
    "gpu_lock": {"lock_timeout": 60},
    "gpu_lock_monitor": {
        "monitor_interval": 0.5,
        "timeout_levels": {"warning": 3, "soft_timeout": 6, "hard_timeout": 12},
        "heartbeat": {"interval": HB_INTERVAL_S, "timeout": 2},
        "cleanup": {"max_retry": 3, "retry_delay": 0.5},
    },
    "metrics": {"enabled": False},
    "nvml": {"enabled": False},
    "logging": {"level": "error"},
}


class _AlertInbox(BaseHTTPRequestHandler):
    """A local webhook: the demo's alert channel points here."""

    tour: Tour

    def do_POST(self) -> None:
        alert = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.tour.say("alert", f"{alert['severity']:<8} {alert['summary']}")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the demo prints what it received."""


class Tour:
    def __init__(self, client: redis.Redis, audit_path: Path) -> None:
        self.client = client
        self.audit_path = audit_path
        self.t0 = time.monotonic()
        self.out: queue.Queue[tuple[str, str]] = queue.Queue()
        self.stop = threading.Event()

    def say(self, source: str, text: str) -> None:
        self.out.put((source, text))

    def worker(self, gpu: int, task: str, *, heartbeat: bool, crash_at: float | None, finish_at: float | None) -> None:
        key = protocol.lock_key(gpu)
        self.client.set(key, protocol.lock_value(task), nx=True, ex=60)
        self.say("worker", f"{key.decode()} acquired by {task} ({'heartbeat on' if heartbeat else 'no heartbeat'})")
        start = time.monotonic()
        while not self.stop.wait(HB_INTERVAL_S):
            elapsed = time.monotonic() - start
            if crash_at is not None and elapsed >= crash_at:
                self.say("worker", f"{key.decode()} holder crashed (no release, heartbeat stops)")
                return
            if finish_at is not None and elapsed >= finish_at:
                # Owner-checked release: delete only if we still hold it.
                hb_key = protocol.heartbeat_key(key)
                self.client.eval(protocol.LEGACY_RELEASE_SCRIPT, 2, key, hb_key, protocol.lock_value(task))
                self.say("worker", f"{key.decode()} {task} finished and released its lock")
                return
            if heartbeat:
                self.client.set(protocol.heartbeat_key(key), str(time.time()), px=int(2000 * HB_INTERVAL_S))

    def listen(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.psubscribe(protocol.release_channel(protocol.lock_key("*")))
        while not self.stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message:
                notice = json.loads(message["data"])
                self.say(
                    "notice", f"{message['channel'].decode()} {notice['release_reason']} task={notice['task_name']}"
                )
        pubsub.close()

    def audit_lines(self, offset: int) -> tuple[list[dict[str, object]], int]:
        try:
            with self.audit_path.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        whole = data[: data.rfind(b"\n") + 1]
        return [json.loads(line) for line in whole.splitlines()], offset + len(whole)


def describe(event: dict[str, object]) -> str:
    name = str(event["event"])
    if "lock_key" not in event:
        return name
    held = event.get("held_s")
    parts = [f"{name:<20}", str(event["lock_key"])]
    if held is not None:
        parts.append(f"held {float(held):4.1f}s")  # type: ignore[arg-type]
    parts.append(f"heartbeat={event.get('heartbeat')}")
    parts.append(f"reason={event.get('reason')}")
    if "outcome" in event:
        parts.append(f"outcome={event['outcome']}")
    return "  ".join(parts)


COLOURS = {"worker": "cyan", "notice": "magenta", "audit": "yellow", "alert": "red"}


def _start_inbox(tour: Tour) -> tuple[ThreadingHTTPServer, str]:
    inbox = ThreadingHTTPServer(("127.0.0.1", 0), type("Inbox", (_AlertInbox,), {"tour": tour}))
    threading.Thread(target=inbox.serve_forever, daemon=True).start()
    return inbox, f"http://127.0.0.1:{inbox.server_address[1]}/alerts"


def _flush(tour: Tour) -> None:
    while not tour.out.empty():
        source, text = tour.out.get()
        stamp = f"  t+{time.monotonic() - tour.t0:5.1f}s  "
        click.echo(stamp + click.style(f"{source:<7}", fg=COLOURS[source]) + f" {text}")


def run(timeout_s: float = TIMEOUT_S) -> int:
    logs.configure("error", "console")
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="gpulock-demo-") as tmp:
        audit_path = Path(tmp) / "audit.jsonl"
        raw = {
            **SETTINGS,
            "redis": {"url": server.url},
            "audit": {"path": str(audit_path), "critical_path": str(Path(tmp) / "critical.jsonl")},
        }
        client = redis.Redis.from_url(server.url, protocol=2)
        tour = Tour(client, audit_path)
        inbox, webhook = _start_inbox(tour)
        raw["alerts"] = {"channels": [{"type": "webhook", "url": webhook}]}
        settings = Settings.from_mapping(raw, env={})
        click.secho("gpulock-monitor demo", bold=True)
        click.echo(f"  throwaway redis-server on {server.url}; audit log {audit_path}")
        click.echo(f"  alerts go to a local webhook at {webhook}")
        click.echo(
            f"  timeouts: warning {settings.warning_s:g}s, soft {settings.soft_timeout_s:g}s, "
            f"hard {settings.hard_timeout_s:g}s; heartbeat every {settings.heartbeat_interval_s:g}s "
            f"(key expires after {settings.heartbeat_ttl_s:g}s); a pass every {settings.monitor_interval_s:g}s\n"
        )
        stories: list[tuple[int, str, dict[str, Any]]] = [
            (0, "tts_synthesize", {"heartbeat": True, "crash_at": 1.5, "finish_at": None}),
            (1, "legacy_asr", {"heartbeat": False, "crash_at": None, "finish_at": None}),
            (2, "diarize_long", {"heartbeat": True, "crash_at": None, "finish_at": 8.0}),
            (3, "diffusion_hung", {"heartbeat": True, "crash_at": None, "finish_at": None}),
        ]
        threads = [threading.Thread(target=tour.listen, daemon=True)] + [
            threading.Thread(target=tour.worker, args=(gpu, task), kwargs=kw, daemon=True) for gpu, task, kw in stories
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # let the workers take their GPUs before the first pass looks
        stop = threading.Event()
        runner = threading.Thread(target=daemon.run, args=(settings,), kwargs={"stop": stop}, daemon=True)
        runner.start()
        released: set[str] = set()
        offset = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not ({"gpu_lock:0", "gpu_lock:1", "gpu_lock:3"} <= released):
            time.sleep(0.1)
            events, offset = tour.audit_lines(offset)
            for event in events:
                tour.say("audit", describe(event))
                if event["event"] == "lock_released":
                    released.add(str(event["lock_key"]))
            _flush(tour)
        tour.stop.set()
        stop.set()
        runner.join(timeout=10)
        threads[0].join(timeout=2)
        inbox.shutdown()
        inbox.server_close()
        _flush(tour)
        events, _ = tour.audit_lines(0)
        click.echo(f"\n{len(events)} audit events written to {audit_path} (deleted with the demo). The last one:")
        click.echo("  " + json.dumps(events[-1]) if events else "  (none)")
        missing = {"gpu_lock:0", "gpu_lock:1", "gpu_lock:3"} - released
        if missing or "gpu_lock:2" in released:
            click.echo(f"demo went wrong: released {sorted(released)} within {timeout_s:g}s", err=True)
            return 1
        click.echo("gpu_lock:2 was never released: its holder was alive and under the hard cap.")
        return 0
