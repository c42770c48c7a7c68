"""Request plumbing shared by the blueprints: the request's database session,
the authenticated user, JSON body parsing, request ids and HTTP metrics."""

from __future__ import annotations

import re
import time
import uuid
from typing import TypeVar

from flask import Flask, Response, current_app, g, request
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.auth import TokenClaims, TokenVerifier, load_user, parse_bearer
from app.db import Database
from app.input_checks import check_text, parse_untrusted_json
from app.models import User
from app.problems import BadRequest, TooManyRequests
from app.settings import Settings
from app.storage import ObjectStore
from monitoring.logging import request_id_var
from monitoring.metrics import HTTP_LATENCY, HTTP_REQUESTS

ModelT = TypeVar("ModelT", bound=BaseModel)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def settings() -> Settings:
    return current_app.extensions["switchboard.settings"]


def database() -> Database:
    return current_app.extensions["switchboard.db"]


def object_store() -> ObjectStore | None:
    """The attachments' object store; None where no bucket is configured."""
    return current_app.extensions["switchboard.storage"]


def session(*, autocommit: bool | None = None) -> Session:
    """The request's session, opened on first use and closed when the request ends.

    Handlers commit explicitly once their writes are complete; anything not
    committed is rolled back at teardown. GET and HEAD requests read in autocommit, and
    so does a handler whose every write is one atomic statement (`autocommit=True`):
    no BEGIN or COMMIT round trip.
    """
    if "db_session" not in g:
        if autocommit is None:
            autocommit = request.method in ("GET", "HEAD")
        g.db_session = (database().read_sessions if autocommit else database().sessions)()
    return g.db_session


def current_claims() -> TokenClaims:
    """The verified claims of the request's bearer token; 401 otherwise. Enough for
    who is asking (user and tenant) without reading the user's row."""
    if "token_claims" not in g:
        verifier: TokenVerifier = current_app.extensions["switchboard.tokens"]
        g.token_claims = verifier.verify(parse_bearer(request.headers.get("Authorization")))
    return g.token_claims


def current_user() -> User:
    """The user the request's bearer token speaks for; 401 otherwise."""
    if "current_user" not in g:
        g.current_user = load_user(session(), current_claims())
    return g.current_user


def parse_body(model: type[ModelT]) -> ModelT:
    """The JSON body validated against `model`; a 400 naming the bad field otherwise.

    Nesting depth and text (no NUL, no unpaired surrogates) are checked here, once for
    every route, before the body reaches pydantic, the services or the database."""
    if not request.is_json:
        raise BadRequest(
            "The request body must be JSON (Content-Type: application/json).", code="invalid_json"
        )
    payload = parse_untrusted_json(request.get_data(cache=True))
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return model.model_validate(payload)


def parse_query(model: type[ModelT]) -> ModelT:
    """The query string validated against `model`; NUL in a name or value is a 400."""
    for name, value in request.args.items(multi=True):
        check_text(name, "a query parameter name")
        check_text(value, name)
    return model.model_validate(request.args.to_dict())


def _start_request() -> None:
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    g.request_id_token = request_id_var.set(g.request_id)


def _finish_request(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule else "<unmatched>"
    HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    HTTP_LATENCY.labels(request.method, route).observe(time.perf_counter() - g.started)
    response.headers["X-Request-ID"] = g.request_id
    return response


def _teardown_request(_exc: BaseException | None) -> None:
    db_session = g.pop("db_session", None)
    if db_session is not None:
        db_session.close()
    token = g.pop("request_id_token", None)
    if token is not None:
        request_id_var.reset(token)


# Blueprints outside the per-user limit: probes and metrics carry no user; admin routes are
# the deployment's own backend with the service token; the stream limits its connect itself.
RATE_LIMIT_EXEMPT_BLUEPRINTS = frozenset({"health", "admin", "stream"})
# Endpoints that check the token's user in a query they make anyway (the send's one
# pre-check query answers 401 `unknown_user`), so the hook loads no `User` for them.
USER_CHECKED_BY_ENDPOINT = frozenset({"conversations.send"})
# Endpoint -> the `[rate_limit.actions]` name whose limit it spends besides the general
# one (tests/test_rate_limits.py checks that each endpoint exists).
RATE_LIMITED_ACTIONS = {
    "conversations.send": "send",
    "conversations.start": "start_conversation",
    "moderation.report_message": "report",
    "attachments.request_upload": "attachment",
    "broadcasts.send": "broadcast",
}
ACTION_NOUNS = {
    "send": "messages sent",
    "start_conversation": "conversations started",
    "report": "reports",
    "attachment": "attachment uploads",
    "broadcast": "broadcasts",
}
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE"
CORS_HEADERS = "Authorization, Content-Type, X-Request-ID"
CORS_EXPOSED = "Retry-After, X-Request-ID"
CORS_MAX_AGE = "600"
HSTS = "max-age=63072000; includeSubDomains"


def _is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _allowed_origin() -> str | None:
    origin = request.headers.get("Origin")
    if origin and _is_api(request.path) and origin in settings().cors_origins:
        return origin
    return None


def _answer_preflight() -> Response | None:
    """A CORS preflight to the API: 204, with the CORS headers only for an allowed origin
    (without them the browser refuses the real request)."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    if not _is_api(request.path):
        return None
    response = current_app.make_response(("", 204))
    if _allowed_origin():
        response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
    return response


def _enforce_rate_limit() -> None:
    """The user's per-user limit, once authenticated, and the action's own where the
    policy sets one (see app/ratelimit.py for the order); a 429 before the handler runs,
    so nothing is written. A request with no valid token gets its 401 here."""
    if request.method == "OPTIONS" or request.url_rule is None or not _is_api(request.path):
        return
    if request.blueprint in RATE_LIMIT_EXEMPT_BLUEPRINTS:
        return
    # The limit is keyed by the verified claims (the same user and tenant as the row).
    claims = current_claims()
    if request.endpoint not in USER_CHECKED_BY_ENDPOINT:
        # An unprovisioned user's token is a 401 before it spends (or is refused by) the
        # limit, and before Redis is asked: as it always was. These handlers load the
        # user anyway, so this costs them nothing.
        current_user()
    limiter = current_app.extensions["switchboard.ratelimiter"]
    if limiter is None:
        return
    action = RATE_LIMITED_ACTIONS.get(request.endpoint or "")
    policy = current_app.extensions["switchboard.policy"]
    limit = policy.rate_limit_actions.get(action) if action else None
    verdict = limiter.hit(
        claims.tenant_id, claims.user_id, "api", (action, limit) if action and limit else None
    )
    if not verdict.allowed:
        what = ACTION_NOUNS.get(verdict.refused_by or "", "requests")
        raise TooManyRequests(
            f"Too many {what}; retry in {verdict.retry_after} s.",
            headers={"Retry-After": str(verdict.retry_after)},
        )


def _cors_and_security_headers(response: Response) -> Response:
    headers = response.headers
    origin = _allowed_origin()
    if origin:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
    if settings().cors_origins and _is_api(request.path):
        headers.add("Vary", "Origin")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    # The app serves JSON (and /metrics text), never a page: nothing may load or frame it.
    headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    if settings().hsts:
        headers.setdefault("Strict-Transport-Security", HSTS)
    if "Authorization" in request.headers:
        headers["Cache-Control"] = "no-store"
    return response


def install_request_hooks(app: Flask) -> None:
    app.before_request(_start_request)
    app.before_request(_answer_preflight)
    app.before_request(_enforce_rate_limit)
    app.after_request(_finish_request)
    app.after_request(_cors_and_security_headers)
    app.teardown_request(_teardown_request)
