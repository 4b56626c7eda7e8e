"""A byte-counting TCP relay in front of an emulated instance's sshd: what Vast bills per GB.

Vast bills bandwidth per GB at the host's prices (`inet_up_cost` for bytes leaving the instance,
`inet_down_cost` for bytes reaching it). The emulator's instances are real sshd servers on
loopback; the port an instance advertises (`ssh_port`) is this relay, which forwards to its sshd
and counts every byte each way, however the connection ends (sshd itself logs its byte counts only
when a client says goodbye, and paramiko just closes the socket).
"""
from __future__ import annotations

import socket
import threading


class Meter:
    """Listens on 127.0.0.1:`port`, relays each connection to 127.0.0.1:`target`; `up` counts the bytes
    sent to clients (leaving the instance), `down` the bytes received from them. Counting starts
    from `up`/`down` (an instance whose sshd was restarted keeps its total)."""

    def __init__(self, port: int, target: int, up: int = 0, down: int = 0):
        self.port, self.target, self.up, self.down = port, target, int(up), int(down)
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, name=f"meter-{port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, server}
            threading.Thread(target=self._pump, args=(server, client, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._socks -= {src, dst}

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in its thread
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
