"""Celery tasks. Each is thin: it takes ids and calls one service function.

Task names carry their queue: `switchboard.direct.*` tasks go to the direct queue,
`switchboard.broadcast.*` to the broadcast queue, the rest to the default queue
(see `init_celery`).
"""

from __future__ import annotations

import atexit
import logging
import uuid
from collections import Counter
from typing import Any

from flask import current_app
from sqlalchemy.orm import Session

from app.db import after_commit
from app.policy import Decision
from app.services.attachments import check_message_attachments, delete_objects
from app.services.broadcasts import fan_out_chunk, reject_broadcast
from app.services.messages import reject_send, store_messages
from monitoring.metrics import BROADCAST_ENQUEUE_FAILURES, SEND_BATCH_SIZE, SEND_ENQUEUE_FAILURES
from schedules import RUN_JOB_TASK
from schedules.runner import run_job
from workers.celery_app import BROKER_ERRORS, PermanentError, SwitchboardTask, celery
from workers.send_batches import SendBatcher

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


class SendBatchTask(SwitchboardTask):
    abstract = True

    def on_permanent_failure(self, session: Session, args: tuple, kwargs: dict) -> None:
        """A batch that can never succeed as a whole is split: each send is enqueued on
        its own, where it is stored or, if it alone is the cause, ends rejected."""
        message_ids = kwargs.get("message_ids", args[0] if args else None)
        if not isinstance(message_ids, list):
            log.error("store_sends failed for malformed ids %r: nothing to reject", message_ids)
            return
        good = []
        for message_id in message_ids:
            try:
                good.append(str(uuid.UUID(str(message_id))))
            except ValueError:
                log.error("store_sends got a malformed id %r: skipped", message_id)
        if len(good) == 1:
            reject_send(session, good[0], INTERNAL_FAILURE)
            return

        def enqueue_one_by_one() -> None:
            for message_id in good:
                try:
                    send_message.apply_async(args=[message_id])
                except BROKER_ERRORS as exc:
                    SEND_ENQUEUE_FAILURES.inc()
                    log.warning("could not enqueue send %s, the sweeper will: %r", message_id, exc)

        after_commit(session, enqueue_one_by_one)


def _store(task: SwitchboardTask, message_ids: list[str]) -> list[str]:
    session, policy = task.session, current_app.extensions["switchboard.policy"]
    store = current_app.extensions["switchboard.storage"]
    results = store_messages(
        session,
        policy,
        message_ids,
        check_attachments=lambda queued_id: check_message_attachments(
            session, policy, store, queued_id
        ),
    )
    return [result.outcome for result in results]


@celery.task(bind=True, base=SendBatchTask, name="switchboard.direct.store_sends")
def store_sends(task, message_ids: list[str]) -> dict[str, int]:
    """Decide and store a batch of accepted sends in one transaction; safe to run any
    number of times. Returns how many ended each way."""
    if not isinstance(message_ids, list) or not message_ids:
        raise PermanentError(f"store_sends needs a list of message ids, got {message_ids!r}")
    return dict(Counter(_store(task, message_ids)))


@celery.task(bind=True, base=SendTask, name="switchboard.direct.send_message")
def send_message(task, message_id: str) -> str:
    """Decide and store one accepted send; safe to run any number of times (what a
    batch that failed as a whole is split into, and what older web processes enqueue)."""
    return _store(task, [message_id])[0]


def _publish_batch(message_ids: list[str]) -> None:
    store_sends.apply_async(args=[message_ids], **_batch_publish_options)
    SEND_BATCH_SIZE.observe(len(message_ids))


def _count_lost_batch(message_ids: list[str], exc: BaseException) -> None:
    SEND_ENQUEUE_FAILURES.inc(len(message_ids))
    log.warning("could not enqueue %d sends, the sweeper will: %r", len(message_ids), exc)


# The process's batcher, made by `configure_send_batches` (from the settings, in
# init_celery); its thread starts on the first send.
_send_batcher: SendBatcher | None = None
# Options of every batch's publish. On Redis, no declaration of the direct queue: Celery
# sends a direct queue's task to the anonymous exchange, which kombu's Redis transport
# makes an LPUSH to the list named after the queue, with no lookup of the bindings a
# declaration writes; yet kombu binds a copy of the queue to the channel on every publish
# just to find it declared already (~0.15-0.19 ms of a ~0.7 ms `apply_async`, timed
# alone). RabbitMQ keeps it: a message for a queue not declared yet would be dropped.
_batch_publish_options: dict[str, Any] = {}


def configure_send_batches(*, window_ms: float, max_batch: int, declare_queue: bool) -> SendBatcher:
    """The process's batcher; `declare_queue=False` (Redis) publishes its tasks without
    declaring the direct queue each time."""
    global _send_batcher, _batch_publish_options
    _batch_publish_options = {} if declare_queue else {"declare": []}
    if _send_batcher is not None:
        _send_batcher.flush()
    _send_batcher = SendBatcher(
        _publish_batch,
        window=window_ms / 1000,
        max_batch=max_batch,
        broker_errors=BROKER_ERRORS,
        on_failure=_count_lost_batch,
    )
    return _send_batcher


def enqueue_send(message_id: uuid.UUID) -> None:
    """Hand a committed send to the workers, with the next batch. If the broker cannot
    take it, the send is safe in PostgreSQL as `queued` and the redispatch job enqueues
    it again within seconds of the broker coming back, so the failure is counted (by the
    batcher), not raised."""
    if _send_batcher is None:
        raise RuntimeError("enqueue_send before init_celery configured the send batches")
    _send_batcher.add(message_id)


def flush_sends() -> None:
    """Publish the sends this process still holds (at exit; tests that need them now)."""
    if _send_batcher is not None:
        _send_batcher.flush()


atexit.register(flush_sends)


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
