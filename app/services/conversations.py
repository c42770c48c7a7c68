"""Conversations: start one (or find the existing one), list mine, archive, read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

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


def list_conversations(
    session: Session, user: User, *, limit: int, cursor: str | None, archived: bool
) -> dict[str, Any]:
    """My conversations, latest activity first, one keyset page."""
    query = (
        select(Participant, Conversation)
        .join(Conversation, Conversation.id == Participant.conversation_id)
        .where(Participant.user_id == user.id, Participant.archived == archived)
        .order_by(Participant.last_activity_at.desc(), Participant.conversation_id.desc())
        .limit(limit + 1)
    )
    if cursor:
        moment, conversation_id = decode_cursor(cursor)
        query = query.where(
            tuple_(Participant.last_activity_at, Participant.conversation_id)
            < tuple_(moment, conversation_id)
        )
    rows = session.execute(query).all()
    page, more = rows[:limit], len(rows) > limit
    conversations = [conversation for _, conversation in page]
    people = _participants_by_conversation(session, [c.id for c in conversations])
    last_messages = _messages_by_id(
        session, [c.last_message_id for c in conversations if c.last_message_id]
    )
    items = [
        conversation_json(
            conversation,
            participant,
            people.get(conversation.id, []),
            last_messages.get(conversation.last_message_id),
            viewer_id=user.id,
        )
        for participant, conversation in page
    ]
    next_cursor = None
    if more:
        last_participant, _ = page[-1]
        next_cursor = encode_cursor(
            last_participant.last_activity_at, last_participant.conversation_id
        )
    return {"items": items, "next_cursor": next_cursor}


def get_conversation(session: Session, user: User, conversation_id: str) -> dict[str, Any]:
    conversation, participant = member_conversation(session, user, conversation_id)
    people = _participants_by_conversation(session, [conversation.id])
    last = _messages_by_id(
        session, [conversation.last_message_id] if conversation.last_message_id else []
    )
    return conversation_json(
        conversation,
        participant,
        people.get(conversation.id, []),
        last.get(conversation.last_message_id),
        viewer_id=user.id,
    )


def mark_read(
    session: Session, user: User, conversation_id: str, message_id: str | None
) -> dict[str, Any]:
    """Move my read position up to `message_id` (default: the latest message) and
    recount my unread messages; tell the other participants (a read receipt).

    The participant row is locked first and the count runs in a later statement, so
    under READ COMMITTED it sees every send that committed before we held the lock,
    and every later send waits for us and then adds one: the count stays exact.
    """
    conversation, participant = member_conversation(session, user, conversation_id, lock=True)
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


def _participants_by_conversation(
    session: Session, conversation_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[User]]:
    if not conversation_ids:
        return {}
    rows = session.execute(
        select(Participant.conversation_id, User)
        .join(User, User.id == Participant.user_id)
        .where(Participant.conversation_id.in_(conversation_ids))
        .order_by(User.id)
    ).all()
    people: dict[uuid.UUID, list[User]] = {}
    for conversation_id, person in rows:
        people.setdefault(conversation_id, []).append(person)
    return people


def _messages_by_id(session: Session, ids: list[uuid.UUID]) -> dict[uuid.UUID, Message]:
    if not ids:
        return {}
    return {m.id: m for m in session.scalars(select(Message).where(Message.id.in_(ids)))}


def person_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "display_name": user.display_name, "role": user.role}


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


def conversation_json(
    conversation: Conversation,
    participant: Participant,
    people: list[User],
    last_message: Message | None,
    *,
    viewer_id: str,
) -> dict[str, Any]:
    preview = None
    if last_message is not None:
        preview = {
            "id": str(last_message.id),
            "sender_id": last_message.sender_id,
            "created_at": _iso(last_message.created_at),
            "deleted": last_message.deleted_at is not None,
            "preview": (last_message.body or "")[:PREVIEW_LENGTH]
            if last_message.deleted_at is None
            else None,
        }
    return {
        "id": str(conversation.id),
        "subject": (
            {"type": conversation.subject_type, "id": conversation.subject_id}
            if conversation.subject_type
            else None
        ),
        "status": conversation.status,
        "participants": [person_json(person) for person in people],
        "other_participants": [person_json(p) for p in people if p.id != viewer_id],
        "created_at": _iso(conversation.created_at),
        "last_activity_at": _iso(conversation.last_activity_at),
        "last_message": preview,
        "unread_count": participant.unread_count,
        "archived": participant.archived,
    }
