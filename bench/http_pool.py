"""Keep-alive HTTP/1.1 connections on gevent sockets for a load generator: bench/api_load.py
issues its requests over them from greenlets."""

from __future__ import annotations

import http.client
import time
from collections import deque
from collections.abc import Callable

import gevent.lock
import gevent.socket


class StaleConnection(Exception):
    pass


class HttpPool:
    """Keep-alive HTTP/1.1 connections on gevent sockets, used in turn (least recently
    used first), so that the load spreads over all of them, and so over every gunicorn
    worker that accepted some, as traffic from many clients would.

    http.client on gevent's socket cooperates without monkey-patching. A connection
    idle for longer than the server's keep-alive is replaced before use; one that the
    server closed under us is retried once on a fresh connection, as browsers do. When
    every connection is busy another is opened, up to `limit`.
    """

    IDLE_LIMIT = 4.0  # gunicorn's keepalive is 5 s

    def __init__(self, host: str, port: int, limit: int, timeout: float) -> None:
        self.host, self.port, self.timeout, self.limit = host, port, timeout, limit
        self._slots = gevent.lock.BoundedSemaphore(limit)
        self._idle: deque[tuple[http.client.HTTPConnection, float]] = deque()
        self.opened = 0
        self.busiest = 0
        self._busy = 0

    def _new(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn._create_connection = gevent.socket.create_connection  # type: ignore[attr-defined]
        self.opened += 1
        return conn

    def open(self, count: int) -> None:
        """Connect `count` connections now, before the clock starts."""
        for _ in range(count):
            conn = self._new()
            conn.connect()
            self._idle.append((conn, time.monotonic()))

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None = None,
        on_send: Callable[[bool], None] | None = None,
    ) -> tuple[int, bytes]:
        """One exchange; `on_send(waited)` is called once a connection is ours, as the
        request goes on the wire, saying whether it had to wait for a free one."""
        waited = self._busy >= self.limit
        with self._slots:
            self._busy += 1
            self.busiest = max(self.busiest, self._busy)
            if on_send is not None:
                on_send(waited)
            try:
                return self._request(method, path, headers, body)
            finally:
                self._busy -= 1

    def _request(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, bytes]:
        conn, reused = None, False
        while self._idle:
            candidate, last_used = self._idle.popleft()
            if time.monotonic() - last_used < self.IDLE_LIMIT:
                conn, reused = candidate, True
                break
            candidate.close()
        conn = conn or self._new()
        try:
            try:
                status, data = self._exchange(conn, method, path, headers, body)
            except StaleConnection:
                conn.close()
                if not reused:
                    raise
                conn = self._new()
                status, data = self._exchange(conn, method, path, headers, body)
        except BaseException:
            conn.close()
            raise
        self._idle.append((conn, time.monotonic()))
        return status, data

    @staticmethod
    def _exchange(conn, method, path, headers, body) -> tuple[int, bytes]:
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            raise StaleConnection(str(exc)) from exc
        return response.status, response.read()

    def close(self) -> None:
        while self._idle:
            self._idle.popleft()[0].close()
