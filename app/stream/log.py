"""Reading a user's event log for replay: what a reconnecting socket missed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.events import Event
from app.models import UserEvent

REPLAY_BATCH = 500


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """Where a socket starts: replay events after `after_seq`, or tell the client to
    resync over HTTP (its id is past the log's window, or from the future)."""

    after_seq: int
    resync: bool
    current_seq: int


class EventLog:
    """The stream's reads of the database, never more than `max_concurrent` at once, so
    that a reconnect storm queues here instead of taking every pooled connection from
    the API."""

    def __init__(self, sessions: sessionmaker[Session], max_concurrent: int = 5) -> None:
        self._sessions = sessions
        self._slots = threading.BoundedSemaphore(max_concurrent)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._slots, self._sessions() as session:
            yield session

    def plan(self, user_id: str, last_event_id: int | None, current_seq: int) -> ReplayPlan:
        """Where to start, given the user's sequence when they connected (`current_seq`).
        Whatever came after it is replayed next, so the plan needs no fresher figure."""
        if last_event_id is None or last_event_id == current_seq:
            return ReplayPlan(current_seq, False, current_seq)
        if last_event_id > current_seq:
            return ReplayPlan(current_seq, True, current_seq)
        with self.session() as session:
            oldest = session.scalar(
                select(func.min(UserEvent.seq)).where(UserEvent.user_id == user_id)
            )
        if oldest is None or oldest > last_event_id + 1:
            return ReplayPlan(current_seq, True, current_seq)
        return ReplayPlan(last_event_id, False, current_seq)

    def after(self, user_id: str, after_seq: int, up_to: int | None = None) -> Iterator[Event]:
        """Events after `after_seq` (up to `up_to` inclusive), in order, in batches."""
        while True:
            with self.session() as session:
                query = (
                    select(UserEvent.seq, UserEvent.type, UserEvent.payload)
                    .where(UserEvent.user_id == user_id, UserEvent.seq > after_seq)
                    .order_by(UserEvent.seq)
                    .limit(REPLAY_BATCH)
                )
                if up_to is not None:
                    query = query.where(UserEvent.seq <= up_to)
                rows = session.execute(query).all()
            for seq, type_, payload in rows:
                yield Event(user_id, seq, type_, payload)
            if len(rows) < REPLAY_BATCH:
                return
            after_seq = rows[-1][0]
