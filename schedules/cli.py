"""`switchboard jobs`: the periodic jobs, for an operator.

switchboard jobs list        each job, its schedule and how its last run went
switchboard jobs run NAME    run one now, once: the code beat runs, safe beside a
                             running beat (how to catch up after an outage)
"""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from app.models import JobState
from schedules.jobs import JOBS

jobs = AppGroup("jobs", help="The periodic jobs beat runs: list them, or run one now.")


@jobs.command("list")
def list_jobs() -> None:
    """Name each periodic job, its schedule and its last successful run."""
    with current_app.extensions["switchboard.db"].sessions() as session:
        states = {state.job: state for state in session.scalars(select(JobState))}
    for job in JOBS.values():
        state = states.get(job.name)
        last = "never"
        if state is not None and state.last_succeeded_at is not None:
            last = (
                f"{state.last_succeeded_at.isoformat(timespec='seconds')}, "
                f"{state.last_rows} rows in {state.last_duration_seconds:.3f}s"
            )
        click.echo(f"{job.name}\n  every: {job.schedule}\n  last success: {last}")
        click.echo(f"  {job.description}")


@jobs.command("run")
@click.argument("name")
def run_now(name: str) -> None:
    """Run job NAME now, once, whatever slot it last ran for."""
    from schedules.runner import UnknownJob, run_job
    from workers.tasks import enqueue_send

    database = current_app.extensions["switchboard.db"]
    try:
        with database.transaction() as session:
            run = run_job(
                session,
                current_app.extensions["switchboard.policy"],
                name,
                enqueue_send=enqueue_send,
                force=True,
            )
    except UnknownJob as exc:
        raise click.ClickException(str(exc)) from None
    if run.outcome == "skipped_running":
        raise click.ClickException(f"{name} is running right now elsewhere; nothing done")
    click.echo(f"{name}: {run.rows} rows in {run.duration_seconds:.3f}s")
