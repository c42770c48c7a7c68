"""Liveness, readiness naming what is down, and Prometheus metrics."""

from __future__ import annotations

import sqlalchemy

from app import create_app
from app.auth import mint_token
from app.embedded import RedisServer
from app.settings import normalise_database_url
from tests.conftest import settings_for


def test_health(client):
    response = client.get("/health")
    assert (response.status_code, response.json) == (200, {"status": "ok"})


def test_ready_when_everything_answers(client):
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}


def test_ready_reports_a_stopped_redis(database_url, tmp_path, clean_state):
    # A Redis of this test's own, so stopping it disturbs nothing else.
    server = RedisServer(tmp_path / "redis").start()
    app = create_app(settings_for(database_url, server.url))
    try:
        assert app.test_client().get("/health/ready").status_code == 200
        server.stop()
        response = app.test_client().get("/health/ready")
    finally:
        server.stop()
        app.extensions["switchboard.db"].dispose()
    assert response.status_code == 503
    assert response.json["checks"]["redis"].startswith("down")
    assert response.json["checks"]["database"] == "ok"
    assert response.json["error"]["code"] == "not_ready"
    assert "redis is down" in response.json["error"]["message"]


def test_ready_reports_a_database_that_is_down(redis_url, clean_state):
    app = create_app(settings_for("postgresql://postgres@127.0.0.1:1/nothing", redis_url))
    response = app.test_client().get("/health/ready")
    assert response.status_code == 503
    assert response.json["checks"]["database"].startswith("down")


def test_metrics_count_requests_by_route_template(client, make_user, auth):
    alice = make_user("alice")
    client.get("/v1/me", headers=auth(alice))
    client.get("/v1/admin/users/x")  # 405, no GET
    client.get("/no/such/path")
    body = client.get("/metrics").get_data(as_text=True)
    assert 'switchboard_http_requests_total{method="GET",route="/v1/me",status="200"}' in body
    assert 'route="<unmatched>",status="405"' in body
    assert 'route="<unmatched>",status="404"' in body
    assert "switchboard_http_request_duration_seconds_bucket" in body
    assert 'switchboard_queue_depth{queue="direct"} 0.0' in body


def test_an_exhausted_pool_is_a_503_with_retry_after(database_url, redis_url, clean_state):
    app = create_app(
        settings_for(
            database_url, redis_url, SWITCHBOARD_DB_POOL_SIZE="1", SWITCHBOARD_DB_POOL_TIMEOUT="0.2"
        )
    )
    # Each pool's one connection (no overflow): transactions', and autocommit's (reads,
    # sends).
    held = [engine.connect() for engine in app.extensions["switchboard.db"].engines]
    try:
        response = app.test_client().get("/v1/me", headers={"Authorization": "Bearer x.y.z"})
        # The token is checked before the database is touched: a bad one is still a 401.
        assert response.status_code == 401
        token = mint_token(app.extensions["switchboard.settings"], "nobody", "t1")
        headers = {"Authorization": f"Bearer {token}"}
        # A GET reads on the autocommit pool, a write looks the user up in a transaction.
        read = app.test_client().get("/v1/me", headers=headers)
        write = app.test_client().post("/v1/conversations", json={}, headers=headers)
    finally:
        for connection in held:
            connection.close()
        app.extensions["switchboard.db"].dispose()
    for response in (read, write):
        assert response.status_code == 503
        assert response.json["error"]["code"] == "overloaded"
        assert response.headers["Retry-After"] == "1"


def test_a_restarted_database_costs_one_request(
    app, app_factory, client, make_user, auth, database_url
):
    """One request, not one for each of the process's two pools (reads on autocommit,
    writes in transactions): a disconnect seen on one recycles both."""
    alice = make_user("alice", role="member", tier="privileged")
    make_user("bob", role="member", tier="free")
    assert client.get("/v1/me", headers=auth(alice)).status_code == 200  # the read pool
    started = client.post("/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice))
    assert started.status_code == 201  # and the write pool hold a connection each
    # What a PostgreSQL restart does to the pooled connections: cut them.
    admin = sqlalchemy.create_engine(normalise_database_url(database_url))
    with admin.begin() as connection:
        connection.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    admin.dispose()
    first = client.get("/v1/me", headers=auth(alice))
    assert (first.status_code, first.json["error"]["code"]) == (503, "database_unavailable")
    assert first.headers["Retry-After"] == "1"
    # The write pool's connection was as dead: recycled with the read pool's.
    again = client.post("/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice))
    assert again.status_code in (200, 201), again.json
    assert client.get("/v1/me", headers=auth(alice)).status_code == 200
    # The other apps this session built lost their connections too: spare later tests
    # the one 503 each of them would answer.
    for other in app_factory.built.values():
        other.extensions["switchboard.db"].dispose()


METRICS_TOKEN = "metrics-token-0123456789abcdef"


def test_metrics_need_the_token_when_one_is_set(app_factory, clean_state):
    client = app_factory(SWITCHBOARD_METRICS_TOKEN=METRICS_TOKEN).test_client()
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": METRICS_TOKEN},
    ):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.json["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    response = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    assert "switchboard_queue_depth" in response.get_data(as_text=True)


def test_metrics_are_open_without_a_token(client):
    assert client.get("/metrics").status_code == 200
