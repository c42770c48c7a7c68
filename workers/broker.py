"""What depends on which Celery broker Switchboard runs on: Redis (the default, and the
laptop's) or RabbitMQ (`SWITCHBOARD_BROKER_URL=amqp://...`).

- `broker_options(settings)`: the Celery configuration for the chosen transport, tuned so
  that a task the API has handed to the broker survives a broker restart, a killed worker's
  tasks come back, and no worker process ends because its broker went away for a while.
- `queue_depths(celery)`: how many tasks wait in each queue, on either transport.
- `purge_amqp_queues(url, names)`: empty queues on a RabbitMQ vhost (tests, benchmarks).
- `patch_kombu_redis_restore()`: a small patch of kombu's Redis transport (see there) that
  keeps a Redis restart from ending the worker process.
- `patch_kombu_redis_client_reuse()`: another, that keeps kombu from building a new Redis
  client for every publish and acknowledgement.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from celery import Celery

    from app.settings import Settings

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")

# Seconds between AMQP heartbeats that RabbitMQ and the worker expect of each other. A
# peer silent for two intervals is dead: RabbitMQ requeues a vanished worker's unacked
# tasks and the worker reconnects from a half-open connection within about a minute.
# (Celery's default is 120 s; a worker killed outright is noticed at once anyway, from
# the TCP connection closing.)
AMQP_HEARTBEAT_SECONDS = 30

# Seconds to wait for the broker's TCP connection, and (Redis) for any one reply.
CONNECT_TIMEOUT_SECONDS = 5
REDIS_SOCKET_TIMEOUT_SECONDS = 30


def is_amqp(url: str) -> bool:
    """Whether `url` names a RabbitMQ broker (any of kombu's AMQP transports)."""
    return urlsplit(url).scheme.lower() in AMQP_SCHEMES


def broker_options(settings: Settings) -> dict[str, Any]:
    """Celery configuration for the broker in `settings.celery_broker_url`."""
    common: dict[str, Any] = {
        "broker_connection_retry": True,
        # Celery gives up after 100 reconnection attempts and the worker process exits;
        # a broker down for longer than that (a few minutes) must not end the workers.
        "broker_connection_max_retries": None,
        # A channel error (say a queue that is briefly unavailable while the broker
        # restarts) is retried like a connection loss instead of stopping the consumer.
        "broker_channel_error_retry": True,
        "broker_connection_timeout": CONNECT_TIMEOUT_SECONDS,
    }
    if is_amqp(settings.celery_broker_url):
        return common | {
            "broker_heartbeat": AMQP_HEARTBEAT_SECONDS,
            "broker_transport_options": {
                # Publisher confirms: apply_async returns only once RabbitMQ has taken the
                # message (for a persistent message on a durable queue, written it to
                # disk), and a refused publish raises instead of vanishing. So when the API
                # answers 202 the task survives a broker restart.
                "confirm_publish": True,
            },
            # Persistent messages on durable queues and exchanges (kombu's Queue and
            # Exchange are durable by default; the queues are declared in init_celery).
            # Said explicitly: a transient message is lost when RabbitMQ restarts.
            "task_default_delivery_mode": "persistent",
            # After a reconnection Celery lowers the prefetch count while tasks from before
            # it still run and raises it again later; found here: after a RabbitMQ restart
            # with a task in flight, that path left the worker holding deliveries it never
            # ran or acknowledged (3 unacked on its channel, nothing consumed) in about one
            # run in two of tests/test_broker.py. Without the reduction: none in the runs
            # since. Prefetch is small (multiplier 1) so over-fetching costs little.
            "worker_enable_prefetch_count_reduction": False,
            # With task_acks_late a task stays unacknowledged until it has run, so
            # RabbitMQ hands a killed worker's tasks to another consumer as soon as the
            # connection drops: no visibility timeout to wait out, unlike Redis.
        }
    return common | {
        "broker_transport_options": {
            # A task not acknowledged within this time is handed to another worker;
            # it must exceed the longest task and the longest retry countdown.
            "visibility_timeout": settings.task_visibility_timeout,
            # Look for such tasks every 10 s rather than kombu's default of every 100 s
            # (10 s x throttle 10), so one is redelivered soon after its timeout.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # Notice a dead or half-open Redis connection (a restart behind a proxy or a
            # failover) instead of waiting on it forever: redis-py pings an idle
            # connection before use, kombu checks its BRPOP and pub/sub connections, and
            # a synchronous command gives up after the socket timeout.
            "health_check_interval": 10,
            "socket_keepalive": True,
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_SECONDS,
        },
    }


def queue_depths(celery: Celery, names: Iterable[str] | None = None) -> dict[str, int]:
    """Tasks waiting (not yet delivered to a worker) in each queue named, by default each
    queue the app declares."""
    if names is None:
        names = [queue.name for queue in celery.conf.task_queues or ()]
    with celery.connection_for_read() as connection:
        if connection.transport.driver_type == "amqp":
            return {name: _amqp_depth(connection, name) for name in names}
        # Celery's Redis transport keeps each queue as a list named after it.
        client = connection.default_channel.client
        return {name: int(client.llen(name)) for name in names}


def purge_amqp_queues(url: str, names: Iterable[str]) -> None:
    """Empty these queues on the RabbitMQ vhost of `url` (what FLUSHDB does on Redis), for
    tests and benchmarks that must not count an earlier run's tasks. A queue nobody has
    declared yet holds nothing: RabbitMQ answers 404 and closes that channel."""
    import kombu

    with kombu.Connection(url, connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
        for name in names:
            channel = connection.channel()
            try:
                channel.queue_purge(name)
            except connection.channel_errors:
                continue
            channel.close()


def _amqp_depth(connection: Any, name: str) -> int:
    # A passive declare only asks; its message_count is the number of ready messages,
    # as LLEN is on Redis. On a queue nobody has declared yet RabbitMQ answers 404 and
    # closes the channel, hence a channel of its own for each question.
    channel = connection.channel()
    try:
        return int(channel.queue_declare(queue=name, passive=True).message_count)
    except connection.channel_errors:
        return 0
    finally:
        try:
            channel.close()
        except connection.channel_errors + connection.connection_errors:
            pass


_patched = False


def patch_kombu_redis_restore() -> None:
    """Make kombu's Redis transport raise a connection error, instead of AttributeError,
    when a channel whose connection Celery has already torn down needs Redis again, so
    that a Redis restart no longer ends the worker with
    `Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")`
    (or `... attribute 'client'`).

    Found in kombu 5.7.0 (the latest release when written; no release fixes it). When
    Redis goes away while a worker holds unacknowledged tasks and waits on BRPOP, Celery's
    consumer calls `connection.collect()` and then `connection.close()`
    (celery/worker/consumer/consumer.py, `on_connection_error_after_connected`):
    - `collect()` -> `Connection._do_close_self()`: closing the default channel fails at
      once in kombu/transport/redis.py `Channel.close()` -> `_brpop_read()` with a
      ConnectionError that `maybe_close_channel` swallows, so that channel stays open;
      `virtual.Transport.close_connection()` then closes the other channels newest first and
      stops at the first that raises (deleting a pidbox or gossip fanout queue on the dead
      server), so the default channel is never closed; finally
      `Connection._do_close_transport()` sets `transport.client = None`.
    - `close()` closes that default channel for real: kombu/transport/virtual/base.py
      `Channel.close()` -> `QoS.restore_unacked_once()` -> redis.py `QoS.restore_unacked()`
      -> `Channel.conn_or_acquire()` -> `_create_client()` -> `pool` -> `_get_pool()` ->
      `_connparams()`, which reads `self.connection.client.hostname` with `client` None.
    - The tasks that were running finish afterwards and their acknowledgements, queued on
      the event loop, reach redis.py `QoS.ack()` -> `_remove_from_indices()` ->
      `conn_or_acquire()` -> ... -> `_connparams()` on the now closed channel, whose
      `connection` is None.
    Neither AttributeError is a connection error, so each escapes Celery's recovery
    (`maybe_close_channel`, `ignore_errors`, `Message.ack_log_error`) and ends the process.

    The patched `_connparams` raises `redis.exceptions.ConnectionError` instead, which is
    what those paths expect from a lost broker: the restore and the acknowledgements are
    given up (an acknowledgement logs "Couldn't ack"). Nothing is lost by that: Redis still
    holds each of those tasks in kombu's `unacked` hash, and the visibility-timeout sweep
    (`QoS.restore_visible`, every `unacked_restore_interval`) puts them back on their queue
    for another run, which the idempotent store turns into a no-op; the outbox sweeper
    re-enqueues any accepted send still undecided. Idempotent; drop it once a kombu release
    no longer reaches `_connparams` on a closed channel.
    """
    global _patched
    if _patched:
        return
    import redis.exceptions
    from kombu.transport import redis as kombu_redis

    original = getattr(kombu_redis.Channel, "_connparams", None)
    if original is None:  # a kombu that reworked this path: nothing to patch
        return

    def _connparams(self: Any, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError(
                "the broker connection of this channel was closed (Redis went away)"
            )
        return original(self, asynchronous=asynchronous)

    _connparams.__wrapped__ = original  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams
    _patched = True


_reuse_patched = False


def patch_kombu_redis_client_reuse() -> None:
    """Let each kombu Redis channel keep one synchronous Redis client instead of building a
    new one for every command it sends outside BRPOP.

    kombu 5.7.0's `Channel.conn_or_acquire()` calls `_create_client()`, a new
    `redis.Redis(connection_pool=...)`, for every publish (`_put`), every delivery's
    bookkeeping (`QoS.append`) and every acknowledgement (`QoS.ack`): three a task. redis-py
    8 copies its table of response callbacks into each new client, about 80 us of CPU
    (measured here, `redis.Redis(connection_pool=pool)` in a loop), which is more than the
    command it then sends. A client is only a front for the channel's connection pool, and
    redis-py clients are safe to share between threads (each command takes a connection
    from the pool), so one per channel does the same work. It is built again when the
    channel's pool is (kombu drops the pool when the channel closes), so a closed channel
    still reaches `_connparams` and fails as `patch_kombu_redis_restore` makes it. The
    asynchronous clients (BRPOP, pub/sub) are kombu's cached properties already.
    Idempotent; harmless once a kombu release caches the client itself."""
    global _reuse_patched
    if _reuse_patched:
        return
    from kombu.transport import redis as kombu_redis

    original = getattr(kombu_redis.Channel, "_create_client", None)
    if original is None:  # a kombu that reworked this path: nothing to patch
        return

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        pool = self.pool
        client = self.__dict__.get("_switchboard_client")
        if client is None or client.connection_pool is not pool:
            client = original(self)
            self.__dict__["_switchboard_client"] = client
        return client

    _create_client.__wrapped__ = original  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = _create_client
    _reuse_patched = True
