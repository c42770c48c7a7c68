"""The API's send pre-check: one Core query and one insert on an autocommit connection
(counted on the wire), the enqueue only once the row is committed, the answers' order
(401 before anything else, on every route, with rate limits on too), and the pure
decision helper `judge_send` on plain data."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select

from app.auth import mint_token
from app.models import Block, Message
from app.policy import Actor, load_policy
from app.problems import ApiError
from app.services import sends
from app.services.messages import body_digest, decide_for_recipients, message_id_for
from app.services.sends import (
    EarlierSend,
    SenderRef,
    SendFacts,
    accept_plain_send,
    accept_send,
    judge_send,
    load_send_facts,
)
from tests.helpers import error_code


@pytest.fixture
def chat(client, make_user, auth):
    alice = make_user("alice", role="member", tier="privileged")
    bob = make_user("bob", role="member", tier="free")
    response = client.post("/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice))
    assert response.status_code == 201, response.json
    return alice, bob, response.json["id"]


def ghost_headers(app) -> dict[str, str]:
    """A valid token for a user the host app never provisioned."""
    token = mint_token(
        app.extensions["switchboard.settings"], "ghost", "t1", ttl=timedelta(minutes=5)
    )
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def wire_log(app, trace_file: Path) -> Iterator[tuple[list[tuple[str, bool]], Callable[[], int]]]:
    """The statements the app's engine runs, each with whether its connection was in
    autocommit (psycopg sends BEGIN implicitly before the first statement otherwise), and
    a count of round trips from libpq's own protocol trace: every frontend Sync (extended
    protocol) or Query (simple protocol, which psycopg's BEGIN and COMMIT use) is one,
    except psycopg's one-time preparation of a statement (Parse, Sync)."""
    engines = app.extensions["switchboard.db"].engines
    statements: list[tuple[str, bool]] = []
    traced = []
    trace = trace_file.open("w")

    def record(conn, _cursor, statement, *_args) -> None:
        dbapi_connection = conn.connection.dbapi_connection
        if dbapi_connection not in traced:
            dbapi_connection.pgconn.trace(trace.fileno())
            traced.append(dbapi_connection)
        statements.append((statement, dbapi_connection.autocommit))

    def round_trips() -> int:
        trace.flush()
        count = 0
        since_sync: list[str] = []
        for line in trace_file.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) <= 3 or fields[1] != "F":
                continue
            message = fields[3].split(" ")[0]
            if message == "Query":
                count += 1
            elif message == "Sync":
                # Parse alone is psycopg preparing a statement it has run five times on
                # this connection (prepare_threshold): once per connection and statement,
                # after which each run skips the Parse. Not a round trip of the request.
                if since_sync != ["Parse"]:
                    count += 1
                since_sync = []
            else:
                since_sync.append(message)
        return count

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements, round_trips
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
        for dbapi_connection in traced:
            dbapi_connection.pgconn.untrace()
        trace.close()


def post_send(client, headers, conversation_id: str, body: str = "hello", client_id: str = "c-1"):
    return client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": body, "client_id": client_id},
        headers=headers,
    )


# --------------------------------------------------------------------------- round trips


def test_a_plain_send_is_two_round_trips_on_the_wire(app, client, auth, chat, tmp_path):
    """The pre-check and the insert, in autocommit: no BEGIN, no COMMIT, no ROLLBACK.
    The code before this change made 6 statements in a transaction (8 round trips)."""
    alice, _, conversation_id = chat
    headers = auth(alice)
    assert post_send(client, headers, conversation_id, client_id="warm").status_code == 202
    with wire_log(app, tmp_path / "trace.txt") as (statements, round_trips):
        response = post_send(client, headers, conversation_id)
        counted = round_trips()
    assert response.status_code == 202, response.json
    assert len(statements) <= 2, statements
    assert all(autocommit for _, autocommit in statements), statements
    assert [text.split()[0] for text, _ in statements] == ["SELECT", "INSERT"]
    assert counted == 2, (tmp_path / "trace.txt").read_text()


def test_a_repeated_send_is_one_statement_and_answers_as_the_first(
    app, client, auth, chat, tmp_path
):
    alice, _, conversation_id = chat
    first = post_send(client, auth(alice), conversation_id)
    with wire_log(app, tmp_path / "trace.txt") as (statements, round_trips):
        again = post_send(client, auth(alice), conversation_id)
        counted = round_trips()
    assert again.status_code == 202 and again.json == first.json
    assert [text.split()[0] for text, _ in statements] == ["SELECT"], statements
    assert counted == 1
    other = post_send(client, auth(alice), conversation_id, body="something else")
    assert error_code(other) == (409, "client_id_reused")


def test_a_statement_psycopg_prepares_still_costs_one_round_trip_a_repeat(
    app, client, auth, chat, tmp_path
):
    """psycopg prepares a statement on its sixth run on one connection (an extra Parse,
    Sync, once); the count leaves that out, so it does not depend on how often earlier
    tests used the pooled connection (CI's embedded pass once counted 2 here)."""
    alice, _, conversation_id = chat
    headers = auth(alice)
    # Fresh connections, so that the threshold is crossed in this test whatever earlier
    # tests ran on the pooled ones (a statement prepared already shows no Parse at all).
    app.extensions["switchboard.db"].dispose()
    assert post_send(client, headers, conversation_id).status_code == 202
    prepared = 0
    for repeat in range(20):  # the threshold is crossed even if spread over 3 connections
        trace_file = tmp_path / f"trace-{repeat}.txt"
        with wire_log(app, trace_file) as (statements, round_trips):
            assert post_send(client, headers, conversation_id).status_code == 202
            counted = round_trips()
        frames = [
            line.split("\t")[3].split(" ")[0]
            for line in trace_file.read_text().splitlines()
            if line.split("\t")[1:2] == ["F"]
        ]
        prepared += sum(
            1
            for at, frame in enumerate(frames[:-1])
            if frame == "Parse" and frames[at + 1] == "Sync"
        )
        assert len(statements) == 1 and counted == 1, (repeat, trace_file.read_text())
    assert prepared >= 1, "no repeat reached psycopg's prepare threshold"


def test_the_enqueue_runs_once_the_row_is_committed(app, client, auth, chat, monkeypatch):
    """The after-commit hook fires on the autocommit session, and by then another
    connection already sees the queued row: the 202's promise holds."""
    alice, _, conversation_id = chat
    seen: list[tuple[uuid.UUID, str | None]] = []

    def enqueue(message_id: uuid.UUID) -> None:
        with app.extensions["switchboard.db"].read_sessions() as other:
            status = other.scalar(select(Message.status).where(Message.id == message_id))
        seen.append((message_id, status))

    monkeypatch.setattr("app.api.conversations.enqueue_send", enqueue)
    response = post_send(client, auth(alice), conversation_id)
    assert response.status_code == 202
    assert seen == [(uuid.UUID(response.json["id"]), "queued")]
    # A retry of a send still queued enqueues it again (its first task may be lost).
    again = post_send(client, auth(alice), conversation_id)
    assert again.json == response.json
    assert len(seen) == 2


def test_a_concurrent_twin_is_answered_from_the_row_it_lost_to(
    app, client, auth, chat, monkeypatch
):
    """The race: the pre-check saw no earlier send, but a twin committed one before this
    insert. ON CONFLICT returns nothing; the row is read again in autocommit."""
    alice, _, conversation_id = chat
    first = post_send(client, auth(alice), conversation_id)
    real = sends.load_send_facts

    def missed_the_twin(*args, **kwargs) -> SendFacts:
        facts = real(*args, **kwargs)
        return SendFacts(facts.sender, facts.is_member, facts.recipients, facts.blocked_by, None)

    monkeypatch.setattr(sends, "load_send_facts", missed_the_twin)
    enqueued: list[uuid.UUID] = []
    monkeypatch.setattr("app.api.conversations.enqueue_send", enqueued.append)
    twin = post_send(client, auth(alice), conversation_id)
    assert (twin.status_code, twin.json) == (202, first.json)
    assert enqueued == [uuid.UUID(first.json["id"])]  # still queued: enqueued again
    other = post_send(client, auth(alice), conversation_id, body="another body")
    assert error_code(other) == (409, "client_id_reused")
    with app.extensions["switchboard.db"].read_sessions() as session:
        assert len(session.scalars(select(Message.id)).all()) == 1


def test_a_send_with_attachments_needs_a_transaction(app, chat):
    alice, _, conversation_id = chat
    database = app.extensions["switchboard.db"]
    with database.read_sessions() as session, pytest.raises(RuntimeError, match="transaction"):
        accept_send(
            session,
            app.extensions["switchboard.policy"],
            SenderRef(alice.id, alice.tenant_id),
            conversation_id,
            "",
            "a-1",
            enqueue=lambda _message_id: None,
            attachment_ids=[str(uuid.uuid4())],
        )


def test_a_plain_send_needs_an_autocommit_connection(app, chat):
    """Without autocommit its two statements would sit in a transaction nobody commits,
    and the enqueue would run before the row is durable."""
    alice, _, conversation_id = chat
    database = app.extensions["switchboard.db"]
    enqueued: list[uuid.UUID] = []
    with database.engine.connect() as connection, pytest.raises(RuntimeError, match="autocommit"):
        accept_plain_send(
            connection,
            app.extensions["switchboard.policy"],
            SenderRef(alice.id, alice.tenant_id),
            conversation_id,
            "hi",
            "p-1",
            enqueue=enqueued.append,
        )
    assert enqueued == []


@pytest.mark.parametrize("policy_name", ["marketplace"])
def test_the_api_sends_attachments_in_a_transaction(app, client, make_user, auth, tmp_path):
    customer = make_user("cust", role="customer")
    make_user("artist", role="artist")
    started = client.post(
        "/v1/conversations", json={"participant_id": "artist"}, headers=auth(customer)
    )
    with wire_log(app, tmp_path / "trace.txt") as (statements, _):
        response = client.post(
            f"/v1/conversations/{started.json['id']}/messages",
            json={"body": "", "client_id": "p-1", "attachment_ids": [str(uuid.uuid4())]},
            headers=auth(customer),
        )
    assert error_code(response) == (404, "attachment_not_found")
    assert statements and not any(autocommit for _, autocommit in statements), statements


# --------------------------------------------------------------------------- the order of answers


def test_an_unprovisioned_user_hears_401_before_anything_about_the_send(app, client, chat):
    _, _, conversation_id = chat
    ghost = ghost_headers(app)
    url = f"/v1/conversations/{conversation_id}/messages"
    for path, body in (
        (url, {"body": "hi", "client_id": "g-1"}),  # a good send
        (url, {"body": "hi"}),  # no client_id: a 400 for a known user
        (url, {"body": 5, "client_id": "g-1"}),
        ("/v1/conversations/not-a-uuid/messages", {"body": "hi", "client_id": "g-1"}),
        (url, {"body": "hi", "client_id": "g-1", "attachment_ids": ["x"]}),
    ):
        assert error_code(client.post(path, json=body, headers=ghost)) == (401, "unknown_user")
    raw = client.post(url, data="{", content_type="application/json", headers=ghost)
    assert error_code(raw) == (401, "unknown_user")


def test_a_known_user_still_gets_the_same_refusals(app, client, auth, chat, make_user):
    alice, bob, conversation_id = chat
    url = f"/v1/conversations/{conversation_id}/messages"
    assert error_code(client.post(url, json={"body": "hi"}, headers=auth(alice)))[0] == 400
    malformed = "/v1/conversations/not-a-uuid/messages"
    body = {"body": "hi", "client_id": "k-1"}
    assert error_code(client.post(malformed, json=body, headers=auth(alice))) == (
        404,
        "conversation_not_found",
    )
    stranger = make_user("alice2", tenant="t2", role="member", tier="privileged")
    assert error_code(client.post(url, json=body, headers=auth(stranger))) == (
        404,
        "conversation_not_found",
    )
    # bookstore has no attachments: 403 for a member, after the membership check.
    with_photo = {**body, "attachment_ids": [str(uuid.uuid4())]}
    assert error_code(client.post(url, json=with_photo, headers=auth(alice))) == (
        403,
        "attachments_disabled",
    )
    carol = make_user("carol", role="member")
    assert error_code(client.post(url, json=with_photo, headers=auth(carol))) == (
        404,
        "conversation_not_found",
    )
    long = "x" * (app.extensions["switchboard.policy"].max_message_length + 1)
    assert error_code(post_send(client, auth(alice), conversation_id, long)) == (
        413,
        "message_too_long",
    )
    with app.extensions["switchboard.db"].transaction() as session:
        session.add(Block(blocker_id=bob.id, blocked_id=alice.id, tenant_id=bob.tenant_id))
    assert error_code(post_send(client, auth(alice), conversation_id)) == (403, "blocked")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/me"), ("GET", "/v1/conversations"), ("POST", "/v1/conversations")],
)
def test_with_rate_limits_on_other_routes_answer_401_however_often(
    app_factory, clean_state, method, path
):
    """The limit is keyed by the token's claims, but an unprovisioned user is refused
    first: never a 429 (nor a 503 from Redis) instead of the 401."""
    limited = app_factory(SWITCHBOARD_POLICY="marketplace", SWITCHBOARD_RATE_LIMITS_ENABLED="true")
    client, ghost = limited.test_client(), ghost_headers(limited)
    json = {"participant_id": "bob"} if method == "POST" else None
    for _ in range(25):  # past the marketplace burst of 20
        response = client.open(path, method=method, json=json, headers=ghost)
        assert error_code(response) == (401, "unknown_user")


def test_with_rate_limits_on_the_send_answers_401(app_factory, clean_state):
    """The send's limit is spent by the token's claims before its one query (a validly
    signed token keeps spamming into a 429, which is fine); within it, the answer is 401."""
    limited = app_factory(SWITCHBOARD_POLICY="bookstore", SWITCHBOARD_RATE_LIMITS_ENABLED="true")
    client, ghost = limited.test_client(), ghost_headers(limited)
    response = post_send(client, ghost, str(uuid.uuid4()))
    assert error_code(response) == (401, "unknown_user")


# --------------------------------------------------------------------------- the pure helper

POLICY = load_policy("bookstore")
CONVERSATION = uuid.UUID("00000000-0000-4000-8000-000000000001")
ALICE = Actor("alice", "t1", "member", "privileged")
BOB = Actor("bob", "t1", "member", "free")
CAROL = Actor("carol", "t1", "member", "free")


def facts(
    sender: Actor | None = ALICE,
    *,
    is_member: bool = True,
    recipients: tuple[Actor, ...] = (BOB,),
    blocked_by: frozenset[str] = frozenset(),
    earlier: EarlierSend | None = None,
) -> SendFacts:
    return SendFacts(sender, is_member, recipients, blocked_by, earlier)


def refused(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.status, caught.value.code


def test_judge_send_lets_a_good_send_through():
    verdict = judge_send(POLICY, facts(), CONVERSATION, "hi")
    assert (verdict.attachments, verdict.digest, verdict.repeat_status) == (
        [],
        body_digest("hi"),
        None,
    )


def test_judge_send_answers_in_the_apis_order():
    blocked_ghost = facts(None, is_member=False, blocked_by=frozenset({"bob"}))
    assert refused(lambda: judge_send(POLICY, blocked_ghost, None, "")) == (401, "unknown_user")
    assert refused(lambda: judge_send(POLICY, facts(is_member=False), CONVERSATION, "")) == (
        404,
        "conversation_not_found",
    )
    assert refused(lambda: judge_send(POLICY, facts(), None, "hi")) == (
        404,
        "conversation_not_found",
    )
    # Membership before the attachment ids; the attachment ids before the body.
    assert refused(lambda: judge_send(POLICY, facts(), CONVERSATION, "", ["x"])) == (
        403,
        "attachments_disabled",
    )
    blocked = facts(blocked_by=frozenset({"bob"}))
    assert refused(lambda: judge_send(POLICY, blocked, CONVERSATION, " ")) == (
        400,
        "empty_message",
    )
    long = "x" * (POLICY.max_message_length + 1)
    assert refused(lambda: judge_send(POLICY, blocked, CONVERSATION, long)) == (
        413,
        "message_too_long",
    )
    assert refused(lambda: judge_send(POLICY, blocked, CONVERSATION, "hi")) == (403, "blocked")


def test_judge_send_asks_may_reply_of_every_recipient_in_id_order():
    free_sender = Actor("dave", "t1", "member", "free")
    other_tenant = Actor("erin", "t2", "member", "free")
    assert judge_send(POLICY, facts(free_sender), CONVERSATION, "hi").repeat_status is None
    assert refused(
        lambda: judge_send(POLICY, facts(recipients=(BOB, other_tenant)), CONVERSATION, "hi")
    ) == (403, "other_tenant")
    # Two refusals: the same one wins whichever order the query listed them in.
    both = frozenset({"bob", "carol"})
    answers = {
        refused(
            lambda order=order: judge_send(
                POLICY, facts(recipients=order, blocked_by=both), CONVERSATION, "hi"
            )
        )
        for order in ((BOB, CAROL), (CAROL, BOB))
    }
    assert answers == {(403, "blocked")}


def test_judge_send_answers_a_repeat_without_deciding_again():
    earlier = EarlierSend(CONVERSATION, body_digest("hi"), "stored")
    # Bob has blocked alice since: the repeat still says where the first send stands.
    repeat = facts(blocked_by=frozenset({"bob"}), earlier=earlier)
    assert judge_send(POLICY, repeat, CONVERSATION, "hi").repeat_status == "stored"
    assert refused(lambda: judge_send(POLICY, repeat, CONVERSATION, "other body")) == (
        409,
        "client_id_reused",
    )
    elsewhere = uuid.UUID("00000000-0000-4000-8000-000000000002")
    assert refused(lambda: judge_send(POLICY, repeat, elsewhere, "hi")) == (
        409,
        "client_id_reused",
    )
    # But not before the sender and membership checks.
    assert refused(
        lambda: judge_send(POLICY, facts(None, earlier=earlier), CONVERSATION, "hi")
    ) == (
        401,
        "unknown_user",
    )


def test_decide_for_recipients_from_plain_data():
    policy = load_policy("bookstore")
    alice = Actor("alice", "t1", "member", "privileged")
    bob = Actor("bob", "t1", "member", "free")
    carol = Actor("carol", "t1", "member", "free")
    assert decide_for_recipients(policy, alice, [bob], set(), "hi")
    assert decide_for_recipients(policy, alice, [bob], {"bob"}, "hi").rule == "blocked"
    assert decide_for_recipients(policy, alice, [bob], set(), " ").rule == "empty_message"
    long = "x" * (policy.max_message_length + 1)
    assert decide_for_recipients(policy, alice, [bob], set(), long).rule == "message_too_long"
    # The body is checked before the recipients, and recipients in id order: the first
    # refusal is the same whoever is listed first.
    assert decide_for_recipients(policy, alice, [bob], {"bob"}, " ").rule == "empty_message"
    assert (
        decide_for_recipients(policy, alice, [carol, bob], {"bob", "carol"}, "hi").rule
        == decide_for_recipients(policy, alice, [bob, carol], {"bob", "carol"}, "hi").rule
    )


# --------------------------------------------------------------------------- the query itself


def test_the_pre_check_query_reads_what_the_decision_needs(app, client, auth, chat, make_user):
    alice, bob, conversation_id = chat
    database = app.extensions["switchboard.db"]
    conversation = uuid.UUID(conversation_id)
    message_id = message_id_for(alice.id, "q-1")

    def read(sender: SenderRef, conversation_uuid: uuid.UUID | None = conversation) -> SendFacts:
        with database.read_sessions() as session:
            return load_send_facts(session.connection(), sender, conversation_uuid, message_id)

    found = read(SenderRef(alice.id, alice.tenant_id))
    assert found == SendFacts(
        Actor("alice", "t1", "member", "privileged"),
        True,
        (Actor("bob", "t1", "member", "free"),),
        frozenset(),
        None,
    )
    assert read(SenderRef("alice", "t2")).sender is None  # the token's tenant counts
    assert read(SenderRef("ghost", "t1")).sender is None
    assert not read(SenderRef(alice.id, alice.tenant_id), None).is_member
    carol = make_user("carol", role="member")
    assert not read(SenderRef(carol.id, carol.tenant_id)).is_member
    with database.transaction() as session:
        session.add(Block(blocker_id=bob.id, blocked_id=alice.id, tenant_id=bob.tenant_id))
        # Alice's block of bob is not bob's of alice: it does not count for her send.
        session.add(Block(blocker_id=alice.id, blocked_id=bob.id, tenant_id=alice.tenant_id))
    assert read(SenderRef(alice.id, alice.tenant_id)).blocked_by == frozenset({"bob"})
    assert read(SenderRef(bob.id, bob.tenant_id)).blocked_by == frozenset({"alice"})
    with database.transaction() as session:
        session.query(Block).delete()
    assert post_send(client, auth(alice), conversation_id, "hi", "q-1").status_code == 202
    assert read(SenderRef(alice.id, alice.tenant_id)).earlier == EarlierSend(
        conversation, body_digest("hi"), "queued"
    )
