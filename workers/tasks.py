"""Celery tasks. Each is thin: it takes plain data and calls one service function.

Task names carry their queue: `switchboard.direct.*` tasks go to the direct queue,
`switchboard.broadcast.*` to the broadcast queue (see `init_celery`).
"""

from __future__ import annotations

from flask import current_app

from app.services.messages import SendCommand, store_message
from workers.celery_app import celery


@celery.task(bind=True, name="switchboard.direct.send_message")
def send_message(task, command: dict[str, str]) -> str:
    """Decide and store one direct message; safe to run any number of times."""
    result = store_message(
        task.session, current_app.extensions["switchboard.policy"], SendCommand(**command)
    )
    return result.outcome
