"""The hub against a real Redis: told only about the events its own sockets want.

Each test uses a shared channel of its own (Redis pub/sub is server-wide, whatever the
database number, so other test runs on the same Redis must not be heard), real
StreamConnections over a recording fake socket, and the real event log in PostgreSQL.
Every thread these tests start is the hub's or a writer's; their exceptions are logged
by the code under test, and each test asserts none was.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from app.events import PUBLISHER_KEY, RedisPublisher, append_event_batch, append_events
from app.stream.connection import StreamConnection
from app.stream.hub import Hub
from tests.helpers import wait_for


class Recorder:
    """A socket that records the frames written to it."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.sock = SimpleNamespace(shutdown=lambda how: None)

    def send(self, data: str) -> None:
        self.frames.append(data)

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        pass

    def ids(self) -> list[int]:
        import json

        return [json.loads(frame)["id"] for frame in self.frames]


@pytest.fixture
def thread_errors(caplog: pytest.LogCaptureFixture) -> Iterator[list[Any]]:
    """Uncaught exceptions of any thread, and errors the hub or a writer logged."""
    errors: list[Any] = []
    previous = threading.excepthook
    threading.excepthook = errors.append
    caplog.set_level(logging.WARNING, logger="app.stream")
    try:
        yield errors
    finally:
        threading.excepthook = previous
    errors.extend(r for r in caplog.records if r.levelno >= logging.ERROR)
    assert errors == []


@pytest.fixture
def channel() -> str:
    return f"switchboard:test-events:{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hub(redis_url: str, channel: str, thread_errors: list[Any]) -> Iterator[Hub]:
    hub = Hub(redis_url, channel=channel)
    hub.ensure_started()
    assert hub.subscribed.wait(10)
    yield hub
    hub.stop()


@pytest.fixture
def publisher(redis_url: str, channel: str) -> Iterator[RedisPublisher]:
    client = redis.Redis.from_url(redis_url)
    yield RedisPublisher(client, channel=channel)
    client.close()


def subscribers(redis_url: str, channel: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


def connect(app: Any, hub: Hub, user_id: str) -> tuple[StreamConnection, Recorder]:
    """What the route does: register, then start the writer."""
    ws = Recorder()
    connection = StreamConnection(
        ws,
        user_id,
        app.extensions["switchboard.event_log"],
        last_event_id=0,
        seq_at_connect=0,
        queue_size=64,
    )
    connection.replay_at_start = hub.register(connection)
    connection.start()
    return connection, ws


def disconnect(hub: Hub, connection: StreamConnection) -> None:
    hub.unregister(connection)
    connection.request_close(1000, "")
    connection.join(5)


def commit_event(app: Any, user_ids: list[str], publisher: RedisPublisher, body: str) -> None:
    """One event for each user, committed, then announced on the test's channels."""
    with app.extensions["switchboard.db"].transaction() as session:
        session.info.pop(PUBLISHER_KEY, None)  # announced below, on this test's channels
        events = append_events(session, user_ids, "message.created", {"body": body})
    publisher.publish(events)


def test_a_process_hears_only_the_direct_events_of_its_own_users(
    app, make_user, hub, publisher, redis_url, channel
):
    alice, bob = make_user("alice", role="manager"), make_user("bob", role="member")
    connection, ws = connect(app, hub, alice.id)
    wait_for(lambda: hub.subscribed_users() == 1)
    for n in range(5):
        commit_event(app, [bob.id], publisher, f"for bob {n}")
    commit_event(app, [alice.id], publisher, "for alice")
    wait_for(lambda: ws.ids() == [1])

    # Redis sent bob's five announcements to nobody: this process never parsed them.
    assert subscribers(redis_url, f"{channel}:u:{bob.id}") == 0
    assert subscribers(redis_url, f"{channel}:u:{alice.id}") == 1
    assert (hub.direct_announcements, hub.unwanted_announcements) == (1, 0)
    disconnect(hub, connection)


def test_subscribe_on_the_first_socket_of_a_user_and_unsubscribe_after_the_last(
    app, make_user, hub, redis_url, channel
):
    alice = make_user("alice", role="manager")
    alice_channel = f"{channel}:u:{alice.id}"
    phone, _ = connect(app, hub, alice.id)
    wait_for(lambda: hub.subscribed_users() == 1)
    laptop, _ = connect(app, hub, alice.id)
    assert hub.local_connections() == 2 and hub.local_users() == 1
    assert subscribers(redis_url, alice_channel) == 1  # one subscription, two sockets

    disconnect(hub, phone)
    assert hub.subscribed_users() == 1  # the laptop is still there
    disconnect(hub, laptop)
    wait_for(lambda: subscribers(redis_url, alice_channel) == 0)
    assert (hub.subscribed_users(), hub.local_connections()) == (0, 0)

    # And back: a new socket subscribes again.
    again, _ = connect(app, hub, alice.id)
    wait_for(lambda: subscribers(redis_url, alice_channel) == 1)
    disconnect(hub, again)


def test_an_event_committed_before_the_subscription_is_confirmed_arrives_once(
    app, make_user, hub, publisher
):
    alice = make_user("alice", role="manager")
    # Hold the hub thread before it sends this user's SUBSCRIBE: the window between a
    # socket's registration and its subscription taking effect, made as wide as we like.
    gate, held = threading.Event(), threading.Event()
    settle = hub._settle

    def held_settle(*args: Any) -> None:
        held.set()
        assert gate.wait(10)
        settle(*args)

    hub._settle = held_settle  # type: ignore[method-assign]
    connection, ws = connect(app, hub, alice.id)
    assert connection.replay_at_start is False  # the confirmation's CATCH_UP will read
    held.wait(10)
    # Announced while nobody listens on alice's channel: lost to pub/sub, not to her.
    commit_event(app, [alice.id], publisher, "in the window")
    assert ws.frames == []
    hub._settle = settle  # type: ignore[method-assign]
    gate.set()

    wait_for(lambda: ws.ids() == [1])
    commit_event(app, [alice.id], publisher, "live")
    wait_for(lambda: len(ws.frames) >= 2)
    disconnect(hub, connection)
    assert ws.ids() == [1, 2]


def test_a_socket_of_a_subscribed_user_replays_at_once_and_sees_each_event_once(
    app, make_user, hub, publisher
):
    alice = make_user("alice", role="manager")
    first, first_ws = connect(app, hub, alice.id)
    wait_for(lambda: hub.subscribed_users() == 1)
    commit_event(app, [alice.id], publisher, "one")
    wait_for(lambda: first_ws.ids() == [1])

    second, second_ws = connect(app, hub, alice.id)
    assert second.replay_at_start is True
    commit_event(app, [alice.id], publisher, "two")
    wait_for(lambda: second_ws.ids() == [1, 2] and first_ws.ids() == [1, 2])
    disconnect(hub, first)
    disconnect(hub, second)
    assert first_ws.ids() == [1, 2] and second_ws.ids() == [1, 2]


def test_a_broadcast_batch_still_reaches_every_local_recipient_in_one_announcement(
    app, make_user, hub, publisher
):
    users = [make_user(f"member{i}", role="member") for i in range(3)]
    sockets = [connect(app, hub, user.id) for user in users[:2]]  # the third is elsewhere
    wait_for(lambda: hub.subscribed_users() == 2)
    with app.extensions["switchboard.db"].transaction() as session:
        session.info.pop(PUBLISHER_KEY, None)
        batch = append_event_batch(
            session, [user.id for user in users], "broadcast.created", {"body": "to all"}
        )
    publisher.publish_batch(batch)
    for _, ws in sockets:
        wait_for(lambda ws=ws: ws.ids() == [1])
    assert hub.batch_announcements == 1
    for connection, _ in sockets:
        disconnect(hub, connection)


def test_an_idle_socket_keeps_no_writer_and_no_queue(app, make_user, hub, publisher):
    """Thousands of sockets sit idle: once its frames are out, a connection holds neither
    its finished writer (a dead greenlet is ~3 KiB) nor an empty queue."""
    alice = make_user("alice", role="manager")
    connection, ws = connect(app, hub, alice.id)
    wait_for(lambda: hub.subscribed_users() == 1)
    commit_event(app, [alice.id], publisher, "hello")
    wait_for(lambda: ws.ids() == [1])
    wait_for(lambda: connection._writer is None and connection._items is None)
    commit_event(app, [alice.id], publisher, "again")  # an idle socket still gets its events
    wait_for(lambda: ws.ids() == [1, 2])
    disconnect(hub, connection)


class _Offered:
    """A socket as the hub sees it: a user id and the events offered to it."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.items: list[Any] = []

    def offer(self, item: Any) -> None:
        self.items.append(item)


def test_the_hub_yields_after_every_slice_of_sockets_offered(redis_url, monkeypatch):
    """Under gevent the writers the hub wakes run only once it yields; without the yield
    a 1,000-recipient chunk put every request of the process behind all 1,000 writes."""
    from app.stream import hub as hub_module

    hub = Hub(redis_url, channel=f"test-fairness-{uuid.uuid4().hex}")
    sockets = [_Offered(f"user-{n:04d}") for n in range(250)]
    for socket_ in sockets:
        hub.register(socket_)  # type: ignore[arg-type]
    yields: list[tuple[float, int]] = []

    def recording_sleep(seconds: float) -> None:
        yields.append((seconds, sum(len(s.items) for s in sockets)))

    monkeypatch.setattr(hub_module.time, "sleep", recording_sleep)
    recipients = [[socket_.user_id, 7] for socket_ in sockets]
    offered = hub.dispatch_batch(
        {"type": "broadcast.created", "data": {}, "recipients": recipients}
    )
    assert offered == 250
    assert all(len(socket_.items) == 1 for socket_ in sockets)
    # A zero-second sleep after the 100th and the 200th socket, none before.
    assert yields == [(0, 100), (0, 200)]
    # Direct announcements count towards the same slices.
    for socket_ in sockets[:50]:
        hub.dispatch({"user_id": socket_.user_id, "id": 8, "type": "message.created"})
    assert yields[-1] == (0, 300)
    for socket_ in sockets:
        hub.unregister(socket_)  # type: ignore[arg-type]


def test_a_broadcast_chunk_with_local_recipients_marks_a_fan_out(redis_url):
    """The hub tells the collector's hold (app/gc_pauses.py) when it hands a broadcast
    chunk to local sockets, and only then: not for a chunk with none of its recipients
    here, nor for a direct event."""
    fan_outs: list[int] = []
    hub = Hub(
        redis_url,
        channel=f"test-fan-out-{uuid.uuid4().hex}",
        on_fan_out=lambda: fan_outs.append(1),
    )
    here = _Offered("user-here")
    hub.register(here)  # type: ignore[arg-type]
    try:
        elsewhere = {"type": "broadcast.created", "data": {}, "recipients": [["user-away", 3]]}
        assert hub.dispatch_batch(elsewhere) == 0
        hub.dispatch({"user_id": "user-here", "id": 4, "type": "message.created"})
        assert fan_outs == []
        chunk = {
            "type": "broadcast.created",
            "data": {},
            "recipients": [["user-away", 5], ["user-here", 5]],
        }
        assert hub.dispatch_batch(chunk) == 1
        assert fan_outs == [1]
        assert len(here.items) == 2
    finally:
        hub.unregister(here)  # type: ignore[arg-type]


def test_the_web_process_hub_holds_full_collections_while_it_fans_out(redis_url):
    """By default the hub's fan-outs go to the process's `FULL_COLLECTION_HOLD`, which
    gunicorn's post_worker_init installs."""
    import gc

    from app.gc_pauses import FULL_COLLECTION_HOLD

    saved = gc.get_threshold()
    hub = Hub(redis_url, channel=f"test-fan-out-{uuid.uuid4().hex}")
    here = _Offered("user-here")
    hub.register(here)  # type: ignore[arg-type]
    FULL_COLLECTION_HOLD.install()
    try:
        chunk = {"type": "broadcast.created", "data": {}, "recipients": [["user-here", 1]]}
        assert hub.dispatch_batch(chunk) == 1
        assert FULL_COLLECTION_HOLD.holding
    finally:
        FULL_COLLECTION_HOLD.uninstall()
        hub.unregister(here)  # type: ignore[arg-type]
    assert not FULL_COLLECTION_HOLD.holding
    assert gc.get_threshold() == saved
