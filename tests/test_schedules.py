"""Periodic jobs, run through the real task code against the real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from celery.schedules import crontab
from sqlalchemy import select

from app.models import JobState, UserEvent
from app.policy import load_policy
from app.services.event_log import event_log_window
from schedules import beat_schedule
from schedules.jobs import JOBS
from schedules.runner import run_job
from workers.tasks import run_periodic_job


def test_the_schedule_names_registered_tasks(app):
    celery = app.extensions["celery"]
    # init_celery built beat's schedule from the loaded policy.
    assert celery.conf.beat_schedule == beat_schedule(app.extensions["switchboard.policy"])
    for entry in celery.conf.beat_schedule.values():
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


def _times(entry) -> list[tuple[int, int]]:
    cron = entry["schedule"]
    assert isinstance(cron, crontab)
    return sorted((hour, minute) for hour in cron.hour for minute in cron.minute)


@pytest.mark.parametrize(
    ("preset", "soft_delete", "purge"),
    [
        # The seeds: bookstore soft-deletes at 01:00 and purges at 02:00 (000, 002); the
        # marketplace purges daily (004). The card show names no time: every hour.
        ("bookstore", [(1, 0)], [(2, 0)]),
        ("marketplace", [(3, 0)], [(3, 30)]),
        ("cardshow", [(hour, 23) for hour in range(24)], [(hour, 43) for hour in range(24)]),
    ],
)
def test_the_beat_schedule_follows_each_preset(preset, soft_delete, purge):
    policy = load_policy(preset)
    schedule = beat_schedule(policy)
    assert set(schedule) == set(JOBS)
    assert _times(schedule["soft-delete-expired"]) == soft_delete
    assert _times(schedule["purge-deleted"]) == purge
    daily = len(soft_delete) == 1
    for name in ("soft-delete-expired", "purge-deleted"):
        assert schedule[name]["options"]["expires"] == (86400 if daily else 3600)
    # Each time beat sends a job falls in a slot of its own, starting at or before it:
    # the runner's slots match the schedule (a daily job's slot is the day from its time).
    day = datetime(2026, 11, 24, tzinfo=UTC)
    for name, entry in schedule.items():
        if not isinstance(entry["schedule"], crontab):
            continue
        fires = [
            day + offset + timedelta(hours=hour, minutes=minute)
            for offset in (timedelta(0), timedelta(days=1))
            for hour, minute in _times(entry)
        ]
        slots = [JOBS[name].slot_of(fire, policy) for fire in fires]
        assert len(set(slots)) == len(fires), name
        assert all(slot <= fire for slot, fire in zip(slots, fires, strict=True)), name
        if daily and name in ("soft-delete-expired", "purge-deleted"):
            assert slots == fires


def test_a_daily_slot_is_the_day_from_its_time():
    policy = load_policy("bookstore")  # soft delete at 01:00
    job = JOBS["soft-delete-expired"]
    at = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    assert job.slot_of(at, policy) == at
    assert job.slot_of(at + timedelta(hours=23, minutes=58), policy) == at
    assert job.slot_of(at - timedelta(hours=1), policy) == at - timedelta(days=1)
    # A worker whose clock is a little behind beat's still runs the slot it was sent for.
    assert job.slot_of(at - timedelta(seconds=30), policy) == at


def test_a_daily_job_runs_once_per_slot(app):
    database, policy = app.extensions["switchboard.db"], app.extensions["switchboard.policy"]

    def run_at(moment: datetime) -> str:
        with database.transaction() as session:
            return run_job(
                session, policy, "purge-deleted", enqueue_send=lambda _id: None, now=moment
            ).outcome

    at = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # bookstore purges at 02:00
    assert run_at(at) == "succeeded"
    assert run_at(at + timedelta(hours=12)) == "skipped_done"
    # A copy that waited past midnight still belongs to the day that began at 02:00.
    assert run_at(at + timedelta(hours=23, minutes=30)) == "skipped_done"
    assert run_at(at + timedelta(days=1)) == "succeeded"
    with database.sessions() as session:
        assert session.get_one(JobState, "purge-deleted").last_slot == at + timedelta(days=1)
