"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from app.errors import error_body
from app.readiness import check_dependencies
from app.services.sends import oldest_queued_age_seconds
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


# An accepted send undecided this long means no worker is consuming the direct queue
# (or all are failing): the redispatch job re-enqueues after 5 s, a worker stores in ms.
WORKERS_STALLED_AFTER_SECONDS = 60.0


@blueprint.get("/health/workers")
def workers() -> ResponseReturnValue:
    """Are accepted sends being decided? 503 when one has waited past the threshold.
    Separate from readiness: a stalled worker must not take web processes out of rotation."""
    with current_app.extensions["switchboard.db"].read_sessions() as db:
        waiting, oldest_age = oldest_queued_age_seconds(db)
    checks = {
        "sends_queued": waiting,
        "oldest_queued_seconds": round(oldest_age, 1),
        "stalled_after_seconds": WORKERS_STALLED_AFTER_SECONDS,
    }
    if oldest_age > WORKERS_STALLED_AFTER_SECONDS:
        message = (
            f"{waiting} accepted sends wait for a worker, the oldest for {oldest_age:.0f} s: "
            "no worker is consuming the direct queue, or every run fails."
        )
        return {"status": "stalled", "checks": checks} | error_body("workers_stalled", message), 503
    return {"status": "ok", "checks": checks}


def metrics_authorized(authorization: str | None, token: str | None) -> bool:
    """Whether an `Authorization` header may read metrics: anyone when no token is configured
    (the laptop), else only `Bearer <token>`. Shared with the Celery worker's metrics port."""
    if not token:
        return True
    scheme, _, presented = (authorization or "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


METRICS_UNAUTHORIZED = error_body(
    "unauthorized", "Metrics need 'Authorization: Bearer <SWITCHBOARD_METRICS_TOKEN>'."
)


@blueprint.get("/metrics")
def metrics() -> ResponseReturnValue:
    token = current_app.extensions["switchboard.settings"].metrics_token
    if not metrics_authorized(request.headers.get("Authorization"), token):
        return jsonify(METRICS_UNAUTHORIZED), 401, {"WWW-Authenticate": "Bearer"}
    body, content_type = render_metrics(current_app.extensions["switchboard.metrics_registry"])
    return Response(body, content_type=content_type)
