"""The periodic jobs: plain functions over a session, named and scheduled here.

Beat sends `switchboard.jobs.run(name)` on each job's schedule; the worker task and
`switchboard jobs run NAME` both call `schedules.runner.run_job`, which makes a
second beat (or an operator's manual run beside a running beat) harmless.
Nothing here imports Celery's app or the workers: they import this.

A job's timing may come from the policy (`daily_at`): the retention jobs run daily at the
policy's `[retention] soft_delete_at` / `purge_at` (UTC), or hourly where it names none.
A daily job's slot is the day starting at its time, so a run sent at 01:00 and a late
copy at 00:30 the next day count for the same slot, and the next day's 01:00 runs.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from celery.schedules import crontab, schedule
from sqlalchemy.orm import Session

from app.events import PUBLISHER_KEY
from app.policy import Policy
from app.services.attachments import OBJECT_REMOVER_KEY, clean_up_batch
from app.services.broadcasts import redispatch_stale_broadcasts, reset_broadcast_quotas
from app.services.event_log import prune_event_log
from app.services.retention import purge_deleted, soft_delete_expired
from app.services.sends import redispatch_stale_sends
from app.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobContext:
    session: Session
    policy: Policy
    now: datetime
    # Enqueues a send's task after commit; given by the caller so jobs stay free of Celery.
    enqueue_send: Callable[[uuid.UUID], None]
    # Likewise a broadcast's fan-out; None where the caller cannot enqueue broadcasts.
    enqueue_broadcast: Callable[[uuid.UUID], None] | None = None
    # The attachments' object store; None where no bucket is configured.
    store: ObjectStore | None = None

    def transaction(self) -> AbstractContextManager[Session]:
        """A short transaction of its own, committed when the block ends (events
        announced after that commit): a batched job commits each bounded batch, so no
        row lock outlives its batch. `session` is the run's own transaction: it holds the
        job's advisory lock and slot claim until the whole run ends."""
        return _own_transaction(self.session)


_CARRIED_OVER = frozenset({PUBLISHER_KEY, OBJECT_REMOVER_KEY})


@contextmanager
def _own_transaction(session: Session) -> Iterator[Session]:
    # The event publisher rides in session.info (app/db.py); the run's pending after-commit
    # callbacks must not, so only the publisher is carried over.
    info = {key: value for key, value in session.info.items() if key in _CARRIED_OVER}
    with (
        Session(bind=session.get_bind(), info=info, expire_on_commit=False) as own,
        own.begin(),
    ):
        yield own


# A copy that starts this much before its slot (the worker's clock a little behind the
# beat's) still counts for the slot it was sent for; at most 1% of the period.
SLOT_EARLY_TOLERANCE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Timing:
    """When a job runs under a policy: beat's schedule and the slots runs are counted in."""

    schedule: schedule
    period: timedelta
    # Slots start this long after midnight UTC (a daily job's: its time of day).
    offset: timedelta = timedelta(0)

    def slot_of(self, moment: datetime) -> datetime:
        step = self.period.total_seconds()
        early = min(SLOT_EARLY_TOLERANCE.total_seconds(), step / 100)
        offset = self.offset.total_seconds()
        start = ((moment.timestamp() + early - offset) // step) * step + offset
        return datetime.fromtimestamp(start, UTC)


def daily_timing(at: str) -> Timing:
    """A daily job at UTC "HH:MM": its slot is the day starting at that time."""
    hours, minutes = (int(part) for part in at.split(":"))
    return Timing(
        crontab(minute=minutes, hour=hours),
        timedelta(days=1),
        timedelta(hours=hours, minutes=minutes),
    )


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    description: str
    schedule: schedule
    # Runs are counted per slot of this length (UTC, from the epoch): one run per slot,
    # however many beats send the job.
    period: timedelta
    run: Callable[[JobContext], int]  # returns the rows it touched
    # The policy's UTC "HH:MM" for a daily job; where it gives None (or is None), the job
    # keeps `schedule` and `period`.
    daily_at: Callable[[Policy], str | None] | None = None
    # What its rows are, for `switchboard jobs run`.
    touches: str = ""

    def timing(self, policy: Policy | None = None) -> Timing:
        at = None if self.daily_at is None or policy is None else self.daily_at(policy)
        return Timing(self.schedule, self.period) if at is None else daily_timing(at)

    def slot_of(self, moment: datetime, policy: Policy | None = None) -> datetime:
        return self.timing(policy).slot_of(moment)


# A run of a batched job stops after this many batches or this long, within Celery's
# task time limit (120 s); what is left waits for the next run (or `switchboard jobs run`).
MAX_BATCHES_PER_RUN = 250
RUN_TIME_BUDGET_SECONDS = 60.0


def _in_batches(context: JobContext, name: str, batch: Callable[[Session], int]) -> int:
    """Run `batch` in transactions of its own until one touches nothing.

    A short batch does not mean the work is done: rows a concurrent run (or a send) held
    were skipped, and are free again once it commits. Nothing touched means nothing was
    claimable: what is left, if anything, belongs to a run that is touching it."""
    total, started = 0, time.monotonic()
    for _ in range(MAX_BATCHES_PER_RUN):
        with context.transaction() as session:
            done = batch(session)
        total += done
        if done == 0:
            return total
        if time.monotonic() - started > RUN_TIME_BUDGET_SECONDS:
            break
    log.warning("job %s stopped after %d rows with more to do; the next run goes on", name, total)
    return total


def _soft_delete_expired(context: JobContext) -> int:
    return _in_batches(
        context,
        "soft-delete-expired",
        lambda session: soft_delete_expired(session, context.now),
    )


def _purge_deleted(context: JobContext) -> int:
    return _in_batches(
        context,
        "purge-deleted",
        lambda session: purge_deleted(session, context.policy, context.now),
    )


def _prune_event_log(context: JobContext) -> int:
    return prune_event_log(context.session, context.policy, context.now)


def _redispatch_sends(context: JobContext) -> int:
    return redispatch_stale_sends(context.session, context.enqueue_send)


def _redispatch_broadcasts(context: JobContext) -> int:
    if context.enqueue_broadcast is None:
        # Claiming without enqueueing would only delay them; leave them to beat's run.
        return 0
    return redispatch_stale_broadcasts(context.session, context.enqueue_broadcast)


def _clean_attachments(context: JobContext) -> int:
    return _in_batches(
        context,
        "clean-attachments",
        lambda session: clean_up_batch(session, context.store, context.now),
    )


def _reset_broadcast_quotas(context: JobContext) -> int:
    return reset_broadcast_quotas(context.session, context.policy, context.now)


REDISPATCH_INTERVAL = timedelta(seconds=2)

JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job(
            "redispatch-sends",
            "Enqueue again every accepted send no worker has decided within 5 s "
            "(backing off), and reject those tried too often.",
            schedule(REDISPATCH_INTERVAL),
            REDISPATCH_INTERVAL,
            _redispatch_sends,
        ),
        Job(
            "redispatch-broadcasts",
            "Enqueue again every accepted broadcast whose fan-out made no progress within "
            "5 s (backing off), and reject those tried too often.",
            schedule(REDISPATCH_INTERVAL),
            REDISPATCH_INTERVAL,
            _redispatch_broadcasts,
            touches="broadcasts enqueued again or rejected",
        ),
        Job(
            "reset-broadcast-quotas",
            "Delete broadcast quota usage of periods that ended (quotas count per period, "
            "so a new period starts at reset_at whether or not this runs).",
            crontab(minute=7),
            timedelta(hours=1),
            _reset_broadcast_quotas,
            touches="quota usage rows of ended periods deleted",
        ),
        Job(
            "soft-delete-expired",
            "Soft-delete messages past their expiry (placeholder, message.deleted events, "
            "unread counts), in batches.",
            crontab(minute=23),
            timedelta(hours=1),
            _soft_delete_expired,
            daily_at=lambda policy: policy.soft_delete_daily_at,
            touches="messages soft-deleted",
        ),
        Job(
            "purge-deleted",
            "Delete messages soft-deleted more than purge_after_days ago, except those "
            "under a pending report, and scrub their events' content, in batches.",
            crontab(minute=43),
            timedelta(hours=1),
            _purge_deleted,
            daily_at=lambda policy: policy.purge_daily_at,
            touches="messages purged",
        ),
        Job(
            "clean-attachments",
            "Delete uploads not sent within 24 hours, and the objects of attachments that "
            "went with their message or failed their check (when the task for it was lost).",
            crontab(minute="*/15"),
            timedelta(minutes=15),
            _clean_attachments,
            touches="attachments expired, deleted from the store or forgotten",
        ),
        Job(
            "prune-event-log",
            "Delete stream events older than the event log's window.",
            crontab(minute=17),
            timedelta(hours=1),
            _prune_event_log,
        ),
    )
}
