"""The hub: one Redis subscription per web process, fanning events out to its sockets.

Workers announce committed events on one channel. Each web process subscribes
once (never once per socket) and hands each announcement to the local sockets of
its recipient. When the subscription drops (a Redis restart), the hub
resubscribes with backoff and asks every local socket to catch up from the log,
so nothing published while it was away is lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from app.events import EVENTS_CHANNEL
from app.stream.connection import CATCH_UP, StreamConnection
from monitoring.metrics import HUB_SUBSCRIPTIONS, SOCKETS_OPEN

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, redis_url: str, channel: str = EVENTS_CHANNEL) -> None:
        self._redis_url = redis_url
        self._channel = channel
        self._connections: dict[str, set[StreamConnection]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.subscribed = threading.Event()

    def ensure_started(self) -> None:
        """Start the subscriber in this process (lazily: after gunicorn has forked)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="switchboard-hub", daemon=True
                )
                self._thread.start()

    def register(self, connection: StreamConnection) -> None:
        with self._lock:
            self._connections.setdefault(connection.user_id, set()).add(connection)
        SOCKETS_OPEN.inc()

    def unregister(self, connection: StreamConnection) -> None:
        with self._lock:
            sockets = self._connections.get(connection.user_id)
            if sockets is not None and connection in sockets:
                sockets.discard(connection)
                if not sockets:
                    del self._connections[connection.user_id]
                SOCKETS_OPEN.dec()

    def local_connections(self) -> int:
        with self._lock:
            return sum(len(sockets) for sockets in self._connections.values())

    def dispatch(self, announcement: dict[str, Any]) -> None:
        with self._lock:
            sockets: Sequence[StreamConnection] = tuple(
                self._connections.get(announcement.get("user_id"), ())
            )
        log.debug(
            "announcement %s #%s for %s: %d local sockets",
            announcement.get("type"),
            announcement.get("id"),
            announcement.get("user_id"),
            len(sockets),
        )
        for connection in sockets:
            connection.offer(announcement)

    def dispatch_batch(self, announcement: dict[str, Any]) -> int:
        """A batch announcement (`{type, data, recipients: [[user_id, seq], ...]}`, one per
        broadcast chunk): hand each local recipient their own event. The data is encoded
        once for the whole batch rather than once per socket. Returns the sockets offered."""
        recipients = announcement.get("recipients")
        type_, data = announcement.get("type"), announcement.get("data")
        if not isinstance(recipients, list) or not isinstance(type_, str):
            log.warning("ignoring a malformed batch announcement")
            return 0
        with self._lock:
            local = [
                (user_id, seq, tuple(self._connections.get(user_id, ())))
                for user_id, seq in _pairs(recipients)
                if user_id in self._connections
            ]
        if not local:
            return 0
        encoded = json.dumps(data, separators=(",", ":"), default=str)
        offered = 0
        for user_id, seq, sockets in local:
            item = {"user_id": user_id, "id": seq, "type": type_, "data": data, "encoded": encoded}
            for connection in sockets:
                connection.offer(item)
                offered += 1
        log.debug("batch %s for %d users: %d local sockets", type_, len(recipients), offered)
        return offered

    def _catch_up_everyone(self) -> None:
        with self._lock:
            everyone = [c for sockets in self._connections.values() for c in sockets]
        for connection in everyone:
            connection.offer(CATCH_UP)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            client = redis.Redis.from_url(
                self._redis_url,
                socket_connect_timeout=2,
                socket_keepalive=True,
                health_check_interval=15,
            )
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(self._channel)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        pubsub.check_health()
                        continue
                    if message["type"] == "subscribe":
                        log.info(
                            "subscribed to %s; catching up %d local sockets",
                            self._channel,
                            self.local_connections(),
                        )
                        HUB_SUBSCRIPTIONS.inc()
                        self.subscribed.set()
                        backoff = 0.1
                        # Whatever was announced while we were not listening is in the log.
                        self._catch_up_everyone()
                    elif message["type"] == "message":
                        self._handle(message["data"])
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("events subscription lost (%r); resubscribing in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                # The hub must outlive a bug in one announcement's handling: every socket
                # of this process depends on it. Logged with its traceback, then resubscribed.
                self.subscribed.clear()
                log.exception("events subscriber failed; resubscribing in %.1fs", backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except (redis.RedisError, OSError):
                    pass

    def _handle(self, raw: bytes) -> None:
        try:
            announcement = json.loads(raw)
        except (ValueError, TypeError):
            log.warning("ignoring a malformed announcement on %s", self._channel)
            return
        if isinstance(announcement, dict):
            if "recipients" in announcement:
                self.dispatch_batch(announcement)
            else:
                self.dispatch(announcement)


def _pairs(recipients: list[Any]) -> Iterator[tuple[str, int]]:
    """(user id, seq) pairs of a batch, skipping any that are not that shape."""
    for pair in recipients:
        if (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], int)
        ):
            yield pair[0], pair[1]
