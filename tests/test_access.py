"""Object-level authorization (BOLA) on every endpoint, and every 4xx with its code."""

from __future__ import annotations

import uuid

import pytest

from tests.helpers import error_code, wait_for


@pytest.fixture
def world(client, make_user, auth, celery_worker):
    """alice and bob talk; carol is in their tenant but not the conversation; mallory is
    in another tenant. One stored message from alice."""
    alice = make_user("alice", role="manager")
    bob = make_user("bob", role="member")
    carol = make_user("carol", role="manager")
    mallory = make_user("mallory", role="owner", tenant="t2")
    conversation_id = client.post(
        "/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice)
    ).json["id"]
    message_id = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "secret", "client_id": "c1"},
        headers=auth(alice),
    ).json["id"]
    wait_for(
        lambda: (
            client.get(f"/v1/messages/{message_id}", headers=auth(alice)).json["status"] == "stored"
        )
    )
    return {
        "alice": alice,
        "bob": bob,
        "carol": carol,
        "mallory": mallory,
        "conversation": conversation_id,
        "message": message_id,
    }


OBJECT_ENDPOINTS = [
    ("get", "/v1/conversations/{conversation}", None),
    ("patch", "/v1/conversations/{conversation}", {"archived": True}),
    ("get", "/v1/conversations/{conversation}/messages", None),
    ("post", "/v1/conversations/{conversation}/messages", {"body": "hi", "client_id": "x9"}),
    ("post", "/v1/conversations/{conversation}/read", {}),
    ("get", "/v1/messages/{message}", None),
    ("delete", "/v1/messages/{message}", None),
]


@pytest.mark.parametrize("intruder", ["carol", "mallory"])
@pytest.mark.parametrize(("method", "path", "body"), OBJECT_ENDPOINTS)
def test_outsiders_get_the_same_404_as_for_nothing(
    client, auth, world, intruder, method, path, body
):
    headers = auth(world[intruder])
    real = getattr(client, method)(path.format(**world), json=body, headers=headers)
    missing = getattr(client, method)(
        path.format(conversation=uuid.uuid4(), message=uuid.uuid4()), json=body, headers=headers
    )
    assert real.status_code == 404
    assert real.json == missing.json
    assert "secret" not in real.get_data(as_text=True)


def test_outsiders_do_not_see_it_in_lists(client, auth, world):
    for intruder in ("carol", "mallory"):
        headers = auth(world[intruder])
        assert client.get("/v1/conversations", headers=headers).json["items"] == []
        assert client.get("/v1/unread", headers=headers).json["total"] == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/permissions/{user}"),
        ("put", "/v1/blocks/{user}"),
        ("delete", "/v1/blocks/{user}"),
    ],
)
def test_users_of_another_tenant_are_not_found(client, auth, world, method, path):
    response = getattr(client, method)(path.format(user="alice"), headers=auth(world["mallory"]))
    nobody = getattr(client, method)(path.format(user="nobody"), headers=auth(world["mallory"]))
    assert error_code(response) == (404, "user_not_found")
    assert response.json == nobody.json
    response = client.post(
        "/v1/conversations", json={"participant_id": "alice"}, headers=auth(world["mallory"])
    )
    assert error_code(response) == (404, "user_not_found")


def test_malformed_ids_are_not_found(client, auth, world):
    headers = auth(world["alice"])
    assert error_code(client.get("/v1/conversations/not-a-uuid", headers=headers)) == (
        404,
        "conversation_not_found",
    )
    assert error_code(client.get("/v1/messages/123", headers=headers)) == (404, "message_not_found")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"body": "", "client_id": "a"}, (400, "empty_message")),
        ({"body": "   \n\t", "client_id": "a"}, (400, "empty_message")),
        ({"body": "x" * 1001, "client_id": "a"}, (413, "message_too_long")),
        ({"body": "hi"}, (400, "invalid_request")),
        ({"client_id": "a"}, (400, "invalid_request")),
        ({"body": 5, "client_id": "a"}, (400, "invalid_request")),
        ({"body": "hi", "client_id": "has space"}, (400, "invalid_request")),
        ({"body": "hi", "client_id": "x" * 129}, (400, "invalid_request")),
        ({"body": "hi", "client_id": "a", "extra": 1}, (400, "invalid_request")),
    ],
)
def test_bad_sends(client, auth, world, body, expected):
    response = client.post(
        f"/v1/conversations/{world['conversation']}/messages",
        json=body,
        headers=auth(world["alice"]),
    )
    assert error_code(response) == expected


def test_exactly_the_limit_is_accepted(client, auth, world):
    response = client.post(
        f"/v1/conversations/{world['conversation']}/messages",
        json={"body": "x" * 1000, "client_id": "limit"},
        headers=auth(world["alice"]),
    )
    assert response.status_code == 202


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "invalid_request"),
        ("limit=1000", "invalid_request"),
        ("limit=abc", "invalid_request"),
        ("cursor=garbage", "invalid_cursor"),
        ("archived=maybe", "invalid_request"),
        ("colour=red", "invalid_request"),
    ],
)
def test_bad_list_queries(client, auth, world, query, code):
    assert error_code(client.get(f"/v1/conversations?{query}", headers=auth(world["alice"]))) == (
        400,
        code,
    )


def test_bad_history_cursor(client, auth, world):
    response = client.get(
        f"/v1/conversations/{world['conversation']}/messages?before={uuid.uuid4()}",
        headers=auth(world["alice"]),
    )
    assert error_code(response) == (404, "message_not_found")


def test_bad_starts(client, auth, world):
    headers = auth(world["alice"])
    assert error_code(
        client.post("/v1/conversations", json={"participant_id": "alice"}, headers=headers)
    ) == (403, "self_conversation")
    assert error_code(client.post("/v1/conversations", json={}, headers=headers)) == (
        400,
        "invalid_request",
    )
    assert error_code(
        client.post(
            "/v1/conversations",
            json={"participant_id": "bob", "subject": {"type": "booking", "id": "b"}},
            headers=headers,
        )
    ) == (400, "unknown_subject_type")


def test_read_of_a_message_from_another_conversation(client, auth, world, make_user):
    other = client.post(
        "/v1/conversations", json={"participant_id": "carol"}, headers=auth(world["alice"])
    ).json["id"]
    response = client.post(
        f"/v1/conversations/{other}/read",
        json={"message_id": world["message"]},
        headers=auth(world["alice"]),
    )
    assert error_code(response) == (404, "message_not_found")


def test_blocked_sender_is_refused_at_once(client, auth, world):
    client.put("/v1/blocks/alice", headers=auth(world["bob"]))
    response = client.post(
        f"/v1/conversations/{world['conversation']}/messages",
        json={"body": "hi", "client_id": "after-block"},
        headers=auth(world["alice"]),
    )
    assert error_code(response) == (403, "blocked")
