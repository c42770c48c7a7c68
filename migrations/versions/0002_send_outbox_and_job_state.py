"""send outbox and job state

An accepted send is a `messages` row with status 'queued', written before the API
answers 202 (the transactional outbox); `decided_at` is when a worker stored or
rejected it, `dispatched_at` / `dispatch_count` are the sweeper's re-enqueue
bookkeeping. `job_state` lets exactly one run of each periodic job happen per
scheduled slot, however many beats send it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 05:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("messages", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "messages",
        sa.Column("dispatch_count", sa.SmallInteger(), server_default="0", nullable=False),
    )
    op.drop_constraint(op.f("ck_messages_status"), "messages", type_="check")
    op.create_check_constraint(
        op.f("ck_messages_status"), "messages", "status IN ('queued', 'stored', 'rejected')"
    )
    op.alter_column("messages", "status", server_default=sa.text("'queued'"))
    # The sweeper's scan: only the few sends not yet decided.
    op.create_index(
        "ix_messages_queued",
        "messages",
        ["created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_table(
        "job_state",
        sa.Column("job", sa.String(length=64), primary_key=True),
        sa.Column("last_slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_succeeded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_duration_seconds", sa.Float(), nullable=True),
        sa.Column("last_rows", sa.Integer(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("job_state")
    op.drop_index("ix_messages_queued", table_name="messages")
    op.execute("DELETE FROM messages WHERE status = 'queued'")
    op.alter_column("messages", "status", server_default=sa.text("'stored'"))
    op.drop_constraint(op.f("ck_messages_status"), "messages", type_="check")
    op.create_check_constraint(
        op.f("ck_messages_status"), "messages", "status IN ('stored', 'rejected')"
    )
    op.drop_column("messages", "dispatch_count")
    op.drop_column("messages", "dispatched_at")
    op.drop_column("messages", "decided_at")
