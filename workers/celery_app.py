"""The Celery app, created unbound and configured by `init_celery` in the app factory,
and the one task base class every task uses.

The base class runs each task inside the Flask app context and one database
transaction (committed when the task returns, rolled back when it raises),
retries retryable errors with exponential backoff and full jitter, fails
permanent ones at once, and records metrics. Tasks take ids, never ORM objects.
"""

from __future__ import annotations

import logging
import random
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from celery import Celery, Task
from celery.exceptions import Retry
from kombu import Queue
from sqlalchemy.orm import Session

from app.db import after_commit
from app.storage import StorageUnavailable
from monitoring.logging import request_id_var
from monitoring.metrics import TASK_LATENCY, TASKS
from workers.broker import (
    broker_options,
    is_amqp,
    patch_kombu_redis_client_reuse,
    patch_kombu_redis_restore,
)

if TYPE_CHECKING:
    from flask import Flask

    from app.settings import Settings

log = logging.getLogger(__name__)
_task_session: ContextVar[Session | None] = ContextVar("task_session", default=None)

DIRECT_QUEUE = "direct"
BROADCAST_QUEUE = "broadcast"
DEFAULT_QUEUE = "default"
QUEUES = (DIRECT_QUEUE, BROADCAST_QUEUE, DEFAULT_QUEUE)


class RetryableError(Exception):
    """A transient failure (a lost connection, a lock timeout): try again later."""


class PermanentError(Exception):
    """The task can never succeed with these arguments: do not retry."""


# Errors that say "try again" rather than "this is wrong": connection losses,
# serialization failures and deadlocks, and races on unique keys that the retry resolves.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    RetryableError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.IntegrityError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    StorageUnavailable,
)


# What the broker client raises when the broker cannot be reached.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


def backoff_seconds(retries: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**retries)]."""
    return random.uniform(0, min(cap, base * (2**retries)))


class SwitchboardTask(Task):
    """Base class of every Switchboard task (use with `bind=True`)."""

    abstract = True
    max_retries = 8
    retry_backoff_base = 0.5
    retry_backoff_cap = 120.0  # stays well under the broker's visibility timeout
    ignore_result = True

    @property
    def session(self) -> Session:
        """The session of the running task's transaction."""
        current = _task_session.get()
        if current is None:
            raise RuntimeError("task.session is only available while the task runs")
        return current

    def apply_async(self, args=None, kwargs=None, **options):  # type: ignore[override]
        request_id = request_id_var.get()
        if request_id:
            options.setdefault("headers", {}).setdefault("request_id", request_id)
        return super().apply_async(args, kwargs, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flask_app: Flask = self.app.flask_app  # type: ignore[attr-defined]
        request_id = getattr(self.request, "request_id", None) or self.request.id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            with flask_app.app_context():
                return self._run_in_transaction(flask_app, args, kwargs)
        finally:
            TASK_LATENCY.labels(self.name).observe(time.perf_counter() - started)
            request_id_var.reset(token)

    def _run_in_transaction(self, flask_app: Flask, args: tuple, kwargs: dict) -> Any:
        database = flask_app.extensions["switchboard.db"]
        try:
            with database.transaction() as session:
                # A context variable, not an attribute: one task instance serves
                # every thread of a threads pool at once.
                token = _task_session.set(session)
                try:
                    result = self.run(*args, **kwargs)
                finally:
                    _task_session.reset(token)
        except Retry:
            TASKS.labels(self.name, "retried").inc()
            raise
        except PermanentError as exc:
            TASKS.labels(self.name, "failed").inc()
            log.exception("task %s failed permanently", self.name)
            self._record_permanent_failure(database, args, kwargs, exc)
            raise
        except RETRYABLE_ERRORS as exc:
            if self.request.retries >= self.max_retries:
                TASKS.labels(self.name, "failed").inc()
                log.error(
                    "task %s gave up after %d retries: %r", self.name, self.request.retries, exc
                )
                raise
            countdown = backoff_seconds(
                self.request.retries, base=self.retry_backoff_base, cap=self.retry_backoff_cap
            )
            log.warning(
                "task %s hit a transient error, retry %d in %.2fs: %r",
                self.name,
                self.request.retries + 1,
                countdown,
                exc,
            )
            TASKS.labels(self.name, "retried").inc()
            raise self.retry(exc=exc, countdown=countdown) from exc
        except Exception as exc:
            # Not a transient error: running it again with the same arguments fails again.
            TASKS.labels(self.name, "failed").inc()
            log.exception("task %s failed", self.name)
            self._record_permanent_failure(database, args, kwargs, exc)
            raise
        TASKS.labels(self.name, "succeeded").inc()
        return result

    def on_permanent_failure(self, session: Session, args: tuple, kwargs: dict) -> None:
        """Record, in a transaction of its own, that this run can never succeed (a send
        becomes `rejected`, never silently dropped). Subclasses override it."""

    def _record_permanent_failure(
        self, database: Any, args: tuple, kwargs: dict, exc: BaseException
    ) -> None:
        try:
            with database.transaction() as session:
                self.on_permanent_failure(session, args, kwargs)
        except RETRYABLE_ERRORS as record_exc:
            # The database is unreachable too; what this task was for stays pending
            # where its owner's sweeper finds it again (for sends: still `queued`).
            log.error("task %s could not record its failure (%r): %r", self.name, exc, record_exc)


celery = Celery("switchboard", task_cls=SwitchboardTask, set_as_current=False)


def init_celery(flask_app: Flask, settings: Settings) -> Celery:
    """Configure the Celery app from the settings and bind it to `flask_app`."""
    celery.conf.update(
        broker_url=settings.celery_broker_url,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=min(120, settings.task_visibility_timeout // 2),
        task_time_limit=min(150, settings.task_visibility_timeout - 30),
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[Queue(name) for name in QUEUES],
        task_routes={
            "switchboard.direct.*": {"queue": DIRECT_QUEUE},
            "switchboard.broadcast.*": {"queue": BROADCAST_QUEUE},
        },
        timezone="UTC",
        enable_utc=True,
        worker_hijack_root_logger=False,
    )
    quiet_task_lines(not settings.task_log_lines)
    # Transport-specific: Redis's visibility timeout, RabbitMQ's confirms and heartbeats.
    celery.conf.update(**broker_options(settings))
    patch_kombu_redis_restore()
    patch_kombu_redis_client_reuse()
    from schedules import beat_schedule

    celery.conf.beat_schedule = beat_schedule(flask_app.extensions["switchboard.policy"])
    celery.flask_app = flask_app  # type: ignore[attr-defined]
    flask_app.extensions["celery"] = celery
    # Importing registers the tasks with the app.
    import workers.tasks

    workers.tasks.configure_send_batches(
        window_ms=settings.send_batch_window_ms,
        max_batch=settings.send_batch_max,
        declare_queue=is_amqp(settings.celery_broker_url),
    )
    return celery


# Celery's loggers of the per-task INFO lines: "Task X[id] received" and "... succeeded in".
TASK_LINE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def quiet_task_lines(quiet: bool) -> None:
    """Drop (or keep) the per-task INFO lines; set before the worker starts, which is
    when Celery asks whether they are on. Warnings and errors (a failed task, a retry)
    are logged either way."""
    for name in TASK_LINE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)


def enqueue_after_commit(session: Session, task: Task, *args: Any, **options: Any) -> None:
    """Send `task` once the session's transaction has committed, never before."""
    after_commit(session, lambda: task.apply_async(args=args, **options))
