"""Moderation: members report messages, moderators work the queue and remove or dismiss.

Decisions (the README says the same to API users):

- Who may report: whoever can see the message, as `visible_message` decides (a participant
  of its conversation, in their tenant). Only stored messages can be reported: a queued or
  rejected send is visible to its sender alone, and nobody may report their own message
  (403 `own_message`: removing it is `DELETE /v1/messages/<id>`). A message already
  deleted has nothing left to act on: 409 `message_deleted`.
- One report per reporter and message, ever (the table's unique key): a repeat answers
  200 with the first report as it stands now, pending or resolved, whatever reason it
  gives. A dismissal is final for that reporter, so nobody can keep a message in the
  queue (and out of the purge) by reporting it again after each dismissal.
- Resolving: `remove` soft-deletes the message for everyone (placeholder with reason
  `removed_by_moderator`) and resolves every pending report of it; `dismiss` resolves the
  one report. Repeating the action a report was resolved with answers 200 with the same
  state (a retried request is harmless); the other action is 409 `report_resolved`.
- Report statuses stay 'pending', 'removed', 'dismissed': the retention purge keeps any
  message with a 'pending' report.

Lock order, as on every path that changes messages: the conversation, then the message,
then (here) its reports, then (in `append_events`) the users' event sequences.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from app.models import AuditLog, Conversation, Message, Report, User
from app.policy import Policy
from app.problems import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge
from app.services.access import actor, parse_uuid
from app.services.attachments import attachments_of_messages
from app.services.messages import message_json, soft_delete_message, visible_message
from app.services.pagination import decode_cursor, encode_cursor
from app.storage import ObjectStore

#: Longest note a reporter or a moderator may write, in characters.
NOTE_MAX_LENGTH = 1000
#: The delete reason a moderator's removal leaves on the placeholder.
REMOVED_BY_MODERATOR = "removed_by_moderator"

Action = Literal["remove", "dismiss"]
QueueStatus = Literal["pending", "resolved"]
_STATUS_AFTER: dict[str, str] = {"remove": "removed", "dismiss": "dismissed"}
_ACTION_OF: dict[str, str] = {status: action for action, status in _STATUS_AFTER.items()}


@dataclass(frozen=True, slots=True)
class FiledReport:
    report: Report
    created: bool  # False: the reporter had reported this message before


@dataclass(frozen=True, slots=True)
class Resolution:
    report: Report
    # The reports this call resolved (none when it repeated an earlier resolution).
    resolved: list[Report] = field(default_factory=list)


def _clean_note(note: str | None, field_name: str) -> str | None:
    if note is None or not note.strip():
        return None
    if len(note) > NOTE_MAX_LENGTH:
        raise PayloadTooLarge(
            f"{field_name}: at most {NOTE_MAX_LENGTH} characters.", code="note_too_long"
        )
    return note


def _require_moderator(policy: Policy, user: User) -> None:
    if not policy.may_moderate(actor(user)):
        raise Forbidden("Only moderators may see and resolve reports.", code="not_moderator")


def file_report(
    session: Session,
    policy: Policy,
    reporter: User,
    message_id: str,
    reason: str,
    note: str | None = None,
) -> FiledReport:
    """Report a message the reporter can see; the existing report if they did before.

    Checks everything before writing: a refused report writes nothing."""
    reasons = policy.report_reasons()
    if reason not in reasons:
        raise BadRequest(f"reason: must be one of {', '.join(reasons)}.", code="unknown_reason")
    note = _clean_note(note, "note")
    message = visible_message(session, reporter, message_id)
    if message.sender_id == reporter.id:
        raise Forbidden(
            "You cannot report your own message; you may delete it.", code="own_message"
        )
    existing = _report_by(session, message.id, reporter.id)
    if existing is not None:
        return FiledReport(existing, created=False)
    # FOR SHARE: a moderator's removal (which locks the message FOR UPDATE) either
    # commits before we look, and we see the message deleted, or waits for this report
    # and then resolves it with the others; never a pending report on a removed message.
    deleted_at = session.scalar(
        select(Message.deleted_at).where(Message.id == message.id).with_for_update(read=True)
    )
    if deleted_at is not None:
        raise Conflict("This message has been deleted already.", code="message_deleted")
    # ON CONFLICT: two identical requests at once file one report; the loser reads it.
    inserted = session.scalar(
        insert(Report)
        .values(
            id=uuid.uuid4(),
            tenant_id=reporter.tenant_id,
            message_id=message.id,
            reporter_id=reporter.id,
            reason=reason,
            note=note,
        )
        .on_conflict_do_nothing(index_elements=[Report.message_id, Report.reporter_id])
        .returning(Report.id)
    )
    report = _report_by(session, message.id, reporter.id)
    assert report is not None  # inserted now, or by a concurrent twin that committed
    return FiledReport(report, created=inserted is not None)


def _report_by(session: Session, message_id: uuid.UUID, reporter_id: str) -> Report | None:
    return session.scalars(
        select(Report)
        .where(Report.message_id == message_id, Report.reporter_id == reporter_id)
        .execution_options(populate_existing=True)
    ).first()


def report_json(report: Report) -> dict[str, Any]:
    """A report as its reporter sees it: what they said and where it stands."""
    return {
        "id": str(report.id),
        "message_id": str(report.message_id),
        "reason": report.reason,
        "note": report.note,
        "status": report.status,
        "created_at": report.created_at.isoformat(),
        "resolved_at": report.resolved_at.isoformat() if report.resolved_at else None,
    }


def _person(user: User) -> dict[str, Any]:
    return {"id": user.id, "display_name": user.display_name, "role": user.role}


def moderation_json(
    report: Report,
    message: Message,
    reporter: User,
    sender: User,
    attachments: list[dict[str, Any]] | None = None,
) -> dict:
    """A report as moderators see it: with the message, body and photos included while
    they exist (a moderator may see a reported photo without being in the conversation)."""
    resolution = None
    if report.status != "pending":
        resolution = {
            "action": _ACTION_OF[report.status],
            "by": report.resolved_by,
            "at": report.resolved_at.isoformat() if report.resolved_at else None,
            "note": report.resolution_note,
        }
    return report_json(report) | {
        "reporter": _person(reporter),
        "sender": _person(sender),
        "message": message_json(message, attachments),
        "resolution": resolution,
    }


_Reporter, _Sender = aliased(User, name="reporter"), aliased(User, name="sender")


def _queue_query(tenant_id: str) -> Select:
    return (
        select(Report, Message, _Reporter, _Sender)
        .join(Message, Message.id == Report.message_id)
        .join(_Reporter, _Reporter.id == Report.reporter_id)
        .join(_Sender, _Sender.id == Message.sender_id)
        .where(Report.tenant_id == tenant_id, Message.tenant_id == tenant_id)
    )


def list_reports(
    session: Session,
    policy: Policy,
    moderator: User,
    *,
    status: QueueStatus,
    limit: int,
    cursor: str | None,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """The tenant's reports, oldest first, one keyset page by (created_at, id)."""
    _require_moderator(policy, moderator)
    query = _queue_query(moderator.tenant_id)
    if status == "pending":
        query = query.where(Report.status == "pending")
    else:
        query = query.where(Report.status != "pending")
    if cursor:
        moment, report_id = decode_cursor(cursor)
        query = query.where(tuple_(Report.created_at, Report.id) > tuple_(moment, report_id))
    rows = session.execute(query.order_by(Report.created_at, Report.id).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(page[-1].Report.created_at, page[-1].Report.id)
    attachments = attachments_of_messages(session, store, [row.Message for row in page])
    return {
        "items": [moderation_json(*row, attachments.get(row.Message.id)) for row in page],
        "next_cursor": next_cursor,
    }


def get_report(
    session: Session,
    policy: Policy,
    moderator: User,
    report_id: str,
    store: ObjectStore | None = None,
) -> dict:
    """One report of the moderator's tenant, as the queue shows it."""
    _require_moderator(policy, moderator)
    row = session.execute(
        _queue_query(moderator.tenant_id).where(Report.id == parse_uuid(report_id, "report"))
    ).first()
    if row is None:
        raise NotFound("No such report.", code="report_not_found")
    attachments = attachments_of_messages(session, store, [row.Message])
    return moderation_json(*row, attachments.get(row.Message.id))


def resolve_report(
    session: Session,
    policy: Policy,
    moderator: User,
    report_id: str,
    action: Action,
    note: str | None = None,
) -> Resolution:
    """Remove the reported message (resolving every pending report of it) or dismiss
    this report, with an audit row; repeating the same resolution changes nothing."""
    _require_moderator(policy, moderator)
    if action not in _STATUS_AFTER:
        raise BadRequest("action: must be remove or dismiss.", code="unknown_action")
    note = _clean_note(note, "note")
    found = session.execute(
        select(Report.message_id, Message.conversation_id)
        .join(Message, Message.id == Report.message_id)
        .where(
            Report.id == parse_uuid(report_id, "report"),
            Report.tenant_id == moderator.tenant_id,
        )
    ).first()
    if found is None:
        raise NotFound("No such report.", code="report_not_found")
    session.execute(
        select(Conversation.id).where(Conversation.id == found.conversation_id).with_for_update()
    )
    session.execute(select(Message.id).where(Message.id == found.message_id).with_for_update())
    report = session.scalars(
        select(Report)
        .where(Report.id == parse_uuid(report_id, "report"))
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if report is None:  # purged with its message while we waited
        raise NotFound("No such report.", code="report_not_found")

    wanted = _STATUS_AFTER[action]
    if report.status == wanted:
        return Resolution(report)
    if report.status != "pending":
        raise Conflict(
            f"This report was already resolved ({report.status}).", code="report_resolved"
        )

    if action == "dismiss":
        targets = [report]
    else:
        targets = list(
            session.scalars(
                select(Report)
                .where(Report.message_id == report.message_id, Report.status == "pending")
                .order_by(Report.id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        )
        # A no-op (and no audit row of its own) if the sender or the retention job
        # deleted it first; the report's own audit row below still records the removal.
        soft_delete_message(
            session,
            report.message_id,
            reason=REMOVED_BY_MODERATOR,
            actor_id=moderator.id,
            audit_detail={"report_id": str(report.id), "note": note},
        )
    now = session.scalar(select(func.clock_timestamp()))
    for target in targets:
        target.status, target.resolved_at = wanted, now
        target.resolved_by, target.resolution_note = moderator.id, note
    session.add(
        AuditLog(
            tenant_id=moderator.tenant_id,
            actor_id=moderator.id,
            action=f"report.{wanted}",
            target_type="report",
            target_id=str(report.id),
            detail={
                "message_id": str(report.message_id),
                "note": note,
                "reports": [str(target.id) for target in targets],
            },
        )
    )
    session.flush()
    return Resolution(report, targets)


def pending_reports_summary(session: Session) -> tuple[int, float]:
    """How many reports await a moderator (all tenants), and how long the oldest has."""
    count, age = session.execute(
        select(
            func.count(),
            func.coalesce(
                func.extract("epoch", func.clock_timestamp() - func.min(Report.created_at)), 0
            ),
        ).where(Report.status == "pending")
    ).one()
    return int(count), float(age)
