"""Handing committed sends to the workers a batch per task.

A worker pays Celery's consume and acknowledge and one BEGIN/COMMIT per task,
whatever the task holds, so under load many sends should share one task. The
batcher of a process (a web process, or a worker enqueueing again) takes each
committed send's id and a background thread publishes them as one
`store_sends` task per batch.

Latency is not traded away when the system is quiet: a send that arrives after
the window has passed since the last publish goes out at once. Sends arriving
within `window` of the previous publish wait for the next one, so a process
publishes at most one task per window and its batches grow with load, but only
while the process is busy: when its sends of the last second, spread evenly,
would put fewer than two in a window (below 100 sends/s with the default 20 ms
window), nothing would share the wait, and each send goes out at once. (A steady
200 sends/s with a 30 ms window: about six sends a task, and a third less CPU
per message than a 5 ms window. The default is 20 ms since 2026-12-07, a trade of
CPU for latency: against 30 ms, interleaved, delivery p50 at 200 sends/s 15.5-18.0
ms against 23.1-23.9, and 600 sends/s carried under the p99 bar where 30 ms was
not, for ~15 % more CPU a message at 120-400 sends/s; at 67-99 sends/s, where 30
ms holds the window and 20 ms does not, a send costs ~50 % more CPU and arrives
four times sooner. 10 ms failed at 400 sends/s. `bench/throughput.py`; README.)

Nothing here needs to be durable. Every send is already committed as `queued`
in PostgreSQL when it reaches the batcher; a batch lost to a broker error or a
process exit is enqueued again by the redispatch job within seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

# The window is held open only when at least this many sends are expected in it.
SHARED_BATCH = 2


def holds_window(sends_last_second: int, window: float) -> bool:
    """Whether a send that comes within `window` seconds of the last publish should wait
    for the window to pass: only when the recent rate would put SHARED_BATCH sends in it."""
    return sends_last_second * window >= SHARED_BATCH


class SendBatcher:
    def __init__(
        self,
        publish: Callable[[list[str]], None],
        *,
        window: float,
        max_batch: int,
        broker_errors: tuple[type[BaseException], ...],
        on_failure: Callable[[list[str], BaseException], None],
    ) -> None:
        """`publish(ids)` enqueues one task for `ids`; when it raises one of
        `broker_errors`, `on_failure(ids, exc)` counts the loss (the sweeper recovers)."""
        if window < 0 or max_batch < 1:
            raise ValueError("window must be >= 0 and max_batch >= 1")
        self._publish = publish
        self._window = window
        self._max_batch = max_batch
        self._broker_errors = broker_errors
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: list[str] = []
        self._arrivals: deque[float] = deque()  # when each send of the last second came
        self._thread: threading.Thread | None = None
        self._last_publish = 0.0
        os.register_at_fork(after_in_child=self._forget_parent)

    def add(self, message_id: uuid.UUID | str) -> None:
        """Enqueue this committed send with the next batch (never blocks on the broker)."""
        now = time.monotonic()
        with self._lock:
            self._pending.append(str(message_id))
            arrivals = self._arrivals
            arrivals.append(now)
            while arrivals[0] < now - 1.0:
                arrivals.popleft()
            if self._thread is None or not self._thread.is_alive():
                # Started on first use, so after any fork: a thread does not survive one.
                self._thread = threading.Thread(
                    target=self._run, name="switchboard-send-batcher", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def flush(self) -> None:
        """Publish whatever is pending now, in this thread (at exit, and in tests)."""
        while batch := self._take():
            self._send(batch)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _take(self) -> list[str]:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            if not self._pending:
                self._wake.clear()
            return batch

    def _run(self) -> None:
        while True:
            self._wake.wait()
            wait = self._last_publish + self._window - time.monotonic()
            if wait > 0 and holds_window(len(self._arrivals), self._window):
                # Published moments ago, and busy: let this batch gather what arrives
                # meanwhile.
                time.sleep(wait)
            batch = self._take()
            if batch:
                self._last_publish = time.monotonic()
                self._send(batch)

    def _send(self, batch: list[str]) -> None:
        try:
            self._publish(batch)
        except self._broker_errors as exc:
            self._on_failure(batch, exc)

    def _forget_parent(self) -> None:
        # The child has no thread, and the parent publishes what it had pending.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending = []
        self._arrivals = deque()
        self._thread = None
