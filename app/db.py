"""Database engine, sessions and the after-commit hook.

Services take a `Session` and never commit on their own; the caller (a request
or a task) owns the transaction. Work that must only happen once the data is
durable (enqueueing a task, publishing an event) is registered with
`after_commit` and runs after a successful commit, and never after a rollback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, ExceptionContext, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_AFTER_COMMIT = "switchboard.after_commit"


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    pool_timeout: float = 5.0,
    isolation_level: str | None = None,
) -> Engine:
    """An engine with its own pool; `isolation_level="AUTOCOMMIT"` gives one whose
    connections run each statement on its own, set once when each connects."""
    options = {"isolation_level": isolation_level} if isolation_level else {}
    # No pre-ping: it costs a round trip on every checkout. After a database restart
    # the first statement on a stale connection fails and SQLAlchemy recycles that
    # engine's whole pool; the API answers that request with 503 and tasks retry. (A
    # `Database` recycles its other pool with it.)
    return create_engine(
        url,
        pool_size=pool_size,
        # No overflow: SQLAlchemy closes an overflow connection as soon as it is returned,
        # so a web process in a burst (gevent runs more requests at once than the pool
        # holds) opened and closed PostgreSQL connections all the time: at 400 sends/s,
        # 3-5 a second, each a backend started and its prepared statements lost. That
        # cost CPU just when the process was behind, so more requests waited and more
        # connections opened. Without overflow a burst waits for a pooled connection (up
        # to pool_timeout, then 503): the 202's p50 at 400/s fell from 42-67 ms to 5-9 in
        # most runs (README, Performance).
        # Connections open on first use and stay.
        max_overflow=0,
        # Waiting longer for a connection means the process is overloaded: the API
        # answers 503 with Retry-After rather than keeping the client waiting.
        pool_timeout=pool_timeout,
        pool_recycle=1800,
        **options,
    )


def pool_size_problem(concurrency: object, pool_size: int) -> str | None:
    """What is wrong with running `concurrency` tasks at once on pools of `pool_size`
    connections, or None. A running task holds a connection of each pool it uses, and the
    pools have no overflow (`make_engine`): the tasks beyond the pool would wait for one,
    then fail with a timeout and be retried, over and over."""
    if not isinstance(concurrency, int) or concurrency <= pool_size:
        return None  # Celery resolves "auto" after this check: not checked here
    return (
        f"SWITCHBOARD_DB_POOL_SIZE={pool_size} is below this worker's --concurrency "
        f"{concurrency}: each task running needs a database connection of its own; "
        f"set SWITCHBOARD_DB_POOL_SIZE to {concurrency} or more"
    )


class Database:
    """Owns the engine and the session factory of one process."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        pool_timeout: float = 5.0,
        info: dict | None = None,
    ) -> None:
        self.engine = make_engine(url, pool_size=pool_size, pool_timeout=pool_timeout)
        # `info` is copied into every session: how services reach process-wide helpers
        # (the event publisher) without importing Flask.
        self.sessions = sessionmaker(self.engine, expire_on_commit=False, info=info or {})
        # For requests that only read, or whose every write is one atomic statement
        # (the send): autocommit spares the BEGIN and COMMIT (or ROLLBACK) round trips.
        # A pool of its own, not `engine.execution_options(isolation_level=...)` over the
        # same pool, which switches each connection to autocommit at checkout and back at
        # return: ~65 us more CPU a request under gevent (a checkout, `SELECT 1` and
        # return, timed in a loop: 278 us against 213), once per send and per read.
        self.autocommit_engine = make_engine(
            url, pool_size=pool_size, pool_timeout=pool_timeout, isolation_level="AUTOCOMMIT"
        )
        self.read_sessions = sessionmaker(
            self.autocommit_engine, expire_on_commit=False, info=info or {}
        )
        # A disconnect on one pool (a database restart) recycles that pool; the other's
        # idle connections are as dead, so they go too: after a restart one request
        # fails, not one for each pool.
        event.listen(self.engine, "handle_error", _recycle_on_disconnect(self.autocommit_engine))
        event.listen(self.autocommit_engine, "handle_error", _recycle_on_disconnect(self.engine))

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    @property
    def engines(self) -> tuple[Engine, Engine]:
        """Both pools: transactions, and autocommit (for listeners and clean-up)."""
        return (self.engine, self.autocommit_engine)

    def dispose(self) -> None:
        for engine in self.engines:
            engine.dispose()


def _recycle_on_disconnect(other: Engine) -> Callable[[ExceptionContext], None]:
    def recycle(context: ExceptionContext) -> None:
        if context.is_disconnect:
            # Closes its idle connections and starts a new pool (SQLAlchemy's
            # `Engine.dispose`); connections in use finish and go with the old pool.
            other.dispose()

    return recycle


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's current transaction has committed."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    callbacks = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        callback()


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_commit(session: Session, previous_transaction: object) -> None:
    if not session.in_transaction():
        session.info.pop(_AFTER_COMMIT, None)
