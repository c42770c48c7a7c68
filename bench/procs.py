"""Starting and stopping what a benchmark measures: the Procfile's processes (or commands of
the benchmark's choosing), waits for the web process to answer, and `BenchRun`, which holds
one run's processes, database, Redis database and S3 store and cleans them all up."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import S3Store, http_request, process_env
from database import drop_database, setup_database
from proc_stats import children_of

REPO = Path(__file__).resolve().parent.parent


def procfile_command(name: str) -> str:
    for line in (REPO / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            return command.strip()
    raise KeyError(name)


def _local_redis_pid(pid: object) -> int | None:
    """`pid` (what Redis reports as its own) when it is a redis-server on this machine: a
    server elsewhere, or in a container's pid namespace, may report a pid that here is
    no process or another one."""
    if not isinstance(pid, int):
        return None
    try:
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if command == "redis-server" else None


@dataclass
class Proc:
    """The Procfile's line `name` (or `command`, when given), run from the repository in
    a session of its own (Ctrl-C reaches the benchmark only, which stops it in order, and
    stopping it stops whatever it started), its output appended to `log_path`."""

    name: str
    env: dict[str, str]
    log_path: Path
    command: list[str] | None = None
    process: subprocess.Popen | None = None

    def start(self) -> Proc:
        argv = self.command or ["bash", "-c", "exec " + procfile_command(self.name)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to its session, SIGKILL after `timeout` seconds."""
        if not self.alive():
            return
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop in {timeout:.0f} s: killing it", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        # Whatever its session left behind (a gunicorn worker, say: it was ours alone).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def workers(self, count: int = 1, timeout: float = 30.0) -> list[int]:
        """The pids of this gunicorn master's workers, once `count` of them are up."""
        deadline = time.monotonic() + timeout
        while len(found := children_of(self.pid)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn started {len(found)} workers:\n{self.tail()}")
            time.sleep(0.1)
        return found


def check_alive(*procs: Proc) -> None:
    """Raise if one of `procs` exited, with the end of its log."""
    for proc in procs:
        if proc.process is not None and proc.process.poll() is not None:
            code = proc.process.returncode
            raise RuntimeError(f"{proc.name} exited with {code}:\n{proc.tail()}")


def wait_healthy(port: int, *procs: Proc, path: str = "/health", timeout: float = 60.0) -> None:
    """Wait until the web process on `port` answers `path` with a 200; raise if it does not
    in `timeout` seconds, or if one of `procs` (the web process first) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        check_alive(*procs)
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_request(port, "GET", path, timeout=2)[0] == 200:
                return
        if time.monotonic() > deadline:
            log = procs[0].tail() if procs else ""
            raise RuntimeError(f"web did not answer {path} in {timeout:.0f}s:\n{log}")
        time.sleep(0.2)


class BenchRun:
    """What one run of a benchmark starts, and its clean-up. A work folder for the logs
    (printed, kept) with a Prometheus folder for the web process (removed), a free port for
    the web process, the benchmark's own database (dropped, unless `keep_db`), its Redis
    database (flushed at start), the S3 store and the processes. As a context manager, on
    the way out (an error and Ctrl-C included) it undoes all of it, and calls what was
    handed to `defer`, in the reverse order: the last started stops first."""

    def __init__(
        self,
        prefix: str,
        pg_url: str,
        db_name: str,
        redis_url: str,
        keep_db: bool = False,
        port: int = 0,
    ) -> None:
        from app.embedded import free_port

        self.pg_url, self.db_name, self.keep_db = pg_url, db_name, keep_db
        self.redis_url = redis_url
        # The Redis server's pid, when it runs on this machine (set by `environment`):
        # what CpuMeter counts as Redis, whichever other redis-server runs beside it.
        self.redis_pid: int | None = None
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.metrics_dir = self.work / "metrics"
        self.metrics_dir.mkdir()
        self.port = port or free_port()
        self.procs: list[Proc] = []
        self.s3 = S3Store()
        self._cleanup = contextlib.ExitStack()
        self._cleanup.callback(shutil.rmtree, self.metrics_dir, ignore_errors=True)

    def __enter__(self) -> BenchRun:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self._cleanup.__exit__(*exc)

    def environment(self, **settings: str) -> tuple[str, dict[str, str]]:
        """Create and migrate the database, flush the Redis database, start the S3 store:
        the database's URL and the processes' environment (common.process_env's, with
        `settings` and the store's)."""
        import redis

        if not self.keep_db:  # registered first: a half-made database goes too
            self._cleanup.callback(self._drop_database)
        database_url = setup_database(self.pg_url, self.db_name)
        client = redis.Redis.from_url(self.redis_url)
        client.flushdb()
        self.redis_pid = _local_redis_pid(client.info("server").get("process_id"))
        client.close()
        self._cleanup.callback(self.s3.stop)
        env = process_env(database_url, self.redis_url, **settings) | self.s3.start()
        return database_url, env

    def _drop_database(self) -> None:
        with contextlib.suppress(Exception):
            drop_database(self.pg_url, self.db_name)

    def start(self, name: str, env: dict[str, str], **extra: str) -> Proc:
        """The Procfile's line `name` with `env` and `extra`, logged to <work>/<name>.log.
        A worker given more threads than the pools' default gets pools as large (it
        refuses to start with fewer connections than threads)."""
        threads = extra.get("WORKER_CONCURRENCY")
        if threads and "SWITCHBOARD_DB_POOL_SIZE" not in env | extra:
            extra["SWITCHBOARD_DB_POOL_SIZE"] = str(max(10, int(threads)))
        proc = Proc(name, env | extra, self.work / f"{name}.log").start()
        self.procs.append(proc)
        self._cleanup.callback(proc.stop)
        return proc

    def web_env(self, env: dict[str, str], workers: int) -> dict[str, str]:
        """`env` for the web process: its port, gunicorn workers and Prometheus folder."""
        return env | {
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }

    def defer(self, callback: Callable[..., Any], *args: Any) -> None:
        """Call `callback(*args)` on the way out, before what was started earlier stops."""
        self._cleanup.callback(callback, *args)

    def report_dead(self) -> list[Proc]:
        """Print the log's end of every process that exited early; those processes."""
        dead = [proc for proc in self.procs if not proc.alive()]
        for proc in dead:
            print(f"!! {proc.name} exited early:\n{proc.tail()}")
        return dead
