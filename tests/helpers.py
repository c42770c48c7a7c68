"""Small helpers shared by the API tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select

from app.models import UserEvent

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll until `predicate` returns something truthy (a worker runs in another thread)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def events_of(app, user_id: str) -> list[UserEvent]:
    with app.extensions["switchboard.db"].sessions() as session:
        return list(
            session.scalars(
                select(UserEvent).where(UserEvent.user_id == user_id).order_by(UserEvent.seq)
            )
        )


def error_code(response) -> tuple[int, str | None]:
    body: Any = response.get_json(silent=True) or {}
    return response.status_code, (body.get("error") or {}).get("code")
