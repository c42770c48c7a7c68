"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from flask.typing import ResponseReturnValue

from app.readiness import check_dependencies
from monitoring.metrics import render_metrics

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
def health() -> ResponseReturnValue:
    return {"status": "ok"}


@blueprint.get("/health/ready")
def ready() -> ResponseReturnValue:
    checks = check_dependencies(current_app)
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        return {
            "status": "unavailable",
            "checks": checks,
            "error": {
                "code": "not_ready",
                "message": "Not ready: " + ", ".join(f"{name} is down" for name in down) + ".",
            },
        }, 503
    return {"status": "ok", "checks": checks}


@blueprint.get("/metrics")
def metrics() -> ResponseReturnValue:
    body, content_type = render_metrics(current_app.extensions["switchboard.metrics_registry"])
    return Response(body, content_type=content_type)
