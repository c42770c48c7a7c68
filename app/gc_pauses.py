"""How long the garbage collector stops a web process, by generation.

The collector runs on whatever greenlet happens to allocate, and every socket and request
of the process waits for it: a collection's pause is an event-loop stall. Under gunicorn
prometheus-client runs in multiprocess mode, which has no `python_gc_*` metrics, so this
records them: `switchboard_gc_pause_seconds{generation}` (2 is a full collection, which
walks every tracked object not frozen at start-up; ~25 an open socket).
"""

from __future__ import annotations

import gc
import time
from typing import Any

from monitoring.metrics import GC_PAUSE


class GcPauseMeter:
    def __init__(self) -> None:
        self._started = 0.0

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector, which starts no other collection meanwhile.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - self._started)
