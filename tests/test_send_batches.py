"""Many sends per worker task: the batcher that groups committed sends, the batch store
that decides each on its own in one transaction, and a batch that fails as a whole."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import kombu.messaging
import psycopg
import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import make_url

from app.models import Block, Conversation, Message, Participant
from app.services.messages import store_messages
from tests.helpers import events_of, queue_send, run_threads, wait_for
from workers import tasks
from workers.broker import is_amqp
from workers.send_batches import SendBatcher, holds_window


class BrokerDown(Exception):
    pass


def make_batcher(window: float, max_batch: int = 100) -> tuple[SendBatcher, list, list]:
    published: list[list[str]] = []
    lost: list[list[str]] = []

    def publish(ids: list[str]) -> None:
        if ids and ids[0].startswith("fail"):
            raise BrokerDown("the broker is away")
        published.append(ids)

    batcher = SendBatcher(
        publish,
        window=window,
        max_batch=max_batch,
        broker_errors=(BrokerDown,),
        on_failure=lambda ids, _exc: lost.append(ids),
    )
    return batcher, published, lost


def test_a_quiet_batcher_publishes_each_send_at_once():
    batcher, published, _ = make_batcher(window=0.05)
    batcher.add("a")
    wait_for(lambda: published == [["a"]])
    time.sleep(0.06)  # past the window: the next send does not wait
    batcher.add("b")
    wait_for(lambda: published == [["a"], ["b"]], timeout=0.04)


def test_sends_within_the_window_share_one_task_up_to_the_maximum():
    # A 1 s window: two sends in the last second are already "busy" (holds_window).
    batcher, published, _ = make_batcher(window=1.0, max_batch=4)
    batcher.add("first")
    wait_for(lambda: published == [["first"]])
    for n in range(6):
        batcher.add(f"s{n}")
    wait_for(lambda: sum(len(batch) for batch in published) == 7)
    assert published == [["first"], ["s0", "s1", "s2", "s3"], ["s4", "s5"]]


def test_a_batcher_that_is_not_busy_does_not_hold_the_window():
    """Two sends in the last second would not share a 0.5 s window: the second goes out
    at once instead of waiting for the window after the first."""
    batcher, published, _ = make_batcher(window=0.5)
    batcher.add("a")
    wait_for(lambda: published == [["a"]])
    batcher.add("b")
    wait_for(lambda: published == [["a"], ["b"]], timeout=0.3)


@pytest.mark.parametrize(
    ("sends_last_second", "window", "holds"),
    [(20, 0.03, False), (66, 0.03, False), (67, 0.03, True), (200, 0.03, True), (1, 2.0, True)],
)
def test_the_window_is_held_when_two_sends_are_expected_in_it(
    sends_last_second: int, window: float, holds: bool
) -> None:
    assert holds_window(sends_last_second, window) is holds


def test_a_batch_the_broker_refuses_is_counted_and_the_batcher_goes_on():
    batcher, published, lost = make_batcher(window=0)
    batcher.add("fail-1")
    wait_for(lambda: lost == [["fail-1"]])
    batcher.add("ok")
    wait_for(lambda: published == [["ok"]])


def test_flush_publishes_what_is_pending_in_the_calling_thread():
    batcher, published, _ = make_batcher(window=60)
    batcher.add("first")
    wait_for(lambda: published == [["first"]])
    batcher.add("second")  # waits a minute for the window
    assert batcher.pending() == 1
    batcher.flush()
    assert published == [["first"], ["second"]] and batcher.pending() == 0


def test_a_batcher_refuses_a_negative_window():
    with pytest.raises(ValueError):
        make_batcher(window=-1)


@pytest.fixture
def people(make_user):
    return {
        name: make_user(name, role="member", tier=tier)
        for name, tier in (("alice", "privileged"), ("bob", "free"), ("carol", "free"))
    }


def start(client, auth, sender, other_id: str) -> str:
    response = client.post(
        "/v1/conversations", json={"participant_id": other_id}, headers=auth(sender)
    )
    assert response.status_code in (200, 201), response.json
    return response.json["id"]


def count_statements(app):
    """The statements the app's engines run (BEGIN is not one: psycopg sends it with the
    first statement of a transaction, and COMMIT once, whatever the batch's size)."""
    statements: list[str] = []
    engines = app.extensions["switchboard.db"].engines

    def record(_conn, _cursor, statement, *_args):
        statements.append(statement)

    def stop() -> None:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    return statements, stop


def _lockable(database_url: str, conversation_ids: list[str]) -> bool:
    """Whether another connection could lock these conversations right now (NOWAIT)."""
    libpq_url = make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(libpq_url.render_as_string(hide_password=False), autocommit=True) as other:
        try:
            other.execute(
                "SELECT id FROM conversations WHERE id = ANY(%s) FOR UPDATE NOWAIT",
                [[uuid.UUID(c) for c in conversation_ids]],
            )
        except psycopg.errors.LockNotAvailable:
            return False
    return True


def test_the_first_read_of_a_plain_batch_locks_its_conversations(
    app, client, auth, people, database_url
):
    """One round trip reads the batch and locks its conversations (in id order) when no
    send in it has attachments."""
    alice = people["alice"]
    conversations = [start(client, auth, alice, other) for other in ("bob", "carol")]
    batch = [
        queue_send(app, "alice", c, "hello", f"plain-{n}") for n, c in enumerate(conversations)
    ]
    engine = app.extensions["switchboard.db"].engine
    lockable_before: list[bool] = []  # before each of the store's first two statements

    def check(_conn, _cursor, _statement, *_args):
        if len(lockable_before) < 2:
            lockable_before.append(_lockable(database_url, conversations))

    event.listen(engine, "before_cursor_execute", check)
    try:
        with app.extensions["switchboard.db"].transaction() as session:
            results = store_messages(session, app.extensions["switchboard.policy"], batch)
    finally:
        event.remove(engine, "before_cursor_execute", check)
    assert [result.outcome for result in results] == ["stored", "stored"]
    assert lockable_before == [True, False]  # the first statement took the locks


def test_a_batch_with_attachments_takes_no_lock_until_their_bytes_are_checked(
    app, client, auth, people, database_url
):
    """Checking an upload's bytes (download, decode) takes a while: no conversation of the
    batch is locked meanwhile, the plain sends' included; the locks follow."""
    alice = people["alice"]
    with_bob = start(client, auth, alice, "bob")
    with_carol = start(client, auth, alice, "carol")
    plain = queue_send(app, "alice", with_bob, "plain", "p-1")
    photo = queue_send(app, "alice", with_carol, "a photo", "a-1")
    with app.extensions["switchboard.db"].transaction() as session:
        # As if it carried an upload (it has none: the check below finds nothing wrong).
        session.get_one(Message, uuid.UUID(photo)).attachment_count = 1
    lockable_while_checking: list[bool] = []

    def check_attachments(message_id: uuid.UUID) -> None:
        assert str(message_id) == photo
        lockable_while_checking.append(_lockable(database_url, [with_bob, with_carol]))

    with app.extensions["switchboard.db"].transaction() as session:
        results = store_messages(
            session,
            app.extensions["switchboard.policy"],
            [plain, photo],
            check_attachments=check_attachments,
        )
        assert not _lockable(database_url, [with_bob, with_carol])  # then locked
    assert lockable_while_checking == [True]
    assert [result.message_id for result in results] == [uuid.UUID(plain), uuid.UUID(photo)]
    assert results[0].outcome == "stored"


def test_one_batch_decides_each_send_on_its_own_in_a_few_statements(app, client, auth, people):
    alice, carol = people["alice"], people["carol"]
    with_bob = start(client, auth, alice, "bob")
    with_carol = start(client, auth, alice, "carol")
    db = app.extensions["switchboard.db"]

    to_bob = [queue_send(app, "alice", with_bob, f"hi bob {n}", f"b-{n}") for n in range(12)]
    bob_replies = [queue_send(app, "bob", with_bob, f"hi alice {n}", f"r-{n}") for n in range(3)]
    to_carol = queue_send(app, "alice", with_carol, "hi carol", "c-1")
    with db.transaction() as session:  # carol blocks alice after the API accepted it
        session.add(Block(blocker_id="carol", blocked_id="alice", tenant_id=carol.tenant_id))
    missing = str(uuid.uuid4())
    already = to_bob[0]
    with db.transaction() as session:
        assert (
            store_messages(session, app.extensions["switchboard.policy"], [already])[0].outcome
            == "stored"
        )

    batch = [*to_bob, *bob_replies, to_carol, missing, already]
    statements, stop = count_statements(app)
    try:
        with db.transaction() as session:
            results = store_messages(session, app.extensions["switchboard.policy"], batch)
    finally:
        stop()

    outcomes = {str(result.message_id): result.outcome for result in results}
    assert [str(result.message_id) for result in results] == list(dict.fromkeys(batch))
    assert Counter(outcomes.values()) == {"stored": 14, "rejected": 1, "duplicate": 1, "missing": 1}
    assert outcomes[to_carol] == "rejected" and outcomes[missing] == "missing"
    # The old store ran 13 statements per send. A batch without attachments runs four
    # for all of them (read and lock, claim, store, events), plus one per rejected send.
    assert len(statements) == 5, statements

    with db.sessions() as session:
        unread = dict(
            session.execute(
                select(Participant.user_id, Participant.unread_count).where(
                    Participant.conversation_id == uuid.UUID(with_bob)
                )
            ).all()
        )
        assert unread == {"bob": 12, "alice": 3}
        rows = {
            str(row.id): row
            for row in session.scalars(select(Message).where(Message.id.in_(map(uuid.UUID, batch))))
        }
        assert rows[to_carol].status == "rejected" and rows[to_carol].body is None
        assert rows[to_carol].rejection_reason == "blocked"
        newest = max((rows[i] for i in to_bob + bob_replies), key=lambda m: (m.created_at, m.id))
        conversation = session.get_one(Conversation, uuid.UUID(with_bob))
        assert conversation.last_message_id == newest.id
        assert all(rows[i].expires_at is not None for i in to_bob + bob_replies)

    # Each user's log is gap-free and in acceptance order within the batch.
    for user, expected in (("bob", 15), ("alice", 15)):
        log = events_of(app, user)
        assert [e.seq for e in log] == list(range(1, len(log) + 1))
        created = [e.payload["id"] for e in log if e.type == "message.created"]
        assert len(created) == expected
    assert [e.payload["id"] for e in events_of(app, "carol")] == []
    rejected = [e for e in events_of(app, "alice") if e.type == "message.rejected"]
    assert [e.payload["id"] for e in rejected] == [to_carol]
    bob_log = [e.payload["id"] for e in events_of(app, "bob") if e.type == "message.created"]
    assert bob_log == sorted(bob_log, key=lambda i: (rows[i].created_at, rows[i].id))


def test_running_a_batch_again_stores_nothing_twice(app, client, auth, people):
    conversation_id = start(client, auth, people["alice"], "bob")
    batch = [queue_send(app, "alice", conversation_id, f"m{n}", f"m-{n}") for n in range(5)]
    results = [tasks.store_sends.apply(args=[batch]).get() for _ in range(2)]
    assert results == [{"stored": 5}, {"duplicate": 5}]
    assert [e.seq for e in events_of(app, "bob")] == [1, 2, 3, 4, 5]


def test_a_batch_that_fails_as_a_whole_is_split_and_only_the_bad_send_is_rejected(
    app, client, auth, people, monkeypatch, celery_worker
):
    conversation_id = start(client, auth, people["alice"], "bob")
    batch = [queue_send(app, "alice", conversation_id, f"fine {n}", f"f-{n}") for n in range(3)]
    bad = queue_send(app, "alice", conversation_id, "breaks the worker", "bad")
    from app.services import messages

    decide = messages.decide_for_recipients

    def broken_on_one(policy, sender, recipients, blocked_by, body, attachment_count=0):
        if body == "breaks the worker":
            raise RuntimeError("a bug in the policy check")
        return decide(policy, sender, recipients, blocked_by, body, attachment_count)

    monkeypatch.setattr(messages, "decide_for_recipients", broken_on_one)
    tasks.store_sends.apply_async(args=[[*batch, bad]])

    db = app.extensions["switchboard.db"]

    def statuses() -> dict[str, str]:
        with db.sessions() as session:
            return {
                str(m.id): m.status
                for m in session.scalars(
                    select(Message).where(Message.id.in_(map(uuid.UUID, [*batch, bad])))
                )
            }

    wait_for(lambda: "queued" not in statuses().values())
    assert statuses() == {**{i: "stored" for i in batch}, bad: "rejected"}
    with db.sessions() as session:
        assert session.get_one(Message, uuid.UUID(bad)).rejection_reason == "internal_error"


def test_committed_sends_reach_the_workers_in_batches(app, client, auth, people, celery_worker):
    """Through the API and the real broker: a burst shares tasks, every send is stored."""
    conversation_id = start(client, auth, people["alice"], "bob")
    observed: list[int] = []
    original = tasks._publish_batch

    def recording(ids: list[str]) -> None:
        observed.append(len(ids))
        original(ids)

    # 1 s: busy from the second send on (holds_window), however the burst is spread.
    settings = app.extensions["switchboard.settings"]
    on_amqp = is_amqp(settings.celery_broker_url)
    batcher = tasks.configure_send_batches(window_ms=1000, max_batch=100, declare_queue=on_amqp)
    batcher._publish = recording  # the real publish, counted
    try:

        def send(n: int) -> None:
            response = client.post(
                f"/v1/conversations/{conversation_id}/messages",
                json={"body": f"burst {n}", "client_id": f"burst-{n}"},
                headers=auth(people["alice"]),
            )
            assert response.status_code == 202, response.json

        run_threads(*[lambda n=n: send(n) for n in range(20)])
        wait_for(
            lambda: len([e for e in events_of(app, "bob") if e.type == "message.created"]) == 20
        )
    finally:
        tasks.configure_send_batches(
            window_ms=settings.send_batch_window_ms,
            max_batch=settings.send_batch_max,
            declare_queue=on_amqp,
        )
    assert sum(observed) == 20 and len(observed) < 20 and max(observed) > 1, observed


def test_on_redis_a_batch_is_published_without_declaring_its_queue(
    app, client, auth, people, celery_worker, monkeypatch
):
    """Celery publishes a direct queue's task to the anonymous exchange, an LPUSH to the
    queue's list on Redis; declaring the queue on every publish only cost CPU. The send
    still reaches the worker. (RabbitMQ keeps the declaration: a message for a queue not
    declared yet would be dropped.)"""
    if is_amqp(app.extensions["switchboard.settings"].celery_broker_url):
        pytest.skip("on RabbitMQ every publish declares its queue")
    declared: list[object] = []
    declare = kombu.messaging.maybe_declare

    def recording(entity, *args, **kwargs):
        declared.append(entity)
        return declare(entity, *args, **kwargs)

    monkeypatch.setattr(kombu.messaging, "maybe_declare", recording)
    conversation_id = start(client, auth, people["alice"], "bob")
    response = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "no declare", "client_id": "no-declare-1"},
        headers=auth(people["alice"]),
    )
    assert response.status_code == 202, response.json
    wait_for(lambda: any(e.type == "message.created" for e in events_of(app, "bob")))
    assert declared == []


def test_the_batch_publish_declares_its_queue_only_on_rabbitmq(app):
    settings = app.extensions["switchboard.settings"]
    try:
        tasks.configure_send_batches(window_ms=30, max_batch=100, declare_queue=True)
        assert tasks._batch_publish_options == {}
        tasks.configure_send_batches(window_ms=30, max_batch=100, declare_queue=False)
        assert tasks._batch_publish_options == {"declare": []}
    finally:
        tasks.configure_send_batches(
            window_ms=settings.send_batch_window_ms,
            max_batch=settings.send_batch_max,
            declare_queue=is_amqp(settings.celery_broker_url),
        )
