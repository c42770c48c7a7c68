"""attachments: images in the object store, one message each

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 07:00:00

`messages.attachment_count` defaults to 0, so adding it rewrites nothing (PostgreSQL 11+
stores the default in the catalog).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "messages",
        sa.Column(
            "attachment_count", sa.SmallInteger(), server_default=sa.text("0"), nullable=False
        ),
    )
    op.create_table(
        "attachments",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("uploader_id", sa.String(length=128), nullable=False),
        sa.Column("message_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("declared_type", sa.String(length=64), nullable=False),
        sa.Column("declared_size", sa.Integer(), nullable=False),
        sa.Column(
            "status", sa.String(length=16), server_default=sa.text("'pending'"), nullable=False
        ),
        sa.Column("rejection_reason", sa.Text(), nullable=True),
        sa.Column("content_type", sa.String(length=64), nullable=True),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("thumbnail_type", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("objects_deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'ready', 'rejected', 'deleted')",
            name=op.f("ck_attachments_status"),
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_attachments_message_id_messages"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_attachments_tenant_id_tenants")
        ),
        sa.ForeignKeyConstraint(
            ["uploader_id"], ["users.id"], name=op.f("fk_attachments_uploader_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attachments")),
    )
    op.create_index(
        "ix_attachments_message_id",
        "attachments",
        ["message_id"],
        postgresql_where=sa.text("message_id IS NOT NULL"),
    )
    op.create_index(
        "ix_attachments_unsent",
        "attachments",
        ["created_at"],
        postgresql_where=sa.text("message_id IS NULL AND status IN ('pending', 'ready')"),
    )
    op.create_index(
        "ix_attachments_objects_to_delete",
        "attachments",
        ["created_at"],
        postgresql_where=sa.text(
            "status IN ('rejected', 'deleted') AND objects_deleted_at IS NULL"
        ),
    )
    op.create_index("ix_attachments_uploader_created", "attachments", ["uploader_id", "created_at"])


def downgrade() -> None:
    op.drop_table("attachments")
    op.drop_column("messages", "attachment_count")
