"""The beat schedule (UTC), built from the jobs in `schedules.jobs` and the policy.

Every entry sends the one task `switchboard.jobs.run` with the job's name. A job's
timing may come from the policy (the retention jobs' `[retention] soft_delete_at` and
`purge_at`), so the schedule is a function of it: `init_celery` builds it from the loaded
policy. A copy that waited in the queue longer than the job's period is dropped unrun
(`expires`): after an outage the workers do not replay a pile of stale sweeps.
"""

from __future__ import annotations

from typing import Any

from app.policy import Policy
from schedules.jobs import JOBS

RUN_JOB_TASK = "switchboard.jobs.run"


def beat_schedule(policy: Policy) -> dict[str, dict[str, Any]]:
    """Celery's `beat_schedule` for this policy: one entry per job, named after it."""
    entries: dict[str, dict[str, Any]] = {}
    for job in JOBS.values():
        timing = job.timing(policy)
        entries[job.name] = {
            "task": RUN_JOB_TASK,
            "schedule": timing.schedule,
            "args": (job.name,),
            "options": {"expires": max(5.0, timing.period.total_seconds())},
        }
    return entries
