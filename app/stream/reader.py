"""A socket's incoming side, and the two ways of driving it.

`SocketReader` is what simple-websocket's reader thread would do, as a state machine fed
the bytes that arrive: it answers pings and a close, pings the client every
`ping_interval` seconds and closes with 1008 when the previous ping went unanswered,
closes with 1009 a message larger than `max_bytes`, and with 4002 when the token
expires. Whatever it writes goes through the socket's writer (`StreamConnection`), so a
frame is never cut in two and reading never waits on a write.

It is driven in one of two ways:

- Under gevent (the Procfile's web), `EventLoopReaders`: the route hands the socket over
  and returns, and from then on the socket has no greenlet of its own. The event loop
  calls `on_readable` when bytes arrive, one timer greenlet per process ticks every
  socket's pings and token expiry, and a client frame's answer (Redis, PostgreSQL) runs
  on a short-lived greenlet. An idle socket is then a few small objects: an open socket's
  greenlet cost about 15 KiB (its saved C stack and its frames), and the request that
  opened it (gunicorn's request and environ, Flask's context) a few more.
- Elsewhere (a threaded server), `read_until_finished` on the request's own thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from simple_websocket import ConnectionClosed
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from app.stream.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOKEN_EXPIRED,
    StreamConnection,
)

log = logging.getLogger(__name__)

RECEIVE_BYTES = 4096  # per read of a client's socket (what simple-websocket reads)
# How often the event loop's timer looks at every socket's ping and token deadlines, and
# how many sockets it looks at before it lets other greenlets run.
TICK_SECONDS = 1.0
TICK_SLICE = 200


class DetachedSocket:
    """An established WebSocket that outlives the request that opened it.

    What the writer (`StreamConnection`) uses of simple-websocket's `Server` (`send`,
    `close`, `sock`, `ws`, `connected`), with the same behaviour, and nothing else: the
    `Server` keeps the request's whole WSGI environ, its reader's event and the
    handshake's state for as long as it lives."""

    __slots__ = ("close_message", "close_reason", "connected", "sock", "ws")

    def __init__(self, sock: Any, protocol: Any) -> None:
        self.sock = sock
        self.ws = protocol  # wsproto's established Connection
        self.connected = True
        self.close_reason: int = CloseReason.NO_STATUS_RCVD
        self.close_message: str | None = None

    def send(self, data: str | bytes) -> None:
        if not self.connected:
            raise ConnectionClosed(self.close_reason, self.close_message)
        message = Message(data=data) if isinstance(data, bytes) else TextMessage(data=data)
        self.sock.send(self.ws.send(message))

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        if not self.connected:
            raise ConnectionClosed(self.close_reason, self.close_message)
        frame = self.ws.send(CloseConnection(reason or CloseReason.NORMAL_CLOSURE, message))
        with contextlib.suppress(BrokenPipeError):
            self.sock.send(frame)
        self.connected = False


def detach(ws: Any) -> DetachedSocket:
    """Take the connection from simple-websocket's `Server` so that the route can return while
    the socket stays open: the `Server` is left closed and its socket object detached from
    the descriptor (gunicorn's close of it afterwards closes nothing), and a new socket
    object owns the same descriptor. The same number, not a duplicate: the event loop
    keys its watchers by descriptor, and a duplicate would leave the original's
    registration behind in epoll."""
    descriptor = ws.sock.detach()
    detached = DetachedSocket(socket.socket(fileno=descriptor), ws.ws)
    ws.connected = False  # websocket_view's close after the route: nothing to send
    # And the `Server` lets go of the request: all it holds (the request's environ,
    # gunicorn's request, body and socket objects, the handshake's h11 state: ~45 objects
    # a socket) is otherwise freed only with the `Server`, and whatever keeps the `Server`
    # alive past the request (flask-sock's response class per socket did, a reference
    # cycle) keeps all of it for the collector to walk.
    ws.environ = ws.sock = ws.ws = ws.event = ws.thread = None
    return detached


class SocketReader:
    """One socket's incoming side (see the module's docstring). `feed` takes what was
    read, `tick` the clock; `finished` turns True once nothing more is to be read."""

    __slots__ = (
        "_connection",
        "_max_bytes",
        "_parts",
        "_ping_interval",
        "_pong_received",
        "_size",
        "_ws",
        "expires_at",
        "finished",
        "messages",
        "next_ping",
    )

    def __init__(
        self,
        ws: Any,
        connection: StreamConnection,
        *,
        ping_interval: float,
        max_bytes: int,
        expires_at: float,
    ) -> None:
        self._ws, self._connection = ws, connection
        self._ping_interval, self._max_bytes = ping_interval, max_bytes
        self.expires_at = expires_at  # time.monotonic()
        # The first ping at a random point of the interval's second half: sockets opened
        # together (a reconnect storm, a benchmark) would otherwise all be pinged in the
        # same tick, every interval, for as long as they stay open.
        self.next_ping = time.monotonic() + ping_interval * random.uniform(0.5, 1.0)
        self._pong_received = True
        self._parts: list[Any] | None = None
        self._size = 0
        self.finished = False
        # Whole messages read and not yet taken by the driver (rarely more than one).
        self.messages: list[str | bytes] = []

    @property
    def connection(self) -> StreamConnection:
        return self._connection

    def feed(self, data: bytes) -> None:
        """Handle bytes read from the socket; b"" is the end of the stream."""
        if self.finished:
            return
        if not data:
            self.finished = True  # the client went away, or the writer shut it down
            return
        protocol = self._ws.ws
        protocol.receive_data(data)
        for event in protocol.events():
            if isinstance(event, Ping):
                self._connection.send_bytes(protocol.send(event.response()))
            elif isinstance(event, Pong):
                self._pong_received = True
            elif isinstance(event, CloseConnection):
                self._ws.close_reason, self._ws.close_message = event.code, event.reason
                # Nothing more is written but the answer, which the writer sends as it is.
                self._connection.request_close(
                    CLOSE_NORMAL, "", reply=protocol.send(event.response())
                )
                self._ws.connected = False
                self.finished = True
                return
            elif isinstance(event, TextMessage | BytesMessage):
                self._size += len(event.data)
                if self._size > self._max_bytes:
                    self._connection.request_close(CLOSE_MESSAGE_TOO_BIG, "Message is too big")
                    self.finished = True
                    return
                if self._parts is None:
                    self._parts = []
                self._parts.append(event.data)
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, None, 0
                    self.messages.append(parts[0] if len(parts) == 1 else parts[0][:0].join(parts))

    def tick(self, now: float) -> None:
        """Close on the token's expiry or a ping gone unanswered; ping when one is due."""
        if self.finished:
            return
        if self._connection.closed:
            self.finished = True
        elif now >= self.expires_at:
            self._connection.request_close(
                CLOSE_TOKEN_EXPIRED, "token_expired: reconnect with a fresh token"
            )
            self.finished = True
        elif now >= self.next_ping:
            if not self._pong_received:
                self._connection.request_close(CLOSE_POLICY_VIOLATION, "Ping/Pong timeout")
                self.finished = True
                return
            self._pong_received = False
            self._connection.send_bytes(self._ws.ws.send(Ping()))
            self.next_ping = now + self._ping_interval

    def next_deadline(self) -> float:
        return min(self.next_ping, self.expires_at)


def read_until_finished(
    reader: SocketReader, answer: Callable[[str | bytes], None], sock: Any
) -> None:
    """Drive `reader` on the calling thread until the socket is finished; `answer` is
    called with each client message, in order."""
    while not reader.finished:
        reader.tick(time.monotonic())
        if reader.finished:
            break
        if wait_readable(sock, max(0.0, reader.next_deadline() - time.monotonic())):
            try:
                reader.feed(sock.recv(RECEIVE_BYTES))
            except OSError:
                reader.finished = True
        while reader.messages:
            answer(reader.messages.pop(0))


def wait_readable(sock: Any, timeout: float) -> bool:
    """Wait until `sock` has something to read (or was shut down); False on timeout.
    poll, not select: select refuses descriptors past 1,024."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def gevent_is_active() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


def _failed(reader: SocketReader) -> None:
    """A bug in reading or answering: say so to the client, which reconnects and resumes."""
    log.exception("stream reader failed")
    reader.connection.request_close(CLOSE_INTERNAL_ERROR, "internal_error: reconnect")
    reader.finished = True


class SocketOwner(Protocol):
    """What a handed-over socket's reader calls: `answer` with each client message, on a
    greenlet of its own, one at a time; `finish` once, on one, when the socket is done."""

    def answer(self, message: str | bytes) -> None: ...

    def finish(self) -> None: ...


class _Watched:
    """A socket handed to the event loop: its reader, its descriptor and I/O watcher, and
    its owner."""

    __slots__ = ("fd", "owner", "reader", "watcher")

    def __init__(self, reader: SocketReader, fd: int, watcher: Any, owner: SocketOwner) -> None:
        self.reader, self.fd, self.watcher, self.owner = reader, fd, watcher, owner


class EventLoopReaders:
    """Every handed-over socket of this process, read by gevent's event loop (see the
    module's docstring). `add` from any greenlet; one per process.

    No lock: everything here runs on the one thread that runs the event loop (in its
    greenlets or its callbacks), and nothing switches while the table changes. (A lock
    would be a hazard besides: the event loop's callbacks may not wait for one.)"""

    def __init__(self, tick_seconds: float = TICK_SECONDS) -> None:
        self._watched: dict[int, _Watched] = {}
        self._ticker: Any = None
        self._tick_seconds = tick_seconds

    def __len__(self) -> int:
        return len(self._watched)

    def add(self, reader: SocketReader, fd: int, owner: SocketOwner) -> None:
        """Read the socket `fd` (non-blocking, as gevent's are) for `reader` from now on.
        `owner.answer(message)` runs on a greenlet of its own, one message at a time (the
        socket is not read meanwhile, so a client cannot queue up answers);
        `owner.finish()` runs on one once the reader is finished, and the descriptor is
        not touched after that."""
        import gevent

        watcher = gevent.get_hub().loop.io(fd, 1)  # 1: readable
        watched = _Watched(reader, fd, watcher, owner)
        self._watched[id(watched)] = watched
        if self._ticker is None or self._ticker.dead:
            self._ticker = gevent.spawn(self._tick_forever)
        watcher.start(self._on_readable, watched)

    def _on_readable(self, watched: _Watched) -> None:
        # On the event loop itself: nothing here may block or switch greenlets.
        # A plain read of the descriptor: a gevent socket's recv would wait (switch) when
        # woken for nothing, which the event loop cannot.
        reader = watched.reader
        try:
            data = os.read(watched.fd, RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # reset by the peer: as good as closed
        try:
            reader.feed(data)
        except Exception:
            _failed(reader)
        self._go_on(watched, reading=True)

    def _go_on(self, watched: _Watched, *, reading: bool) -> None:
        """After a read or an answer: end a finished socket, answer the next message, or
        (`reading` False: the watcher was stopped for an answer) read again."""
        if watched.reader.finished:
            self._end(watched)
        elif watched.reader.messages:
            self._answer_next(watched)
        elif not reading:
            watched.watcher.start(self._on_readable, watched)

    def _answer_next(self, watched: _Watched) -> None:
        import gevent

        watched.watcher.stop()  # not read again until this message is answered
        gevent.spawn(self._answer, watched, watched.reader.messages.pop(0))

    def _answer(self, watched: _Watched, message: str | bytes) -> None:
        try:
            watched.owner.answer(message)
        except Exception:
            _failed(watched.reader)
        self._go_on(watched, reading=False)

    def _end(self, watched: _Watched) -> None:
        import gevent

        if self._watched.pop(id(watched), None) is None:
            return  # already ended
        watched.watcher.stop()
        watched.watcher.close()
        gevent.spawn(watched.owner.finish)

    def close_all(self, timeout: float) -> None:
        """Close every socket with 1001 and wait up to `timeout` seconds for the close
        frames to be written: the web process is stopping (gunicorn's `worker_exit`).
        Sockets that outlived their requests are not among the connections gunicorn
        waits for, and would otherwise be cut without a word."""
        import gevent

        watched = list(self._watched.values())
        for each in watched:
            each.reader.connection.request_close(
                CLOSE_GOING_AWAY, "going_away: the server is restarting; reconnect"
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
            each.reader.connection.closed for each in watched
        ):
            gevent.sleep(0.05)

    def _tick_forever(self) -> None:
        import gevent

        while True:
            gevent.sleep(self._tick_seconds)
            now = time.monotonic()
            watched = list(self._watched.values())
            for index, each in enumerate(watched):
                if index and index % TICK_SLICE == 0:
                    gevent.sleep(0)  # a tick over 5,000 sockets must not stall the rest
                try:
                    each.reader.tick(now)
                except Exception:
                    _failed(each.reader)
                if each.reader.finished:
                    self._end(each)
