"""Entry point for `celery -A workers.main worker|beat`: the one place a worker
process builds its Flask app, as the Procfile's worker and beat lines do."""

from celery.signals import worker_ready
from prometheus_client import start_http_server

from app import create_app

flask_app = create_app()
celery = flask_app.extensions["celery"]


@worker_ready.connect
def _serve_metrics(**_kwargs: object) -> None:
    """Expose this worker's task metrics for Prometheus when a port is configured.
    (The threads pool keeps every task in this one process.)"""
    port = flask_app.extensions["switchboard.settings"].worker_metrics_port
    if port:
        start_http_server(port, addr="0.0.0.0")
