"""Direct messages: the send decision (pre-check in the API, authoritative in the
worker), storing a send exactly once, history, status and the sender's delete."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, case, exists, func, select, tuple_, update
from sqlalchemy.orm import Session, aliased

from app.events import append_events
from app.models import AuditLog, Conversation, Message, Participant, User
from app.policy import ALLOW, Decision, Policy
from app.problems import Forbidden, NotFound
from app.services.access import (
    actor,
    is_blocked,
    member_conversation,
    other_participants,
    parse_uuid,
)
from app.services.attachments import (
    attachments_of_messages,
    delete_with_messages,
    ready_attachments_for_event,
    rejected_attachments,
    release_attachments,
)
from app.storage import ObjectStore
from monitoring.metrics import MESSAGES

log = logging.getLogger(__name__)

# Names the messages of one sender: a retried send with the same client id gets the same id.
MESSAGE_ID_NAMESPACE = uuid.UUID("6b1f4f0e-2f55-4a55-9d38-5b6c1d1c8a11")


def message_id_for(sender_id: str, client_id: str) -> uuid.UUID:
    return uuid.uuid5(MESSAGE_ID_NAMESPACE, f"{sender_id}\x1f{client_id}")


def body_digest(body: str, attachment_ids: Sequence[uuid.UUID] = ()) -> str:
    """What a retried send must repeat to be the same send: its body and attachments
    (a send without attachments digests as it did before they existed)."""
    content = body if not attachment_ids else "\x1f".join([body, *map(str, attachment_ids)])
    return hashlib.sha256(content.encode()).hexdigest()


def decide_send(
    session: Session,
    policy: Policy,
    sender: User,
    conversation_id: uuid.UUID,
    body: str,
    attachment_count: int = 0,
) -> Decision:
    """May `sender` send `body` (with this many attachments) in this conversation? The
    API's pre-check and the worker's authoritative check both ask this."""
    body_check = policy.check_body(body, attachment_count)
    if not body_check:
        return body_check
    for recipient in other_participants(session, conversation_id, sender.id):
        decision = policy.may_reply(
            actor(sender),
            actor(recipient),
            blocked_by_recipient=is_blocked(session, recipient.id, sender.id),
        )
        if not decision:
            return decision
    return ALLOW


@dataclass(frozen=True, slots=True)
class StoreResult:
    message_id: uuid.UUID
    outcome: str  # "stored", "rejected", "duplicate" (decided before) or "missing"


# The send as the API recorded it, read without a lock (to learn its conversation).
_QUEUED_SEND = select(Message.conversation_id, Message.status, Message.attachment_count).where(
    Message.id == bindparam("message_id")
)


def store_message(
    session: Session,
    policy: Policy,
    message_id: str | uuid.UUID,
    *,
    check_attachments: Callable[[uuid.UUID], object] | None = None,
) -> StoreResult:
    """Decide one accepted send and store (or reject) it, exactly once however often
    it is run.

    In one transaction: lock the conversation (sends, reads and deletes in one
    conversation take turns, always conversation first, then participants, then the
    users' event sequences, so no two paths wait on each other in opposite orders),
    claim the queued row, re-check the policy, mark the message stored at the time the
    API accepted it, move the conversation's activity, bump the unread counts of the
    recipients who have not read past it and append the events.
    """
    message_id = uuid.UUID(str(message_id))
    found = session.execute(_QUEUED_SEND, {"message_id": message_id}).first()
    if found is None:
        # Its conversation was deleted with it; nothing is waiting for a decision.
        MESSAGES.labels("missing").inc()
        return StoreResult(message_id, "missing")
    if found.status != "queued":
        MESSAGES.labels("duplicate").inc()
        return StoreResult(message_id, "duplicate")
    if found.attachment_count and check_attachments is not None:
        # Downloading and decoding images takes a while: done before any lock is taken,
        # so other sends in the conversation do not wait for it.
        check_attachments(message_id)

    conversation = session.scalars(
        select(Conversation).where(Conversation.id == found.conversation_id).with_for_update()
    ).one()
    message = session.scalars(
        select(Message).where(Message.id == message_id).with_for_update()
    ).one()
    if message.status != "queued":
        # Another worker decided it while we waited for the conversation's lock.
        MESSAGES.labels("duplicate").inc()
        return StoreResult(message_id, "duplicate")

    sender = session.get_one(User, message.sender_id)
    if session.get(Participant, (conversation.id, sender.id)) is None:
        decision = Decision(False, "conversation_not_found", "You are not in this conversation.")
    else:
        decision = decide_send(
            session, policy, sender, conversation.id, message.body or "", message.attachment_count
        )
    if decision and message.attachment_count:
        # The worker checked the bytes before taking these locks (check_message_attachments).
        failed = rejected_attachments(session, message.id)
        if failed:
            decision = Decision(
                False,
                "attachment_invalid",
                "; ".join(f"Attachment {item['id']}: {item['reason']}" for item in failed),
            )
    if not decision:
        _reject(session, message, decision)
        return StoreResult(message_id, "rejected")

    now = message.created_at
    message.status = "stored"
    message.expires_at = policy.message_expiry(now, sender.tier)
    message.decided_at = session.scalar(select(func.clock_timestamp()))
    session.flush()

    # Sends can be stored out of their acceptance order (workers run side by side), so
    # "latest" and "unread" compare positions rather than trusting arrival order.
    if conversation.last_message_id is None or conversation.last_activity_at <= now:
        conversation.last_activity_at = now
        conversation.last_message_id = message.id
    position = tuple_(message.created_at, message.id)
    unread_for_recipient = case(
        (Participant.user_id == sender.id, 0),
        (Participant.last_read_at.is_(None), 1),
        (tuple_(Participant.last_read_at, Participant.last_read_message_id) < position, 1),
        else_=0,
    )
    # One statement: if a concurrent read moved a read position first, PostgreSQL
    # re-evaluates this against the updated row, so the count stays exact.
    recipients = session.scalars(
        update(Participant)
        .where(Participant.conversation_id == conversation.id)
        .values(
            last_activity_at=func.greatest(Participant.last_activity_at, now),
            unread_count=Participant.unread_count + unread_for_recipient,
        )
        .returning(Participant.user_id)
    ).all()
    attachments = (
        ready_attachments_for_event(session, message.id) if message.attachment_count else []
    )
    append_events(
        session,
        recipients,
        "message.created",
        message_json(message, attachments) | {"accepted_at": now.isoformat()},
    )
    MESSAGES.labels("stored").inc()
    return StoreResult(message_id, "stored")


def _reject(session: Session, message: Message, decision: Decision) -> None:
    """The send ends rejected: its body goes, the reason stays, the sender is told."""
    message.status, message.body = "rejected", None
    message.rejection_reason = decision.rule
    message.decided_at = session.scalar(select(func.clock_timestamp()))
    data = {
        "id": str(message.id),
        "conversation_id": str(message.conversation_id),
        "client_id": message.client_id,
        "reason": decision.rule,
        "message": decision.reason,
    }
    if message.attachment_count:
        if decision.rule == "attachment_invalid":
            data["attachments"] = rejected_attachments(session, message.id)
        release_attachments(session, message.id)
    append_events(session, [message.sender_id], "message.rejected", data)
    MESSAGES.labels("rejected").inc()


def reject_send(session: Session, message_id: str | uuid.UUID, decision: Decision) -> bool:
    """Reject an accepted send that can never be stored (its task failed for good, or
    it was re-enqueued too often). False if it was decided already."""
    message = session.scalars(
        select(Message)
        .where(Message.id == uuid.UUID(str(message_id)), Message.status == "queued")
        .with_for_update()
    ).first()
    if message is None:
        return False
    _reject(session, message, decision)
    return True


def visible_message(session: Session, user: User, message_id: str) -> Message:
    """A message in one of the user's conversations (a queued or rejected one only to
    its sender)."""
    message = session.scalars(
        select(Message)
        .join(Participant, Participant.conversation_id == Message.conversation_id)
        .where(
            Message.id == parse_uuid(message_id, "message"),
            Message.tenant_id == user.tenant_id,
            Participant.user_id == user.id,
        )
    ).first()
    # Until it is stored, a send is its sender's business alone.
    if message is None or (message.status != "stored" and message.sender_id != user.id):
        raise NotFound("No such message.", code="message_not_found")
    return message


def _history_query(variant: str) -> Select:
    """A page of a conversation's messages, newest first, for one of its members: one
    query, rows rather than ORM objects; built once per variant ("first" page or the
    page "before" a message), values bound at execution."""
    member = exists().where(
        Participant.conversation_id == Message.conversation_id,
        Participant.user_id == bindparam("user_id"),
    )
    query = (
        select(*Message.__table__.c)
        .where(
            Message.conversation_id == bindparam("conversation_id"),
            Message.tenant_id == bindparam("tenant_id"),
            Message.status == "stored",
            member,
        )
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(bindparam("limit"))
    )
    if variant == "before":
        anchor = aliased(Message)
        query = query.join(
            anchor,
            (anchor.id == bindparam("before"))
            & (anchor.conversation_id == Message.conversation_id),
        ).where(tuple_(Message.created_at, Message.id) < tuple_(anchor.created_at, anchor.id))
    return query


_HISTORY_QUERIES = {variant: _history_query(variant) for variant in ("first", "before")}


def history(
    session: Session,
    user: User,
    conversation_id: str,
    *,
    limit: int,
    before: str | None,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """Messages newest first; `before` is a message id (the previous page's `next_cursor`)."""
    values: dict[str, Any] = {
        "conversation_id": parse_uuid(conversation_id, "conversation"),
        "user_id": user.id,
        "tenant_id": user.tenant_id,
        "limit": limit + 1,
    }
    if before:
        values["before"] = parse_uuid(before, "message")
    rows = session.execute(_HISTORY_QUERIES["before" if before else "first"], values).all()
    if not rows:
        # Nothing to show: say why if it is not simply an empty page.
        conversation, _ = member_conversation(session, user, conversation_id)
        if (
            before
            and session.scalar(
                select(Message.id).where(
                    Message.id == values["before"], Message.conversation_id == conversation.id
                )
            )
            is None
        ):
            raise NotFound(
                "before: no such message in this conversation.", code="message_not_found"
            )
    page = rows[:limit]
    attachments = attachments_of_messages(session, store, page)
    return {
        "items": [message_json(row, attachments.get(row.id)) for row in page],
        "next_cursor": str(page[-1].id) if len(rows) > limit else None,
    }


def delete_own_message(session: Session, user: User, message_id: str) -> Message:
    """The sender soft-deletes their message: its body goes, a placeholder stays."""
    message = visible_message(session, user, message_id)
    if message.sender_id != user.id:
        raise Forbidden("Only the sender may delete a message.", code="not_sender")
    if message.status != "stored":
        raise NotFound("No such message.", code="message_not_found")
    return soft_delete_message(session, message.id, reason="deleted_by_sender", actor_id=user.id)


def soft_delete_message(
    session: Session,
    message_id: uuid.UUID,
    *,
    reason: str,
    actor_id: str | None,
    audit_detail: dict[str, Any] | None = None,
) -> Message:
    """Remove a stored message's body for everyone, leaving a placeholder that carries
    `reason` (`deleted_by_sender`, `removed_by_moderator`, `expired`, ...): unread counts
    of recipients who had not read it go down by one, every participant gets a
    `message.deleted` event, and an audit row says who (`actor_id`, None for the system)
    did it and why. Deleting a deleted message changes nothing.

    Locks in the order every path uses: the conversation, then the message, then (in
    `append_events`) the users' event sequences.
    """
    conversation_id = session.scalar(
        select(Message.conversation_id).where(Message.id == message_id)
    )
    session.execute(
        select(Conversation.id).where(Conversation.id == conversation_id).with_for_update()
    )
    message = session.scalars(
        select(Message).where(Message.id == message_id).with_for_update()
    ).one()
    if message.deleted_at is not None or message.status != "stored":
        return message
    now = session.scalar(select(func.clock_timestamp()))
    message.deleted_at, message.deleted_by = now, actor_id
    message.delete_reason, message.body = reason, None
    if message.attachment_count:
        delete_with_messages(session, [message.id])
    # Recipients who had not read it yet have one unread message fewer.
    session.execute(
        update(Participant)
        .where(
            Participant.conversation_id == message.conversation_id,
            Participant.user_id != message.sender_id,
            Participant.unread_count > 0,
            (Participant.last_read_at.is_(None))
            | (
                tuple_(Participant.last_read_at, Participant.last_read_message_id)
                < tuple_(message.created_at, message.id)
            ),
        )
        .values(unread_count=Participant.unread_count - 1)
    )
    session.add(
        AuditLog(
            tenant_id=message.tenant_id,
            actor_id=actor_id,
            action="message.deleted",
            target_type="message",
            target_id=str(message.id),
            detail={"reason": reason} | (audit_detail or {}),
        )
    )
    recipients = session.scalars(
        select(Participant.user_id).where(Participant.conversation_id == message.conversation_id)
    ).all()
    append_events(session, recipients, "message.deleted", message_json(message))
    return message


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def message_with_attachments(
    session: Session, store: ObjectStore | None, message: Message, viewer: User
) -> dict[str, Any]:
    """One message as the API shows it, its attachments signed for `viewer` (the sender
    of a rejected send also sees the attachments that were refused, and why)."""
    attachments = attachments_of_messages(
        session, store, [message], include_unready=message.sender_id == viewer.id
    )
    return message_json(message, attachments.get(message.id))


def message_json(message: Any, attachments: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A message (an ORM object or a row of its columns) as the API shows it, with its
    `attachments` as given (see app/services/attachments.py; [] for none)."""
    deleted = None
    if message.deleted_at is not None:
        deleted = {"at": _iso(message.deleted_at), "reason": message.delete_reason}
    data: dict[str, Any] = {
        "id": str(message.id),
        "conversation_id": str(message.conversation_id),
        "sender_id": message.sender_id,
        "client_id": message.client_id,
        "status": message.status,
        "body": message.body if message.deleted_at is None else None,
        "created_at": _iso(message.created_at),
        "expires_at": _iso(message.expires_at),
        "deleted": deleted,
        "attachments": attachments if attachments and message.deleted_at is None else [],
    }
    if message.status == "rejected":
        data["reason"] = message.rejection_reason
    return data
