"""The web process's garbage-collector pauses metric, and the stream's handshake leaving no
cyclic garbage of its own (both for issue 10's "no full-GC stall")."""

from __future__ import annotations

import gc
import socket
import time

from flask import Flask
from prometheus_client import REGISTRY

from app.api.stream import _NoEvent, _NoThread, _SocketServed, websocket_view
from app.gc_pauses import GcPauseMeter

HANDSHAKE = {
    "HTTP_HOST": "localhost",
    "HTTP_UPGRADE": "websocket",
    "HTTP_CONNECTION": "Upgrade",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
}


def _pauses(generation: int) -> float:
    sample = ("switchboard_gc_pause_seconds_count", {"generation": str(generation)})
    return REGISTRY.get_sample_value(*sample) or 0.0


def test_every_collection_is_timed_by_generation_until_uninstalled() -> None:
    meter = GcPauseMeter()
    meter.install()
    meter.install()  # twice is once
    try:
        full, young = _pauses(2), _pauses(0)
        gc.collect(2)
        gc.collect(0)
        meter.flush()
        assert _pauses(2) == full + 1
        assert _pauses(0) >= young + 1
    finally:
        meter.uninstall()
    full = _pauses(2)
    gc.collect()
    meter.flush()
    assert _pauses(2) == full


def test_the_collectors_callback_leaves_the_metric_to_the_flusher() -> None:
    """A collection can start while a metric update holds prometheus-client's lock (one,
    not reentrant, for every metric in multiprocess mode); a callback that observed the
    histogram itself would then wait on that lock forever. It only records the pause."""
    idle_flusher = GcPauseMeter(flush_seconds=3600)
    idle_flusher.install()
    try:
        full = _pauses(2)
        gc.collect(2)
        assert _pauses(2) == full  # not observed inside the collector
        idle_flusher.flush()
        assert _pauses(2) == full + 1
    finally:
        idle_flusher.uninstall()
    meter = GcPauseMeter(flush_seconds=0.05)
    meter.install()
    try:
        full = _pauses(2)
        gc.collect(2)
        deadline = time.monotonic() + 10
        while _pauses(2) == full and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pauses(2) == full + 1  # the flusher thread observed it
    finally:
        meter.uninstall()


def test_every_socket_is_answered_by_the_same_response_class() -> None:
    """flask-sock made a response class per socket: a type is a reference cycle, and 4,500
    of them freed at once stalled a 5,000-socket process for 60-170 ms."""
    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": _NoThread, "event_class": _NoEvent}
    opened = []
    view = websocket_view(opened.append)
    classes = set()
    for _ in range(3):
        server_end, client_end = socket.socketpair()
        with server_end, client_end:
            environ = HANDSHAKE | {"werkzeug.socket": server_end}
            with app.test_request_context("/v1/stream", environ_overrides=environ):
                response = view()
            client_end.settimeout(5)
            assert client_end.recv(4096).startswith(b"HTTP/1.1 101")
        classes.add(type(response))
    assert len(opened) == 3
    assert classes == {_SocketServed}
    assert all(ws.mode == "werkzeug" for ws in opened)
