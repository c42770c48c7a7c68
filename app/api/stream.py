"""`WebSocket /v1/stream`: the user's events, live, resumable from `last_event_id`.

Close codes: 4001 no or bad token (the reason names the problem), 4002 the token
expired while connected, 4400 bad `last_event_id`, 4008 too slow to read its events,
1009 a frame larger than SWITCHBOARD_STREAM_MAX_FRAME_BYTES, 1008 no pong to our pings.
A bad client frame (not JSON, nested too deep, NUL or unpaired surrogates, an unknown
type) is answered with `{type: "error", data: {code, message}}` and the socket stays open.
So is a frame past the user's frame limit (`[rate_limit.frames]`): `code: rate_limited`,
with `retry_after` (whole seconds) in `data`; the frame is dropped.
Frames outside the user's event log (typing, error) carry no `id`.

Under gevent (the Procfile's web) an open socket has no greenlet of its own: once the
stream is set up the route hands the socket to the event loop's readers and returns
(app/stream/reader.py), so neither the route's greenlet nor the request that opened the
socket stays alive with it. simple-websocket's reader thread is never started
(`_NoThread`). The socket's writer runs only while it has something to write
(app/stream/connection.py), and the socket keeps only wsproto's established connection
(`drop_handshake_state`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc
from flask import Blueprint, Response, current_app, request
from simple_websocket import ConnectionClosed, Server
from sqlalchemy import select as sql_select

from app.auth import load_user, parse_bearer
from app.input_checks import parse_untrusted_json
from app.models import Participant
from app.policy.schema import RateLimit
from app.problems import ApiError, BadRequest, NotFound
from app.ratelimit import UserRateLimiter
from app.services.access import parse_uuid
from app.stream.connection import (
    CLOSE_BAD_REQUEST,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    StreamConnection,
)
from app.stream.log import EventLog
from app.stream.reader import (
    DetachedSocket,
    SocketReader,
    detach,
    gevent_is_active,
    read_until_finished,
)
from app.stream.sockets import serialize_writes
from monitoring.metrics import RATE_LIMITED, STREAMS_REFUSED_FULL

log = logging.getLogger(__name__)
blueprint = Blueprint("stream", __name__, url_prefix="/v1")

TYPING_INTERVAL_SECONDS = 2.0
_EVENT_ID = re.compile(r"[0-9]{1,18}", re.ASCII)
MEMBERSHIP_CACHE_SECONDS = 30.0


def _close(ws: Any, code: int, reason: str) -> None:
    with contextlib.suppress(ConnectionClosed):
        ws.close(reason=code, message=reason[:120])


def _error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    # No `id`: ids number the user's logged events, and an error is not one of them.
    return {"type": "error", "data": {"code": code, "message": message, **extra}}


class FrameLimit:
    """The user's limit on client frames, checked before a frame is even parsed.

    Frames have a budget of their own (`[rate_limit.frames]`) rather than spending the
    general one: typing follows keystrokes, and a user typing fast must not lose the
    requests their sends need, nor a burst of sends silence their typing. It is still per
    user across sockets and web processes, through the same limiter. Once refused, the
    socket knows when the window frees up (nothing can pass before then, whatever other
    sockets do), so a flood of frames costs no Redis round trips until then."""

    def __init__(
        self, limiter: UserRateLimiter | None, tenant_id: str, user_id: str, limit: RateLimit
    ) -> None:
        self._limiter, self._limit = limiter, limit
        self.tenant_id, self.user_id = tenant_id, user_id
        self._refused_until = 0.0

    def refusal(self) -> dict[str, Any] | None:
        """None if the frame may be handled; else the error frame to answer (and the frame
        is dropped)."""
        if self._limiter is None:
            return None
        now = time.monotonic()
        if now < self._refused_until:
            RATE_LIMITED.labels("stream_frame").inc()
            wait = self._refused_until - now
        else:
            verdict = self._limiter.hit_frame(self.tenant_id, self.user_id, self._limit)
            if verdict.allowed:
                return None
            wait = verdict.wait
            self._refused_until = now + wait
        retry_after = max(1, math.ceil(wait))
        return _error_frame(
            "rate_limited",
            f"Too many frames; this one was dropped; retry in {retry_after} s.",
            retry_after=retry_after,
        )


class TypingRelay:
    """Relays a member's typing to the conversation's other members, at most once per
    TYPING_INTERVAL_SECONDS per conversation; never stored."""

    def __init__(self, user_id: str, tenant_id: str, event_log: EventLog) -> None:
        self.user_id, self.tenant_id = user_id, tenant_id
        self._event_log = event_log
        self._others: dict[uuid.UUID, tuple[float, list[str]]] = {}
        self._last_sent: dict[uuid.UUID, float] = {}

    def _recipients(self, conversation_id: uuid.UUID) -> list[str] | None:
        cached = self._others.get(conversation_id)
        if cached and time.monotonic() - cached[0] < MEMBERSHIP_CACHE_SECONDS:
            return cached[1]
        with self._event_log.session() as session:
            members = list(
                session.scalars(
                    sql_select(Participant.user_id).where(
                        Participant.conversation_id == conversation_id
                    )
                )
            )
        if self.user_id not in members:
            return None
        others = [member for member in members if member != self.user_id]
        self._others[conversation_id] = (time.monotonic(), others)
        return others

    def handle(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """Relay a typing frame; returns an error frame for the sender, or None."""
        try:
            conversation_id = parse_uuid(frame.get("conversation_id"), "conversation")
        except NotFound:
            return _error_frame("invalid_frame", "typing needs a conversation_id (a UUID).")
        others = self._recipients(conversation_id)
        if others is None:
            return _error_frame("conversation_not_found", "No such conversation.")
        now = time.monotonic()
        if now - self._last_sent.get(conversation_id, 0.0) < TYPING_INTERVAL_SECONDS:
            return None  # rate-limited: typing is a hint, dropping repeats loses nothing
        self._last_sent[conversation_id] = now
        client = current_app.extensions["switchboard.redis"]
        hub = current_app.extensions["switchboard.hub"]
        data = {"conversation_id": str(conversation_id), "user_id": self.user_id}
        pipeline = client.pipeline(transaction=False)
        for other in others:
            pipeline.publish(
                hub.user_channel(other),
                # No `id`: typing is not logged, and an announcement without one is
                # written to the socket as it is (StreamConnection._deliver).
                json.dumps({"user_id": other, "type": "typing", "data": data}),
            )
        pipeline.execute()
        return None


class _NoThread:
    """simple-websocket's reader thread, never started: the stream's own reader
    (app/stream/reader.py) reads the socket, driven by the event loop under gevent."""

    __slots__ = ("name",)

    def __init__(self, target: Any = None, **_: Any) -> None:
        self.name = "stream-reader"

    def start(self) -> None:
        pass


class _NoEvent:
    """simple-websocket's "a message arrived" event, unused as its reader never runs."""

    __slots__ = ()

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> bool:
        return False


@blueprint.record_once
def _no_reader_thread(state: Any) -> None:
    # `websocket_view` builds each socket's simple_websocket.Server from these.
    options = state.app.config.setdefault("SOCK_SERVER_OPTIONS", {})
    options.update(thread_class=_NoThread, event_class=_NoEvent)


class _SocketServed(Response):
    """What the stream's view returns once simple-websocket has taken the connection:
    the server must write nothing more. Under gunicorn, StopIteration from the response
    tells its worker the connection was handled (simple-websocket's own convention); the
    development server (werkzeug) is told by the response itself.

    One class for every socket. flask-sock 0.7, which this replaces, made a response
    class anew for each socket, closing over its `Server`: a type is a reference cycle,
    and a type's ~10 objects a handshake waited for the collector, which took 60-170 ms
    to free 4,500 of them at once after 5,000 sockets connected."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.socket_mode = mode

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if self.socket_mode == "gunicorn":
            raise StopIteration()
        if self.socket_mode == "werkzeug":
            return super().__call__(environ, start_response)
        return []


def websocket_view(view: Callable[[Any], None]) -> Callable[[], Response]:
    """A view taking the open socket (simple_websocket.Server) as its argument; the
    handshake is answered before it runs, and a failed one is a 400 (app/errors.py)."""

    @functools.wraps(view)
    def handshake() -> Response:
        ws = Server(request.environ, **current_app.config.get("SOCK_SERVER_OPTIONS", {}))
        with contextlib.suppress(ConnectionClosed):
            view(ws)
        with contextlib.suppress(ConnectionClosed, OSError):
            ws.close()
        return _SocketServed(ws.mode)

    return handshake


@blueprint.before_request
def _no_compression() -> None:
    # Frames are small JSON: per-message deflate would cost ~90 KiB and CPU per socket.
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@blueprint.route("/stream", websocket=True)
@websocket_view
def stream(ws: Any) -> None:
    """After the handshake nothing may answer in HTTP: every failure is a close code.

    Under gevent the socket is detached from the request (`detach`) and, once set up,
    read by the event loop: the route returns and its greenlet ends."""
    if gevent_is_active():
        ws = detach(ws)
    handed_over = False
    try:
        handed_over = serve_stream(ws)
    except ConnectionClosed:
        pass
    except sqlalchemy.exc.TimeoutError:
        log.warning("stream setup found no free database connection")
        _close(ws, CLOSE_TRY_AGAIN_LATER, "overloaded: reconnect in a moment")
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        # The stream's 503: PostgreSQL is restarting or unreachable; the client's reconnect
        # resumes from its last event id once it is back.
        log.warning("stream lost the database: %s", exc.orig or exc)
        _close(ws, CLOSE_TRY_AGAIN_LATER, "database_unavailable: reconnect in a moment")
    except Exception:
        log.exception("stream failed")
        _close(ws, CLOSE_INTERNAL_ERROR, "internal_error: reconnect")
    finally:
        if isinstance(ws, DetachedSocket) and not handed_over:
            with contextlib.suppress(OSError):
                ws.sock.close()


def _authenticate(app: Any, event_log: EventLog) -> tuple[str, str, int, float]:
    """The socket's user id, tenant, event sequence at connect and token expiry (Unix
    time), from the bearer header or `?token=`. Only these plain values outlive the
    call: the claims and the ORM user would otherwise stay alive in the route's frame
    for as long as the socket is open."""
    header = request.headers.get("Authorization")
    token = request.args.get("token")
    raw = parse_bearer(header) if header or not token else token
    claims = app.extensions["switchboard.tokens"].verify(raw)
    with event_log.session() as session:
        user = load_user(session, claims)
        return user.id, user.tenant_id, user.last_event_seq, claims.expires_at.timestamp()


def drop_handshake_state(ws: Any) -> None:
    """Keep only wsproto's established connection on the socket.

    simple-websocket holds a `WSConnection`, which after the handshake only forwards to
    its `connection` (wsproto's `Connection`, with the same `send`, `receive_data`,
    `events` and `state`) but keeps the handshake alive beside it: the h11 connection and
    the upgrade request with all its headers (40.0 -> 36.3 KiB a socket in
    `bench/stream_load.py`)."""
    established = getattr(ws.ws, "connection", None)
    if established is not None:
        ws.ws = established


class ClientFrames:
    """Answers a socket's client frames: the frame limit first, then the frame itself."""

    __slots__ = ("_event_log", "_limit", "_tenant_id", "_typing", "_user_id")

    def __init__(
        self, frame_limit: FrameLimit, user_id: str, tenant_id: str, event_log: EventLog
    ) -> None:
        self._limit = frame_limit
        self._user_id, self._tenant_id, self._event_log = user_id, tenant_id, event_log
        self._typing: TypingRelay | None = None  # made on the first frame: most send none

    def answer(self, data: str | bytes) -> dict[str, Any] | None:
        """None, or the frame to send back (an error, or the limit's refusal)."""
        refusal = self._limit.refusal()
        if refusal is not None:
            return refusal
        if self._typing is None:
            self._typing = TypingRelay(self._user_id, self._tenant_id, self._event_log)
        return handle_client_frame(self._typing, data)


@dataclass(slots=True)
class _OpenStream:
    """A socket once set up: what its reader calls with each client frame (`answer`) and
    at its end (`finish`). One object for both, not two bound callables: a web process
    holds thousands of these, and every object alive lengthens a full collection."""

    connection: StreamConnection
    hub: Any
    app: Any
    tenant_id: str
    expires_at: float  # time.monotonic()
    wait_seconds: float  # for the writer at the end
    detached: DetachedSocket | None  # a socket that outlives its request
    frames: ClientFrames | None = None  # made on the first frame: most sockets send none

    def answer(self, data: str | bytes) -> None:
        """Answer one client frame. Under gevent this runs on a greenlet of its own, after
        the request is gone: the app's context is pushed for it."""
        with self.app.app_context():
            if self.frames is None:
                extensions = self.app.extensions
                user_id = self.connection.user_id
                limit = FrameLimit(
                    extensions["switchboard.ratelimiter"],
                    self.tenant_id,
                    user_id,
                    extensions["switchboard.policy"].rate_limit_frames,
                )
                self.frames = ClientFrames(
                    limit, user_id, self.tenant_id, extensions["switchboard.event_log"]
                )
            reply = self.frames.answer(data)
        if reply is not None:
            self.connection.send_frame(reply)

    def finish(self) -> None:
        """The socket is done: leave the hub, close it once its writer is through, and
        give back the descriptor of a socket that outlived its request."""
        self.hub.unregister(self.connection)
        # The first close requested wins: this 1000 replaces no earlier reason.
        self.connection.request_close(CLOSE_NORMAL, "")
        self.connection.join(timeout=self.wait_seconds)
        if self.detached is not None:
            with contextlib.suppress(OSError):
                self.detached.sock.close()


def _open_stream(ws: Any, app: Any, event_log: EventLog) -> _OpenStream | None:
    """Authenticate, check the limits and `last_event_id`, register the socket with the
    hub and start its writer; None once the socket was closed with the reason."""
    settings = app.extensions["switchboard.settings"]
    # Handed-over sockets are not gunicorn's connections, so its worker_connections no
    # longer bounds them: this does, before anything is asked of the database.
    readers = app.extensions["switchboard.stream_readers"]
    if isinstance(ws, DetachedSocket) and len(readers) >= settings.stream_max_sockets:
        STREAMS_REFUSED_FULL.inc()
        _close(ws, CLOSE_TRY_AGAIN_LATER, "overloaded: this server holds its most sockets")
        return None
    try:
        user_id, tenant_id, seq_at_connect, token_expires_at = _authenticate(app, event_log)
    except ApiError as exc:
        _close(ws, CLOSE_UNAUTHORIZED, f"{exc.code}: {exc.message}")
        return None
    limiter = app.extensions["switchboard.ratelimiter"]
    verdict = limiter.hit(tenant_id, user_id, "stream") if limiter else None
    if verdict is not None and not verdict.allowed:
        # After the handshake there is no 429: "try again later" with the wait in the reason.
        _close(ws, CLOSE_TRY_AGAIN_LATER, f"rate_limited: retry in {verdict.retry_after} s")
        return None

    last_event_id: int | None = None
    raw_last = request.args.get("last_event_id")
    if raw_last not in (None, ""):
        # ASCII digits only: str.isdigit() also passes '²', which int() then refuses.
        if not _EVENT_ID.fullmatch(raw_last):
            _close(ws, CLOSE_BAD_REQUEST, "invalid_last_event_id: must be a non-negative integer")
            return None
        last_event_id = int(raw_last)

    serialize_writes(ws, settings.stream_slow_consumer_grace)
    if settings.stream_send_buffer_bytes:
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.stream_send_buffer_bytes)

    hub = app.extensions["switchboard.hub"]
    hub.ensure_started()
    connection = StreamConnection(
        ws,
        user_id,
        event_log,
        last_event_id=last_event_id,
        seq_at_connect=seq_at_connect,
        queue_size=settings.stream_queue_size,
        render=app.extensions["switchboard.event_renderer"],
    )
    # Registered before the writer reads the log: an event committed after the user row
    # was read is either replayed by the writer or announced to it; none falls between.
    # (Until the hub's subscription to this user is confirmed, the confirmation's
    # CATCH_UP does the reading: see app/stream/hub.py.)
    connection.replay_at_start = hub.register(connection)
    connection.start()
    return _OpenStream(
        connection,
        hub,
        app,
        tenant_id,
        expires_at=time.monotonic() + max(0.0, token_expires_at - time.time()),
        wait_seconds=settings.stream_slow_consumer_grace + 1,
        detached=ws if isinstance(ws, DetachedSocket) else None,
    )


def serve_stream(ws: Any) -> bool:
    """Set the stream up and read the socket. Returns True when the socket was handed to
    the event loop's readers (a `DetachedSocket`, under gevent: the request may end, the
    socket stays open); False when it is done (closed, or never opened)."""
    drop_handshake_state(ws)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    settings = app.extensions["switchboard.settings"]
    event_log = app.extensions["switchboard.event_log"]
    opened = _open_stream(ws, app, event_log)
    if opened is None:
        return False
    connection = opened.connection
    reader = SocketReader(
        ws,
        connection,
        ping_interval=settings.stream_ping_interval,
        max_bytes=settings.stream_max_frame_bytes,
        expires_at=opened.expires_at,
    )
    if opened.detached is not None:
        app.extensions["switchboard.stream_readers"].add(reader, ws.sock.fileno(), opened)
        return True
    try:
        read_until_finished(reader, opened.answer, ws.sock)
    except (ConnectionClosed, OSError):
        pass
    except Exception:
        # Never a silent 1000 that tells the client all is well: say something broke.
        log.exception("stream reader failed")
        connection.request_close(CLOSE_INTERNAL_ERROR, "internal_error: reconnect")
    finally:
        opened.finish()
    return False


def handle_client_frame(typing: TypingRelay, data: str | bytes) -> dict[str, Any] | None:
    """The answer to one client frame: None, or an error frame naming the problem.

    A bad frame is answered and the socket stays open: the same checks as HTTP bodies
    (nesting depth, NUL and unpaired surrogates) run before anything reads the frame."""
    try:
        frame = parse_untrusted_json(data)
    except BadRequest as exc:
        if exc.code == "invalid_json":
            return _error_frame("invalid_frame", "Frames must be JSON objects.")
        return _error_frame(exc.code, exc.message)
    if not isinstance(frame, dict):
        return _error_frame("invalid_frame", "Frames must be JSON objects.")
    if frame.get("type") == "typing":
        return typing.handle(frame)
    return _error_frame(
        "unknown_frame_type",
        "The only frame a client may send is {type: 'typing', conversation_id}.",
    )
