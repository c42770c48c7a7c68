"""PUT /v1/admin/users/<id>: the host app provisions users with the service token."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.models import AuditLog, User
from tests.conftest import SERVICE_TOKEN

ADMIN = {"Authorization": f"Bearer {SERVICE_TOKEN}"}


def put_user(client, user_id, body, headers=ADMIN):
    return client.put(f"/v1/admin/users/{user_id}", json=body, headers=headers)


def count_users(app) -> int:
    with app.extensions["switchboard.db"].sessions() as session:
        return session.scalar(select(func.count()).select_from(User))


def test_create_then_update(client, app):
    created = put_user(
        client, "alice", {"tenant": "store-1", "role": "member", "display_name": "Alice"}
    )
    assert created.status_code == 201
    assert created.json["tier"] == "free"  # the bookstore preset's default tier
    assert created.json["tenant"] == "store-1"

    updated = put_user(
        client,
        "alice",
        {"tenant": "store-1", "role": "member", "tier": "privileged", "display_name": "Alice B."},
    )
    assert updated.status_code == 200
    assert updated.json["tier"] == "privileged"
    assert updated.json["display_name"] == "Alice B."
    assert updated.json["tier_changed_at"] is not None

    # Omitting the tier keeps the user's current tier.
    again = put_user(
        client, "alice", {"tenant": "store-1", "role": "manager", "display_name": "Alice B."}
    )
    assert (again.json["role"], again.json["tier"]) == ("manager", "privileged")

    with app.extensions["switchboard.db"].sessions() as session:
        user = session.get(User, "alice")
        assert user.previous_tier == "free"
        actions = session.scalars(
            select(AuditLog.action).where(AuditLog.target_id == "alice").order_by(AuditLog.id)
        ).all()
    assert actions == ["user.created", "user.updated", "user.updated"]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"tenant": "s", "role": "wizard", "display_name": "A"}, "unknown_role", "role"),
        (
            {"tenant": "s", "role": "member", "tier": "gold", "display_name": "A"},
            "unknown_tier",
            "tier",
        ),
        ({"role": "member", "display_name": "A"}, "invalid_request", "tenant"),
        ({"tenant": "s", "role": "member"}, "invalid_request", "display_name"),
        (
            {"tenant": "s", "role": "member", "display_name": "   "},
            "invalid_request",
            "display_name",
        ),
        (
            {"tenant": "bad tenant", "role": "member", "display_name": "A"},
            "invalid_request",
            "tenant",
        ),
        ({"tenant": "s", "role": 7, "display_name": "A"}, "invalid_request", "role"),
        (
            {"tenant": "s", "role": "member", "display_name": "A", "admin": True},
            "invalid_request",
            "admin",
        ),
    ],
)
def test_invalid_bodies_are_refused_and_change_nothing(client, app, body, code, field):
    response = put_user(client, "alice", body)
    assert response.status_code == 400
    assert response.json["error"]["code"] == code
    assert field in response.json["error"]["message"]
    assert count_users(app) == 0


def test_body_must_be_a_json_object(client, app):
    response = client.put(
        "/v1/admin/users/alice", data="[1,2]", headers=ADMIN, content_type="application/json"
    )
    assert (response.status_code, response.json["error"]["code"]) == (400, "invalid_json")
    response = client.put(
        "/v1/admin/users/alice", data="not json", headers=ADMIN, content_type="application/json"
    )
    assert (response.status_code, response.json["error"]["code"]) == (400, "invalid_json")


def test_invalid_user_id(client, app):
    response = put_user(client, "has|pipe", {"tenant": "s", "role": "member", "display_name": "A"})
    assert (response.status_code, response.json["error"]["code"]) == (400, "invalid_user_id")


def test_user_cannot_move_between_tenants(client, app):
    put_user(client, "alice", {"tenant": "store-1", "role": "member", "display_name": "A"})
    response = put_user(
        client, "alice", {"tenant": "store-2", "role": "member", "display_name": "A"}
    )
    assert (response.status_code, response.json["error"]["code"]) == (409, "tenant_mismatch")
    with app.extensions["switchboard.db"].sessions() as session:
        assert session.get(User, "alice").tenant_id == "store-1"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-123456789"}])
def test_service_token_is_required(client, app, headers):
    response = put_user(
        client, "alice", {"tenant": "s", "role": "member", "display_name": "A"}, headers=headers
    )
    assert response.status_code == 401
    assert count_users(app) == 0


def test_a_user_token_is_not_a_service_token(client, app, make_user, auth):
    alice = make_user("alice")
    response = put_user(
        client, "bob", {"tenant": "t1", "role": "member", "display_name": "B"}, headers=auth(alice)
    )
    assert (response.status_code, response.json["error"]["code"]) == (401, "invalid_service_token")
