"""Retention: expired messages soft-deleted, soft-deleted ones purged after the policy's
delay (unless a report holds them), tier changes moving expiries, `switchboard jobs run
--now`, and the jobs' metrics. Real PostgreSQL, the task code, and the clock passed in."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text, update

from app.models import AuditLog, Conversation, Message, Participant, Report, User, UserEvent
from app.policy import PolicyError, parse_policy
from app.services.retention import soft_delete_expired
from app.stream.log import EventLog
from schedules.jobs import JOBS, JobContext
from schedules.runner import run_job
from tests.conftest import SERVICE_TOKEN
from tests.helpers import events_of, queue_send, run_threads
from tests.test_policy import preset_text
from tests.test_sends import _switchboard
from workers.tasks import send_message

ADMIN = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
DAY = timedelta(days=1)


@pytest.fixture
def chat(client, make_user, auth):
    """alice (privileged: 180 days) started a conversation with bob (free: 30 days)."""
    alice = make_user("alice", role="member", tier="privileged")
    bob = make_user("bob", role="member", tier="free")
    response = client.post("/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice))
    return alice, bob, response.json["id"]


def send(app, sender_id: str, conversation_id: str, body: str) -> str:
    """Accept a send as the API does and store it through the worker's task."""
    message_id = queue_send(app, sender_id, conversation_id, body, f"c-{uuid.uuid4().hex[:8]}")
    assert send_message.apply(args=[message_id]).get() == "stored"
    return message_id


def run(app, name: str, now: datetime, *, force: bool = True) -> str | int:
    """One run of a job as beat's task makes it, with the clock at `now`."""
    database, policy = app.extensions["switchboard.db"], app.extensions["switchboard.policy"]
    with database.transaction() as session:
        done = run_job(session, policy, name, enqueue_send=lambda _id: None, now=now, force=force)
    return done.rows if done.outcome == "succeeded" else done.outcome


def message(app, message_id: str) -> Message | None:
    with app.extensions["switchboard.db"].sessions() as session:
        return session.get(Message, uuid.UUID(message_id))


def unread(app, user_id: str, conversation_id: str) -> int:
    with app.extensions["switchboard.db"].sessions() as session:
        return session.get_one(Participant, (uuid.UUID(conversation_id), user_id)).unread_count


def sequences(app, user_id: str) -> list[int]:
    return [event.seq for event in events_of(app, user_id)]


def test_expired_messages_become_placeholders_with_events_and_unread_counts(
    app, client, auth, chat
):
    _, bob, conversation_id = chat
    from_alice = [send(app, "alice", conversation_id, f"hello {i}") for i in range(2)]
    from_bob = send(app, "bob", conversation_id, "a reply")
    sent_at = message(app, from_bob).created_at
    assert unread(app, "bob", conversation_id) == 2
    assert unread(app, "alice", conversation_id) == 1

    # Day 29: nothing has expired yet.
    assert run(app, "soft-delete-expired", sent_at + 29 * DAY) == 0
    # Day 31: bob's message (free tier, 30 days) has; alice's (180 days) have not.
    assert run(app, "soft-delete-expired", sent_at + 31 * DAY) == 1
    removed = message(app, from_bob)
    assert removed.deleted_at == sent_at + 31 * DAY and removed.delete_reason == "expired"
    assert removed.body is None and removed.deleted_by is None
    assert unread(app, "alice", conversation_id) == 0
    assert unread(app, "bob", conversation_id) == 2
    for user in ("alice", "bob"):
        last = events_of(app, user)[-1]
        assert last.type == "message.deleted" and last.payload["id"] == from_bob
        assert last.payload["deleted"]["reason"] == "expired" and last.payload["body"] is None
    # Idempotent: the same moment again changes nothing and appends no event.
    before = sequences(app, "bob")
    assert run(app, "soft-delete-expired", sent_at + 31 * DAY) == 0
    assert sequences(app, "bob") == before

    assert run(app, "soft-delete-expired", sent_at + 181 * DAY) == 2
    assert unread(app, "bob", conversation_id) == 0
    assert client.get("/v1/unread", headers=auth(bob)).json["total"] == 0
    history = client.get(f"/v1/conversations/{conversation_id}/messages", headers=auth(bob))
    assert [(m["body"], m["deleted"]["reason"]) for m in history.json["items"]] == [
        (None, "expired")
    ] * 3
    with app.extensions["switchboard.db"].sessions() as session:
        audited = session.scalars(
            select(AuditLog.target_id).where(
                AuditLog.action == "message.deleted", AuditLog.actor_id.is_(None)
            )
        ).all()
    assert sorted(audited) == sorted([*from_alice, from_bob])
    # Each user's sequence stays contiguous.
    for user in ("alice", "bob"):
        seqs = sequences(app, user)
        assert seqs == list(range(1, len(seqs) + 1))


def test_purge_after_the_delay_scrubs_events_and_a_resume_has_no_gap(app, client, auth, chat):
    _, bob, conversation_id = chat
    kept = send(app, "alice", conversation_id, "stays")
    doomed = send(app, "bob", conversation_id, "secret words")
    resume_from = sequences(app, "alice")[-2]  # alice's client saw "stays", then dropped
    sent_at = message(app, doomed).created_at
    deleted_at = sent_at + 31 * DAY
    assert run(app, "soft-delete-expired", deleted_at) == 1

    # bookstore purges 7 days after the soft delete.
    assert run(app, "purge-deleted", deleted_at + 6 * DAY) == 0
    assert message(app, doomed) is not None
    assert run(app, "purge-deleted", deleted_at + 7 * DAY) == 1
    assert message(app, doomed) is None and message(app, kept) is not None
    assert run(app, "purge-deleted", deleted_at + 8 * DAY) == 0
    # The purged message was the conversation's last: the one before it is now.
    with app.extensions["switchboard.db"].sessions() as session:
        assert session.get_one(Conversation, uuid.UUID(conversation_id)).last_message_id == (
            uuid.UUID(kept)
        )
    later = send(app, "alice", conversation_id, "after the purge")

    for user in ("alice", "bob"):
        events = events_of(app, user)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        about = [e for e in events if e.payload.get("id") == doomed]
        assert [e.type for e in about] == ["message.created", "message.deleted"]
        assert all(
            e.payload == {"id": doomed, "conversation_id": conversation_id, "purged": True}
            for e in about
        )
        assert "secret words" not in str([e.payload for e in events])

    # The stream's own replay: resuming from before the purged message's events gets every
    # event after it, in order, with no resync and no gap.
    log = EventLog(app.extensions["switchboard.db"].read_sessions)
    current = sequences(app, "alice")[-1]
    plan = log.plan("alice", resume_from, current)
    assert not plan.resync
    replayed = list(log.after("alice", plan.after_seq, current))
    assert [e.seq for e in replayed] == list(range(resume_from + 1, current + 1))
    assert replayed[-1].data["id"] == later
    listed = client.get("/v1/conversations", headers=auth(bob)).json["items"]
    assert listed[0]["id"] == conversation_id


def test_a_message_under_a_pending_report_is_kept_until_the_report_is_resolved(app, chat):
    _, _, conversation_id = chat
    reported = send(app, "bob", conversation_id, "rude")
    other = send(app, "bob", conversation_id, "fine")
    deleted_at = message(app, reported).created_at + 31 * DAY
    assert run(app, "soft-delete-expired", deleted_at) == 2
    database = app.extensions["switchboard.db"]
    with database.transaction() as session:
        report = Report(
            tenant_id="t1",
            message_id=uuid.UUID(reported),
            reporter_id="alice",
            reason="spam",
            status="pending",
        )
        session.add(report)
    purge_time = deleted_at + 30 * DAY
    assert run(app, "purge-deleted", purge_time) == 1
    assert message(app, other) is None
    assert message(app, reported) is not None
    with database.transaction() as session:
        session.execute(
            update(Report)
            .where(Report.id == report.id)
            .values(status="dismissed", resolved_at=func.now(), resolved_by="alice")
        )
    assert run(app, "purge-deleted", purge_time) == 1
    assert message(app, reported) is None


def _expired_conversations(app, make_user, conversations: int, per_conversation: int) -> None:
    """Stored messages already past their expiry, written directly (fast), each unread."""
    make_user("hub", role="manager")
    past = datetime.now(UTC) - 400 * DAY
    with app.extensions["switchboard.db"].transaction() as session:
        for index in range(conversations):
            peer = f"peer{index}"
            session.add(
                User(id=peer, tenant_id="t1", role="member", tier="free", display_name=peer)
            )
            conversation = Conversation(
                tenant_id="t1", pair_key=f"hub|{peer}", created_by="hub", subject_key=""
            )
            session.add(conversation)
            session.flush()
            session.add_all(
                [
                    Participant(conversation_id=conversation.id, user_id="hub"),
                    Participant(
                        conversation_id=conversation.id,
                        user_id=peer,
                        unread_count=per_conversation,
                    ),
                ]
            )
            session.flush()
            for number in range(per_conversation):
                session.add(
                    Message(
                        id=uuid.uuid4(),
                        tenant_id="t1",
                        conversation_id=conversation.id,
                        sender_id="hub",
                        client_id=f"{peer}-{number}",
                        body="old",
                        body_sha256="0" * 64,
                        status="stored",
                        created_at=past + number * timedelta(seconds=1),
                        expires_at=past + 30 * DAY + number * timedelta(seconds=1),
                    )
                )


def test_two_runs_at_once_delete_and_purge_each_message_once(app, make_user):
    """Past the runner's lock (two operators forcing runs, or two beats' copies of
    different slots at once): the SKIP LOCKED claims keep them apart."""
    _expired_conversations(app, make_user, conversations=6, per_conversation=90)  # 540
    database, policy = app.extensions["switchboard.db"], app.extensions["switchboard.policy"]
    now = datetime.now(UTC)
    counts: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=30)

    def job(name: str, at: datetime):
        def copy() -> None:
            barrier.wait()
            with database.transaction() as session:
                context = JobContext(session, policy, at, lambda _id: None)
                rows = JOBS[name].run(context)
            with lock:
                counts.append(rows)

        return copy

    run_threads(job("soft-delete-expired", now), job("soft-delete-expired", now))
    assert sum(counts) == 540
    with database.sessions() as session:
        assert session.scalar(select(func.count()).where(Message.deleted_at.is_(None))) == 0
        audited = select(func.count()).where(AuditLog.action == "message.deleted")
        assert session.scalar(audited) == 540
        # Exactly one message.deleted event per message and participant.
        per_message = session.execute(
            text(
                "SELECT payload->>'id', count(*) FROM user_events WHERE type = 'message.deleted'"
                " GROUP BY 1"
            )
        ).all()
        assert len(per_message) == 540 and {count for _, count in per_message} == {2}
        assert set(session.scalars(select(Participant.unread_count))) == {0}
        for user_id in ["hub", *(f"peer{i}" for i in range(6))]:
            seqs = session.scalars(
                select(UserEvent.seq).where(UserEvent.user_id == user_id).order_by(UserEvent.seq)
            ).all()
            assert seqs == list(range(1, len(seqs) + 1))

    counts.clear()
    barrier.reset()
    later = now + 8 * DAY
    run_threads(job("purge-deleted", later), job("purge-deleted", later))
    assert sum(counts) == 540
    with database.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0


def test_two_copies_through_the_runner_run_once(app, make_user):
    _expired_conversations(app, make_user, conversations=2, per_conversation=5)
    now = datetime.now(UTC)
    outcomes: list[str | int] = []
    barrier = threading.Barrier(2, timeout=30)

    def copy() -> None:
        barrier.wait()
        outcomes.append(run(app, "soft-delete-expired", now, force=False))

    run_threads(copy, copy)
    assert sorted(map(str, outcomes)) in (["10", "skipped_running"], ["10", "skipped_done"])


def test_a_batch_never_waits_for_a_busy_conversation(app, make_user):
    """A send holding a conversation's lock: the batch skips its messages (no wait, so no
    deadlock with the send's lock order) and takes them on a later run."""
    _expired_conversations(app, make_user, conversations=2, per_conversation=3)
    database = app.extensions["switchboard.db"]
    now = datetime.now(UTC)
    with database.sessions() as holder, holder.begin():
        busy = holder.scalars(select(Conversation.id).order_by(Conversation.id).limit(1)).one()
        holder.execute(select(Conversation.id).where(Conversation.id == busy).with_for_update())
        with database.transaction() as session:
            assert soft_delete_expired(session, now) == 3
    with database.transaction() as session:
        assert soft_delete_expired(session, now) == 3


# ------------------------------------------------------------------ tier changes


def _age(app, message_id: str, created_at: datetime, expires_at: datetime) -> None:
    with app.extensions["switchboard.db"].transaction() as session:
        session.execute(
            update(Message)
            .where(Message.id == uuid.UUID(message_id))
            .values(created_at=created_at, expires_at=expires_at)
        )


def _put_tier(client, user_id: str, tier: str) -> dict:
    response = client.put(
        f"/v1/admin/users/{user_id}",
        json={"tenant": "t1", "role": "member", "tier": tier, "display_name": user_id},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.json
    return response.json


def test_a_downgrade_waits_for_the_grace_and_an_upgrade_extends_at_once(app, client, chat):
    _, _, conversation_id = chat
    _put_tier(client, "alice", "privileged_plus")  # 365 days
    now = datetime.now(UTC)
    ages = {"young": 10, "middle": 200, "old": 350}
    ids = {}
    for name, age in ages.items():
        ids[name] = send(app, "alice", conversation_id, name)
        created = now - age * DAY
        _age(app, ids[name], created, created + 365 * DAY)
    deleted = send(app, "alice", conversation_id, "gone")
    _age(app, deleted, now - 400 * DAY, now - 35 * DAY)
    assert run(app, "soft-delete-expired", now) == 1

    # Downgrade to privileged (180 days), 30 days' grace.
    changed = datetime.fromisoformat(_put_tier(client, "alice", "privileged")["tier_changed_at"])
    grace_ends = changed + 30 * DAY
    expiry = {name: message(app, ids[name]).expires_at for name in ids}
    created = {name: message(app, ids[name]).created_at for name in ids}
    # 10 days old: the new retention is later than the grace, so it applies.
    assert expiry["young"] == created["young"] + 180 * DAY
    # 200 days old: past the new retention already; it lives until the grace ends.
    assert expiry["middle"] == grace_ends
    # 350 days old: the old expiry comes first; a downgrade never extends.
    assert expiry["old"] == created["old"] + 365 * DAY
    assert message(app, deleted).expires_at == now - 35 * DAY  # deleted ones are left alone
    # A message sent after the downgrade gets the new tier's retention.
    fresh = send(app, "alice", conversation_id, "new")
    assert message(app, fresh).expires_at == message(app, fresh).created_at + 180 * DAY

    # The grace holds: day 29 after the change the middle one is still there, day 31 not.
    assert run(app, "soft-delete-expired", changed + 29 * DAY) == 1  # "old" (day 15)
    assert message(app, ids["middle"]).deleted_at is None
    assert run(app, "soft-delete-expired", changed + 31 * DAY) == 1
    assert message(app, ids["middle"]).deleted_at is not None

    # The audit row of the change says how many expiries moved.
    with app.extensions["switchboard.db"].sessions() as session:
        detail = session.scalars(
            select(AuditLog.detail)
            .where(AuditLog.action == "user.updated")
            .order_by(AuditLog.id.desc())
        ).first()
    assert detail["tier"] == ["privileged_plus", "privileged"]
    assert detail["messages_expiry_moved"] == 2  # "old" kept its expiry

    # Upgrade: the longer retention applies at once to what is still live.
    _put_tier(client, "alice", "privileged_plus")
    assert message(app, ids["young"]).expires_at == created["young"] + 365 * DAY
    assert message(app, fresh).expires_at == message(app, fresh).created_at + 365 * DAY


def test_a_downgrade_within_a_grace_keeps_the_first_grace(app, client, chat):
    """privileged_plus -> privileged -> free: the second grace never lengthens what the
    first one left, and the free tier's 30 days apply to young messages after it."""
    _, _, conversation_id = chat
    _put_tier(client, "alice", "privileged_plus")
    message_id = send(app, "alice", conversation_id, "hi")
    now = datetime.now(UTC)
    _age(app, message_id, now - 300 * DAY, now + 65 * DAY)
    first = datetime.fromisoformat(_put_tier(client, "alice", "privileged")["tier_changed_at"])
    assert message(app, message_id).expires_at == first + 30 * DAY
    _put_tier(client, "alice", "free")
    assert message(app, message_id).expires_at == first + 30 * DAY


# ------------------------------------------------------------------ operators


def test_switchboard_jobs_run_with_now(app, chat):
    _, _, conversation_id = chat
    message_id = send(app, "bob", conversation_id, "old news")
    now = datetime.now(UTC).replace(microsecond=0)
    _age(app, message_id, now - 40 * DAY, now - 10 * DAY)

    early = _switchboard(
        app, "jobs", "run", "soft-delete-expired", "--now", (now - 11 * DAY).isoformat()
    )
    assert early.returncode == 0, early.stderr
    assert early.stdout.startswith("soft-delete-expired: 0 rows (messages soft-deleted)")
    assert message(app, message_id).deleted_at is None

    # No offset: UTC.
    naive = (now - 9 * DAY).replace(tzinfo=None).isoformat()
    ran = _switchboard(app, "jobs", "run", "soft-delete-expired", "--now", naive)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("soft-delete-expired: 1 rows (messages soft-deleted)")
    assert f"as of {(now - 9 * DAY).isoformat(timespec='seconds')}" in ran.stdout
    assert message(app, message_id).deleted_at == now - 9 * DAY

    for bad, says in (
        ("yesterday", "is not an ISO-8601 date and time"),
        ("2026-13-01T00:00", "is not an ISO-8601 date and time"),
        ((now + 2 * DAY).isoformat(), "is in the future"),
    ):
        refused = _switchboard(app, "jobs", "run", "soft-delete-expired", "--now", bad)
        assert refused.returncode == 2, refused.stdout
        assert "Invalid value for '--now'" in refused.stderr and says in refused.stderr


def test_job_metrics(app, client, chat):
    _, _, conversation_id = chat
    message_id = send(app, "bob", conversation_id, "old news")
    now = datetime.now(UTC)
    _age(app, message_id, now - 40 * DAY, now - 10 * DAY)
    before = datetime.now(UTC).timestamp()
    assert run(app, "soft-delete-expired", now) == 1
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("switchboard_job_")
    }
    job = '{job_name="soft-delete-expired"}'
    assert metrics[f"switchboard_job_last_rows{job}"] == 1
    assert metrics[f"switchboard_job_last_success_timestamp_seconds{job}"] >= before
    assert metrics[f"switchboard_job_last_duration_seconds{job}"] >= 0
    # bookstore runs the soft delete daily; a job that never ran has only its period.
    assert metrics[f"switchboard_job_period_seconds{job}"] == 86400
    assert metrics['switchboard_job_period_seconds{job_name="purge-deleted"}'] == 86400
    assert 'switchboard_job_last_rows{job_name="purge-deleted"}' not in metrics


# ------------------------------------------------------------------ the policy


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('soft_delete_at = "25:00"', "retention.soft_delete_at: must be a UTC time of day"),
        ('purge_at = "2am"', "retention.purge_at: must be a UTC time of day"),
        ("purge_at = 2", "retention.purge_at: must be a UTC time of day"),
        ("purge_at = 02:00:30", "retention.purge_at: must be a whole minute in UTC"),
        ("purge_at_time = 02:00:00", "retention.purge_at_time: unknown key"),
    ],
)
def test_bad_retention_times_name_their_key(line: str, says: str) -> None:
    target = 'soft_delete_at = "01:00"' if line.startswith("soft") else 'purge_at = "02:00"'
    text_ = preset_text("bookstore").replace(target, line)
    with pytest.raises(PolicyError) as raised:
        parse_policy(text_, "bookstore.toml")
    assert says in str(raised.value)


def test_retention_times_accept_toml_times() -> None:
    policy = parse_policy(
        preset_text("bookstore").replace('purge_at = "02:00"', "purge_at = 02:30:00")
    )
    assert policy.purge_daily_at == "02:30" and policy.soft_delete_daily_at == "01:00"
    cardshow = parse_policy(preset_text("cardshow"))
    assert cardshow.soft_delete_daily_at is None and cardshow.purge_daily_at is None
