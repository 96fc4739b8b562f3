"""A TCP proxy in front of a test Redis that can lose one reply on purpose.

`drop_reply_to(marker)` arms it: the next client request containing `marker` reaches Redis and
runs, and the connection is then cut before the reply comes back, as a network failure would.
Meant for clients that wait for each reply before the next request (no pipelines across it).
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class ReplyDroppingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self.dropped = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_reply_to(self, marker: bytes) -> None:
        with self._lock:
            self._marker = marker
            self.dropped.clear()

    def _take_marker(self, data: bytes) -> bool:
        with self._lock:
            if self._marker is not None and self._marker in data:
                self._marker = None
                return True
            return False

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            cut = threading.Event()  # set once the marked request went out: lose what answers it
            threading.Thread(target=self._requests, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, cut), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        try:
            while data := client.recv(1 << 16):
                marked = self._take_marker(data)
                if marked:
                    cut.set()  # before it is sent: its reply cannot slip through
                server.sendall(data)
        except OSError:
            pass
        finally:
            server.close()

    def _replies(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        try:
            while data := server.recv(1 << 16):
                if cut.is_set():
                    self.dropped.set()
                    break  # the command ran; its reply is lost with the connection
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> ReplyDroppingProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
