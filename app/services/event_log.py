"""Keeping the per-user event log to its window.

A socket resuming from an id inside the window replays what it missed; past the
window it is told to resync over HTTP. The window is at least the longest
retention a message can have (the longest tier's days plus the downgrade grace),
so every message a client could still load has its events in the log.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.policy import Policy

PRUNE_BATCH = 10_000
PRUNE_MAX_BATCHES = 50  # per run; beat runs again within the hour


def event_log_window(policy: Policy) -> timedelta:
    longest = max(policy.retention_days(tier) for tier in policy.tiers)
    return timedelta(days=longest + policy.downgrade_grace_days)


def prune_event_log(session: Session, policy: Policy, now: datetime) -> int:
    """Delete events older than the window, in batches; returns how many went.

    Safe when two runs overlap: each deletes rows the other has not locked
    (SKIP LOCKED), and a row deleted twice is simply gone.
    """
    cutoff = now - event_log_window(policy)
    deleted = 0
    for _ in range(PRUNE_MAX_BATCHES):
        batch = session.execute(
            text(
                """
                DELETE FROM user_events WHERE (user_id, seq) IN (
                    SELECT user_id, seq FROM user_events WHERE created_at < :cutoff
                    LIMIT :batch FOR UPDATE SKIP LOCKED)
                """
            ),
            {"cutoff": cutoff, "batch": PRUNE_BATCH},
        ).rowcount
        deleted += batch
        if batch < PRUNE_BATCH:
            break
    return deleted
