"""Celery tasks. Each is thin: it takes ids and calls one service function.

Task names carry their queue: `switchboard.direct.*` tasks go to the direct queue,
`switchboard.broadcast.*` to the broadcast queue, the rest to the default queue
(see `init_celery`).
"""

from __future__ import annotations

import logging
import uuid

from flask import current_app
from sqlalchemy.orm import Session

from app.policy import Decision
from app.services.attachments import check_message_attachments, delete_objects
from app.services.broadcasts import fan_out_chunk, reject_broadcast
from app.services.messages import reject_send, store_message
from monitoring.metrics import BROADCAST_ENQUEUE_FAILURES, SEND_ENQUEUE_FAILURES
from schedules import RUN_JOB_TASK
from schedules.runner import run_job
from workers.celery_app import BROKER_ERRORS, SwitchboardTask, celery

log = logging.getLogger(__name__)

INTERNAL_FAILURE = Decision(
    False, "internal_error", "The message could not be stored because of a server error."
)


class SendTask(SwitchboardTask):
    abstract = True

    def on_permanent_failure(self, session: Session, args: tuple, kwargs: dict) -> None:
        """A send whose task can never succeed ends rejected, and its sender is told."""
        message_id = kwargs.get("message_id", args[0] if args else None)
        try:
            uuid.UUID(str(message_id))
        except ValueError:
            log.error("send_message failed for a malformed id %r: nothing to reject", message_id)
            return
        reject_send(session, message_id, INTERNAL_FAILURE)


@celery.task(bind=True, base=SendTask, name="switchboard.direct.send_message")
def send_message(task, message_id: str) -> str:
    """Decide and store one accepted send; safe to run any number of times. A send with
    attachments has their bytes checked first, before any lock is taken."""
    session, policy = task.session, current_app.extensions["switchboard.policy"]
    store = current_app.extensions["switchboard.storage"]
    return store_message(
        session,
        policy,
        message_id,
        check_attachments=lambda queued_id: check_message_attachments(
            session, policy, store, queued_id
        ),
    ).outcome


def enqueue_send(message_id: uuid.UUID) -> None:
    """Hand a committed send to the workers. If the broker cannot take it, the send is
    safe in PostgreSQL as `queued` and the redispatch job enqueues it again within
    seconds of the broker coming back, so the failure is counted, not raised."""
    try:
        send_message.apply_async(args=[str(message_id)])
    except BROKER_ERRORS as exc:
        SEND_ENQUEUE_FAILURES.inc()
        log.warning("could not enqueue send %s, the sweeper will: %r", message_id, exc)


INTERNAL_BROADCAST_FAILURE = Decision(
    False, "internal_error", "The broadcast could not be delivered because of a server error."
)


class BroadcastTask(SwitchboardTask):
    abstract = True

    def on_permanent_failure(self, session: Session, args: tuple, kwargs: dict) -> None:
        """A fan-out that can never finish ends rejected (whoever it reached keeps it)."""
        broadcast_id = kwargs.get("broadcast_id", args[0] if args else None)
        try:
            uuid.UUID(str(broadcast_id))
        except ValueError:
            log.error("fan_out failed for a malformed id %r: nothing to reject", broadcast_id)
            return
        reject_broadcast(session, broadcast_id, INTERNAL_BROADCAST_FAILURE)


@celery.task(bind=True, base=BroadcastTask, name="switchboard.broadcast.fan_out")
def fan_out_broadcast(task, broadcast_id: str) -> str:
    """Deliver the next chunk of a queued broadcast and enqueue the one after; safe to
    run any number of times (see app.services.broadcasts)."""
    return fan_out_chunk(
        task.session,
        current_app.extensions["switchboard.policy"],
        broadcast_id,
        enqueue=enqueue_broadcast,
    ).outcome


def enqueue_broadcast(broadcast_id: uuid.UUID) -> None:
    """Hand a committed broadcast (or its next chunk) to the broadcast workers. If the
    broker cannot take it, the broadcast stays `queued` in PostgreSQL and the redispatch
    job enqueues it again, so the failure is counted, not raised."""
    try:
        fan_out_broadcast.apply_async(args=[str(broadcast_id)])
    except BROKER_ERRORS as exc:
        BROADCAST_ENQUEUE_FAILURES.inc()
        log.warning("could not enqueue broadcast %s, the sweeper will: %r", broadcast_id, exc)


@celery.task(bind=True, name="switchboard.default.delete_attachment_objects")
def delete_attachment_objects(task, attachment_ids: list[str]) -> int:
    """Delete the objects of attachments that went with their message (or failed their
    check); retried with backoff while the store is unreachable, and finished by the
    clean-attachments job if every retry fails."""
    return delete_objects(
        task.session,
        current_app.extensions["switchboard.storage"],
        [uuid.UUID(str(attachment_id)) for attachment_id in attachment_ids],
    )


def enqueue_attachment_deletion(attachment_ids: list[uuid.UUID]) -> None:
    """After commit: delete these attachments' objects soon. A lost enqueue costs only
    time: the clean-attachments job deletes whatever is left."""
    try:
        delete_attachment_objects.apply_async(args=[[str(i) for i in attachment_ids]])
    except BROKER_ERRORS as exc:
        log.warning(
            "could not enqueue the deletion of %d attachments: %r", len(attachment_ids), exc
        )


@celery.task(bind=True, name=RUN_JOB_TASK)
def run_periodic_job(task, name: str) -> int:
    """One run of a periodic job (see schedules.runner for why two beats are harmless)."""
    run = run_job(
        task.session,
        current_app.extensions["switchboard.policy"],
        name,
        enqueue_send=enqueue_send,
        enqueue_broadcast=enqueue_broadcast,
        store=current_app.extensions["switchboard.storage"],
    )
    return run.rows
