"""How long the garbage collector stops a web process, by generation.

The collector runs on whatever greenlet happens to allocate, and every socket and request
of the process waits for it: a collection's pause is an event-loop stall. Under gunicorn
prometheus-client runs in multiprocess mode, which has no `python_gc_*` metrics, so this
records them: `switchboard_gc_pause_seconds{generation}` (2 is a full collection, which
walks every tracked object not frozen at start-up; ~25 an open socket).

The collector's callback only appends to a deque; a flusher thread (a greenlet under
gevent) hands the pauses to the histogram every second. The callback must not touch
prometheus-client: a collection can start inside a metric update, while it holds its
lock (in multiprocess mode one lock for every metric, and not reentrant), and observing
from the callback would then wait on that lock forever, in the thread that holds it.

`FullCollectionHold` keeps full collections out of fan-outs (DESIGN.md: a broadcast to
5,000 sockets with "no full-GC stall in the way"): the hub calls `during_fan_out` as it
hands out each broadcast chunk, and until the fan-out has been quiet for a second the
interpreter starts no full collection of its own accord. One that fell due meanwhile runs
at the first young collection after, by the interpreter's own rule.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from monitoring.metrics import GC_HOLD_OVERRUNS, GC_PAUSE

log = logging.getLogger(__name__)

# A threshold for generation 2 that its count (young-generation collections since the
# last full one) never reaches: the interpreter then starts no full collection itself.
_NEVER = 2**31 - 1


class GcPauseMeter:
    def __init__(self, *, flush_seconds: float = 1.0) -> None:
        self._flush_seconds = flush_seconds
        self._started = 0.0
        self._pauses: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)
        if self._flusher is None:
            self._stop.clear()
            self._flusher = threading.Thread(
                target=self._flush_every_second, name="gc-pause-flusher", daemon=True
            )
            self._flusher.start()

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        if self._flusher is not None:
            self._stop.set()
            self._flusher.join(5.0)
            self._flusher = None
        self.flush()

    def flush(self) -> None:
        """Observe the pauses recorded since the last flush."""
        pauses = self._pauses
        while pauses:
            generation, seconds = pauses.popleft()
            GC_PAUSE.labels(str(generation)).observe(seconds)

    def _flush_every_second(self) -> None:
        while not self._stop.wait(self._flush_seconds):
            self.flush()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector, which starts no other collection meanwhile. No locks.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))


class FullCollectionHold:
    """Holds the collector's full collections off while a fan-out runs.

    CPython's generational collector (3.11-3.13) starts a full collection when generation
    2's count passes its threshold (and a quarter of the long-lived objects are new). With
    5,000 sockets open that walks ~150,000 objects, and the process's event loop stands
    still meanwhile: in a broadcast, every socket after it waits. `during_fan_out` raises
    that threshold out of reach until `linger` seconds after its last call; the next
    collection after that restores it, so a full collection that fell due during the
    fan-out runs at the first young collection after it. Young collections go on as
    usual: with start-up's objects frozen they take milliseconds.

    Nothing holds the collector back for good: fan-outs with no quiet moment for
    `max_hold` seconds let one full collection through (`switchboard_gc_hold_overruns_
    total` counts those), since cyclic garbage would otherwise pile up for as long as
    the broadcasts kept coming.

    Process-wide, like the collector, and inert until `install`ed (gunicorn's
    post_worker_init does). The collector's callback takes no lock and touches no metric
    (see the module's docstring); the hub's thread and that callback only swap
    thresholds, which the GIL keeps whole."""

    def __init__(
        self,
        *,
        linger: float = 1.0,
        max_hold: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if linger <= 0 or max_hold < linger:
            raise ValueError("linger must be > 0 and max_hold >= linger")
        self._linger = linger
        self._max_hold = max_hold
        self._clock = clock
        self._installed = False
        self._full_threshold = 0
        self._held_since: float | None = None
        self._hold_until = 0.0
        self._not_before = 0.0

    @property
    def holding(self) -> bool:
        return self._held_since is not None

    def install(self) -> None:
        """Start honouring `during_fan_out`. A hold restores generation 2's threshold to
        what it is now."""
        if not self._installed:
            self._full_threshold = gc.get_threshold()[2]
            gc.callbacks.append(self._on_collection)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_collection)
            self._release()
            self._installed = False

    def during_fan_out(self) -> None:
        """A fan-out is under way: no full collection until it has been quiet for
        `linger` seconds."""
        if not self._installed:
            return
        now = self._clock()
        held_since = self._held_since
        if held_since is None:
            if now < self._not_before:
                return  # just let a full collection through after an overrun
            # In this order: a collection between two of these lines (the callback, on
            # any thread) then finds either no hold or this one with its deadline set.
            self._hold_until = now + self._linger
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, _NEVER)
            self._held_since = now
            return
        if now - held_since >= self._max_hold:
            self._release()
            self._not_before = now + self._linger
            GC_HOLD_OVERRUNS.inc()
            log.warning(
                "fan-outs for %.0f s without a quiet second: letting a full collection run",
                now - held_since,
            )
            return
        self._hold_until = now + self._linger

    def _release(self) -> None:
        if self._held_since is not None:
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, self._full_threshold)
            self._held_since = None

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector: no locks. Takes effect from the next collection on.
        if phase == "stop" and self._held_since is not None and self._clock() >= self._hold_until:
            self._release()


# The web process's hold, installed by gunicorn's post_worker_init; the hub calls it.
FULL_COLLECTION_HOLD = FullCollectionHold()
