"""A benchmark's own PostgreSQL database: created from scratch and migrated, dropped after;
and the members in pairs that the stream and throughput benchmarks provision in it."""

from __future__ import annotations

# A tenant of bookstore members, user_id(2k) and user_id(2k + 1) in one conversation.
PAIRS_TENANT = "stream-bench"


def setup_database(pg_url: str, name: str) -> str:
    """Database `name` on the server `pg_url` names (its user may create databases), new
    (an old one of that name is dropped first) and migrated: its SQLAlchemy URL."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from app.cli import upgrade_database
    from app.settings import normalise_database_url

    admin_url = make_url(normalise_database_url(pg_url))
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    upgrade_database(url)
    return url


def drop_database(pg_url: str, name: str) -> None:
    """Drop database `name` (if it exists) on the server `pg_url` names, connected or not."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from app.settings import normalise_database_url

    admin = sqlalchemy.create_engine(
        make_url(normalise_database_url(pg_url)), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def psycopg_url(url: str) -> str:
    """The SQLAlchemy URL setup_database returns, as psycopg takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def user_id(index: int) -> str:
    return f"sb-{index:05d}"


def provision_pairs(url: str, count: int) -> list[str]:
    """`count` members of PAIRS_TENANT (tier privileged, so they may start conversations)
    and `count` / 2 conversations (2k with 2k+1), through the services the admin API and
    the start endpoint use: the conversations' ids, the k-th for the k-th pair."""
    from app.db import Database
    from app.models import User
    from app.policy import load_policy
    from app.services.conversations import start_conversation
    from app.services.users import UserUpsert, upsert_user

    policy = load_policy("bookstore")
    database = Database(url, pool_size=1)
    conversations = []
    try:
        with database.transaction() as session:
            for i in range(count):
                upsert_user(
                    session,
                    policy,
                    UserUpsert(user_id(i), PAIRS_TENANT, "member", f"Bench {i}", tier="privileged"),
                )
        with database.transaction() as session:
            for i in range(0, count, 2):
                starter = session.get_one(User, user_id(i))
                conversation, _ = start_conversation(session, policy, starter, user_id(i + 1), None)
                conversations.append(str(conversation.id))
    finally:
        database.dispose()
    return conversations
