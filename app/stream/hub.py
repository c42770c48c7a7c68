"""The hub: one Redis subscription per web process, fanning events out to its sockets.

What the hub is told, and why
-----------------------------
A direct event (a message, a read, a deletion, typing) is announced on its user's own
channel (`user_channel`, `switchboard:events:db<n>:u:<user id>`), and a broadcast chunk as one
batch announcement on the shared channel (`events_channel()`). So a web process hears, and
parses, only the direct events of users it holds a socket for, whatever the number of
web processes; a broadcast chunk is still one PUBLISH for up to a thousand recipients
(one per recipient would cost the worker and Redis more than the parsing it saves), and
every process reads it once and picks out its local recipients.

Still ONE connection per process (never one per socket): the hub SUBSCRIBEs to a user's
channel when the first socket of that user registers and UNSUBSCRIBEs when the last one
leaves, all on the same pub/sub connection. Per-user channels rather than a fixed number
of user shards because a shard channel carries every user of that shard: with 5,000
sockets per process and any useful number of shards, every process would listen to
nearly every shard again.

Threads
-------
redis-py's PubSub is not safe to use from two threads (or greenlets) at once: one
blocked reading while another sends SUBSCRIBE can interleave writes, and its health
checks read on the same socket. So only the hub's own thread touches it. `register`
and `unregister` only mark a user "dirty" under the hub's lock and wake the hub thread
through a socket pair; the hub thread waits in `poll` on the pub/sub socket and that
wake-up socket, and on each wake compares, for every dirty user, "has local sockets"
with "subscription requested on this connection", and sends the SUBSCRIBE or
UNSUBSCRIBE itself (many channels per command). Comparing states rather than replaying
a queue of operations makes a socket that comes and goes quickly cost nothing.

No event lost in between
------------------------
Redis delivers a message only to the subscribers it has when it is published, so an
event committed between a socket's registration and its user's subscription taking
effect would not be announced to it. The SUBSCRIBE confirmation closes that window:
Redis sends it once the subscription is in place, ahead of any message on that channel,
and on it the hub queues CATCH_UP for every local socket of that user. The writer then
reads the log after its last event, which holds everything committed before the
confirmation; everything after is announced live, and the writer's sequence check drops
what both deliver. A socket that registers while its user's subscription is not yet
confirmed therefore skips its first replay (`register` returns False) and waits for that
CATCH_UP instead: one log read per new socket, not two. While the hub has no connection
to Redis, `register` returns True so that reconnecting clients still get what they
missed from the log at once; the confirmations after reconnecting catch every socket up
again. A batch announcement on the shared channel needs nothing more: the shared
channel is subscribed first on every connection, so any batch published before a
user's confirmation is in the log that confirmation's CATCH_UP reads.

When the subscription drops (a Redis restart) the hub reconnects with backoff and
subscribes to every user it holds sockets for; each confirmation catches those sockets
up, so nothing published while it was away is lost. redis-py reconnecting by itself
(and resubscribing) ends the same way, as every confirmation triggers a catch-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from redis.connection import parse_url

from app.events import events_channel, user_channel
from app.gc_pauses import FULL_COLLECTION_HOLD
from app.stream.connection import CATCH_UP, StreamConnection
from monitoring.metrics import HUB_SUBSCRIPTIONS, SOCKETS_OPEN

log = logging.getLogger(__name__)

# Channels per SUBSCRIBE / UNSUBSCRIBE command: a reconnect with 5,000 users holds no
# command line of a megabyte, and Redis answers each channel on its own anyway.
SUBSCRIBE_CHUNK = 500
# How long the hub thread waits for traffic before a health check of its connection.
IDLE_SECONDS = 1.0
# Sockets offered an event between two yields of the hub (see `_yield_now_and_then`).
FAIRNESS_SLICE = 100


class Hub:
    def __init__(
        self,
        redis_url: str,
        channel: str | None = None,
        *,
        on_fan_out: Callable[[], None] = FULL_COLLECTION_HOLD.during_fan_out,
    ) -> None:
        """`on_fan_out` is called as each broadcast chunk is handed to local sockets: by
        default it keeps the collector's full collections out of the fan-out."""
        self._redis_url = redis_url
        self._on_fan_out = on_fan_out
        if channel is None:
            # The publishers' default: the shared channel of this Redis database.
            channel = events_channel(int(parse_url(redis_url).get("db", 0)))
        self._channel = channel
        self._channel_b = channel.encode()
        self._user_prefix = user_channel("", channel)
        self._user_prefix_b = self._user_prefix.encode()
        # user id -> that user's local sockets. One socket is stored as itself, more as a
        # set: most users have one socket, and a set per user is 200 bytes of 5,000.
        self._connections: dict[str, StreamConnection | set[StreamConnection]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Users whose "has local sockets" may differ from "subscribed"; the hub thread
        # settles them.
        self._dirty: set[str] = set()
        # Users whose subscription Redis confirmed on the current connection (and that
        # have not been asked to unsubscribe since). Read by `register` under the lock.
        self._confirmed: set[str] = set()
        # Users with a socket that skipped its first replay to wait for the confirmation.
        self._waiting: set[str] = set()
        self._connected = False
        self._backoff = 0.1
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._woken = False
        self._stopping = False
        self.subscribed = threading.Event()
        # What the hub parsed, for tests and benchmarks: announcements on users' channels,
        # batches on the shared channel, and announcements that found no local socket.
        self.direct_announcements = 0
        self.batch_announcements = 0
        self.unwanted_announcements = 0
        self._offered_since_yield = 0

    # --- the sockets' side (any thread or greenlet) --------------------------------------

    def ensure_started(self) -> None:
        """Start the subscriber in this process (lazily: after gunicorn has forked)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                if self._wake_r is None:
                    self._wake_r, self._wake_w = socket.socketpair()
                    self._wake_r.setblocking(False)
                    self._wake_w.setblocking(False)
                self._thread = threading.Thread(
                    target=self._run, name="switchboard-hub", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the hub thread (tests; a web process's hub lives as long as it does)."""
        with self._lock:
            self._stopping = True
            thread = self._thread
            if self._wake_w is not None:
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_w.send(b"\0")
        if thread is not None:
            thread.join(timeout)

    def register(self, connection: StreamConnection) -> bool:
        """Add a socket. Returns whether its writer should read the log now: False when
        its user's subscription is not confirmed yet, as the confirmation will queue
        CATCH_UP for it (reading before would be a read for nothing)."""
        user_id = connection.user_id
        with self._lock:
            existing = self._connections.get(user_id)
            if existing is None:
                self._connections[user_id] = connection
            elif isinstance(existing, set):
                existing.add(connection)
            else:
                self._connections[user_id] = {existing, connection}
            replay_now = user_id in self._confirmed or not self._connected
            if user_id not in self._confirmed:
                self._mark_dirty(user_id)
                if not replay_now:
                    self._waiting.add(user_id)
        SOCKETS_OPEN.inc()
        return replay_now

    def unregister(self, connection: StreamConnection) -> None:
        user_id = connection.user_id
        with self._lock:
            existing = self._connections.get(user_id)
            if existing is connection:
                del self._connections[user_id]
            elif isinstance(existing, set) and connection in existing:
                existing.discard(connection)
                if len(existing) == 1:
                    self._connections[user_id] = next(iter(existing))
            else:
                return
            if user_id not in self._connections:
                self._mark_dirty(user_id)
        SOCKETS_OPEN.dec()

    def local_connections(self) -> int:
        with self._lock:
            return sum(
                len(sockets) if isinstance(sockets, set) else 1
                for sockets in self._connections.values()
            )

    def local_users(self) -> int:
        with self._lock:
            return len(self._connections)

    def user_channel(self, user_id: str) -> str:
        """The channel this hub hears `user_id`'s direct events on (typing relays to it)."""
        return user_channel(user_id, self._channel)

    def subscribed_users(self) -> int:
        """Users whose channel the hub is subscribed to (confirmed by Redis)."""
        with self._lock:
            return len(self._confirmed)

    def _mark_dirty(self, user_id: str) -> None:
        # Under self._lock. One byte wakes the hub thread however many users changed.
        self._dirty.add(user_id)
        if not self._woken and self._wake_w is not None:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def _sockets_of(self, user_id: str) -> tuple[StreamConnection, ...]:
        # Under self._lock.
        sockets = self._connections.get(user_id)
        if sockets is None:
            return ()
        if isinstance(sockets, set):
            return tuple(sockets)
        return (sockets,)

    # --- fan-out ------------------------------------------------------------------------

    def dispatch(self, announcement: dict[str, Any]) -> None:
        user_id = announcement.get("user_id")
        with self._lock:
            sockets = self._sockets_of(user_id) if isinstance(user_id, str) else ()
        if not sockets:
            self.unwanted_announcements += 1
        for connection in sockets:
            connection.offer(announcement)
        self._yield_now_and_then(len(sockets))

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
            connections = self._connections
            local = [
                (user_id, seq, self._sockets_of(user_id))
                for user_id, seq in _pairs(recipients)
                if user_id in connections
            ]
        if not local:
            self.unwanted_announcements += 1
            return 0
        self._on_fan_out()
        encoded = json.dumps(data, separators=(",", ":"), default=str)
        offered = 0
        for user_id, seq, sockets in local:
            item = {"user_id": user_id, "id": seq, "type": type_, "data": data, "encoded": encoded}
            for connection in sockets:
                connection.offer(item)
                offered += 1
            self._yield_now_and_then(len(sockets))
        log.debug("batch %s for %d users: %d local sockets", type_, len(recipients), offered)
        return offered

    def _catch_up(self, user_ids: Iterable[str]) -> None:
        with self._lock:
            sockets = [c for user_id in user_ids for c in self._sockets_of(user_id)]
        for connection in sockets:
            connection.offer(CATCH_UP)
            self._yield_now_and_then(1)

    def _yield_now_and_then(self, offered: int) -> None:
        """Let the process's other work run after every FAIRNESS_SLICE sockets offered.

        Under gevent the hub is a greenlet on the web's one event loop, and the writers it
        wakes are queued behind it: offering a whole broadcast chunk (1,000 sockets), or a
        burst of announcements read in one go, put every request of the process behind all
        of those writes (the /health probe waited 73-175 ms during a 5,000-socket fan-out).
        Yielding puts the hub behind the writers woken so far and whatever else became
        ready, so a request waits for one slice at most. Never called under the lock."""
        self._offered_since_yield += offered
        if self._offered_since_yield >= FAIRNESS_SLICE:
            self._offered_since_yield = 0
            time.sleep(0)  # gevent's sleep once monkey-patched: a yield to the loop

    # --- the hub thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            client = redis.Redis.from_url(
                self._redis_url,
                socket_connect_timeout=2,
                socket_keepalive=True,
                health_check_interval=15,
            )
            pubsub = client.pubsub()
            try:
                self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                log.warning(
                    "events subscription lost (%r); resubscribing in %.1fs", exc, self._backoff
                )
            except Exception:
                # The hub must outlive a bug in one announcement's handling: every socket
                # of this process depends on it. Logged with its traceback, then resubscribed.
                log.exception("events subscriber failed; resubscribing in %.1fs", self._backoff)
            finally:
                self._lost_connection()
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()
                    client.close()
            if self._stopping:
                return
            time.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)

    def _lost_connection(self) -> None:
        self.subscribed.clear()
        with self._lock:
            self._connected = False
            # Sockets that waited for a confirmation that will not come on this connection
            # read the log now; the next connection's confirmations catch them up again.
            waiting, self._waiting = self._waiting, set()
            self._confirmed.clear()
            self._dirty.update(self._connections)
        self._catch_up(waiting)

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        # The shared channel first: a user's confirmation then also vouches for batches.
        pubsub.subscribe(self._channel)
        requested: set[str] = set()  # users SUBSCRIBEd on this connection, not since UNSUBSCRIBEd
        assert self._wake_r is not None
        while not self._stopping:
            self._settle(pubsub, requested)
            connection = pubsub.connection
            sock = getattr(connection, "_sock", None) if connection is not None else None
            if sock is None:
                # Not connected (redis-py reconnects on the next read, or raises).
                message = pubsub.get_message(timeout=IDLE_SECONDS)
                if message is not None:
                    self._on_message(message, requested)
                continue
            # poll, not select: the pub/sub socket's descriptor may be past 1,024.
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            poller.register(self._wake_r.fileno(), select.POLLIN)
            readable = [fd for fd, _ in poller.poll(IDLE_SECONDS * 1000)]
            if self._wake_r.fileno() in readable:
                with self._lock:
                    self._woken = False
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_r.recv(4096)
            if not readable:
                pubsub.check_health()
            # Everything already readable, including what redis-py's parser holds in its
            # buffer (poll cannot see that), before waiting again.
            while True:
                message = pubsub.get_message(timeout=0)
                if message is not None:
                    self._on_message(message, requested)
                elif pubsub.connection is None or not pubsub.connection.can_read(timeout=0):
                    break

    def _settle(self, pubsub: redis.client.PubSub, requested: set[str]) -> None:
        """Subscribe to the dirty users that have sockets and are not subscribed;
        unsubscribe from those that have none and are."""
        with self._lock:
            if not self._dirty:
                return
            dirty, self._dirty = self._dirty, set()
            subscribe = [u for u in dirty if u in self._connections and u not in requested]
            unsubscribe = [u for u in dirty if u not in self._connections and u in requested]
            # From now on a new socket of these users waits for a fresh confirmation.
            self._confirmed.difference_update(unsubscribe)
        prefix = self._user_prefix
        for chunk in _chunks(unsubscribe, SUBSCRIBE_CHUNK):
            pubsub.unsubscribe(*[prefix + u for u in chunk])
            requested.difference_update(chunk)
        for chunk in _chunks(subscribe, SUBSCRIBE_CHUNK):
            pubsub.subscribe(*[prefix + u for u in chunk])
            requested.update(chunk)

    def _on_message(self, message: dict[str, Any], requested: set[str]) -> None:
        kind = message["type"]
        if kind == "message":
            self._handle(message["channel"], message["data"])
            return
        if kind != "subscribe":
            return  # unsubscribe confirmations, pongs
        channel = message["channel"]
        if isinstance(channel, str):
            channel = channel.encode()
        if channel == self._channel_b:
            log.info("subscribed to %s", self._channel)
            HUB_SUBSCRIPTIONS.inc()
            self._backoff = 0.1
            with self._lock:
                self._connected = True
            self.subscribed.set()
            return
        if not channel.startswith(self._user_prefix_b):
            return
        user_id = channel[len(self._user_prefix_b) :].decode()
        with self._lock:
            if user_id not in requested:
                return  # unsubscribed since; its UNSUBSCRIBE follows
            self._confirmed.add(user_id)
            self._waiting.discard(user_id)
            sockets = self._sockets_of(user_id)
        # Whatever was announced before this subscription was in place is in the log.
        for connection in sockets:
            connection.offer(CATCH_UP)

    def _handle(self, channel: bytes | str, raw: bytes) -> None:
        try:
            announcement = json.loads(raw)
        except (ValueError, TypeError):
            log.warning("ignoring a malformed announcement on %r", channel)
            return
        if isinstance(announcement, dict):
            if "recipients" in announcement:
                self.batch_announcements += 1
                self.dispatch_batch(announcement)
            else:
                # A user's channel; or, from a worker older than per-user channels, the
                # shared one.
                self.direct_announcements += 1
                self.dispatch(announcement)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
