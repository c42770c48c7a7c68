"""Whole, exclusive, bounded socket writes for simple-websocket.

simple-websocket writes frames with `socket.send`, which under gevent may write part
of a frame and return; and its reader thread writes pings and pongs on the same
socket as our writer. `SerializedSocket` replaces the socket it writes through:
every write takes one lock and sends all its bytes, so frames never interleave or
tear, whoever writes them; and a write that makes no headway for `write_timeout`
seconds fails with `SlowConsumer`, so a client that stopped reading is found out
even when nothing new is queued for it (a long replay, a ping).
"""

from __future__ import annotations

import socket
import threading
from typing import Any


class SlowConsumer(OSError):
    """The client did not accept a frame within the write timeout."""


class SerializedSocket:
    __slots__ = ("_lock", "_sock", "_write_timeout")

    def __init__(self, sock: socket.socket, write_timeout: float) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._write_timeout = write_timeout

    def send(self, data: bytes) -> int:
        with self._lock:
            previous = self._sock.gettimeout()
            self._sock.settimeout(self._write_timeout)
            try:
                self._sock.sendall(data)
            except TimeoutError as exc:
                raise SlowConsumer("the client stopped reading") from exc
            finally:
                self._sock.settimeout(previous)
        return len(data)

    sendall = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def serialize_writes(ws: Any, write_timeout: float) -> None:
    """Make every write on this simple-websocket connection whole, exclusive and bounded."""
    if not isinstance(ws.sock, SerializedSocket):
        ws.sock = SerializedSocket(ws.sock, write_timeout)
