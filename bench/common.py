"""What every benchmark may use: the S3 store for the web and worker processes it starts,
the environment of those processes, a clean exit on signals, the open file limit, one HTTP
request, an open-loop HTTP driver with its latency table, and the figures' formats
(nearest-rank percentile, milliseconds, PASS / FAIL)."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import queue
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.embedded import S3_VARIABLES


class S3Store:
    """The store SWITCHBOARD_S3_BUCKET (with SWITCHBOARD_S3_ENDPOINT_URL and AWS_*) names
    when set; else an embedded SeaweedFS in a temp dir of its own, which `stop()` stops
    and removes. `start()` returns the settings that name it."""

    def __init__(self) -> None:
        self.server = None
        self.directory: Path | None = None

    def start(self) -> dict[str, str]:
        if os.environ.get("SWITCHBOARD_S3_BUCKET"):
            return {name: os.environ[name] for name in S3_VARIABLES if os.environ.get(name)}
        from app.embedded import SeaweedServer

        self.directory = Path(tempfile.mkdtemp(prefix="switchboard-bench-s3-"))
        server = SeaweedServer(self.directory)
        try:
            server.start()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            raise
        self.server = server
        print(f"S3: embedded SeaweedFS at {server.endpoint_url}, bucket {server.bucket}")
        return server.env()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def run_cleanly(run: Callable[[Any], int], args: Any) -> int:
    """`run(args)`, with SIGTERM handled as Ctrl-C: either way the `finally` blocks of
    `run` stop the processes it started (and drop what it made) before it exits 130, and
    further signals are ignored while they do."""

    def terminate(signum: int, _frame: Any) -> None:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; stopped the processes it started", file=sys.stderr)
        return 130


def process_env(
    database_url: str, redis_url: str, *, inherit_settings: bool = True, **settings: str
) -> dict[str, str]:
    """The environment of the Procfile's processes a benchmark starts: this one's, without
    a broker or metrics folder of its own (Celery runs on the benchmark's Redis database),
    this venv first on PATH, loopback only, quiet logs and no rate limits, plus
    `settings` (SWITCHBOARD_POLICY, the tokens, ...). With `inherit_settings` False, none
    of this environment's SWITCHBOARD_* and PROMETHEUS_* variables pass either."""
    # api_load.py's quoted figures are for the settings' defaults, whatever the shell says.
    dropped = () if inherit_settings else ("SWITCHBOARD_", "PROMETHEUS_")
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PROMETHEUS_MULTIPROC_DIR" and not k.startswith(dropped)
    }
    env.pop("SWITCHBOARD_BROKER_URL", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return (
        env
        | {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
            "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
            "SWITCHBOARD_BIND_HOST": "127.0.0.1",
        }
        | settings
    )


def raise_nofile() -> None:
    """The open file limit up to its hard limit (the processes started inherit it): a
    socket per user needs a descriptor on both sides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def http_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request to 127.0.0.1:`port` on a connection of its own, `body` (when not None)
    as JSON: the status and the body of the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body)
            sent["Content-Type"] = "application/json"
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ----------------------------------------------------------------------------- open loop


def pace(count: int, rate: float, due: Callable[[int, float], None]) -> float:
    """`due(index, when)` for each index below `count`, at `rate` a second from 0.1 s on
    (open loop: on schedule, whatever became of the earlier ones); returns that start.
    `when` is the monotonic time it was due, from which latencies count."""
    start = time.monotonic() + 0.1
    for index in range(count):
        when = start + index / rate
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        due(index, when)
    return start


@dataclass
class Call:
    """One HTTP request of a load run, and what became of it."""

    kind: str  # the figure it counts in ("send", "broadcast", ...)
    method: str
    path: str
    token: str
    body: dict[str, Any] | None = None
    scheduled: float = 0.0  # monotonic: when it was due (latency counts from here)
    done: float = 0.0
    status: int = 0  # 0: no answer (a connection error, counted in `error`)
    error: str = ""
    answer: Any = None


def open_loop(port: int, calls: list[Call], rate: float, connections: int) -> float:
    """Issue `calls` in order at `rate` a second (open loop: each is due on schedule
    whether or not earlier ones were answered), over `connections` keep-alive connections
    to 127.0.0.1:`port`, each from a thread of its own. Latency is counted from when a
    call was due, so a stalled server cannot hide the queue behind it (no coordinated
    omission). Returns the seconds from the first call due to the last one answered."""
    work: queue.Queue[Call | None] = queue.Queue()

    def connection_thread() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while (call := work.get()) is not None:
                _issue(connection, call)
        finally:
            connection.close()

    threads = [threading.Thread(target=connection_thread, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()

    def due(index: int, when: float) -> None:
        calls[index].scheduled = when
        work.put(calls[index])

    start = pace(len(calls), rate, due)
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join()
    return max((call.done for call in calls), default=start) - start


def _issue(connection: http.client.HTTPConnection, call: Call) -> None:
    body = None if call.body is None else json.dumps(call.body)
    headers = {"Authorization": f"Bearer {call.token}", "Content-Type": "application/json"}
    for attempt in range(2):  # one retry on a dropped keep-alive (the calls are idempotent)
        try:
            connection.request(call.method, call.path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            call.status = response.status
            with contextlib.suppress(ValueError):
                call.answer = json.loads(raw or b"null")
            break
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if attempt:
                call.error = exc.__class__.__name__
    call.done = time.monotonic()


# ----------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of unsorted values (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))]


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds in eight columns and the unit: `    12.3 ms`."""
    return f"{seconds * 1000:8.1f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def latency_table(calls: list[Call], expected: int = 202) -> list[str]:
    """Per kind of call: count, p50 / p95 / p99 / max in ms (from when each was due) and
    the answers other than `expected` (by status; 0 is no answer)."""
    lines = [f"{'call':<10} {'n':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}  errors"]
    for kind in sorted({call.kind for call in calls}):
        mine = [call for call in calls if call.kind == kind]
        times = [(call.done - call.scheduled) * 1000 for call in mine]
        wrong = Counter(call.status for call in mine if call.status != expected)
        errors = ", ".join(f"{n} x {status or 'no answer'}" for status, n in wrong.items())
        figures = " ".join(f"{percentile(times, q):8.1f}" for q in (50, 95, 99))
        lines.append(f"{kind:<10} {len(mine):>6} {figures} {max(times):8.1f}  {errors or '0'}")
    return lines
