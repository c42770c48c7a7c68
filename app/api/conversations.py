"""Conversations and their messages: start, list, read, history, send."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated

import kombu.exceptions
import redis
from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.models import Message
from app.policy import Decision, Policy
from app.problems import ApiError, BadRequest, Conflict, Forbidden, PayloadTooLarge, Unavailable
from app.services import conversations as service
from app.services.messages import (
    SendCommand,
    body_digest,
    decide_send,
    history,
    message_id_for,
)
from app.services.sends import PendingSends
from app.validation import ExternalId
from app.web import current_user, parse_body, parse_query, session
from workers.tasks import send_message

log = logging.getLogger(__name__)
blueprint = Blueprint("conversations", __name__, url_prefix="/v1")

MAX_PAGE_SIZE = 100
ClientId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:@+\-]{1,128}$")]


def policy() -> Policy:
    return current_app.extensions["switchboard.policy"]


def pending_sends() -> PendingSends:
    return PendingSends(current_app.extensions["switchboard.redis"])


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
    body: str
    client_id: ClientId


def refusal(decision: Decision) -> ApiError:
    """The HTTP error for a refused decision: 413 too long, 400 bad body, else 403."""
    if decision.rule == "message_too_long":
        return PayloadTooLarge(decision.reason, code="message_too_long")
    if decision.rule == "empty_message":
        return BadRequest(decision.reason, code="empty_message")
    return Forbidden(decision.reason, code=decision.rule or "forbidden")


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
    user, body = current_user(), parse_body(ReadBody)
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
    )


@blueprint.post("/conversations/<conversation_id>/messages")
def send(conversation_id: str) -> ResponseReturnValue:
    """Validate, pre-check and enqueue; the worker decides and stores. 202 with the id."""
    user, body = current_user(), parse_body(SendBody)
    db = session()
    conversation, _ = service.member_conversation(db, user, conversation_id)
    message_id, digest = message_id_for(user.id, body.client_id), body_digest(body.body)

    def same_send(conversation_of_earlier: str, digest_of_earlier: str) -> None:
        if (conversation_of_earlier, digest_of_earlier) != (str(conversation.id), digest):
            raise Conflict(
                "This client_id was already used for another message.", code="client_id_reused"
            )

    stored = db.get(Message, message_id)
    if stored is not None:
        same_send(str(stored.conversation_id), stored.body_sha256)
        return {"id": str(message_id), "status": stored.status}, 202

    decision = decide_send(db, policy(), user, conversation.id, body.body)
    if not decision:
        raise refusal(decision)

    accepted_at = datetime.now(UTC).isoformat()
    pending = pending_sends()
    try:
        earlier = pending.claim(
            str(message_id),
            {
                "sender_id": user.id,
                "conversation_id": str(conversation.id),
                "body_sha256": digest,
                "accepted_at": accepted_at,
            },
        )
    except redis.RedisError as exc:
        raise Unavailable("Sending is unavailable; try again.", code="queue_unavailable") from exc
    if earlier is not None:
        same_send(earlier["conversation_id"], earlier["body_sha256"])
        accepted_at = earlier["accepted_at"]

    command = SendCommand(
        message_id=str(message_id),
        conversation_id=str(conversation.id),
        sender_id=user.id,
        client_id=body.client_id,
        body=body.body,
        accepted_at=accepted_at,
    )
    db.rollback()  # nothing written; end the read transaction before talking to the broker
    try:
        # Enqueued again on a repeat: the task is idempotent, and a repeat may be the
        # client retrying after the first enqueue was lost.
        send_message.apply_async(args=[command.as_task_argument()])
    except (kombu.exceptions.OperationalError, redis.RedisError, OSError) as exc:
        if earlier is None:
            pending.release(str(message_id))
        log.error("could not enqueue send %s: %r", message_id, exc)
        raise Unavailable("Sending is unavailable; try again.", code="queue_unavailable") from exc
    return {"id": str(message_id), "status": "queued"}, 202
