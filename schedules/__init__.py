"""The beat schedule (UTC). Every job is idempotent and safe if two beats run at once."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "prune-event-log": {
        "task": "switchboard.maintenance.prune_event_log",
        "schedule": crontab(minute=17),
    },
}
