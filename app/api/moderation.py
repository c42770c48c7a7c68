"""Reports of messages and the moderation queue."""

from __future__ import annotations

from typing import Annotated, Literal

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.policy import Policy
from app.services import moderation as service
from app.web import current_user, object_store, parse_body, parse_query, session
from monitoring.metrics import REPORTS_FILED, REPORTS_RESOLVED

blueprint = Blueprint("moderation", __name__, url_prefix="/v1")

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
# Generous bounds only: the service says which reasons exist (the policy adds some) and
# answers a long note with 413, as a long message is answered.
Reason = Annotated[str, StringConstraints(max_length=64)]
Note = Annotated[str, StringConstraints(max_length=10 * service.NOTE_MAX_LENGTH)]


def policy() -> Policy:
    return current_app.extensions["switchboard.policy"]


class ReportBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reason: Reason
    note: Note | None = None


class QueueQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["pending", "resolved"] = "pending"
    limit: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)
    cursor: Annotated[str, StringConstraints(max_length=512)] | None = None


class ResolveBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    action: Literal["remove", "dismiss"]
    note: Note | None = None


@blueprint.post("/messages/<message_id>/reports")
def report_message(message_id: str) -> ResponseReturnValue:
    """201 with the new report; 200 with the existing one if I reported it before."""
    user, body = current_user(), parse_body(ReportBody)
    db = session()
    filed = service.file_report(db, policy(), user, message_id, body.reason, body.note)
    db.commit()
    if not filed.created:
        return service.report_json(filed.report), 200
    REPORTS_FILED.labels(filed.report.reason).inc()
    return service.report_json(filed.report), 201


@blueprint.get("/moderation/reports")
def queue() -> ResponseReturnValue:
    user = current_user()
    query = parse_query(QueueQuery)
    return service.list_reports(
        session(),
        policy(),
        user,
        status=query.status,
        limit=query.limit,
        cursor=query.cursor,
        store=object_store(),
    )


@blueprint.get("/moderation/reports/<report_id>")
def get_report(report_id: str) -> ResponseReturnValue:
    return service.get_report(session(), policy(), current_user(), report_id, object_store())


@blueprint.post("/moderation/reports/<report_id>")
def resolve(report_id: str) -> ResponseReturnValue:
    """200 with the report as the queue now shows it, whether this call resolved it or
    repeated an earlier identical resolution."""
    user, body = current_user(), parse_body(ResolveBody)
    db = session()
    resolution = service.resolve_report(db, policy(), user, report_id, body.action, body.note)
    db.commit()
    if resolution.resolved:
        REPORTS_RESOLVED.labels(body.action).inc(len(resolution.resolved))
    return service.get_report(db, policy(), user, report_id, object_store())
