"""Image attachments: ask to upload one, and read one."""

from __future__ import annotations

from typing import Annotated

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.services import attachments as service
from app.web import current_user, object_store, parse_body, session

blueprint = Blueprint("attachments", __name__, url_prefix="/v1")


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # Shape only; the service says which names, types and sizes the policy takes.
    filename: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    content_type: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    size: int = Field(ge=1, le=2**40)


@blueprint.post("/attachments")
def request_upload() -> ResponseReturnValue:
    """201 with a presigned POST: the client sends the bytes to the store directly."""
    user, body = current_user(), parse_body(UploadBody)
    db = session()
    answer = service.request_upload(
        db,
        current_app.extensions["switchboard.policy"],
        object_store(),
        user,
        service.UploadRequest(body.filename, body.content_type.strip().lower(), body.size),
    )
    db.commit()
    return answer, 201


@blueprint.get("/attachments/<attachment_id>")
def get_attachment(attachment_id: str) -> ResponseReturnValue:
    return service.visible_attachment(session(), object_store(), current_user(), attachment_id)
