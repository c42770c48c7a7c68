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
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, and_, bindparam, exists, func, select, text
from sqlalchemy.dialects.postgresql import aggregate_order_by, insert
from sqlalchemy.orm import Session

from app.db import after_commit
from app.models import Block, Conversation, Message, Participant, User
from app.policy import Actor, Decision, Policy
from app.problems import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from app.services.access import is_uuid_text
from app.services.attachments import check_attachment_ids, check_for_send, claim_for_send
from app.services.messages import (
    body_digest,
    decide_for_recipients,
    message_id_for,
    reject_send,
)
from app.statements import DriverStatement, is_autocommit
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


class SenderIdentity(Protocol):
    """Who sends: a `User`, or the verified token's user and tenant (`SenderRef`): the
    API's send loads no `User`, whether the user is provisioned is part of the pre-check."""

    @property
    def id(self) -> str: ...

    @property
    def tenant_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class SenderRef:
    """The sender as the token names them: user id and tenant id, not yet looked up."""

    id: str
    tenant_id: str


@dataclass(frozen=True, slots=True)
class EarlierSend:
    """The send already recorded under this message id (same sender and client id)."""

    conversation_id: uuid.UUID
    body_sha256: str
    status: str


@dataclass(frozen=True, slots=True)
class SendFacts:
    """What the pre-check query found, as plain data for `judge_send`."""

    sender: Actor | None  # None: no such user in the token's tenant
    is_member: bool  # the sender takes part in the conversation, in their tenant
    recipients: tuple[Actor, ...]  # the conversation's other participants
    blocked_by: frozenset[str]  # the recipients' ids who blocked the sender
    earlier: EarlierSend | None


@dataclass(frozen=True, slots=True)
class SendVerdict:
    """A send the pre-check lets through: its checked attachments and digest, and where an
    earlier send with the same id stands (None: a new send, to be recorded now)."""

    attachments: list[uuid.UUID]
    digest: str
    repeat_status: str | None


def refusal(decision: Decision) -> ApiError:
    """The HTTP error for a refused decision: 413 too long, 400 bad body, else 403."""
    if decision.rule == "message_too_long":
        return PayloadTooLarge(decision.reason, code="message_too_long")
    if decision.rule in ("empty_message", "too_many_attachments"):
        return BadRequest(decision.reason, code=decision.rule)
    return Forbidden(decision.reason, code=decision.rule or "forbidden")


def _repeat_status(earlier: EarlierSend, conversation_id: uuid.UUID, digest: str) -> str:
    """Where an earlier send with this id stands; 409 if it was another message."""
    if (earlier.conversation_id, earlier.body_sha256) != (conversation_id, digest):
        raise Conflict(
            "This client_id was already used for another message.", code="client_id_reused"
        )
    return earlier.status


def judge_send(
    policy: Policy,
    facts: SendFacts,
    conversation_id: uuid.UUID | None,
    body: str,
    attachment_ids: Sequence[str] = (),
) -> SendVerdict:
    """The API's pre-check of a send from what the query found, pure. Raises in the order
    the API has always answered: 401 `unknown_user`, 404 `conversation_not_found`, the
    attachment ids' 403/400, 409 `client_id_reused`, then the policy's `refusal()`. A repeat
    of an earlier send is not decided again (it was when first accepted)."""
    if facts.sender is None:
        raise Unauthorized("The token's user is not known in its tenant.", code="unknown_user")
    if conversation_id is None or not facts.is_member:
        raise NotFound("No such conversation.", code="conversation_not_found")
    attachments = check_attachment_ids(policy, attachment_ids)
    digest = body_digest(body, attachments)
    if facts.earlier is not None:
        return SendVerdict(
            attachments, digest, _repeat_status(facts.earlier, conversation_id, digest)
        )
    # The worker's own decision function, so the pre-check and the authoritative check
    # cannot drift apart (body first, then each recipient in id order, first refusal wins).
    decision = decide_for_recipients(
        policy, facts.sender, facts.recipients, facts.blocked_by, body, len(attachments)
    )
    if not decision:
        raise refusal(decision)
    return SendVerdict(attachments, digest, None)


# The statements of the send path, built once (Core on the tables, no ORM entities, so
# executing one is a cache look-up and the driver call); values are bound at execution.
_users = User.__table__
_participants = Participant.__table__
_conversations = Conversation.__table__
_blocks = Block.__table__
_messages = Message.__table__

_sender_row = _users.alias("sender")
_earlier_row = _messages.alias("earlier")
_other_user = _users.alias("other")


def _recipient_array(column: ColumnElement[Any]) -> ColumnElement[Any]:
    # Every array in the same (id) order, so index i of each describes one recipient.
    return func.array_agg(aggregate_order_by(column, _other_user.c.id))


# The conversation's other participants and whether each blocked the sender, aggregated:
# an aggregate without GROUP BY is exactly one row (arrays NULL when there is nobody),
# the row the sender and the earlier send are outer-joined to.
_recipients = (
    select(
        _recipient_array(_other_user.c.id).label("ids"),
        _recipient_array(_other_user.c.tenant_id).label("tenant_ids"),
        _recipient_array(_other_user.c.role).label("roles"),
        _recipient_array(_other_user.c.tier).label("tiers"),
        _recipient_array(_blocks.c.blocker_id.is_not(None)).label("blocked"),
    )
    .select_from(
        _participants.join(_other_user, _other_user.c.id == _participants.c.user_id).outerjoin(
            _blocks,
            and_(
                _blocks.c.blocker_id == _other_user.c.id,
                _blocks.c.blocked_id == bindparam("sender_id"),
            ),
        )
    )
    .where(
        _participants.c.conversation_id == bindparam("conversation_id"),
        _participants.c.user_id != bindparam("sender_id"),
    )
    .subquery("recipients")
)
_is_member = exists().where(
    _participants.c.conversation_id == bindparam("conversation_id"),
    _participants.c.user_id == bindparam("sender_id"),
    _conversations.c.id == _participants.c.conversation_id,
    _conversations.c.tenant_id == bindparam("tenant_id"),
)
# The whole pre-check in one round trip: the sender (in the token's tenant), membership of
# the conversation (in that tenant), the recipients with their blocks, the earlier send.
_PRECHECK = select(
    _sender_row.c.role.label("sender_role"),
    _sender_row.c.tier.label("sender_tier"),
    _is_member.label("is_member"),
    _earlier_row.c.conversation_id.label("earlier_conversation_id"),
    _earlier_row.c.body_sha256.label("earlier_body_sha256"),
    _earlier_row.c.status.label("earlier_status"),
    _recipients,
).select_from(
    _recipients.outerjoin(
        _sender_row,
        and_(
            _sender_row.c.id == bindparam("sender_id"),
            _sender_row.c.tenant_id == bindparam("tenant_id"),
        ),
    ).outerjoin(_earlier_row, _earlier_row.c.id == bindparam("message_id"))
)

_EARLIER_SEND = select(
    _messages.c.conversation_id, _messages.c.body_sha256, _messages.c.status
).where(_messages.c.id == bindparam("message_id"))

# ON CONFLICT DO NOTHING RETURNING: one atomic statement, so a send without attachments
# needs no transaction around it; nothing returned means a concurrent twin got there first.
_INSERT_SEND = (
    insert(_messages)
    .values(
        id=bindparam("message_id"),
        tenant_id=bindparam("tenant_id"),
        conversation_id=bindparam("conversation_id"),
        sender_id=bindparam("sender_id"),
        client_id=bindparam("client_id"),
        body=bindparam("body"),
        body_sha256=bindparam("body_sha256"),
        status="queued",
        created_at=func.clock_timestamp(),
        attachment_count=bindparam("attachment_count"),
    )
    .on_conflict_do_nothing(index_elements=["sender_id", "client_id"])
    .returning(_messages.c.id)
)


# Run by the driver (app/statements.py): half the client CPU of SQLAlchemy's execution.
_PRECHECK_ON_DRIVER = DriverStatement(_PRECHECK, label="send pre-check")
_INSERT_SEND_ON_DRIVER = DriverStatement(_INSERT_SEND, label="send insert")
_EARLIER_SEND_ON_DRIVER = DriverStatement(_EARLIER_SEND, label="earlier send")


def load_send_facts(
    connection: Connection,
    sender: SenderIdentity,
    conversation_id: uuid.UUID | None,
    message_id: uuid.UUID,
) -> SendFacts:
    """Everything the pre-check needs, in one statement (`conversation_id` None: a
    malformed id, which matches no conversation)."""
    row = _PRECHECK_ON_DRIVER.one(
        connection,
        {
            "tenant_id": sender.tenant_id,
            "sender_id": sender.id,
            "conversation_id": conversation_id,
            "message_id": message_id,
        },
    )
    actor = (
        None
        if row.sender_role is None
        else Actor(
            id=sender.id, tenant_id=sender.tenant_id, role=row.sender_role, tier=row.sender_tier
        )
    )
    ids = row.ids or ()
    recipients = tuple(
        Actor(id=user_id, tenant_id=tenant_id, role=role, tier=tier)
        for user_id, tenant_id, role, tier in zip(
            ids, row.tenant_ids or (), row.roles or (), row.tiers or (), strict=True
        )
    )
    blocked_by = frozenset(
        user_id for user_id, blocked in zip(ids, row.blocked or (), strict=True) if blocked
    )
    earlier = (
        None
        if row.earlier_status is None
        else EarlierSend(row.earlier_conversation_id, row.earlier_body_sha256, row.earlier_status)
    )
    return SendFacts(actor, bool(row.is_member), recipients, blocked_by, earlier)


def accept_send(
    session: Session,
    policy: Policy,
    sender: SenderIdentity,
    conversation_id: str | uuid.UUID,
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
    (and no second row); with another body, attachments or conversation it is a 409.

    The insert and the attachments' claim commit together, so this needs a
    transactional session when there are attachments; a send without any is cheaper
    through `accept_plain_send`."""
    connection = session.connection()
    if attachment_ids and is_autocommit(connection):
        raise RuntimeError("a send with attachments needs a transaction, not autocommit")
    accepted, needs_enqueue = _record_send(
        connection,
        policy,
        sender,
        conversation_id,
        body,
        client_id,
        attachment_ids,
        # They read the sender's id and tenant id only, which a `SenderRef` carries.
        before_insert=lambda message_id, attachments: check_for_send(
            session, store, sender, message_id, attachments
        ),
        after_insert=lambda message_id, attachments: claim_for_send(
            session, message_id, attachments
        ),
    )
    if needs_enqueue:
        after_commit(session, lambda: enqueue(accepted.message_id))
    return accepted


def accept_plain_send(
    connection: Connection,
    policy: Policy,
    sender: SenderIdentity,
    conversation_id: str | uuid.UUID,
    body: str,
    client_id: str,
    enqueue: Callable[[uuid.UUID], None],
) -> AcceptedSend:
    """`accept_send` for a send without attachments, on an autocommit connection: two
    statements, the pre-check and the insert, each atomic on its own, and no BEGIN,
    COMMIT or ORM session around them. The row is committed when the insert returns,
    so `enqueue` runs right away."""
    if not is_autocommit(connection):
        raise RuntimeError("accept_plain_send needs an autocommit connection")
    accepted, needs_enqueue = _record_send(
        connection, policy, sender, conversation_id, body, client_id, ()
    )
    if needs_enqueue:
        enqueue(accepted.message_id)
    return accepted


AttachmentStep = Callable[[uuid.UUID, list[uuid.UUID]], None]


def _record_send(
    connection: Connection,
    policy: Policy,
    sender: SenderIdentity,
    conversation_id: str | uuid.UUID,
    body: str,
    client_id: str,
    attachment_ids: Sequence[str],
    *,
    before_insert: AttachmentStep | None = None,
    after_insert: AttachmentStep | None = None,
) -> tuple[AcceptedSend, bool]:
    """The pre-check and the insert of `accept_send` and `accept_plain_send`: the send as
    accepted, and whether it is (still) queued and so wants enqueueing once committed.
    The attachment steps run only for a new send with attachments."""
    conversation_uuid = _conversation_uuid(conversation_id)
    message_id = message_id_for(sender.id, client_id)
    facts = load_send_facts(connection, sender, conversation_uuid, message_id)
    verdict = judge_send(policy, facts, conversation_uuid, body, attachment_ids)
    assert conversation_uuid is not None  # judge_send answers 404 otherwise
    if verdict.repeat_status is not None:
        return _repeat(message_id, verdict.repeat_status)
    if verdict.attachments and before_insert is not None:
        before_insert(message_id, verdict.attachments)
    inserted = _INSERT_SEND_ON_DRIVER.first(
        connection,
        {
            "message_id": message_id,
            "tenant_id": sender.tenant_id,
            "conversation_id": conversation_uuid,
            "sender_id": sender.id,
            "client_id": client_id,
            "body": body,
            "body_sha256": verdict.digest,
            "attachment_count": len(verdict.attachments),
        },
    )
    if inserted is None:
        # A concurrent request with the same client id got there first; READ COMMITTED
        # (or autocommit) shows the committed row that conflicted.
        found = _EARLIER_SEND_ON_DRIVER.first(connection, {"message_id": message_id})
        if found is None:
            raise RuntimeError(f"send {message_id} conflicted with a row it cannot see")
        earlier = EarlierSend(found.conversation_id, found.body_sha256, found.status)
        return _repeat(message_id, _repeat_status(earlier, conversation_uuid, verdict.digest))
    if verdict.attachments and after_insert is not None:
        after_insert(message_id, verdict.attachments)
    return AcceptedSend(message_id, "queued"), True


def _conversation_uuid(conversation_id: str | uuid.UUID) -> uuid.UUID | None:
    """The path's conversation id as a UUID; None when malformed, so that the pre-check
    still runs and an unknown user hears 401 before the 404."""
    if isinstance(conversation_id, uuid.UUID):
        return conversation_id
    if not isinstance(conversation_id, str) or not is_uuid_text(conversation_id):
        return None
    return uuid.UUID(conversation_id)


def _repeat(message_id: uuid.UUID, status: str) -> tuple[AcceptedSend, bool]:
    # Still queued: enqueue it again, the client may be retrying because the first
    # enqueue was lost.
    return AcceptedSend(message_id, status), status == "queued"


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
