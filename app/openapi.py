"""The OpenAPI 3.1 document of every route, served at `GET /openapi.json`.

Built from the pydantic models that validate the requests (the blueprints' `*Body` and
`*Query` models, the very classes `parse_body` and `parse_query` are given) and from
app/api/schemas.py, which describes the answers. JSON Schema 2020-12 is OpenAPI 3.1's
own dialect, so `model_json_schema` output goes in as it is.

Why a table here rather than a library (spectree, flask-openapi3): both validate
bodies themselves and answer bad input with 422 and their own error body, where the
contract says 400 and `{"error": {code, message}}`; the app already validates at the
edge (app/web.py, app/input_checks.py) and that must stay the one path. Why a table
rather than decorators on the views: the stream's view is wrapped by `websocket_view`, and a
table keyed by endpoint leaves the handlers untouched. It cannot drift silently:
`build_document` refuses a route without an entry, and tests/test_openapi.py fails on an
entry without a route.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api import schemas
from app.api.admin import UserBody
from app.api.attachments import UploadBody
from app.api.broadcasts import BroadcastBody, InboxQuery, NoFields, QuotaQuery
from app.api.conversations import (
    ArchiveBody,
    HistoryQuery,
    PageQuery,
    ReadBody,
    SendBody,
    StartBody,
)
from app.api.moderation import QueueQuery, ReportBody, ResolveBody
from app.validation import EXTERNAL_ID_PATTERN

OPENAPI_VERSION = "3.1.0"
# Methods Flask adds to every rule by itself; they are not operations of ours.
IMPLICIT_METHODS = frozenset({"HEAD", "OPTIONS"})
# Routes outside the document (none today; Flask's `static` is off, see create_app).
UNDOCUMENTED_ENDPOINTS: frozenset[str] = frozenset()

Auth = Literal["user", "service", "metrics", "stream", "none"]
PathKind = Literal["uuid", "user_id", "file"]

# ----------------------------------------------------------------------- error codes
# The codes every route of a kind may answer with, besides its own (see `Op.errors`).

USER_TOKEN_401 = (
    "missing_token",
    "invalid_token",
    "token_expired",
    "invalid_audience",
    "invalid_issuer",
    "unknown_user",
)
SERVICE_TOKEN_401 = ("missing_token", "invalid_service_token")
# parse_body (app/web.py) and the ValidationError handler (app/errors.py); `bad_request`
# is werkzeug's, for a request it cannot read at all.
BODY_400 = ("invalid_json", "json_too_deep", "invalid_text", "invalid_request", "bad_request")
QUERY_400 = ("invalid_request", "invalid_text", "bad_request")
# werkzeug's answer to a body past MAX_CONTENT_LENGTH.
BODY_413 = ("request_entity_too_large",)
RATE_LIMITED_429 = ("rate_limited",)
# app/errors.py: PostgreSQL or Redis unreachable, or no database connection free.
BACKEND_503 = ("database_unavailable", "service_unavailable", "overloaded")
# A path parameter that decodes to something holding "/" matches no route (or another
# route with other methods): werkzeug's 404 or 405, in the error shape.
ROUTING_404 = ("not_found",)
ROUTING_405 = ("method_not_allowed",)

# The policy's refusals (app/policy/engine.py), each a 403 whose code names the rule.
COMMON_REFUSALS = ("other_tenant", "self_conversation", "messaging_disabled", "blocked")
START_REFUSALS = (
    *COMMON_REFUSALS,
    "unknown_role",
    "unknown_tier",
    "reply_only",
    "role_not_allowed",
    "tier_not_allowed",
)
SEND_REFUSALS = (*COMMON_REFUSALS, "unknown_role", "reply_not_allowed", "attachments_disabled")
BROADCAST_REFUSALS = (
    "messaging_disabled",
    "broadcast_not_allowed",
    "audience_not_allowed",
    "quota_exceeded",
)

STATUS_TEXT = {
    400: "Bad input: the code names the problem and the message the field.",
    401: "No token, or one that is not accepted.",
    403: "Refused by the policy; the code names the rule.",
    404: "Missing, or not visible to you (existence is never leaked).",
    405: "The path decodes to another route's path.",
    409: "Conflict with an earlier request.",
    413: "Too long.",
    429: "Rate limited; retry after `Retry-After` seconds.",
    503: "Not ready or switched off; retry shortly.",
}


@dataclass(frozen=True)
class Resp:
    """A documented answer: a pydantic model, or media of another kind."""

    description: str
    model: type[BaseModel] | None = None
    # Any other body: `text` (Prometheus exposition), `object` (any JSON object), `none`,
    # `html` (a page) and `file` (a static file of the demo client, any type).
    media: Literal["json", "text", "object", "none", "html", "file"] = "json"
    # Answers that are this model or, when a backend failed first, the error shape.
    or_error: bool = False


@dataclass(frozen=True)
class Op:
    summary: str
    tag: str
    responses: Mapping[int, Resp]
    auth: Auth = "user"
    description: str = ""
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    path: Mapping[str, PathKind] = field(default_factory=dict)
    errors: Mapping[int, Sequence[str]] = field(default_factory=dict)
    backend: bool = True  # reads PostgreSQL or Redis, so may answer 503


STREAM_DESCRIPTION = """\
A WebSocket (`GET` with `Upgrade: websocket`); a plain HTTP GET is a 400 `bad_request`,
a malformed handshake a 400 `invalid_handshake`.

**Authentication**: `Authorization: Bearer <JWT>` on the handshake, or `?token=<JWT>`
(browsers cannot set headers on a WebSocket). Failures after the handshake are close
codes, never HTTP: 4001 no or bad token (the reason names the problem), 4002 the token
expired while connected, 4400 bad `last_event_id`, 4008 too slow to read its events,
1009 a frame larger than SWITCHBOARD_STREAM_MAX_FRAME_BYTES, 1008 no pong to our pings,
1011 internal error, 1013 try again later (overloaded, database unavailable, or the
connect rate limit).

**Resuming**: `?last_event_id=N` replays every event after N from the user's event log,
then goes live; without it the stream starts from now. Past the log's window the first
frame is `resync.required`: reload over HTTP (`GET /v1/me` gives the current
`last_event_id`).

**Server frames** are JSON text frames `{"id": <int>, "type": <string>, "data": {...}}`;
`id` is the user's event sequence number (absent on `typing` and `error`, which are not
logged):

- `message.created`: data is a message as `GET /v1/messages/{id}` shows it (attachments
  with freshly signed URLs).
- `message.deleted`: `{id, conversation_id, deleted: {at, reason}}`.
- `message.rejected`: the sender's send was refused by the worker: `{id,
  conversation_id, client_id, reason}`.
- `conversation.read`: `{conversation_id, user_id, message_id, read_at}`.
- `broadcast.created`: a broadcast as `GET /v1/broadcasts` lists it.
- `typing`: `{conversation_id, user_id}`, relayed live, never stored.
- `resync.required`: the log no longer holds what was asked for.
- `error`: `{code, message}` answering a bad client frame (the socket stays open):
  `invalid_frame`, `json_too_deep`, `invalid_text`, `unknown_frame_type`,
  `conversation_not_found`, `rate_limited` (with `retry_after` in seconds; the frame is
  dropped).

**Client frames**: the only one is `{"type": "typing", "conversation_id": "<uuid>"}`,
relayed to the conversation's other members at most once per 2 s per conversation.
"""


def _user_ops() -> dict[str, Op]:
    conv: Mapping[str, PathKind] = {"conversation_id": "uuid"}
    message: Mapping[str, PathKind] = {"message_id": "uuid"}
    return {
        "me.me": Op(
            "My profile and last event id",
            "users",
            {200: Resp("My profile.", schemas.Me)},
        ),
        "conversations.start": Op(
            "Start a conversation, or get the existing one for the pair (and subject)",
            "conversations",
            {
                201: Resp("Started.", schemas.Conversation),
                200: Resp("It existed already.", schemas.Conversation),
            },
            body=StartBody,
            errors={
                400: ("subject_required", "unknown_subject_type"),
                403: START_REFUSALS,
                404: ("user_not_found",),
            },
        ),
        "conversations.list_mine": Op(
            "My conversations, latest activity first",
            "conversations",
            {200: Resp("One page.", schemas.ConversationPage)},
            query=PageQuery,
            errors={400: ("invalid_cursor",)},
        ),
        "conversations.get_one": Op(
            "One conversation",
            "conversations",
            {200: Resp("The conversation.", schemas.Conversation)},
            path=conv,
            errors={404: ("conversation_not_found",)},
        ),
        "conversations.archive": Op(
            "Archive or unarchive a conversation (for me)",
            "conversations",
            {200: Resp("The conversation.", schemas.Conversation)},
            body=ArchiveBody,
            path=conv,
            errors={404: ("conversation_not_found",)},
        ),
        "conversations.read": Op(
            "Mark read up to a message (default: the latest)",
            "conversations",
            {200: Resp("My read state.", schemas.ReadState)},
            body=ReadBody,
            body_required=False,
            path=conv,
            errors={404: ("conversation_not_found", "message_not_found")},
        ),
        "conversations.unread": Op(
            "My unread totals",
            "conversations",
            {200: Resp("Totals.", schemas.Unread)},
        ),
        "conversations.list_messages": Op(
            "History, newest first; deleted messages as placeholders",
            "messages",
            {200: Resp("One page.", schemas.MessagePage)},
            query=HistoryQuery,
            path=conv,
            errors={404: ("conversation_not_found", "message_not_found")},
        ),
        "conversations.send": Op(
            "Send a message",
            "messages",
            {202: Resp("Accepted: the worker stores or rejects it.", schemas.Accepted)},
            description=(
                "The same `client_id` with the same body answers with the same id (and "
                "where that send stands); with another body 409 `client_id_reused`."
            ),
            body=SendBody,
            path=conv,
            errors={
                400: (
                    "empty_message",
                    "too_many_attachments",
                    "attachment_invalid",
                    "attachment_not_uploaded",
                ),
                403: SEND_REFUSALS,
                404: ("conversation_not_found", "attachment_not_found"),
                409: ("client_id_reused", "attachment_in_use"),
                413: ("message_too_long",),
            },
        ),
        "messages.get_message": Op(
            "One message, with its status",
            "messages",
            {200: Resp("The message.", schemas.MessageOut)},
            path=message,
            errors={404: ("message_not_found",)},
        ),
        "messages.delete_message": Op(
            "Delete my own message (soft: a placeholder stays)",
            "messages",
            {200: Resp("The message as a placeholder.", schemas.MessageOut)},
            path=message,
            errors={403: ("not_sender",), 404: ("message_not_found",)},
        ),
        "broadcasts.send": Op(
            "Send a broadcast to an audience",
            "broadcasts",
            {202: Resp("Accepted: the broadcast worker fans it out.", schemas.Accepted)},
            body=BroadcastBody,
            errors={
                400: ("unknown_audience", "empty_message"),
                403: BROADCAST_REFUSALS,
                409: ("client_id_reused",),
                413: ("message_too_long",),
            },
        ),
        "broadcasts.list_mine": Op(
            "Broadcasts I received, newest first",
            "broadcasts",
            {200: Resp("One page.", schemas.BroadcastPage)},
            query=InboxQuery,
            errors={400: ("invalid_cursor",)},
        ),
        "broadcasts.quota": Op(
            "My remaining broadcast quota",
            "broadcasts",
            {200: Resp("My rule and what is left of it.", schemas.Quota)},
            query=QuotaQuery,
        ),
        "broadcasts.get_one": Op(
            "One broadcast (its sender sees status and reach)",
            "broadcasts",
            {200: Resp("The broadcast.", schemas.BroadcastOut)},
            path={"broadcast_id": "uuid"},
            errors={404: ("broadcast_not_found",)},
        ),
        "broadcasts.read": Op(
            "Mark a received broadcast read",
            "broadcasts",
            {200: Resp("Read.", schemas.BroadcastRead)},
            body=NoFields,
            body_required=False,
            path={"broadcast_id": "uuid"},
            errors={404: ("broadcast_not_found",)},
        ),
        "moderation.report_message": Op(
            "Report a message",
            "moderation",
            {
                201: Resp("Reported.", schemas.ReportOut),
                200: Resp("I had reported it already.", schemas.ReportOut),
            },
            body=ReportBody,
            path=message,
            errors={
                400: ("unknown_reason",),
                403: ("own_message",),
                404: ("message_not_found",),
                409: ("message_deleted",),
                413: ("note_too_long",),
            },
        ),
        "moderation.queue": Op(
            "The moderation queue (moderators), oldest first",
            "moderation",
            {200: Resp("One page.", schemas.ReportPage)},
            query=QueueQuery,
            errors={400: ("invalid_cursor",), 403: ("not_moderator",)},
        ),
        "moderation.get_report": Op(
            "One report (moderators)",
            "moderation",
            {200: Resp("The report.", schemas.ModerationReport)},
            path={"report_id": "uuid"},
            errors={403: ("not_moderator",), 404: ("report_not_found",)},
        ),
        "moderation.resolve": Op(
            "Resolve a report: remove the message or dismiss the report",
            "moderation",
            {200: Resp("The report as the queue now shows it.", schemas.ModerationReport)},
            body=ResolveBody,
            path={"report_id": "uuid"},
            errors={
                400: ("unknown_action",),
                403: ("not_moderator",),
                404: ("report_not_found",),
                409: ("report_resolved",),
                413: ("note_too_long",),
            },
        ),
        "attachments.request_upload": Op(
            "Ask to upload an image: a presigned S3 POST",
            "attachments",
            {
                201: Resp(
                    "Send the bytes to `upload.url` with `upload.fields`.", schemas.UploadTicket
                )
            },
            body=UploadBody,
            errors={
                400: ("invalid_filename", "unsupported_attachment_type"),
                403: ("attachments_disabled",),
                409: ("too_many_unsent_attachments",),
                413: ("attachment_too_large",),
            },
        ),
        "attachments.get_attachment": Op(
            "An attachment, with short-lived signed URLs",
            "attachments",
            {200: Resp("The attachment.", schemas.AttachmentOut)},
            path={"attachment_id": "uuid"},
            errors={404: ("attachment_not_found",)},
        ),
        "people.permissions": Op(
            "May I start a conversation with this user, and if not which rule says no",
            "people",
            {200: Resp("The answer.", schemas.Permission)},
            path={"user_id": "user_id"},
            errors={404: ("user_not_found",)},
        ),
        "people.list_blocks": Op(
            "The users I block",
            "people",
            {200: Resp("Their ids.", schemas.BlockList)},
        ),
        "people.block": Op(
            "Block a user",
            "people",
            {
                201: Resp("Blocked.", schemas.Blocked),
                200: Resp("Blocked already.", schemas.Blocked),
            },
            path={"user_id": "user_id"},
            errors={400: ("self_block",), 404: ("user_not_found",)},
        ),
        "people.unblock": Op(
            "Unblock a user",
            "people",
            {204: Resp("Unblocked (or was not blocked).", media="none")},
            path={"user_id": "user_id"},
            errors={404: ("user_not_found",)},
        ),
    }


def _other_ops() -> dict[str, Op]:
    return {
        "health.health": Op(
            "Liveness",
            "operations",
            {200: Resp("The process answers.", schemas.Health)},
            auth="none",
            backend=False,
        ),
        "health.ready": Op(
            "Readiness: PostgreSQL and Redis reachable",
            "operations",
            {
                200: Resp("Ready.", schemas.Ready),
                503: Resp("Not ready: `checks` says what is down.", schemas.Ready),
            },
            auth="none",
            backend=False,
        ),
        "health.workers": Op(
            "Are accepted sends being decided by workers?",
            "operations",
            {
                200: Resp("Workers keep up.", schemas.Workers),
                503: Resp(
                    "Stalled (`workers_stalled`), or the database is unavailable.",
                    schemas.Workers,
                    or_error=True,
                ),
            },
            auth="none",
        ),
        "health.metrics": Op(
            "Prometheus metrics",
            "operations",
            {200: Resp("Prometheus text exposition format.", media="text")},
            auth="metrics",
            errors={401: ("unauthorized",)},
            backend=False,
        ),
        "openapi.document": Op(
            "This document",
            "operations",
            {200: Resp("OpenAPI 3.1.", media="object")},
            auth="none",
            backend=False,
        ),
        "admin.put_user": Op(
            "Provision or update a user (the host app, with the service token)",
            "admin",
            {
                201: Resp("Created.", schemas.UserOut),
                200: Resp("Updated.", schemas.UserOut),
            },
            description=(
                "`tier` defaults to the policy's default tier. A changed tier starts the "
                "downgrade grace of the retention rules."
            ),
            auth="service",
            body=UserBody,
            path={"user_id": "user_id"},
            errors={
                400: ("invalid_user_id", "unknown_role", "unknown_tier"),
                409: ("tenant_mismatch",),
            },
        ),
        "demo.index": Op(
            "The browser client (with SWITCHBOARD_DEMO=1)",
            "demo",
            {200: Resp("The demo page; it reads its token from the URL fragment.", media="html")},
            description=(
                "Served only when SWITCHBOARD_DEMO is on (`switchboard up` turns it on, "
                "and prints a link per demo user: `/demo/#token=<JWT>`); else 404."
            ),
            auth="none",
            errors={404: ("not_found",)},
            backend=False,
        ),
        "demo.asset": Op(
            "A static file of the browser client (with SWITCHBOARD_DEMO=1)",
            "demo",
            {200: Resp("The file (JavaScript module, CSS or image).", media="file")},
            auth="none",
            path={"filename": "file"},
            errors={404: ("not_found",)},
            backend=False,
        ),
        "stream.stream": Op(
            "The user's events over a WebSocket",
            "stream",
            {
                101: Resp(
                    "Switching to the WebSocket protocol; see the frames above.", media="none"
                ),
            },
            description=STREAM_DESCRIPTION,
            auth="stream",
            # Not a WebSocket request (werkzeug's 400), or a malformed handshake.
            errors={400: ("bad_request", "invalid_handshake")},
            backend=False,
        ),
    }


def operations() -> dict[str, Op]:
    """Every documented operation, by Flask endpoint name."""
    return _user_ops() | _other_ops()


# ------------------------------------------------------------------------ the document

_RULE_PARAMETER = re.compile(r"<(?:[a-z_]+(?:\([^)]*\))?:)?([a-z_][a-z0-9_]*)>")


def openapi_path(rule: str) -> str:
    """`/v1/messages/<message_id>` as OpenAPI writes it: `/v1/messages/{message_id}`."""
    return _RULE_PARAMETER.sub(r"{\1}", rule)


def routed_operations(app: Flask) -> list[tuple[str, str, str]]:
    """(endpoint, method, path) of every operation the app routes, Flask's own left out."""
    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDOCUMENTED_ENDPOINTS:
            continue
        for method in sorted((rule.methods or set()) - IMPLICIT_METHODS):
            found.append((rule.endpoint, method, openapi_path(rule.rule)))
    return found


class UndocumentedRoute(LookupError):
    """A route with no entry in `operations()`: document it before it ships."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _strip_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without the `null` of an optional field: a query
    string cannot say null, it leaves the parameter out."""
    options = schema.get("anyOf")
    if options:
        kept = [option for option in options if option.get("type") != "null"]
        if len(kept) == 1:
            rest = {key: value for key, value in schema.items() if key != "anyOf"}
            if rest.get("default", "") is None:
                del rest["default"]
            return rest | kept[0]
    return schema


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        prop = _strip_null(dict(prop))
        description = prop.pop("description", None)
        prop.pop("title", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _path_parameter(name: str, kind: PathKind) -> dict[str, Any]:
    if kind == "uuid":
        schema: dict[str, Any] = {"type": "string", "format": "uuid"}
        description = "A UUID; anything else is the 404 of a missing one."
    elif kind == "file":
        schema = {"type": "string"}
        description = "A file's path under the demo client's folder; anything else is a 404."
    else:
        schema = {"type": "string", "pattern": EXTERNAL_ID_PATTERN}
        description = "A host-app user id: 1 to 128 letters, digits or . _ : @ + -."
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def _error_codes(op: Op, path: str) -> dict[int, list[str]]:
    """The codes `op` may answer with, per status: its own and those of its kind."""
    codes: dict[int, list[str]] = {}

    def add(status: int, names: Iterable[str]) -> None:
        bucket = codes.setdefault(status, [])
        bucket.extend(name for name in names if name not in bucket)

    if op.auth == "user":
        add(401, USER_TOKEN_401)
        if path.startswith("/v1/"):
            add(429, RATE_LIMITED_429)
    elif op.auth == "service":
        add(401, SERVICE_TOKEN_401)
    if op.body is not None:
        add(400, BODY_400)
        add(413, BODY_413)
    if op.query is not None:
        add(400, QUERY_400)
    if op.path:
        add(404, ROUTING_404)
        add(405, ROUTING_405)
    if op.backend:
        add(503, BACKEND_503)
    for status, names in op.errors.items():
        add(status, names)
    return dict(sorted(codes.items()))


def _error_response(status: int, names: list[str]) -> dict[str, Any]:
    listed = ", ".join(f"`{name}`" for name in names)
    response: dict[str, Any] = {
        "description": f"{STATUS_TEXT.get(status, 'Error.')} Codes: {listed}.",
        "content": {
            "application/json": {
                "schema": {
                    "allOf": [_ref("Error")],
                    "properties": {"error": {"properties": {"code": {"enum": names}}}},
                }
            }
        },
    }
    if status in (429, 503):
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        }
    return response


def _success_response(resp: Resp, refs: Mapping[type[BaseModel], dict[str, Any]]) -> dict:
    response: dict[str, Any] = {"description": resp.description}
    if resp.media == "none":
        return response
    if resp.media == "text":
        response["content"] = {"text/plain": {"schema": {"type": "string"}}}
        return response
    if resp.media == "html":
        response["content"] = {"text/html": {"schema": {"type": "string"}}}
        return response
    if resp.media == "file":
        response["content"] = {"*/*": {"schema": {"type": "string"}}}
        return response
    if resp.media == "object":
        schema: dict[str, Any] = {"type": "object"}
    else:
        assert resp.model is not None, "a json response names its model"
        schema = refs[resp.model]
        if resp.or_error:
            schema = {"anyOf": [schema, _ref("Error")]}
    response["content"] = {"application/json": {"schema": schema}}
    return response


SECURITY_SCHEMES = {
    "userToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": (
            "A JWT the host app signs (HS256 or RS256, as configured): `sub` the user id, "
            "`tenant` the tenant id, `exp` required; `iss` and `aud` checked when configured. "
            "The user must be provisioned (`PUT /v1/admin/users/{user_id}`)."
        ),
    },
    "streamQueryToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "The same JWT as `?token=`, for WebSocket clients that cannot set headers.",
    },
    "serviceToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "SWITCHBOARD_SERVICE_TOKEN: the host app's backend only.",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "SWITCHBOARD_METRICS_TOKEN, when one is configured (else open).",
    },
}

_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "user": [{"userToken": []}],
    "stream": [{"userToken": []}, {"streamQueryToken": []}],
    "service": [{"serviceToken": []}],
    "metrics": [{"metricsToken": []}, {}],
    "none": [],
}

DESCRIPTION = """\
Switchboard: direct messages, broadcasts, moderation, unread counts and retention.

Errors are always JSON: `{"error": {"code": "<snake_case>", "message": "<for a person>"}}`
(schema `Error`), with 400 bad input, 401 no or bad token, 403 refused by policy (the code
names the rule), 404 missing or not visible to you, 409 conflict, 413 too long, 429 rate
limited with `Retry-After` and 503 not ready or switched off. Each operation lists the
codes it may answer with.

The WebSocket stream and its frames are described under `GET /v1/stream`.
"""


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of `app`'s routes. Raises `UndocumentedRoute` for a route
    that has no entry in `operations()`."""
    table = operations()
    routed = routed_operations(app)
    missing = [
        f"{method} {path} ({endpoint})"
        for endpoint, method, path in routed
        if endpoint not in table
    ]
    if missing:
        raise UndocumentedRoute("routes without an OpenAPI operation: " + ", ".join(missing))

    models: list[type[BaseModel]] = [schemas.Error]
    for endpoint, _method, _path in routed:
        op = table[endpoint]
        if op.body is not None:
            models.append(op.body)
        models.extend(resp.model for resp in op.responses.values() if resp.model is not None)
    unique = list(dict.fromkeys(models))
    keyed, definitions = models_json_schema(
        [(model, "validation") for model in unique],
        ref_template="#/components/schemas/{model}",
    )
    refs = {model: keyed[(model, "validation")] for model in unique}

    paths: dict[str, dict[str, Any]] = {}
    for endpoint, method, path in routed:
        op = table[endpoint]
        operation: dict[str, Any] = {
            "operationId": endpoint.replace(".", "_"),
            "summary": op.summary,
            "tags": [op.tag],
            "security": _SECURITY[op.auth],
        }
        if op.description:
            operation["description"] = op.description
        parameters = [_path_parameter(name, kind) for name, kind in op.path.items()]
        if op.auth == "stream":
            parameters.append(
                {
                    "name": "last_event_id",
                    "in": "query",
                    "required": False,
                    "description": "Replay the events after this one, then go live.",
                    "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
                }
            )
        if op.query is not None:
            parameters.extend(_query_parameters(op.query))
        if parameters:
            operation["parameters"] = parameters
        if op.body is not None:
            operation["requestBody"] = {
                "required": op.body_required,
                "content": {"application/json": {"schema": refs[op.body]}},
            }
        responses: dict[str, Any] = {
            str(status): _success_response(resp, refs) for status, resp in op.responses.items()
        }
        for status, names in _error_codes(op, path).items():
            if str(status) in responses:
                continue  # a documented body of its own (readiness, workers)
            responses[str(status)] = _error_response(status, names)
        operation["responses"] = dict(sorted(responses.items()))
        paths.setdefault(path, {})[method.lower()] = operation

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Switchboard",
            "version": "1",
            "description": DESCRIPTION,
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": SECURITY_SCHEMES,
        },
        "tags": [{"name": name} for name in dict.fromkeys(op.tag for op in table.values())],
    }


__all__ = [
    "UNDOCUMENTED_ENDPOINTS",
    "Op",
    "Resp",
    "UndocumentedRoute",
    "build_document",
    "openapi_path",
    "operations",
    "routed_operations",
]
