"""Hostile input (issue 7): every case is a 4xx with the contract's error body and writes
nothing; never a 500, and on the stream never a crash or a silent close."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest
import redis
import websocket
from sqlalchemy import func, select

from app.auth import mint_token
from app.input_checks import check_json_depth, check_text
from app.models import AuditLog, Block, Conversation, Message, User
from app.problems import BadRequest
from app.services.messages import message_id_for
from app.services.pagination import decode_cursor, encode_cursor
from tests.conftest import JWT_SECRET, SERVICE_TOKEN
from tests.helpers import error_code, wait_for
from tests.live import LiveSystem, Stream
from tests.test_stream import live_env, separate_redis_db

DEEP = "[" * 1500  # about the size of the report's: 1.5 KB of nothing but nesting
ADMIN = {"Authorization": f"Bearer {SERVICE_TOKEN}"}


def assert_error(response, status: int, code: str) -> dict:
    assert (response.status_code, response.mimetype) == (status, "application/json")
    assert set(response.json) == {"error"}
    assert response.json["error"]["code"] == code
    assert response.json["error"]["message"]
    return response.json["error"]


def count(app, model) -> int:
    with app.extensions["switchboard.db"].sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def raw_json(client, method: str, path: str, text: str | bytes, headers: dict):
    return client.open(
        path, method=method, data=text, content_type="application/json", headers=headers
    )


@pytest.fixture
def pair(client, make_user, auth):
    alice = make_user("alice", role="manager")
    bob = make_user("bob", role="member")
    response = client.post("/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice))
    assert response.status_code == 201, response.json
    return alice, bob, response.json["id"]


# --- 1. Nesting depth ------------------------------------------------------------------


def test_depth_limit_counts_only_real_nesting():
    check_json_depth("[" * 32 + "]" * 32)
    with pytest.raises(BadRequest) as refused:
        check_json_depth("[" * 33 + "]" * 33)
    assert refused.value.code == "json_too_deep"
    with pytest.raises(BadRequest):
        check_json_depth('{"a": ' * 33)
    # Brackets in strings, escaped quotes included, are text, not nesting.
    check_json_depth(json.dumps({"body": "[" * 100 + '\\"' + "{" * 100}))
    check_json_depth(json.dumps(['"[' * 50]))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/conversations"),
        ("PATCH", "/v1/conversations/{id}"),
        ("POST", "/v1/conversations/{id}/read"),
        ("POST", "/v1/conversations/{id}/messages"),
    ],
)
def test_deep_json_is_a_400_on_every_json_route(app, client, auth, pair, method, path):
    alice, _, conversation_id = pair
    url = path.format(id=conversation_id)
    for body in (DEEP, '{"body": ' + "[" * 40 + "]" * 40 + ', "client_id": "c1"}'):
        response = raw_json(client, method, url, body, auth(alice))
        assert "32" in assert_error(response, 400, "json_too_deep")["message"]
    assert count(app, Conversation) == 1
    assert count(app, Message) == 0


def test_deep_json_is_a_400_on_the_admin_api(app, client):
    response = raw_json(client, "PUT", "/v1/admin/users/carol", DEEP, ADMIN)
    assert_error(response, 400, "json_too_deep")
    assert count(app, User) == 0


def test_nesting_within_the_limit_and_brackets_in_text_still_work(client, auth, pair):
    alice, _, conversation_id = pair
    # 32 levels parse, and are then refused by the model, not by the depth limit.
    nested = '{"archived": ' + "[" * 31 + "]" * 31 + "}"
    response = raw_json(
        client, "PATCH", f"/v1/conversations/{conversation_id}", nested, auth(alice)
    )
    assert_error(response, 400, "invalid_request")
    response = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "[" * 200, "client_id": "brackets"},
        headers=auth(alice),
    )
    assert response.status_code == 202, response.json


# --- 2. NUL and lone surrogates in text --------------------------------------------------


def test_check_text_names_the_json_path():
    with pytest.raises(BadRequest) as refused:
        check_text({"subject": {"id": "a\x00"}, "items": ["ok", "\ud800"]})
    assert refused.value.code == "invalid_text"
    assert refused.value.message.split(":")[0] in ("subject.id", "items[1]")
    with pytest.raises(BadRequest) as refused:
        check_text({"odd key": ["\udfff"]})
    assert refused.value.message.startswith('["odd key"][0]:')
    check_text({"body": "emoji \U0001f600 and é are fine"})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('"\\ud800"', "surrogate"),  # JSON escape of a lone high surrogate
        ('"ok \\udc00 ok"', "surrogate"),
        ('"a\\u0000b"', "NUL"),
    ],
)
def test_a_body_with_nul_or_a_lone_surrogate_is_refused_and_not_queued(
    app, client, auth, pair, text, problem
):
    alice, _, conversation_id = pair
    response = raw_json(
        client,
        "POST",
        f"/v1/conversations/{conversation_id}/messages",
        '{"body": ' + text + ', "client_id": "c-bad"}',
        auth(alice),
    )
    error = assert_error(response, 400, "invalid_text")
    assert error["message"].startswith("body:") and problem in error["message"]
    # Nothing accepted: the id this send would have had is unknown.
    would_be = message_id_for(alice.id, "c-bad")
    assert error_code(client.get(f"/v1/messages/{would_be}", headers=auth(alice))) == (
        404,
        "message_not_found",
    )
    assert count(app, Message) == 0


def test_a_surrogate_encoded_in_the_bytes_is_refused_too(client, auth, pair):
    alice, _, conversation_id = pair
    body = b'{"body": "\xed\xa0\x80", "client_id": "c-raw"}'  # UTF-8 bytes of U+D800
    response = raw_json(
        client, "POST", f"/v1/conversations/{conversation_id}/messages", body, auth(alice)
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] in ("invalid_text", "invalid_json")


def test_text_checks_cover_keys_nested_fields_and_other_routes(app, client, auth, pair):
    alice, _, _ = pair
    make = raw_json(
        client,
        "POST",
        "/v1/conversations",
        '{"participant_id": "bob", "subject": {"type": "booking", "id": "b\\u0000"}}',
        auth(alice),
    )
    assert assert_error(make, 400, "invalid_text")["message"].startswith("subject.id:")
    key = raw_json(
        client, "POST", "/v1/conversations", '{"participant_id": "bob", "x\\u0000": 1}', auth(alice)
    )
    assert_error(key, 400, "invalid_text")
    assert count(app, Conversation) == 1


def test_admin_display_name_with_nul_is_a_400_naming_the_field(app, client):
    body = {"tenant": "t1", "role": "member", "display_name": "Ada\x00"}
    response = client.put("/v1/admin/users/ada", json=body, headers=ADMIN)
    assert "display_name" in assert_error(response, 400, "invalid_text")["message"]
    assert count(app, User) == 0
    body["display_name"] = "Ada \ud83d"
    response = raw_json(client, "PUT", "/v1/admin/users/ada", json.dumps(body), ADMIN)
    assert "display_name" in assert_error(response, 400, "invalid_text")["message"]
    assert count(app, User) == 0


@pytest.mark.parametrize(
    "query",
    ["cursor=%00", "limit=1%00", "archived=%00", "%00=1"],
)
def test_nul_in_a_query_string_is_a_400(client, auth, pair, query):
    alice, _, conversation_id = pair
    response = client.get(f"/v1/conversations?{query}", headers=auth(alice))
    assert_error(response, 400, "invalid_text")
    response = client.get(
        f"/v1/conversations/{conversation_id}/messages?before=%00", headers=auth(alice)
    )
    assert_error(response, 400, "invalid_text")


# --- 3. Ids in paths ---------------------------------------------------------------------

MALFORMED_USER_IDS = ["%00", "a%00b", "bob%0A", "a%20b", "x" * 129, "%C3%A9", "a%7Cb"]


@pytest.mark.parametrize("user_id", MALFORMED_USER_IDS)
def test_a_malformed_user_id_is_the_404_of_a_missing_one(app, client, auth, pair, user_id):
    alice, _, _ = pair
    audit_before = count(app, AuditLog)
    missing = client.get("/v1/permissions/ghost", headers=auth(alice))
    assert_error(missing, 404, "user_not_found")
    for method in ("GET", "PUT", "DELETE"):
        path = "/v1/permissions/" if method == "GET" else "/v1/blocks/"
        response = client.open(path + user_id, method=method, headers=auth(alice))
        assert (response.status_code, response.json) == (404, missing.json)
    assert count(app, Block) == 0
    assert count(app, AuditLog) == audit_before


@pytest.mark.parametrize("user_id", MALFORMED_USER_IDS)
def test_the_admin_put_refuses_a_malformed_user_id_with_a_400(app, client, user_id):
    body = {"tenant": "t1", "role": "member", "display_name": "X"}
    response = client.put(f"/v1/admin/users/{user_id}", json=body, headers=ADMIN)
    assert_error(response, 400, "invalid_user_id")
    assert count(app, User) == 0


@pytest.mark.parametrize(
    "bad_id",
    [
        "%00",
        "not-a-uuid",
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        "+2345678-1234-5678-1234-567812345678",
        "1_345678-1234-5678-1234-567812345678",
        "%D9%A0" * 32,  # Arabic-Indic zeros: int() reads them as digits
    ],
)
def test_malformed_uuids_in_paths_are_not_found(client, auth, pair, bad_id):
    alice, _, _ = pair
    for path, code in (
        (f"/v1/conversations/{bad_id}", "conversation_not_found"),
        (f"/v1/conversations/{bad_id}/messages", "conversation_not_found"),
        (f"/v1/messages/{bad_id}", "message_not_found"),
    ):
        assert error_code(client.get(path, headers=auth(alice))) == (404, code)


# --- 4. Cursors ----------------------------------------------------------------------------


def forge(value: object) -> str:
    raw = json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        forge(["2024-01-01T00:00:00+00:00", 5]),  # the report's
        forge({"at": "2024-01-01T00:00:00+00:00", "id": str(uuid.uuid4())}),
        forge(["2024-01-01T00:00:00+00:00", str(uuid.uuid4()), 3]),
        forge(["2024-01-01T00:00:00+00:00"]),
        forge(["2024-01-01T00:00:00", str(uuid.uuid4())]),  # naive
        forge(["2024-01-01", str(uuid.uuid4())]),  # a date: naive midnight
        forge([1704067200, str(uuid.uuid4())]),
        forge([None, None]),
        forge(["2024-01-01T00:00:00+00:00", "urn:uuid:" + str(uuid.uuid4())]),
        forge(["2024-13-01T00:00:00+00:00", str(uuid.uuid4())]),
        forge("just a string"),
        forge([[[[[[]]]]]]),
        "not base64 at all!",
        "%00",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"[[[[").decode(),
    ],
)
def test_forged_cursors_are_a_400(client, auth, pair, cursor):
    alice, _, _ = pair
    response = client.get("/v1/conversations", query_string={"cursor": cursor}, headers=auth(alice))
    assert response.status_code == 400
    assert response.json["error"]["code"] in ("invalid_cursor", "invalid_text")


def test_cursors_we_hand_out_still_page_and_odd_valid_ones_do_not_fail(
    client, auth, make_user, pair
):
    alice, _, _ = pair
    for name in ("carol", "dave"):
        make_user(name, role="member")
        response = client.post(
            "/v1/conversations", json={"participant_id": name}, headers=auth(alice)
        )
        assert response.status_code == 201
    seen, cursor = [], None
    while True:
        query = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/conversations", query_string=query, headers=auth(alice)).json
        seen += [item["id"] for item in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert len(seen) == len(set(seen)) == 3
    # Well-formed but at the edges of time: an empty or full page, not a 500.
    for moment in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        cursor = forge([moment, str(uuid.uuid4())])
        response = client.get(
            "/v1/conversations", query_string={"cursor": cursor}, headers=auth(alice)
        )
        assert response.status_code == 200, response.json


def test_decode_cursor_round_trips():
    moment, row_id = datetime.now(UTC), uuid.uuid4()
    assert decode_cursor(encode_cursor(moment, row_id)) == (moment, row_id)


# --- 5. Token claims -------------------------------------------------------------------------


def token(**claims: object) -> str:
    base: dict[str, object] = {
        "sub": "alice",
        "tenant": "t1",
        "exp": int((datetime.now(UTC) + timedelta(minutes=5)).timestamp()),
    }
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, JWT_SECRET, "HS256")


PYJWT_WORDING = ("segments", "padding", "Invalid", "must be an integer", "json")


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "9999999999"},
        {"exp": "soon"},
        {"exp": 1e20},
        {"exp": 10**30},
        {"exp": {"at": 9999999999}},
        {"exp": [1]},
        {"exp": float("nan")},
        {"sub": "alice\x00"},
        {"sub": 42},
        {"sub": ["alice"]},
        {"sub": ""},
        {"sub": "a b"},
        {"sub": "x" * 129},
        {"sub": "alice\n"},
        {"tenant": "t1\x00"},
        {"tenant": "t1 "},
        {"tenant": 7},
        {"tenant": {"id": "t1"}},
        {"tenant": None},
        {"iat": "yesterday"},
        {"nbf": "later"},
    ],
)
def test_signed_tokens_with_odd_claims_are_a_401(client, make_user, claims):
    make_user("alice", tenant="t1")
    response = client.get("/v1/me", headers={"Authorization": f"Bearer {token(**claims)}"})
    message = assert_error(response, 401, "invalid_token")["message"]
    assert not any(words in message for words in PYJWT_WORDING), message


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "%%%.abc.def",
        "e30.e30",
        "....",
        "abc.def.ghi",
        base64.urlsafe_b64encode(DEEP.encode()).decode().rstrip("=") + ".e30.c2ln",
        "eyJ" + "A" * 10_000 + ".e30.c2ln",
    ],
)
def test_malformed_tokens_get_our_own_words(client, bad):
    response = client.get("/v1/me", headers={"Authorization": f"Bearer {bad}"})
    message = assert_error(response, 401, "invalid_token")["message"]
    assert message == "The token is malformed."


def test_a_token_with_sane_claims_is_still_accepted(client, make_user):
    make_user("alice", tenant="t1")
    response = client.get("/v1/me", headers={"Authorization": f"Bearer {token(exp=2**33)}"})
    assert response.status_code == 200, response.json


# --- 7. `deleted` in a conversation's last message ------------------------------------------


def test_last_message_deleted_has_the_shape_of_history(client, auth, pair, celery_worker):
    alice, bob, conversation_id = pair
    sent = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "oops", "client_id": "c-oops"},
        headers=auth(alice),
    )
    assert sent.status_code == 202, sent.json
    message_id = sent.json["id"]

    def status() -> str | None:
        state = client.get(f"/v1/messages/{message_id}", headers=auth(alice)).json["status"]
        return state if state != "queued" else None

    assert wait_for(status) == "stored"

    def views() -> tuple[dict, dict]:
        listing = client.get("/v1/conversations", headers=auth(bob)).json["items"][0]
        history = client.get(f"/v1/conversations/{conversation_id}/messages", headers=auth(bob))
        return listing["last_message"], history.json["items"][0]

    last, in_history = views()
    assert last["deleted"] is None and in_history["deleted"] is None
    assert last["preview"] == "oops"

    assert client.delete(f"/v1/messages/{message_id}", headers=auth(alice)).status_code == 200
    last, in_history = views()
    assert set(last["deleted"]) == {"at", "reason"}
    assert last["deleted"] == in_history["deleted"]
    assert last["deleted"]["reason"] == "deleted_by_sender"
    assert last["preview"] is None


# --- 1, 2, 6 on the stream: a live web process ------------------------------------------------


@pytest.fixture(scope="module")
def live_web(database_url, redis_url, tmp_path_factory):
    # The same Redis database as tests/test_stream.py's live system (never the in-process
    # tests' own), and the default 4 KiB frame limit so the report's 1.5 KB frame gets in.
    live_redis = separate_redis_db(redis_url, 2)
    redis.Redis.from_url(live_redis).flushdb()
    env = live_env(database_url, live_redis)
    env.pop("SWITCHBOARD_STREAM_MAX_FRAME_BYTES")
    system = LiveSystem(env, tmp_path_factory.mktemp("hostile-live"), web_count=1).start()
    yield system
    system.stop()


@pytest.fixture
def stream_pair(live_web, app, pair):
    alice, bob, conversation_id = pair
    settings = app.extensions["switchboard.settings"]
    return {
        "alice": mint_token(settings, alice.id, alice.tenant_id, ttl=timedelta(minutes=10)),
        "bob": mint_token(settings, bob.id, bob.tenant_id, ttl=timedelta(minutes=10)),
        "conversation_id": conversation_id,
    }


def test_bad_frames_get_error_frames_and_the_socket_stays_open(live_web, stream_pair):
    alice = Stream(live_web.ws_url(), stream_pair["alice"], last_event_id=0)
    try:
        expectations = [
            (DEEP, "json_too_deep"),
            ('{"type": "typing", "conversation_id": "a\\u0000"}', "invalid_text"),
            ('{"type": "typing", "conversation_id": "\\ud800"}', "invalid_text"),
            ('{"type\\u0000": "typing"}', "invalid_text"),
            ('{"type": "typing", "conversation_id": 5}', "invalid_frame"),
            (
                '{"type": "typing", "conversation_id": "urn:uuid:' + str(uuid.uuid4()) + '"}',
                "invalid_frame",
            ),
            ("[1, 2]", "invalid_frame"),
            ('{"type": "shout"}', "unknown_frame_type"),
        ]
        for frame, code in expectations:
            alice.send(frame)
            reply = alice.next()
            assert reply is not None, (frame[:40], alice.close_code, alice.close_reason)
            assert "id" not in reply
            assert (reply["type"], reply["data"]["code"]) == ("error", code), frame[:40]
            assert reply["data"]["message"]
        alice.ws.send_binary(b"\xff\xfe\xfd")
        assert alice.next()["data"]["code"] == "invalid_frame"
    finally:
        alice.close()
    assert alice.close_code is None  # the server never closed it


def test_typing_frames_carry_no_id(live_web, stream_pair):
    alice = Stream(live_web.ws_url(), stream_pair["alice"], last_event_id=0)
    bob = Stream(live_web.ws_url(), stream_pair["bob"], last_event_id=0)
    try:
        # Typing is ephemeral and the process subscribes to events lazily: type until bob
        # sees it (each attempt waits out the relay's 2-second rate limit).
        typing = {"type": "typing", "conversation_id": stream_pair["conversation_id"]}
        frame = None
        for _ in range(10):
            alice.send(typing)
            try:
                frame = bob.next(timeout=2.5)
                break
            except websocket.WebSocketTimeoutException:
                continue
        assert frame is not None, "bob never saw alice typing"
        assert frame == {
            "type": "typing",
            "data": {"conversation_id": stream_pair["conversation_id"], "user_id": "alice"},
        }
    finally:
        alice.close()
        bob.close()


@pytest.mark.parametrize("last_event_id", ["%C2%B2", "-1", "1e3", "%00", "9" * 19])
def test_a_bad_last_event_id_closes_with_4400(live_web, stream_pair, last_event_id):
    stream = Stream(live_web.ws_url() + f"?last_event_id={last_event_id}", stream_pair["alice"])
    assert stream.expect_close()[0] == 4400


@pytest.mark.parametrize(
    "claims", [{"exp": "9999999999"}, {"exp": 1e20}, {"sub": "alice\x00"}, {"tenant": 7}]
)
def test_odd_token_claims_close_the_stream_with_4001(live_web, stream_pair, claims):
    stream = Stream(live_web.ws_url(), token(**claims))
    code, reason = stream.expect_close()
    assert code == 4001 and reason.startswith("invalid_token"), reason
