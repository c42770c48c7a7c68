"""One message: its status, and the sender's delete."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.services.messages import delete_own_message, message_with_attachments, visible_message
from app.web import current_user, object_store, session

blueprint = Blueprint("messages", __name__, url_prefix="/v1")


@blueprint.get("/messages/<message_id>")
def get_message(message_id: str) -> ResponseReturnValue:
    db, user = session(), current_user()
    return message_with_attachments(db, object_store(), visible_message(db, user, message_id), user)


@blueprint.delete("/messages/<message_id>")
def delete_message(message_id: str) -> ResponseReturnValue:
    db, user = session(), current_user()
    message = delete_own_message(db, user, message_id)
    db.commit()
    return message_with_attachments(db, object_store(), message, user)
