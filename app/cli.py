"""The `switchboard` command, built on Flask's CLI.

switchboard up             start the whole system (web, worker, beat) on this machine
switchboard db upgrade     apply the migrations (the Procfile's release line)
switchboard token USER_ID  mint a development token for a provisioned user
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import click
from flask import current_app
from flask.cli import FlaskGroup, with_appcontext

from app.settings import SettingsError, normalise_database_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _create_app():
    from app import create_app

    return create_app()


@click.group(
    cls=FlaskGroup,
    create_app=_create_app,
    add_version_option=False,
    load_dotenv=False,
    set_debug_flag=False,
)
def cli() -> None:
    """Switchboard: a self-hosted messaging backend."""


def alembic_config(database_url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # configparser treats '%' as interpolation; URLs may contain escaped characters.
    config.set_main_option(
        "sqlalchemy.url", normalise_database_url(database_url).replace("%", "%%")
    )
    config.attributes["skip_logging_config"] = True
    return config


def upgrade_database(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def _database_url_from_env() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise click.ClickException("DATABASE_URL: is required")
    try:
        normalise_database_url(url)
    except ValueError as exc:
        raise click.ClickException(f"DATABASE_URL: {exc}") from None
    return url


@cli.group(cls=click.Group)
def db() -> None:
    """Database migrations (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    upgrade_database(_database_url_from_env(), revision)
    click.echo(f"database upgraded to {revision}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION."""
    from alembic import command

    command.downgrade(alembic_config(_database_url_from_env()), revision)
    click.echo(f"database downgraded to {revision}")


@db.command("current")
def db_current() -> None:
    """Print the database's current revision."""
    from alembic import command

    command.current(alembic_config(_database_url_from_env()))


@cli.command("token")
@click.argument("user_id")
@click.option("--hours", default=12, show_default=True, help="Hours until the token expires.")
@with_appcontext
def token(user_id: str, hours: int) -> None:
    """Mint a development token for a provisioned user (needs SWITCHBOARD_JWT_SECRET)."""
    from app.auth import mint_token
    from app.models import User

    database = current_app.extensions["switchboard.db"]
    with database.sessions() as session:
        user = session.get(User, user_id)
    if user is None:
        raise click.ClickException(
            f"no user '{user_id}': provision it first with PUT /v1/admin/users/{user_id}"
        )
    try:
        minted = mint_token(
            current_app.extensions["switchboard.settings"],
            user.id,
            user.tenant_id,
            ttl=timedelta(hours=hours),
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(minted)


DEMO_USERS = {
    "bookstore": [
        ("alice", "member", "privileged"),
        ("bob", "member", "free"),
        ("carol", "manager", "free"),
    ],
    "cardshow": [
        ("alice", "attendee", None),
        ("bob", "mvp_dealer", None),
        ("carol", "organizer", None),
    ],
    "marketplace": [("alice", "customer", None), ("bob", "artist", None), ("carol", "admin", None)],
}


def _provision_demo(app) -> dict[str, str]:
    """Demo users in tenant 'demo', so a new user can try the API at once."""
    from app.auth import mint_token
    from app.services.users import UserUpsert, upsert_user

    policy = app.extensions["switchboard.policy"]
    settings = app.extensions["switchboard.settings"]
    tokens = {}
    with app.extensions["switchboard.db"].transaction() as session:
        for user_id, role, tier in DEMO_USERS.get(policy.name, []):
            upsert_user(session, policy, UserUpsert(user_id, "demo", role, user_id.title(), tier))
            tokens[user_id] = mint_token(settings, user_id, "demo", ttl=timedelta(days=7))
    return tokens


@cli.command("up", with_appcontext=False)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(".switchboard"),
    show_default=True,
    help="Where embedded servers and generated secrets live.",
)
@click.option("--port", type=int, default=None, help="HTTP port (default: $PORT or 8000).")
def up(state_dir: Path, port: int | None) -> None:
    """Start the whole system: web, worker and beat, as the Procfile has them.

    Without DATABASE_URL / REDIS_URL it starts an embedded PostgreSQL and Redis
    under --state-dir; it generates the secrets it needs there too, applies the
    migrations, provisions demo users and prints how to call the API.
    """
    from app import create_app
    from app.embedded import RedisServer, start_postgres

    env = dict(os.environ)
    env.setdefault("PORT", str(port or 8000))
    if port:
        env["PORT"] = str(port)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    stoppers = []

    if not env.get("DATABASE_URL"):
        click.echo(f"DATABASE_URL not set: starting embedded PostgreSQL in {state_dir / 'pgdata'}")
        server, env["DATABASE_URL"] = start_postgres(state_dir / "pgdata")
        stoppers.append(server.cleanup)
    if not env.get("REDIS_URL"):
        redis_server = RedisServer(state_dir / "redis", persistent=True).start()
        env["REDIS_URL"] = redis_server.url
        click.echo(f"REDIS_URL not set: started embedded Redis at {redis_server.url}")
        stoppers.append(redis_server.stop)

    secrets_file = state_dir / "secrets.json"
    generated = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
    for name in ("SWITCHBOARD_SERVICE_TOKEN", "SWITCHBOARD_JWT_SECRET"):
        if not env.get(name):
            env[name] = generated.setdefault(name, secrets.token_urlsafe(32))
    secrets_file.write_text(json.dumps(generated, indent=2))
    secrets_file.chmod(0o600)

    try:
        os.environ.update(env)
        upgrade_database(env["DATABASE_URL"])
        try:
            app = create_app()
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
        demo_tokens = _provision_demo(app)
        app.extensions["switchboard.db"].dispose()
        _print_welcome(env, demo_tokens)
        procfile = PROJECT_ROOT / "Procfile"
        honcho = [
            sys.executable,
            "-m",
            "honcho",
            "-f",
            str(procfile),
            "-d",
            str(Path.cwd()),
            "start",
            "web",
            "worker",
            "broadcasts",
            "beat",
        ]
        process = subprocess.Popen(honcho, env=env)

        def forward(signum: int, _frame: object) -> None:
            # honcho stops web, worker and beat in turn; the embedded servers stop after.
            process.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        process.wait()
        sys.exit(process.returncode)
    finally:
        for stop in reversed(stoppers):
            stop()


def _print_welcome(env: dict[str, str], demo_tokens: dict[str, str]) -> None:
    base = f"http://127.0.0.1:{env['PORT']}"
    policy = env.get("SWITCHBOARD_POLICY", "bookstore")
    lines = [
        "",
        f"Switchboard is starting at {base}  (policy: {policy})",
        f"  readiness:  curl {base}/health/ready",
        f"  metrics:    curl {base}/metrics",
        "  provision a user with the service token:",
        f"    curl -X PUT {base}/v1/admin/users/dave -H 'Authorization: Bearer "
        f"{env['SWITCHBOARD_SERVICE_TOKEN']}' -H 'Content-Type: application/json' "
        '-d \'{"tenant": "demo", "role": "member", "display_name": "Dave"}\'',
        "  mint a token for a user (same environment):  switchboard token dave",
    ]
    if demo_tokens:
        lines.append("  demo users in tenant 'demo', with 7-day tokens:")
        lines += [f"    {user}: {token}" for user, token in demo_tokens.items()]
    click.echo("\n".join(lines) + "\n")


def main() -> None:
    cli(prog_name="switchboard")


if __name__ == "__main__":
    main()
