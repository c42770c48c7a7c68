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
    `run` stop the processes it started (and drop what it made) before it exits 130."""

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; stopped the processes it started", file=sys.stderr)
        return 130
