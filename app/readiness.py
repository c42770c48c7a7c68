"""Checks that the database, Redis and the Celery broker answer."""

from __future__ import annotations

import redis
from flask import Flask
from kombu import Connection
from sqlalchemy import text

from workers.broker import is_amqp

CHECK_TIMEOUT_SECONDS = 2.0


def _check_database(app: Flask) -> str:
    try:
        with app.extensions["switchboard.db"].engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return f"down: {type(exc).__name__}"
    return "ok"


def _check_redis(client: redis.Redis) -> str:
    try:
        client.ping()
    except Exception as exc:
        return f"down: {type(exc).__name__}"
    return "ok"


def _check_broker(url: str) -> str:
    """Connect once (RabbitMQ: the AMQP handshake and login too) within the timeout."""
    if is_amqp(url):
        # Bounds the handshake as well: a broker still booting accepts TCP and says nothing.
        options = {"read_timeout": CHECK_TIMEOUT_SECONDS, "write_timeout": CHECK_TIMEOUT_SECONDS}
    else:
        options = {"socket_timeout": CHECK_TIMEOUT_SECONDS}
    try:
        with Connection(
            url, connect_timeout=CHECK_TIMEOUT_SECONDS, transport_options=options
        ) as connection:
            # One attempt: no retries with kombu's 2 s back-off inside a readiness probe.
            connection.ensure_connection(max_retries=0, timeout=CHECK_TIMEOUT_SECONDS)
    except Exception as exc:
        return f"down: {type(exc).__name__}"
    return "ok"


def _check_storage(app: Flask) -> str:
    try:
        app.extensions["switchboard.storage"].ping()
    except Exception as exc:
        return f"down: {type(exc).__name__}"
    return "ok"


def check_dependencies(app: Flask) -> dict[str, str]:
    settings = app.extensions["switchboard.settings"]
    checks = {
        "database": _check_database(app),
        "redis": _check_redis(app.extensions["switchboard.redis"]),
    }
    if settings.celery_broker_url == settings.redis_url:
        checks["broker"] = checks["redis"]
    else:
        checks["broker"] = _check_broker(settings.celery_broker_url)
    policy = app.extensions["switchboard.policy"]
    if policy.attachments.enabled and app.extensions["switchboard.storage"] is not None:
        # Only where attachments are on: without its bucket no photo can be sent or shown.
        checks["storage"] = _check_storage(app)
    return checks
