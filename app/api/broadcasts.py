"""Broadcasts: send one to an audience, the ones I received, my quota."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.api.conversations import MAX_PAGE_SIZE, ClientId
from app.policy import Policy
from app.services import broadcasts as service
from app.validation import ExternalId
from app.web import current_user, parse_body, parse_query, session
from workers.tasks import enqueue_broadcast

blueprint = Blueprint("broadcasts", __name__, url_prefix="/v1")

# A role name or "all"; whether it exists is the policy's answer (400 unknown_audience).
Audience = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


def policy() -> Policy:
    return current_app.extensions["switchboard.policy"]


class BroadcastBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    audience: Audience
    scope: ExternalId | None = None
    body: str
    client_id: ClientId


class InboxQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int | None = Field(default=None, ge=1, le=MAX_PAGE_SIZE)
    cursor: Annotated[str, StringConstraints(max_length=512)] | None = None


class NoFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QuotaQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: ExternalId | None = None


@blueprint.post("/broadcasts")
def send() -> ResponseReturnValue:
    """Check the policy, spend the quota and record the broadcast in one transaction;
    202 once committed. The broadcast worker fans it out."""
    user, body = current_user(), parse_body(BroadcastBody)
    db = session()
    accepted = service.accept_broadcast(
        db,
        policy(),
        user,
        audience=body.audience,
        scope=body.scope,
        body=body.body,
        client_id=body.client_id,
        enqueue=enqueue_broadcast,
    )
    db.commit()
    return {"id": str(accepted.broadcast_id), "status": accepted.status}, 202


@blueprint.get("/broadcasts")
def list_mine() -> ResponseReturnValue:
    query = parse_query(InboxQuery)
    return service.list_broadcasts(
        session(),
        current_user(),
        limit=query.limit or policy().message_page_size,
        cursor=query.cursor,
    )


@blueprint.get("/broadcasts/quota")
def quota() -> ResponseReturnValue:
    query = parse_query(QuotaQuery)
    return service.quota_status(session(), policy(), current_user(), query.scope, datetime.now(UTC))


@blueprint.get("/broadcasts/<broadcast_id>")
def get_one(broadcast_id: str) -> ResponseReturnValue:
    return service.get_broadcast(session(), current_user(), broadcast_id)


@blueprint.post("/broadcasts/<broadcast_id>/read")
def read(broadcast_id: str) -> ResponseReturnValue:
    user = current_user()
    if request.get_data():
        parse_body(NoFields)  # nothing to say yet; refuse what it does not understand
    db = session()
    state = service.mark_broadcast_read(db, user, broadcast_id)
    db.commit()
    return state
