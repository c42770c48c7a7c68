"""broadcasts: inbox and quota

A broadcast is accepted like a send: a `broadcasts` row with status 'queued' (the
outbox), written in the transaction that spends the sender's quota, then fanned out
in chunks by the broadcast worker. `fanout_cursor` is the last recipient id reached
(recipients are walked in id order), `dispatched_at` / `dispatch_count` the sweeper's
bookkeeping, `quota_period` the period key the broadcast was counted against.
`broadcast_recipients` is each recipient's inbox row and read state.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("broadcasts", sa.Column("quota_period", sa.String(length=32), nullable=True))
    op.add_column("broadcasts", sa.Column("fanout_cursor", sa.String(length=128), nullable=True))
    op.add_column("broadcasts", sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "broadcasts", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "broadcasts",
        sa.Column("dispatch_count", sa.SmallInteger(), server_default="0", nullable=False),
    )
    op.drop_constraint(op.f("ck_broadcasts_status"), "broadcasts", type_="check")
    op.create_check_constraint(
        op.f("ck_broadcasts_status"), "broadcasts", "status IN ('queued', 'stored', 'rejected')"
    )
    op.alter_column("broadcasts", "status", server_default=sa.text("'queued'"))
    # The sweeper's scan: only the few broadcasts still fanning out.
    op.create_index(
        "ix_broadcasts_queued",
        "broadcasts",
        ["created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_table(
        "broadcast_recipients",
        sa.Column("broadcast_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["broadcast_id"],
            ["broadcasts.id"],
            name=op.f("fk_broadcast_recipients_broadcast_id_broadcasts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_broadcast_recipients_user_id_users")
        ),
        sa.PrimaryKeyConstraint("broadcast_id", "user_id", name=op.f("pk_broadcast_recipients")),
    )
    # "My broadcasts, newest first": one index range scan per page.
    op.create_index(
        "ix_broadcast_recipients_user_created",
        "broadcast_recipients",
        ["user_id", sa.literal_column("created_at DESC"), sa.literal_column("broadcast_id DESC")],
    )


def downgrade() -> None:
    op.drop_index("ix_broadcast_recipients_user_created", table_name="broadcast_recipients")
    op.drop_table("broadcast_recipients")
    op.drop_index("ix_broadcasts_queued", table_name="broadcasts")
    op.execute("DELETE FROM broadcasts WHERE status = 'queued'")
    op.alter_column("broadcasts", "status", server_default=sa.text("'stored'"))
    op.drop_constraint(op.f("ck_broadcasts_status"), "broadcasts", type_="check")
    op.create_check_constraint(
        op.f("ck_broadcasts_status"), "broadcasts", "status IN ('stored', 'rejected')"
    )
    for column in ("dispatch_count", "dispatched_at", "decided_at", "fanout_cursor"):
        op.drop_column("broadcasts", column)
    op.drop_column("broadcasts", "quota_period")
