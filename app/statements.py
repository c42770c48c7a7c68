"""Hot-path statements, built with SQLAlchemy once and run by the driver itself.

SQLAlchemy's execution of a cached, compiled statement (execution context, parameter
processing, result wrapping) costs about twice the client CPU of psycopg's own
execute of the same SQL: 0.09-0.12 ms against 0.045 ms for the send's pre-check
(`bench/statement_cost.py`). A send runs two statements in the web process and a
batch five in the worker, so on a path that costs about 5 ms in all, that is worth
a few percent. Statements on this path are therefore written with
SQLAlchemy (Core or `text()`), compiled here for the psycopg dialect, and executed
on the DBAPI connection under a SQLAlchemy `Connection`: the same connection, so the
same transaction (or autocommit), the same pool and the same error handling, since a
driver error is raised as SQLAlchemy's exception and a lost connection invalidates
the pool as SQLAlchemy would. Listeners of `before_cursor_execute` still see them.

Only for statements whose parameters need no SQLAlchemy bind processing: plain
strings, numbers, UUIDs, datetimes and lists of those, as psycopg adapts natively.
Results are psycopg's named tuples, so `row.column` reads as on a SQLAlchemy `Row`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, exc
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.sql.expression import Executable

_DIALECT = psycopg_dialect()


class DriverStatement:
    """One statement compiled once for psycopg; `rows`/`first`/`one`/`run` execute it."""

    __slots__ = ("_fixed", "_label", "sql")

    def __init__(self, statement: Executable, *, label: str) -> None:
        compiled = statement.compile(dialect=_DIALECT)  # type: ignore[attr-defined]
        if compiled.binds and any(
            bind.expanding or bind.type.bind_processor(_DIALECT) is not None
            for bind in compiled.binds.values()
        ):
            # Such a parameter would need SQLAlchemy at execution time.
            raise ValueError(f"{label}: a parameter needs SQLAlchemy's bind processing")
        self.sql = str(compiled)
        self._label = label
        # Values fixed when the statement was built (`.values(status="queued")`).
        self._fixed = {
            compiled.bind_names[bind]: bind.value
            for bind in compiled.binds.values()
            if not bind.required
        }

    def __repr__(self) -> str:
        return f"DriverStatement({self._label})"

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> list[NamedTuple]:
        """Every row of the result (none for a statement without RETURNING)."""
        return self._execute(connection, params, fetch=True)

    def first(self, connection: Connection, params: Mapping[str, Any]) -> NamedTuple | None:
        found = self.rows(connection, params)
        return found[0] if found else None

    def one(self, connection: Connection, params: Mapping[str, Any]) -> NamedTuple:
        found = self.rows(connection, params)
        if len(found) != 1:
            raise exc.NoResultFound(f"{self._label}: {len(found)} rows, expected one")
        return found[0]

    def run(self, connection: Connection, params: Mapping[str, Any]) -> None:
        """Execute without reading a result."""
        self._execute(connection, params, fetch=False)

    def _execute(
        self, connection: Connection, params: Mapping[str, Any], *, fetch: bool
    ) -> list[Any]:
        if not connection.in_transaction() and not is_autocommit(connection):
            # What SQLAlchemy's autobegin does on a first execute, so that the caller's
            # commit() commits (and close() rolls back) what psycopg began implicitly.
            connection.begin()
        pooled = connection.connection
        driver: psycopg.Connection = pooled.driver_connection  # type: ignore[assignment]
        cursor = driver.cursor(row_factory=namedtuple_row)
        if self._fixed:
            params = {**self._fixed, **params}
        try:
            if connection.dispatch.before_cursor_execute:
                for listener in connection.dispatch.before_cursor_execute:
                    listener(connection, cursor, self.sql, params, None, False)
            cursor.execute(self.sql, params)
            return cursor.fetchall() if fetch and cursor.description is not None else []
        except psycopg.Error as error:
            raise _as_sqlalchemy_error(connection, error, self.sql, params, cursor) from error
        finally:
            cursor.close()


def is_autocommit(connection: Connection) -> bool:
    """Whether `connection` runs each statement on its own: psycopg's own flag, which
    costs no round trip (SQLAlchemy's `get_isolation_level()` may ask the server)."""
    return bool(connection.connection.driver_connection.autocommit)


def _as_sqlalchemy_error(
    connection: Connection,
    error: psycopg.Error,
    sql: str,
    params: Mapping[str, Any],
    cursor: psycopg.Cursor,
) -> exc.DBAPIError:
    """The error SQLAlchemy would have raised, with its handling of a lost connection:
    this connection is invalidated and the pool's others are recycled (they are likely
    stale after a database restart), so the next checkout reconnects."""
    disconnected = connection.dialect.is_disconnect(error, connection.connection, cursor)
    if disconnected and not connection.invalidated:
        connection.invalidate(error)
        connection.engine.dispose(close=False)
    return exc.DBAPIError.instance(  # type: ignore[return-value]
        sql,
        dict(params),
        error,
        psycopg.Error,
        connection_invalidated=disconnected,
        dialect=connection.dialect,
    )
