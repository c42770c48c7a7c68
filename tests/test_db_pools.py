"""The process's connection pools: a burst waits for a pooled connection instead of
opening (and, on return, closing) one more."""

from __future__ import annotations

import threading

from sqlalchemy import event

from app.db import Database, pool_size_problem


def test_a_burst_waits_for_the_pooled_connections_and_opens_no_others(database_url: str):
    database = Database(database_url, pool_size=2, pool_timeout=30)
    engine = database.autocommit_engine
    opened: list[object] = []
    event.listen(engine, "connect", lambda connection, record: opened.append(connection))
    held_at_once: list[int] = []
    errors: list[BaseException] = []

    def send_like_request() -> None:
        try:
            with engine.connect() as connection:
                held_at_once.append(engine.pool.checkedout())
                connection.exec_driver_sql("SELECT pg_sleep(0.02)")
        except BaseException as error:  # collected, asserted below
            errors.append(error)

    try:
        for _burst in range(2):  # the second finds the first's connections still open
            threads = [threading.Thread(target=send_like_request) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert not any(thread.is_alive() for thread in threads)
    finally:
        database.dispose()
    assert errors == []
    assert len(held_at_once) == 16
    # With overflow, eight requests at once held up to four, and the two beyond the
    # pool were closed on return, to be opened again by the next burst.
    assert max(held_at_once) <= 2
    assert len(opened) <= 2


def test_a_worker_needs_a_connection_for_each_task_it_runs_at_once():
    assert pool_size_problem(8, 10) is None
    assert pool_size_problem(10, 10) is None
    assert pool_size_problem("auto", 10) is None
    problem = pool_size_problem(12, 10)
    assert problem is not None
    assert "SWITCHBOARD_DB_POOL_SIZE=10" in problem
    assert "--concurrency 12" in problem
    assert "12 or more" in problem
