"""Other users: blocks, and whether I may start a conversation with someone."""

from __future__ import annotations

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from app.services.blocks import block_user, blocked_users, start_permission, unblock_user
from app.web import current_user, session

blueprint = Blueprint("people", __name__, url_prefix="/v1")


@blueprint.get("/permissions/<user_id>")
def permissions(user_id: str) -> ResponseReturnValue:
    return start_permission(
        session(), current_app.extensions["switchboard.policy"], current_user(), user_id
    )


@blueprint.get("/blocks")
def list_blocks() -> ResponseReturnValue:
    return {"items": blocked_users(session(), current_user())}


@blueprint.put("/blocks/<user_id>")
def block(user_id: str) -> ResponseReturnValue:
    db = session()
    created = block_user(db, current_user(), user_id)
    db.commit()
    return {"blocked": True, "user_id": user_id}, 201 if created else 200


@blueprint.delete("/blocks/<user_id>")
def unblock(user_id: str) -> ResponseReturnValue:
    db = session()
    unblock_user(db, current_user(), user_id)
    db.commit()
    return "", 204
