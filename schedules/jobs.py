"""The periodic jobs: plain functions over a session, named and scheduled here.

Beat sends `switchboard.jobs.run(name)` on each job's schedule; the worker task and
`switchboard jobs run NAME` both call `schedules.runner.run_job`, which makes a
second beat (or an operator's manual run beside a running beat) harmless.
Nothing here imports Celery's app or the workers: they import this.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from celery.schedules import crontab, schedule
from sqlalchemy.orm import Session

from app.policy import Policy
from app.services.event_log import prune_event_log
from app.services.sends import redispatch_stale_sends


@dataclass(frozen=True, slots=True)
class JobContext:
    session: Session
    policy: Policy
    now: datetime
    # Enqueues a send's task after commit; given by the caller so jobs stay free of Celery.
    enqueue_send: Callable[[uuid.UUID], None]


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    description: str
    schedule: schedule
    # Runs are counted per slot of this length (UTC, from the epoch): one run per slot,
    # however many beats send the job.
    period: timedelta
    run: Callable[[JobContext], int]  # returns the rows it touched

    def slot_of(self, moment: datetime) -> datetime:
        step = self.period.total_seconds()
        return datetime.fromtimestamp((moment.timestamp() // step) * step, UTC)


def _prune_event_log(context: JobContext) -> int:
    return prune_event_log(context.session, context.policy, context.now)


def _redispatch_sends(context: JobContext) -> int:
    return redispatch_stale_sends(context.session, context.enqueue_send)


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
            "prune-event-log",
            "Delete stream events older than the event log's window.",
            crontab(minute=17),
            timedelta(hours=1),
            _prune_event_log,
        ),
    )
}
