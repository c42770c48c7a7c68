"""Retention: messages past their expiry are soft-deleted, soft-deleted ones are purged
after the policy's delay, and a sender's tier change moves their messages' expiries.

The two jobs work in bounded batches, each in the caller's (short) transaction; the job
loops over batches, committing each (see schedules/jobs.py). A batch claims its rows,
and the rows of their conversations, with FOR UPDATE SKIP LOCKED: it never waits for a
send, a read or a delete in those conversations (it takes the next rows instead, and
the skipped ones on a later batch or run), so it cannot deadlock with them, and two runs
at once (two beats, or a beat and an operator) claim disjoint rows.

Lock order, as everywhere (see app/services/messages.py): conversations and messages
first, the users' event sequences last.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import bindparam, insert, text
from sqlalchemy.orm import Session

from app.events import append_events
from app.models import AuditLog, Message
from app.policy import Policy
from app.services.attachments import delete_with_messages
from app.services.messages import message_json

log = logging.getLogger(__name__)

#: Messages soft-deleted per transaction: each costs two statements for its events (the
#: rest is set-based), so a batch holds its conversations' and users' locks for a few
#: hundred milliseconds at most.
SOFT_DELETE_BATCH = 200
#: Messages purged per transaction: a handful of set-based statements whatever the size.
PURGE_BATCH = 500
EXPIRED = "expired"

# Expired messages not yet deleted, oldest expiry first, with their conversations; rows
# another transaction holds are skipped rather than waited for.
_CLAIM_EXPIRED = text(
    """
    SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE m.deleted_at IS NULL AND m.status = 'stored' AND m.expires_at <= :now
    ORDER BY m.expires_at
    LIMIT :limit
    FOR UPDATE OF m, c SKIP LOCKED
    """
)

# Recipients who had not read a deleted message have one unread message fewer per such
# message (the set-based form of soft_delete_message's correction).
_CORRECT_UNREAD = text(
    """
    UPDATE participants p SET unread_count = GREATEST(p.unread_count - d.n, 0)
    FROM (
        SELECT p2.conversation_id, p2.user_id, count(*) AS n
        FROM participants p2 JOIN messages m ON m.conversation_id = p2.conversation_id
        WHERE m.id = ANY(:ids) AND p2.user_id <> m.sender_id
          AND (p2.last_read_at IS NULL
               OR (p2.last_read_at, p2.last_read_message_id) < (m.created_at, m.id))
        GROUP BY p2.conversation_id, p2.user_id
    ) d
    WHERE p.conversation_id = d.conversation_id AND p.user_id = d.user_id
      AND p.unread_count > 0
    """
).bindparams(bindparam("ids"))

_PARTICIPANTS = text(
    "SELECT conversation_id, user_id FROM participants WHERE conversation_id = ANY(:ids)"
).bindparams(bindparam("ids"))

# append_events locks each message's recipients in id order; across the messages of a
# batch that order would not be global, so lock every recipient of the batch up front.
_LOCK_USERS = text("SELECT id FROM users WHERE id = ANY(:ids) ORDER BY id FOR UPDATE").bindparams(
    bindparam("ids")
)


def soft_delete_expired(session: Session, now: datetime, *, limit: int = SOFT_DELETE_BATCH) -> int:
    """Soft-delete up to `limit` messages whose expiry is at or before `now`, in the
    caller's transaction; returns how many.

    What `soft_delete_message(reason="expired", actor_id=None)` does to one message, for
    a batch: body gone and a placeholder with the reason, unread counts corrected, one
    audit row per message and a `message.deleted` event to every participant (announced
    after commit). Its cost is about eight statements per message; here it is five per
    batch plus append_events's two per message. `deleted_at` is `now`, the run's clock,
    so the purge delay counts from the moment the run stands for.
    """
    ids = session.execute(_CLAIM_EXPIRED, {"now": now, "limit": limit}).scalars().all()
    if not ids:
        return 0
    table = Message.__table__
    rows = session.execute(
        table.update()
        .where(table.c.id.in_(ids), table.c.deleted_at.is_(None))
        .values(deleted_at=now, deleted_by=None, delete_reason=EXPIRED, body=None)
        .returning(*table.c)
    ).all()
    if not rows:
        return 0
    deleted = [row.id for row in rows]
    session.execute(_CORRECT_UNREAD, {"ids": deleted})
    # Their photos go with them (objects deleted by a task after commit).
    delete_with_messages(session, [row.id for row in rows if row.attachment_count])
    session.execute(
        insert(AuditLog),
        [
            {
                "tenant_id": row.tenant_id,
                "actor_id": None,
                "action": "message.deleted",
                "target_type": "message",
                "target_id": str(row.id),
                "detail": {"reason": EXPIRED},
            }
            for row in rows
        ],
    )
    recipients: dict[uuid.UUID, list[str]] = defaultdict(list)
    conversations = sorted({row.conversation_id for row in rows})
    for conversation_id, user_id in session.execute(_PARTICIPANTS, {"ids": conversations}):
        recipients[conversation_id].append(user_id)
    everyone = sorted({user for users in recipients.values() for user in users})
    session.execute(_LOCK_USERS, {"ids": everyone}).all()
    for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
        append_events(
            session, recipients[row.conversation_id], "message.deleted", message_json(row)
        )
    return len(rows)


# Soft-deleted messages past the purge delay and not under an open report, with their
# conversations (whose last message may change); held rows are skipped.
_CLAIM_PURGEABLE = text(
    """
    SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE m.deleted_at IS NOT NULL AND m.deleted_at <= :cutoff
      AND NOT EXISTS (
          SELECT 1 FROM reports r WHERE r.message_id = m.id AND r.status = 'pending')
    ORDER BY m.deleted_at
    LIMIT :limit
    FOR UPDATE OF m, c SKIP LOCKED
    """
)

# The report check again, in a statement of its own: its snapshot is taken after the
# claim's locks, so a report committed in between is seen and its message kept. (A report
# filed after this waits on the message's lock, then finds it gone.)
_DELETE_CLAIMED = text(
    """
    DELETE FROM messages m
    WHERE m.id = ANY(:ids)
      AND NOT EXISTS (
          SELECT 1 FROM reports r WHERE r.message_id = m.id AND r.status = 'pending')
    RETURNING m.id, m.conversation_id
    """
).bindparams(bindparam("ids"))

# A purged message's events stay in its recipients' logs, content scrubbed: deleting them
# would leave holes in each user's sequence, and the stream's resume (which replays from
# a sequence number and treats a missing one as the log's edge) would tell the client to
# resync, or skip. The scrubbed event keeps the ids a client needs to drop the message.
_SCRUB_EVENTS = text(
    """
    UPDATE user_events
    SET payload = jsonb_build_object(
        'id', payload -> 'id', 'conversation_id', payload -> 'conversation_id', 'purged', true)
    WHERE (payload ->> 'id') = ANY(:ids)
      AND type IN ('message.created', 'message.deleted')
    """
).bindparams(bindparam("ids"))

# A conversation whose last message was purged shows the newest one left (or none).
_REPOINT_LAST_MESSAGE = text(
    """
    UPDATE conversations c SET last_message_id = (
        SELECT m.id FROM messages m
        WHERE m.conversation_id = c.id AND m.status = 'stored'
        ORDER BY m.created_at DESC, m.id DESC LIMIT 1)
    WHERE c.id = ANY(:conversations) AND c.last_message_id = ANY(:ids)
    """
).bindparams(bindparam("conversations"), bindparam("ids"))


def purge_deleted(
    session: Session, policy: Policy, now: datetime, *, limit: int = PURGE_BATCH
) -> int:
    """Delete up to `limit` messages soft-deleted at least the policy's `purge_after_days`
    before `now`, except those under a pending report (kept until it is resolved), in the
    caller's transaction; scrub their events' content. Returns how many went."""
    cutoff = now - timedelta(days=policy.purge_after_days)
    ids = session.execute(_CLAIM_PURGEABLE, {"cutoff": cutoff, "limit": limit}).scalars().all()
    if not ids:
        return 0
    purged = session.execute(_DELETE_CLAIMED, {"ids": list(ids)}).all()
    if not purged:
        return 0
    purged_ids = [row.id for row in purged]
    session.execute(_SCRUB_EVENTS, {"ids": [str(message_id) for message_id in purged_ids]})
    session.execute(
        _REPOINT_LAST_MESSAGE,
        {"conversations": sorted({row.conversation_id for row in purged}), "ids": purged_ids},
    )
    return len(purged)


# Every live message of the sender moves to its new expiry (see apply_tier_change). Queued
# sends are matched too and keep no expiry: matching one makes this statement wait for a
# worker storing it with the old tier, then re-evaluate the row with the expiry it got.
_NEW_EXPIRY = (
    "GREATEST(created_at + make_interval(days => :days), LEAST(expires_at, :grace_ends_at))"
)
_MOVE_EXPIRIES = text(
    f"""
    UPDATE messages SET expires_at = CASE WHEN expires_at IS NULL THEN NULL ELSE {_NEW_EXPIRY} END
    WHERE sender_id = :sender_id AND deleted_at IS NULL AND status <> 'rejected'
      AND (expires_at IS NULL OR expires_at <> {_NEW_EXPIRY})
    """
)


def apply_tier_change(
    session: Session, policy: Policy, sender_id: str, new_tier: str, changed_at: datetime
) -> int:
    """Move the expiries of `sender_id`'s messages for their new tier, in one statement in
    the caller's transaction; returns how many changed.

    Each live message gets the later of `created_at + new retention` and the earlier of
    its current expiry and the end of the downgrade grace (`changed_at +
    downgrade_grace_days`). So on a downgrade a message keeps its expiry until the grace
    ends and never lives longer than it would have; on an upgrade the longer retention
    applies at once. It needs no old tier: it holds for a message stored under any tier,
    and for a second change within a grace period. Messages sent later get the new tier's
    retention (the grace protects what was sent under the old one).
    """
    result = session.execute(
        _MOVE_EXPIRIES,
        {
            "days": policy.retention_days(new_tier),
            "grace_ends_at": policy.grace_ends_at(changed_at),
            "sender_id": sender_id,
        },
    )
    return int(result.rowcount or 0)
