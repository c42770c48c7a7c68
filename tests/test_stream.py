"""The stream against a live system: the Procfile's gunicorn web line (twice, for two web
processes) and its Celery worker line, real sockets, real PostgreSQL and Redis."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import websocket
from sqlalchemy import delete
from sqlalchemy.engine import make_url

from app.auth import mint_token
from app.embedded import RedisServer
from app.models import UserEvent
from tests.conftest import JWT_SECRET, SERVICE_TOKEN
from tests.helpers import wait_for
from tests.live import LiveSystem, RawStream, Stream, http

STREAM_SETTINGS = {
    # Small buffers so that a client that stops reading is found out quickly. The queue
    # leaves a reader that does read room for a stall of the test machine (at 16 a fast
    # reader was once cut off as slow on CI's embedded pass); 120 events still overflow
    # it and the 4 KiB buffers of one that does not.
    "SWITCHBOARD_STREAM_QUEUE_SIZE": "48",
    "SWITCHBOARD_STREAM_SEND_BUFFER_BYTES": "4096",
    "SWITCHBOARD_STREAM_SLOW_CONSUMER_GRACE_SECONDS": "2",
    "SWITCHBOARD_STREAM_MAX_FRAME_BYTES": "1024",
}


def live_env(database_url: str, redis_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
        "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
        "SWITCHBOARD_POLICY": "bookstore",
        "SWITCHBOARD_LOG_LEVEL": os.environ.get("TEST_LIVE_LOG_LEVEL", "WARNING"),
        "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
        **STREAM_SETTINGS,
    }


def separate_redis_db(redis_url: str, offset: int) -> str:
    """Another database of the test Redis (never 0, which others may use)."""
    test_index = int(make_url(redis_url.replace("redis://", "postgresql://")).database or 0)
    index = test_index - offset if test_index - offset >= 1 else test_index + offset
    return redis_url.rsplit("/", 1)[0] + f"/{index}"


@pytest.fixture(scope="session")
def live(database_url, redis_url, tmp_path_factory):
    # Its own Redis database: the in-process test workers must not see its queue.
    live_redis = separate_redis_db(redis_url, 2)
    redis.Redis.from_url(live_redis).flushdb()
    system = LiveSystem(
        live_env(database_url, live_redis), tmp_path_factory.mktemp("live"), web_count=2
    ).start()
    yield system
    system.stop()


@pytest.fixture
def token_for(app):
    settings = app.extensions["switchboard.settings"]

    def mint(user, ttl=timedelta(minutes=10)):
        return mint_token(settings, user.id, user.tenant_id, ttl=ttl)

    return mint


@pytest.fixture
def chat(live, make_user, token_for):
    """alice (may start) and bob (free member) in one conversation."""
    alice = make_user("alice", role="manager")
    bob = make_user("bob", role="member")
    tokens = {"alice": token_for(alice), "bob": token_for(bob)}
    status, body = http(
        "POST", live.url() + "/v1/conversations", tokens["alice"], {"participant_id": "bob"}
    )
    assert status == 201, body
    return tokens, body["id"]


def send(live, token, conversation_id, text, index=0):
    status, body = http(
        "POST",
        f"{live.url(index)}/v1/conversations/{conversation_id}/messages",
        token,
        {"body": text, "client_id": uuid.uuid4().hex},
    )
    assert status == 202, body
    return body["id"]


def test_a_message_reaches_every_device_of_the_recipient_and_the_sender(live, chat):
    tokens, conversation_id = chat
    # From event 0: a fresh user has seen nothing yet. (A client without last_event_id
    # starts from "now", as the server sees it once the socket is set up.)
    phone = Stream(live.ws_url(0), tokens["bob"], last_event_id=0)
    laptop = Stream(live.ws_url(0), tokens["bob"], last_event_id=0)
    sender = Stream(live.ws_url(0), tokens["alice"], query_token=True, last_event_id=0)
    try:
        message_id = send(live, tokens["alice"], conversation_id, "hello")
        for stream in (phone, laptop, sender):
            [frame] = stream.events(1)
            assert frame["type"] == "message.created"
            assert (frame["id"], frame["data"]["id"], frame["data"]["body"]) == (
                1,
                message_id,
                "hello",
            )
    finally:
        for stream in (phone, laptop, sender):
            stream.close()


def test_worker_and_web_metrics(live, chat):
    tokens, conversation_id = chat
    stream = Stream(live.ws_url(), tokens["bob"], last_event_id=0)
    try:
        send(live, tokens["alice"], conversation_id, "count me")
        stream.events(1)
    finally:
        stream.close()
    worker = urllib_get(f"http://127.0.0.1:{live.worker_metrics_port}/metrics")
    assert 'task="switchboard.direct.store_sends"' in worker
    assert 'switchboard_messages_total{outcome="stored"}' in worker
    web = urllib_get(live.url() + "/metrics")
    assert "switchboard_delivery_latency_seconds_count" in web
    assert "switchboard_sockets_open" in web


def test_the_worker_logs_no_line_per_task_by_default(live, chat):
    """SWITCHBOARD_TASK_LOG_LINES is off: no "received" / "succeeded in" pair per send."""
    tokens, conversation_id = chat
    stream = Stream(live.ws_url(), tokens["bob"], last_event_id=0)
    try:
        send(live, tokens["alice"], conversation_id, "quietly")
        stream.events(1)
    finally:
        stream.close()
    log = live.worker.log_path.read_text()
    # (The start-up banner lists the task names; the per-task lines say "[<task id>]".)
    assert "succeeded in" not in log and "] received" not in log, log[-2000:]


def test_task_lines_come_back_when_asked_for():
    import logging

    from workers.celery_app import TASK_LINE_LOGGERS, quiet_task_lines

    try:
        quiet_task_lines(False)
        assert all(logging.getLogger(n).level == logging.NOTSET for n in TASK_LINE_LOGGERS)
        quiet_task_lines(True)
        assert all(logging.getLogger(n).level == logging.WARNING for n in TASK_LINE_LOGGERS)
    finally:
        quiet_task_lines(True)


def test_two_web_processes_both_deliver(live, chat):
    tokens, conversation_id = chat
    on_first = Stream(live.ws_url(0), tokens["bob"], last_event_id=0)
    on_second = Stream(live.ws_url(1), tokens["bob"], last_event_id=0)
    try:
        send(live, tokens["alice"], conversation_id, "via the first", index=0)
        send(live, tokens["alice"], conversation_id, "via the second", index=1)
        for stream in (on_first, on_second):
            bodies = sorted(f["data"]["body"] for f in stream.events(2))
            assert bodies == ["via the first", "via the second"]
    finally:
        on_first.close()
        on_second.close()


def test_resume_gets_exactly_what_was_missed_then_goes_live(live, chat):
    tokens, conversation_id = chat
    stream = Stream(live.ws_url(), tokens["bob"], last_event_id=0)
    send(live, tokens["alice"], conversation_id, "before the drop")
    [seen] = stream.events(1)
    stream.close()

    missed = []
    for i in range(3):
        # One after another: sends racing each other are logged in the order stored.
        missed.append(send(live, tokens["alice"], conversation_id, f"missed {i}"))
        wait_for(
            lambda: (
                http("GET", f"{live.url()}/v1/messages/{missed[-1]}", tokens["alice"])[1]["status"]
                == "stored"
            )
        )

    resumed = Stream(live.ws_url(1), tokens["bob"], last_event_id=seen["id"])
    try:
        frames = resumed.events(3)
        assert [f["data"]["id"] for f in frames] == missed
        assert [f["id"] for f in frames] == [seen["id"] + 1, seen["id"] + 2, seen["id"] + 3]
        live_id = send(live, tokens["alice"], conversation_id, "live again")
        [frame] = resumed.events(1)
        assert (frame["id"], frame["data"]["id"]) == (seen["id"] + 4, live_id)
    finally:
        resumed.close()


def test_an_id_past_the_window_gets_resync_required(live, chat, app):
    tokens, conversation_id = chat
    for i in range(3):
        send(live, tokens["alice"], conversation_id, f"m{i}")
    stream = Stream(live.ws_url(), tokens["bob"], last_event_id=0)
    stream.events(3)
    stream.close()
    # Prune the oldest events, as the log's retention job does.
    with app.extensions["switchboard.db"].transaction() as session:
        session.execute(delete(UserEvent).where(UserEvent.user_id == "bob", UserEvent.seq <= 2))

    for last_event_id in (0, 99):  # too old, and from the future
        stream = Stream(live.ws_url(), tokens["bob"], last_event_id=last_event_id)
        try:
            frame = stream.next()
            assert frame["type"] == "resync.required" and frame["id"] == 3
        finally:
            stream.close()
    # Within the window, replay still works.
    stream = Stream(live.ws_url(), tokens["bob"], last_event_id=2)
    try:
        assert [f["id"] for f in stream.events(1)] == [3]
    finally:
        stream.close()


def test_a_slow_reader_is_disconnected_while_a_fast_one_keeps_receiving(live, chat):
    tokens, conversation_id = chat
    slow = RawStream(live.webs[0][0], tokens["bob"])
    fast = Stream(live.ws_url(), tokens["bob"], last_event_id=0)
    body = "x" * 900
    # The fast client reads while the sends go out, as a live client does: a client that
    # reads nothing until the end is a slow one too, once its 120 frames outgrow the
    # kernel's buffers and the queue of 48 (how far they grow depends on the machine).
    received: list[list[dict]] = []
    failures: list[BaseException] = []

    def read_fast() -> None:
        try:
            received.append(fast.events(120, timeout=30))
        except BaseException as exc:  # handed to the test's thread below
            failures.append(exc)

    reader = threading.Thread(target=read_fast, name="fast-reader")
    reader.start()
    try:
        for _ in range(120):
            send(live, tokens["alice"], conversation_id, body)
        reader.join(60)
        assert not reader.is_alive() and not failures, failures
        assert [f["id"] for f in received[0]] == list(range(1, 121))
        closed, code, delivered = slow.drain(timeout=20)
        # The server gave up on it: with a close frame (4008) if the client's buffer had
        # room for one, else by cutting the connection.
        assert closed and code in (None, 4008) and delivered < 120, urllib_get(
            live.url() + "/metrics"
        )
    finally:
        slow.close()
        fast.close()
    metrics = urllib_get(live.url() + "/metrics")
    slow_count = [
        line
        for line in metrics.splitlines()
        if line.startswith("switchboard_slow_consumer_disconnects_total ")
    ]
    assert slow_count and float(slow_count[0].split()[1]) >= 1


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "missing_token"),
        ("garbage", "invalid_token"),
    ],
)
def test_bad_tokens_are_closed_with_a_reason(live, token, expected):
    stream = Stream(live.ws_url(), token)
    assert stream.next() is None
    assert stream.close_code == 4001 and stream.close_reason.startswith(expected)


def test_expired_and_unknown_user_tokens(live, make_user, token_for, app):
    alice = make_user("alice", role="manager")
    expired = mint_token(
        app.extensions["switchboard.settings"], alice.id, alice.tenant_id, ttl=timedelta(minutes=-5)
    )
    stream = Stream(live.ws_url(), expired)
    assert stream.expect_close() == (4001, stream.close_reason)
    assert stream.close_reason.startswith("token_expired")
    ghost = mint_token(app.extensions["switchboard.settings"], "ghost", "t1")
    stream = Stream(live.ws_url(), ghost)
    stream.expect_close()
    assert (stream.close_code, stream.close_reason.split(":")[0]) == (4001, "unknown_user")


def test_the_socket_closes_when_its_token_expires(live, make_user, token_for):
    alice = make_user("alice", role="manager")
    stream = Stream(live.ws_url(), token_for(alice, ttl=timedelta(seconds=2)))
    code, reason = stream.expect_close(timeout=15)
    assert code == 4002 and reason.startswith("token_expired")


def test_bad_last_event_id(live, make_user, token_for):
    alice = make_user("alice", role="manager")
    stream = Stream(live.ws_url(), token_for(alice), last_event_id=None)
    stream.close()
    bad = Stream(live.ws_url() + "?last_event_id=-3", token_for(alice))
    assert bad.expect_close()[0] == 4400


def test_client_frames(live, chat):
    tokens, conversation_id = chat
    alice = Stream(live.ws_url(), tokens["alice"], last_event_id=0)
    bob = Stream(live.ws_url(1), tokens["bob"], last_event_id=0)
    try:
        # Typing is ephemeral: make sure bob's socket is live before alice types.
        send(live, tokens["alice"], conversation_id, "are you there?")
        bob.events(1)
        alice.events(1)
        alice.send({"type": "typing", "conversation_id": conversation_id})
        frame = bob.next()
        assert frame["type"] == "typing" and "id" not in frame  # not logged: no id
        assert frame["data"] == {"conversation_id": conversation_id, "user_id": "alice"}

        alice.send("not json")
        assert alice.next()["data"]["code"] == "invalid_frame"
        alice.send({"type": "shout"})
        assert alice.next()["data"]["code"] == "unknown_frame_type"
        alice.send({"type": "typing", "conversation_id": str(uuid.uuid4())})
        assert alice.next()["data"]["code"] == "conversation_not_found"
        alice.send({"type": "typing"})
        assert alice.next()["data"]["code"] == "invalid_frame"

        # Larger than the limit, but read by the server in one go: then its close frame
        # is not overtaken by a reset for unread bytes.
        alice.send("x" * 1500)
        assert alice.expect_close()[0] == 1009
    finally:
        alice.close()
        bob.close()


def test_a_non_member_cannot_send_typing(live, chat, make_user, token_for):
    _, conversation_id = chat
    carol = make_user("carol", role="manager")
    stream = Stream(live.ws_url(), token_for(carol))
    try:
        stream.send({"type": "typing", "conversation_id": conversation_id})
        assert stream.next()["data"]["code"] == "conversation_not_found"
    finally:
        stream.close()


def test_a_redis_restart_loses_nothing(database_url, make_user, token_for, tmp_path: Path):
    # A Redis of this test's own, with an append-only file as production should run it.
    redis_server = RedisServer(tmp_path / "redis", persistent=True).start()
    system = LiveSystem(live_env(database_url, redis_server.url), tmp_path / "logs").start()
    try:
        alice, bob = make_user("alice", role="manager"), make_user("bob", role="member")
        tokens = {"alice": token_for(alice), "bob": token_for(bob)}
        _, conversation = http(
            "POST", system.url() + "/v1/conversations", tokens["alice"], {"participant_id": "bob"}
        )
        stream = Stream(system.ws_url(), tokens["bob"], last_event_id=0)
        send(system, tokens["alice"], conversation["id"], "before the restart")
        assert [f["data"]["body"] for f in stream.events(1)] == ["before the restart"]

        redis_server.stop()
        redis_server.start()

        def send_when_back():
            status, body = http(
                "POST",
                f"{system.url()}/v1/conversations/{conversation['id']}/messages",
                tokens["alice"],
                {"body": "after the restart", "client_id": "after"},
            )
            return body["id"] if status == 202 else None

        after_id = wait_for(send_when_back, timeout=30, interval=0.2)
        [frame] = stream.events(1, timeout=30)
        assert (frame["id"], frame["data"]["id"]) == (2, after_id)
        stream.close()

        resumed = Stream(system.ws_url(), tokens["bob"], last_event_id=0)
        assert [f["data"]["body"] for f in resumed.events(2)] == [
            "before the restart",
            "after the restart",
        ]
        resumed.close()
    except Exception:
        print(system.logs())
        raise
    finally:
        system.stop()
        redis_server.stop()
        time.sleep(0.1)


def test_a_peer_that_stops_answering_pings_is_dropped(
    database_url, redis_url, make_user, token_for, tmp_path: Path
):
    env = live_env(database_url, separate_redis_db(redis_url, 3)) | {
        "SWITCHBOARD_STREAM_PING_INTERVAL": "1"
    }
    system = LiveSystem(env, tmp_path / "logs").start()
    try:
        alice = make_user("alice", role="manager")
        silent = RawStream(system.webs[0][0], token_for(alice))
        answering = Stream(system.ws_url(), token_for(alice), last_event_id=0)
        outcome: list[object] = []

        def keep_reading() -> None:
            # websocket-client answers pings while it reads.
            try:
                answering.next(timeout=6)
            except websocket.WebSocketTimeoutException:
                outcome.append("still open")
            else:
                outcome.append(answering.close_code)

        reader = threading.Thread(target=keep_reading)
        reader.start()
        closed, code, _ = silent.drain(timeout=15)
        reader.join()
        assert closed and code in (None, 1008)
        assert outcome == ["still open"]
        answering.close()
    finally:
        system.stop()


def test_a_stopping_web_process_closes_its_streams_with_1001(
    database_url, redis_url, make_user, token_for, tmp_path: Path
):
    """Open streams are not gunicorn's connections once set up, so the web process closes
    them itself when it stops: the client hears 1001 and reconnects elsewhere."""
    env = live_env(database_url, separate_redis_db(redis_url, 4))
    system = LiveSystem(env, tmp_path / "logs").start()
    try:
        alice = make_user("alice", role="manager")
        streams = [Stream(system.ws_url(), token_for(alice), last_event_id=0) for _ in range(3)]
        web = system.webs[0][1]
        assert web.process is not None
        os.killpg(web.process.pid, signal.SIGTERM)
        for stream in streams:
            assert stream.next(timeout=15) is None
            assert stream.close_code == 1001, (stream.close_code, stream.close_reason)
            assert stream.close_reason.startswith("going_away")
        assert web.process.wait(timeout=20) == 0
    finally:
        system.stop()


def test_past_its_most_sockets_a_web_process_closes_new_streams_with_1013(
    database_url, redis_url, make_user, token_for, tmp_path: Path
):
    """Open streams are not gunicorn's connections once set up, so worker_connections does
    not bound them: SWITCHBOARD_STREAM_MAX_SOCKETS does, and a place freed is taken again."""
    env = live_env(database_url, separate_redis_db(redis_url, 5)) | {
        "SWITCHBOARD_STREAM_MAX_SOCKETS": "2"
    }
    system = LiveSystem(env, tmp_path / "logs").start()
    try:
        alice = make_user("alice", role="manager")
        held = [Stream(system.ws_url(), token_for(alice), last_event_id=0) for _ in range(2)]
        for stream in held:  # an answered frame: the socket is set up and counted
            stream.send({"type": "nope"})
            answer = stream.next()
            assert answer is not None and answer["data"]["code"] == "unknown_frame_type"
        refused = Stream(system.ws_url(), token_for(alice), last_event_id=0)
        code, reason = refused.expect_close()
        assert code == 1013 and reason.startswith("overloaded"), (code, reason)
        held.pop().close()

        # Once the server has let the closed one go, a new stream is served again.
        def serves() -> bool:
            stream = Stream(system.ws_url(), token_for(alice), last_event_id=0)
            try:
                stream.next(timeout=0.5)
            except websocket.WebSocketTimeoutException:
                return True  # open and quiet: served
            finally:
                stream.close()
            return False

        wait_for(serves, timeout=10)
        refusals = [
            float(line.split()[1])
            for line in urllib_get(system.url() + "/metrics").splitlines()
            if line.startswith("switchboard_streams_refused_full_total ")
        ]
        assert refusals and refusals[0] >= 1
        for stream in held:
            stream.close()
    finally:
        system.stop()


def test_per_message_compression_is_not_negotiated(live, make_user, token_for):
    alice = make_user("alice", role="manager")
    stream = websocket.create_connection(
        live.ws_url(),
        header=[
            f"Authorization: Bearer {token_for(alice)}",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ],
        timeout=10,
    )
    try:
        headers = {k.lower(): v for k, v in (stream.getheaders() or {}).items()}
        assert "sec-websocket-extensions" not in headers
    finally:
        stream.close()


def _handshake_server() -> object:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection

    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(
        b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    request = next(server.events())
    assert request.__class__.__name__ == "Request"
    server.send(AcceptConnection())
    return server


def test_an_open_socket_keeps_only_wsprotos_established_connection() -> None:
    """The handshake's state (h11 and the upgrade request's headers) is let go; what stays
    still frames, parses and closes."""
    from types import SimpleNamespace

    from wsproto.connection import Connection, ConnectionState
    from wsproto.events import CloseConnection, TextMessage

    from app.api.stream import drop_handshake_state

    ws = SimpleNamespace(ws=_handshake_server())
    drop_handshake_state(ws)

    assert isinstance(ws.ws, Connection) and ws.ws.state is ConnectionState.OPEN
    assert ws.ws.send(TextMessage(data="hi")) == b"\x81\x02hi"
    # A masked client frame "ok", as a browser sends it.
    mask = b"\x01\x02\x03\x04"
    ws.ws.receive_data(b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"ok")))
    assert [event.data for event in ws.ws.events()] == ["ok"]
    assert ws.ws.send(CloseConnection(code=1000)).startswith(b"\x88")


def test_a_socket_whose_handshake_did_not_finish_is_left_as_it_is() -> None:
    from types import SimpleNamespace

    from wsproto import ConnectionType, WSConnection

    from app.api.stream import drop_handshake_state

    pending = WSConnection(ConnectionType.SERVER)
    ws = SimpleNamespace(ws=pending)
    drop_handshake_state(ws)
    assert ws.ws is pending
