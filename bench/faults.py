"""The fault scenario of tests/test_faults.py with figures of your choosing, printing the
counts (lost, duplicated, stuck, 500s) and the longest accept-to-decided time of sends
accepted around a worker kill, a Redis restart and a PostgreSQL restart.

    .venv/bin/python bench/faults.py                      # 30 sends/s for 90 s, 5 kills
    .venv/bin/python bench/faults.py --rate 30 --duration 90 --kills 5

It starts a PostgreSQL and a Redis of its own on free ports (never the machine's), the
Procfile's web, worker and beat against them, and stops them all on exit. Exit status 1
when any count breaks the contract.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import app and tests

from tests.faults import Scenario  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=30.0, help="sends per second")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of load")
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=6, help="client threads")
    parser.add_argument("--kills", type=int, default=5, help="worker SIGKILLs")
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--postgres-restarts", type=int, default=1)
    parser.add_argument("--outage", type=float, default=3.0, help="seconds a server is down")
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds after the last fault to converge"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data and logs folder")
    parser.add_argument("--logs", action="store_true", help="print the processes' log tails")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="switchboard-faults-"))
    try:
        report = Scenario(
            directory,
            rate=args.rate,
            duration=args.duration,
            conversations=args.conversations,
            threads=args.threads,
            kills=args.kills,
            redis_restarts=args.redis_restarts,
            postgres_restarts=args.postgres_restarts,
            outage=args.outage,
            settle=args.settle,
        ).run()
    finally:
        if args.keep:
            print(f"data and logs kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print(report.render())
    if args.logs:
        print(report.logs)
    problems = report.problems()
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
