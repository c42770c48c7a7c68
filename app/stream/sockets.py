"""Whole, exclusive, bounded socket writes for a stream's socket.

simple-websocket writes frames with `socket.send`, which under gevent may write part of
a frame and return. `SerializedSocket` replaces the socket it writes through: every
write takes one lock and sends all its bytes, so frames never interleave or tear,
whoever writes them (the socket's writer, and a close during set-up); and a write that
makes no headway for `write_timeout` seconds fails with `SlowConsumer`, so a client that
stopped reading is found out even when nothing new is queued for it (a long replay, a
ping).
"""

from __future__ import annotations

import socket
import threading
from typing import Any


class SlowConsumer(OSError):
    """The client did not accept a frame within the write timeout."""


class SerializedSocket:
    __slots__ = ("_lock", "_sock")

    def __init__(self, sock: socket.socket, write_timeout: float) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        # The timeout is the writes' alone: nothing reads this socket without waiting for
        # it to be readable first (app/stream/reader.py). So it is set once, not around
        # every write.
        sock.settimeout(write_timeout)

    def send(self, data: bytes) -> int:
        with self._lock:
            try:
                # One send nearly always takes a whole frame; only what a full buffer
                # left over goes through sendall (which asks the socket its buffer size,
                # a system call, every time).
                sent = self._sock.send(data)
                if sent < len(data):
                    self._sock.sendall(memoryview(data)[sent:])
            except TimeoutError as exc:
                raise SlowConsumer("the client stopped reading") from exc
        return len(data)

    sendall = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def serialize_writes(ws: Any, write_timeout: float) -> None:
    """Make every write on this simple-websocket connection whole, exclusive and bounded."""
    if not isinstance(ws.sock, SerializedSocket):
        ws.sock = SerializedSocket(ws.sock, write_timeout)
