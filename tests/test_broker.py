"""The Celery broker: the options each transport gets, queue depths and readiness on Redis and
on RabbitMQ, the whole send path through RabbitMQ, and workers that outlive restarts of their
broker: the Procfile's web and worker lines against a Redis and a RabbitMQ node that the test
starts, restarts and stops itself (never the machine's own)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy
from celery import Celery
from flask import Flask
from kombu import Connection, Consumer, Exchange, Producer, Queue

from app import create_app
from app.auth import mint_token
from app.embedded import RedisServer, free_port
from app.readiness import _check_broker
from app.settings import normalise_database_url
from tests.conftest import JWT_SECRET, SERVICE_TOKEN, settings_for
from tests.helpers import wait_for
from tests.live import LiveProcess, LiveSystem, http
from workers.broker import (
    broker_options,
    patch_kombu_redis_client_reuse,
    patch_kombu_redis_restore,
    queue_depths,
)

needs_rabbitmq = pytest.mark.skipif(
    not os.environ.get("TEST_BROKER_URL", "").startswith(("amqp", "pyamqp")),
    reason="RabbitMQ path: set TEST_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// to run it",
)

DUMMY_DATABASE = "postgresql://nobody@127.0.0.1:1/nothing"
DUMMY_REDIS = "redis://127.0.0.1:1/0"


# --- the options ---------------------------------------------------------------------------


def test_redis_broker_options_keep_the_visibility_timeout_and_retry_forever():
    settings = settings_for(
        DUMMY_DATABASE,
        DUMMY_REDIS,
        SWITCHBOARD_BROKER_URL="",
        SWITCHBOARD_TASK_VISIBILITY_TIMEOUT="120",
    )
    options = broker_options(settings)
    transport = options["broker_transport_options"]
    assert transport["visibility_timeout"] == 120
    assert transport["health_check_interval"] > 0
    assert transport["socket_keepalive"] is True
    # A long outage must not end the worker after Celery's default 100 attempts.
    assert options["broker_connection_max_retries"] is None
    assert "confirm_publish" not in transport


def test_rabbitmq_broker_options_make_accepted_tasks_durable():
    settings = settings_for(
        DUMMY_DATABASE, DUMMY_REDIS, SWITCHBOARD_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//"
    )
    options = broker_options(settings)
    assert options["broker_transport_options"] == {"confirm_publish": True}
    assert options["task_default_delivery_mode"] == "persistent"
    assert 0 < options["broker_heartbeat"] <= 60
    assert options["broker_connection_max_retries"] is None


# --- the kombu patch, step by step ---------------------------------------------------------


def test_closing_a_channel_after_redis_died_keeps_its_unacked_tasks_in_redis(tmp_path):
    """Celery's own steps after losing Redis, with a task delivered and not acknowledged
    and BRPOP waiting: `collect()` then `close()` used to raise AttributeError ('NoneType'
    object has no attribute 'hostname') from restore_unacked_once and end the worker. Now
    the close goes through, and the task is still in Redis for the visibility-timeout path."""
    patch_kombu_redis_restore()
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        queue = Queue("direct", Exchange("direct"), "direct")
        with Connection(server.url) as publisher:
            Producer(publisher).publish(
                {"n": 1}, exchange=queue.exchange, declare=[queue], routing_key="direct"
            )
        connection = Connection(server.url)
        channel = connection.default_channel
        received: list = []
        Consumer(
            channel, [queue], callbacks=[lambda _body, message: received.append(message)]
        ).consume()
        # A second channel with a fanout queue, as Celery's pidbox has: closing it on a dead
        # server raises, which is what leaves the default channel open in collect().
        pidbox = Consumer(
            connection.channel(),
            [Queue(f"pidbox-{uuid.uuid4().hex}", Exchange("pidbox", "fanout"), auto_delete=True)],
            no_ack=True,
        )
        pidbox.consume()
        wait_for(lambda: connection.drain_events(timeout=1) or received, timeout=10)
        channel._brpop_start()  # the worker is back on BRPOP while the task runs
        server.process.kill()
        server.process.wait()

        connection.collect(socket_timeout=5)
        connection.close()  # raised AttributeError before the patch

        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.hlen("unacked") == 1, "the unacked task is still in Redis"
        assert client.llen("direct") == 0
        # The visibility-timeout sweep puts it back on its queue (timeout 0: at once).
        with Connection(server.url, transport_options={"visibility_timeout": 0}) as sweeper:
            sweeper.default_channel.qos.restore_visible(num=10, interval=1)
        assert (client.hlen("unacked"), client.llen("direct")) == (0, 1)
        client.close()
    finally:
        server.stop()


def test_a_redis_channel_keeps_one_client_for_its_publishes_and_acknowledgements(
    redis_url, clean_state
):
    """kombu used to build a Redis client for each publish, delivery and acknowledgement
    (~80 us each); a channel now keeps one, made again only with its connection pool, and
    a task still goes round: published, delivered, acknowledged, nothing left unacked."""
    patch_kombu_redis_client_reuse()
    queue_name = f"reuse-{uuid.uuid4().hex[:8]}"
    queue = Queue(queue_name, Exchange(queue_name), queue_name)
    with Connection(redis_url) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        for n in range(3):
            Producer(channel).publish(
                {"n": n}, exchange=queue.exchange, declare=[queue], routing_key=queue_name
            )
        received: list = []

        def on_message(body, message):
            received.append(body["n"])
            message.ack()

        with Consumer(channel, [queue], callbacks=[on_message]):
            wait_for(lambda: connection.drain_events(timeout=1) or len(received) == 3, timeout=10)
        assert received == [0, 1, 2]
        with channel.conn_or_acquire() as client:
            assert client is first, "publishing and acknowledging made no new client"
            assert client.hlen("unacked") == 0 and client.llen(queue_name) == 0

        channel._disconnect_pools()  # what kombu does when the channel closes
        with channel.conn_or_acquire() as rebuilt:
            assert rebuilt is not first and rebuilt.connection_pool is channel.pool
            assert rebuilt.ping()


# --- queue depths ---------------------------------------------------------------------------


def publish_to(url: str, queue_name: str, count: int) -> None:
    queue = Queue(queue_name, Exchange(queue_name), queue_name)
    with Connection(url) as connection:
        producer = Producer(connection)
        for index in range(count):
            producer.publish(
                {"n": index}, exchange=queue.exchange, routing_key=queue_name, declare=[queue]
            )


def test_queue_depths_on_redis(redis_url, clean_state):
    with Celery("depths", broker=redis_url, set_as_current=False) as depths:
        depths.conf.task_queues = [Queue("direct"), Queue("default")]
        publish_to(redis_url, "direct", 3)
        assert queue_depths(depths) == {"direct": 3, "default": 0}


@needs_rabbitmq
def test_queue_depths_on_rabbitmq(broker_url):
    # Queues of this test's own: RabbitMQ's queues outlive the test, Redis is flushed.
    full, missing = f"depth-{uuid.uuid4().hex}", f"depth-{uuid.uuid4().hex}"
    publish_to(broker_url, full, 3)
    try:
        with Celery("depths", broker=broker_url, set_as_current=False) as depths:
            depths.conf.task_queues = [Queue(full), Queue(missing)]
            assert wait_for(lambda: queue_depths(depths)[full] == 3, timeout=10)
            assert queue_depths(depths) == {full: 3, missing: 0}
    finally:
        with Connection(broker_url) as connection:
            connection.default_channel.queue_delete(full)


@needs_rabbitmq
def test_metrics_report_rabbitmq_queue_depths(app, client):
    assert app.extensions["switchboard.settings"].celery_broker_url.startswith("amqp")
    body = client.get("/metrics").get_data(as_text=True)
    assert 'switchboard_queue_depth{queue="direct"} 0.0' in body


# --- readiness --------------------------------------------------------------------------------


@needs_rabbitmq
def test_ready_with_a_rabbitmq_broker(app, client):
    assert app.extensions["switchboard.settings"].celery_broker_url.startswith("amqp")
    response = client.get("/health/ready")
    assert response.status_code == 200, response.json
    assert response.json["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}


def test_ready_names_a_rabbitmq_broker_that_is_down(database_url, redis_url, clean_state):
    closed_port = free_port()
    app = create_app(
        settings_for(
            database_url,
            redis_url,
            SWITCHBOARD_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{closed_port}//",
        )
    )
    try:
        response = app.test_client().get("/health/ready")
    finally:
        app.extensions["switchboard.db"].dispose()
    assert response.status_code == 503
    assert response.json["checks"]["broker"].startswith("down")
    assert response.json["checks"]["redis"] == "ok"


def test_broker_check_gives_up_on_a_rabbitmq_that_never_answers():
    # Accepts TCP and says nothing, as a broker still booting does: the check must not hang.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        assert _check_broker(f"amqp://guest:guest@127.0.0.1:{port}//").startswith("down")


# --- the send path through RabbitMQ -------------------------------------------------------------


@needs_rabbitmq
def test_a_send_is_stored_through_rabbitmq(app, client, make_user, auth, celery_worker):
    assert app.extensions["celery"].conf.broker_url.startswith("amqp")
    alice = make_user("alice", role="manager")
    make_user("bob", role="member")
    response = client.post("/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice))
    assert response.status_code == 201, response.json
    conversation_id = response.json["id"]
    response = client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"body": "through rabbitmq", "client_id": uuid.uuid4().hex},
        headers=auth(alice),
    )
    assert response.status_code == 202, response.json
    message_id = response.json["id"]

    def status() -> str:
        return client.get(f"/v1/messages/{message_id}", headers=auth(alice)).json["status"]

    wait_for(lambda: status() != "queued", timeout=30)
    assert status() == "stored"


# --- workers outliving their broker ------------------------------------------------------------


def live_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
        "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
        "SWITCHBOARD_POLICY": "bookstore",
        "SWITCHBOARD_LOG_LEVEL": os.environ.get("TEST_LIVE_LOG_LEVEL", "WARNING"),
        "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
        # The shortest allowed: tasks whose acknowledgement was lost come back soon.
        "SWITCHBOARD_TASK_VISIBILITY_TIMEOUT": "30",
        **extra,
    }


@dataclass
class Chat:
    """alice (may start conversations) and bob in one conversation, on a live system."""

    system: LiveSystem
    token: str
    conversation_id: str
    engine: sqlalchemy.Engine
    sent: list[str] = field(default_factory=list)

    def send(self, text: str) -> str:
        status, body = http(
            "POST",
            f"{self.system.url()}/v1/conversations/{self.conversation_id}/messages",
            self.token,
            {"body": text, "client_id": uuid.uuid4().hex},
        )
        assert status == 202, body
        self.sent.append(body["id"])
        return body["id"]

    def status(self, message_id: str) -> str | None:
        status, body = http("GET", f"{self.system.url()}/v1/messages/{message_id}", self.token)
        return body.get("status") if status == 200 else None

    def wait_stored(self, message_id: str) -> None:
        self.assert_alive()
        wait_for(lambda: self.status(message_id) not in (None, "queued"), timeout=90)
        assert self.status(message_id) == "stored", self.system.logs()

    def hold_conversation(self) -> sqlalchemy.Connection:
        """Lock the conversation row: the worker's store (FOR UPDATE) waits on it, so
        tasks stay delivered and unacknowledged (in flight) until the lock is let go. NO KEY
        UPDATE lets the API's insert of a send (its foreign key check) through."""
        connection = self.engine.connect()
        connection.exec_driver_sql(
            "SELECT id FROM conversations WHERE id = %(id)s FOR NO KEY UPDATE",
            {"id": self.conversation_id},
        )
        return connection

    def stores_waiting(self) -> int:
        """Worker transactions waiting for the held lock: tasks delivered, running and not
        acknowledged."""
        with self.engine.connect() as connection:
            return connection.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).scalar_one()

    def assert_alive(self) -> None:
        processes = [web for _, web in self.system.webs] + [self.system.worker]
        for process in processes:
            assert process and process.process and process.process.poll() is None, (
                f"{process.name if process else 'worker'} exited:\n{self.system.logs()}"
            )
        worker_log = self.system.worker.log_path.read_text() if self.system.worker else ""
        assert "Unrecoverable error" not in worker_log, self.system.logs()

    def stored_count(self) -> int:
        with self.engine.connect() as connection:
            return connection.exec_driver_sql(
                "SELECT count(*) FROM messages WHERE conversation_id = %(id)s "
                "AND status = 'stored'",
                {"id": self.conversation_id},
            ).scalar_one()


@pytest.fixture
def start_chat(
    app: Flask, make_user: Callable, database_url: str, tmp_path: Path
) -> Iterator[Callable[[dict[str, str]], Chat]]:
    started: list[Chat] = []
    engine = sqlalchemy.create_engine(normalise_database_url(database_url))

    def start(env: dict[str, str]) -> Chat:
        alice = make_user("alice", role="manager")
        make_user("bob", role="member")
        token = mint_token(
            app.extensions["switchboard.settings"],
            alice.id,
            alice.tenant_id,
            ttl=timedelta(minutes=30),
        )
        system = LiveSystem(env, tmp_path / "logs", web_count=1)
        chat = Chat(system, token, "", engine)
        started.append(chat)
        system.start()
        status, body = http(
            "POST", system.url() + "/v1/conversations", token, {"participant_id": "bob"}
        )
        assert status == 201, body
        chat.conversation_id = body["id"]
        return chat

    yield start
    for chat in started:
        chat.system.stop()
    engine.dispose()


RESTARTS = 3


def unacked_in(client: redis.Redis, message_ids: list[str]) -> bool:
    """Whether the task of each message is delivered and unacknowledged: kombu keeps each
    such task's message in the `unacked` hash, and its body holds the message id."""
    bodies = []
    for raw in client.hvals("unacked"):
        message, _exchange, _routing_key = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        bodies.append(body)
    return all(any(message_id in body for body in bodies) for message_id in message_ids)


def test_a_worker_outlives_restarts_of_its_redis(start_chat, database_url, tmp_path):
    """The Procfile's worker against a Redis of this test's own (AOF on, so queued tasks
    survive), restarted while tasks are in flight: the worker process stays up and consumes
    a task sent after each restart; every send ends stored, once."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        chat = start_chat(live_env(database_url, server.url))
        chat.wait_stored(chat.send("before any restart"))
        client = redis.Redis.from_url(server.url)
        for restart in range(RESTARTS):
            held = chat.hold_conversation()
            try:
                in_flight = [chat.send(f"in flight {restart}.{n}") for n in range(2)]
                # Delivered to the worker and not acknowledged: in kombu's unacked hash.
                wait_for(lambda ids=in_flight: unacked_in(client, ids), timeout=30)
                server.stop()
            finally:
                held.close()  # let go while Redis is down: those acks cannot reach it
            server.start()
            chat.wait_stored(chat.send(f"after restart {restart}"))
            for message_id in in_flight:
                chat.wait_stored(message_id)
        chat.assert_alive()
        assert chat.stored_count() == len(chat.sent)
        client.close()
    finally:
        server.stop()


RABBITMQ_SERVER_CANDIDATES = (
    "/usr/lib/rabbitmq/bin/rabbitmq-server",  # Debian's, without the su wrapper
    "rabbitmq-server",
)


def rabbitmq_server_binary() -> str | None:
    return next(filter(None, map(shutil.which, RABBITMQ_SERVER_CANDIDATES)), None)


@dataclass
class RabbitMQNode:
    """A RabbitMQ node of its own: its name, ports, data and config in `directory`, never
    the machine's service. Started in a session of its own and stopped by its pid (the
    rabbitmq-server script, which stops its Erlang VM on SIGTERM). It registers with the
    machine's epmd, starting one if none runs (epmd then outlives the test)."""

    directory: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        home = self.directory
        (home / "mnesia").mkdir(parents=True, exist_ok=True)
        (home / "log").mkdir(exist_ok=True)
        (home / "rabbitmq.conf").write_text("loopback_users.guest = true\nlog.console = false\n")
        (home / "enabled_plugins").write_text("[].\n")
        (home / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
        env = {key: value for key, value in os.environ.items() if not key.startswith("RABBIT")}
        return env | {
            "HOME": str(home),  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"switchboard-test-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(home / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(home / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 120.0) -> RabbitMQNode:
        binary = rabbitmq_server_binary()
        assert binary, "rabbitmq-server is not installed"
        env = self._env()
        log = (self.directory / "server.log").open("ab")
        self.process = subprocess.Popen(
            [binary],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def answers() -> bool:
            assert self.process and self.process.poll() is None, (
                f"rabbitmq-server exited: {(self.directory / 'server.log').read_text()[-3000:]}"
            )
            try:
                with Connection(self.url, connect_timeout=1) as connection:
                    connection.ensure_connection(max_retries=0, timeout=2)
            except Exception:
                return False
            return True

        wait_for(answers, timeout=timeout, interval=0.5)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: only this node
                self.process.wait()


def ready_in(url: str, queue: str) -> int:
    with Connection(url) as connection:
        return connection.default_channel.queue_declare(queue=queue, passive=True).message_count


def queue_state(url: str, queue: str) -> str:
    with Connection(url) as connection:
        declared = connection.default_channel.queue_declare(queue=queue, passive=True)
        return f"{queue}: {declared.message_count} ready, {declared.consumer_count} consumers"


@pytest.mark.skipif(rabbitmq_server_binary() is None, reason="rabbitmq-server is not installed")
def test_a_worker_outlives_restarts_of_its_rabbitmq(start_chat, database_url, redis_url, tmp_path):
    """The Procfile's worker against a RabbitMQ node of this test's own, restarted while
    tasks are in flight: the worker stays up and consumes after each restart; and a
    killed worker's unacknowledged task is back on its queue at once, no timeout to wait."""
    node = RabbitMQNode(tmp_path / "rabbitmq").start()
    try:
        chat = start_chat(live_env(database_url, redis_url, SWITCHBOARD_BROKER_URL=node.url))
        chat.wait_stored(chat.send("before any restart"))
        for restart in range(2):
            held = chat.hold_conversation()
            try:
                in_flight = chat.send(f"in flight {restart}")
                try:
                    wait_for(lambda: chat.stores_waiting() == 1, timeout=30)
                except AssertionError:
                    raise AssertionError(queue_state(node.url, "direct")) from None
                node.stop()
            finally:
                held.close()
            node.start()
            chat.wait_stored(chat.send(f"after restart {restart}"))
            chat.wait_stored(in_flight)

        # kill -9 of the worker while it holds a task: RabbitMQ requeues it when the
        # connection drops, with no worker running at all.
        held = chat.hold_conversation()
        try:
            in_flight = chat.send("in flight at the kill")
            wait_for(lambda: chat.stores_waiting() == 1, timeout=30)
            worker = chat.system.worker
            assert worker and worker.process
            os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait()
            wait_for(lambda: ready_in(node.url, "direct") == 1, timeout=30)
        finally:
            held.close()
        chat.system.worker = LiveProcess(
            "worker", chat.system.env(WORKER_CONCURRENCY="4"), worker.log_path
        ).start()
        chat.wait_stored(in_flight)
        chat.assert_alive()
        assert chat.stored_count() == len(chat.sent)
    finally:
        node.stop()
