"""Every periodic job watched, end to end: a run through the real runner (and beat's task)
against real PostgreSQL, read back from the web's /metrics as Prometheus would scrape it:
last success time, duration, rows touched, period, runs by outcome (failures too), and
the broadcast fan-out backlog beside the sends' and the reports'."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.models import Broadcast, JobState, Message, User
from app.services.conversations import start_conversation
from schedules.jobs import JOBS, Job
from schedules.runner import JobRun, run_job
from tests.helpers import queue_send
from workers.tasks import run_periodic_job

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: FlaskClient) -> Samples:
    """The /metrics page as Prometheus reads it: (sample name, labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def run(app: Flask, name: str, **options: object) -> JobRun:
    database, policy = app.extensions["switchboard.db"], app.extensions["switchboard.policy"]
    with database.transaction() as session:
        return run_job(session, policy, name, enqueue_send=lambda _id: None, **options)


@pytest.mark.parametrize("name", list(JOBS))
def test_every_job_exports_its_last_success_duration_and_rows(app, client, name):
    before = scrape(client)
    # A job that never ran shows only its period: absent, not zero, is "never".
    assert value(before, "switchboard_job_last_success_timestamp_seconds", job_name=name) is None
    period = JOBS[name].timing(app.extensions["switchboard.policy"]).period.total_seconds()
    assert value(before, "switchboard_job_period_seconds", job_name=name) == period
    runs_before = value(before, "switchboard_job_runs_total", job_name=name, outcome="succeeded")
    timed_before = value(before, "switchboard_job_duration_seconds_count", job_name=name)

    started = datetime.now(UTC).timestamp()
    done = run(app, name, force=True)
    assert done.outcome == "succeeded"

    after = scrape(client)
    last = value(after, "switchboard_job_last_success_timestamp_seconds", job_name=name)
    assert last is not None and started - 1 <= last <= datetime.now(UTC).timestamp() + 1
    assert value(after, "switchboard_job_last_rows", job_name=name) == done.rows
    duration = value(after, "switchboard_job_last_duration_seconds", job_name=name)
    assert duration == pytest.approx(done.duration_seconds)
    succeeded = value(after, "switchboard_job_runs_total", job_name=name, outcome="succeeded")
    assert succeeded == (runs_before or 0) + 1
    timed = value(after, "switchboard_job_duration_seconds_count", job_name=name)
    assert timed == (timed_before or 0) + 1


def test_rows_touched_are_the_jobs_own_count(app, client, make_user):
    """The redispatch job claims two stale sends: its rows gauge says 2, and the queued
    sends' backlog is on the same page."""
    alice = make_user("alice", role="member", tier="privileged")
    make_user("bob", role="member")
    with app.extensions["switchboard.db"].transaction() as session:
        starter = session.get_one(User, alice.id)
        policy = app.extensions["switchboard.policy"]
        conversation, _ = start_conversation(session, policy, starter, "bob", None)
        conversation_id = str(conversation.id)
    for n in range(2):
        queue_send(app, "alice", conversation_id, f"stuck {n}", f"stuck-{n}")
    with app.extensions["switchboard.db"].transaction() as session:
        # Accepted a minute ago and never dispatched: what the sweeper is for.
        session.execute(update(Message).values(created_at=datetime.now(UTC) - timedelta(minutes=1)))

    done = run(app, "redispatch-sends")
    assert (done.outcome, done.rows) == ("succeeded", 2)
    samples = scrape(client)
    assert value(samples, "switchboard_job_last_rows", job_name="redispatch-sends") == 2
    assert value(samples, "switchboard_sends_queued") == 2
    assert value(samples, "switchboard_sends_queued_oldest_age_seconds") >= 59


def test_beats_task_is_watched_the_same_way(app, client):
    """The Celery task beat sends runs the same runner: same gauges, same counter."""
    before = value(
        scrape(client),
        "switchboard_job_runs_total",
        job_name="prune-event-log",
        outcome="succeeded",
    )
    assert run_periodic_job.apply(args=["prune-event-log"]).get() == 0
    samples = scrape(client)
    assert value(samples, "switchboard_job_last_rows", job_name="prune-event-log") == 0
    assert value(
        samples, "switchboard_job_last_success_timestamp_seconds", job_name="prune-event-log"
    )
    counted = value(
        samples, "switchboard_job_runs_total", job_name="prune-event-log", outcome="succeeded"
    )
    assert counted == (before or 0) + 1


def test_a_failing_job_is_counted_and_keeps_its_last_success(app, client, monkeypatch):
    broken_runs: list[int] = []

    def broken(_context: object) -> int:
        broken_runs.append(1)
        raise RuntimeError("the job's query failed")

    healthy = JOBS["prune-event-log"]
    assert run(app, healthy.name).outcome == "succeeded"
    first = scrape(client)
    last_success = value(
        first, "switchboard_job_last_success_timestamp_seconds", job_name=healthy.name
    )
    failed_before = value(
        first, "switchboard_job_runs_total", job_name=healthy.name, outcome="failed"
    )
    monkeypatch.setitem(
        JOBS,
        healthy.name,
        Job(healthy.name, healthy.description, healthy.schedule, healthy.period, broken),
    )

    with pytest.raises(RuntimeError, match="query failed"):
        run(app, healthy.name, force=True)
    assert broken_runs == [1]
    samples = scrape(client)
    failed = value(samples, "switchboard_job_runs_total", job_name=healthy.name, outcome="failed")
    assert failed == (failed_before or 0) + 1
    # The run rolled back: job_state, and so the gauge the overdue alert ages, is unchanged.
    assert (
        value(samples, "switchboard_job_last_success_timestamp_seconds", job_name=healthy.name)
        == last_success
    )
    with app.extensions["switchboard.db"].sessions() as session:
        assert session.get_one(JobState, healthy.name).last_succeeded_at.timestamp() == last_success


@pytest.mark.parametrize("policy_name", ["cardshow"])
def test_the_broadcast_backlog_is_the_fan_out_lag(app, client, make_user: Callable[..., User]):
    """A broadcast accepted and not yet fanned out is counted, with how long it has waited
    (what SwitchboardBroadcastFanoutLagging watches); once stored, it is not."""
    organizer = make_user("organizer-1", role="organizer")
    samples = scrape(client)
    assert value(samples, "switchboard_broadcasts_queued") == 0
    assert value(samples, "switchboard_broadcasts_queued_oldest_age_seconds") == 0
    broadcast_id = uuid.uuid4()
    with app.extensions["switchboard.db"].transaction() as session:
        session.add(
            Broadcast(
                id=broadcast_id,
                tenant_id=organizer.tenant_id,
                sender_id=organizer.id,
                client_id="b-1",
                audience="attendee",
                body="Doors open at nine",
                body_sha256="0" * 64,
                created_at=datetime.now(UTC) - timedelta(minutes=2),
            )
        )
    samples = scrape(client)
    assert value(samples, "switchboard_broadcasts_queued") == 1
    assert value(samples, "switchboard_broadcasts_queued_oldest_age_seconds") >= 119
    with app.extensions["switchboard.db"].transaction() as session:
        session.execute(
            update(Broadcast).where(Broadcast.id == broadcast_id).values(status="stored")
        )
    assert value(scrape(client), "switchboard_broadcasts_queued") == 0
