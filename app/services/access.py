"""Object-level authorization: what a user may see. Anything outside their tenant or
their conversations is "not found", indistinguishable from what does not exist."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Block, Conversation, Participant, User
from app.policy import Actor
from app.problems import NotFound


def actor(user: User) -> Actor:
    return Actor(id=user.id, tenant_id=user.tenant_id, role=user.role, tier=user.tier)


def parse_uuid(value: str | uuid.UUID, what: str) -> uuid.UUID:
    """A UUID from a path segment; a malformed one is simply not found."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise NotFound(f"No such {what}.", code=f"{what}_not_found") from None


def visible_user(session: Session, viewer: User, user_id: str) -> User:
    """Another user of the viewer's tenant."""
    user = session.get(User, user_id)
    if user is None or user.tenant_id != viewer.tenant_id:
        raise NotFound("No such user.", code="user_not_found")
    return user


def member_conversation(
    session: Session, user: User, conversation_id: str | uuid.UUID, *, lock: bool = False
) -> tuple[Conversation, Participant]:
    """A conversation the user takes part in, with their participant row."""
    query = (
        select(Conversation, Participant)
        .join(Participant, Participant.conversation_id == Conversation.id)
        .where(
            Conversation.id == parse_uuid(conversation_id, "conversation"),
            Conversation.tenant_id == user.tenant_id,
            Participant.user_id == user.id,
        )
    )
    if lock:
        query = query.with_for_update(of=Participant)
    row = session.execute(query).first()
    if row is None:
        raise NotFound("No such conversation.", code="conversation_not_found")
    conversation, participant = row
    return conversation, participant


def other_participants(session: Session, conversation_id: uuid.UUID, user_id: str) -> list[User]:
    return list(
        session.scalars(
            select(User)
            .join(Participant, Participant.user_id == User.id)
            .where(Participant.conversation_id == conversation_id, User.id != user_id)
            .order_by(User.id)
        )
    )


def is_blocked(session: Session, blocker_id: str, blocked_id: str) -> bool:
    return session.get(Block, (blocker_id, blocked_id)) is not None
