"""The host app's provisioning API, authenticated by the service token."""

from __future__ import annotations

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, ValidationError

from app.auth import check_service_token
from app.errors import describe_validation_error
from app.problems import BadRequest
from app.services.users import UserUpsert, upsert_user, user_json
from app.validation import DisplayName, ExternalId
from app.web import parse_body, session, settings

blueprint = Blueprint("admin", __name__, url_prefix="/v1/admin")


class UserBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenant: ExternalId
    role: str
    tier: str | None = None
    display_name: DisplayName


class _UserPath(BaseModel):
    user_id: ExternalId


@blueprint.before_request
def _require_service_token() -> None:
    check_service_token(settings(), request.headers.get("Authorization"))


@blueprint.put("/users/<user_id>")
def put_user(user_id: str) -> ResponseReturnValue:
    # This PUT creates users, so a malformed id is the caller's mistake to be told about:
    # 400 `invalid_user_id`, checked before the body or SQL. Look-ups of other users
    # (access.visible_user) answer a malformed id with the 404 of a missing one instead.
    try:
        _UserPath(user_id=user_id)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc), code="invalid_user_id") from None
    body = parse_body(UserBody)
    db = session()
    user, created = upsert_user(
        db,
        current_app.extensions["switchboard.policy"],
        UserUpsert(
            user_id=user_id,
            tenant_id=body.tenant,
            role=body.role,
            tier=body.tier,
            display_name=body.display_name,
        ),
    )
    db.commit()
    return user_json(user), 201 if created else 200
