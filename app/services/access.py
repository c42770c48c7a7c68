"""Object-level authorization: what a user may see. Anything outside their tenant or
their conversations is "not found", indistinguishable from what does not exist."""

from __future__ import annotations

import re
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Block, Conversation, Participant, User
from app.policy import Actor
from app.problems import NotFound
from app.validation import is_external_id

_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", re.ASCII)


def actor(user: User) -> Actor:
    return Actor(id=user.id, tenant_id=user.tenant_id, role=user.role, tier=user.tier)


def is_uuid_text(value: str) -> bool:
    """Whether `value` is a UUID as we write them: 8-4-4-4-12 hex digits, either case."""
    return _UUID_TEXT.fullmatch(value) is not None


def parse_uuid(value: str | uuid.UUID, what: str) -> uuid.UUID:
    """A UUID from a path segment or a field; a malformed one is simply not found.

    Strict on purpose: `uuid.UUID` also takes braces, `urn:uuid:`, signs, underscores
    and non-ASCII digits, none of which we hand out."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or not is_uuid_text(value):
        raise NotFound(f"No such {what}.", code=f"{what}_not_found")
    return uuid.UUID(value)


def visible_user(session: Session, viewer: User, user_id: str) -> User:
    """Another user of the viewer's tenant.

    An id that could never have been provisioned (NUL, spaces, too long: anything but
    EXTERNAL_ID_PATTERN) gets the same 404 as a user who does not exist, before it
    reaches SQL: a look-up never tells a malformed id from a missing one. (Only the
    admin PUT, which creates users, answers a malformed id with 400 `invalid_user_id`.)"""
    if not is_external_id(user_id):
        raise NotFound("No such user.", code="user_not_found")
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
