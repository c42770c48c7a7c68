"""The beat schedule (UTC), built from the jobs in `schedules.jobs`.

Every entry sends the one task `switchboard.jobs.run` with the job's name. A copy
that waited in the queue longer than the job's period is dropped unrun (`expires`):
after an outage the workers do not replay a pile of stale sweeps.
"""

from __future__ import annotations

from typing import Any

from schedules.jobs import JOBS

RUN_JOB_TASK = "switchboard.jobs.run"

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    job.name: {
        "task": RUN_JOB_TASK,
        "schedule": job.schedule,
        "args": (job.name,),
        "options": {"expires": max(5.0, job.period.total_seconds())},
    }
    for job in JOBS.values()
}
