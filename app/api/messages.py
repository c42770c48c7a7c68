"""One message: its status, and the sender's delete."""

from __future__ import annotations

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from app.models import Message
from app.problems import NotFound
from app.services.access import parse_uuid
from app.services.messages import delete_own_message, message_json, visible_message
from app.services.sends import PendingSends
from app.web import current_user, session

blueprint = Blueprint("messages", __name__, url_prefix="/v1")


@blueprint.get("/messages/<message_id>")
def get_message(message_id: str) -> ResponseReturnValue:
    user, db = current_user(), session()
    message_uuid = parse_uuid(message_id, "message")
    if db.get(Message, message_uuid) is None:
        # Not decided yet: only its sender knows it exists.
        pending = PendingSends(current_app.extensions["switchboard.redis"]).get(str(message_uuid))
        if pending is None or pending["sender_id"] != user.id:
            raise NotFound("No such message.", code="message_not_found")
        return {
            "id": str(message_uuid),
            "conversation_id": pending["conversation_id"],
            "sender_id": user.id,
            "status": "queued",
            "accepted_at": pending["accepted_at"],
        }
    return message_json(visible_message(db, user, message_id))


@blueprint.delete("/messages/<message_id>")
def delete_message(message_id: str) -> ResponseReturnValue:
    db = session()
    message = delete_own_message(db, current_user(), message_id)
    db.commit()
    return message_json(message)
