"""Direct messaging end to end: the API enqueues, a real Celery worker decides and
stores, the event log records it. The seeds' scenarios, idempotency, unread counts."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.models import Message, Participant, User
from app.services.messages import message_id_for
from tests.helpers import error_code, events_of, queue_send, run_threads, wait_for
from workers.tasks import send_message


def start(client, auth, sender, recipient, subject=None):
    body = {"participant_id": recipient.id}
    if subject:
        body["subject"] = subject
    return client.post("/v1/conversations", json=body, headers=auth(sender))


def send(client, auth, sender, conversation_id, body, client_id=None):
    return client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": body, "client_id": client_id or uuid.uuid4().hex},
        headers=auth(sender),
    )


def stored(client, auth, user, message_id):
    def check():
        response = client.get(f"/v1/messages/{message_id}", headers=auth(user))
        return response.json if response.json.get("status") != "queued" else None

    return wait_for(check)


def count_messages(app) -> int:
    with app.extensions["switchboard.db"].sessions() as session:
        return session.scalar(select(func.count()).select_from(Message))


# --- The seeds' scenarios -------------------------------------------------------------


@pytest.mark.parametrize("policy_name", ["cardshow"])
def test_cardshow_attendee_may_reach_mvp_dealer_but_not_dealer(client, make_user, auth):
    attendee = make_user("att", role="attendee")
    mvp = make_user("mvp", role="mvp_dealer")
    dealer = make_user("dealer", role="dealer")
    assert start(client, auth, attendee, mvp).status_code == 201
    response = start(client, auth, attendee, dealer)
    assert error_code(response) == (403, "role_not_allowed")
    permission = client.get("/v1/permissions/dealer", headers=auth(attendee)).json
    assert (permission["can_start"], permission["rule"]) == (False, "role_not_allowed")


def test_bookstore_free_member_replies_but_cannot_start(client, make_user, auth, celery_worker):
    free = make_user("free", role="member", tier="free")
    privileged = make_user("priv", role="member", tier="privileged")
    manager = make_user("manager", role="manager")

    assert error_code(start(client, auth, free, privileged)) == (403, "reply_only")
    permission = client.get("/v1/permissions/priv", headers=auth(free)).json
    assert (permission["can_start"], permission["rule"]) == (False, "reply_only")

    created = start(client, auth, privileged, free)
    assert created.status_code == 201
    conversation_id = created.json["id"]
    assert start(client, auth, manager, free).status_code == 201

    reply = send(client, auth, free, conversation_id, "thanks!")
    assert reply.status_code == 202
    assert stored(client, auth, free, reply.json["id"])["status"] == "stored"
    # Asking to "start" the existing conversation returns it, even for a free member.
    again = start(client, auth, free, privileged)
    assert (again.status_code, again.json["id"]) == (200, conversation_id)


def test_bookstore_nobody_reaches_another_store(client, make_user, auth):
    owner = make_user("owner", role="owner", tenant="store-1")
    make_user("elsewhere", role="member", tenant="store-2")
    assert error_code(start(client, auth, owner, type("U", (), {"id": "elsewhere"}))) == (
        404,
        "user_not_found",
    )
    assert error_code(client.get("/v1/permissions/elsewhere", headers=auth(owner))) == (
        404,
        "user_not_found",
    )


@pytest.mark.parametrize("policy_name", ["marketplace"])
def test_marketplace_one_conversation_per_booking(client, make_user, auth):
    customer = make_user("cust", role="customer")
    artist = make_user("artist", role="artist")
    booking = {"type": "booking", "id": "b-1"}
    first = start(client, auth, customer, artist, booking)
    assert first.status_code == 201
    assert first.json["subject"] == booking
    # The artist asking for the same pair and booking gets the same conversation.
    second = start(client, auth, artist, customer, booking)
    assert (second.status_code, second.json["id"]) == (200, first.json["id"])
    other_booking = start(client, auth, customer, artist, {"type": "booking", "id": "b-2"})
    assert other_booking.status_code == 201 and other_booking.json["id"] != first.json["id"]
    unknown_subject = start(client, auth, customer, artist, {"type": "order", "id": "o-1"})
    assert error_code(unknown_subject) == (400, "unknown_subject_type")


@pytest.mark.parametrize("policy_name", ["marketplace"])
def test_marketplace_archive_is_per_user(client, make_user, auth):
    customer, artist = make_user("cust", role="customer"), make_user("artist", role="artist")
    conversation_id = start(client, auth, customer, artist).json["id"]
    archived = client.patch(
        f"/v1/conversations/{conversation_id}", json={"archived": True}, headers=auth(customer)
    )
    assert archived.json["archived"] is True
    assert client.get("/v1/conversations", headers=auth(customer)).json["items"] == []
    listed = client.get("/v1/conversations?archived=true", headers=auth(customer)).json
    assert [c["id"] for c in listed["items"]] == [conversation_id]
    assert len(client.get("/v1/conversations", headers=auth(artist)).json["items"]) == 1


def test_concurrent_starts_make_one_conversation(app, make_user):
    from app.services.conversations import start_conversation

    make_user("alice", role="manager")
    make_user("bob", role="member")
    policy = app.extensions["switchboard.policy"]
    ids, barrier = [], threading.Barrier(6, timeout=30)

    def run():
        barrier.wait()
        with app.extensions["switchboard.db"].transaction() as session:
            conversation, _ = start_conversation(
                session, policy, session.get(User, "alice"), "bob", None
            )
            ids.append(conversation.id)

    run_threads(*[run] * 6)
    assert len(set(ids)) == 1 and len(ids) == 6


# --- Sending ----------------------------------------------------------------------------


@pytest.fixture
def pair(client, make_user, auth):
    alice = make_user("alice", role="member", tier="privileged")
    bob = make_user("bob", role="member", tier="free")
    conversation_id = start(client, auth, alice, bob).json["id"]
    return alice, bob, conversation_id


def test_send_is_stored_by_the_worker_and_reaches_both_event_logs(
    app, client, auth, pair, celery_worker
):
    alice, bob, conversation_id = pair
    response = send(client, auth, alice, conversation_id, "hello bob", client_id="c-1")
    assert response.status_code == 202
    assert response.json == {"id": str(message_id_for("alice", "c-1")), "status": "queued"}

    message = stored(client, auth, alice, response.json["id"])
    assert message["status"] == "stored" and message["body"] == "hello bob"
    assert message["expires_at"] is not None

    history = client.get(f"/v1/conversations/{conversation_id}/messages", headers=auth(bob)).json
    assert [m["body"] for m in history["items"]] == ["hello bob"]
    listing = client.get("/v1/conversations", headers=auth(bob)).json["items"]
    assert listing[0]["unread_count"] == 1
    assert listing[0]["last_message"]["preview"] == "hello bob"
    assert listing[0]["other_participants"][0]["id"] == "alice"
    assert client.get("/v1/unread", headers=auth(bob)).json == {"total": 1, "conversations": 1}
    assert client.get("/v1/unread", headers=auth(alice)).json == {"total": 0, "conversations": 0}

    assert client.get("/v1/me", headers=auth(bob)).json["last_event_id"] == 1
    for user in ("alice", "bob"):
        events = events_of(app, user)
        assert [(e.seq, e.type) for e in events] == [(1, "message.created")]
        assert events[0].payload["id"] == response.json["id"]
        assert events[0].payload["accepted_at"]


def test_retention_expiry_follows_the_senders_tier(app, client, auth, pair, celery_worker):
    alice, bob, conversation_id = pair  # alice privileged (180 days), bob free (30 days)
    from_alice = stored(
        client, auth, alice, send(client, auth, alice, conversation_id, "a").json["id"]
    )
    from_bob = stored(client, auth, bob, send(client, auth, bob, conversation_id, "b").json["id"])
    from datetime import datetime

    for message, days in ((from_alice, 180), (from_bob, 30)):
        lifetime = datetime.fromisoformat(message["expires_at"]) - datetime.fromisoformat(
            message["created_at"]
        )
        assert lifetime == timedelta(days=days)


def test_same_client_id_is_one_message_and_another_body_is_409(
    app, client, auth, pair, celery_worker
):
    alice, _, conversation_id = pair
    first = send(client, auth, alice, conversation_id, "hi", client_id="dup")
    repeat = send(client, auth, alice, conversation_id, "hi", client_id="dup")
    assert first.json["id"] == repeat.json["id"]
    assert error_code(send(client, auth, alice, conversation_id, "other", client_id="dup")) == (
        409,
        "client_id_reused",
    )
    stored(client, auth, alice, first.json["id"])
    after = send(client, auth, alice, conversation_id, "hi", client_id="dup")
    assert after.status_code == 202 and after.json == {"id": first.json["id"], "status": "stored"}
    assert error_code(send(client, auth, alice, conversation_id, "other", client_id="dup")) == (
        409,
        "client_id_reused",
    )
    wait_for(lambda: count_messages(app) == 1)
    assert count_messages(app) == 1
    assert [e.type for e in events_of(app, "bob")] == ["message.created"]


def test_rerunning_the_task_stores_once(app, pair):
    _, _, conversation_id = pair
    message_id = queue_send(app, "alice", conversation_id, "once", "rerun")
    assert message_id == str(message_id_for("alice", "rerun"))
    outcomes = [send_message.apply(args=[message_id]).get() for _ in range(3)]
    assert outcomes == ["stored", "duplicate", "duplicate"]
    assert count_messages(app) == 1
    assert len(events_of(app, "bob")) == 1
    with app.extensions["switchboard.db"].sessions() as session:
        assert session.get(Participant, (uuid.UUID(conversation_id), "bob")).unread_count == 1
        assert session.get_one(Message, uuid.UUID(message_id)).decided_at is not None


def test_concurrent_sends_and_reads_keep_unread_counts_exact(app, client, auth, pair):
    """Sends from alice race bob reading, through the real task code on many threads;
    no thread may fail (the deadlock this once hid), and bob's count always equals the
    messages after his read position."""
    _, bob, conversation_id = pair
    from app.services.conversations import mark_read

    message_ids = [queue_send(app, "alice", conversation_id, f"m{i}", f"c{i}") for i in range(60)]

    def send_some(ids):
        def run():
            for message_id in ids:
                send_message.apply(args=[message_id]).get()

        return run

    def read_some():
        for _ in range(30):
            with app.extensions["switchboard.db"].transaction() as session:
                mark_read(session, session.get(User, "bob"), conversation_id, None)

    retried = ("switchboard_tasks_total", {"task": send_message.name, "outcome": "retried"})
    retries_before = REGISTRY.get_sample_value(*retried) or 0
    run_threads(
        *(send_some(message_ids[i::6]) for i in range(6)),
        read_some,
        read_some,
        read_some,
    )
    # A deadlock would show as a failed reader or as a send quietly retried.
    assert (REGISTRY.get_sample_value(*retried) or 0) == retries_before

    with app.extensions["switchboard.db"].sessions() as session:
        participant = session.get(Participant, (uuid.UUID(conversation_id), "bob"))
        messages = session.scalars(select(Message).where(Message.status == "stored")).all()
        read_at = (
            (participant.last_read_at, str(participant.last_read_message_id))
            if participant.last_read_message_id
            else None
        )
        expected = sum(
            1 for m in messages if read_at is None or (m.created_at, str(m.id)) > read_at
        )
        assert len(messages) == 60
        assert participant.unread_count == expected

    client.post(f"/v1/conversations/{conversation_id}/read", json={}, headers=auth(bob))
    assert client.get("/v1/unread", headers=auth(bob)).json["total"] == 0


def test_worker_rejects_a_send_the_precheck_allowed(app, client, auth, pair, redis_url):
    alice, bob, conversation_id = pair
    # No worker yet: the send waits in the queue while bob blocks alice.
    response = send(client, auth, alice, conversation_id, "are you there?")
    message_id = response.json["id"]
    assert client.get(f"/v1/messages/{message_id}", headers=auth(alice)).json["status"] == "queued"
    assert error_code(client.get(f"/v1/messages/{message_id}", headers=auth(bob))) == (
        404,
        "message_not_found",
    )
    assert client.put("/v1/blocks/alice", headers=auth(bob)).status_code == 201

    from celery.contrib.testing.worker import start_worker

    # The same shutdown allowance as the celery_worker fixture's: on a loaded CI machine
    # the worker thread once took longer than Celery's default 10 s to stop.
    with start_worker(
        app.extensions["celery"],
        pool="threads",
        perform_ping_check=False,
        queues=["direct"],
        shutdown_timeout=30,
    ):
        message = stored(client, auth, alice, message_id)
    assert (message["status"], message["reason"], message["body"]) == ("rejected", "blocked", None)
    assert [e.type for e in events_of(app, "alice")] == ["message.rejected"]
    assert events_of(app, "bob") == []
    history = client.get(f"/v1/conversations/{conversation_id}/messages", headers=auth(bob)).json
    assert history["items"] == []


def test_read_receipt_and_unread(app, client, auth, pair, celery_worker):
    alice, bob, conversation_id = pair
    ids = [send(client, auth, alice, conversation_id, f"m{i}").json["id"] for i in range(3)]
    for message_id in ids:
        stored(client, auth, alice, message_id)
    state = client.post(
        f"/v1/conversations/{conversation_id}/read", json={"message_id": ids[0]}, headers=auth(bob)
    ).json
    assert state["unread_count"] == 2
    state = client.post(
        f"/v1/conversations/{conversation_id}/read", json={}, headers=auth(bob)
    ).json
    assert (state["unread_count"], state["last_read_message_id"]) == (0, ids[-1])
    # Reading an older message never moves the position back.
    state = client.post(
        f"/v1/conversations/{conversation_id}/read", json={"message_id": ids[0]}, headers=auth(bob)
    ).json
    assert state["unread_count"] == 0
    receipts = [e for e in events_of(app, "alice") if e.type == "conversation.read"]
    assert [r.payload["message_id"] for r in receipts] == [ids[0], ids[-1]]


def test_sender_deletes_own_message(app, client, auth, pair, celery_worker):
    alice, bob, conversation_id = pair
    message_id = send(client, auth, alice, conversation_id, "oops").json["id"]
    stored(client, auth, alice, message_id)
    assert error_code(client.delete(f"/v1/messages/{message_id}", headers=auth(bob))) == (
        403,
        "not_sender",
    )
    deleted = client.delete(f"/v1/messages/{message_id}", headers=auth(alice))
    assert deleted.status_code == 200 and deleted.json["body"] is None
    assert client.delete(f"/v1/messages/{message_id}", headers=auth(alice)).status_code == 200
    history = client.get(f"/v1/conversations/{conversation_id}/messages", headers=auth(bob)).json
    placeholder = history["items"][0]
    assert placeholder["body"] is None
    assert placeholder["deleted"]["reason"] == "deleted_by_sender"
    assert client.get("/v1/unread", headers=auth(bob)).json["total"] == 0
    assert [e.type for e in events_of(app, "bob")] == ["message.created", "message.deleted"]
    listing = client.get("/v1/conversations", headers=auth(bob)).json["items"][0]
    assert listing["last_message"]["preview"] is None and listing["last_message"]["deleted"]


def test_history_and_conversation_pages(app, client, auth, make_user, celery_worker):
    manager = make_user("manager", role="manager")
    members = [make_user(f"m{i}", role="member") for i in range(5)]
    conversation_ids = [start(client, auth, manager, m).json["id"] for m in members]
    first = client.get("/v1/conversations?limit=2", headers=auth(manager)).json
    assert len(first["items"]) == 2 and first["next_cursor"]
    # A conversation started between pages does not shift the pages already handed out.
    start(client, auth, manager, make_user("late", role="member"))
    second = client.get(
        f"/v1/conversations?limit=2&cursor={first['next_cursor']}", headers=auth(manager)
    ).json
    third = client.get(
        f"/v1/conversations?limit=2&cursor={second['next_cursor']}", headers=auth(manager)
    ).json
    seen = [c["id"] for page in (first, second, third) for c in page["items"]]
    assert sorted(seen) == sorted(conversation_ids) and third["next_cursor"] is None

    conversation_id = conversation_ids[0]
    ids = []
    for i in range(5):
        # One at a time: concurrent sends are stored in the order the workers decide them.
        ids.append(send(client, auth, manager, conversation_id, f"m{i}").json["id"])
        stored(client, auth, manager, ids[-1])
    page1 = client.get(
        f"/v1/conversations/{conversation_id}/messages?limit=3", headers=auth(manager)
    ).json
    page2 = client.get(
        f"/v1/conversations/{conversation_id}/messages?limit=3&before={page1['next_cursor']}",
        headers=auth(manager),
    ).json
    assert [m["body"] for m in page1["items"] + page2["items"]] == [
        f"m{i}" for i in (4, 3, 2, 1, 0)
    ]
    assert page2["next_cursor"] is None
    assert {m["id"] for m in page1["items"] + page2["items"]} == set(ids)


def test_blocks(client, auth, make_user):
    alice = make_user("alice", role="manager")
    make_user("bob", role="manager")
    assert client.put("/v1/blocks/bob", headers=auth(alice)).status_code == 201
    assert client.put("/v1/blocks/bob", headers=auth(alice)).status_code == 200
    assert client.get("/v1/blocks", headers=auth(alice)).json == {"items": ["bob"]}
    bob = make_user("bob", role="manager")
    assert error_code(start(client, auth, bob, alice)) == (403, "blocked")
    assert client.get("/v1/permissions/alice", headers=auth(bob)).json["rule"] == "blocked"
    assert client.delete("/v1/blocks/bob", headers=auth(alice)).status_code == 204
    assert start(client, auth, bob, alice).status_code == 201
    assert error_code(client.put("/v1/blocks/alice", headers=auth(alice))) == (400, "self_block")
