"""Running one periodic job once: the code beat's task and `switchboard jobs run` share.

A run takes a PostgreSQL advisory lock for its job (a second copy running at the same
moment skips) and claims the job's current slot in `job_state` (a copy arriving after
the first finished skips too), both inside the job's own transaction: a run that fails
leaves the slot unclaimed for the next copy or the next beat. A batched job (the
retention jobs) commits each batch in a transaction of its own (`JobContext.transaction`)
while this one holds the lock: a failure keeps the batches done (each is idempotent) and
leaves the slot for the next copy, which goes on from there.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db import after_commit
from app.models import JobState
from app.policy import Policy
from app.storage import ObjectStore
from monitoring.metrics import JOB_DURATION, JOB_RUNS
from schedules.jobs import JOBS, Job, JobContext

log = logging.getLogger(__name__)

# First key of the advisory locks the jobs take (the second is the job name's hash).
ADVISORY_LOCK_NAMESPACE = 0x5B0A


class UnknownJob(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class JobRun:
    job: str
    outcome: str  # "succeeded", "skipped_running" or "skipped_done"
    rows: int = 0
    duration_seconds: float = 0.0


def run_job(
    session: Session,
    policy: Policy,
    name: str,
    *,
    enqueue_send: Callable[[uuid.UUID], None],
    enqueue_broadcast: Callable[[uuid.UUID], None] | None = None,
    store: ObjectStore | None = None,
    now: datetime | None = None,
    force: bool = False,
) -> JobRun:
    """Run job `name` in the caller's transaction, now, unless another run holds it or
    (unless `force`) it already ran for the current slot. Errors propagate, and the
    caller's rollback keeps nothing of the run, its slot claim included."""
    job = JOBS.get(name)
    if job is None:
        raise UnknownJob(f"no job named {name!r}; known: {', '.join(sorted(JOBS))}")

    def context(moment: datetime) -> JobContext:
        return JobContext(session, policy, moment, enqueue_send, enqueue_broadcast, store)

    try:
        return _run(session, policy, job, now or datetime.now(UTC), force, context)
    except Exception:
        # Counted here, whichever caller ran it (beat's task, `switchboard jobs run`), so
        # that SwitchboardJobFailing sees a job that keeps raising; the caller rolls back.
        JOB_RUNS.labels(name, "failed").inc()
        raise


def _run(
    session: Session,
    policy: Policy,
    job: Job,
    now: datetime,
    force: bool,
    context: Callable[[datetime], JobContext],
) -> JobRun:
    name = job.name
    # The slot as the policy times the job (a daily job's: the day from its time).
    slot = job.slot_of(now, policy)
    started = time.perf_counter()
    locked = session.scalar(
        select(func.pg_try_advisory_xact_lock(ADVISORY_LOCK_NAMESPACE, func.hashtext(name)))
    )
    if not locked:
        JOB_RUNS.labels(name, "skipped_running").inc()
        return JobRun(name, "skipped_running")
    claim = insert(JobState).values(
        job=name, last_slot=slot, last_started_at=func.clock_timestamp()
    )
    claim = claim.on_conflict_do_update(
        index_elements=[JobState.job],
        set_={
            "last_slot": func.greatest(JobState.last_slot, claim.excluded.last_slot),
            "last_started_at": claim.excluded.last_started_at,
        },
        # Without `force`, only a later slot than the last one run may claim it.
        where=None if force else JobState.last_slot < claim.excluded.last_slot,
    )
    if session.execute(claim.returning(JobState.job)).first() is None:
        JOB_RUNS.labels(name, "skipped_done").inc()
        return JobRun(name, "skipped_done")
    rows = job.run(context(now))
    duration = time.perf_counter() - started
    session.execute(
        update(JobState)
        .where(JobState.job == name)
        .values(
            last_succeeded_at=func.clock_timestamp(),
            last_duration_seconds=duration,
            last_rows=rows,
        )
    )

    def record() -> None:
        JOB_RUNS.labels(name, "succeeded").inc()
        JOB_DURATION.labels(name).observe(duration)
        if rows:
            log.info("job %s touched %d rows in %.3fs", name, rows, duration)

    after_commit(session, record)
    return JobRun(name, "succeeded", rows, duration)


@dataclass(frozen=True, slots=True)
class JobStatus:
    """How a job stands, for the metrics: its period under the policy and its last run."""

    job: str
    period_seconds: float
    last_succeeded_at: datetime | None
    last_rows: int | None
    last_duration_seconds: float | None


def job_statuses(session: Session, policy: Policy) -> list[JobStatus]:
    """Every job's status (one query over `job_state`), in `JOBS` order."""
    states = {state.job: state for state in session.scalars(select(JobState))}
    statuses = []
    for job in JOBS.values():
        state = states.get(job.name)
        statuses.append(
            JobStatus(
                job.name,
                job.timing(policy).period.total_seconds(),
                state.last_succeeded_at if state else None,
                state.last_rows if state else None,
                state.last_duration_seconds if state else None,
            )
        )
    return statuses
