"""What the benchmarks share: the S3 store for the web and worker processes they start."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.embedded import S3_VARIABLES


class S3Store:
    """The store SWITCHBOARD_S3_BUCKET (with SWITCHBOARD_S3_ENDPOINT_URL and AWS_*) names
    when set; else an embedded SeaweedFS in a temp dir of its own, which `stop()` stops
    and removes. `start()` returns the settings that name it."""

    def __init__(self) -> None:
        self.server = None
        self.directory: Path | None = None

    def start(self) -> dict[str, str]:
        if os.environ.get("SWITCHBOARD_S3_BUCKET"):
            return {name: os.environ[name] for name in S3_VARIABLES if os.environ.get(name)}
        from app.embedded import SeaweedServer

        self.directory = Path(tempfile.mkdtemp(prefix="switchboard-bench-s3-"))
        server = SeaweedServer(self.directory)
        try:
            server.start()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            raise
        self.server = server
        print(f"S3: embedded SeaweedFS at {server.endpoint_url}, bucket {server.bucket}")
        return server.env()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def run_cleanly(run: Callable[[Any], int], args: Any) -> int:
    """`run(args)`, with SIGTERM handled as Ctrl-C: either way the `finally` blocks of
    `run` stop the processes it started (and drop what it made) before it exits 130, and
    further signals are ignored while they do."""

    def terminate(signum: int, _frame: Any) -> None:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; stopped the processes it started", file=sys.stderr)
        return 130


def process_env(database_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    """The environment of the Procfile's processes a benchmark starts: this one's, without
    a broker or metrics folder of its own (Celery runs on the benchmark's Redis database),
    this venv first on PATH, loopback only, quiet logs and no rate limits, plus
    `settings` (SWITCHBOARD_POLICY, the tokens, ...)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.pop("SWITCHBOARD_BROKER_URL", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return (
        env
        | {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
            "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
            "SWITCHBOARD_BIND_HOST": "127.0.0.1",
        }
        | settings
    )
