"""Direct messages: the send decision (pre-check in the API, authoritative in the
worker), storing a send exactly once, history, status and the sender's delete."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, exists, func, select, text, tuple_, update
from sqlalchemy.orm import Session, aliased

from app.events import EventGroup, append_event_groups, append_events
from app.models import AuditLog, Conversation, Message, Participant, User
from app.policy import ALLOW, Actor, Decision, Policy
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
from app.statements import DriverStatement
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
    """May `sender` send `body` (with this many attachments) in this conversation?
    Loads the other participants and their blocks, then asks `decide_for_recipients`."""
    recipients = other_participants(session, conversation_id, sender.id)
    blocked_by = {r.id for r in recipients if is_blocked(session, r.id, sender.id)}
    return decide_for_recipients(
        policy, actor(sender), [actor(r) for r in recipients], blocked_by, body, attachment_count
    )


def decide_for_recipients(
    policy: Policy,
    sender: Actor,
    recipients: Sequence[Actor],
    blocked_by: Collection[str],
    body: str,
    attachment_count: int = 0,
) -> Decision:
    """The send decision from plain data: the body's shape first, then each other
    participant in id order (`blocked_by`: the ids of those who blocked the sender).
    The first refusal wins, so the reason a sender sees does not depend on who asks."""
    body_check = policy.check_body(body, attachment_count)
    if not body_check:
        return body_check
    for recipient in sorted(recipients, key=lambda r: r.id):
        decision = policy.may_reply(
            sender, recipient, blocked_by_recipient=recipient.id in blocked_by
        )
        if not decision:
            return decision
    return ALLOW


@dataclass(frozen=True, slots=True)
class StoreResult:
    message_id: uuid.UUID
    outcome: str  # "stored", "rejected", "duplicate" (decided before) or "missing"


NOT_A_MEMBER = Decision(False, "conversation_not_found", "You are not in this conversation.")

# The batch store's statements, built once; values are bound at execution. Arrays are
# passed whole (`= ANY`, `unnest`), so a batch of any size is the same few round trips.
#
# Which of the sends still wait, and in which conversations (read without a lock); and,
# in the same round trip, those conversations locked in id order, as _LOCK_CONVERSATIONS
# does, unless a send still waiting has attachments. Their bytes are checked before any
# lock is taken (it takes a while), and the lock follows, by _LOCK_CONVERSATIONS. A
# conversation locked here comes back with every send of the batch in it
# (`locked_id` set); MATERIALIZED keeps the locking query whole, run once.
_QUEUED_SENDS_LOCKING = text(
    """
    WITH batch AS (
        SELECT id, conversation_id, status, attachment_count FROM messages
        WHERE id = ANY(CAST(:ids AS uuid[]))
    ), locked AS MATERIALIZED (
        SELECT id, last_message_id, last_activity_at FROM conversations
        WHERE id IN (SELECT conversation_id FROM batch WHERE status = 'queued')
          AND NOT EXISTS (
              SELECT 1 FROM batch WHERE status = 'queued' AND attachment_count > 0)
        ORDER BY id FOR UPDATE
    )
    SELECT b.id, b.conversation_id, b.status, b.attachment_count,
           l.id AS locked_id, l.last_message_id, l.last_activity_at
    FROM batch AS b LEFT JOIN locked AS l ON l.id = b.conversation_id
    """
)
# The conversations, locked in id order (every path locks a conversation before its
# messages, participants and users' sequences, so no two wait on each other in turn).
_LOCK_CONVERSATIONS = text(
    """
    SELECT id, last_message_id, last_activity_at FROM conversations
    WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY id FOR UPDATE
    """
)
# The sends still queued, claimed, with what deciding them needs: the sender, the
# conversation's members (read after its lock is held, so as they are now) and which of
# them blocked the sender.
_CLAIM_SENDS = text(
    """
    SELECT m.id, m.conversation_id, m.sender_id, m.client_id, m.body, m.created_at,
           m.attachment_count, u.tenant_id, u.role, u.tier,
           ARRAY(SELECT json_build_array(mu.id, mu.tenant_id, mu.role, mu.tier)
                 FROM participants AS p JOIN users AS mu ON mu.id = p.user_id
                 WHERE p.conversation_id = m.conversation_id) AS members,
           ARRAY(SELECT b.blocker_id FROM blocks AS b
                 JOIN participants AS p
                   ON p.conversation_id = m.conversation_id AND p.user_id = b.blocker_id
                 WHERE b.blocked_id = m.sender_id) AS blocked_by
    FROM messages AS m JOIN users AS u ON u.id = m.sender_id
    WHERE m.id = ANY(CAST(:ids AS uuid[])) AND m.status = 'queued'
    ORDER BY m.created_at, m.id
    FOR UPDATE OF m
    """
)
# Storing, in one statement: mark the sends stored, move the latest message of the
# conversations where a send is now the newest, and bump each member's unread count by
# the stored sends of others it has not read past. Sends are stored out of acceptance
# order (workers run side by side), so this compares positions rather than trusting
# arrival order. The count is computed in the SET from the participant row being
# updated, so if a read moved the position first PostgreSQL re-evaluates it against the
# updated row and the count stays exact. (The CTEs touch other tables than the final
# UPDATE, so one snapshot is no hazard.)
_STORE = text(
    """
    WITH stored AS (
        UPDATE messages AS m
        SET status = 'stored', expires_at = v.expires_at, decided_at = clock_timestamp()
        FROM unnest(CAST(:s_ids AS uuid[]), CAST(:s_expires_at AS timestamptz[]))
             AS v(id, expires_at)
        WHERE m.id = v.id
        RETURNING m.id
    ), moved AS (
        UPDATE conversations AS c SET last_activity_at = v.at, last_message_id = v.message_id
        FROM unnest(CAST(:moved_ids AS uuid[]), CAST(:moved_at AS timestamptz[]),
                    CAST(:moved_message_ids AS uuid[])) AS v(id, at, message_id)
        WHERE c.id = v.id
        RETURNING c.id
    )
    UPDATE participants AS p
    SET last_activity_at = GREATEST(p.last_activity_at, v.latest_at),
        unread_count = p.unread_count + (
            SELECT count(*)
            FROM unnest(CAST(:s_conversations AS uuid[]), CAST(:s_senders AS text[]),
                        CAST(:s_created AS timestamptz[]), CAST(:s_ids AS uuid[]))
                 AS s(conversation_id, sender_id, created_at, id)
            WHERE s.conversation_id = p.conversation_id AND s.sender_id <> p.user_id
              AND (p.last_read_at IS NULL
                   OR (p.last_read_at, p.last_read_message_id) < (s.created_at, s.id)))
    FROM unnest(CAST(:ids AS uuid[]), CAST(:latest_at AS timestamptz[]))
         AS v(conversation_id, latest_at)
    WHERE p.conversation_id = v.conversation_id
    RETURNING p.conversation_id, p.user_id
    """
)
_MARK_REJECTED = text(
    """
    UPDATE messages
    SET status = 'rejected', body = NULL, rejection_reason = :reason,
        decided_at = clock_timestamp()
    WHERE id = :id
    """
)


# Run by the driver (app/statements.py), each at half the client CPU of SQLAlchemy's
# execution. A batch without attachments is four statements: read and lock, claim,
# store, and the events' append (app/services/event_log.py); one more with attachments.
_QUEUED_SENDS_ON_DRIVER = DriverStatement(_QUEUED_SENDS_LOCKING, label="queued sends")
_LOCK_CONVERSATIONS_ON_DRIVER = DriverStatement(_LOCK_CONVERSATIONS, label="lock conversations")
_CLAIM_SENDS_ON_DRIVER = DriverStatement(_CLAIM_SENDS, label="claim sends")
_STORE_ON_DRIVER = DriverStatement(_STORE, label="store sends")
_MARK_REJECTED_ON_DRIVER = DriverStatement(_MARK_REJECTED, label="reject send")


@dataclass(slots=True)
class _StoredSend:
    """A send as `message_json` reads it, once stored (or the fields it needs)."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    sender_id: str
    client_id: str
    body: str | None
    created_at: datetime
    expires_at: datetime | None
    status: str = "stored"
    deleted_at: datetime | None = None
    delete_reason: str | None = None
    rejection_reason: str | None = None


def store_message(
    session: Session,
    policy: Policy,
    message_id: str | uuid.UUID,
    *,
    check_attachments: Callable[[uuid.UUID], object] | None = None,
) -> StoreResult:
    """Decide one accepted send and store (or reject) it; see `store_messages`."""
    return store_messages(session, policy, [message_id], check_attachments=check_attachments)[0]


def store_messages(
    session: Session,
    policy: Policy,
    message_ids: Sequence[str | uuid.UUID],
    *,
    check_attachments: Callable[[uuid.UUID], object] | None = None,
) -> list[StoreResult]:
    """Decide a batch of accepted sends and store (or reject) each, exactly once however
    often it is run, in the caller's one transaction and a few round trips whatever
    the batch's size. Returns one result per distinct id, in the order given.

    Each send is decided on its own, as if stored alone: lock the conversations (in id
    order), claim the sends still queued, re-check the policy against each send's
    conversation as it is now, mark the stored ones stored at the time the API accepted
    them, move each conversation's latest message, bump the unread counts of the
    recipients who have not read past each send, and append every event (announced
    after commit). A send with attachments has their bytes checked first, before any
    lock is taken, by `check_attachments(message_id)`.
    """
    ids = list(dict.fromkeys(uuid.UUID(str(message_id)) for message_id in message_ids))
    found: set[uuid.UUID] = set()
    waiting: dict[uuid.UUID, uuid.UUID] = {}  # message id -> conversation id
    locked: dict[uuid.UUID, Any] = {}  # conversation id -> its row, if already locked
    for row in _QUEUED_SENDS_ON_DRIVER.rows(session.connection(), {"ids": ids}):
        found.add(row.id)
        if row.locked_id is not None:
            locked[row.locked_id] = row
        if row.status != "queued":
            continue
        waiting[row.id] = row.conversation_id
        if row.attachment_count and check_attachments is not None:
            # Downloading and decoding images takes a while: done before any lock is
            # taken (the statement took none), so other sends in the conversation do not
            # wait for it.
            check_attachments(row.id)
    decided = _decide_and_store(session, policy, waiting, locked) if waiting else {}
    results = [
        # Not decided here: decided before (or by another worker while this one waited
        # for the locks), or not found (its conversation was deleted with it).
        StoreResult(
            message_id, decided.get(message_id, "duplicate" if message_id in found else "missing")
        )
        for message_id in ids
    ]
    for result in results:
        MESSAGES.labels(result.outcome).inc()
    return results


def _decide_and_store(
    session: Session,
    policy: Policy,
    waiting: dict[uuid.UUID, uuid.UUID],
    locked: dict[uuid.UUID, Any],
) -> dict[uuid.UUID, str]:
    """The locked part of `store_messages`: outcomes of the sends it claimed (a send
    another worker decided while this one waited for the locks is left out). `locked`:
    the conversations the first read locked already (all of them, or none)."""
    conversation_ids = sorted(set(waiting.values()))
    conversations = locked
    if not conversations:
        conversations = {
            row.id: row
            for row in _LOCK_CONVERSATIONS_ON_DRIVER.rows(
                session.connection(), {"ids": conversation_ids}
            )
        }
    claimed = _CLAIM_SENDS_ON_DRIVER.rows(session.connection(), {"ids": list(waiting)})
    if not claimed:
        return {}

    outcome: dict[uuid.UUID, str] = {}
    stored: list[_StoredSend] = []
    attachments_of: dict[uuid.UUID, list[dict[str, Any]]] = {}
    rejections: list[EventGroup] = []
    for send in claimed:
        decision = _decide_claimed(session, policy, send)
        if not decision:
            rejections.append(_reject(session, send, decision))
            outcome[send.id] = "rejected"
            continue
        stored.append(
            _StoredSend(
                id=send.id,
                conversation_id=send.conversation_id,
                sender_id=send.sender_id,
                client_id=send.client_id,
                body=send.body,
                created_at=send.created_at,
                expires_at=policy.message_expiry(send.created_at, send.tier),
            )
        )
        if send.attachment_count:
            attachments_of[send.id] = ready_attachments_for_event(session, send.id)
        outcome[send.id] = "stored"
    created = _store(session, stored, conversations, attachments_of) if stored else []
    append_event_groups(session, created + rejections)
    return outcome


def _decide_claimed(session: Session, policy: Policy, send: Any) -> Decision:
    """The authoritative decision on one claimed send (a row of `_CLAIM_SENDS`)."""
    members = [Actor(*member) for member in send.members]
    if not any(member.id == send.sender_id for member in members):
        return NOT_A_MEMBER
    sender = Actor(id=send.sender_id, tenant_id=send.tenant_id, role=send.role, tier=send.tier)
    decision = decide_for_recipients(
        policy,
        sender,
        [member for member in members if member.id != send.sender_id],
        set(send.blocked_by),
        send.body or "",
        send.attachment_count,
    )
    if decision and send.attachment_count:
        # The worker checked the bytes before taking these locks (check_message_attachments).
        failed = rejected_attachments(session, send.id)
        if failed:
            decision = Decision(
                False,
                "attachment_invalid",
                "; ".join(f"Attachment {item['id']}: {item['reason']}" for item in failed),
            )
    return decision


def _store(
    session: Session,
    stored: list[_StoredSend],
    conversations: dict[uuid.UUID, Any],
    attachments_of: dict[uuid.UUID, list[dict[str, Any]]],
) -> list[EventGroup]:
    """Mark `stored` stored, move each conversation's latest message and its members'
    unread counts; the `message.created` events to append."""
    latest: dict[uuid.UUID, _StoredSend] = {}
    for send in stored:
        current = latest.get(send.conversation_id)
        if current is None or (current.created_at, current.id) < (send.created_at, send.id):
            latest[send.conversation_id] = send
    moved = [
        send
        for conversation_id, send in latest.items()
        if conversations[conversation_id].last_message_id is None
        or conversations[conversation_id].last_activity_at <= send.created_at
    ]
    recipients: dict[uuid.UUID, list[str]] = {}
    for conversation_id, user_id in _STORE_ON_DRIVER.rows(
        session.connection(),
        {
            "s_ids": [s.id for s in stored],
            "s_expires_at": [s.expires_at for s in stored],
            "s_conversations": [s.conversation_id for s in stored],
            "s_senders": [s.sender_id for s in stored],
            "s_created": [s.created_at for s in stored],
            "moved_ids": [s.conversation_id for s in moved],
            "moved_at": [s.created_at for s in moved],
            "moved_message_ids": [s.id for s in moved],
            "ids": list(latest),
            "latest_at": [send.created_at for send in latest.values()],
        },
    ):
        recipients.setdefault(conversation_id, []).append(user_id)
    return [
        EventGroup(
            recipients.get(send.conversation_id, []),
            "message.created",
            message_json(send, attachments_of.get(send.id))
            | {"accepted_at": send.created_at.isoformat()},
        )
        for send in stored
    ]


def _reject(session: Session, send: Any, decision: Decision) -> EventGroup:
    """The send (a claimed row: id, conversation_id, client_id, sender_id and
    attachment_count) ends rejected: its body goes, the reason stays; the returned
    `message.rejected` event tells the sender."""
    _MARK_REJECTED_ON_DRIVER.run(session.connection(), {"id": send.id, "reason": decision.rule})
    data = {
        "id": str(send.id),
        "conversation_id": str(send.conversation_id),
        "client_id": send.client_id,
        "reason": decision.rule,
        "message": decision.reason,
    }
    if send.attachment_count:
        if decision.rule == "attachment_invalid":
            data["attachments"] = rejected_attachments(session, send.id)
        release_attachments(session, send.id)
    return EventGroup([send.sender_id], "message.rejected", data)


def reject_send(session: Session, message_id: str | uuid.UUID, decision: Decision) -> bool:
    """Reject an accepted send that can never be stored (its task failed for good, or
    it was re-enqueued too often). False if it was decided already."""
    send = session.execute(
        select(
            Message.id,
            Message.conversation_id,
            Message.client_id,
            Message.sender_id,
            Message.attachment_count,
        )
        .where(Message.id == uuid.UUID(str(message_id)), Message.status == "queued")
        .with_for_update()
    ).first()
    if send is None:
        return False
    append_event_groups(session, [_reject(session, send, decision)])
    MESSAGES.labels("rejected").inc()
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
