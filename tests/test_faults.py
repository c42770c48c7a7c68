"""Issue 7's "Done when": the Procfile's web, worker and beat against a PostgreSQL and a
Redis of the test's own, under steady send load, through repeated SIGKILLs of the worker and
restarts of Redis and PostgreSQL. Counted from the database afterwards: nothing lost,
duplicated or stuck, and no 500 in any response.

The same scenario with other figures: `.venv/bin/python bench/faults.py --help`.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults import Scenario


def test_no_send_lost_duplicated_stuck_or_500_through_worker_kills_and_server_restarts(
    tmp_path: Path,
) -> None:
    report = Scenario(
        tmp_path,
        rate=30,
        duration=60,
        conversations=20,
        kills=4,
        redis_restarts=2,
        postgres_restarts=1,
        # A bounded wait for convergence, not a latency assertion: an accepted send still
        # undecided this long after the last fault counts as stuck (or lost).
        settle=60,
    ).run()
    print(report.render())
    problems = report.problems()
    assert not problems, "\n".join([*problems, report.render(), report.logs])
