"""Issue 7's "Done when": the Procfile's web, worker and beat against a PostgreSQL and a
Redis of the test's own, under steady send load, through repeated SIGKILLs of the worker and
restarts of Redis and PostgreSQL. Counted from the database afterwards: nothing lost,
duplicated or stuck, and no 500 in any response.

The same scenario with other figures: `.venv/bin/python bench/faults.py --help`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.faults import Report, Scenario


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


def _clean_report(rate: float, batch_window_ms: float, tasks: int, sends: int) -> Report:
    return Report(
        rate=rate,
        duration=10,
        conversations=1,
        faults=[],
        sends=sends,
        accepted=sends,
        refused=Counter(),
        abandoned=0,
        responses=Counter({"202": sends}),
        stored=sends,
        rejected=0,
        lost=[],
        lost_in_broker=0,
        duplicated=[],
        stuck=[],
        unknown_rows=0,
        server_errors=Counter(),
        has_decided_at=True,
        converged_after=0.0,
        longest={},
        errors=[],
        wall_seconds=10,
        batch_tasks=tasks,
        batched_sends=sends,
        batch_window_ms=batch_window_ms,
    )


def test_sends_that_never_share_a_task_fail_the_run_only_where_the_rate_batches() -> None:
    # 30 sends/s with a 100 ms window: three a window, so batches are expected.
    assert any("shared a task" in p for p in _clean_report(30, 100, 300, 300).problems())
    assert _clean_report(30, 100, 100, 300).problems() == []
    # 5 sends/s: half a send a window; each goes out at once by design.
    assert _clean_report(5, 100, 50, 50).problems() == []
