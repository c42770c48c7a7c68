"""Sends accepted by the API but not yet decided by a worker.

The API writes no message; it records in Redis that a send with this id (and body
digest) was accepted, so that `GET /v1/messages/<id>` can answer "queued" and a
repeated client id with another body is a 409 even before the worker has run.
"""

from __future__ import annotations

import json
from typing import Any

import redis

PENDING_TTL_SECONDS = 7 * 24 * 3600
_KEY = "switchboard:pending-send:{}"


class PendingSends:
    def __init__(self, client: redis.Redis, ttl_seconds: int = PENDING_TTL_SECONDS) -> None:
        self._client = client
        self._ttl = ttl_seconds

    def claim(self, message_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """Record the send; returns the earlier record if one was already there."""
        key = _KEY.format(message_id)
        if self._client.set(key, json.dumps(record), nx=True, ex=self._ttl):
            return None
        earlier = self._client.get(key)
        return json.loads(earlier) if earlier else None

    def get(self, message_id: str) -> dict[str, Any] | None:
        raw = self._client.get(_KEY.format(message_id))
        return json.loads(raw) if raw else None

    def release(self, message_id: str) -> None:
        self._client.delete(_KEY.format(message_id))
