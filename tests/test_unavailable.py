"""When PostgreSQL, Redis or the broker cannot be reached the API answers 503 with
Retry-After and the JSON error shape, never 500, and writes nothing."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from app.embedded import free_port
from tests.helpers import error_code


def test_an_unreachable_database_is_503_on_every_kind_of_request(app_factory, client, auth):
    """`client` builds the usual app first; the second app's database is a closed port."""
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    down = app_factory(SWITCHBOARD_POLICY="bookstore", DATABASE_URL=closed)
    down_client = down.test_client()
    token_headers = auth(type("U", (), {"id": "alice", "tenant_id": "t1"})())
    for method, path, body in (
        ("get", "/v1/me", None),
        ("get", "/v1/conversations", None),
        ("post", "/v1/conversations", {"participant_id": "bob"}),
        (
            "post",
            "/v1/conversations/00000000-0000-0000-0000-000000000000/messages",
            {"body": "hi", "client_id": "c-1"},
        ),
    ):
        response = getattr(down_client, method)(path, json=body, headers=token_headers)
        assert error_code(response) == (503, "database_unavailable"), (path, response.json)
        assert response.headers["Retry-After"] == "1"
    ready = down_client.get("/health/ready")
    assert ready.status_code == 503 and ready.json["checks"]["database"].startswith("down")
    assert down_client.get("/health/workers").status_code == 503


def test_the_stream_answers_an_unreachable_database_with_try_again_later(redis_url, tmp_path: Path):
    """The stream's 503: close code 1013, so the client reconnects later, never 1011."""
    from app.auth import mint_token
    from app.settings import load_settings
    from tests.live import LiveSystem, Stream
    from tests.test_stream import live_env, separate_redis_db

    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    env = live_env(closed, separate_redis_db(redis_url, 3))
    system = LiveSystem(env, tmp_path / "logs").start()
    try:
        token = mint_token(load_settings(env), "alice", "t1", ttl=timedelta(minutes=5))
        stream = Stream(system.ws_url(), token)
        code, reason = stream.expect_close()
        assert code == 1013 and reason.startswith("database_unavailable"), system.logs()
    finally:
        system.stop()
