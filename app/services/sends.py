"""Accepting a send durably, and bringing every accepted send to a decision.

The API does not decide a send, but its 202 is a promise. So before answering it
writes the send as a `messages` row with status `queued` (a transactional outbox
in PostgreSQL, committed with the request) and enqueues the worker's task only
after that commit. Whatever dies afterwards (the broker losing the task, a worker
killed between popping and acknowledging it, Redis restarting without its data)
the row is still there, and `redispatch_stale_sends`, run by beat every few
seconds, enqueues again any send no worker has decided. Storing is idempotent
(the worker claims the row while `queued`), so a send enqueued twice is stored once.

A send that can never be stored ends `rejected` with a reason and a
`message.rejected` event: by the worker's policy check, by a task failure that
cannot succeed (`reject_send`), or after `MAX_DISPATCHES` re-enqueues.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db import after_commit
from app.models import Message, User
from app.policy import Decision, Policy
from app.problems import ApiError, BadRequest, Conflict, Forbidden, PayloadTooLarge
from app.services.access import member_conversation
from app.services.attachments import check_attachment_ids, check_for_send, claim_for_send
from app.services.messages import body_digest, decide_send, message_id_for, reject_send
from app.storage import ObjectStore
from monitoring.metrics import SENDS_REDISPATCHED

# A send still queued this long after it was accepted (or last re-enqueued) is enqueued
# again. The first FREE_RETRIES re-enqueues come at that pace (an attempt made while the
# broker was restarting is lost with it, and must not slow recovery); each later one
# waits twice as long as the one before, up to 2**MAX_BACKOFF_DOUBLINGS times.
STALE_AFTER = timedelta(seconds=5)
FREE_RETRIES = 3
MAX_BACKOFF_DOUBLINGS = 5
# After this many re-enqueues (about an hour and a half with the backoff) the send is rejected.
MAX_DISPATCHES = 24
SWEEP_BATCH = 500


@dataclass(frozen=True, slots=True)
class AcceptedSend:
    message_id: uuid.UUID
    status: str  # "queued" for a new send; a repeat answers with where it stands


def refusal(decision: Decision) -> ApiError:
    """The HTTP error for a refused decision: 413 too long, 400 bad body, else 403."""
    if decision.rule == "message_too_long":
        return PayloadTooLarge(decision.reason, code="message_too_long")
    if decision.rule in ("empty_message", "too_many_attachments"):
        return BadRequest(decision.reason, code=decision.rule)
    return Forbidden(decision.reason, code=decision.rule or "forbidden")


_EARLIER_SEND = select(Message.conversation_id, Message.body_sha256, Message.status).where(
    Message.id == bindparam("message_id")
)


def accept_send(
    session: Session,
    policy: Policy,
    sender: User,
    conversation_id: str,
    body: str,
    client_id: str,
    enqueue: Callable[[uuid.UUID], None],
    *,
    attachment_ids: Sequence[str] = (),
    store: ObjectStore | None = None,
) -> AcceptedSend:
    """Check a send the cheap way and record it as queued, with the sender's uploads
    in `attachment_ids` claimed for it; `enqueue(message_id)` runs after the caller
    commits. The same client id with the same body and attachments gives the same id
    (and no second row); with another body, attachments or conversation it is a 409."""
    conversation, _ = member_conversation(session, sender, conversation_id)
    attachments = check_attachment_ids(policy, attachment_ids)
    message_id = message_id_for(sender.id, client_id)
    digest = body_digest(body, attachments)

    def earlier_send() -> AcceptedSend | None:
        earlier = session.execute(_EARLIER_SEND, {"message_id": message_id}).first()
        if earlier is None:
            return None
        if (earlier.conversation_id, earlier.body_sha256) != (conversation.id, digest):
            raise Conflict(
                "This client_id was already used for another message.", code="client_id_reused"
            )
        if earlier.status == "queued":
            # The client may be retrying because the first enqueue was lost.
            after_commit(session, lambda: enqueue(message_id))
        return AcceptedSend(message_id, earlier.status)

    if (repeat := earlier_send()) is not None:
        return repeat
    decision = decide_send(session, policy, sender, conversation.id, body, len(attachments))
    if not decision:
        raise refusal(decision)
    check_for_send(session, store, sender, message_id, attachments)
    inserted = session.execute(
        insert(Message)
        .values(
            id=message_id,
            tenant_id=sender.tenant_id,
            conversation_id=conversation.id,
            sender_id=sender.id,
            client_id=client_id,
            body=body,
            body_sha256=digest,
            status="queued",
            created_at=func.clock_timestamp(),
            attachment_count=len(attachments),
        )
        .on_conflict_do_nothing(index_elements=["sender_id", "client_id"])
        .returning(Message.id)
    ).first()
    if inserted is None:
        # A concurrent request with the same client id got there first.
        repeat = earlier_send()
        if repeat is None:  # READ COMMITTED shows the committed row that conflicted
            raise RuntimeError(f"send {message_id} conflicted with a row it cannot see")
        return repeat
    claim_for_send(session, message_id, attachments)
    after_commit(session, lambda: enqueue(message_id))
    return AcceptedSend(message_id, "queued")


# Claims stale queued rows of an outbox table (`messages`, `broadcasts`: both have status,
# created_at, dispatched_at and dispatch_count) and counts the attempt, in one statement.
# SKIP LOCKED passes over a row a worker is deciding right now (it holds the row), and
# over rows another sweeper claimed, so two sweepers never enqueue the same row twice.
_CLAIM_STALE = """
    UPDATE {table} AS t
    SET dispatched_at = clock_timestamp(), dispatch_count = t.dispatch_count + 1
    FROM (
        SELECT id FROM {table}
        WHERE status = 'queued'
          AND COALESCE(dispatched_at, created_at) < clock_timestamp()
              - make_interval(secs => :stale_seconds
                  * power(2, GREATEST(0, LEAST(dispatch_count - :free_retries, :doublings))))
        ORDER BY created_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    ) AS stale
    WHERE t.id = stale.id
    RETURNING t.id, t.dispatch_count
"""
_CLAIM_STALE_BY_TABLE = {
    table: text(_CLAIM_STALE.format(table=table)) for table in ("messages", "broadcasts")
}


def claim_stale(
    session: Session, table: str, stale_after: timedelta
) -> list[tuple[uuid.UUID, int]]:
    """Queued rows of outbox `table` no worker decided in time, with how often each has
    now been dispatched; the caller enqueues them again or gives up on them."""
    rows = session.execute(
        _CLAIM_STALE_BY_TABLE[table],
        {
            "stale_seconds": stale_after.total_seconds(),
            "doublings": MAX_BACKOFF_DOUBLINGS,
            "free_retries": FREE_RETRIES,
            "batch": SWEEP_BATCH,
        },
    ).all()
    return [(row[0], row[1]) for row in rows]


def redispatch_stale_sends(
    session: Session, enqueue: Callable[[uuid.UUID], None], *, stale_after: timedelta = STALE_AFTER
) -> int:
    """Enqueue again (after commit) every accepted send no worker has decided in time;
    reject those that have been tried `MAX_DISPATCHES` times. Returns how many it touched."""
    claimed = claim_stale(session, "messages", stale_after)
    retry = []
    for message_id, dispatch_count in claimed:
        if dispatch_count > MAX_DISPATCHES:
            reject_send(
                session,
                message_id,
                Decision(False, "delivery_failed", "The message could not be stored; send again."),
            )
            SENDS_REDISPATCHED.labels("gave_up").inc()
        else:
            retry.append(message_id)
    if retry:
        SENDS_REDISPATCHED.labels("enqueued").inc(len(retry))

        def enqueue_all() -> None:
            for message_id in retry:
                enqueue(message_id)

        after_commit(session, enqueue_all)
    return len(claimed)


def oldest_queued_age_seconds(session: Session) -> tuple[int, float]:
    """How many sends wait for a worker, and how long the oldest has waited."""
    count, age = session.execute(
        select(
            func.count(),
            func.coalesce(
                func.extract("epoch", func.clock_timestamp() - func.min(Message.created_at)), 0
            ),
        ).where(Message.status == "queued")
    ).one()
    return int(count), float(age)
