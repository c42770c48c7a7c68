"""Switchboard: a self-hosted messaging backend.

`create_app()` builds the Flask app; nothing is created at import time.
"""

from __future__ import annotations

from functools import partial

from flask import Flask

from app.settings import Settings, SettingsError, load_settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from `settings` (default: read from the environment).

    Raises `SettingsError` or `PolicyError` naming what is wrong, so a bad
    deployment stops at start-up rather than at the first request.
    """
    import redis

    from app.api import register_blueprints
    from app.auth import TokenVerifier
    from app.db import Database
    from app.errors import register_error_handlers
    from app.events import PUBLISHER_KEY, RedisPublisher
    from app.policy import load_policy
    from app.ratelimit import UserRateLimiter
    from app.services.attachments import OBJECT_REMOVER_KEY, sign_event_data
    from app.services.moderation import pending_reports_summary
    from app.services.sends import oldest_queued_age_seconds
    from app.storage import ObjectStore
    from app.stream.hub import Hub
    from app.stream.log import EventLog
    from app.stream.reader import EventLoopReaders
    from app.web import install_request_hooks
    from monitoring.logging import configure_logging
    from monitoring.metrics import (
        JobStateCollector,
        QueueDepthCollector,
        build_registry,
        pending_reports_collector,
        queued_broadcasts_collector,
        queued_sends_collector,
    )
    from schedules.runner import job_statuses
    from workers.celery_app import QUEUES, init_celery
    from workers.tasks import enqueue_attachment_deletion

    settings = settings or load_settings()
    configure_logging(settings.log_level)
    policy = load_policy(settings.policy)
    if policy.attachments.enabled and not settings.s3_bucket:
        raise SettingsError(
            f"SWITCHBOARD_S3_BUCKET: is required: policy {policy.name!r} enables attachments"
        )
    store = ObjectStore(settings) if settings.s3_bucket else None

    # No static folder: the API serves no files of its own (and so has no `static` route).
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.config["SOCK_SERVER_OPTIONS"] = {
        "ping_interval": settings.stream_ping_interval,
        "max_message_size": settings.stream_max_frame_bytes,
    }

    redis_client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
    )
    database = Database(
        settings.database_url,
        pool_size=settings.db_pool_size,
        pool_timeout=settings.db_pool_timeout,
        info={
            PUBLISHER_KEY: RedisPublisher(redis_client),
            OBJECT_REMOVER_KEY: enqueue_attachment_deletion,
        },
    )
    app.extensions.update(
        {
            "switchboard.settings": settings,
            "switchboard.policy": policy,
            "switchboard.db": database,
            "switchboard.redis": redis_client,
            "switchboard.storage": store,
            # What a socket is sent of an event's data: attachment URLs signed as it is
            # written (one function for every socket; none where nothing is signed).
            "switchboard.event_renderer": partial(sign_event_data, store) if store else None,
            "switchboard.ratelimiter": UserRateLimiter(
                redis_client, policy.rate_limit_per_second, policy.rate_limit_burst
            )
            if settings.rate_limits_enabled
            else None,
            "switchboard.tokens": TokenVerifier(settings),
            "switchboard.hub": Hub(settings.redis_url),
            # Sockets handed over by their requests, read by gevent's event loop.
            "switchboard.stream_readers": EventLoopReaders(),
            # Half the pool at most for the stream's reads; the API keeps the rest.
            "switchboard.event_log": EventLog(
                database.read_sessions, max_concurrent=max(1, settings.db_pool_size // 2)
            ),
        }
    )
    celery = init_celery(app, settings)

    def queue_depths() -> dict[str, int]:
        from workers.broker import queue_depths as broker_queue_depths

        return broker_queue_depths(celery, QUEUES)

    def queued_sends() -> tuple[int, float]:
        with database.read_sessions() as session:
            return oldest_queued_age_seconds(session)

    def pending_reports() -> tuple[int, float]:
        with database.read_sessions() as session:
            return pending_reports_summary(session)

    def queued_broadcasts() -> tuple[int, float]:
        from sqlalchemy import func, select

        from app.models import Broadcast

        # One scan of the partial index ix_broadcasts_queued: cheap at every scrape.
        statement = select(
            func.count(),
            func.coalesce(
                func.extract("epoch", func.clock_timestamp() - func.min(Broadcast.created_at)), 0
            ),
        ).where(Broadcast.status == "queued")
        with database.read_sessions() as session:
            count, age = session.execute(statement).one()
        return int(count), float(age)

    def jobs_status() -> list:
        with database.read_sessions() as session:
            return job_statuses(session, policy)

    app.extensions["switchboard.metrics_registry"] = build_registry(
        [
            QueueDepthCollector(queue_depths),
            queued_sends_collector(queued_sends),
            pending_reports_collector(pending_reports),
            queued_broadcasts_collector(queued_broadcasts),
            JobStateCollector(jobs_status),
        ]
    )

    install_request_hooks(app)
    register_error_handlers(app)
    register_blueprints(app)
    # The browser client: its routes answer 404 unless SWITCHBOARD_DEMO is on.
    from app.demo import blueprint as demo

    app.register_blueprint(demo)
    return app
