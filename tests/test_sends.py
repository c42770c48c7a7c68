"""An accepted send is durable and always reaches a decision: the outbox row the API
writes before its 202, the redispatch job for sends no worker took, rejections for
sends that can never be stored, and one run per slot however many beats there are."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy
from sqlalchemy import select, text, update

from app.embedded import free_port
from app.models import JobState, Message
from app.services.sends import FREE_RETRIES, MAX_DISPATCHES
from app.settings import normalise_database_url
from schedules.jobs import JOBS
from schedules.runner import run_job
from tests.helpers import error_code, events_of, queue_send, run_threads, wait_for
from workers.tasks import run_periodic_job, send_message


@pytest.fixture
def pair(client, make_user, auth):
    alice = make_user("alice", role="member", tier="privileged")
    bob = make_user("bob", role="member", tier="free")
    response = client.post("/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice))
    return alice, bob, response.json["id"]


def message(app, message_id: str) -> Message:
    with app.extensions["switchboard.db"].sessions() as session:
        return session.get_one(Message, uuid.UUID(message_id))


def age_send(app, message_id: str, seconds: float, **values: object) -> None:
    """Make a queued send look as if it had been accepted `seconds` ago."""
    with app.extensions["switchboard.db"].transaction() as session:
        session.execute(
            update(Message)
            .where(Message.id == uuid.UUID(message_id))
            .values(created_at=datetime.now(UTC) - timedelta(seconds=seconds), **values)
        )


def test_the_202_comes_after_the_send_is_committed_as_queued(app, client, auth, pair):
    """No worker runs: the send is in PostgreSQL, visible to its sender only."""
    alice, bob, conversation_id = pair
    response = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "hello", "client_id": "c-1"},
        headers=auth(alice),
    )
    assert response.status_code == 202 and response.json["status"] == "queued"
    row = message(app, response.json["id"])
    assert (row.status, row.body, row.decided_at) == ("queued", "hello", None)
    status = client.get(f"/v1/messages/{row.id}", headers=auth(alice)).json
    assert status["status"] == "queued" and status["body"] == "hello"
    assert error_code(client.get(f"/v1/messages/{row.id}", headers=auth(bob))) == (
        404,
        "message_not_found",
    )
    history = client.get(f"/v1/conversations/{conversation_id}/messages", headers=auth(bob))
    assert history.json["items"] == []
    # A retry with the same client id answers with the same id and writes nothing more.
    again = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "hello", "client_id": "c-1"},
        headers=auth(alice),
    )
    assert again.json == response.json


def test_a_send_whose_task_was_lost_is_redispatched_and_stored(app, pair, celery_worker):
    """The task never reached a worker (a broker lost it): the redispatch job finds the
    queued row and a real worker stores it."""
    _, _, conversation_id = pair
    message_id = queue_send(app, "alice", conversation_id, "lost task", "lost-1")
    fresh_id = queue_send(app, "alice", conversation_id, "just accepted", "fresh-1")
    age_send(app, message_id, 30)

    assert run_periodic_job.apply(args=["redispatch-sends"]).get() == 1
    wait_for(lambda: message(app, message_id).status == "stored")
    assert message(app, message_id).dispatch_count == 1
    # A send accepted a moment ago is left to the task the API enqueued for it.
    assert message(app, fresh_id).status == "queued"
    assert [e.type for e in events_of(app, "bob")] == ["message.created"]


def test_redispatch_backs_off_and_skips_sends_a_worker_holds(app, pair):
    _, _, conversation_id = pair
    backing_off = queue_send(app, "alice", conversation_id, "tried once", "b-1")
    # Re-enqueued 8 s ago, for the fourth time: the fifth try waits 10 s (5 s doubled).
    age_send(
        app,
        backing_off,
        60,
        dispatch_count=FREE_RETRIES + 1,
        dispatched_at=datetime.now(UTC) - timedelta(seconds=8),
    )
    held = queue_send(app, "alice", conversation_id, "being stored", "h-1")
    age_send(app, held, 60)

    enqueued: list[uuid.UUID] = []
    database = app.extensions["switchboard.db"]
    with database.transaction() as worker_session:
        # A worker storing `held` right now holds its row.
        worker_session.execute(
            select(Message.id).where(Message.id == uuid.UUID(held)).with_for_update()
        )
        with database.transaction() as session:
            run = run_job(
                session,
                app.extensions["switchboard.policy"],
                "redispatch-sends",
                enqueue_send=enqueued.append,
            )
    assert (run.outcome, run.rows) == ("succeeded", 0)
    assert enqueued == []


def test_a_send_tried_too_often_is_rejected_and_its_sender_told(app, client, auth, pair):
    alice, _, conversation_id = pair
    message_id = queue_send(app, "alice", conversation_id, "never stored", "g-1")
    age_send(
        app,
        message_id,
        86400,
        dispatch_count=MAX_DISPATCHES,
        dispatched_at=datetime.now(UTC) - timedelta(hours=1),
    )
    assert run_periodic_job.apply(args=["redispatch-sends"]).get() == 1
    status = client.get(f"/v1/messages/{message_id}", headers=auth(alice)).json
    assert (status["status"], status["reason"], status["body"]) == (
        "rejected",
        "delivery_failed",
        None,
    )
    [event] = events_of(app, "alice")
    assert event.type == "message.rejected" and event.payload["reason"] == "delivery_failed"
    assert events_of(app, "bob") == []


def test_a_task_that_can_never_succeed_rejects_the_send(app, client, auth, pair, monkeypatch):
    """A bug (here: the policy check raising) must not leave the send queued forever."""
    alice, _, conversation_id = pair
    message_id = queue_send(app, "alice", conversation_id, "breaks the worker", "x-1")

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in the policy check")

    monkeypatch.setattr("app.services.messages.decide_for_recipients", broken)
    with pytest.raises(RuntimeError):
        send_message.apply(args=[message_id]).get()
    status = client.get(f"/v1/messages/{message_id}", headers=auth(alice)).json
    assert (status["status"], status["reason"]) == ("rejected", "internal_error")
    assert [e.type for e in events_of(app, "alice")] == ["message.rejected"]
    # Running it again (a redelivery) changes nothing.
    monkeypatch.undo()
    assert send_message.apply(args=[message_id]).get() == "duplicate"


def test_two_beats_sending_the_same_job_run_it_once(app, pair):
    """Eight copies of one job at the same moment (beats, an operator): one runs, the
    others skip because it holds the job's lock or has claimed the slot."""
    database, policy = app.extensions["switchboard.db"], app.extensions["switchboard.policy"]
    now = datetime.now(UTC)
    outcomes: list[str] = []
    barrier = threading.Barrier(8, timeout=30)

    def copy() -> None:
        barrier.wait()
        with database.transaction() as session:
            run = run_job(
                session, policy, "prune-event-log", enqueue_send=lambda _id: None, now=now
            )
        outcomes.append(run.outcome)

    run_threads(*[copy] * 8)
    assert outcomes.count("succeeded") == 1
    assert set(outcomes) <= {"succeeded", "skipped_running", "skipped_done"}
    with database.sessions() as session:
        state = session.get_one(JobState, "prune-event-log")
        assert state.last_slot == JOBS["prune-event-log"].slot_of(now)
        assert state.last_succeeded_at is not None
    # The next slot runs again.
    with database.transaction() as session:
        later = run_job(
            session,
            policy,
            "prune-event-log",
            enqueue_send=lambda _id: None,
            now=now + timedelta(hours=1),
        )
    assert later.outcome == "succeeded"


def test_a_failed_run_leaves_its_slot_for_the_next_copy(app, monkeypatch):
    database, policy = app.extensions["switchboard.db"], app.extensions["switchboard.policy"]
    now = datetime.now(UTC)

    def failing(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("schedules.jobs.prune_event_log", failing)
    with pytest.raises(RuntimeError), database.transaction() as session:
        run_job(session, policy, "prune-event-log", enqueue_send=lambda _id: None, now=now)
    monkeypatch.undo()
    with database.transaction() as session:
        run = run_job(session, policy, "prune-event-log", enqueue_send=lambda _id: None, now=now)
    assert run.outcome == "succeeded"


def _switchboard(app, *args: str) -> subprocess.CompletedProcess:
    settings = app.extensions["switchboard.settings"]
    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url.replace("postgresql+psycopg://", "postgresql://"),
        REDIS_URL=settings.redis_url,
        SWITCHBOARD_SERVICE_TOKEN=settings.service_token,
        SWITCHBOARD_JWT_SECRET=settings.jwt_secret or "",
        SWITCHBOARD_POLICY="bookstore",
        SWITCHBOARD_LOG_LEVEL="WARNING",
    )
    if settings.broker_url:
        env["SWITCHBOARD_BROKER_URL"] = settings.broker_url
    command = [os.path.join(os.path.dirname(sys.executable), "switchboard"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_switchboard_jobs_list_and_run(app, pair):
    _, _, conversation_id = pair
    listed = _switchboard(app, "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    for name in JOBS:
        assert name in listed.stdout

    message_id = queue_send(app, "alice", conversation_id, "caught up", "cli-1")
    age_send(app, message_id, 30)
    ran = _switchboard(app, "jobs", "run", "redispatch-sends")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("redispatch-sends: 1 rows")
    assert message(app, message_id).dispatch_count == 1
    # Run again at once: an operator's run does not wait for the next slot.
    assert _switchboard(app, "jobs", "run", "redispatch-sends").returncode == 0

    unknown = _switchboard(app, "jobs", "run", "no-such-job")
    assert unknown.returncode != 0 and "no job named 'no-such-job'" in unknown.stderr


def test_health_workers_says_when_accepted_sends_are_not_being_decided(app, client, pair):
    _, _, conversation_id = pair
    healthy = client.get("/health/workers")
    assert healthy.status_code == 200 and healthy.json["checks"]["sends_queued"] == 0
    message_id = queue_send(app, "alice", conversation_id, "nobody takes it", "s-1")
    age_send(app, message_id, 120)
    stalled = client.get("/health/workers")
    assert stalled.status_code == 503
    assert stalled.json["error"]["code"] == "workers_stalled"
    assert stalled.json["checks"]["sends_queued"] == 1
    metrics = client.get("/metrics").text
    assert "switchboard_sends_queued 1.0" in metrics
    [age_line] = [
        line
        for line in metrics.splitlines()
        if line.startswith("switchboard_sends_queued_oldest_age_seconds ")
    ]
    age = float(age_line.split()[1])
    assert age >= 120


def test_two_live_beats_run_each_slot_once(database_url, redis_url, tmp_path: Path):
    """Two of the Procfile's beat processes and one worker, for a few redispatch slots:
    every slot the beats both sent runs once, the second copy is skipped."""
    from tests.live import LiveProcess, wait_http
    from tests.test_stream import live_env, separate_redis_db

    env = live_env(database_url, separate_redis_db(redis_url, 4))
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    metrics_port = free_port()
    base = dict(os.environ) | env
    base["PATH"] = os.path.dirname(sys.executable) + os.pathsep + base.get("PATH", "")
    worker = LiveProcess(
        "worker",
        base | {"WORKER_CONCURRENCY": "4", "SWITCHBOARD_WORKER_METRICS_PORT": str(metrics_port)},
        tmp_path / "worker.log",
    )
    beats = [
        LiveProcess(
            "beat",
            base | {"CELERY_BEAT_SCHEDULE": str(tmp_path / f"beat{index}-schedule")},
            tmp_path / f"beat{index}.log",
        )
        for index in (1, 2)
    ]
    processes = [worker.start(), *(beat.start() for beat in beats)]
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", worker)

        def runs() -> dict[str, float]:
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
            counts: dict[str, float] = {}
            for line in body.decode().splitlines():
                if line.startswith('switchboard_job_runs_total{job_name="redispatch-sends"'):
                    outcome = line.split('outcome="')[1].split('"')[0]
                    counts[outcome] = float(line.split()[-1])
            return counts

        # Both beats send every 2 s: wait for four slots' worth of copies.
        counts = wait_for(lambda: (c := runs()) and sum(c.values()) >= 8 and c, timeout=60)
        for process in processes:
            assert process.process.poll() is None, process.log_path.read_text()[-3000:]
        # Without the slot claim every copy would run: nothing would be skipped.
        skipped = counts.get("skipped_done", 0) + counts.get("skipped_running", 0)
        assert counts.get("succeeded", 0) >= 1 and skipped >= 1, counts
        with sqlalchemy.create_engine(normalise_database_url(database_url)).connect() as connection:
            assert (
                connection.execute(
                    text("SELECT count(*) FROM job_state WHERE job = 'redispatch-sends'")
                ).scalar_one()
                == 1
            )
    finally:
        for process in processes:
            process.stop()
