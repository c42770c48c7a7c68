"""Prometheus metrics for every part of Switchboard.

Under gunicorn with several workers (and Celery's prefork pool) each process
keeps its own values; with `PROMETHEUS_MULTIPROC_DIR` set, prometheus-client
writes them to files there and `render_metrics` aggregates all processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "switchboard_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "switchboard_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
RATE_LIMITED = Counter(
    "switchboard_rate_limited_total",
    "Refused by the per-user rate limits, by surface: api, action:<name> (429s), stream "
    "(connects closed), stream_frame (client frames dropped).",
    ["surface"],
)
TASKS = Counter(
    "switchboard_tasks_total",
    "Celery task runs by outcome: succeeded, retried, failed (permanent or out of retries).",
    ["task", "outcome"],
)
TASK_LATENCY = Histogram(
    "switchboard_task_duration_seconds",
    "Time a task run took, by task.",
    ["task"],
    buckets=LATENCY_BUCKETS,
)
EVENTS_APPENDED = Counter(
    "switchboard_events_appended_total",
    "Events written to users' event logs, by type.",
    ["type"],
)
EVENT_PUBLISH_FAILURES = Counter(
    "switchboard_event_publish_failures_total",
    "Committed events that could not be announced on Redis (clients replay them from the log).",
)
MESSAGES = Counter(
    "switchboard_messages_total",
    "Direct messages decided by the worker: stored, rejected (by reason) or duplicate.",
    ["outcome"],
)
SOCKETS_OPEN = Gauge(
    "switchboard_sockets_open",
    "Open WebSocket streams.",
    multiprocess_mode="livesum",
)
EVENTS_DELIVERED = Counter(
    "switchboard_events_delivered_total",
    "Frames written to sockets, by event type (replayed ones included).",
    ["type"],
)
EVENTS_REPLAYED = Counter(
    "switchboard_events_replayed_total",
    "Events read back from the log for a socket that had missed them.",
)
STREAMS_REFUSED_FULL = Counter(
    "switchboard_streams_refused_full_total",
    "Stream connects closed with 1013 because the web process held "
    "SWITCHBOARD_STREAM_MAX_SOCKETS sockets already.",
)
SLOW_CONSUMER_DISCONNECTS = Counter(
    "switchboard_slow_consumer_disconnects_total",
    "Sockets closed because their client did not read fast enough.",
)
STREAM_CLOSES = Counter(
    "switchboard_stream_closes_total",
    "Sockets closed by the server, by close code.",
    ["code"],
)
HUB_SUBSCRIPTIONS = Counter(
    "switchboard_hub_subscriptions_total",
    "Times a web process (re)subscribed to the Redis events channel.",
)
DELIVERY_LATENCY = Histogram(
    "switchboard_delivery_latency_seconds",
    "Time from the API accepting a send to the socket write of its message.created frame.",
    buckets=LATENCY_BUCKETS,
)

GC_PAUSE = Histogram(
    "switchboard_gc_pause_seconds",
    "Time a web process's garbage collector ran, by generation (2 is a full collection;"
    " every socket of the process waits for it).",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
GC_HOLD_OVERRUNS = Counter(
    "switchboard_gc_hold_overruns_total",
    "Times a web process's fan-outs ran on so long without a quiet moment that a full"
    " collection was let through during one (see app/gc_pauses.py).",
)

SENDS_REDISPATCHED = Counter(
    "switchboard_sends_redispatched_total",
    "Accepted sends the sweeper found undecided: enqueued again, or rejected after too many"
    " tries (gave_up).",
    ["outcome"],
)
SEND_ENQUEUE_FAILURES = Counter(
    "switchboard_send_enqueue_failures_total",
    "Committed sends whose task could not be handed to the broker (the sweeper enqueues them"
    " again).",
)
SEND_BATCH_SIZE = Histogram(
    "switchboard_send_batch_size",
    "Sends per store_sends task enqueued (batches grow with load; workers/send_batches.py).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
JOB_RUNS = Counter(
    "switchboard_job_runs_total",
    "Periodic job runs by outcome: succeeded, skipped_running (another copy held it),"
    " skipped_done (this slot already ran), failed.",
    ["job_name", "outcome"],
)
JOB_DURATION = Histogram(
    "switchboard_job_duration_seconds",
    "Time a periodic job's successful run took.",
    ["job_name"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0),
)

ATTACHMENT_UPLOADS = Counter(
    "switchboard_attachment_uploads_total",
    "Attachment uploads requested (presigned POSTs handed out).",
)
ATTACHMENT_CHECKS = Counter(
    "switchboard_attachment_checks_total",
    "Attachments the worker checked: ready, or rejected (not an allowed image, too big...).",
    ["outcome"],
)
ATTACHMENT_OBJECTS_DELETED = Counter(
    "switchboard_attachment_objects_deleted_total",
    "Attachments whose objects (image and thumbnail) were deleted from the store.",
)
REPORTS_FILED = Counter(
    "switchboard_reports_filed_total",
    "Reports of messages filed (a repeat of an existing report not counted), by reason.",
    ["reason"],
)
REPORTS_RESOLVED = Counter(
    "switchboard_reports_resolved_total",
    "Reports resolved by a moderator, by action: remove (every pending report of the message)"
    " or dismiss.",
    ["action"],
)

BROADCASTS = Counter(
    "switchboard_broadcasts_total",
    "Broadcast requests by outcome (accepted, refused) and reason (the refusal's code;"
    " 'new' or 'repeat' when accepted), and fan-outs finished (stored) or rejected.",
    ["outcome", "reason"],
)
BROADCAST_CHUNK_DURATION = Histogram(
    "switchboard_broadcast_chunk_duration_seconds",
    "Time to write one fan-out chunk (recipients' inbox rows and events) in its transaction.",
    buckets=LATENCY_BUCKETS,
)
BROADCAST_RECIPIENTS = Counter(
    "switchboard_broadcast_recipients_total",
    "Recipients a broadcast reached (inbox row and event written; never counted twice).",
)
BROADCASTS_REDISPATCHED = Counter(
    "switchboard_broadcasts_redispatched_total",
    "Queued broadcasts the sweeper found stalled: enqueued again, or rejected (gave_up).",
    ["outcome"],
)
BROADCAST_ENQUEUE_FAILURES = Counter(
    "switchboard_broadcast_enqueue_failures_total",
    "Fan-out tasks that could not be handed to the broker (the sweeper enqueues them again).",
)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class QueueDepthCollector(Collector):
    """Reads the Celery queues' lengths from the broker when Prometheus scrapes."""

    def __init__(self, read_depths: Callable[[], dict[str, int]]) -> None:
        self._read_depths = read_depths

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "switchboard_queue_depth", "Tasks waiting in each Celery queue.", labels=["queue"]
        )
        try:
            depths = self._read_depths()
        except Exception:
            depths = {}
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family


class BacklogCollector(Collector):
    """Reads, when Prometheus scrapes, how many items of a backlog wait and how long the
    oldest has waited. For accepted sends (`switchboard_sends_queued`): the figure that
    says workers are not keeping up, or not consuming at all, whatever the broker. For
    reports (`switchboard_reports_pending`, every tenant together: a per-tenant gauge
    would be one series per tenant): the moderation backlog."""

    def __init__(self, name: str, what: str, read: Callable[[], tuple[int, float]]) -> None:
        self._name, self._what, self._read = name, what, read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            count, oldest_age = self._read()
        except (SQLAlchemyError, OSError):
            # The database is down: readiness and the database's own alerts say so.
            return
        yield GaugeMetricFamily(self._name, f"{self._what} waiting.", value=count)
        yield GaugeMetricFamily(
            f"{self._name}_oldest_age_seconds",
            f"Seconds the oldest of the {self._what.lower()} has waited (0 when none wait).",
            value=oldest_age,
        )


def queued_sends_collector(read: Callable[[], tuple[int, float]]) -> BacklogCollector:
    return BacklogCollector(
        "switchboard_sends_queued", "Accepted sends not yet stored or rejected", read
    )


def queued_broadcasts_collector(read: Callable[[], tuple[int, float]]) -> BacklogCollector:
    # The fan-out lag: a broadcast stays queued from its 202 until its last chunk is written.
    return BacklogCollector(
        "switchboard_broadcasts_queued", "Accepted broadcasts not yet fanned out or rejected", read
    )


def pending_reports_collector(read: Callable[[], tuple[int, float]]) -> BacklogCollector:
    return BacklogCollector(
        "switchboard_reports_pending", "Reports of messages awaiting a moderator", read
    )


class JobStateCollector(Collector):
    """Reads, when Prometheus scrapes, how each periodic job last went (from `job_state`,
    so every beat, worker and `switchboard jobs run` counts, whichever process ran it):
    when it last succeeded, the rows it touched, how long it took, and its period (so an
    alert can say "not succeeded within twice its period" for hourly and daily jobs alike).

    `read` returns rows with `job`, `period_seconds`, `last_succeeded_at` (a datetime or
    None: never), `last_rows` and `last_duration_seconds`."""

    def __init__(self, read: Callable[[], Iterable[Any]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            statuses = list(self._read())
        except (SQLAlchemyError, OSError):
            # The database is down: readiness and the database's own alerts say so.
            return
        period = GaugeMetricFamily(
            "switchboard_job_period_seconds",
            "Seconds between a periodic job's scheduled runs (under the loaded policy).",
            labels=["job_name"],
        )
        succeeded = GaugeMetricFamily(
            "switchboard_job_last_success_timestamp_seconds",
            "Unix time a periodic job last succeeded (absent: never).",
            labels=["job_name"],
        )
        rows = GaugeMetricFamily(
            "switchboard_job_last_rows",
            "Rows a periodic job's last successful run touched.",
            labels=["job_name"],
        )
        duration = GaugeMetricFamily(
            "switchboard_job_last_duration_seconds",
            "Seconds a periodic job's last successful run took.",
            labels=["job_name"],
        )
        for status in statuses:
            period.add_metric([status.job], status.period_seconds)
            if status.last_succeeded_at is None:
                continue
            succeeded.add_metric([status.job], status.last_succeeded_at.timestamp())
            rows.add_metric([status.job], float(status.last_rows or 0))
            duration.add_metric([status.job], float(status.last_duration_seconds or 0.0))
        yield from (period, succeeded, rows, duration)


def build_registry(extra_collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """The registry `/metrics` renders: every process's values in multiprocess mode."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_DefaultRegistryProxy())
    for collector in extra_collectors:
        registry.register(collector)
    return registry


class _DefaultRegistryProxy(Collector):
    """Lets a per-app registry include the process-wide default metrics."""

    def collect(self) -> Iterable:
        return REGISTRY.collect()


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


__all__ = [
    "HTTP_LATENCY",
    "HTTP_REQUESTS",
    "TASKS",
    "TASK_LATENCY",
    "Gauge",
    "QueueDepthCollector",
    "build_registry",
    "render_metrics",
]
