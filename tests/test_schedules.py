"""Periodic jobs, run through the real task code against the real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from app.models import UserEvent
from app.services.event_log import event_log_window
from schedules import BEAT_SCHEDULE
from workers.tasks import run_periodic_job


def test_the_schedule_names_registered_tasks(app):
    celery = app.extensions["celery"]
    for entry in BEAT_SCHEDULE.values():
        assert entry["task"] in celery.tasks


def test_event_log_window_covers_the_longest_retention(app):
    policy = app.extensions["switchboard.policy"]  # bookstore: 365 days + 30 days grace
    assert event_log_window(policy) == timedelta(days=395)


def test_prune_drops_only_events_past_the_window(app, make_user):
    make_user("alice")
    window = event_log_window(app.extensions["switchboard.policy"])
    now = datetime.now(UTC)
    with app.extensions["switchboard.db"].transaction() as session:
        for seq, age in (
            (1, window + timedelta(days=2)),
            (2, window + timedelta(minutes=1)),
            (3, window - timedelta(days=1)),
            (4, timedelta(0)),
        ):
            session.add(
                UserEvent(
                    user_id="alice",
                    seq=seq,
                    type="message.created",
                    payload={},
                    created_at=now - age,
                )
            )
    assert run_periodic_job.apply(args=["prune-event-log"]).get() == 2
    # A second copy in the same hour (a second beat) does not run again.
    assert run_periodic_job.apply(args=["prune-event-log"]).get() == 0
    with app.extensions["switchboard.db"].sessions() as session:
        assert session.scalars(select(UserEvent.seq).order_by(UserEvent.seq)).all() == [3, 4]
