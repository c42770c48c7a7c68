"""Periodic jobs run by beat. Thin, like the tasks: they call services."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import current_app

from app.services.event_log import prune_event_log
from workers.celery_app import celery

log = logging.getLogger(__name__)


@celery.task(bind=True, name="switchboard.maintenance.prune_event_log")
def prune_events(task) -> int:
    """Drop events older than the log's window (see app.services.event_log)."""
    deleted = prune_event_log(
        task.session, current_app.extensions["switchboard.policy"], datetime.now(UTC)
    )
    log.info("pruned %d events past the log's window", deleted)
    return deleted
