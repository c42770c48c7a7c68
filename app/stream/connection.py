"""One socket's delivery: a bounded queue of items and the one writer that drains it.

Everything a socket is sent goes through its queue and is written by one writer, so
frames never interleave. The writer keeps the sequence of the last event it wrote: a
live event at or below it is a duplicate and is skipped; one beyond the next is preceded
by a replay of the gap from the log. So the stream a client sees is gap-free and
duplicate-free, whether events arrive live, after a reconnect, or after the hub lost
Redis for a while.

Memory: a web process holds thousands of these, nearly all idle, and under gevent every
greenlet alive costs about 8 KiB (its share of the C stack and the interpreter's frame
stack) whatever it does. So the writer is not a greenlet per socket waiting on a queue:
it is started when something is queued for an idle socket and ends when the queue is
empty again, and the queue itself (a plain deque, no Conditions) exists only while there
is something in it. An idle socket is this object (slots, no dict) and no greenlet of
its own: the event loop reads the socket (app/stream/reader.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy.exc
from simple_websocket import ConnectionClosed

from app.stream.log import EventLog
from app.stream.sockets import SlowConsumer
from monitoring.metrics import (
    DELIVERY_LATENCY,
    EVENTS_DELIVERED,
    EVENTS_REPLAYED,
    SLOW_CONSUMER_DISCONNECTS,
    STREAM_CLOSES,
)

log = logging.getLogger(__name__)

# Close codes (4000-4999 are for applications).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4001
CLOSE_TOKEN_EXPIRED = 4002
CLOSE_SLOW_CONSUMER = 4008
CLOSE_BAD_REQUEST = 4400

CATCH_UP = "catch-up"  # queue item: replay from the log whatever came after the last event
_START = "start"  # queue item: plan where the stream starts (and replay, unless deferred)

# Guards every socket's handoff between `offer` and its writer (is a writer running, is
# the queue empty). Held for a few bytecodes (and a writer's start) and never across a
# write or a switch, so one lock for the whole process costs nothing and saves one per
# socket.
_HANDOFF = threading.Lock()


@dataclass(frozen=True, slots=True)
class CloseRequest:
    code: int
    reason: str
    # The close frame to write as it is (the answer to the client's close), if any.
    reply: bytes | None = None


def _spawn(target: Callable[[], None]) -> Any:
    """Start `target` in a greenlet under gevent (a thread costs several times more to
    start, and the writer starts once per burst), else in a thread. Returns something
    with `join(timeout)`."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        import gevent

        return gevent.spawn(target)
    thread = threading.Thread(target=target, name="stream-writer", daemon=True)
    thread.start()
    return thread


class StreamConnection:
    __slots__ = (
        "_close_request",
        "_closed",
        "_items",
        "_last_event_id",
        "_log",
        "_queue_size",
        "_render",
        "_seq_at_connect",
        "_writer",
        "_writing",
        "last_seq",
        "replay_at_start",
        "user_id",
        "ws",
    )

    def __init__(
        self,
        ws: Any,
        user_id: str,
        event_log: EventLog,
        *,
        last_event_id: int | None,
        seq_at_connect: int,
        queue_size: int,
        render: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.ws = ws
        # Turns an event's data as logged into what the socket is sent (signs attachment
        # URLs, which are never stored).
        self._render = render
        self.user_id = user_id
        self.last_seq = 0
        # False when the hub will queue CATCH_UP once this user's subscription is
        # confirmed: reading the log before that would be a read for nothing.
        self.replay_at_start = True
        self._log = event_log
        self._last_event_id = last_event_id
        self._seq_at_connect = seq_at_connect
        self._queue_size = queue_size
        self._items: deque[Any] | None = None
        # True while a writer runs, and until start(): what is offered before the stream
        # has planned where it starts is only queued.
        self._writing = True
        self._writer: Any = None
        self._close_request: CloseRequest | None = None
        self._closed = False

    # --- called by the hub and the reader ----------------------------------------------

    def start(self) -> None:
        """Start the stream: the writer plans where it starts and replays what was missed,
        then writes whatever was queued meanwhile."""
        with _HANDOFF:
            if self._items is None:
                self._items = deque()
            self._items.appendleft(_START)
            self._writer = _spawn(self._run)

    def offer(self, item: Any) -> None:
        """Queue an announcement (or CATCH_UP) for the writer. Never blocks: a client too
        slow to keep its queue from filling is disconnected instead of slowing the hub.
        (One that stops reading altogether is cut off by the socket's write timeout.)"""
        if self._close_request is not None:
            return
        if not self._queue(item):
            SLOW_CONSUMER_DISCONNECTS.inc()
            self.request_close(
                CLOSE_SLOW_CONSUMER, "slow_consumer: the client did not read its events in time"
            )

    def send_frame(self, frame: dict[str, Any]) -> None:
        """Queue a frame that is not from the log (typing, error)."""
        self.offer({"frame": frame})

    def send_bytes(self, data: bytes) -> None:
        """Queue bytes already framed by the socket's wsproto connection (a ping, a
        pong), so that they too are written whole and by the writer alone."""
        self.offer({"bytes": data})

    def request_close(self, code: int, reason: str, *, reply: bytes | None = None) -> None:
        """Close the socket with this code once the item being written is out (the first
        request wins); what is still queued is dropped. `reply`: the close frame to
        write instead, as it is (the answer to a close the client started)."""
        if self._close_request is None:
            self._close_request = CloseRequest(code, reason[:120], reply)
        self._queue(None)

    @property
    def closed(self) -> bool:
        """The writer has closed the socket (or given up on it)."""
        return self._closed

    def join(self, timeout: float) -> None:
        """Wait for the writer, if one runs, to finish."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)

    def _queue(self, item: Any) -> bool:
        """Queue `item` (None: only wake the writer) and start the writer if it is idle.
        False if the queue is full."""
        with _HANDOFF:
            if self._closed:
                return True
            if item is not None:
                items = self._items
                if items is None:
                    items = self._items = deque()
                elif len(items) >= self._queue_size:
                    return False
                items.append(item)
            if self._writing:
                return True
            self._writing = True
            # Under the lock, so the writer cannot go idle (and forget itself) before
            # it is remembered. (Starting a thread or a greenlet never waits on it.)
            self._writer = _spawn(self._run)
        return True

    def _next(self) -> Any:
        """The next item, or None when the writer should stop (the queue is empty, or a
        close was requested: then `_close_request` says so)."""
        with _HANDOFF:
            items = self._items
            if self._close_request is None and items:
                return items.popleft()
            self._items = None  # no deque kept for an idle socket
            if self._close_request is None:
                self._writing = False
                # Nor the finished writer: a dead greenlet still holds ~3 KiB (its
                # links, arguments, value) until replaced.
                self._writer = None
            return None

    # --- the writer ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._next()
                if item is None:
                    break
                if item == CATCH_UP:
                    self._replay(up_to=None)
                elif item == _START:
                    self._start()
                elif "frame" in item:
                    self._write(item["frame"])
                elif "bytes" in item:
                    self.ws.sock.send(item["bytes"])
                else:
                    self._deliver(item)
            if self._close_request is not None:
                self._close(self._close_request)
        except SlowConsumer:
            # It reads nothing: a close frame would not get through either.
            SLOW_CONSUMER_DISCONNECTS.inc()
            STREAM_CLOSES.labels(str(CLOSE_SLOW_CONSUMER)).inc()
            self._shut_down()
        except (ConnectionClosed, OSError) as exc:
            log.debug("stream writer for %s ended: %r", self.user_id, exc)
            self._shut_down()
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.TimeoutError,
        ) as exc:
            # The log could not be read: PostgreSQL is restarting, or every connection the
            # stream may use is busy. The client resumes from its last id once it is back.
            log.warning("stream writer for %s lost the database: %r", self.user_id, exc)
            self._close(
                CloseRequest(CLOSE_TRY_AGAIN_LATER, "database_unavailable: reconnect in a moment")
            )
        except Exception:
            # A bug: say so, so the client reconnects and resumes from its last id.
            log.exception("stream writer for %s failed", self.user_id)
            self._close(CloseRequest(CLOSE_INTERNAL_ERROR, "internal_error: reconnect"))

    def _start(self) -> None:
        plan = self._log.plan(self.user_id, self._last_event_id, self._seq_at_connect)
        log.debug(
            "stream for %s starts after #%d (resync: %s, current #%d)",
            self.user_id,
            plan.after_seq,
            plan.resync,
            plan.current_seq,
        )
        self.last_seq = plan.after_seq
        if plan.resync:
            self._write(
                {
                    "id": plan.current_seq,
                    "type": "resync.required",
                    "data": {
                        "reason": "last_event_id is outside the event log's window; "
                        "reload over HTTP and resume from this id",
                    },
                }
            )
        if self.replay_at_start:
            # What was missed, and whatever committed since the user row was read at
            # connect (before this socket was registered with the hub).
            self._replay(up_to=None)

    def _deliver(self, announcement: dict[str, Any]) -> None:
        seq = announcement.get("id")
        if seq is None:
            # Ephemeral (typing): not in the log, so no id at all. (`"id": null` would
            # read as an event without a place in the user's sequence.)
            self._write({"type": announcement["type"], "data": announcement["data"]})
            return
        if seq <= self.last_seq:
            return
        if seq > self.last_seq + 1:
            self._replay(up_to=seq - 1)
            if seq <= self.last_seq:
                return
        self._write_event(
            seq,
            announcement["type"],
            announcement["data"],
            live=True,
            encoded_data=announcement.get("encoded"),
        )

    def _replay(self, up_to: int | None) -> None:
        for event in self._log.after(self.user_id, self.last_seq, up_to):
            EVENTS_REPLAYED.inc()
            self._write_event(event.seq, event.type, event.data, live=False)

    def _write_event(
        self,
        seq: int,
        type_: str,
        data: dict[str, Any],
        *,
        live: bool,
        encoded_data: str | None = None,
    ) -> None:
        if encoded_data is not None:
            # A batch's data, encoded once by the hub for every socket it reaches: the
            # same frame json.dumps would write, without encoding the body 5,000 times.
            self.ws.send(f'{{"id":{int(seq)},"type":{json.dumps(type_)},"data":{encoded_data}}}')
            EVENTS_DELIVERED.labels(type_).inc()
        else:
            shown = self._render(type_, data) if self._render is not None else data
            self._write({"id": seq, "type": type_, "data": shown})
        self.last_seq = seq
        if live and type_ == "message.created" and data.get("accepted_at"):
            try:
                accepted = datetime.fromisoformat(data["accepted_at"])
                DELIVERY_LATENCY.observe(max(0.0, (datetime.now(UTC) - accepted).total_seconds()))
            except (TypeError, ValueError):
                pass

    def _write(self, frame: dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame, separators=(",", ":"), default=str))
        EVENTS_DELIVERED.labels(frame["type"]).inc()

    def _close(self, request: CloseRequest) -> None:
        """Send the close frame (if the client still reads), then close the connection
        at once: the server closes TCP first (RFC 6455, 7.1.1), and a client that never
        answers the close frame cannot keep its socket open."""
        STREAM_CLOSES.labels(str(request.code)).inc()
        with contextlib.suppress(ConnectionClosed, OSError):
            if request.reply is not None:
                self.ws.sock.send(request.reply)
            else:
                self.ws.close(reason=request.code, message=request.reason)
        self._shut_down()

    def _shut_down(self) -> None:
        with _HANDOFF:
            self._closed = True
            self._items = None
        # Also wakes the route's reader, which then returns.
        with contextlib.suppress(OSError):
            self.ws.sock.shutdown(socket.SHUT_RDWR)
