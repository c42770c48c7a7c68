"""The shapes of the API's responses, as pydantic models.

The handlers return the services' plain dicts (the send and list paths are hot, and
re-validating every answer would cost them); these models describe those dicts for
`/openapi.json`. They are kept honest by tests/test_fuzz.py, which checks every response
the fuzzer provokes against them: `extra="forbid"` makes an undocumented field a failure,
not a silent drift.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------ errors


class ErrorDetail(_Shape):
    code: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="A stable snake_case code a program can switch on.",
    )
    message: str = Field(description="For a person; wording may change.")
    detail: dict[str, Any] | None = Field(
        default=None, description="Machine-readable details, where the code has any."
    )


class Error(_Shape):
    """Every error the API answers, 404, 405 and 500 included."""

    error: ErrorDetail


# ------------------------------------------------------------------------------ health


class Health(_Shape):
    status: Literal["ok"]


class Ready(_Shape):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description="Each dependency: `ok`, or what is wrong.")
    error: ErrorDetail | None = Field(default=None, description="Only when not ready (503).")


class WorkerChecks(_Shape):
    sends_queued: int
    oldest_queued_seconds: float
    stalled_after_seconds: float


class Workers(_Shape):
    status: Literal["ok", "stalled"]
    checks: WorkerChecks
    error: ErrorDetail | None = Field(default=None, description="Only when stalled (503).")


# ------------------------------------------------------------------------------- users


class UserOut(_Shape):
    id: str
    tenant: str
    role: str
    tier: str
    display_name: str
    tier_changed_at: datetime | None


class Me(UserOut):
    last_event_id: int = Field(
        description="Open the stream with `?last_event_id=` this to get everything after it."
    )


class Person(_Shape):
    id: str
    display_name: str
    role: str


# ------------------------------------------------------------------------ conversations


class Subject(_Shape):
    type: str
    id: str


class Deletion(_Shape):
    at: datetime | None
    reason: str | None


class LastMessage(_Shape):
    id: uuid.UUID
    sender_id: str
    created_at: datetime | None
    deleted: Deletion | None
    preview: str | None = Field(description="null once deleted.")
    attachment_count: int


class Conversation(_Shape):
    id: uuid.UUID
    subject: Subject | None
    status: Literal["active", "archived"] = Field(description="The conversation's own status.")
    participants: list[Person]
    other_participants: list[Person]
    created_at: datetime | None
    last_activity_at: datetime | None
    last_message: LastMessage | None
    unread_count: int
    archived: bool = Field(description="Archived by me (my list hides it unless ?archived).")


class ConversationPage(_Shape):
    items: list[Conversation]
    next_cursor: str | None


class ReadState(_Shape):
    conversation_id: uuid.UUID
    last_read_message_id: uuid.UUID | None
    unread_count: int


class Unread(_Shape):
    total: int
    conversations: int = Field(description="How many conversations have unread messages.")


# ---------------------------------------------------------------------------- messages


class AttachmentOut(_Shape):
    id: uuid.UUID
    status: Literal["pending", "ready", "rejected", "deleted"]
    filename: str
    content_type: str
    size: int
    width: int | None
    height: int | None
    reason: str | None = Field(default=None, description="Only when rejected.")
    url: str | None = Field(description="Signed, short-lived; null unless ready.")
    thumbnail_url: str | None = Field(description="Signed, short-lived; null unless ready.")


class Upload(_Shape):
    method: Literal["POST"]
    url: str
    fields: dict[str, str] = Field(description="Form fields to send before the `file` field.")


class UploadTicket(AttachmentOut):
    upload: Upload
    expires_at: datetime


class MessageOut(_Shape):
    id: uuid.UUID
    conversation_id: uuid.UUID
    sender_id: str
    client_id: str
    status: Literal["queued", "stored", "rejected"]
    body: str | None = Field(description="null once deleted (a placeholder).")
    created_at: datetime | None
    expires_at: datetime | None
    deleted: Deletion | None
    attachments: list[AttachmentOut]
    reason: str | None = Field(default=None, description="Only when rejected: why.")


class MessagePage(_Shape):
    items: list[MessageOut]
    next_cursor: str | None


class Accepted(_Shape):
    """A send or broadcast taken on: the id it will have. A repeat of an earlier one (the
    same client_id and body) answers with where that one stands."""

    id: uuid.UUID
    status: Literal["queued", "stored", "rejected"]


# -------------------------------------------------------------------------- broadcasts


class BroadcastOut(_Shape):
    id: uuid.UUID
    sender_id: str
    audience: str
    scope: str | None
    body: str | None
    created_at: datetime
    # A recipient's view:
    read: bool | None = None
    read_at: datetime | None = None
    # The sender's view:
    client_id: str | None = None
    status: Literal["queued", "stored", "rejected"] | None = None
    recipient_count: int | None = None
    reason: str | None = None


class BroadcastPage(_Shape):
    items: list[BroadcastOut]
    next_cursor: str | None


class BroadcastRead(_Shape):
    id: uuid.UUID
    read: Literal[True]
    read_at: datetime


class QuotaRule(_Shape):
    audiences: list[str]
    quota: int | None = Field(description="null: no quota.")
    period: Literal["day", "none"]
    period_start: datetime | None = None
    used: int | None
    left: int | None
    resets_at: datetime | None


class Quota(_Shape):
    scope: str | None
    rules: list[QuotaRule] = Field(description="The rule for my role; empty if I may not.")


# -------------------------------------------------------------------------- moderation


class ReportOut(_Shape):
    id: uuid.UUID
    message_id: uuid.UUID
    reason: str
    note: str | None
    status: Literal["pending", "removed", "dismissed"]
    created_at: datetime
    resolved_at: datetime | None


class Resolution(_Shape):
    action: Literal["remove", "dismiss"]
    by: str | None
    at: datetime | None
    note: str | None


class ModerationReport(ReportOut):
    reporter: Person
    sender: Person
    message: MessageOut
    resolution: Resolution | None


class ReportPage(_Shape):
    items: list[ModerationReport]
    next_cursor: str | None


# ------------------------------------------------------------------------------ people


class Permission(_Shape):
    user_id: str
    can_start: bool
    rule: str | None = Field(description="The policy rule that says no, when it does.")
    reason: str | None
    conversation_id: uuid.UUID | None = Field(description="Our existing conversation, if any.")


class BlockList(_Shape):
    items: list[str] = Field(description="The ids of the users I block.")


class Blocked(_Shape):
    blocked: Literal[True]
    user_id: str
