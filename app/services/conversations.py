"""Conversations: start one (or find the existing one), list mine, archive, read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import aggregate_order_by, insert
from sqlalchemy.orm import Session, aliased

from app.events import append_events
from app.models import Conversation, Message, Participant, User
from app.policy import Policy
from app.problems import BadRequest, Forbidden, NotFound
from app.services.access import (
    actor,
    is_blocked,
    member_conversation,
    other_participants,
    parse_uuid,
    visible_user,
)
from app.services.pagination import decode_cursor, encode_cursor

PREVIEW_LENGTH = 100


@dataclass(frozen=True, slots=True)
class Subject:
    type: str
    id: str

    @property
    def key(self) -> str:
        return f"{self.type}:{self.id}"


def pair_key(first: str, second: str) -> str:
    return "|".join(sorted((first, second)))


def _find(session: Session, tenant_id: str, key: str, subject_key: str) -> Conversation | None:
    return session.scalars(
        select(Conversation).where(
            Conversation.tenant_id == tenant_id,
            Conversation.pair_key == key,
            Conversation.subject_key == subject_key,
        )
    ).first()


def start_conversation(
    session: Session, policy: Policy, starter: User, participant_id: str, subject: Subject | None
) -> tuple[Conversation, bool]:
    """The conversation between `starter` and `participant_id` (about `subject`): the
    existing one, or a new one if the policy lets `starter` start it. Returns it and
    whether it was created. Two concurrent starts for one pair make one conversation."""
    other = visible_user(session, starter, participant_id)
    subject_check = policy.check_subject(subject.type if subject else None)
    if not subject_check:
        raise BadRequest(subject_check.reason, code=subject_check.rule)
    key, subject_key = pair_key(starter.id, other.id), subject.key if subject else ""

    existing = _find(session, starter.tenant_id, key, subject_key)
    if existing is not None and other.id != starter.id:
        return existing, False

    decision = policy.may_start(
        actor(starter), actor(other), blocked_by_recipient=is_blocked(session, other.id, starter.id)
    )
    if not decision:
        raise Forbidden(decision.reason, code=decision.rule)

    new_id = uuid.uuid4()
    inserted = session.execute(
        insert(Conversation)
        .values(
            id=new_id,
            tenant_id=starter.tenant_id,
            pair_key=key,
            subject_type=subject.type if subject else None,
            subject_id=subject.id if subject else None,
            subject_key=subject_key,
            created_by=starter.id,
        )
        .on_conflict_do_nothing(index_elements=["tenant_id", "pair_key", "subject_key"])
        .returning(Conversation.id)
    ).first()
    if inserted is None:
        # Another request started it between our look-up and our insert.
        conversation = _find(session, starter.tenant_id, key, subject_key)
        assert conversation is not None
        return conversation, False
    session.execute(
        insert(Participant),
        [
            {"conversation_id": new_id, "user_id": starter.id},
            {"conversation_id": new_id, "user_id": other.id},
        ],
    )
    return session.get_one(Conversation, new_id), True


def set_archived(session: Session, user: User, conversation_id: str, archived: bool) -> None:
    """Archive or unarchive a conversation for this user only."""
    _, participant = member_conversation(session, user, conversation_id, lock=True)
    participant.archived = archived


def _summary_query(variant: str) -> Select:
    """My conversations, latest activity first, each with its people, last message
    preview and my unread count, in one query returning rows rather than ORM objects:
    this is the hottest read of a messaging API. Built once per variant ("first" page,
    page "after" a cursor, or "one" conversation); the values are bound at execution."""
    others = aliased(Participant)
    person = func.json_build_object(
        "id", User.id, "display_name", User.display_name, "role", User.role
    )
    people = (
        select(
            func.coalesce(func.json_agg(aggregate_order_by(person, User.id)), text("'[]'::json"))
        )
        .select_from(others)
        .join(User, User.id == others.user_id)
        .where(others.conversation_id == Participant.conversation_id)
        .correlate(Participant)
        .scalar_subquery()
    )
    last = aliased(Message)
    query = (
        select(
            Participant.conversation_id,
            Participant.unread_count,
            Participant.archived,
            Participant.last_activity_at.label("position"),
            Conversation.subject_type,
            Conversation.subject_id,
            Conversation.status,
            Conversation.created_at,
            Conversation.last_activity_at,
            last.id.label("last_id"),
            last.sender_id.label("last_sender_id"),
            last.created_at.label("last_created_at"),
            last.deleted_at.label("last_deleted_at"),
            last.delete_reason.label("last_delete_reason"),
            func.left(last.body, PREVIEW_LENGTH).label("last_preview"),
            last.attachment_count.label("last_attachment_count"),
            people.label("people"),
        )
        .join(Conversation, Conversation.id == Participant.conversation_id)
        .outerjoin(last, last.id == Conversation.last_message_id)
        .where(
            Participant.user_id == bindparam("user_id"),
            Conversation.tenant_id == bindparam("tenant_id"),
        )
        .order_by(Participant.last_activity_at.desc(), Participant.conversation_id.desc())
        .limit(bindparam("limit"))
    )
    if variant == "one":
        return query.where(Participant.conversation_id == bindparam("conversation_id"))
    query = query.where(Participant.archived == bindparam("archived"))
    if variant == "after":
        query = query.where(
            tuple_(Participant.last_activity_at, Participant.conversation_id)
            < tuple_(bindparam("after_time"), bindparam("after_id"))
        )
    return query


_SUMMARY_QUERIES = {variant: _summary_query(variant) for variant in ("first", "after", "one")}


def _summaries(session: Session, user: User, variant: str, **values: Any) -> list[dict[str, Any]]:
    rows = session.execute(
        _SUMMARY_QUERIES[variant], {"user_id": user.id, "tenant_id": user.tenant_id, **values}
    )
    return [_summary_json(row, user.id) for row in rows]


def list_conversations(
    session: Session, user: User, *, limit: int, cursor: str | None, archived: bool
) -> dict[str, Any]:
    """My conversations, latest activity first, one keyset page."""
    if cursor:
        moment, conversation_id = decode_cursor(cursor)
        rows = _summaries(
            session,
            user,
            "after",
            archived=archived,
            limit=limit + 1,
            after_time=moment,
            after_id=conversation_id,
        )
    else:
        rows = _summaries(session, user, "first", archived=archived, limit=limit + 1)
    page, more = rows[:limit], len(rows) > limit
    next_cursor = None
    if more:
        position, conversation_id = page[-1]["_position"], uuid.UUID(page[-1]["id"])
        next_cursor = encode_cursor(position, conversation_id)
    for item in page:
        del item["_position"]
    return {"items": page, "next_cursor": next_cursor}


def get_conversation(session: Session, user: User, conversation_id: str) -> dict[str, Any]:
    rows = _summaries(
        session, user, "one", limit=1, conversation_id=parse_uuid(conversation_id, "conversation")
    )
    if not rows:
        raise NotFound("No such conversation.", code="conversation_not_found")
    del rows[0]["_position"]
    return rows[0]


def mark_read(
    session: Session, user: User, conversation_id: str, message_id: str | None
) -> dict[str, Any]:
    """Move my read position up to `message_id` (default: the latest message) and
    recount my unread messages; tell the other participants (a read receipt).

    The participant row is locked before the count runs in a later statement, so
    under READ COMMITTED it sees every send that committed before we held the lock,
    and every later send waits for us and then adds one: the count stays exact.
    """
    conversation, _ = member_conversation(session, user, conversation_id)
    # Lock order on every path: the conversation, then participants, then the users'
    # event sequences (sends and deletes hold the conversation FOR UPDATE; a read shares
    # it, so reads in one conversation run side by side but take turns with its sends).
    session.execute(
        select(Conversation.id).where(Conversation.id == conversation.id).with_for_update(read=True)
    )
    _, participant = member_conversation(session, user, conversation.id, lock=True)
    stored = (Message.conversation_id == conversation.id) & (Message.status == "stored")
    if message_id is not None:
        target = session.scalars(
            select(Message).where(stored, Message.id == parse_uuid(message_id, "message"))
        ).first()
        if target is None:
            raise NotFound("No such message in this conversation.", code="message_not_found")
    else:
        target = session.scalars(
            select(Message)
            .where(stored)
            .order_by(Message.created_at.desc(), Message.id.desc())
            .limit(1)
        ).first()
    if target is None or _is_read(participant, target):
        return read_state_json(participant)

    unread = session.scalar(
        select(func.count())
        .select_from(Message)
        .where(
            stored,
            Message.sender_id != user.id,
            Message.deleted_at.is_(None),
            tuple_(Message.created_at, Message.id) > tuple_(target.created_at, target.id),
        )
    )
    session.execute(
        update(Participant)
        .where(Participant.conversation_id == conversation.id, Participant.user_id == user.id)
        .values(last_read_at=target.created_at, last_read_message_id=target.id, unread_count=unread)
    )
    session.refresh(participant)
    recipients = [user.id] + [
        other.id for other in other_participants(session, conversation.id, user.id)
    ]
    append_events(
        session,
        recipients,
        "conversation.read",
        {
            "conversation_id": str(conversation.id),
            "user_id": user.id,
            "message_id": str(target.id),
            "read_at": target.created_at.isoformat(),
        },
    )
    return read_state_json(participant)


def _is_read(participant: Participant, message: Message) -> bool:
    if participant.last_read_at is None or participant.last_read_message_id is None:
        return False
    return (message.created_at, str(message.id)) <= (
        participant.last_read_at,
        str(participant.last_read_message_id),
    )


def unread_totals(session: Session, user: User) -> dict[str, int]:
    total, conversations = session.execute(
        select(
            func.coalesce(func.sum(Participant.unread_count), 0),
            func.count().filter(Participant.unread_count > 0),
        ).where(Participant.user_id == user.id)
    ).one()
    return {"total": int(total), "conversations": int(conversations)}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def read_state_json(participant: Participant) -> dict[str, Any]:
    return {
        "conversation_id": str(participant.conversation_id),
        "last_read_message_id": (
            str(participant.last_read_message_id) if participant.last_read_message_id else None
        ),
        "unread_count": participant.unread_count,
    }


def _summary_json(row: Any, viewer_id: str) -> dict[str, Any]:
    preview = None
    if row.last_id is not None:
        # The same shape as a message's `deleted` in history (messages.message_json):
        # null, or when and why it was deleted.
        deleted = None
        if row.last_deleted_at is not None:
            deleted = {"at": _iso(row.last_deleted_at), "reason": row.last_delete_reason}
        preview = {
            "id": str(row.last_id),
            "sender_id": row.last_sender_id,
            "created_at": _iso(row.last_created_at),
            "deleted": deleted,
            "preview": None if deleted else row.last_preview,
            # A photo sent alone has an empty preview: a client shows "Photo" instead.
            "attachment_count": 0 if deleted else row.last_attachment_count,
        }
    people = row.people or []
    return {
        "id": str(row.conversation_id),
        "subject": ({"type": row.subject_type, "id": row.subject_id} if row.subject_type else None),
        "status": row.status,
        "participants": people,
        "other_participants": [person for person in people if person["id"] != viewer_id],
        "created_at": _iso(row.created_at),
        "last_activity_at": _iso(row.last_activity_at),
        "last_message": preview,
        "unread_count": row.unread_count,
        "archived": row.archived,
        "_position": row.position,
    }
