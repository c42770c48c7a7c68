"""Schemathesis against the real app: every operation of /openapi.json with generated
inputs (valid and invalid), authenticated, on real PostgreSQL and Redis.

Checks: no 5xx; the status, content type, headers and body are those the document
gives; invalid input is refused with a 4xx; an operation needing a token refuses a
request without one; and every error is JSON in the contract's shape.

Not checked: schemathesis's `positive_data_acceptance` (input the schema allows may still
be refused by the policy, e.g. an empty body or an unknown audience, a 400 the schema
cannot express) and `use_after_free` (a deleted message stays readable as a placeholder,
by design).

Bounded for CI: SWITCHBOARD_FUZZ_EXAMPLES examples per operation (25 by default); a
nightly run sets it higher, e.g. SWITCHBOARD_FUZZ_EXAMPLES=1000.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks as builtin
from schemathesis.core.parameters import ParameterLocation

from app.openapi import operations, routed_operations
from app.services.access import is_uuid_text
from app.validation import is_external_id
from tests.conftest import SERVICE_TOKEN
from tests.test_moderation import stored_message

HEADER = ParameterLocation.HEADER
FUZZ_EXAMPLES = int(os.environ.get("SWITCHBOARD_FUZZ_EXAMPLES", "25"))
_SNAKE_CASE = re.compile(r"[a-z][a-z0-9_]*")


@schemathesis.check
def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx: JSON with `{"error": {"code": <snake_case>, "message": <text>}}`,
    whether or not the document lists that status for the operation."""
    if response.status_code < 400:
        return None
    # schemathesis's Response keeps headers lower-cased, each a list of values.
    headers = {name.lower(): value for name, value in response.headers.items()}
    content_type = headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/json"), (
        f"{response.status_code} answered with Content-Type {content_type!r}"
    )
    body = json.loads(response.content)
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"no error object in {body!r}"
    assert isinstance(error.get("code"), str) and _SNAKE_CASE.fullmatch(error["code"]), error
    assert isinstance(error.get("message"), str) and error["message"], error
    return None


@schemathesis.check
def negative_data_rejected(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's own check, with 413 counted as a rejection: a generated body past
    the request size limit is refused before any field is read, and rightly so."""
    if response.status_code == 413:
        return None
    return builtin.negative_data_rejection(ctx, response, case)


CHECKS = [
    builtin.not_a_server_error,
    builtin.status_code_conformance,
    builtin.content_type_conformance,
    builtin.response_headers_conformance,
    builtin.response_schema_conformance,
    negative_data_rejected,
    builtin.ignored_auth,
    error_shape,
]


@dataclass
class World:
    """The provisioned users and a few real rows, so that generated requests reach past
    the 404 of a random id: path parameters are sometimes swapped for these ids."""

    actor_token: str
    # Path parameter -> real ids; body field -> values the policy accepts.
    known: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[Any]] = field(default_factory=dict)

    def headers_for(self, path: str) -> dict[str, str]:
        token = SERVICE_TOKEN if path.startswith("/v1/admin/") else self.actor_token
        return {"Authorization": f"Bearer {token}"}


# Per policy: the actor (a role that may start, broadcast and moderate where the policy
# has those), the peer the actor talks with, and another user of the tenant.
CASTS = {
    "cardshow": {"actor": "organizer", "peer": "attendee", "other": "mvp_dealer"},
    "marketplace": {"actor": "admin", "peer": "customer", "other": "artist"},
}


@pytest.fixture(params=sorted(CASTS))
def policy_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def world(app, client, make_user, auth, policy_name) -> World:
    cast = CASTS[policy_name]
    actor = make_user("fuzz-actor", role=cast["actor"])
    peer = make_user("fuzz-peer", role=cast["peer"])
    other = make_user("fuzz-other", role=cast["other"])
    make_user("fuzz-elsewhere", tenant="t2", role=cast["peer"])
    headers = auth(actor)
    started = client.post("/v1/conversations", json={"participant_id": peer.id}, headers=headers)
    assert started.status_code == 201, started.json
    conversation_id = started.json["id"]
    theirs = stored_message(app, peer.id, conversation_id, "a message to report")
    mine = stored_message(app, actor.id, conversation_id, "a message of mine")
    reported = client.post(
        f"/v1/messages/{theirs}/reports", json={"reason": "spam"}, headers=headers
    )
    assert reported.status_code == 201, reported.json
    known = {
        "conversation_id": [conversation_id],
        "message_id": [theirs, mine],
        "report_id": [reported.json["id"]],
        "user_id": [peer.id, other.id, actor.id, "fuzz-elsewhere"],
    }
    if app.extensions["switchboard.policy"].broadcast_audiences(actor.role):
        sent = client.post(
            "/v1/broadcasts",
            json={"audience": "all", "scope": "show-1", "body": "hello", "client_id": "b-1"},
            headers=headers,
        )
        assert sent.status_code == 202, sent.json
        known["broadcast_id"] = [sent.json["id"]]
    if app.extensions["switchboard.policy"].attachments.enabled:
        upload = client.post(
            "/v1/attachments",
            json={"filename": "a.png", "content_type": "image/png", "size": 100},
            headers=headers,
        )
        assert upload.status_code == 201, upload.json
        known["attachment_id"] = [upload.json["id"]]
    policy = app.extensions["switchboard.policy"]
    values: dict[str, list[Any]] = {
        "participant_id": [peer.id, other.id, "fuzz-elsewhere"],
        "message_id": known["message_id"],
        "tenant": ["t1", "t2"],
        "role": list(policy.roles),
        "tier": list(policy.tiers),
        "audience": ["all", *policy.roles],
        "reason": list(policy.report_reasons()),
        "content_type": list(policy.attachments.allowed_types) or ["image/png"],
        "size": [1, 1000],
        "filename": ["photo.jpg"],
        "body": ["hello"],
    }
    token = headers["Authorization"].removeprefix("Bearer ")
    return World(token, known, values)


@pytest.fixture
def api_schema(app: Any) -> Any:
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


def _steer(case: Any, data: st.DataObject, world: World) -> None:
    """Sometimes swap a generated value of a valid case for a real one (an id of the
    world, a role or reason the policy knows), so that the request gets past the 404 or
    400 a random value meets and into the code behind it. Never in an invalid part of a
    negative case: that must stay invalid, and answered with a 4xx."""
    meta = case.meta
    if case.path_parameters and not (meta and meta.is_negative_at(ParameterLocation.PATH)):
        for name in list(case.path_parameters):
            options = world.known.get(name)
            if options and data.draw(st.booleans(), label=f"swap {name}"):
                case.path_parameters[name] = data.draw(st.sampled_from(options), label=name)
    body = case.body
    if isinstance(body, dict) and not (meta and meta.is_negative_at(ParameterLocation.BODY)):
        for name in list(body):
            options = world.values.get(name)
            if options and data.draw(st.booleans(), label=f"swap {name}"):
                body[name] = data.draw(st.sampled_from(options), label=name)


def _strategy(schema: Any, path: str, method: str) -> Any:
    """Valid and invalid cases of one operation. (Not schemathesis's pytest plugin: its
    lazy `from_fixture` loader does not run under pytest 9, whose nodes lost `_nodeid`.)"""
    from schemathesis import GenerationMode

    operation = schema[path][method]
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    # Raises when nothing of the operation can be made invalid (no parameters, no body).
    with contextlib.suppress(Exception):
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    return st.one_of(*strategies)


@pytest.mark.parametrize("endpoint", sorted(operations()))
def test_every_operation_against_the_real_app(
    endpoint: str, app: Any, api_schema: Any, world: World
) -> None:
    [(path, method)] = [
        (path, method) for name, method, path in routed_operations(app) if name == endpoint
    ]
    headers = world.headers_for(path)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        print_blob=True,
    )
    @given(case=_strategy(api_schema, path, method), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        _steer(case, data, world)
        # A case made invalid in its headers is one without a valid Authorization (the
        # only header the document names): adding ours would make it valid again.
        negative_headers = case.meta is not None and case.meta.is_negative_at(HEADER)
        case.call_and_validate(headers=None if negative_headers else headers, checks=CHECKS)

    run()


def test_fuzz_world_ids_are_uuids(world: World) -> None:
    """The swaps keep a valid case valid: the world's ids are well formed."""
    for name, values in world.known.items():
        for value in values:
            if name == "user_id":
                assert is_external_id(value), value
            else:
                assert is_uuid_text(value), (name, value)
                uuid.UUID(value)
