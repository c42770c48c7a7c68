"""Provisioning users: the host app says who exists, in which tenant, with which role and tier."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.models import AuditLog, Tenant, User
from app.policy import Policy
from app.problems import BadRequest, Conflict
from app.services.retention import apply_tier_change


@dataclass(frozen=True, slots=True)
class UserUpsert:
    user_id: str
    tenant_id: str
    role: str
    display_name: str
    tier: str | None = None


def upsert_user(
    session: Session, policy: Policy, data: UserUpsert, *, now: datetime | None = None
) -> tuple[User, bool]:
    """Create or update a user; returns the user and whether it was created.

    The role and tier must be the policy's; the tier defaults to the policy's
    default for a new user and stays as it is for an existing one. A user never
    moves between tenants: that would carry their conversations across the
    boundary, so it is a conflict.

    A tier change at `now` (default: the current time) moves the expiries of the user's
    messages in the same transaction (`retention.apply_tier_change`): a downgrade takes
    effect after the policy's grace, an upgrade at once.
    """
    if data.role not in policy.roles:
        raise BadRequest(
            f"role: '{data.role}' is not a role of the '{policy.name}' policy "
            f"(one of: {', '.join(policy.roles)}).",
            code="unknown_role",
        )
    if data.tier is not None and data.tier not in policy.tiers:
        raise BadRequest(
            f"tier: '{data.tier}' is not a tier of the '{policy.name}' policy "
            f"(one of: {', '.join(policy.tiers)}).",
            code="unknown_tier",
        )

    now = now or datetime.now(UTC)
    session.execute(insert(Tenant).values(id=data.tenant_id).on_conflict_do_nothing())
    created = (
        session.execute(
            insert(User)
            .values(
                id=data.user_id,
                tenant_id=data.tenant_id,
                role=data.role,
                tier=data.tier or policy.default_tier,
                display_name=data.display_name,
            )
            .on_conflict_do_nothing()
            .returning(User.id)
        ).first()
        is not None
    )

    # A tier change moves the user's message expiries BEFORE the user's row is locked:
    # deleting a message locks it and then its participants' rows (for their events), so
    # locking the user first and their messages second could deadlock with a delete.
    moved_for: str | None = None
    moved = 0
    if not created and data.tier is not None:
        current = session.execute(
            select(User.tier, User.tenant_id).where(User.id == data.user_id)
        ).one()
        if current.tier != data.tier and current.tenant_id == data.tenant_id:
            moved = apply_tier_change(session, policy, data.user_id, data.tier, now)
            moved_for = data.tier

    user = session.execute(
        select(User).where(User.id == data.user_id).with_for_update()
    ).scalar_one()
    if user.tenant_id != data.tenant_id:
        raise Conflict(
            f"User '{data.user_id}' belongs to another tenant; a user cannot move between tenants.",
            code="tenant_mismatch",
        )

    changes: dict[str, Any] = {}
    if created:
        changes = {"role": ["", user.role], "tier": ["", user.tier]}
    else:
        if user.role != data.role:
            changes["role"] = [user.role, data.role]
            user.role = data.role
        if data.tier is not None and user.tier != data.tier:
            changes["tier"] = [user.tier, data.tier]
            if moved_for != data.tier:
                # Another PUT changed the tier between our read and our lock (rare): move
                # the expiries now, under the lock, for the tier we are setting.
                moved = apply_tier_change(session, policy, user.id, data.tier, now)
            changes["messages_expiry_moved"] = moved
            user.previous_tier = user.tier
            user.tier = data.tier
            user.tier_changed_at = now
        if user.display_name != data.display_name:
            user.display_name = data.display_name
    if changes:
        session.add(
            AuditLog(
                tenant_id=user.tenant_id,
                actor_id=None,
                action="user.created" if created else "user.updated",
                target_type="user",
                target_id=user.id,
                detail=changes,
            )
        )
    session.flush()
    return user, created


def user_json(user: User) -> dict[str, object]:
    return {
        "id": user.id,
        "tenant": user.tenant_id,
        "role": user.role,
        "tier": user.tier,
        "display_name": user.display_name,
        "tier_changed_at": user.tier_changed_at.isoformat() if user.tier_changed_at else None,
    }
