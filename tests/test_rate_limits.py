"""Per-user rate limits shared by every web process, CORS for configured origins, and the
security headers on every response."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from app.api.stream import serve_stream
from app.models import Message
from app.ratelimit import window_for
from app.settings import SettingsError
from tests.conftest import settings_for
from tests.helpers import error_code

ORIGIN = "https://app.example.com"


@pytest.fixture
def policy_name() -> str:
    return "marketplace"  # [rate_limit] per_second = 10, burst = 20: 20 per 2 s


@pytest.fixture
def app(app_factory, policy_name: str, clean_state):
    # The suite's settings turn the limits off (its users send faster than people do).
    return app_factory(SWITCHBOARD_POLICY=policy_name, SWITCHBOARD_RATE_LIMITS_ENABLED="true")


class FakeClock:
    """The limiter library's clock, moved by the test instead of by sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("limits.storage.redis.time", fake)
    return fake


def burst(client, headers, count=20) -> None:
    for _ in range(count):
        assert client.get("/v1/me", headers=headers).status_code == 200


def test_the_marketplace_window_is_20_per_2_seconds():
    assert window_for(10, 20) == (20, 2)
    assert window_for(3, 20) == (21, 7)  # whole seconds, sustained rate kept
    assert window_for(100, 20) == (100, 1)


def test_past_the_burst_a_429_with_retry_after_and_the_code(client, make_user, auth):
    alice = make_user("alice", role="customer")
    burst(client, auth(alice))
    refused = client.get("/v1/me", headers=auth(alice))
    assert error_code(refused) == (429, "rate_limited")
    assert refused.json["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    body = client.get("/metrics").get_data(as_text=True)
    assert 'switchboard_rate_limited_total{surface="api"}' in body


def test_users_are_limited_separately_and_probes_not_at_all(client, make_user, auth):
    alice, bob = make_user("alice", role="customer"), make_user("bob", role="artist")
    burst(client, auth(alice))
    assert client.get("/v1/me", headers=auth(alice)).status_code == 429
    assert client.get("/v1/me", headers=auth(bob)).status_code == 200
    assert client.get("/health").status_code == 200


def test_the_limit_is_shared_by_two_app_instances(app, app_factory, make_user, auth):
    # Two apps on one Redis: what two web processes see.
    other = app_factory(
        SWITCHBOARD_POLICY="marketplace",
        SWITCHBOARD_LOG_LEVEL="ERROR",
        SWITCHBOARD_RATE_LIMITS_ENABLED="true",
    )
    assert other is not app
    alice = make_user("alice", role="customer")
    burst(app.test_client(), auth(alice), 10)
    burst(other.test_client(), auth(alice), 10)
    assert app.test_client().get("/v1/me", headers=auth(alice)).status_code == 429
    assert other.test_client().get("/v1/me", headers=auth(alice)).status_code == 429


def test_requests_pass_again_once_the_window_has_moved(client, make_user, auth, clock):
    alice = make_user("alice", role="customer")
    burst(client, auth(alice))
    assert client.get("/v1/me", headers=auth(alice)).status_code == 429
    clock.now += 1.0  # half the window: all 20 still inside it
    assert client.get("/v1/me", headers=auth(alice)).status_code == 429
    clock.now += 1.1
    burst(client, auth(alice))
    assert client.get("/v1/me", headers=auth(alice)).status_code == 429


def test_a_refused_send_writes_nothing(app, client, make_user, auth):
    customer, artist = make_user("cust", role="customer"), make_user("artist", role="artist")
    started = client.post(
        "/v1/conversations", json={"participant_id": artist.id}, headers=auth(customer)
    )
    assert started.status_code == 201
    burst(client, auth(customer), 19)
    refused = client.post(
        f"/v1/conversations/{started.json['id']}/messages",
        json={"body": "hello", "client_id": "c-1"},
        headers=auth(customer),
    )
    assert error_code(refused) == (429, "rate_limited")
    with app.extensions["switchboard.db"].read_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0


def test_a_stream_connect_past_the_limit_is_closed_try_again_later(app, make_user, auth):
    alice = make_user("alice", role="customer")
    limiter = app.extensions["switchboard.ratelimiter"]
    for _ in range(20):
        assert limiter.hit(alice.tenant_id, alice.id, "api").allowed

    class Socket:
        closed: tuple[int, str] | None = None

        def close(self, reason: int, message: str) -> None:
            self.closed = (reason, message)

    ws = Socket()
    with app.test_request_context("/v1/stream", headers=auth(alice)):
        serve_stream(ws)
    assert ws.closed is not None
    assert ws.closed[0] == 1013 and ws.closed[1].startswith("rate_limited")


def test_an_unreachable_redis_does_not_fail_requests(database_url, make_user, auth, clean_state):
    from app import create_app

    app = create_app(
        settings_for(
            database_url,
            "redis://127.0.0.1:1/0",
            SWITCHBOARD_POLICY="marketplace",
            SWITCHBOARD_RATE_LIMITS_ENABLED="true",
        )
    )
    try:
        alice = make_user("alice", role="customer")
        for _ in range(25):
            assert app.test_client().get("/v1/me", headers=auth(alice)).status_code == 200
    finally:
        app.extensions["switchboard.db"].dispose()


def cors_app(app_factory):
    return app_factory(
        SWITCHBOARD_POLICY="marketplace",
        SWITCHBOARD_CORS_ORIGINS=f"{ORIGIN}, http://localhost:3000",
        SWITCHBOARD_HSTS="1",
    )


def preflight(client, origin):
    return client.options(
        "/v1/conversations",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_preflight_for_an_allowed_origin(app_factory, clean_state):
    response = preflight(cors_app(app_factory).test_client(), ORIGIN)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"]
    assert {"Authorization", "Content-Type", "X-Request-ID"} <= set(allowed.split(", "))
    assert "Origin" in response.headers.get_all("Vary")
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_cors_refuses_other_origins_and_is_off_by_default(client, app_factory, clean_state):
    refused = preflight(cors_app(app_factory).test_client(), "https://evil.example.com")
    assert refused.status_code == 204
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "Access-Control-Allow-Methods" not in refused.headers
    unset = preflight(client, ORIGIN)
    assert "Access-Control-Allow-Origin" not in unset.headers
    assert "Vary" not in unset.headers


def test_cors_headers_on_a_real_request(app_factory, make_user, auth):
    alice = make_user("alice", role="customer")
    response = (
        cors_app(app_factory).test_client().get("/v1/me", headers={**auth(alice), "Origin": ORIGIN})
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize(
    "value",
    ["*", "https://*.example.com", "https://app.example.com/", "app.example.com", "ftp://x.y"],
)
def test_bad_cors_origins_are_refused_naming_the_variable(database_url, redis_url, value):
    with pytest.raises(SettingsError, match="SWITCHBOARD_CORS_ORIGINS"):
        settings_for(database_url, redis_url, SWITCHBOARD_CORS_ORIGINS=value)


def test_cors_origins_and_hsts_settings_parse(database_url, redis_url):
    settings = settings_for(
        database_url,
        redis_url,
        SWITCHBOARD_CORS_ORIGINS="HTTPS://App.Example.com, http://localhost:3000,",
        SWITCHBOARD_HSTS="1",
    )
    assert settings.cors_origins == (ORIGIN, "http://localhost:3000")
    assert settings.hsts is True
    assert settings_for(database_url, redis_url).cors_origins == ()
    with pytest.raises(SettingsError, match="SWITCHBOARD_HSTS"):
        settings_for(database_url, redis_url, SWITCHBOARD_HSTS="maybe")


def test_security_headers_on_every_response(client, make_user, auth):
    alice = make_user("alice", role="customer")
    for response, authenticated in (
        (client.get("/v1/me", headers=auth(alice)), True),
        (client.get("/health"), False),
        (client.get("/no/such/path"), False),
    ):
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert "Strict-Transport-Security" not in headers  # SWITCHBOARD_HSTS unset
        assert (headers.get("Cache-Control") == "no-store") is authenticated


def test_hsts_only_when_configured(app_factory, clean_state):
    response = cors_app(app_factory).test_client().get("/health")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


def test_the_limits_can_be_switched_off(app_factory, make_user, auth, clean_state):
    switched_off = app_factory(
        SWITCHBOARD_POLICY="marketplace", SWITCHBOARD_RATE_LIMITS_ENABLED="false"
    )
    alice = make_user("alice", role="customer")
    for _ in range(25):
        assert switched_off.test_client().get("/v1/me", headers=auth(alice)).status_code == 200
