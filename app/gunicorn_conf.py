"""Gunicorn settings for the Procfile's web line: API and sockets on $PORT.

gevent workers hold thousands of idle sockets cheaply. Metrics from all
workers are aggregated through prometheus-client's multiprocess mode.

Binds 0.0.0.0 (what a platform router such as Heroku's needs) unless
SWITCHBOARD_BIND_HOST says otherwise; `switchboard up` sets it to 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

    from app.gc_pauses import GcPauseMeter


def _bind_address(host: str, port: str) -> str:
    # An IPv6 literal needs brackets to keep its colons apart from the port's.
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def check_configuration() -> None:
    """Stop with one line naming the bad variable or policy key.

    Without this the master forks its workers, each fails to build the app with a
    traceback, and the master exits with "Worker failed to boot". Runs while gunicorn
    reads this file, before it logs anything, so the line is all an operator sees.
    """
    from app.policy import PolicyError, load_policy
    from app.settings import SettingsError, load_settings

    try:
        load_policy(load_settings().policy)
    except (SettingsError, PolicyError) as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        sys.exit(2)


check_configuration()

# gevent records for every greenlet who spawned it and the spawner's stack (ten frames),
# kept until the greenlet is freed: about 1 KiB on each open socket's greenlet, for
# debugging aids nothing here reads. Before any greenlet exists; the environment wins.
os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "false")

bind = _bind_address(
    os.environ.get("SWITCHBOARD_BIND_HOST") or "0.0.0.0", os.environ.get("PORT", "8000")
)
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
worker_connections = int(os.environ.get("SWITCHBOARD_WORKER_CONNECTIONS", "10000"))
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = None
errorlog = "-"
# gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl),
# so every gunicorn of that user on the machine fights over it; nothing here uses it.
control_socket_disable = True

# The metrics directory this process chose itself (and so removes on exit); None when
# PROMETHEUS_MULTIPROC_DIR was given, as that one belongs to whoever set it.
_OWN_METRICS_DIR: Path | None = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _state_dir = os.environ.get("SWITCHBOARD_STATE_DIR")
    if _state_dir:
        # `switchboard up`: keep it with the rest of the laptop's state, not in the shared
        # temp dir. (Not via PROMETHEUS_MULTIPROC_DIR: honcho gives every process the
        # same environment, and the Celery processes would switch to multiprocess mode
        # in a directory this process wipes on start.)
        _OWN_METRICS_DIR = Path(_state_dir) / "web-metrics"
    else:
        _OWN_METRICS_DIR = Path(tempfile.mkdtemp(prefix="switchboard-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_OWN_METRICS_DIR)


def on_starting(server: Arbiter) -> None:
    # Values left by a previous run would be added to this run's.
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def child_exit(server: Arbiter, worker: Worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Arbiter) -> None:
    # Otherwise every run leaves a switchboard-metrics-* folder in the temp dir.
    if _OWN_METRICS_DIR is not None:
        shutil.rmtree(_OWN_METRICS_DIR, ignore_errors=True)


# Times the collector's pauses once a worker has started (see post_worker_init).
_GC_PAUSES: GcPauseMeter | None = None


def post_worker_init(worker: Worker) -> None:
    """Move everything start-up made (the app, its modules, the policy) out of the garbage
    collector's sight, collect young objects less often, and time every collection
    (`switchboard_gc_pause_seconds`).

    A full collection walks every tracked object; frozen ones are skipped. Without this a
    web process holding 5,000 sockets walks the start-up heap too, and one full collection
    during a fan-out stalled every socket for about a second. A larger first threshold
    means fewer young collections while a fan-out allocates its frames (each one short-
    lived); the older generations keep their defaults, except that no full collection
    starts during a broadcast's fan-out (`FullCollectionHold`)."""
    import gc

    from app.gc_pauses import FULL_COLLECTION_HOLD, GcPauseMeter

    global _GC_PAUSES
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    FULL_COLLECTION_HOLD.install()
    _GC_PAUSES = GcPauseMeter()
    _GC_PAUSES.install()


def worker_exit(server: Arbiter, worker: Worker) -> None:
    """Close the open streams with 1001, then give the frozen start-up objects back to
    the collector before the worker exits.

    An open stream is no longer one of gunicorn's connections once set up (its request
    has ended: app/stream/reader.py), so gunicorn neither waits for it nor closes it; its
    client is told to reconnect, and resumes from its last event id elsewhere.

    Frozen objects are only freed during the interpreter's final teardown, after gevent's
    modules are gone: logging's handler clean-up then fails in gevent's lock and prints
    a traceback on every shutdown. Collected here, they go while everything still works."""
    import gc

    from app.gc_pauses import FULL_COLLECTION_HOLD

    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None) or {}
    readers = extensions.get("switchboard.stream_readers")
    if readers is not None:
        readers.close_all(timeout=2.0)
    if _GC_PAUSES is not None:
        _GC_PAUSES.uninstall()
    FULL_COLLECTION_HOLD.uninstall()
    gc.unfreeze()
    gc.collect()
