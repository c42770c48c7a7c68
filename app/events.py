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


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One event of `type` and `data` for many users, each at their own sequence: what a
    broadcast chunk appends. Announced as ONE pub/sub message, not one per recipient."""

    type: str
    data: dict[str, Any]
    recipients: list[tuple[str, int]]  # (user id, seq), in user id order

    def events(self) -> list[Event]:
        return [Event(user_id, seq, self.type, self.data) for user_id, seq in self.recipients]


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

    def publish_batch(self, batch: EventBatch) -> None:
        if not batch.recipients:
            return
        try:
            self._client.publish(self._channel, encode_batch_announcement(batch))
        except redis.RedisError as exc:
            EVENT_PUBLISH_FAILURES.inc(len(batch.recipients))
            log.warning(
                "could not announce a batch of %d events on Redis: %r", len(batch.recipients), exc
            )


def encode_batch_announcement(batch: EventBatch) -> str:
    """`{type, data, recipients: [[user_id, seq], ...]}`: the hub tells it from a single
    event's announcement by `recipients`."""
    return json.dumps(
        {"type": batch.type, "data": batch.data, "recipients": batch.recipients},
        separators=(",", ":"),
        default=str,
    )


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


# Bulk path: the same locking rule as _NEXT_SEQUENCES (rows locked in id order, so
# batches and single appends never wait on each other in opposite orders), one statement
# for any number of users.
_BULK_EVENTS = text(
    """
    INSERT INTO user_events (user_id, seq, type, payload)
    SELECT id, seq, :type, CAST(:payload AS jsonb)
    FROM unnest(CAST(:ids AS text[]), CAST(:seqs AS bigint[])) AS e(id, seq)
    """
).bindparams(bindparam("ids"), bindparam("seqs"))


def append_event_batch(
    session: Session, recipients: Iterable[str], type: str, data: dict[str, Any]
) -> EventBatch:
    """Append one event of `type` to each recipient's log with two statements whatever
    their number (bump every sequence in id order, insert every row), and announce the
    whole batch as one pub/sub message after commit."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    user_ids = sorted(set(recipients))
    batch = EventBatch(type, data, [])
    if not user_ids:
        return batch
    bumped = sorted((row[0], row[1]) for row in session.execute(_NEXT_SEQUENCES, {"ids": user_ids}))
    batch.recipients.extend(bumped)
    session.execute(
        _BULK_EVENTS,
        {
            "type": type,
            "payload": json.dumps(data, default=str),
            "ids": [user_id for user_id, _ in bumped],
            "seqs": [seq for _, seq in bumped],
        },
    )
    EVENTS_APPENDED.labels(type).inc(len(bumped))
    publisher: Publisher | None = session.info.get(PUBLISHER_KEY)
    if publisher is not None:
        publish_batch = getattr(publisher, "publish_batch", None)
        if publish_batch is not None:
            after_commit(session, lambda: publish_batch(batch))
        else:
            # A publisher without batches (a test double): one announcement per event.
            after_commit(session, lambda: publisher.publish(batch.events()))
    return batch


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
