"""Blocks, and the "may I start a conversation with this user" question a UI asks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.models import AuditLog, Block, Conversation, User
from app.policy import Policy
from app.problems import BadRequest
from app.services.access import actor, is_blocked, visible_user
from app.services.conversations import pair_key


def block_user(session: Session, user: User, target_id: str) -> bool:
    """Block a user of my tenant; returns whether a new block was made."""
    target = visible_user(session, user, target_id)
    if target.id == user.id:
        raise BadRequest("You cannot block yourself.", code="self_block")
    created = (
        session.execute(
            insert(Block)
            .values(blocker_id=user.id, blocked_id=target.id, tenant_id=user.tenant_id)
            .on_conflict_do_nothing()
            .returning(Block.blocker_id)
        ).first()
        is not None
    )
    if created:
        session.add(
            AuditLog(
                tenant_id=user.tenant_id,
                actor_id=user.id,
                action="user.blocked",
                target_type="user",
                target_id=target.id,
            )
        )
    return created


def unblock_user(session: Session, user: User, target_id: str) -> bool:
    target = visible_user(session, user, target_id)
    removed = (
        session.execute(
            delete(Block)
            .where(Block.blocker_id == user.id, Block.blocked_id == target.id)
            .returning(Block.blocker_id)
        ).first()
        is not None
    )
    if removed:
        session.add(
            AuditLog(
                tenant_id=user.tenant_id,
                actor_id=user.id,
                action="user.unblocked",
                target_type="user",
                target_id=target.id,
            )
        )
    return removed


def blocked_users(session: Session, user: User) -> list[str]:
    return list(
        session.scalars(
            select(Block.blocked_id).where(Block.blocker_id == user.id).order_by(Block.blocked_id)
        )
    )


def start_permission(
    session: Session, policy: Policy, user: User, target_id: str
) -> dict[str, Any]:
    """May `user` start a conversation with `target_id`, and if not, which rule says no."""
    target = visible_user(session, user, target_id)
    decision = policy.may_start(
        actor(user), actor(target), blocked_by_recipient=is_blocked(session, target.id, user.id)
    )
    existing = session.scalar(
        select(Conversation.id).where(
            Conversation.tenant_id == user.tenant_id,
            Conversation.pair_key == pair_key(user.id, target.id),
            Conversation.subject_key == "",
        )
    )
    return {
        "user_id": target.id,
        "can_start": decision.allowed,
        "rule": decision.rule,
        "reason": decision.reason or None,
        "conversation_id": str(existing) if existing else None,
    }
