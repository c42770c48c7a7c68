"""Random client frames against a live stream (the Procfile's web line, real sockets,
PostgreSQL and Redis): text, binary, junk and hostile JSON, wrong types, huge frames.

Properties: the connection handler never fails (every frame is answered with an error
frame or silently taken, the socket stays open and answers the next frame, and only a
frame past the size limit closes it, with 1009); and no frame ever carries another
user's events (a typing frame naming someone else's conversation relays nothing).

SWITCHBOARD_FUZZ_EXAMPLES (25 by default) sets the examples; this test runs twice that.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import websocket
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import JWT_SECRET, SERVICE_TOKEN
from tests.live import LiveSystem, Stream, http

EXAMPLES = 2 * int(os.environ.get("SWITCHBOARD_FUZZ_EXAMPLES", "25"))
MAX_FRAME_BYTES = 4096
# What a bad frame may be answered with (app/api/stream.py); anything else is a failure.
ERROR_CODES = {
    "invalid_frame",
    "json_too_deep",
    "invalid_text",
    "unknown_frame_type",
    "conversation_not_found",
    "rate_limited",
}


@pytest.fixture(scope="module")
def live(database_url: str, redis_url: str, tmp_path_factory) -> Iterator[LiveSystem]:
    """One web process and a worker. The test Redis database itself: no in-process
    worker runs here to take the live worker's tasks."""
    system = LiveSystem(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
            "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
            "SWITCHBOARD_POLICY": "bookstore",
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
            "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
            "SWITCHBOARD_STREAM_MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
        },
        tmp_path_factory.mktemp("live-frames"),
    ).start()
    yield system
    system.stop()


@pytest.fixture
def cast(live: LiveSystem, make_user, auth) -> dict[str, Any]:
    """mallory (who sends the frames) talks with bob; carol and dave talk on their own."""
    users = {
        "mallory": make_user("mallory", role="manager"),
        "bob": make_user("bob", role="member"),
        "carol": make_user("carol", role="manager"),
        "dave": make_user("dave", role="member"),
    }
    tokens = {name: auth(user)["Authorization"].split(" ", 1)[1] for name, user in users.items()}
    conversations = {}
    for starter, other in (("mallory", "bob"), ("carol", "dave")):
        status, body = http(
            "POST", live.url() + "/v1/conversations", tokens[starter], {"participant_id": other}
        )
        assert status == 201, body
        conversations[starter] = body["id"]
    return {"tokens": tokens, "own": conversations["mallory"], "theirs": conversations["carol"]}


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
        max_leaves=20,
    )


def _frames(own: str, theirs: str) -> st.SearchStrategy[str | bytes]:
    conversation_ids = (
        st.sampled_from([own, theirs, own.upper(), f" {own}"])
        | st.uuids().map(str)
        | _json_values()
    )
    typing_like = st.fixed_dictionaries(
        {
            "type": st.sampled_from(["typing", "Typing", "typing ", "", "message.created"])
            | _json_values(),
            "conversation_id": conversation_ids,
        },
        optional={"id": _json_values(), "data": _json_values(), "user_id": st.text(max_size=20)},
    ).map(json.dumps)
    valid_text = st.characters(exclude_categories=("Cs",))  # a client cannot send these
    documents = st.one_of(
        typing_like,
        _json_values().map(json.dumps),
        st.text(valid_text, max_size=200),  # junk
        st.integers(1, 200).map(lambda depth: "[" * depth + "]" * depth),
        st.integers(1, 200).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
        st.sampled_from(['{"type": "typing", "conversation_id": "\\u0000"}', '"\\ud800"', "{"]),
        # Around the size limit, on both sides of it.
        st.integers(MAX_FRAME_BYTES - 64, MAX_FRAME_BYTES + 64).map(
            lambda size: json.dumps({"type": "typing", "pad": "x" * size})
        ),
    )
    # Any of them as a text frame or as the bytes of a binary one; and raw bytes.
    return documents | documents.map(str.encode) | st.binary(max_size=300)


def _size(frame: str | bytes) -> int:
    return len(frame.encode() if isinstance(frame, str) else frame)


def _replies_until_probe(stream: Stream) -> list[dict[str, Any]]:
    """The frames answering what was sent before, up to the answer to a probe: a frame
    whose answer no generated frame can give, as it names a fresh key (`invalid_text`
    names the JSON path of the NUL)."""
    key = f"probe_{uuid.uuid4().hex}"
    stream.send({key: "\u0000"})
    replies = []
    while True:
        frame = stream.next(timeout=10)
        assert frame is not None, f"closed ({stream.close_code} {stream.close_reason})"
        data = frame.get("data")
        if frame.get("type") == "error" and isinstance(data, dict) and key in data["message"]:
            return replies
        replies.append(frame)


def test_random_frames_never_break_the_socket_nor_leak(live: LiveSystem, cast) -> None:
    tokens = cast["tokens"]
    carol = Stream(live.ws_url(), tokens["carol"])
    mallory = [Stream(live.ws_url(), tokens["mallory"])]
    try:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(frame=_frames(cast["own"], cast["theirs"]))
        def one_frame(frame: str | bytes) -> None:
            stream = mallory[0]
            if isinstance(frame, bytes):
                stream.ws.send_binary(frame)
            else:
                stream.ws.send(frame)
            if _size(frame) > MAX_FRAME_BYTES:
                assert stream.expect_close()[0] == 1009
                event("too big: closed with 1009")
                mallory[0] = Stream(live.ws_url(), tokens["mallory"])
                return
            for reply in _replies_until_probe(stream):
                # Only answers to her own frames: no event (they carry an `id`), and no
                # typing but her peer's (bob types nothing here).
                assert reply.get("type") == "error" and "id" not in reply, reply
                assert reply["data"]["code"] in ERROR_CODES, reply
                assert cast["theirs"] not in json.dumps(reply), reply
                event(f"answered {reply['data']['code']}")

        one_frame()

        # Carol's socket works, and heard nothing of mallory: dave's typing is the first
        # (and only) frame it gets.
        dave = Stream(live.ws_url(), tokens["dave"])
        try:
            dave.send({"type": "typing", "conversation_id": cast["theirs"]})
            frame = carol.next(timeout=10)
            assert frame == {
                "type": "typing",
                "data": {"conversation_id": cast["theirs"], "user_id": "dave"},
            }
            with pytest.raises(websocket.WebSocketTimeoutException):
                carol.next(timeout=0.5)
        finally:
            dave.close()
    finally:
        carol.close()
        mallory[0].close()


def test_typing_for_someone_elses_conversation_is_refused(live: LiveSystem, cast) -> None:
    """The leak property's regression case, stated on its own."""
    tokens = cast["tokens"]
    carol = Stream(live.ws_url(), tokens["carol"])
    mallory = Stream(live.ws_url(), tokens["mallory"])
    try:
        mallory.send({"type": "typing", "conversation_id": cast["theirs"]})
        [reply] = _replies_until_probe(mallory)
        assert reply["data"]["code"] == "conversation_not_found"
        mallory.send({"type": "typing", "conversation_id": str(uuid.uuid4())})
        [reply] = _replies_until_probe(mallory)
        assert reply["data"]["code"] == "conversation_not_found"
        with pytest.raises(websocket.WebSocketTimeoutException):
            carol.next(timeout=0.5)
    finally:
        carol.close()
        mallory.close()


@pytest.mark.parametrize(
    "handshake",
    [
        "",  # Upgrade without Sec-WebSocket-Key or -Version
        "Sec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Version: 99\r\nSec-WebSocket-Key: abc\r\n",
    ],
)
def test_a_malformed_handshake_is_a_400_not_a_500(live: LiveSystem, cast, handshake: str) -> None:
    """Found by probing the stream with broken handshakes: wsproto's RemoteProtocolError,
    raised in flask-sock before the view, reached the catch-all handler as a 500."""
    token = cast["tokens"]["mallory"]
    with socket.create_connection(("127.0.0.1", live.webs[0][0]), timeout=10) as raw:
        raw.sendall(
            "GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nAuthorization: Bearer {token}\r\n{handshake}\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = raw.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"application/json" in head
    assert json.loads(body)["error"]["code"] == "invalid_handshake"
