"""The web process's garbage-collector pauses metric, and the stream's handshake leaving no
cyclic garbage of its own (both for issue 10's "no full-GC stall")."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from prometheus_client import REGISTRY

from app.api.stream import _NoEvent, _NoThread, _SocketServed, websocket_view
from app.gc_pauses import FullCollectionHold, GcPauseMeter

HANDSHAKE = {
    "HTTP_HOST": "localhost",
    "HTTP_UPGRADE": "websocket",
    "HTTP_CONNECTION": "Upgrade",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _overruns() -> float:
    return REGISTRY.get_sample_value("switchboard_gc_hold_overruns_total") or 0.0


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generation of every collection started, with a collector tuned so that a full
    one falls due after a few hundred allocations: start-up's objects frozen (so the
    long-lived heap that a full collection must grow by a quarter is empty), and low
    thresholds. Restored after."""
    saved = gc.get_threshold()
    started: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.collect()
    gc.freeze()
    gc.collect()  # nothing left unfrozen: the long-lived count is now ~0
    gc.set_threshold(100, 2, 2)
    gc.callbacks.append(record)
    try:
        yield started
    finally:
        gc.callbacks.remove(record)
        gc.set_threshold(*saved)
        gc.unfreeze()


@pytest.fixture
def hold_on_a_clock() -> Iterator[tuple[FullCollectionHold, _Clock]]:
    """An installed hold (1 s quiet, 30 s at most) on a clock the test moves."""
    clock = _Clock()
    hold = FullCollectionHold(linger=1.0, max_hold=30.0, clock=clock)
    hold.install()
    try:
        yield hold, clock
    finally:
        hold.uninstall()


def _allocate_survivors(count: int) -> list[list[Any]]:
    """Container objects that live on, so young collections promote them."""
    return [[] for _ in range(count)]


def test_no_full_collection_starts_during_a_fan_out_and_one_due_runs_after_it(
    collections: list[int], hold_on_a_clock: tuple[FullCollectionHold, _Clock]
) -> None:
    hold, clock = hold_on_a_clock
    kept = _allocate_survivors(3_000)
    assert 2 in collections  # as tuned, a full collection falls due this often
    collections.clear()

    hold.during_fan_out()
    assert hold.holding
    kept += _allocate_survivors(3_000)
    clock.now += 0.9  # the fan-out's next chunk, within the second
    hold.during_fan_out()
    clock.now += 0.9
    kept += _allocate_survivors(3_000)
    assert collections.count(1) >= 5  # young collections went on
    assert 2 not in collections
    assert hold.holding

    clock.now += 1.0  # a quiet second: the next collection ends the hold
    kept += _allocate_survivors(3_000)
    assert not hold.holding
    assert 2 in collections
    assert gc.get_threshold() == (100, 2, 2)
    del kept


def test_fan_outs_without_a_quiet_moment_let_a_full_collection_through(
    collections: list[int], hold_on_a_clock: tuple[FullCollectionHold, _Clock]
) -> None:
    hold, clock = hold_on_a_clock
    overruns = _overruns()
    hold.during_fan_out()
    for _ in range(59):  # a chunk every half second for 29.5 s
        clock.now += 0.5
        hold.during_fan_out()
    assert hold.holding
    clock.now += 0.5
    hold.during_fan_out()  # 30 s: the collector gets its turn
    assert not hold.holding
    assert _overruns() == overruns + 1
    collections.clear()
    kept = _allocate_survivors(3_000)
    assert 2 in collections
    clock.now += 0.5
    hold.during_fan_out()  # still within the second given to the collector
    assert not hold.holding
    clock.now += 0.6
    hold.during_fan_out()
    assert hold.holding
    del kept
    hold.uninstall()
    assert gc.get_threshold() == (100, 2, 2)


def test_a_hold_does_nothing_until_installed_and_uninstalling_ends_it() -> None:
    saved = gc.get_threshold()
    hold = FullCollectionHold(clock=_Clock())
    hold.during_fan_out()
    assert not hold.holding
    assert gc.get_threshold() == saved
    hold.install()
    try:
        hold.during_fan_out()
        assert hold.holding
        assert gc.get_threshold()[2] > 1_000_000
    finally:
        hold.uninstall()
    assert not hold.holding
    assert gc.get_threshold() == saved
    with pytest.raises(ValueError):
        FullCollectionHold(linger=2.0, max_hold=1.0)


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
