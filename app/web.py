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

from app.auth import TokenVerifier, load_user, parse_bearer
from app.db import Database
from app.input_checks import check_text, parse_untrusted_json
from app.models import User
from app.problems import BadRequest
from app.settings import Settings
from monitoring.logging import request_id_var
from monitoring.metrics import HTTP_LATENCY, HTTP_REQUESTS

ModelT = TypeVar("ModelT", bound=BaseModel)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def settings() -> Settings:
    return current_app.extensions["switchboard.settings"]


def database() -> Database:
    return current_app.extensions["switchboard.db"]


def session() -> Session:
    """The request's session, opened on first use and closed when the request ends.

    Handlers commit explicitly once their writes are complete; anything not
    committed is rolled back at teardown. GET and HEAD requests read in autocommit.
    """
    if "db_session" not in g:
        read_only = request.method in ("GET", "HEAD")
        g.db_session = (database().read_sessions if read_only else database().sessions)()
    return g.db_session


def current_user() -> User:
    """The user the request's bearer token speaks for; 401 otherwise."""
    if "current_user" not in g:
        verifier: TokenVerifier = current_app.extensions["switchboard.tokens"]
        claims = verifier.verify(parse_bearer(request.headers.get("Authorization")))
        g.current_user = load_user(session(), claims)
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


def install_request_hooks(app: Flask) -> None:
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_teardown_request)
