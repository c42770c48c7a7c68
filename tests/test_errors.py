"""Every error is the contract's JSON body; an unexpected one is a logged 500."""

from __future__ import annotations

import logging

from app import create_app
from tests.conftest import SERVICE_TOKEN, settings_for


def assert_error_body(response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert set(response.json) == {"error"}
    assert response.json["error"]["code"] == code
    assert response.json["error"]["message"]


def test_unknown_path_is_a_json_404(client):
    assert_error_body(client.get("/v1/nothing-here"), 404, "not_found")


def test_wrong_method_is_a_json_405(client):
    response = client.delete("/health")
    assert_error_body(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


def test_bad_body_is_a_json_400(client):
    response = client.put(
        "/v1/admin/users/alice",
        data="{",
        content_type="application/json",
        headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
    )
    assert_error_body(response, 400, "invalid_json")


def test_too_large_body_is_a_json_413(client):
    response = client.put(
        "/v1/admin/users/alice",
        data="x" * 100_000,
        content_type="application/json",
        headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
    )
    assert_error_body(response, 413, "request_entity_too_large")


def test_unexpected_exception_is_a_json_500_with_a_logged_traceback(
    database_url, redis_url, clean_state, caplog
):
    app = create_app(settings_for(database_url, redis_url))

    @app.get("/_boom")
    def boom():
        raise RuntimeError("kaboom")

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/_boom", headers={"X-Request-ID": "req-123"})
    app.extensions["switchboard.db"].dispose()
    assert_error_body(response, 500, "internal_error")
    assert "req-123" in response.json["error"]["message"]
    assert "kaboom" not in response.json["error"]["message"]
    records = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert records and records[0].exc_info and records[0].request_id == "req-123"


def test_request_id_is_echoed_or_generated(client):
    assert (
        client.get("/health", headers={"X-Request-ID": "abc-1"}).headers["X-Request-ID"] == "abc-1"
    )
    generated = client.get("/health", headers={"X-Request-ID": "bad id!"}).headers["X-Request-ID"]
    assert generated and generated != "bad id!"
