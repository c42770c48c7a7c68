"""The client CPU of one statement: SQLAlchemy's execution against the driver's.

Why app/statements.py exists. Runs the send's pre-check (a real hot-path statement,
on an empty migrated database, so the server's work is small and equal for all three)
N times on one autocommit connection and prints the process CPU per execute:

    .venv/bin/python bench/statement_cost.py [--pg-url URL] [-n 3000]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import sqlalchemy
from database import drop_database, setup_database

from app.services.sends import _PRECHECK, _PRECHECK_ON_DRIVER


def cpu_ms_per_call(call: Callable[[], object], n: int) -> float:
    for _ in range(50):  # warm: statement cache, psycopg's prepared statement
        call()
    started = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - started) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args()
    name = f"switchboard_bench_statements_{uuid.uuid4().hex[:8]}"
    try:
        url = setup_database(args.pg_url, name)
        engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        params = {
            "tenant_id": "t1",
            "sender_id": "alice",
            "conversation_id": uuid.uuid4(),
            "message_id": uuid.uuid4(),
        }
        with engine.connect() as connection:
            core = cpu_ms_per_call(lambda: connection.execute(_PRECHECK, params).one(), args.n)
            sql = _PRECHECK_ON_DRIVER.sql
            driver_sql = cpu_ms_per_call(
                lambda: connection.exec_driver_sql(sql, params).one(), args.n
            )
            driver = cpu_ms_per_call(lambda: _PRECHECK_ON_DRIVER.one(connection, params), args.n)
        engine.dispose()
    finally:
        drop_database(args.pg_url, name)
    print(f"CPU per execute of the send pre-check, {args.n} runs (this process):")
    print(f"  SQLAlchemy Connection.execute (Core, cached): {core:.3f} ms")
    print(f"  SQLAlchemy exec_driver_sql (compiled SQL):     {driver_sql:.3f} ms")
    print(f"  DriverStatement (psycopg cursor):              {driver:.3f} ms")


if __name__ == "__main__":
    main()
