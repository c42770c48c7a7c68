"""Reading a user's event log for replay: what a reconnecting socket missed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.events import Event
from app.models import User, UserEvent

REPLAY_BATCH = 500


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """Where a socket starts: replay events after `after_seq`, or tell the client to
    resync over HTTP (its id is past the log's window, or from the future)."""

    after_seq: int
    resync: bool
    current_seq: int


class EventLog:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def current_seq(self, user_id: str) -> int:
        with self._sessions() as session:
            return session.scalar(select(User.last_event_seq).where(User.id == user_id)) or 0

    def plan(self, user_id: str, last_event_id: int | None) -> ReplayPlan:
        with self._sessions() as session:
            current = session.scalar(select(User.last_event_seq).where(User.id == user_id)) or 0
            if last_event_id is None:
                return ReplayPlan(current, False, current)
            if last_event_id > current:
                return ReplayPlan(current, True, current)
            if last_event_id == current:
                return ReplayPlan(current, False, current)
            oldest = session.scalar(
                select(func.min(UserEvent.seq)).where(UserEvent.user_id == user_id)
            )
            if oldest is None or oldest > last_event_id + 1:
                return ReplayPlan(current, True, current)
            return ReplayPlan(last_event_id, False, current)

    def after(self, user_id: str, after_seq: int, up_to: int | None = None) -> Iterator[Event]:
        """Events after `after_seq` (up to `up_to` inclusive), in order, in batches."""
        while True:
            with self._sessions() as session:
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
