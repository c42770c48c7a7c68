"""Entry point for `celery -A workers.main worker|beat`: the one place a worker
process builds its Flask app, as the Procfile's worker and beat lines do."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery.signals import worker_init, worker_ready
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from app import create_app
from app.db import pool_size_problem
from app.policy import PolicyError
from app.settings import SettingsError

try:
    flask_app = create_app()
except (SettingsError, PolicyError) as exc:
    # Celery would print this as a 40-line traceback from deep inside its app loader;
    # the message already names the variable or policy key, so that line is all that helps.
    print(f"switchboard: {exc}", file=sys.stderr)
    sys.exit(2)
celery = flask_app.extensions["celery"]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the worker's own log."""


def metrics_wsgi_app(registry: CollectorRegistry, token: str | None) -> Callable[..., Iterable]:
    """prometheus-client's exposition app behind `Authorization: Bearer <token>` when a
    token is set: its own `start_http_server` has no way to ask for one."""
    from app.api.health import METRICS_UNAUTHORIZED, metrics_authorized

    exposition = make_wsgi_app(registry)
    refusal = json.dumps(METRICS_UNAUTHORIZED).encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if metrics_authorized(environ.get("HTTP_AUTHORIZATION"), token):
            return exposition(environ, start_response)
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(refusal))),
                ("WWW-Authenticate", "Bearer"),
            ],
        )
        return [refusal]

    return app


def serve_metrics(host: str, port: int, token: str | None) -> WSGIServer:
    """Serve this process's metrics on host:port in a daemon thread."""
    server = make_server(
        host,
        port,
        metrics_wsgi_app(REGISTRY, token),
        server_class=_ThreadingWSGIServerV6 if ":" in host else _ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


@worker_init.connect
def _refuse_more_tasks_than_connections(sender: Any = None, **_kwargs: object) -> None:
    """Stop a worker whose concurrency its pools cannot serve, with one line naming the
    setting, before it connects to anything."""
    concurrency = getattr(sender, "max_concurrency", None) or getattr(sender, "concurrency", None)
    problem = pool_size_problem(
        concurrency, flask_app.extensions["switchboard.settings"].db_pool_size
    )
    if problem:
        print(f"switchboard: {problem}", file=sys.stderr)
        sys.exit(2)


@worker_ready.connect
def _serve_metrics(**_kwargs: object) -> None:
    """Expose this worker's task metrics for Prometheus when a port is configured.
    (The threads pool keeps every task in this one process.)"""
    settings = flask_app.extensions["switchboard.settings"]
    if settings.worker_metrics_port:
        serve_metrics(
            settings.worker_metrics_host, settings.worker_metrics_port, settings.metrics_token
        )
