"""`DriverStatement`: statements run by psycopg under a SQLAlchemy connection behave as
SQLAlchemy's own execution would: same transaction, same errors, same recovery from a
lost connection, same instrumentation."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import bindparam, column, event, select, table, text
from sqlalchemy.dialects.postgresql import insert

from app.db import Database
from app.statements import DriverStatement, is_autocommit

SCRATCH = "driver_statement_scratch"
_scratch = table(SCRATCH, column("id"), column("label"))
INSERT = DriverStatement(
    insert(_scratch).values(id=bindparam("id"), label="fixed").returning(_scratch.c.id),
    label="insert",
)
COUNT = DriverStatement(text(f"SELECT count(*) AS n FROM {SCRATCH}"), label="count")
LABELS = DriverStatement(
    select(_scratch.c.label).where(_scratch.c.id == bindparam("id")), label="labels"
)


@pytest.fixture
def database(database_url: str):
    db = Database(database_url, pool_size=2)
    with db.engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {SCRATCH} (id int PRIMARY KEY, label text NOT NULL)"
        )
        connection.exec_driver_sql(f"TRUNCATE {SCRATCH}")
    yield db
    with db.engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE {SCRATCH}")
    db.dispose()


def count(db: Database) -> int:
    with db.autocommit_engine.connect() as connection:
        return COUNT.one(connection, {}).n


def test_rows_read_as_named_tuples_with_the_fixed_values(database):
    with database.autocommit_engine.connect() as connection:
        assert INSERT.one(connection, {"id": 1}).id == 1
        assert LABELS.first(connection, {"id": 1}).label == "fixed"
        assert LABELS.first(connection, {"id": 2}) is None
        assert LABELS.rows(connection, {"id": 2}) == []
        with pytest.raises(sqlalchemy.exc.NoResultFound):
            LABELS.one(connection, {"id": 2})


def test_in_a_session_it_commits_and_rolls_back_with_the_session(database):
    with database.sessions() as session:
        INSERT.run(session.connection(), {"id": 1})
        session.rollback()
    assert count(database) == 0
    with database.sessions() as session:
        INSERT.run(session.connection(), {"id": 1})
        assert count(database) == 0  # not yet committed: another connection sees nothing
        session.commit()
    assert count(database) == 1


def test_on_a_plain_connection_it_begins_as_sqlalchemy_would(database):
    """Without autocommit psycopg opens a transaction implicitly; SQLAlchemy must know of
    it, or commit() would do nothing and the pool would roll the write back."""
    with database.engine.connect() as connection:
        INSERT.run(connection, {"id": 1})
        assert connection.in_transaction()
        connection.commit()
    with database.engine.connect() as connection:
        INSERT.run(connection, {"id": 2})
        # closed without commit: rolled back
    assert count(database) == 1


def test_driver_errors_are_sqlalchemys(database):
    with database.autocommit_engine.connect() as connection:
        INSERT.run(connection, {"id": 1})
        with pytest.raises(sqlalchemy.exc.IntegrityError) as caught:
            INSERT.run(connection, {"id": 1})
        assert not caught.value.connection_invalidated
        # The connection is still good.
        assert COUNT.one(connection, {}).n == 1


def test_a_lost_connection_is_invalidated_and_the_next_checkout_reconnects(database):
    with database.autocommit_engine.connect() as connection:
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with database.autocommit_engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
            COUNT.one(connection, {})
        assert caught.value.connection_invalidated
    # What the API answers with 503 and a task retries; the next one works.
    assert count(database) == 0


def test_listeners_of_cursor_execute_see_the_statement(database):
    seen: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _executemany) -> None:
        seen.append(statement)

    event.listen(database.autocommit_engine, "before_cursor_execute", record)
    try:
        count(database)
    finally:
        event.remove(database.autocommit_engine, "before_cursor_execute", record)
    assert seen == [COUNT.sql]


def test_a_parameter_needing_sqlalchemy_is_refused_when_built():
    with pytest.raises(ValueError, match="bind processing"):
        DriverStatement(
            select(_scratch.c.id).where(_scratch.c.id.in_(bindparam("ids", expanding=True))),
            label="expanding",
        )


def test_autocommit_has_a_pool_of_its_own_whose_connections_stay_autocommit(database):
    # One pool switched per checkout costs 45-65 us a request (app/db.py); the send's
    # accept_plain_send refuses a connection that is not autocommit.
    assert database.autocommit_engine.pool is not database.engine.pool
    for _ in range(2):  # a connection returned to the pool comes back as it was
        with database.autocommit_engine.connect() as connection:
            assert is_autocommit(connection)
        with database.engine.connect() as connection:
            assert not is_autocommit(connection)
