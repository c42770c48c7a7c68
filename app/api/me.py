"""The authenticated user's own profile."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.services.users import user_json
from app.web import current_user

blueprint = Blueprint("me", __name__, url_prefix="/v1")


@blueprint.get("/me")
def me() -> ResponseReturnValue:
    return user_json(current_user())
