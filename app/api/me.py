"""The authenticated user's own profile."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.services.users import user_json
from app.web import current_user

blueprint = Blueprint("me", __name__, url_prefix="/v1")


@blueprint.get("/me")
def me() -> ResponseReturnValue:
    """My profile and `last_event_id`: a client loads its state over HTTP after reading
    this, then opens the stream with `?last_event_id=` to get everything since."""
    user = current_user()
    return user_json(user) | {"last_event_id": user.last_event_seq}
