"""One message: its status, and the sender's delete."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.services.messages import delete_own_message, message_json, visible_message
from app.web import current_user, session

blueprint = Blueprint("messages", __name__, url_prefix="/v1")


@blueprint.get("/messages/<message_id>")
def get_message(message_id: str) -> ResponseReturnValue:
    return message_json(visible_message(session(), current_user(), message_id))


@blueprint.delete("/messages/<message_id>")
def delete_message(message_id: str) -> ResponseReturnValue:
    db = session()
    message = delete_own_message(db, current_user(), message_id)
    db.commit()
    return message_json(message)
