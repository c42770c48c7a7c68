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
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from typing import Any

from monitoring.metrics import GC_PAUSE


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
