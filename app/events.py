"""The per-user event log and its live announcement.

`append_events` writes one row per recipient into `user_events`, in the caller's
transaction, with a per-user sequence taken from `users.last_event_seq` under a
row lock. The lock is held until commit, so a user's sequence numbers commit in
order: a reader that has seen N and reads again later finds N+1 next, never a
gap that fills in behind it. After commit the events are announced on Redis
pub/sub for the socket hubs; if that announcement fails, the log still has them
and a reconnecting client replays them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import redis
from sqlalchemy import bindparam, insert, text
from sqlalchemy.orm import Session

from app.db import after_commit
from app.models import UserEvent
from monitoring.metrics import EVENT_PUBLISH_FAILURES, EVENTS_APPENDED

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "switchboard:events"
PUBLISHER_KEY = "switchboard.publisher"

EVENT_TYPES = frozenset(
    {
        "message.created",
        "message.deleted",
        "message.rejected",
        "conversation.read",
        "broadcast.created",
        "typing",
        "resync.required",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    user_id: str
    seq: int
    type: str
    data: dict[str, Any]

    def frame(self) -> dict[str, Any]:
        """The stream frame: `{id, type, data}`."""
        return {"id": self.seq, "type": self.type, "data": self.data}


class Publisher(Protocol):
    def publish(self, events: Sequence[Event]) -> None: ...


class RedisPublisher:
    """Announces committed events on one Redis channel that every web process subscribes to."""

    def __init__(self, client: redis.Redis, channel: str = EVENTS_CHANNEL) -> None:
        self._client = client
        self._channel = channel

    def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        try:
            pipeline = self._client.pipeline(transaction=False)
            for event in events:
                pipeline.publish(self._channel, encode_announcement(event))
            pipeline.execute()
        except redis.RedisError as exc:
            # The events are committed in the log; sockets catch up on reconnect.
            EVENT_PUBLISH_FAILURES.inc(len(events))
            log.warning("could not announce %d events on Redis: %r", len(events), exc)


def encode_announcement(event: Event) -> str:
    return json.dumps(
        {"user_id": event.user_id, "id": event.seq, "type": event.type, "data": event.data},
        separators=(",", ":"),
        default=str,
    )


# Lock the recipients' rows in id order (two transactions never wait on each other in
# opposite orders), then bump each one's sequence.
_NEXT_SEQUENCES = text(
    """
    UPDATE users SET last_event_seq = users.last_event_seq + 1
    FROM (SELECT id FROM users WHERE id = ANY(:ids) ORDER BY id FOR UPDATE) AS locked
    WHERE users.id = locked.id
    RETURNING users.id, users.last_event_seq
    """
).bindparams(bindparam("ids"))


def append_events(
    session: Session, recipients: Iterable[str], type: str, data: dict[str, Any]
) -> list[Event]:
    """Append one event of `type` to each recipient's log; announce it after commit."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    user_ids = sorted(set(recipients))
    if not user_ids:
        return []
    sequences = {
        user_id: seq for user_id, seq in session.execute(_NEXT_SEQUENCES, {"ids": user_ids})
    }
    events = [
        Event(user_id, sequences[user_id], type, data)
        for user_id in user_ids
        if user_id in sequences
    ]
    session.execute(
        insert(UserEvent),
        [{"user_id": e.user_id, "seq": e.seq, "type": e.type, "payload": e.data} for e in events],
    )
    EVENTS_APPENDED.labels(type).inc(len(events))
    publisher: Publisher | None = session.info.get(PUBLISHER_KEY)
    if publisher is not None:
        after_commit(session, lambda: publisher.publish(events))
    return events


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
