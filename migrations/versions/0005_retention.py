"""retention: expiry, purge and downgrade grace

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 06:00:00

The purge scrubs a purged message's content from its events, found by the message id in
their payload; this index makes that a lookup instead of a scan of every user's log.
Built inside the migration's transaction (under env.py's advisory lock, which a
CONCURRENTLY build would have to give up), so it holds off event writes while it builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_user_events_message_id",
        "user_events",
        [sa.text("(payload ->> 'id')")],
        postgresql_where=sa.text("type IN ('message.created', 'message.deleted')"),
    )


def downgrade() -> None:
    op.drop_index("ix_user_events_message_id", table_name="user_events")
