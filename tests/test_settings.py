"""Settings: every missing or malformed variable is named; Heroku's postgres:// works."""

from __future__ import annotations

import pytest

from app.settings import SettingsError, load_settings

VALID = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SWITCHBOARD_SERVICE_TOKEN": "s" * 20,
    "SWITCHBOARD_JWT_SECRET": "j" * 40,
}


def with_env(**changes: str | None) -> dict[str, str]:
    environ = dict(VALID)
    for name, value in changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return environ


def test_valid_settings_load_with_defaults() -> None:
    settings = load_settings(VALID)
    assert settings.port == 8000
    assert settings.policy == "bookstore"
    assert settings.jwt_algorithm == "HS256"
    assert settings.celery_broker_url == VALID["REDIS_URL"]


def test_heroku_postgres_url_is_accepted_and_uses_psycopg3() -> None:
    settings = load_settings(with_env(DATABASE_URL="postgres://user:pw@db.example:5432/app"))
    assert settings.database_url == "postgresql+psycopg://user:pw@db.example:5432/app"


def test_secrets_are_not_shown_in_the_repr() -> None:
    assert VALID["SWITCHBOARD_JWT_SECRET"] not in repr(load_settings(VALID))
    assert VALID["SWITCHBOARD_SERVICE_TOKEN"] not in repr(load_settings(VALID))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"DATABASE_URL": None}, "DATABASE_URL: is required"),
        ({"REDIS_URL": None}, "REDIS_URL: is required"),
        ({"SWITCHBOARD_SERVICE_TOKEN": None}, "SWITCHBOARD_SERVICE_TOKEN: is required"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL: must be a postgres://"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL: must be a redis://"),
        ({"PORT": "eighty"}, "PORT:"),
        ({"PORT": "70000"}, "PORT:"),
        ({"SWITCHBOARD_SERVICE_TOKEN": "short"}, "SWITCHBOARD_SERVICE_TOKEN:"),
        ({"SWITCHBOARD_JWT_SECRET": None}, "SWITCHBOARD_JWT_SECRET: is required"),
        ({"SWITCHBOARD_JWT_SECRET": "tooshort"}, "SWITCHBOARD_JWT_SECRET: must be at least"),
        ({"SWITCHBOARD_JWT_ALGORITHM": "none"}, "SWITCHBOARD_JWT_ALGORITHM:"),
        ({"SWITCHBOARD_JWT_ALGORITHM": "RS256"}, "SWITCHBOARD_JWT_PUBLIC_KEY: a PEM public key"),
        ({"SWITCHBOARD_LOG_LEVEL": "LOUD"}, "SWITCHBOARD_LOG_LEVEL:"),
    ],
)
def test_bad_settings_name_the_variable(changes: dict, expected: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(with_env(**changes))
    assert expected in str(raised.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({})
    message = str(raised.value)
    for variable in ("DATABASE_URL", "REDIS_URL", "SWITCHBOARD_SERVICE_TOKEN"):
        assert variable in message


def test_create_app_refuses_an_unknown_policy(database_url: str, redis_url: str) -> None:
    from app import create_app
    from app.policy import PolicyError
    from tests.conftest import settings_for

    with pytest.raises(PolicyError) as raised:
        create_app(settings_for(database_url, redis_url, SWITCHBOARD_POLICY="no-such-preset"))
    assert "no-such-preset" in str(raised.value)


@pytest.mark.parametrize("level", ["debug", "Info", " warning ", "ERROR"])
def test_log_level_is_case_insensitive(level: str) -> None:
    assert load_settings(with_env(SWITCHBOARD_LOG_LEVEL=level)).log_level == level.strip().upper()


@pytest.mark.parametrize(
    "broker",
    [
        "amqp://guest:guest@127.0.0.1:5672//",
        "amqps://user:pw@mq.example:5671/vhost",
        "pyamqp://guest@127.0.0.1//",
        "redis://127.0.0.1:6379/1",
        "rediss://cache.example:6380/0",
    ],
)
def test_broker_url_may_be_rabbitmq_or_redis(broker: str) -> None:
    assert load_settings(with_env(SWITCHBOARD_BROKER_URL=broker)).celery_broker_url == broker


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # Pub/sub and rate limits need Redis itself, whatever the broker.
        ({"REDIS_URL": "amqp://guest@127.0.0.1//"}, "REDIS_URL: must be a redis://"),
        ({"SWITCHBOARD_BROKER_URL": "sqs://queue"}, "SWITCHBOARD_BROKER_URL: must be a Redis"),
        ({"SWITCHBOARD_METRICS_TOKEN": "short"}, "SWITCHBOARD_METRICS_TOKEN:"),
    ],
)
def test_bad_broker_and_metrics_settings_name_the_variable(changes: dict, expected: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(with_env(**changes))
    assert expected in str(raised.value)


def test_metrics_token_is_optional_and_not_shown_in_the_repr() -> None:
    assert load_settings(VALID).metrics_token is None
    assert load_settings(with_env(SWITCHBOARD_METRICS_TOKEN="")).metrics_token is None
    token = "m" * 24
    settings = load_settings(with_env(SWITCHBOARD_METRICS_TOKEN=token))
    assert settings.metrics_token == token
    assert token not in repr(settings)
