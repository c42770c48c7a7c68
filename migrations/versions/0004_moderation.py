"""moderation: reports and resolutions

The moderator's note on a resolution; a resolved report always says when; the queue's
index split into pending and resolved, each ordered as the queue pages it
(created_at, id), so either listing is one index range scan.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("reports", sa.Column("resolution_note", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_reports_resolved_at"), "reports", "(status = 'pending') = (resolved_at IS NULL)"
    )
    op.drop_index("ix_reports_queue", table_name="reports")
    op.create_index(
        "ix_reports_queue_pending",
        "reports",
        ["tenant_id", "created_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_reports_queue_resolved",
        "reports",
        ["tenant_id", "created_at", "id"],
        postgresql_where=sa.text("status <> 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_reports_queue_resolved", table_name="reports")
    op.drop_index("ix_reports_queue_pending", table_name="reports")
    op.create_index("ix_reports_queue", "reports", ["tenant_id", "status", "created_at"])
    op.drop_constraint(op.f("ck_reports_resolved_at"), "reports", type_="check")
    op.drop_column("reports", "resolution_note")
