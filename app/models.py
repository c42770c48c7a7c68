"""The data model. Ids that come from the host app (tenants, users) are text;
ids Switchboard hands out are UUIDs.

Indexes follow the queries that use them:
- my conversations by latest activity:
  participants (user_id, last_activity_at DESC, conversation_id DESC)
- history newest first: messages (conversation_id, created_at DESC, id DESC)
- stream replay: user_events primary key (user_id, seq)
- retention: messages (expires_at) for the soft delete and (deleted_at) for the purge
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 128


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


def _uuid() -> uuid.UUID:
    return uuid.uuid4()


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(200))
    # The tier before the last change and when it changed: a downgrade keeps the
    # old retention for the policy's grace period.
    previous_tier: Mapped[str | None] = mapped_column(String(64))
    tier_changed_at: Mapped[datetime | None]
    # The last per-user event sequence handed out. Incremented under the row lock
    # inside the transaction that appends the event, so sequence order is commit
    # order and a reader resuming after N can never skip an event.
    last_event_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    # Composite key target so that rows referring to a user can also pin the tenant.
    __table_args__ = (UniqueConstraint("tenant_id", "id"),)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    # The two participants' ids, sorted and joined: one conversation per pair and subject.
    pair_key: Mapped[str] = mapped_column(String(2 * ID_LENGTH + 1))
    subject_type: Mapped[str | None] = mapped_column(String(64))
    subject_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    # '' when there is no subject, so the unique constraint treats "no subject" as one value.
    subject_key: Mapped[str] = mapped_column(String(ID_LENGTH + 65), server_default=text("''"))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'active'"))
    created_by: Mapped[str] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_activity_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_message_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))

    __table_args__ = (
        UniqueConstraint("tenant_id", "pair_key", "subject_key"),
        CheckConstraint("status IN ('active', 'archived')", name="status"),
    )


class Participant(Base):
    __tablename__ = "participants"

    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    # Copied from the conversation so that "my conversations by latest activity"
    # is one index range scan.
    last_activity_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_read_at: Mapped[datetime | None]
    last_read_message_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    unread_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    archived: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    joined_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (
        CheckConstraint("unread_count >= 0", name="unread_count_non_negative"),
        Index(
            "ix_participants_user_activity",
            "user_id",
            text("last_activity_at DESC"),
            text("conversation_id DESC"),
        ),
    )


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    sender_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    # Chosen by the client; a retried send with the same client id stores one message.
    client_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    body: Mapped[str | None] = mapped_column(Text)
    body_sha256: Mapped[str] = mapped_column(String(64))
    # queued (accepted by the API: the outbox row), then stored or rejected by a worker.
    status: Mapped[str] = mapped_column(String(16), server_default=text("'queued'"))
    rejection_reason: Mapped[str | None] = mapped_column(String(64))
    # When the API accepted the send: the message's place in its conversation.
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    decided_at: Mapped[datetime | None]
    # The sweeper's bookkeeping for sends no worker took (see app/services/sends.py).
    dispatched_at: Mapped[datetime | None]
    dispatch_count: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))
    expires_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    deleted_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"))
    delete_reason: Mapped[str | None] = mapped_column(String(64))
    # How many attachments it carries: reads look them up only where this says so.
    attachment_count: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))

    __table_args__ = (
        UniqueConstraint("sender_id", "client_id"),
        CheckConstraint("status IN ('queued', 'stored', 'rejected')", name="status"),
        Index(
            "ix_messages_conversation_history",
            "conversation_id",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text("status = 'stored'"),
        ),
        Index("ix_messages_expires_at", "expires_at", postgresql_where=text("deleted_at IS NULL")),
        Index("ix_messages_queued", "created_at", postgresql_where=text("status = 'queued'")),
        Index(
            "ix_messages_deleted_at", "deleted_at", postgresql_where=text("deleted_at IS NOT NULL")
        ),
    )


class JobState(Base):
    """One row per periodic job: the slot it last ran for (so a second beat's copy of
    the same run is skipped) and how its last run went."""

    __tablename__ = "job_state"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_slot: Mapped[datetime]
    last_started_at: Mapped[datetime | None]
    last_succeeded_at: Mapped[datetime | None]
    last_duration_seconds: Mapped[float | None]
    last_rows: Mapped[int | None]


class UserEvent(Base):
    """One user's event log: what their stream replays after a reconnect."""

    __tablename__ = "user_events"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)

    __table_args__ = (
        # The purge finds a message's events by its id to scrub their content (events are
        # kept, not deleted: a resume relies on each user's sequence having no gaps).
        Index(
            "ix_user_events_message_id",
            text("(payload ->> 'id')"),
            postgresql_where=text("type IN ('message.created', 'message.deleted')"),
        ),
    )


class Broadcast(Base):
    __tablename__ = "broadcasts"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    sender_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    client_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    audience: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(ID_LENGTH), server_default=text("''"))
    body: Mapped[str | None] = mapped_column(Text)
    body_sha256: Mapped[str] = mapped_column(String(64))
    # queued (accepted: the outbox row, fanning out), then stored or rejected.
    status: Mapped[str] = mapped_column(String(16), server_default=text("'queued'"))
    rejection_reason: Mapped[str | None] = mapped_column(String(64))
    recipient_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    deleted_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"))
    delete_reason: Mapped[str | None] = mapped_column(String(64))
    # The quota period key it was counted against (None: the rule has no quota).
    quota_period: Mapped[str | None] = mapped_column(String(32))
    # Fan-out walks recipients in id order; the last id reached (None: not started).
    fanout_cursor: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    decided_at: Mapped[datetime | None]
    # The sweeper's bookkeeping, as for sends (see app/services/broadcasts.py).
    dispatched_at: Mapped[datetime | None]
    dispatch_count: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))

    __table_args__ = (
        UniqueConstraint("sender_id", "client_id"),
        CheckConstraint("status IN ('queued', 'stored', 'rejected')", name="status"),
        Index(
            "ix_broadcasts_tenant_audience_created",
            "tenant_id",
            "audience",
            text("created_at DESC"),
        ),
        Index("ix_broadcasts_queued", "created_at", postgresql_where=text("status = 'queued'")),
    )


class BroadcastRecipient(Base):
    """One recipient's copy of a broadcast: their inbox row and its read state."""

    __tablename__ = "broadcast_recipients"

    broadcast_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("broadcasts.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    # Copied from the broadcast so that "my broadcasts, newest first" is one index scan.
    created_at: Mapped[datetime]
    read_at: Mapped[datetime | None]

    __table_args__ = (
        Index(
            "ix_broadcast_recipients_user_created",
            "user_id",
            text("created_at DESC"),
            text("broadcast_id DESC"),
        ),
    )


class BroadcastQuotaUsage(Base):
    """Broadcasts used per sender, scope and quota period (e.g. the day from 02:00 UTC)."""

    __tablename__ = "broadcast_quota_usage"

    sender_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    period: Mapped[str] = mapped_column(String(32), primary_key=True)
    used: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    message_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    reporter_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    reason: Mapped[str] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    resolved_at: Mapped[datetime | None]
    resolved_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"))
    # The moderator's why, shown in the queue (the audit row keeps it too).
    resolution_note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # One report per reporter and message, ever: a dismissal is final for that
        # reporter (see app/services/moderation.py).
        UniqueConstraint("message_id", "reporter_id"),
        CheckConstraint("status IN ('pending', 'removed', 'dismissed')", name="status"),
        CheckConstraint("(status = 'pending') = (resolved_at IS NULL)", name="resolved_at"),
        # The moderation queue, oldest first, keyset-paged by (created_at, id).
        Index(
            "ix_reports_queue_pending",
            "tenant_id",
            "created_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_reports_queue_resolved",
            "tenant_id",
            "created_at",
            "id",
            postgresql_where=text("status <> 'pending'"),
        ),
        # A message under an open report is kept from purge: the purge looks this up.
        Index(
            "ix_reports_pending_message", "message_id", postgresql_where=text("status = 'pending'")
        ),
    )


class Block(Base):
    __tablename__ = "blocks"

    blocker_id: Mapped[str] = mapped_column(primary_key=True)
    blocked_id: Mapped[str] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    # Both users must be in the block's tenant: the composite keys make the database say so.
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "blocker_id"], ["users.tenant_id", "users.id"], name="fk_blocks_blocker"
        ),
        ForeignKeyConstraint(
            ["tenant_id", "blocked_id"], ["users.tenant_id", "users.id"], name="fk_blocks_blocked"
        ),
        CheckConstraint("blocker_id <> blocked_id", name="not_self"),
    )


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    actor_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    detail: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (Index("ix_audit_log_tenant_created", "tenant_id", text("created_at DESC")),)


class Attachment(Base):
    """An image a user uploads to the object store, then sends with one message.

    pending (upload URL handed out), ready (the worker checked the bytes and made the
    thumbnail), rejected (the check failed: `rejection_reason`), deleted (gone with its
    message, or never sent: its objects are being deleted, then the row goes). The object
    keys derive from the random id (see app/services/attachments.py): no user data in them.
    """

    __tablename__ = "attachments"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    uploader_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    # Set when a send claims it (each attachment goes with one message); a purged message
    # leaves the row for the clean-up job, which deletes its objects first.
    message_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL")
    )
    filename: Mapped[str] = mapped_column(String(255))
    declared_type: Mapped[str] = mapped_column(String(64))
    declared_size: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"))
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    # What the worker found in the bytes.
    content_type: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    thumbnail_type: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    checked_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    objects_deleted_at: Mapped[datetime | None]

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'ready', 'rejected', 'deleted')", name="status"),
        Index(
            "ix_attachments_message_id",
            "message_id",
            postgresql_where=text("message_id IS NOT NULL"),
        ),
        # The clean-up job: uploads never sent, and objects still to delete.
        Index(
            "ix_attachments_unsent",
            "created_at",
            postgresql_where=text("message_id IS NULL AND status IN ('pending', 'ready')"),
        ),
        Index(
            "ix_attachments_objects_to_delete",
            "created_at",
            postgresql_where=text(
                "status IN ('rejected', 'deleted') AND objects_deleted_at IS NULL"
            ),
        ),
        Index("ix_attachments_uploader_created", "uploader_id", "created_at"),
    )
