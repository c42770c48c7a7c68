"""One socket's delivery: a bounded queue and the one writer that drains it.

Everything a socket is sent goes through its queue and is written by one writer
(a greenlet under gevent), so frames never interleave. The writer keeps the
sequence of the last event it wrote: a live event at or below it is a duplicate
and is skipped; one beyond the next is preceded by a replay of the gap from the
log. So the stream a client sees is gap-free and duplicate-free, whether events
arrive live, after a reconnect, or after the hub lost Redis for a while.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4001
CLOSE_TOKEN_EXPIRED = 4002
CLOSE_SLOW_CONSUMER = 4008
CLOSE_BAD_REQUEST = 4400

CATCH_UP = "catch-up"  # queue item: replay from the log whatever came after the last event
_WAKE = "wake"  # queue item: look at the close request


@dataclass(frozen=True, slots=True)
class CloseRequest:
    code: int
    reason: str


class StreamConnection:
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
        self._log = event_log
        self._last_event_id = last_event_id
        self._seq_at_connect = seq_at_connect
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._close_request: CloseRequest | None = None
        self.finished = threading.Event()

    # --- called by the hub and the reader ----------------------------------------------

    def offer(self, item: Any) -> None:
        """Queue an announcement (or CATCH_UP) for the writer. Never blocks: a client too
        slow to keep its queue from filling is disconnected instead of slowing the hub.
        (One that stops reading altogether is cut off by the socket's write timeout.)"""
        if self._close_request is not None:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            SLOW_CONSUMER_DISCONNECTS.inc()
            self.request_close(
                CLOSE_SLOW_CONSUMER, "slow_consumer: the client did not read its events in time"
            )

    def send_frame(self, frame: dict[str, Any]) -> None:
        """Queue a frame that is not from the log (typing, error)."""
        self.offer({"frame": frame})

    def request_close(self, code: int, reason: str) -> None:
        if self._close_request is None:
            self._close_request = CloseRequest(code, reason[:120])
        # A full queue means the writer is busy; it sees the request after its current item.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_WAKE)

    # --- the writer ---------------------------------------------------------------------

    def run_writer(self) -> None:
        try:
            self._start()
            while self._close_request is None:
                item = self._queue.get()
                if self._close_request is not None:
                    break
                if item == _WAKE:
                    continue
                if item == CATCH_UP:
                    self._replay(up_to=None)
                elif "frame" in item:
                    self._write(item["frame"])
                else:
                    self._deliver(item)
            self._close(self._close_request)
        except SlowConsumer:
            # It reads nothing: a close frame would not get through either.
            SLOW_CONSUMER_DISCONNECTS.inc()
            STREAM_CLOSES.labels(str(CLOSE_SLOW_CONSUMER)).inc()
            self._shut_down()
        except Exception as exc:
            log.debug("stream writer for %s ended: %r", self.user_id, exc)
        finally:
            self.finished.set()

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
        # Replays what was missed, and whatever committed since the user row was read
        # at connect (before this socket was registered with the hub).
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
            self.ws.close(reason=request.code, message=request.reason)
        self._shut_down()

    def _shut_down(self) -> None:
        # Also wakes simple-websocket's reader, and with it the route waiting to receive.
        with contextlib.suppress(OSError):
            self.ws.sock.shutdown(socket.SHUT_RDWR)
