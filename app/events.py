"""The per-user event log and its live announcement.

`append_events` writes one row per recipient into `user_events`, in the caller's
transaction, with a per-user sequence taken from `users.last_event_seq` under a
row lock. The lock is held until commit, so a user's sequence numbers commit in
order: a reader that has seen N and reads again later finds N+1 next, never a
gap that fills in behind it. After commit the events are announced on Redis
pub/sub for the socket hubs; if that announcement fails, the log still has them
and a reconnecting client replays them.

Channels: an event for one user is announced on that user's channel
(`user_channel`), which only the web processes holding a socket of that user
subscribe to; a broadcast chunk is one batch announcement on the shared
`events_channel()`, which every web process reads (see app/stream/hub.py).
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
from app.statements import DriverStatement
from monitoring.metrics import EVENT_PUBLISH_FAILURES, EVENTS_APPENDED

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "switchboard:events"


def events_channel(redis_db: int) -> str:
    """The shared channel of the deployment whose Redis database is `redis_db`. Redis
    pub/sub ignores database numbers (a channel is server-wide), so without the number
    two deployments, or two test runs, on one Redis server would hear each other."""
    return f"{EVENTS_CHANNEL}:db{redis_db}"


def redis_db_of(client: redis.Redis) -> int:
    return int(client.connection_pool.connection_kwargs.get("db", 0))


def user_channel(user_id: str, channel: str) -> str:
    """The channel of one user's direct events: `<shared channel>:u:<user id>`."""
    return f"{channel}:u:{user_id}"


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
    """Announces committed events: each event on its user's channel, a broadcast chunk's
    batch on the shared channel. Either way one round trip per call."""

    def __init__(self, client: redis.Redis, channel: str | None = None) -> None:
        self._client = client
        self._channel = channel or events_channel(redis_db_of(client))

    def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        try:
            # One pipeline, one round trip, however many events and users.
            pipeline = self._client.pipeline(transaction=False)
            channel = self._channel
            for event in events:
                pipeline.publish(user_channel(event.user_id, channel), encode_announcement(event))
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


# Many events for many users in one statement (a batch of stored sends): lock the users in
# id order (the rule of _NEXT_SEQUENCES, so batches and single appends never wait on each
# other in opposite orders), bump each one's sequence once by the number of events they
# get, and insert the rows numbered in the order given.
#
# The groups come as one JSON document, `[{"type", "data", "users": [...]}, ...]`: psycopg
# dumps a text[] of JSON payloads element by element in Python, escaping every quote
# (about 23 us an event, measured: 274 us for a typical batch's twelve), where
# `json.dumps` of the whole batch is one C call, and each group's data is written once
# however many recipients share it.
_APPEND_GROUPS = text(
    """
    WITH g AS (
        SELECT g.grp, g.ord FROM json_array_elements(CAST(:groups AS json))
               WITH ORDINALITY AS g(grp, ord)
    ), e AS (
        SELECT u.user_id, g.grp->>'type' AS type, g.grp->'data' AS payload, g.ord
        FROM g CROSS JOIN LATERAL json_array_elements_text(g.grp->'users') AS u(user_id)
    ), wanted AS (
        SELECT user_id AS id, count(*) AS n FROM e GROUP BY user_id
    ), bumped AS (
        UPDATE users SET last_event_seq = users.last_event_seq + wanted.n
        FROM (SELECT id FROM users WHERE id IN (SELECT id FROM wanted) ORDER BY id FOR UPDATE)
             AS locked
        JOIN wanted ON wanted.id = locked.id
        WHERE users.id = locked.id
        RETURNING users.id, users.last_event_seq - wanted.n AS before
    )
    INSERT INTO user_events (user_id, seq, type, payload)
    SELECT e.user_id, bumped.before + row_number() OVER (PARTITION BY e.user_id ORDER BY e.ord),
           e.type, CAST(e.payload AS jsonb)
    FROM e JOIN bumped ON bumped.id = e.user_id
    RETURNING user_id, seq
    """
)


# Run by the driver (app/statements.py): it is on every batch of stored sends.
_APPEND_GROUPS_ON_DRIVER = DriverStatement(_APPEND_GROUPS, label="append event groups")


@dataclass(frozen=True, slots=True)
class EventGroup:
    """One event of `type` and `data` for each of `recipients`."""

    recipients: Sequence[str]
    type: str
    data: dict[str, Any]


def append_event_groups(session: Session, groups: Sequence[EventGroup]) -> list[Event]:
    """Append every group's events in one statement whatever their number; a user's
    events get consecutive sequence numbers in the order of `groups`. Announced together
    after commit."""
    unknown = {group.type for group in groups} - EVENT_TYPES
    if unknown:
        raise ValueError(f"unknown event types {sorted(unknown)!r}")
    recipients_of = [sorted(set(group.recipients)) for group in groups]
    if not any(recipients_of):
        return []
    # A user appears at most once in a group, so the group's position orders their events.
    document = json.dumps(
        [
            {"type": group.type, "data": group.data, "users": user_ids}
            for group, user_ids in zip(groups, recipients_of, strict=True)
            if user_ids
        ],
        separators=(",", ":"),
        default=str,
    )
    seqs: dict[str, list[int]] = {}
    for user_id, seq in _APPEND_GROUPS_ON_DRIVER.rows(session.connection(), {"groups": document}):
        seqs.setdefault(user_id, []).append(seq)
    for numbers in seqs.values():
        numbers.sort(reverse=True)  # popped lowest first, in the order of `groups`
    events: list[Event] = []
    for group, user_ids in zip(groups, recipients_of, strict=True):
        appended = [
            Event(user_id, seqs[user_id].pop(), group.type, group.data)
            for user_id in user_ids
            if seqs.get(user_id)  # a user deleted since has nobody to tell
        ]
        events.extend(appended)
        EVENTS_APPENDED.labels(group.type).inc(len(appended))
    publisher: Publisher | None = session.info.get(PUBLISHER_KEY)
    if publisher is not None and events:
        after_commit(session, lambda: publisher.publish(events))
    return events


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
