"""Fault harness for issue 7: the Procfile's web, worker and beat against a PostgreSQL and a
Redis of their own, steady send load, faults under that load, and counts from the database.

`Scenario(directory, ...).run()` starts everything in `directory`, drives the load, kills the
worker with SIGKILL (and starts it again, as a supervisor would), restarts Redis (with AOF,
so queued tasks survive) and PostgreSQL (crashed: SIGKILL of every one of its processes), waits
a bounded time for every accepted send to be decided, counts, stops everything and returns a
`Report`. tests/test_faults.py asserts on the report; bench/faults.py prints it.

The servers here are never the machine's: both listen on free ports of 127.0.0.1 and are
stopped by their own pids. Attachments go to the test run's S3 store (tests.live.S3_ENV)
when there is one, else to an embedded SeaweedFS of the scenario's own in `directory`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis

from app.auth import mint_token
from app.cli import upgrade_database
from app.embedded import RedisServer, SeaweedServer, free_port
from app.settings import load_settings
from tests.live import S3_ENV, LiveProcess, LiveSystem
from workers.send_batches import holds_window

SERVICE_TOKEN = "faults-service-token-0123456789"
JWT_SECRET = "faults-jwt-secret-0123456789abcdefghijklmnop"
TENANT = "faults"
# pgserver runs PostgreSQL as this account when started by root (postgres refuses root);
# using the same one keeps this harness and the embedded test servers alike.
POSTGRES_OS_USER = "pgserver"

Log = Callable[[str], None]


# --- PostgreSQL -------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """initdb/pg_ctl/postgres: pgserver's (so both CI passes and a laptop run the same
    build), else the machine's."""
    # Located, not imported: importing pgserver sets up its own runtime folders.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        if (bundled / "pg_ctl").exists():
            return bundled
    found = shutil.which("pg_ctl")
    if found:
        # Resolve symlinks (/usr/local/bin -> /usr/lib/postgresql/N/bin): initdb looks for
        # `postgres` next to its own real path.
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if candidates:
        return candidates[0]
    raise RuntimeError("no PostgreSQL binaries: install pgserver (the embedded extra)")


def _postgres_os_user() -> str | None:
    """None when not root; else the unprivileged account PostgreSQL must run as, created
    the way pgserver creates it."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "-s", "/bin/bash", POSTGRES_OS_USER], check=True, capture_output=True
        )
    return POSTGRES_OS_USER


def _let_others_traverse(path: Path) -> None:
    """o+x on every parent, so the PostgreSQL account can reach a directory made by root
    (pytest's temp folders are 0700)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _others_may_traverse(path: Path) -> bool:
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def _copy_install(bin_dir: Path, destination: Path) -> Path:
    """Copy the install `bin_dir` belongs to under `destination`; returns the copy's bin.

    pgserver's binaries find their shared libraries by RPATH (`$ORIGIN/../../../
    pgserver.libs`, the wheel's layout), so that layout is copied whole: the install
    three levels under `destination`, and the wheel's `*.libs` folders beside it."""
    levels = bin_dir.parents  # bin_dir.parents[0] is the install, [2] its site folder
    site, install = levels[2], levels[0]
    copied_install = destination / install.relative_to(site)
    shutil.copytree(
        install, copied_install, symlinks=True, ignore=shutil.ignore_patterns("include")
    )
    for libs in site.glob("*.libs"):
        shutil.copytree(libs, destination / libs.name, symlinks=True)
    return copied_install / "bin"


def _let_others_run(directory: Path) -> None:
    """o+rx on a binary tree installed by root with a tight umask (as pgserver does)."""
    for item in [directory, *directory.rglob("*")]:
        mode = item.stat().st_mode
        wanted = mode | stat.S_IROTH | (stat.S_IXOTH if item.is_dir() or mode & stat.S_IXUSR else 0)
        if wanted != mode:
            item.chmod(wanted)


def _pid_alive(pid: int) -> bool:
    """Running (a zombie is not: it has exited and only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (empty where there is none)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class PostgresServer:
    """A PostgreSQL of this test's own: initdb into `directory`, TCP on 127.0.0.1:`port`
    (no unix socket, so nothing is shared with other servers), fsync on."""

    directory: Path
    port: int = field(default_factory=free_port)
    database: str = "switchboard"
    bin_dir: Path = field(default_factory=postgres_bin_dir)
    os_user: str | None = None
    pid: int | None = None
    _private: bool = False  # `directory` was made here (see `init`) and is removed here

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def commands_log_path(self) -> Path:
        return self.directory / "commands.log"

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        # Output to a file, not pipes: `pg_ctl start` may leave the postmaster holding its
        # stdout, and reading a pipe would wait for the server to exit. (Not the server's
        # own log: that one is written by the PostgreSQL account, this one by us.)
        with self.commands_log_path.open("ab") as log:
            subprocess.run(
                [str(self.bin_dir / tool), *args],
                check=True,
                cwd=self.directory,
                # All three: with only `user`, the process keeps root's groups, and the
                # group bits of root's 0701 temp folders would then deny it the way in.
                user=self.os_user,
                group=self.os_user,
                extra_groups=[] if self.os_user else None,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )

    def init(self) -> PostgresServer:
        self.os_user = _postgres_os_user()
        if self.os_user is not None:
            # A folder of its own straight under the temp dir: the PostgreSQL account must
            # traverse every parent, and a concurrent pytest resets /tmp/pytest-of-root to
            # 0700 whenever it starts, so the caller's folder is no place for the data.
            self.directory = Path(tempfile.mkdtemp(prefix="switchboard-faults-pg-"))
            self._private = True
            entry = pwd.getpwnam(self.os_user)
            self.data.mkdir(mode=0o700)
            for path in (self.directory, self.data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            _let_others_traverse(self.directory)
            if not _others_may_traverse(self.bin_dir):
                # The binaries are in a checkout under a private folder (mktemp -d is 0700):
                # a copy of the install in our own folder, rather than loosening the
                # permissions of folders that are not ours.
                self.bin_dir = _copy_install(self.bin_dir, self.directory / "postgresql")
            _let_others_run(self.bin_dir)
            _let_others_run(self.bin_dir.parent / "lib")
        else:
            self.data.mkdir(parents=True, mode=0o700)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            # Only initdb's own final sync: the server below runs with fsync on.
            "--no-sync",
        )
        return self

    def start(self) -> PostgresServer:
        options = (
            f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=on -c synchronous_commit=on "
            "-c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
            "-o", options, "start",
        )  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def create_database(self) -> None:
        with psycopg.connect(self.admin_url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.database}"')

    def crash(self) -> None:
        """SIGKILL to the postmaster and every process it forked (PostgreSQL puts each in
        a session of its own, so a process-group kill would miss them): a crash of the
        whole server, recovered from the WAL on the next start."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        for victim in [pid, *_children(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The killed postmaster is not our child (pg_ctl forked it and exited): init reaps
        # it. Until then kill(pid, 0) succeeds and the next postmaster would take the zombie
        # for a live server holding postmaster.pid; give init a moment, then remove the
        # stale lock file ourselves (every process of the server is dead by now).
        deadline = time.monotonic() + 5
        while not _pid_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _pid_gone(pid) and not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                (self.data / "postmaster.pid").unlink()

    def remove(self) -> None:
        """Delete the data folder if `init` made it outside the caller's folder."""
        if self._private and self.pid is None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def stop(self) -> None:
        """A fast shutdown by pg_ctl on our own data directory, else a crash."""
        if self.pid is None or not _pid_alive(self.pid):
            self.pid = None
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "20", "stop")
            self.pid = None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.crash()


# --- the Procfile's processes --------------------------------------------------------------


def live_env(
    database_url: str, redis_url: str, s3_env: dict[str, str] | None = None
) -> dict[str, str]:
    return {
        **(s3_env or {}),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        # Explicit, so a broker URL in the caller's environment never reaches a shared server.
        "SWITCHBOARD_BROKER_URL": redis_url,
        "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
        "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
        "SWITCHBOARD_POLICY": "bookstore",
        "SWITCHBOARD_LOG_LEVEL": os.environ.get("TEST_LIVE_LOG_LEVEL", "WARNING"),
        "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
    }


def _tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class FaultSystem(LiveSystem):
    """LiveSystem plus the beat line, a worker that can be killed and started again, and a
    watchdog check: a process that exits unasked is a failure (and is started again, as a
    supervisor would, so the run still counts what happens next)."""

    beat: LiveProcess | None = None
    failures: list[str] = field(default_factory=list)
    # Names of processes stopped on purpose right now; the watchdog leaves them alone.
    down: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def start(self) -> FaultSystem:
        super().start()
        self.beat = LiveProcess(
            "beat",
            self.env(CELERY_BEAT_SCHEDULE=str(self.log_dir / "beat-schedule")),
            self.log_dir / "beat.log",
        ).start()
        if not self.wait_worker_ready(60):
            raise RuntimeError(f"the worker did not start: {_tail(self.worker_log)}")
        return self

    @property
    def worker_log(self) -> Path:
        assert self.worker is not None
        return self.worker.log_path

    def processes(self) -> list[tuple[str, LiveProcess]]:
        named = [(f"web{index}", web) for index, (_, web) in enumerate(self.webs)]
        if self.worker:
            named.append(("worker", self.worker))
        if self.beat:
            named.append(("beat", self.beat))
        return named

    def wait_worker_ready(self, timeout: float = 30.0) -> bool:
        """The worker serves its metrics port from Celery's worker_ready signal, i.e. once it
        is connected to the broker and consuming."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _port_open(self.worker_metrics_port):
                return True
            time.sleep(0.1)
        return False

    def kill_worker(self) -> None:
        assert self.worker is not None and self.worker.process is not None
        with self.lock:
            self.down.add("worker")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.worker.process.pid, signal.SIGKILL)
            self.worker.process.wait()

    def start_worker(self) -> None:
        assert self.worker is not None
        with self.lock:
            self.worker.start()
            self.down.discard("worker")

    def check_processes(self) -> None:
        with self.lock:
            for name, process in self.processes():
                if name in self.down or process.process is None:
                    continue
                code = process.process.poll()
                if code is not None:
                    self.failures.append(
                        f"{name} exited unasked with {code} at {time.strftime('%H:%M:%S')} "
                        "(started again); its log ends:\n"
                        f"{_tail(process.log_path)}"
                    )
                    process.start()

    def stop(self) -> None:
        with self.lock:
            self.down.update(name for name, _ in self.processes())
            super().stop()
            if self.beat:
                self.beat.stop()


# --- load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Party:
    user_id: str
    token: str


@dataclass(frozen=True)
class Conversation:
    id: str
    parties: tuple[Party, Party]


@dataclass
class Send:
    sender: str
    conversation_id: str
    client_id: str
    body: str
    # One entry per attempt: "202", "503", "500 internal_error", "timeout", "URLError", ...
    outcomes: list[str] = field(default_factory=list)
    message_id: str | None = None
    accepted_at: float | None = None  # wall clock when the 202 arrived
    final: str = "pending"  # "accepted", "refused <status> <code>" or "abandoned"


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]


def request(
    method: str, url: str, token: str, body: dict | None = None, timeout: float = 10.0
) -> Response:
    """One HTTP call; transport failures raise (the caller decides to retry)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw, status, headers = response.read(), response.status, response.headers
    except urllib.error.HTTPError as error:
        raw, status, headers = error.read(), error.code, error.headers
    try:
        parsed = json.loads(raw or b"null")
    except ValueError:
        parsed = raw[:200].decode(errors="replace")
    return Response(status, parsed, {k.lower(): v for k, v in headers.items()})


def _error_code(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code"))
    return "?"


class LoadGenerator:
    """`threads` client threads sending at a combined `rate` per second round the
    conversations, each send with a fresh client_id. A client retries a send with the SAME
    client_id after a transport error, a timeout, a 429 or a 5xx (after Retry-After when
    given), as a real client would, and never after a 202."""

    def __init__(
        self,
        base_url: str,
        conversations: list[Conversation],
        *,
        rate: float,
        threads: int,
        errors: list[str],
        request_timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url
        self.conversations = conversations
        self.rate = rate
        self.thread_count = min(threads, len(conversations))
        self.errors = errors
        self.request_timeout = request_timeout
        self.sends: list[Send] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # no new sends
        self._abandon = threading.Event()  # stop retrying the ones in flight
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.thread_count):
            thread = threading.Thread(
                target=self._guarded, args=(index,), name=f"load-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, retry_grace: float = 30.0) -> None:
        """No new sends; the ones in flight get `retry_grace` seconds to be accepted."""
        self._stop.set()
        deadline = time.monotonic() + retry_grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._abandon.set()
        for thread in self._threads:
            thread.join(self.request_timeout + 5)
            if thread.is_alive():
                self.errors.append(f"{thread.name} did not stop")

    def _guarded(self, index: int) -> None:
        # A failure of a load thread must fail the test, not vanish with the thread.
        try:
            self._run(index)
        except BaseException:
            self.errors.append(f"load thread {index} raised:\n{traceback.format_exc()}")

    def _run(self, index: int) -> None:
        mine = self.conversations[index :: self.thread_count]
        interval = self.thread_count / self.rate
        # Staggered starts, so the threads do not fire in lockstep.
        due = time.monotonic() + interval * index / self.thread_count
        turn = 0
        while not self._stop.is_set():
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
                if self._stop.is_set():
                    break
            elif delay < -interval:
                due = time.monotonic()  # behind after an outage: carry on, no burst
            due += interval
            conversation = mine[turn % len(mine)]
            sender = conversation.parties[(turn // len(mine)) % 2]
            turn += 1
            self._send(conversation, sender)

    def _send(self, conversation: Conversation, sender: Party) -> None:
        client_id = uuid.uuid4().hex
        send = Send(sender.user_id, conversation.id, client_id, f"fault load {client_id}")
        with self._lock:
            self.sends.append(send)
        url = f"{self.base_url}/v1/conversations/{conversation.id}/messages"
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = request(
                    "POST",
                    url,
                    sender.token,
                    {"body": send.body, "client_id": client_id},
                    timeout=self.request_timeout,
                )
            except TimeoutError:
                send.outcomes.append("timeout")
            except urllib.error.URLError as error:
                reason = error.reason
                timed_out = isinstance(reason, TimeoutError)
                send.outcomes.append("timeout" if timed_out else type(reason).__name__)
            except (OSError, http.client.HTTPException) as error:
                send.outcomes.append(type(error).__name__)
            else:
                if response.status == 202:
                    send.outcomes.append("202")
                    send.message_id = str(response.body["id"])
                    send.accepted_at = time.time()
                    send.final = "accepted"
                    return
                outcome = str(response.status)
                if response.status >= 500 and response.status != 503:
                    outcome += f" {_error_code(response.body)}"
                if response.status == 503:
                    header = response.headers.get("retry-after")
                    if header is None:
                        outcome = f"503 {_error_code(response.body)} without Retry-After"
                    else:
                        with contextlib.suppress(ValueError):
                            retry_after = min(5.0, float(header))
                send.outcomes.append(outcome)
                if response.status != 429 and response.status < 500:
                    send.final = f"refused {response.status} {_error_code(response.body)}"
                    return
            if self._abandon.is_set():
                send.final = "abandoned"
                return
            attempt += 1
            backoff = min(2.0, 0.2 * 2 ** min(attempt, 4)) * random.uniform(0.5, 1.0)
            self._abandon.wait(retry_after if retry_after is not None else backoff)


# --- faults and counting -------------------------------------------------------------------


WORKER_KILL, REDIS_RESTART, POSTGRES_RESTART = "worker kill", "Redis restart", "PostgreSQL restart"


@dataclass
class Fault:
    kind: str
    started: float  # wall clock
    recovered: float | None = None  # wall clock when the component was back (None: never)
    note: str = ""


def fault_plan(kills: int, redis_restarts: int, postgres_restarts: int) -> list[str]:
    """Kills interleaved with the server restarts: kill, Redis, kill, PostgreSQL, kill, ..."""
    others: list[str] = []
    for index in range(max(redis_restarts, postgres_restarts)):
        if index < redis_restarts:
            others.append(REDIS_RESTART)
        if index < postgres_restarts:
            others.append(POSTGRES_RESTART)
    plan: list[str] = []
    remaining_kills = kills
    while remaining_kills or others:
        if remaining_kills:
            plan.append(WORKER_KILL)
            remaining_kills -= 1
        if others:
            plan.append(others.pop(0))
    return plan


@dataclass
class Latency:
    seconds: float
    message_id: str


@dataclass
class Report:
    rate: float
    duration: float
    conversations: int
    faults: list[Fault]
    sends: int
    accepted: int
    refused: Counter[str]
    abandoned: int
    responses: Counter[str]
    stored: int
    rejected: int
    lost: list[str]
    lost_in_broker: int
    duplicated: list[str]
    stuck: list[str]
    unknown_rows: int
    server_errors: Counter[str]
    has_decided_at: bool
    converged_after: float | None  # seconds after the last fault's recovery
    longest: dict[str, Latency | None]
    errors: list[str]
    wall_seconds: float
    logs: str = ""
    # store_sends tasks the web enqueued, and the sends they held (its /metrics)
    batch_tasks: int = 0
    batched_sends: int = 0
    batch_window_ms: float = 0.0  # SWITCHBOARD_SEND_BATCH_WINDOW_MS of the run

    def problems(self) -> list[str]:
        """What breaks the contract; empty when the run is clean."""
        found = []
        if self.errors:
            found.append(f"{len(self.errors)} thread/process failures")
        if self.lost:
            found.append(f"{len(self.lost)} lost: {self.lost[:5]}")
        if self.duplicated:
            found.append(f"{len(self.duplicated)} duplicated: {self.duplicated[:5]}")
        if self.stuck:
            found.append(f"{len(self.stuck)} stuck queued: {self.stuck[:5]}")
        if self.server_errors:
            found.append(f"server errors: {dict(self.server_errors)}")
        if self.refused:
            found.append(f"valid sends refused: {dict(self.refused)}")
        if self.abandoned:
            found.append(f"{self.abandoned} sends never accepted, retried to the end")
        if self.unknown_rows:
            found.append(f"{self.unknown_rows} message rows no client sent")
        if self.batched_sends <= self.batch_tasks and self.batching_expected():
            found.append(
                f"no send shared a task ({self.batched_sends} sends in {self.batch_tasks}"
                " tasks): the batched path was not exercised"
            )
        return found

    def batching_expected(self) -> bool:
        """Whether the offered rate keeps a batcher's window open (workers/send_batches.py):
        below that, sends go out one a task by design and none sharing is no failure."""
        return holds_window(int(self.rate), self.batch_window_ms / 1000)

    def render(self) -> str:
        kinds = Counter(fault.kind for fault in self.faults)
        lines = [
            f"faults: {kinds[WORKER_KILL]} worker SIGKILLs, {kinds[REDIS_RESTART]} Redis "
            f"restarts, {kinds[POSTGRES_RESTART]} PostgreSQL restarts under {self.rate:g} "
            f"sends/s for {self.duration:g} s across {self.conversations} conversations",
            f"sends: {self.sends} attempted, {self.accepted} accepted (202), "
            f"{sum(self.refused.values())} refused, {self.abandoned} abandoned",
            "responses: "
            + ", ".join(f"{key} x {count}" for key, count in self.responses.most_common()),
            f"decided: {self.stored} stored, {self.rejected} rejected",
            f"lost: {len(self.lost)} (of which {self.lost_in_broker} still in the broker)",
            f"duplicated: {len(self.duplicated)}",
            f"stuck (queued at the end): {len(self.stuck)}",
            f"500s (any 5xx but 503 with Retry-After): {sum(self.server_errors.values())}",
            f"thread/process failures: {len(self.errors)}",
            f"batches: {self.batched_sends} sends enqueued in {self.batch_tasks} tasks"
            + ("" if self.batching_expected() else " (too few sends a second to share one)"),
        ]
        if self.converged_after is None:
            lines.append("converged: no, within the bounded wait")
        else:
            lines.append(
                f"converged: yes, by {self.converged_after:.1f} s after the last fault "
                "(checked from the end of the load on)"
            )
        if not self.has_decided_at:
            lines.append("accept-to-decided: n/a (no messages.decided_at column)")
        else:
            for kind, latency in self.longest.items():
                text = "none decided" if latency is None else f"{latency.seconds:.2f} s"
                lines.append(f"longest accept-to-decided, {kind}: {text}")
        for fault in self.faults:
            back = "never" if fault.recovered is None else f"{fault.recovered - fault.started:.1f}"
            lines.append(
                f"  {fault.kind} at +{fault.started:.1f} s, back after {back} s {fault.note}"
            )
        lines.append(f"wall time: {self.wall_seconds:.0f} s")
        lines.extend(self.errors)
        return "\n".join(lines)


def _send_batches(base_url: str) -> tuple[int, int]:
    """(tasks, sends) from the web's `switchboard_send_batch_size` histogram."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for name in ("count", "sum"):
        found = re.search(rf"^switchboard_send_batch_size_{name} (\S+)$", text, re.MULTILINE)
        values[name] = int(float(found.group(1))) if found else 0
    return values["count"], values["sum"]


def _ids_in_broker(redis_url: str, ids: list[str]) -> int:
    """How many of `ids` still sit in the Redis broker (queued, or unacked awaiting the
    visibility timeout): lost for now, maybe not for good. A diagnostic only."""
    if not ids:
        return 0
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        blobs = [*client.lrange("direct", 0, -1), *client.hvals("unacked")]
    except redis.RedisError:
        return 0
    finally:
        client.close()
    texts = []
    for blob in blobs:
        text = blob.decode(errors="replace")
        texts.append(text)
        with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
            parsed = json.loads(text)
            message = parsed[0] if isinstance(parsed, list) else parsed
            texts.append(base64.b64decode(message["body"]).decode(errors="replace"))
    joined = "\n".join(texts)
    return sum(1 for message_id in ids if message_id in joined)


class Scenario:
    """One fault run; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        rate: float = 30.0,
        duration: float = 60.0,
        conversations: int = 20,
        threads: int = 6,
        kills: int = 4,
        redis_restarts: int = 2,
        postgres_restarts: int = 1,
        outage: float = 3.0,
        worker_restart_delay: float = 1.0,
        settle: float = 60.0,
        batch_window_ms: float = 100.0,
        log: Log = print,
    ) -> None:
        self.directory = directory
        self.rate = rate
        self.duration = duration
        self.conversation_count = conversations
        self.threads = threads
        self.plan = fault_plan(kills, redis_restarts, postgres_restarts)
        self.outage = outage
        self.worker_restart_delay = worker_restart_delay
        self.settle = settle
        self.batch_window_ms = batch_window_ms
        self.log = log
        self.errors: list[str] = []
        self.t0 = time.time()

    def _say(self, text: str) -> None:
        self.log(f"[faults +{time.time() - self.t0:5.1f}s] {text}")

    def run(self) -> Report:
        self.t0 = time.time()
        postgres = PostgresServer(self.directory / "postgres")
        redis_server = RedisServer(self.directory / "redis", persistent=True)
        # The test run's store when there is one (LiveSystem passes it on), else our own.
        seaweed = None if S3_ENV else SeaweedServer(self.directory / "s3")
        system: FaultSystem | None = None
        load: LoadGenerator | None = None
        watchdog_stop = threading.Event()
        watchdog: threading.Thread | None = None
        try:
            postgres.init().start()
            postgres.create_database()
            upgrade_database(postgres.url)
            redis_server.start()
            if seaweed is not None:
                seaweed.start()
            self._say(
                f"PostgreSQL :{postgres.port} (pid {postgres.pid}), Redis :{redis_server.port}"
            )
            env = live_env(postgres.url, redis_server.url, seaweed.env() if seaweed else None)
            # Wide enough that sends share tasks at this rate: the kills then land on
            # batches, which must lose and duplicate nothing either.
            env["SWITCHBOARD_SEND_BATCH_WINDOW_MS"] = str(self.batch_window_ms)
            # Assigned before starting, so a start that fails half-way is still stopped.
            system = FaultSystem(env, self.directory / "logs")
            system.start()
            conversations = self._provision(system.url(), env)
            self._say(f"web, worker, beat up; {len(conversations)} conversations")

            def watch() -> None:
                assert system is not None
                while not watchdog_stop.wait(0.25):
                    try:
                        system.check_processes()
                    except Exception:
                        self.errors.append(f"watchdog raised:\n{traceback.format_exc()}")

            watchdog = threading.Thread(target=watch, name="watchdog", daemon=True)
            watchdog.start()
            load = LoadGenerator(
                system.url(),
                conversations,
                rate=self.rate,
                threads=self.threads,
                errors=self.errors,
            )
            load_started = time.monotonic()
            load.start()
            faults = self._drive_faults(system, postgres, redis_server, load_started)
            self._sleep_until(load_started + self.duration)
            load.stop()
            self._say(f"load stopped: {len(load.sends)} sends")
            batches = _send_batches(system.url())
            last = max((f.recovered or f.started for f in faults), default=time.time())
            converged_at = self._wait_converged(postgres, load, last + self.settle)
            converged_after = None if converged_at is None else max(0.0, converged_at - last)
            watchdog_stop.set()
            watchdog.join()
            system.check_processes()
            self.errors.extend(system.failures)
            report = self._count(postgres, redis_server, load, faults, converged_after)
            report.batch_tasks, report.batched_sends = batches
            report.logs = system.logs() + "\n--- postgres\n" + _tail(postgres.log_path)
            return report
        finally:
            watchdog_stop.set()
            # Every stop runs even if one before it fails: nothing we started may outlive us.
            stops: list[Callable[[], None]] = []
            if watchdog is not None:
                stops.append(watchdog.join)
            if load is not None:
                stops.append(lambda: load.stop(retry_grace=0))
            if system is not None:
                stops.append(system.stop)
            if seaweed is not None:
                stops.append(seaweed.stop)
            stops += [redis_server.stop, postgres.stop, postgres.remove]
            failed = []
            for stop in stops:
                try:
                    stop()
                except Exception:
                    failed.append(traceback.format_exc())
            if failed:
                raise RuntimeError("stopping the fault run failed:\n" + "\n".join(failed))

    def _provision(self, base_url: str, env: dict[str, str]) -> list[Conversation]:
        """Two privileged members per conversation, so either side may send."""
        settings = load_settings(env)
        conversations = []
        for index in range(self.conversation_count):
            parties = []
            for side in "ab":
                user_id = f"f-{side}-{index}"
                response = request(
                    "PUT",
                    f"{base_url}/v1/admin/users/{user_id}",
                    SERVICE_TOKEN,
                    {"tenant": TENANT, "role": "member", "tier": "privileged",
                     "display_name": user_id},
                )  # fmt: skip
                assert response.status in (200, 201), (user_id, response)
                token = mint_token(settings, user_id, TENANT, ttl=timedelta(hours=2))
                parties.append(Party(user_id, token))
            response = request(
                "POST",
                f"{base_url}/v1/conversations",
                parties[0].token,
                {"participant_id": parties[1].user_id},
            )
            assert response.status in (200, 201), response
            conversations.append(Conversation(response.body["id"], (parties[0], parties[1])))
        return conversations

    def _sleep_until(self, moment: float) -> None:
        delay = moment - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _drive_faults(
        self,
        system: FaultSystem,
        postgres: PostgresServer,
        redis_server: RedisServer,
        load_started: float,
    ) -> list[Fault]:
        """The plan spread evenly from 5 s in to 10 s before the load ends."""
        first, last = 5.0, max(6.0, self.duration - 10.0)
        gap = (last - first) / max(1, len(self.plan) - 1)
        faults = []
        for index, kind in enumerate(self.plan):
            self._sleep_until(load_started + first + gap * index)
            fault = Fault(kind, time.time())
            faults.append(fault)
            if kind == WORKER_KILL:
                system.kill_worker()
                time.sleep(self.worker_restart_delay)  # a supervisor restarts after a moment
                system.start_worker()
                if not system.wait_worker_ready(30):
                    fault.note = "(worker not consuming 30 s after its restart)"
            elif kind == REDIS_RESTART:
                redis_server.stop()
                time.sleep(self.outage)
                redis_server.start()
            else:
                postgres.crash()
                time.sleep(self.outage)
                postgres.start()
            if not fault.note:
                fault.recovered = time.time()
            self._say(f"{kind} done {fault.note}")
        return faults

    def _wait_converged(
        self, postgres: PostgresServer, load: LoadGenerator, deadline: float
    ) -> float | None:
        """Wall time when every accepted send is decided and nothing is queued, or None if
        that has not happened by `deadline`."""
        accepted = {send.message_id for send in load.sends if send.message_id}
        while True:
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(postgres.url, connect_timeout=5) as connection:
                    rows = connection.execute("SELECT id::text, status FROM messages").fetchall()
                decided = {row[0] for row in rows if row[1] != "queued"}
                if accepted <= decided and len(decided) == len(rows):
                    self._say("every accepted send decided")
                    return time.time()
            if time.time() > deadline:
                self._say("bounded wait over: some sends still undecided")
                return None
            time.sleep(1.0)

    def _count(
        self,
        postgres: PostgresServer,
        redis_server: RedisServer,
        load: LoadGenerator,
        faults: list[Fault],
        converged_after: float | None,
    ) -> Report:
        with psycopg.connect(postgres.url) as connection:
            has_decided_at = (
                connection.execute(
                    "SELECT 1 FROM information_schema.columns "
                    "WHERE table_name = 'messages' AND column_name = 'decided_at'"
                ).fetchone()
                is not None
            )
            decided = "extract(epoch FROM decided_at)::float8" if has_decided_at else "NULL"
            rows = connection.execute(
                "SELECT id::text, sender_id, client_id, status, "
                f"extract(epoch FROM created_at)::float8, {decided} FROM messages"
            ).fetchall()
            # A send processed twice would announce itself twice.
            repeated_events = connection.execute(
                "SELECT user_id, type, payload->>'id' FROM user_events "
                "WHERE type IN ('message.created', 'message.rejected') "
                "GROUP BY 1, 2, 3 HAVING count(*) > 1"
            ).fetchall()

        sends = load.sends
        by_key: dict[tuple[str, str], list[tuple]] = {}
        for row in rows:
            by_key.setdefault((row[1], row[2]), []).append(row)
        status_of = {row[0]: row[3] for row in rows}
        accepted = [send for send in sends if send.message_id]

        lost = [s.message_id for s in accepted if s.message_id not in status_of]
        duplicated = [
            f"{key} has {len(found)} rows" for key, found in by_key.items() if len(found) > 1
        ]
        duplicated += [
            f"{s.message_id} answered, {[r[0] for r in by_key[(s.sender, s.client_id)]]} stored"
            for s in accepted
            if (s.sender, s.client_id) in by_key
            and s.message_id not in {r[0] for r in by_key[(s.sender, s.client_id)]}
        ]
        duplicated += [f"{event[1]} {event[2]} twice for {event[0]}" for event in repeated_events]
        sent_keys = {(send.sender, send.client_id) for send in sends}

        responses: Counter[str] = Counter()
        for send in sends:
            responses.update(send.outcomes)
        server_errors = Counter(
            {key: count for key, count in responses.items() if key[:1] == "5" and key != "503"}
        )

        # Accept-to-decided around each kind of fault: sends accepted from 5 s before the
        # fault (in flight when it hit) to 5 s after the component was back.
        longest: dict[str, Latency | None] = {}
        if has_decided_at:
            timed = [(row[4], row[5] - row[4], row[0]) for row in rows if row[5] is not None]
            for kind in (WORKER_KILL, REDIS_RESTART, POSTGRES_RESTART):
                windows = [
                    (f.started - 5, (f.recovered or f.started) + 5)
                    for f in faults
                    if f.kind == kind
                ]
                if not windows:
                    continue
                near = [t for t in timed if any(lo <= t[0] <= hi for lo, hi in windows)]
                worst = max(near, default=None, key=lambda t: t[1])
                longest[f"sends accepted around a {kind}"] = (
                    None if worst is None else Latency(worst[1], worst[2])
                )
            worst = max(timed, default=None, key=lambda t: t[1])
            longest["any send"] = None if worst is None else Latency(worst[1], worst[2])

        return Report(
            rate=self.rate,
            duration=self.duration,
            conversations=self.conversation_count,
            faults=[
                Fault(f.kind, f.started - self.t0, f.recovered and f.recovered - self.t0, f.note)
                for f in faults
            ],
            sends=len(sends),
            accepted=len(accepted),
            refused=Counter(s.final for s in sends if s.final.startswith("refused")),
            abandoned=sum(1 for s in sends if s.final in ("abandoned", "pending")),
            responses=responses,
            stored=sum(1 for s in accepted if status_of.get(s.message_id) == "stored"),
            rejected=sum(1 for s in accepted if status_of.get(s.message_id) == "rejected"),
            lost=[i for i in lost if i],
            lost_in_broker=_ids_in_broker(redis_server.url, [i for i in lost if i]),
            duplicated=duplicated,
            stuck=[row[0] for row in rows if row[3] == "queued"],
            unknown_rows=sum(1 for key in by_key if key not in sent_keys),
            server_errors=server_errors,
            has_decided_at=has_decided_at,
            converged_after=converged_after,
            longest=longest,
            errors=list(self.errors),
            wall_seconds=time.time() - self.t0,
            batch_window_ms=self.batch_window_ms,
        )
