"""`switchboard jobs`: the periodic jobs, for an operator.

switchboard jobs list        each job, its schedule and how its last run went
switchboard jobs run NAME [--now ISO-8601]
                             run one now (or as of an earlier moment), once: the code
                             beat runs, safe beside a running beat (how to catch up
                             after an outage)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from app.models import JobState
from schedules.jobs import JOBS

jobs = AppGroup("jobs", help="The periodic jobs beat runs: list them, or run one now.")

# How far ahead of this machine's clock --now may be (another machine's clock may run a
# little ahead); further is a mistake: retention would delete messages early.
NOW_SKEW = timedelta(minutes=5)


class Moment(click.ParamType):
    """An ISO-8601 date and time; without a UTC offset it is taken as UTC."""

    name = "ISO-8601"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            moment = value
        else:
            try:
                moment = datetime.fromisoformat(str(value).strip())
            except ValueError:
                self.fail(
                    f"{value!r} is not an ISO-8601 date and time "
                    "(like 2026-11-24T01:00:00Z or 2026-11-24 01:00)",
                    param,
                    ctx,
                )
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        if moment > datetime.now(UTC) + NOW_SKEW:
            self.fail(
                f"{moment.isoformat()} is in the future; a job runs as of now or an earlier moment",
                param,
                ctx,
            )
        return moment


@jobs.command("list")
def list_jobs() -> None:
    """Name each periodic job, its schedule and its last successful run."""
    with current_app.extensions["switchboard.db"].sessions() as session:
        states = {state.job: state for state in session.scalars(select(JobState))}
    policy = current_app.extensions["switchboard.policy"]
    for job in JOBS.values():
        state = states.get(job.name)
        last = "never"
        if state is not None and state.last_succeeded_at is not None:
            last = (
                f"{state.last_succeeded_at.isoformat(timespec='seconds')}, "
                f"{state.last_rows} rows in {state.last_duration_seconds:.3f}s"
            )
        click.echo(f"{job.name}\n  every: {job.timing(policy).schedule}\n  last success: {last}")
        click.echo(f"  {job.description}")


@jobs.command("run")
@click.argument("name")
@click.option(
    "--now",
    "as_of",
    type=Moment(),
    default=None,
    help="Run as of this moment (ISO-8601, UTC unless it says otherwise; not in the "
    "future), e.g. to catch up the slot an outage missed. Default: now.",
)
def run_now(name: str, as_of: datetime | None) -> None:
    """Run job NAME now (or as of --now), once, whatever slot it last ran for."""
    from schedules.runner import UnknownJob, run_job
    from workers.tasks import enqueue_broadcast, enqueue_send

    database = current_app.extensions["switchboard.db"]
    try:
        with database.transaction() as session:
            run = run_job(
                session,
                current_app.extensions["switchboard.policy"],
                name,
                enqueue_send=enqueue_send,
                enqueue_broadcast=enqueue_broadcast,
                store=current_app.extensions["switchboard.storage"],
                now=as_of,
                force=True,
            )
    except UnknownJob as exc:
        raise click.ClickException(str(exc)) from None
    if run.outcome == "skipped_running":
        raise click.ClickException(f"{name} is running right now elsewhere; nothing done")
    job = JOBS[name]
    touched = f" ({job.touches})" if job.touches else ""
    moment = (as_of or datetime.now(UTC)).isoformat(timespec="seconds")
    click.echo(f"{name}: {run.rows} rows{touched} in {run.duration_seconds:.3f}s, as of {moment}")
