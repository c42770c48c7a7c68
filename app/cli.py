"""The `switchboard` command, built on Flask's CLI.

switchboard up             start the whole system (web, worker, beat) on this machine
switchboard db upgrade     apply the migrations (the Procfile's release line)
switchboard token USER_ID  mint a development token for a provisioned user

`up` saves the settings it ran with to <state dir>/env (mode 0600); `token` and `db`
read any variable the environment lacks from there, so they work from a new shell
while the laptop setup runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from app.policy import PolicyError, load_policy
from app.settings import SettingsError, load_settings, normalise_database_url
from schedules.cli import jobs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
STATE_DIR_VARIABLE = "SWITCHBOARD_STATE_DIR"
DEFAULT_STATE_DIR = Path(".switchboard")
ENV_FILE_NAME = "env"
# What `up` saves besides every SWITCHBOARD_* variable: the rest of the settings' inputs.
SAVED_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "PORT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
)


def state_env_path() -> Path:
    """The env file of the laptop setup: in $SWITCHBOARD_STATE_DIR, else ./.switchboard."""
    return Path(os.environ.get(STATE_DIR_VARIABLE) or DEFAULT_STATE_DIR) / ENV_FILE_NAME


def write_state_env(path: Path, env: Mapping[str, str]) -> None:
    """Save the settings in `env` as shell assignments (`set -a; . <path>` loads them too),
    readable by the owner only: they include the service token and the JWT secret."""
    names = sorted(n for n in env if n in SAVED_VARIABLES or n.startswith("SWITCHBOARD_"))
    text = "# Written by `switchboard up`: the settings it runs with.\n" + "".join(
        f"{name}={shlex.quote(env[name])}\n" for name in names
    )
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # os.open's mode only applies to a new file; a leftover one may have had another.
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    partial.replace(path)


def read_state_env(path: Path) -> dict[str, str]:
    """The assignments in an env file written by `write_state_env` ({} when there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    # shlex, not lines: a quoted value (a PEM public key) may span several lines.
    values = {}
    for word in shlex.split(text, comments=True):
        name, equals, value = word.partition("=")
        if equals:
            values[name] = value
    return values


def use_state_env() -> None:
    """Fill in the variables the environment lacks from the laptop setup's env file;
    a variable that is set, even to another value, wins."""
    for name, value in read_state_env(state_env_path()).items():
        os.environ.setdefault(name, value)


def _create_app() -> Flask:
    from app import create_app

    use_state_env()
    try:
        return create_app()
    except (SettingsError, PolicyError) as exc:
        # click prints this as one line; the message names the variable or policy key.
        raise click.ClickException(str(exc)) from None


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
    use_state_env()
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
    from sqlalchemy.exc import OperationalError

    from app.auth import mint_token
    from app.models import User

    database = current_app.extensions["switchboard.db"]
    try:
        with database.sessions() as session:
            user = session.get(User, user_id)
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise click.ClickException(
            f"DATABASE_URL: cannot connect ({reason}); is `switchboard up` still running?"
        ) from None
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


# The demo users of each preset, in tenant 'demo': one of every role the browser client
# has something to show for (issue 12), as (user id, role, tier or None for the default).
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
        ("erin", "dealer", None),
        ("mo", "moderator", None),
    ],
    "marketplace": [("alice", "customer", None), ("bob", "artist", None)],
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


LOOPBACK_HOST = "127.0.0.1"


@cli.command("up", with_appcontext=False)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE_DIR,
    envvar=STATE_DIR_VARIABLE,
    show_default=True,
    help="Where embedded servers, generated secrets and the saved settings live.",
)
@click.option("--port", type=int, default=None, help="HTTP port (default: $PORT or 8000).")
@click.option(
    "--host",
    default=LOOPBACK_HOST,
    envvar="SWITCHBOARD_BIND_HOST",
    show_default=True,
    help="Address to listen on; 0.0.0.0 lets other machines in (and use the demo tokens).",
)
def up(state_dir: Path, port: int | None, host: str) -> None:
    """Start the whole system: web, worker and beat, as the Procfile has them.

    Without DATABASE_URL / REDIS_URL / SWITCHBOARD_S3_BUCKET it starts an embedded
    PostgreSQL, Redis and SeaweedFS (S3) under --state-dir; it generates the secrets
    it needs there too, applies the migrations, provisions demo users and prints how
    to call the API. The settings it runs with go to <state dir>/env for
    `switchboard token` and `switchboard db`.
    """
    from app import create_app
    from app.embedded import RedisServer, new_access_key, new_secret_key, start_postgres

    env = dict(os.environ)
    env.setdefault("PORT", str(port or 8000))
    if port:
        env["PORT"] = str(port)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # The Procfile's web line reads these: a laptop listens on loopback only (the welcome
    # text prints 7-day tokens), and keeps its metrics files with the rest of its state.
    env["SWITCHBOARD_BIND_HOST"] = host
    env.setdefault("SWITCHBOARD_WORKER_METRICS_HOST", host)
    env[STATE_DIR_VARIABLE] = str(state_dir)
    # The browser client at /demo: on for a laptop (the welcome text links to it), unless
    # the shell says SWITCHBOARD_DEMO=0; production leaves it off by default.
    env.setdefault("SWITCHBOARD_DEMO", "1")
    # The Procfile names gunicorn and celery bare; find this environment's even when
    # `switchboard up` was run by its path with the venv not activated.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [bin_dir, *(d for d in env.get("PATH", "").split(os.pathsep) if d)]
    )
    # Not the shared temp dir: every checkout on the machine would share one schedule.
    env.setdefault("CELERY_BEAT_SCHEDULE", str(state_dir / "celerybeat-schedule"))

    secrets_file = state_dir / "secrets.json"
    generated = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
    for name in ("SWITCHBOARD_SERVICE_TOKEN", "SWITCHBOARD_JWT_SECRET"):
        if not env.get(name):
            env[name] = generated.setdefault(name, secrets.token_urlsafe(32))
    embedded_s3 = not env.get("SWITCHBOARD_S3_BUCKET")
    if embedded_s3:
        # The embedded store's identity, made once: its data outlives a restart.
        seaweed_keys = generated.setdefault(
            "embedded_s3", {"access_key": new_access_key(), "secret_key": new_secret_key()}
        )
    # Write-then-chmod would leave the file readable by others for a moment.
    descriptor = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(json.dumps(generated, indent=2))

    # Refuse a bad variable or policy file before starting any server. The URLs of
    # servers not started yet stand in as placeholders; they are checked again below.
    placeholders = {
        "DATABASE_URL": env.get("DATABASE_URL") or "postgresql://embedded/switchboard",
        "REDIS_URL": env.get("REDIS_URL") or "redis://embedded:6379/0",
    }
    if embedded_s3:
        placeholders |= {
            "SWITCHBOARD_S3_BUCKET": "switchboard",
            "SWITCHBOARD_S3_ENDPOINT_URL": "http://127.0.0.1:8333",
            "AWS_ACCESS_KEY_ID": "embedded",
            "AWS_SECRET_ACCESS_KEY": "embedded",
            "AWS_REGION": "us-east-1",
        }
    _check_configuration({**env, **placeholders})

    stoppers = []
    try:
        if not env.get("DATABASE_URL"):
            pgdata = state_dir / "pgdata"
            click.echo(f"DATABASE_URL not set: starting embedded PostgreSQL in {pgdata}")
            server, env["DATABASE_URL"] = start_postgres(pgdata)
            stoppers.append(server.cleanup)
        if not env.get("REDIS_URL"):
            redis_server = RedisServer(state_dir / "redis", persistent=True).start()
            env["REDIS_URL"] = redis_server.url
            click.echo(f"REDIS_URL not set: started embedded Redis at {redis_server.url}")
            stoppers.append(redis_server.stop)
        if embedded_s3:
            seaweed = _start_seaweed(state_dir / "s3", seaweed_keys)
            stoppers.append(seaweed.stop)
            env.update(seaweed.env())
            click.echo(
                "SWITCHBOARD_S3_BUCKET not set: started embedded SeaweedFS (S3) at "
                f"{seaweed.endpoint_url}, bucket {seaweed.bucket}"
            )
        _check_configuration(env)
        env_file = state_dir / ENV_FILE_NAME
        write_state_env(env_file, env)

        os.environ.update(env)
        upgrade_database(env["DATABASE_URL"])
        try:
            app = create_app()
        except (SettingsError, PolicyError) as exc:
            raise click.ClickException(str(exc)) from None
        demo_tokens = _provision_demo(app)
        app.extensions["switchboard.db"].dispose()
        _print_welcome(
            env, demo_tokens, state_dir, demo=app.extensions["switchboard.settings"].demo
        )
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


def _start_seaweed(directory: Path, keys: Mapping[str, str]):
    """The embedded S3 store of `up`, with the keys made once and the ports of its last
    run where they are still free (saved in <directory>/ports.json)."""
    from app.embedded import EmbeddedServerError, SeaweedServer, port_is_free

    ports_file = directory / "ports.json"
    try:
        saved = json.loads(ports_file.read_text())
    except (FileNotFoundError, ValueError):
        saved = {}
    server = SeaweedServer(
        directory,
        access_key=keys["access_key"],
        secret_key=keys["secret_key"],
        ports={
            name: port
            for name, port in saved.items()
            if isinstance(port, int) and port_is_free(port)
        },
    )
    directory.mkdir(parents=True, exist_ok=True)
    ports_file.write_text(json.dumps(server.ports, indent=2))
    try:
        return server.start()
    except EmbeddedServerError as exc:
        raise click.ClickException(str(exc)) from None


def _check_configuration(env: Mapping[str, str]) -> None:
    """One line naming the bad variable or policy key, instead of a traceback."""
    try:
        load_policy(load_settings(env).policy)
    except (SettingsError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None


def cli_command(state_dir: Path) -> str:
    """How to run this `switchboard` from a new shell in the current directory: the
    venv's bin dir need not be on PATH, and a state dir other than ./.switchboard must
    be named for `token` and `db` to find the saved settings."""
    script = Path(sys.executable).parent / "switchboard"
    if script.exists():
        relative = os.path.relpath(script)
        if relative.startswith(os.pardir):
            command = shlex.quote(str(script))
        else:
            command = shlex.quote(relative if os.sep in relative else f".{os.sep}{relative}")
    else:
        command = f"{shlex.quote(sys.executable)} -m app.cli"
    if state_dir.resolve() != DEFAULT_STATE_DIR.resolve():
        command = f"{STATE_DIR_VARIABLE}={shlex.quote(str(state_dir))} {command}"
    return command


def demo_links(base: str, tokens: Mapping[str, str]) -> dict[str, str]:
    """The browser client's link for each demo user. The token goes in the fragment,
    which the browser keeps to itself (no request line, log or Referer carries it), and
    so do the other demo users' ids, for the client to offer as people to message."""
    links = {}
    for user in tokens:
        fragment = urlencode(
            {"token": tokens[user], "peers": ",".join(u for u in tokens if u != user)}
        )
        links[user] = f"{base}/demo/#{fragment}"
    return links


def _print_welcome(
    env: dict[str, str], demo_tokens: dict[str, str], state_dir: Path, *, demo: bool = False
) -> None:
    host = env["SWITCHBOARD_BIND_HOST"]
    shown = LOOPBACK_HOST if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    base = f"http://{shown}:{env['PORT']}"
    policy = env.get("SWITCHBOARD_POLICY", "bookstore")
    metrics_auth = (
        " -H 'Authorization: Bearer $SWITCHBOARD_METRICS_TOKEN'"
        if env.get("SWITCHBOARD_METRICS_TOKEN")
        else ""
    )
    lines = [
        "",
        f"Switchboard is starting at {base}  (policy: {policy}, listening on {host})",
        f"  readiness:  curl {base}/health/ready",
        f"  metrics:    curl {base}/metrics{metrics_auth}",
        "  provision a user with the service token:",
        f"    curl -X PUT {base}/v1/admin/users/dave -H 'Authorization: Bearer "
        f"{env['SWITCHBOARD_SERVICE_TOKEN']}' -H 'Content-Type: application/json' "
        '-d \'{"tenant": "demo", "role": "member", "display_name": "Dave"}\'',
        f"  mint a token for a user (from any shell in {Path.cwd()}):",
        f"    {cli_command(state_dir)} token dave",
        f"  settings in use (for `token` and `db`): {state_dir / ENV_FILE_NAME}",
    ]
    if demo_tokens:
        roles = {user: role for user, role, _ in DEMO_USERS.get(policy, [])}
        lines.append("  demo users in tenant 'demo', with 7-day tokens:")
        lines += [f"    {user}: {token}" for user, token in demo_tokens.items()]
        if demo:
            lines.append(
                "  the browser client, one link per demo user (open each in its own window):"
            )
            lines += [
                f"    {user} ({roles.get(user, '?')}): {link}"
                for user, link in demo_links(base, demo_tokens).items()
            ]
    click.echo("\n".join(lines) + "\n")


cli.add_command(jobs)


def main() -> None:
    cli(prog_name="switchboard")


if __name__ == "__main__":
    main()
