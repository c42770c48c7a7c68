"""Gunicorn settings for the Procfile's web line: API and sockets on $PORT.

gevent workers hold thousands of idle sockets cheaply. Metrics from all
workers are aggregated through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
worker_connections = int(os.environ.get("SWITCHBOARD_WORKER_CONNECTIONS", "10000"))
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = None
errorlog = "-"

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="switchboard-metrics-")


def on_starting(server) -> None:
    # Values left by a previous run would be added to this run's.
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
