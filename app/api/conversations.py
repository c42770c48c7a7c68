"""Conversations and their messages: start, list, read, history, send."""

from __future__ import annotations

import logging
from typing import Annotated

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from app.policy import Policy
from app.problems import ApiError
from app.services import conversations as service
from app.services.messages import history
from app.services.sends import SenderRef, accept_plain_send, accept_send
from app.validation import ExternalId
from app.web import (
    current_claims,
    current_user,
    database,
    object_store,
    parse_body,
    parse_query,
    session,
)
from workers.tasks import enqueue_send

log = logging.getLogger(__name__)
blueprint = Blueprint("conversations", __name__, url_prefix="/v1")

MAX_PAGE_SIZE = 100
ClientId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:@+\-]{1,128}$")]


def policy() -> Policy:
    return current_app.extensions["switchboard.policy"]


class SubjectBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    id: ExternalId


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    participant_id: ExternalId
    subject: SubjectBody | None = None


class PageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int | None = Field(default=None, ge=1, le=MAX_PAGE_SIZE)
    cursor: Annotated[str, StringConstraints(max_length=512)] | None = None
    archived: bool = False


class HistoryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int | None = Field(default=None, ge=1, le=MAX_PAGE_SIZE)
    before: Annotated[str, StringConstraints(max_length=64)] | None = None


class ReadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    message_id: Annotated[str, StringConstraints(max_length=64)] | None = None


class ArchiveBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    archived: bool


class SendBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # Required, and may be "" when the message carries attachments.
    body: str
    client_id: ClientId
    attachment_ids: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=20
    )


@blueprint.post("/conversations")
def start() -> ResponseReturnValue:
    user = current_user()
    body = parse_body(StartBody)
    subject = service.Subject(body.subject.type, body.subject.id) if body.subject else None
    db = session()
    conversation, created = service.start_conversation(
        db, policy(), user, body.participant_id, subject
    )
    db.commit()
    return service.get_conversation(db, user, str(conversation.id)), 201 if created else 200


@blueprint.get("/conversations")
def list_mine() -> ResponseReturnValue:
    query = parse_query(PageQuery)
    return service.list_conversations(
        session(),
        current_user(),
        limit=query.limit or policy().conversation_page_size,
        cursor=query.cursor,
        archived=query.archived,
    )


@blueprint.get("/conversations/<conversation_id>")
def get_one(conversation_id: str) -> ResponseReturnValue:
    return service.get_conversation(session(), current_user(), conversation_id)


@blueprint.patch("/conversations/<conversation_id>")
def archive(conversation_id: str) -> ResponseReturnValue:
    user, body = current_user(), parse_body(ArchiveBody)
    db = session()
    service.set_archived(db, user, conversation_id, body.archived)
    db.commit()
    return service.get_conversation(db, user, conversation_id)


@blueprint.post("/conversations/<conversation_id>/read")
def read(conversation_id: str) -> ResponseReturnValue:
    user = current_user()
    # Every field is optional, so no body at all means "read up to the latest".
    body = parse_body(ReadBody) if request.get_data() else ReadBody()
    db = session()
    state = service.mark_read(db, user, conversation_id, body.message_id)
    db.commit()
    return state


@blueprint.get("/unread")
def unread() -> ResponseReturnValue:
    return service.unread_totals(session(), current_user())


@blueprint.get("/conversations/<conversation_id>/messages")
def list_messages(conversation_id: str) -> ResponseReturnValue:
    query = parse_query(HistoryQuery)
    return history(
        session(),
        current_user(),
        conversation_id,
        limit=query.limit or policy().message_page_size,
        before=query.before,
        store=object_store(),
    )


@blueprint.post("/conversations/<conversation_id>/messages")
def send(conversation_id: str) -> ResponseReturnValue:
    """Validate, pre-check and record the send; the worker decides and stores it.
    202 with the id once the send is committed, so an accepted send is never lost.

    No `User` is loaded: the pre-check query answers 401 `unknown_user` itself."""
    claims = current_claims()
    try:
        body = parse_body(SendBody)
    except (ApiError, ValidationError):
        # A bad body from an unprovisioned user's token is a 401, as on every route
        # (the user is checked before the body). Only this error path pays the look-up.
        current_user()
        raise
    sender = SenderRef(claims.user_id, claims.tenant_id)
    if not body.attachment_ids:
        # Two atomic statements on an autocommit connection: no transaction, no session.
        with database().autocommit_engine.connect() as connection:
            accepted = accept_plain_send(
                connection,
                policy(),
                sender,
                conversation_id,
                body.body,
                body.client_id,
                enqueue=enqueue_send,
            )
    else:
        db = session()
        accepted = accept_send(
            db,
            policy(),
            sender,
            conversation_id,
            body.body,
            body.client_id,
            enqueue=enqueue_send,
            attachment_ids=body.attachment_ids,
            store=object_store(),
        )
        db.commit()
    return {"id": str(accepted.message_id), "status": accepted.status}, 202
