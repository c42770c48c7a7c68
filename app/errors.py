"""The handlers that turn every error into the contract's JSON body:
`{"error": {"code": "<snake_case>", "message": "<for a person>"}}`, 404, 405 and 500 included."""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import redis.exceptions
import simple_websocket.errors
import sqlalchemy.exc
import wsproto.utilities
from flask import Flask, g, jsonify
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from app.problems import ApiError

log = logging.getLogger(__name__)


def error_body(code: str, message: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if detail:
        error["detail"] = detail
    return {"error": error}


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, e.g. `tenant: Field required; tier: ...`."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error["loc"]) or "body"
        message = "is required" if error["type"] == "missing" else error["msg"]
        parts.append(f"{location}: {message.removeprefix('Value error, ')}")
    return "; ".join(parts)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> ResponseReturnValue:
        return jsonify(error_body(exc.code, exc.message, exc.detail)), exc.status, exc.headers

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> ResponseReturnValue:
        return jsonify(error_body("invalid_request", describe_validation_error(exc))), 400

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        code = (exc.name or "error").lower().replace(" ", "_").replace("'", "")
        response = jsonify(error_body(code, exc.description or exc.name))
        response.status_code = exc.code or 500
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(wsproto.utilities.RemoteProtocolError)
    @app.errorhandler(simple_websocket.errors.ConnectionError)
    def _bad_handshake(_exc: Exception) -> ResponseReturnValue:
        # An `Upgrade: websocket` request that is no valid handshake (no or a bad
        # Sec-WebSocket-Key, an unsupported Sec-WebSocket-Version): wsproto refuses it in
        # simple-websocket's Server() before the stream's view runs, and nothing has been written
        # to the socket yet, so it is an HTTP 400 like any bad input, not a 500. (After the
        # handshake wsproto's errors stay in simple-websocket's reader thread.)
        message = (
            "Not a valid WebSocket handshake: it needs Sec-WebSocket-Key and "
            "Sec-WebSocket-Version: 13."
        )
        return jsonify(error_body("invalid_handshake", message)), 400

    @app.errorhandler(sqlalchemy.exc.TimeoutError)
    def _pool_exhausted(exc: sqlalchemy.exc.TimeoutError) -> ResponseReturnValue:
        log.warning("no database connection free: %s", exc)
        body = error_body("overloaded", "The service is busy; retry in a moment.")
        return jsonify(body), 503, {"Retry-After": "1"}

    @app.errorhandler(sqlalchemy.exc.DBAPIError)
    def _database_error(exc: sqlalchemy.exc.DBAPIError) -> ResponseReturnValue:
        # OperationalError and InterfaceError are the driver's "could not reach or lost
        # the server" (refused, restarting, shutting down); anything else is a bug.
        unreachable = isinstance(
            exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError
        )
        if not (exc.connection_invalidated or unreachable):
            return _unexpected(exc)
        log.warning("database unavailable: %s", exc.orig or exc)
        body = error_body("database_unavailable", "The database is unavailable; retry shortly.")
        return jsonify(body), 503, {"Retry-After": "1"}

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(kombu.exceptions.OperationalError)
    def _redis_or_broker_error(exc: Exception) -> ResponseReturnValue:
        log.warning("Redis or the broker is unavailable: %r", exc)
        body = error_body("service_unavailable", "A backing service is unavailable; retry shortly.")
        return jsonify(body), 503, {"Retry-After": "2"}

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        request_id = getattr(g, "request_id", None)
        log.exception("unhandled error", extra={"request_id": request_id})
        message = "An unexpected error occurred."
        if request_id:
            message += f" Quote request id {request_id} when reporting it."
        return jsonify(error_body("internal_error", message)), 500
