"""The beat schedule (UTC). Every job is idempotent and safe if two beats run at once."""

from __future__ import annotations

from typing import Any

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {}
