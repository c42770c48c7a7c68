"""Per-user rate limits shared by every web process, CORS for configured origins, and the
security headers on every response."""

from __future__ import annotations

import time
import urllib.request
from datetime import timedelta
from importlib import resources

import pytest
import redis
from sqlalchemy import func, select

from app.api.stream import FrameLimit, serve_stream
from app.auth import mint_token
from app.models import Message
from app.policy.schema import RateLimit, RateLimitActions
from app.ratelimit import UserRateLimiter, window_for
from app.settings import SettingsError
from app.web import RATE_LIMITED_ACTIONS
from tests.conftest import settings_for
from tests.helpers import error_code
from tests.live import LiveSystem, Stream, http
from tests.test_stream import live_env, separate_redis_db

ORIGIN = "https://app.example.com"


@pytest.fixture
def policy_name() -> str:
    return "marketplace"  # [rate_limit] per_second = 10, burst = 20: 20 per 2 s


@pytest.fixture
def app(app_factory, policy_name: str, clean_state):
    # The suite's settings turn the limits off (its users send faster than people do).
    return app_factory(SWITCHBOARD_POLICY=policy_name, SWITCHBOARD_RATE_LIMITS_ENABLED="true")


class FakeClock:
    """The limiter's clock, moved by the test instead of by sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("limits.storage.redis.time", fake)
    monkeypatch.setattr("app.ratelimit.wall_clock", fake.time)
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
    refused = client.get("/v1/me", headers=auth(alice))
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "2")
    clock.now += 1.0  # half the window: all 20 still inside it
    refused = client.get("/v1/me", headers=auth(alice))
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "1")
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
        ws = None  # simple-websocket's wsproto state: none, the handshake is not tested here

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


# ------------------------------------------------------------------ per-action and frame limits

# The marketplace preset with a send limit of 3 in any 3 s (the general one stays 20 per
# 2 s) and a frame limit of 3 in any second.
TIGHT_SEND = "send = { per_second = 1, burst = 3 }"
TIGHT_FRAMES = "frames = { per_second = 3, burst = 3 }"


@pytest.fixture(scope="session")
def tight_policy(tmp_path_factory) -> str:
    text = resources.files("app.policy").joinpath("presets", "marketplace.toml").read_text()
    for old, new in (
        ("send = { per_second = 2, burst = 10 }", TIGHT_SEND),
        ("frames = { per_second = 10, burst = 20 }", TIGHT_FRAMES),
    ):
        assert old in text, f"test setup: {old!r} not in the marketplace preset"
        text = text.replace(old, new)
    path = tmp_path_factory.mktemp("policy") / "tight.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def tight(app_factory, tight_policy, clean_state):
    return app_factory(SWITCHBOARD_POLICY=tight_policy, SWITCHBOARD_RATE_LIMITS_ENABLED="true")


def start_chat(client, auth, customer, artist) -> str:
    started = client.post(
        "/v1/conversations", json={"participant_id": artist.id}, headers=auth(customer)
    )
    assert started.status_code == 201, started.json
    return started.json["id"]


def send(client, headers, conversation_id, client_id):
    return client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "hello", "client_id": client_id},
        headers=headers,
    )


def message_count(app) -> int:
    with app.extensions["switchboard.db"].read_sessions() as session:
        return session.scalar(select(func.count()).select_from(Message))


def test_the_mapped_endpoints_exist_and_name_known_actions(app):
    actions = set(RateLimitActions.model_fields)
    for endpoint, action in RATE_LIMITED_ACTIONS.items():
        assert action in actions
        assert endpoint in app.view_functions, endpoint


def test_a_send_past_its_action_limit_is_a_429_and_writes_nothing(tight, make_user, auth, clock):
    client = tight.test_client()
    customer, artist = make_user("cust", role="customer"), make_user("artist", role="artist")
    conversation_id = start_chat(client, auth, customer, artist)
    for index in range(3):
        assert send(client, auth(customer), conversation_id, f"c-{index}").status_code == 202
    refused = send(client, auth(customer), conversation_id, "c-3")
    assert error_code(refused) == (429, "rate_limited")
    assert "messages sent" in refused.json["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 3
    assert message_count(tight) == 3
    # Routes without an action limit only spend the general budget, which has room.
    assert client.get("/v1/me", headers=auth(customer)).status_code == 200
    assert client.get("/v1/conversations", headers=auth(customer)).status_code == 200
    # The other side's sends are limited separately.
    assert send(client, auth(artist), conversation_id, "a-0").status_code == 202
    body = tight.test_client().get("/metrics").get_data(as_text=True)
    assert 'switchboard_rate_limited_total{surface="action:send"}' in body
    clock.now += 3.1
    assert send(client, auth(customer), conversation_id, "c-3").status_code == 202


def test_a_request_refused_by_its_action_limit_still_counts_as_a_request(
    tight, make_user, auth, clock
):
    """As flask-limiter stacks limits: the general window first, then the action's. A
    refused send was a request all the same, and spends the general budget."""
    client = tight.test_client()
    customer, artist = make_user("cust", role="customer"), make_user("artist", role="artist")
    conversation_id = start_chat(client, auth, customer, artist)  # general: 1 of 20
    for index in range(3):  # general: 4 of 20; send: 3 of 3
        assert send(client, auth(customer), conversation_id, f"c-{index}").status_code == 202
    for index in range(10):  # general: 14 of 20; send: still 3 of 3
        assert send(client, auth(customer), conversation_id, f"x-{index}").status_code == 429
    burst(client, auth(customer), 6)
    assert error_code(client.get("/v1/me", headers=auth(customer))) == (429, "rate_limited")
    assert message_count(tight) == 3


def test_the_general_limit_still_applies_to_actions_and_spends_nothing_of_theirs(
    tight, make_user, auth, clock
):
    client = tight.test_client()
    customer, artist = make_user("cust", role="customer"), make_user("artist", role="artist")
    conversation_id = start_chat(client, auth, customer, artist)
    for index in range(2):  # general: 3 of 20; send: 2 of 3
        assert send(client, auth(customer), conversation_id, f"c-{index}").status_code == 202
    burst(client, auth(customer), 17)
    refused = send(client, auth(customer), conversation_id, "c-2")
    assert error_code(refused) == (429, "rate_limited")
    assert refused.json["error"]["message"].startswith("Too many requests")
    clock.now += 2.1  # the general window (2 s) has moved on, the send window (3 s) not
    assert send(client, auth(customer), conversation_id, "c-2").status_code == 202
    assert send(client, auth(customer), conversation_id, "c-3").status_code == 429
    assert message_count(tight) == 3


def test_an_action_limit_costs_one_more_hit_and_only_on_its_routes(tight, make_user, auth):
    limiter = tight.extensions["switchboard.ratelimiter"]
    calls: list[tuple[str, ...]] = []
    real_hit = limiter._limiter.hit

    def counted(item, *identifiers):
        calls.append(identifiers)
        return real_hit(item, *identifiers)

    limiter._limiter.hit = counted
    try:
        client = tight.test_client()
        customer, artist = make_user("cust", role="customer"), make_user("artist", role="artist")
        assert client.get("/v1/me", headers=auth(customer)).status_code == 200
        assert calls == [("t1", "cust")]  # the general window only
        conversation_id = start_chat(client, auth, customer, artist)
        assert send(client, auth(customer), conversation_id, "c-0").status_code == 202
        assert calls[1:] == [
            ("t1", "cust"),
            ("t1", "cust", "start_conversation"),
            ("t1", "cust"),
            ("t1", "cust", "send"),
        ]
    finally:
        del limiter._limiter.hit


def test_frames_fail_open_when_redis_is_unreachable():
    limiter = UserRateLimiter(redis.Redis.from_url("redis://127.0.0.1:1/0"), 10, 20)
    frames = FrameLimit(limiter, "t1", "alice", RateLimit(per_second=1, burst=1))
    assert all(frames.refusal() is None for _ in range(5))
    assert FrameLimit(None, "t1", "alice", RateLimit(per_second=1, burst=1)).refusal() is None


@pytest.fixture
def live_tight(database_url, redis_url, tight_policy, tmp_path):
    # A Redis database of its own: the in-process test workers must not see its queue.
    live_redis = separate_redis_db(redis_url, 4)
    redis.Redis.from_url(live_redis).flushdb()
    env = live_env(database_url, live_redis) | {
        "SWITCHBOARD_POLICY": tight_policy,
        "SWITCHBOARD_RATE_LIMITS_ENABLED": "true",
    }
    system = LiveSystem(env, tmp_path / "logs").start()
    yield system
    system.stop()


def test_stream_frames_past_the_limit_get_an_error_frame_and_the_socket_stays_open(
    live_tight, app, make_user
):
    alice = make_user("alice", role="customer")
    token = mint_token(
        app.extensions["switchboard.settings"],
        alice.id,
        alice.tenant_id,
        ttl=timedelta(minutes=10),
    )
    shout = {"type": "shout"}  # a frame handled with an answer: unknown_frame_type
    phone = Stream(live_tight.ws_url(), token, last_event_id=0)
    laptop = Stream(live_tight.ws_url(), token, last_event_id=0)
    try:
        for _ in range(3):  # 3 frames in any second, per user
            phone.send(shout)
            assert phone.next()["data"]["code"] == "unknown_frame_type"
        phone.send(shout)
        refused = phone.next()
        assert refused["type"] == "error" and "id" not in refused
        assert refused["data"]["code"] == "rate_limited"
        assert refused["data"]["retry_after"] == 1
        assert "retry in 1 s" in refused["data"]["message"]
        # Every socket of the user shares the budget.
        laptop.send(shout)
        assert laptop.next()["data"]["code"] == "rate_limited"
        # Frames have a budget of their own: of the general one (20 per 2 s) the two
        # connects took 2, the frames nothing.
        for _ in range(18):
            assert http("GET", live_tight.url() + "/v1/me", token)[0] == 200
        assert http("GET", live_tight.url() + "/v1/me", token)[0] == 429
        time.sleep(1.1)
        phone.send(shout)
        assert phone.next()["data"]["code"] == "unknown_frame_type"  # open, handled again
    finally:
        phone.close()
        laptop.close()
    with urllib.request.urlopen(live_tight.url() + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'switchboard_rate_limited_total{surface="stream_frame"}' in metrics


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
