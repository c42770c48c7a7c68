"""WebSocket stream benchmark: open sockets, send-to-socket latency, broadcast-sized fan-out.

    .venv/bin/python bench/stream_load.py                    # 5,000 sockets, 200 msg/s, 30 s
    .venv/bin/python bench/stream_load.py --sockets 1000 --rate 100 --duration 10
    .venv/bin/python bench/stream_load.py --deflate          # clients offer permessage-deflate

It creates a database of its own, provisions N members of one bookstore tenant and N/2
two-person conversations between them, starts ONE web process (the Procfile's gunicorn line,
WEB_CONCURRENCY=1, gevent) and the Procfile's Celery `worker` line, and then:

1. opens N sockets on `/v1/stream?last_event_id=0`, one per user, from a few client
   processes (each a plain epoll loop over raw non-blocking sockets: no greenlets, frames
   parsed only as far as the header while measuring), and reads the web worker's RSS;
2. sends direct messages over HTTP at a steady open-loop rate between pairs whose sockets
   are open and times each `message.created` frame from the moment its HTTP send was
   issued (same monotonic clock, same machine); also reads the server's own
   `switchboard_delivery_latency_seconds` histogram from /metrics;
3. appends one `broadcast.created` event for all N users in ONE transaction (what a
   broadcast worker will do), commits (the after-commit hook announces the N events on
   Redis) and times the arrival on every socket from just before the commit.

Everything talks to 127.0.0.1 only; every wait is bounded; the processes it started are
stopped and its database is dropped on exit (Ctrl-C included; --keep-db keeps the data).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import http.client
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TENANT = "stream-bench"
SERVICE_TOKEN = "stream-bench-service-token-0123456789"
JWT_SECRET = "stream-bench-jwt-secret-0123456789abcdefghijklmnop"
BAR_P50_MS, BAR_P99_MS, BAR_BROADCAST_MS, BAR_SOCKETS = 20.0, 100.0, 1000.0, 5000


# ----------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    env = os.environ.get
    parser.add_argument("--sockets", type=int, default=5000, help="open sockets, one per user")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of steady sending")
    parser.add_argument("--broadcasts", type=int, default=3, help="broadcast rounds")
    parser.add_argument(
        "--client-procs", type=int, default=2, help="client processes holding the sockets"
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=128,
        help="WebSocket handshakes in flight at once, over all client processes",
    )
    parser.add_argument("--sender-threads", type=int, default=64, help="HTTP sender threads")
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="clients offer permessage-deflate, as browsers do (default: plain frames)",
    )
    parser.add_argument("--warmup-sends", type=int, default=20, help="unmeasured sends first")
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="idle time measured after opening"
    )
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--connect-timeout", type=float, default=120.0, help="for all N sockets")
    parser.add_argument(
        "--pg-url",
        default=env("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL URL with rights to create databases (default: %(default)s)",
    )
    parser.add_argument("--db-name", default="switchboard_stream_bench")
    parser.add_argument(
        "--redis-url",
        default=env("BENCH_STREAM_REDIS_URL", "redis://127.0.0.1:6379/11"),
        help="a Redis database of the benchmark's own: it is flushed at start",
    )
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database at exit")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="wait up to this many seconds for the machine to be under 15%% busy before the "
        "measured phases (other work on it skews every figure) (%(default)s)",
    )
    parser.add_argument("--port", type=int, default=0, help="web port (default: a free one)")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=int(env("WORKER_CONCURRENCY", "8")),
        help="Celery threads of the direct-message worker (Procfile default 8)",
    )
    args = parser.parse_args(argv)
    if args.sockets < 2 or args.sockets % 2:
        parser.error("--sockets: an even number, at least 2 (users are paired)")
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    if not 1 <= args.client_procs <= 16 or args.connect_concurrency < 1:
        parser.error("--client-procs: 1..16; --connect-concurrency: at least 1")
    if args.sender_threads < 1 or args.broadcasts < 0 or args.warmup_sends < 0:
        parser.error("--sender-threads >= 1, --broadcasts >= 0, --warmup-sends >= 0")
    return args


# ----------------------------------------------------------------------------- small helpers


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of unsorted values (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


BAR_LINES: list[str] = []


def print_bar(text: str) -> None:
    """Print a line comparing a figure with its DESIGN.md bar; repeated in the summary."""
    BAR_LINES.append(text)
    print(text)


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def postgres_backends(database: str) -> list[int]:
    """PostgreSQL's backend processes connected to `database` (read from /proc only)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if command.startswith(b"postgres: ") and f" {database} ".encode() in command:
            found.append(int(entry))
    return found


def pid_of(command_name: str) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == command_name:
                    return int(entry)
    return None


class HealthProbe:
    """GET /health on the web process every `interval` seconds over one keep-alive
    connection, from a thread of its own: a slow answer means the web worker's one event
    loop was stalled (a long garbage collection, CPU starvation, a blocking call), which
    delays every socket and request of the process at once."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port, self.interval = port, interval
        self.samples: list[tuple[float, float]] = []  # (sent at, seconds to answer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> HealthProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self._stop.wait(self.interval):
                sent = time.monotonic()
                try:
                    connection.request("GET", "/health")
                    connection.getresponse().read()
                except (OSError, http.client.HTTPException):
                    connection.close()
                    continue
                self.samples.append((sent, time.monotonic() - sent))
        finally:
            connection.close()

    def summary(self, since: float) -> str:
        waits = [w for sent, w in self.samples if sent >= since]
        if not waits:
            return "no /health probes answered"
        stalls = sum(1 for w in waits if w > 0.1)
        return (
            f"/health probe every {self.interval * 1000:.0f} ms: p50 {pct(waits, 50) * 1000:.1f} "
            f"ms, p99 {pct(waits, 99) * 1000:.1f} ms, max {max(waits) * 1000:.0f} ms, "
            f"{stalls} of {len(waits)} over 100 ms"
        )


@dataclass
class CpuMeter:
    """CPU used over a phase by each process of the benchmark (this one with its sender
    threads, the clients, the web worker, the Celery worker, PostgreSQL's backends of the
    benchmark's database, Redis) and by the machine as a whole."""

    pids: dict[str, list[int]]
    database: str
    probe: HealthProbe | None = None
    start: dict[str, Any] = field(default_factory=dict)

    def sample(self) -> dict[str, Any]:
        busy, total = machine_cpu()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        per_pid = {
            name: {pid: proc_cpu_seconds(pid) for pid in pids} for name, pids in self.pids.items()
        }
        per_pid["postgres"] = {
            pid: proc_cpu_seconds(pid) for pid in postgres_backends(self.database)
        }
        redis_pid = pid_of("redis-server")
        per_pid["redis-server"] = {redis_pid: proc_cpu_seconds(redis_pid)} if redis_pid else {}
        per_pid["bench+sender"] = {0: usage.ru_utime + usage.ru_stime}
        return {"per_pid": per_pid, "busy": busy, "total": total, "wall": time.monotonic()}

    def begin(self) -> None:
        self.start = self.sample()

    def measure(self) -> dict[str, Any]:
        """Since `begin()`: CPU seconds of each process group ("used"), the machine's busy
        CPU seconds ("busy", all cores) and the wall seconds ("wall")."""
        end = self.sample()
        used = {}
        for name, now in end["per_pid"].items():
            then = self.start["per_pid"].get(name, {})
            used[name] = sum(
                value - then.get(pid, 0.0) for pid, value in now.items() if value == value
            )
        busy = (end["busy"] - self.start["busy"]) / os.sysconf("SC_CLK_TCK")
        return {"used": used, "busy": busy, "wall": max(1e-9, end["wall"] - self.start["wall"])}

    def report(self, measured: dict[str, Any] | None = None) -> str:
        measured = measured or self.measure()
        used, busy, wall = measured["used"], measured["busy"], measured["wall"]
        cores = os.cpu_count() or 1
        other = busy - sum(used.values())
        parts = [f"{name} {cpu:.1f}s ({cpu / wall:.0%})" for name, cpu in used.items()]
        text = (
            f"CPU over {wall:.1f}s (share of one core): "
            + ", ".join(parts)
            + f"; machine {busy / wall / cores:.0%} of {cores} cores busy, of which "
            f"{max(0.0, other) / wall:.0%} of a core outside these processes"
        )
        if self.probe is not None:
            text += "\n  web event loop: " + self.probe.summary(self.start["wall"])
        return text


# ----------------------------------------------------------------------------- the client
#
# A client process owns a shard of the sockets and runs one epoll loop: connects with a
# bounded number of handshakes in flight, answers the server's pings, and for every data
# frame stores (user index, monotonic arrival time, payload) without parsing the JSON; the
# orchestrator asks for the records over a pipe when a phase is over.

_CONNECTING, _HANDSHAKE, _OPEN, _CLOSED = range(4)


class _Conn:
    __slots__ = (
        "buf",
        "close_code",
        "idx",
        "inflate",
        "sock",
        "state",
        "t_open",
        "t_start",
        "token",
    )

    def __init__(self, idx: int, sock: socket.socket, t_start: float, token: str) -> None:
        self.idx, self.sock, self.t_start, self.token = idx, sock, t_start, token
        self.state, self.buf, self.t_open = _CONNECTING, b"", 0.0
        self.inflate: Any = None
        self.close_code: int | None = None


def _handshake_request(port: int, token: str, deflate: bool) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extension = (
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        if deflate
        else ""
    )
    return (
        f"GET /v1/stream?last_event_id=0 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n{extension}\r\n"
    ).encode()


def client_main(conn: Any, port: int, deflate: bool, max_seconds: float) -> None:
    """One client process. Bounded by `max_seconds` and by its parent's life."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us
    parent = os.getppid()
    ep = select.epoll()
    control = conn.fileno()
    ep.register(control, select.EPOLLIN)
    conns: dict[int, _Conn] = {}
    waiting: deque[tuple[int, str]] = deque()
    handshaking: dict[int, _Conn] = {}
    results: list[tuple[int, bool, str, float, float]] = []
    records: list[tuple[int, float, bytes]] = []
    closes: Counter[str] = Counter()
    closed: list[tuple[int, str]] = []  # (user index, reason) of sockets lost after the 101
    concurrency, handshake_timeout, reply_pending = 64, 30.0, False
    open_count = 0
    marker, marked = b"", 0
    deadline = time.monotonic() + max_seconds
    pong = bytes([0x8A, 0x80]) + b"\0\0\0\0"  # an empty masked pong (mask key 0)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def drop(c: _Conn, reason: str) -> None:
        nonlocal open_count
        fd = c.sock.fileno()
        with contextlib.suppress(OSError, ValueError):
            ep.unregister(fd)
        conns.pop(fd, None)
        if c.state in (_CONNECTING, _HANDSHAKE):
            handshaking.pop(fd, None)
            results.append((c.idx, False, reason, c.t_start, time.monotonic()))
        elif c.state == _OPEN:
            open_count -= 1
            closes[reason] += 1
            closed.append((c.idx, reason))
        c.state = _CLOSED
        c.sock.close()

    def frames(c: _Conn, data: bytes, t: float) -> None:
        nonlocal marked
        buf = c.buf + data if c.buf else data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            if buf.startswith(b"HTTP/", pos):
                # Not a frame: the server wrote an HTTP response on the upgraded socket.
                status = bytes(buf[pos : pos + 60]).split(b"\r\n", 1)[0].decode(errors="replace")
                c.buf = b""
                drop(c, f"HTTP response after the 101: {status}")
                return
            b0, b1 = buf[pos], buf[pos + 1]
            length, header = b1 & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            stop = pos + header + length
            if stop > end:
                break
            payload, opcode = buf[pos + header : stop], b0 & 0x0F
            pos = stop
            if opcode in (0x1, 0x2):
                if b0 & 0x40:  # RSV1: permessage-deflate
                    if c.inflate is None:
                        c.inflate = zlib.decompressobj(-15)
                    payload = c.inflate.decompress(payload + b"\0\0\xff\xff")
                records.append((c.idx, t, payload))
                if marker and marker in payload:
                    marked += 1
            elif opcode == 0x9:
                with contextlib.suppress(OSError):
                    c.sock.send(pong if not payload else _masked(0xA, payload))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                c.close_code = code
                c.buf = b""
                drop(c, f"close frame {code} {payload[2:62].decode(errors='replace')}".strip())
                return
        c.buf = buf[pos:]

    def start(idx: int, token: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(idx, sock, time.monotonic(), token)
        err = sock.connect_ex(("127.0.0.1", port))
        fd = sock.fileno()
        conns[fd] = c
        handshaking[fd] = c
        if err not in (0, errno.EINPROGRESS):
            drop(c, f"connect: {errno.errorcode.get(err, err)}")
            return
        ep.register(fd, select.EPOLLOUT)

    def on_event(c: _Conn, events: int) -> None:
        nonlocal open_count
        fd = c.sock.fileno()
        if c.state == _CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                drop(c, f"connect: {errno.errorcode.get(err, err)}")
                return
            request = _handshake_request(port, c.token, deflate)
            try:
                sent = c.sock.send(request)
            except OSError as exc:
                drop(c, f"handshake write: {exc.__class__.__name__}")
                return
            if sent != len(request):
                drop(c, "handshake write: partial")
                return
            c.state = _HANDSHAKE
            ep.modify(fd, select.EPOLLIN)
            return
        try:
            data = c.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            drop(c, f"recv: {exc.__class__.__name__}")
            return
        t = time.monotonic()
        if not data:
            drop(c, "closed by server without close frame")
            return
        if c.state == _HANDSHAKE:
            c.buf += data
            head, sep, rest = c.buf.partition(b"\r\n\r\n")
            if not sep:
                if len(c.buf) > 65536:
                    drop(c, "handshake: oversized response")
                return
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            if " 101 " not in status + " ":
                drop(c, f"handshake: {status[:60]}")
                return
            c.state, c.t_open, c.buf = _OPEN, t, b""
            handshaking.pop(fd, None)
            open_count += 1
            results.append((c.idx, True, "", c.t_start, t))
            if rest:
                frames(c, rest, t)
            return
        frames(c, data, t)

    def command(message: tuple) -> bool:
        nonlocal concurrency, handshake_timeout, reply_pending, records, marker, marked
        kind = message[0]
        if kind == "connect":
            waiting.extend(message[1])
            concurrency, handshake_timeout = message[2], message[3]
            reply_pending = True
        elif kind == "mark":
            marker, marked = message[1], 0
        elif kind == "count":
            conn.send(("count", marked, open_count, dict(closes), cpu()))
        elif kind == "collect":
            conn.send(("records", records, open_count, dict(closes), cpu()))
            records = []
        elif kind == "closed":
            conn.send(("closed", list(closed), open_count, dict(closes), cpu()))
        elif kind == "stop":
            conn.send(("stopped", open_count, dict(closes), cpu()))
            return False
        return True

    running = True
    try:
        while running and time.monotonic() < deadline:
            while waiting and len(handshaking) < concurrency:
                start(*waiting.popleft())
            for fd, events in ep.poll(0.05 if handshaking or waiting else 0.5):
                if fd == control:
                    while running and conn.poll():
                        running = command(conn.recv())
                    continue
                c = conns.get(fd)
                if c is not None:
                    on_event(c, events)
            if handshaking:
                now = time.monotonic()
                for c in [c for c in handshaking.values() if now - c.t_start > handshake_timeout]:
                    drop(c, "handshake: timed out")
            if reply_pending and not waiting and not handshaking:
                conn.send(("connected", results, open_count, cpu()))
                results, reply_pending = [], False
            if os.getppid() != parent:
                break
    finally:
        for c in list(conns.values()):
            c.sock.close()
        ep.close()


def _masked(opcode: int, payload: bytes) -> bytes:
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


class Clients:
    """The client processes, driven over pipes."""

    def __init__(self, count: int, port: int, deflate: bool, max_seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        for _ in range(count):
            mine, theirs = context.Pipe()
            process = context.Process(
                target=client_main, args=(theirs, port, deflate, max_seconds), daemon=True
            )
            process.start()
            theirs.close()
            self.pipes.append(mine)
            self.processes.append(process)
        self.cpu = [0.0] * count
        self.open = [0] * count
        self.closes: list[dict[str, int]] = [{} for _ in range(count)]

    def _ask(self, message: tuple, timeout: float = 30.0) -> list[tuple]:
        for pipe in self.pipes:
            pipe.send(message)
        return [self._reply(i, timeout) for i in range(len(self.pipes))]

    def _reply(self, index: int, timeout: float) -> tuple:
        if not self.pipes[index].poll(timeout):
            raise TimeoutError(f"client process {index} did not answer in {timeout:.0f}s")
        reply = self.pipes[index].recv()
        self.cpu[index] = reply[-1]
        if reply[0] in ("count", "records", "closed", "stopped"):
            self.open[index], self.closes[index] = reply[-3], reply[-2]
        else:
            self.open[index] = reply[-2]
        return reply

    def connect(
        self, items: list[tuple[int, str]], concurrency: int, timeout: float
    ) -> list[tuple[int, bool, str, float, float]]:
        count = len(self.pipes)
        per_process = max(1, concurrency // count)
        for i, pipe in enumerate(self.pipes):
            pipe.send(("connect", items[i::count], per_process, min(30.0, timeout)))
        results = []
        for i in range(count):
            results.extend(self._reply(i, timeout + 10)[1])
        return results

    def mark(self, marker: bytes) -> None:
        """Count from now on the frames whose payload contains `marker`."""
        for pipe in self.pipes:
            pipe.send(("mark", marker))

    def marked(self) -> int:
        return sum(reply[1] for reply in self._ask(("count",)))

    def closed(self) -> list[tuple[int, str]]:
        """(user index, reason) of every socket the server closed or broke after its 101."""
        found: list[tuple[int, str]] = []
        for reply in self._ask(("closed",)):
            found.extend(reply[1])
        return found

    def collect(self) -> list[tuple[int, float, bytes]]:
        records: list[tuple[int, float, bytes]] = []
        for reply in self._ask(("collect",), timeout=60.0):
            records.extend(reply[1])
        return records

    def total_cpu(self) -> float:
        return sum(self.cpu)

    def stop(self) -> None:
        for i, pipe in enumerate(self.pipes):
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                pipe.send(("stop",))
                self._reply(i, 10.0)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


# ----------------------------------------------------------------------------- processes


def procfile_command(name: str) -> str:
    for line in (REPO / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            return command.strip()
    raise KeyError(name)


@dataclass
class Proc:
    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", "exec " + procfile_command(self.name)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=25)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_healthy(port: int, web: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not web.alive():
            raise RuntimeError(f"web exited:\n{web.tail()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port, "/health", timeout=2)[0] == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"web did not answer /health in {timeout:.0f}s:\n{web.tail()}")


def web_worker_pid(master: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = children_of(master)
        if children:
            return children[0]
        time.sleep(0.1)
    raise RuntimeError("the gunicorn master has no worker process")


def scrape(port: int) -> dict[str, float]:
    """Switchboard's samples on a /metrics page, by their full name with labels."""
    try:
        status, body = http_get(port, "/metrics")
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    samples = {}
    for line in body.decode().splitlines():
        if line.startswith("switchboard_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float, **labels: str
) -> tuple[float, int]:
    """Prometheus-style estimate (linear within a bucket) from the buckets' increase
    between two scrapes, over the series matching `labels`."""
    buckets: dict[float, float] = {}
    for key, value in after.items():
        match = _SAMPLE.fullmatch(key)
        if not match or match[1] != name + "_bucket":
            continue
        found = dict(_LABEL.findall(match[2] or ""))
        if any(found.get(k) != v for k, v in labels.items()) or "le" not in found:
            continue
        bound = float("inf") if found["le"] == "+Inf" else float(found["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return float("nan"), 0
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in ordered:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower, int(total)
            inside = cumulative - below
            share = (rank - below) / inside if inside else 0.0
            return lower + (bound - lower) * share, int(total)
        lower, below = bound, cumulative
    return lower, int(total)


# ----------------------------------------------------------------------------- database


def setup_database(args: argparse.Namespace) -> str:
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from app.cli import upgrade_database
    from app.settings import normalise_database_url

    admin_url = make_url(normalise_database_url(args.pg_url))
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')
        connection.exec_driver_sql(f'CREATE DATABASE "{args.db_name}"')
    admin.dispose()
    url = admin_url.set(database=args.db_name).render_as_string(hide_password=False)
    upgrade_database(url)
    return url


def drop_database(args: argparse.Namespace) -> None:
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from app.settings import normalise_database_url

    admin = sqlalchemy.create_engine(
        make_url(normalise_database_url(args.pg_url)), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')
    admin.dispose()


def user_id(index: int) -> str:
    return f"sb-{index:05d}"


def provision(url: str, count: int) -> list[str]:
    """N members (tier privileged, so they may start conversations) and N/2 conversations
    (2k with 2k+1), through the services the admin API and the start endpoint use."""
    from app.db import Database
    from app.models import User
    from app.policy import load_policy
    from app.services.conversations import start_conversation
    from app.services.users import UserUpsert, upsert_user

    policy = load_policy("bookstore")
    database = Database(url, pool_size=1)
    conversations = []
    try:
        with database.transaction() as session:
            for i in range(count):
                upsert_user(
                    session,
                    policy,
                    UserUpsert(user_id(i), TENANT, "member", f"Bench {i}", tier="privileged"),
                )
        with database.transaction() as session:
            for i in range(0, count, 2):
                starter = session.get_one(User, user_id(i))
                conversation, _ = start_conversation(session, policy, starter, user_id(i + 1), None)
                conversations.append(str(conversation.id))
    finally:
        database.dispose()
    return conversations


# ----------------------------------------------------------------------------- the sender


NOT_ISSUED = -1  # status of a send the sender gave up on before issuing it


@dataclass
class Sends:
    scheduled: list[float]
    issued: list[float]
    done: list[float]
    status: list[int]  # HTTP status; 0: no answer; NOT_ISSUED
    errors: Counter[str] = field(default_factory=Counter)


def send_steady(
    port: int,
    jobs: list[tuple[str, str, str]],  # (token, conversation id, client id)
    rate: float,
    threads: int,
    body_prefix: str,
    grace: float = 30.0,
) -> Sends:
    """Issue `jobs` at `rate` per second (open loop: due on schedule, whether or not earlier
    ones have been answered), each over a keep-alive connection of one of `threads` sender
    threads. Sends still waiting for a free thread `grace` seconds after the last one was
    due are not issued at all (NOT_ISSUED), so nothing is left sending after it returns."""
    count = len(jobs)
    sends = Sends([0.0] * count, [0.0] * count, [0.0] * count, [0] * count)
    work: queue.Queue[int | None] = queue.Queue()
    give_up = threading.Event()

    def sender() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while (index := work.get()) is not None:
                if give_up.is_set():
                    sends.status[index] = NOT_ISSUED
                    continue
                token, conversation, client_id = jobs[index]
                body = json.dumps({"body": f"{body_prefix} {index}", "client_id": client_id})
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                path = f"/v1/conversations/{conversation}/messages"
                for attempt in range(2):  # one retry on a dropped keep-alive (idempotent)
                    sends.issued[index] = sends.issued[index] or time.monotonic()
                    try:
                        connection.request("POST", path, body=body, headers=headers)
                        response = connection.getresponse()
                        response.read()
                        sends.status[index] = response.status
                        break
                    except (OSError, http.client.HTTPException) as exc:
                        connection.close()
                        if attempt:
                            sends.errors[exc.__class__.__name__] += 1
                sends.done[index] = time.monotonic()
        finally:
            connection.close()

    pool = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    start = time.monotonic() + 0.1
    for index in range(count):
        due = start + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sends.scheduled[index] = due
        work.put(index)
    for _ in pool:
        work.put(None)
    deadline = time.monotonic() + grace
    for thread in pool:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    give_up.set()
    deadline = time.monotonic() + 40  # the requests in flight time out after 30 s
    for thread in pool:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    return sends


def wait_frames(clients: Clients, expected: int, timeout: float, interval: float) -> float:
    """Poll the clients until `expected` frames with the current marker arrived, or `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if clients.marked() >= expected:
            break
        time.sleep(interval)
    return time.monotonic() - started


# ----------------------------------------------------------------------------- phases


def parse_records(
    records: list[tuple[int, float, bytes]], sequences: dict[int, list[int]]
) -> list[tuple[int, float, dict]]:
    parsed = []
    for idx, t, payload in records:
        try:
            frame = json.loads(payload)
        except ValueError:
            frame = {"type": "<not json>"}
        if isinstance(frame.get("id"), int):
            sequences.setdefault(idx, []).append(frame["id"])
        parsed.append((idx, t, frame))
    return parsed


def print_header(args: argparse.Namespace, settings: Any) -> None:
    import importlib.metadata as metadata

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in (
            "gunicorn",
            "gevent",
            "greenlet",
            "flask-sock",
            "simple-websocket",
            "wsproto",
            "celery",
            "redis",
            "psycopg",
            "sqlalchemy",
        )
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()[0].split()
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    ports = " ".join(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    print("== Switchboard stream benchmark")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} cores, {int(meminfo[1]) // 1024} MiB RAM, "
        f"{platform.platform()}, Python {platform.python_version()}"
    )
    print(f"limits: RLIMIT_NOFILE {soft}/{hard} (inherited by the server), somaxconn {somaxconn}")
    print(f"        ephemeral ports {ports}")
    print(f"versions: {versions}")
    print(
        f"config: sockets {args.sockets}, rate {args.rate:g}/s for {args.duration:g}s "
        f"({int(args.rate * args.duration)} sends), broadcasts {args.broadcasts}, "
        f"warm-up sends {args.warmup_sends}"
    )
    print(
        f"        client processes {args.client_procs} (epoll, raw sockets), handshakes in "
        f"flight {args.connect_concurrency}, sender threads {args.sender_threads} "
        f"(keep-alive HTTP), permessage-deflate offered: {'yes' if args.deflate else 'no'}"
    )
    print(
        f"server: Procfile web line, WEB_CONCURRENCY=1, Procfile worker line "
        f"WORKER_CONCURRENCY={args.worker_concurrency}; policy bookstore; "
        f"db pool {settings.db_pool_size}+{settings.db_pool_size} overflow"
    )
    connections = int(os.environ.get("SWITCHBOARD_WORKER_CONNECTIONS", "10000"))
    print(
        f"        gunicorn worker_connections {connections} (SWITCHBOARD_WORKER_CONNECTIONS): "
        "sockets and HTTP connections share them"
    )
    if args.sockets + args.sender_threads + 8 > connections:
        print(
            f"!! {args.sockets} sockets + {args.sender_threads} sender connections exceed "
            f"worker_connections {connections}: gevent stops accepting new connections while "
            "its pool is full, so HTTP sends will wait for a free slot"
        )
    print(
        f"        stream queue {settings.stream_queue_size}, ping every "
        f"{settings.stream_ping_interval:g}s, slow-consumer grace "
        f"{settings.stream_slow_consumer_grace:g}s, SO_SNDBUF "
        f"{settings.stream_send_buffer_bytes or 'default'}"
    )
    print(
        f"database: {args.db_name} (dropped at exit: {'no' if args.keep_db else 'yes'}), "
        f"redis: {args.redis_url} (flushed)"
    )


def phase_open(
    args: argparse.Namespace,
    clients: Clients,
    tokens: list[str],
    port: int,
    worker_pid: int,
    meter: CpuMeter,
) -> list[int]:
    """Open the sockets (a tenth first, to separate one-off costs from per-socket ones)."""
    print("\n== 1. Open sockets")
    scrape(port)  # the first /metrics call imports and allocates what later ones reuse
    rss0 = proc_rss_kb(worker_pid)
    print(
        f"web worker pid {worker_pid}: RSS {rss0 / 1024:.1f} MiB, threads "
        f"{proc_threads(worker_pid)}, fds {proc_fds(worker_pid)} before any socket"
    )
    first = max(1, args.sockets // 10)
    stages = [list(range(first)), list(range(first, args.sockets))]
    results: list[tuple[int, bool, str, float, float]] = []
    rss_stage: list[int] = []
    held_stage: list[int] = []  # sockets the server held when the RSS was read
    durations: list[float] = []
    meter.begin()
    deadline = time.monotonic() + args.connect_timeout
    for stage in stages:
        if not stage:
            continue
        started = time.monotonic()
        stage_results = clients.connect(
            [(i, tokens[i]) for i in stage],
            args.connect_concurrency,
            max(5.0, deadline - time.monotonic()),
        )
        durations.append(time.monotonic() - started)
        results.extend(stage_results)
        opened = sum(1 for r in results if r[1])
        settle_until = time.monotonic() + 30
        while time.monotonic() < settle_until:
            if scrape(port).get("switchboard_sockets_open", -1) >= opened:
                break
            time.sleep(0.2)
        # Let the writers finish their replay reads (CPU falls quiet).
        for _ in range(50):
            before = proc_cpu_seconds(worker_pid)
            time.sleep(0.2)
            if proc_cpu_seconds(worker_pid) - before < 0.02:
                break
        rss_stage.append(proc_rss_kb(worker_pid))
        gauge = scrape(port).get("switchboard_sockets_open")
        held_stage.append(int(gauge) if gauge is not None else opened)
        print(
            f"  stage: {len(stage)} handshakes in {durations[-1]:.2f}s "
            f"({len(stage) / durations[-1]:.0f}/s); {opened} open; "
            f"web RSS {rss_stage[-1] / 1024:.1f} MiB"
        )
    cpu_report = meter.report()
    ok = [r for r in results if r[1]]
    failures = Counter(r[2] for r in results if not r[1])
    handshake = [r[4] - r[3] for r in ok]
    opened = len(ok)
    total = sum(durations)
    print(
        f"opened {opened} of {args.sockets} sockets in {total:.2f}s "
        f"({opened / max(total, 1e-9):.0f}/s) over {args.client_procs} client processes"
    )
    if failures:
        print(f"failed: {dict(failures.most_common(5))}")
    print(
        f"handshake (TCP connect to 101): p50 {pct(handshake, 50) * 1000:.1f} ms, "
        f"p99 {pct(handshake, 99) * 1000:.1f} ms, max {max(handshake or [0]) * 1000:.1f} ms"
    )
    metrics = scrape(port)
    rss1 = rss_stage[-1]
    print(
        f"web worker: RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB "
        f"(+{(rss1 - rss0) / 1024:.1f} MiB), threads {proc_threads(worker_pid)}, "
        f"fds {proc_fds(worker_pid)}, server sockets_open gauge "
        f"{metrics.get('switchboard_sockets_open', float('nan')):.0f}"
    )
    held = held_stage[-1] if held_stage else 0
    if held > 0:
        print(
            f"memory per open socket: {(rss1 - rss0) / held:.1f} KiB "
            f"(all-in, over the {held} sockets the server held)"
        )
    if len(rss_stage) == 2 and held_stage[1] > held_stage[0]:
        marginal = (rss_stage[1] - rss_stage[0]) / (held_stage[1] - held_stage[0])
        print(
            f"memory per open socket: {marginal:.1f} KiB "
            f"(marginal, sockets {held_stage[0]}..{held_stage[1]})"
        )
    print(cpu_report)
    if args.idle_seconds > 0 and opened:
        meter.begin()
        time.sleep(args.idle_seconds)
        print(f"idle, {opened} sockets open and pinged by the server: {meter.report()}")
    lost = clients.closed()
    if lost:
        reasons = Counter(reason for _, reason in lost)
        print(
            f"!! {len(lost)} sockets were closed or broken by the server after their 101, "
            f"before any event was sent: {dict(reasons.most_common(3))}"
        )
    lost_users = {idx for idx, _ in lost}
    still_open = [r[0] for r in ok if r[0] not in lost_users]
    print_bar(
        f"bar: {BAR_SOCKETS} open sockets on one web process: "
        f"{verdict(len(still_open) >= BAR_SOCKETS)} ({len(still_open)} open and working"
        + (f", {len(lost)} more broke right after opening" if lost else "")
        + ")"
    )
    return still_open


def plan_sends(
    pairs: list[int], tokens: list[str], conversations: list[str], prefix: str, count: int
) -> list[tuple[str, str, str, int, int]]:
    """`count` sends (token, conversation id, client id, sender, recipient) round the pairs
    (conversation p is user 2p with 2p+1), each pair's two users taking turns to send."""
    plan = []
    for index in range(count):
        pair = pairs[index % len(pairs)]
        sender = 2 * pair + (index // len(pairs)) % 2
        plan.append((tokens[sender], conversations[pair], f"{prefix}-{index}", sender, sender ^ 1))
    return plan


def tally_sends(
    plan: list[tuple[str, str, str, int, int]], sends: Sends, frames: list[tuple[int, float, dict]]
) -> dict[str, Any]:
    """Match the frames to the planned sends: latencies (from the moment each send was
    issued; from its scheduled time too), accepted sends whose recipient (or sender's echo)
    frame is missing, duplicates, the sender's lag behind schedule and HTTP times."""
    count = len(plan)
    by_client_id = {p[2]: i for i, p in enumerate(plan)}
    accepted = [i for i in range(count) if sends.status[i] == 202]
    seen: Counter[tuple[int, int]] = Counter()
    recipient_latency, echo_latency, scheduled_latency = [], [], []
    other: Counter[str] = Counter()
    for idx, t, frame in frames:
        data = frame.get("data") or {}
        index = by_client_id.get(data.get("client_id")) if isinstance(data, dict) else None
        if frame.get("type") != "message.created" or index is None:
            other[str(frame.get("type"))] += 1
            continue
        seen[(index, idx)] += 1
        if seen[(index, idx)] > 1:
            continue
        if idx == plan[index][4]:
            recipient_latency.append(t - sends.issued[index])
            scheduled_latency.append(t - sends.scheduled[index])
        else:
            echo_latency.append(t - sends.issued[index])
    missing = sum(1 for i in accepted if (i, plan[i][4]) not in seen)
    missing_echo = sum(1 for i in accepted if (i, plan[i][3]) not in seen)
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    issued = [i for i in range(count) if sends.issued[i]]
    lag = [sends.issued[i] - sends.scheduled[i] for i in issued]
    http_time = [sends.done[i] - sends.issued[i] for i in accepted]
    return {
        "recipient_latency": recipient_latency,
        "echo_latency": echo_latency,
        "scheduled_latency": scheduled_latency,
        "other": other,
        "accepted": accepted,
        "missing": missing,
        "missing_echo": missing_echo,
        "duplicates": duplicates,
        "issued": issued,
        "lag": lag,
        "http_time": http_time,
        "statuses": Counter(sends.status),
        "sent_wall": max(sends.done or [0]) - min(sends.scheduled or [0]),
        "not_issued": sum(1 for status in sends.status if status == NOT_ISSUED),
    }


def phase_steady(
    args: argparse.Namespace,
    clients: Clients,
    port: int,
    tokens: list[str],
    conversations: list[str],
    open_users: set[int],
    meter: CpuMeter,
    sequences: dict[int, list[int]],
    tag: str,
    worker_metrics_port: int,
) -> dict[str, Any]:
    print("\n== 2. Send-to-socket latency at a steady rate")
    pairs = [p for p in range(len(conversations)) if {2 * p, 2 * p + 1} <= open_users]
    if not pairs:
        print("no pair of users with both sockets open: skipped")
        return {}

    # Warm-up: the Celery worker's first tasks, the sender's connections.
    if args.warmup_sends:
        warm = plan_sends(pairs, tokens, conversations, f"{tag}w", args.warmup_sends)
        clients.mark(f'"{tag}w-'.encode())
        send_steady(port, [w[:3] for w in warm], min(args.rate, 50.0), 4, "warm-up")
        wait_frames(clients, 2 * len(warm), 60.0, 0.1)
        parse_records(clients.collect(), sequences)

    count = int(args.rate * args.duration)
    plan = plan_sends(pairs, tokens, conversations, f"{tag}m", count)
    before = scrape(port)
    task_before = scrape(worker_metrics_port)
    clients.mark(f'"{tag}m-'.encode())
    meter.begin()
    sends = send_steady(port, [p[:3] for p in plan], args.rate, args.sender_threads, "hello")
    accepted = [i for i in range(count) if sends.status[i] == 202]
    drain = wait_frames(clients, 2 * len(accepted), args.drain_timeout, 0.1)
    cpu_report = meter.report()
    after = scrape(port)
    task_after = scrape(worker_metrics_port)
    frames = parse_records(clients.collect(), sequences)

    tally = tally_sends(plan, sends, frames)
    recipient_latency, echo_latency = tally["recipient_latency"], tally["echo_latency"]
    scheduled_latency, other, lag = tally["scheduled_latency"], tally["other"], tally["lag"]
    missing, missing_echo, duplicates = tally["missing"], tally["missing_echo"], tally["duplicates"]
    issued, http_time, statuses = tally["issued"], tally["http_time"], tally["statuses"]
    sent_wall, not_issued = tally["sent_wall"], tally["not_issued"]

    print(
        f"scheduled {count} sends at {args.rate:g}/s over {len(pairs)} conversations; issued "
        f"{len(issued)} in {sent_wall:.1f}s (achieved {len(issued) / max(sent_wall, 1e-9):.0f}/s)"
        f"; HTTP statuses {dict(statuses)}"
        + (f"; errors {dict(sends.errors)}" if sends.errors else "")
        + (f"; {not_issued} NOT ISSUED (no free sender thread)" if not_issued else "")
    )
    if pct(lag, 99) > 0.05:
        print(
            f"!! the sender fell behind its schedule (p99 lag over 50 ms): its "
            f"{args.sender_threads} threads were all waiting for answers, or the machine was "
            "saturated, so sends went out later than the set rate; latency below is from the "
            "moment each send was actually issued"
        )
    print(
        f"sender lag behind schedule: p99 {pct(lag, 99) * 1000:.1f} ms, "
        f"max {max(lag or [0]) * 1000:.1f} ms; HTTP 202 time p50 "
        f"{pct(http_time, 50) * 1000:.1f} ms, p99 {pct(http_time, 99) * 1000:.1f} ms"
    )
    print(
        f"202s {len(accepted)}, recipient frames {len(recipient_latency)}, "
        f"missing {missing} (must be 0), duplicates {duplicates} (must be 0); "
        f"sender-echo frames {len(echo_latency)}, missing {missing_echo}; drained in {drain:.1f}s"
        + (f"; other frames {dict(other)}" if other else "")
    )
    print("send issued -> message.created frame on the recipient's socket:")
    print(
        "  p50 "
        + fmt_ms(pct(recipient_latency, 50))
        + "   p90 "
        + fmt_ms(pct(recipient_latency, 90))
        + "   p99 "
        + fmt_ms(pct(recipient_latency, 99))
        + "   max "
        + fmt_ms(max(recipient_latency or [float("nan")]))
    )
    print(
        "  (from the scheduled send time: p50 "
        + fmt_ms(pct(scheduled_latency, 50)).strip()
        + ", p99 "
        + fmt_ms(pct(scheduled_latency, 99)).strip()
        + ")"
    )
    print(
        "  sender's own socket (echo): p50 "
        + fmt_ms(pct(echo_latency, 50)).strip()
        + ", p99 "
        + fmt_ms(pct(echo_latency, 99)).strip()
    )
    name = "switchboard_delivery_latency_seconds"
    p50, observed = histogram_quantile(before, after, name, 0.50)
    p99, _ = histogram_quantile(before, after, name, 0.99)
    print(
        f"server histogram {name} (API acceptance -> socket write, both sockets of a "
        f"message; {observed} observations): p50 ~{p50 * 1000:.1f} ms, p99 ~{p99 * 1000:.1f} ms"
    )
    breakdown = (
        (
            "server's HTTP time of the send (to its 202)",
            (before, after),
            "switchboard_http_request_duration_seconds",
            {"method": "POST", "route": "/v1/conversations/<conversation_id>/messages"},
        ),
        (
            "Celery task run time of send_message",
            (task_before, task_after),
            "switchboard_task_duration_seconds",
            {"task": "switchboard.direct.send_message"},
        ),
    )
    for label, (first, last), metric, labels in breakdown:
        q50, n = histogram_quantile(first, last, metric, 0.50, **labels)
        q99, _ = histogram_quantile(first, last, metric, 0.99, **labels)
        print(f"  {label}: p50 ~{q50 * 1000:.1f} ms, p99 ~{q99 * 1000:.1f} ms ({n} observed)")
    print(cpu_report)
    p50r, p99r = pct(recipient_latency, 50) * 1000, pct(recipient_latency, 99) * 1000
    print_bar(
        f"bar: p50 < {BAR_P50_MS:g} ms {verdict(p50r < BAR_P50_MS)} ({p50r:.1f}), "
        f"p99 < {BAR_P99_MS:g} ms {verdict(p99r < BAR_P99_MS)} ({p99r:.1f}), "
        "nothing missing or doubled "
        f"{verdict(missing == 0 and duplicates == 0 and bool(accepted))}"
        + ("" if accepted else " (no send was accepted)")
    )
    return {"missing": missing, "duplicates": duplicates, "accepted": len(accepted)}


class TimedPublisher:
    """The RedisPublisher, timed: when the after-commit hook announced the events."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.started = self.finished = 0.0

    def publish(self, events: Any) -> None:
        self.started = time.monotonic()
        self.inner.publish(events)
        self.finished = time.monotonic()


def phase_broadcast(
    args: argparse.Namespace,
    clients: Clients,
    database_url: str,
    redis_url: str,
    open_users: list[int],
    meter: CpuMeter,
    sequences: dict[int, list[int]],
    tag: str,
) -> list[float]:
    import redis

    from app.db import Database
    from app.events import PUBLISHER_KEY, RedisPublisher, append_events

    print(f"\n== 3. Broadcast-sized fan-out: one event for each of {len(open_users)} users")
    if not args.broadcasts or not open_users:
        print("skipped")
        return []
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=30)
    publisher = TimedPublisher(RedisPublisher(client))
    database = Database(database_url, pool_size=1, info={PUBLISHER_KEY: publisher})
    recipients = [user_id(i) for i in open_users]
    totals: list[float] = []
    incomplete = 0
    try:
        for round_ in range(1, args.broadcasts + 1):
            parse_records(clients.collect(), sequences)  # nothing stray left behind
            marker = f"bc-{tag}-{round_}"
            clients.mark(f'"{marker}"'.encode())
            meter.begin()
            session = database.sessions()
            try:
                session.begin()
                t_append = time.monotonic()
                append_events(
                    session,
                    recipients,
                    "broadcast.created",
                    {"marker": marker, "round": round_, "body": f"Broadcast {round_} to all"},
                )
                t0 = time.monotonic()
                session.commit()
                t_committed = time.monotonic()
            finally:
                session.close()
            waited = wait_frames(clients, len(open_users), 30.0, 0.02)
            frames = parse_records(clients.collect(), sequences)
            cpu_report = meter.report()
            arrival: dict[int, float] = {}
            duplicates = 0
            for idx, t, frame in frames:
                data = frame.get("data") or {}
                if frame.get("type") == "broadcast.created" and data.get("marker") == marker:
                    if idx in arrival:
                        duplicates += 1
                    else:
                        arrival[idx] = t - t0
            times = list(arrival.values())
            incomplete += len(arrival) < len(open_users)
            total = max(times or [float("nan")])
            totals.append(total)
            print(
                f"round {round_}: append_events {(t0 - t_append) * 1000:.0f} ms (not timed); "
                f"commit {(publisher.started - t0) * 1000:.0f} ms + publish of "
                f"{len(recipients)} announcements "
                f"{(publisher.finished - publisher.started) * 1000:.0f} ms "
                f"(commit() returned at {(t_committed - t0) * 1000:.0f} ms)"
            )
            print(
                f"  received {len(arrival)} of {len(open_users)}, duplicates {duplicates}, "
                f"missing {len(open_users) - len(arrival)} (waited {waited:.1f}s)"
            )
            print(
                f"  per-socket arrival from just before commit: first "
                f"{min(times or [float('nan')]) * 1000:.0f} ms, p50 {pct(times, 50) * 1000:.0f} "
                f"ms, p99 {pct(times, 99) * 1000:.0f} ms, max {total * 1000:.0f} ms"
            )
            print(f"  total (last socket): {total * 1000:.0f} ms")
            print(f"  {cpu_report}")
            time.sleep(2.0)
    finally:
        database.dispose()
        client.close()
    ok = all(t < BAR_BROADCAST_MS / 1000 for t in totals) and not incomplete
    print_bar(
        f"bar: broadcast to {BAR_SOCKETS} sockets within {BAR_BROADCAST_MS / 1000:g}s: "
        f"{verdict(ok and len(open_users) >= BAR_SOCKETS)} "
        f"(totals {', '.join(f'{t * 1000:.0f} ms' for t in totals)}; "
        f"{len(open_users)} recipients"
        + (f"; {incomplete} rounds did not reach every socket" if incomplete else "")
        + ")"
    )
    return totals if not incomplete else [*totals, float("inf")]


def check_sequences(sequences: dict[int, list[int]]) -> tuple[int, int]:
    """(sockets whose ids were not 1, 2, 3, ... in order, sockets checked)."""
    bad = 0
    for ids in sequences.values():
        if ids != list(range(1, len(ids) + 1)):
            bad += 1
    return bad, len(sequences)


# ----------------------------------------------------------------------------- main


def wait_quiet(timeout: float, threshold: float = 0.15) -> None:
    deadline = time.monotonic() + timeout
    busy_share = 1.0
    while True:
        busy0, total0 = machine_cpu()
        time.sleep(1.0)
        busy1, total1 = machine_cpu()
        busy_share = (busy1 - busy0) / max(1.0, total1 - total0)
        if busy_share < threshold or time.monotonic() >= deadline:
            break
    state = "quiet" if busy_share < threshold else "NOT quiet (figures below are skewed)"
    print(f"\nmachine before the measured phases: {busy_share:.0%} busy: {state}")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace) -> int:
    import redis
    from common import S3Store

    from app.auth import mint_token
    from app.embedded import free_port
    from app.settings import load_settings

    raise_nofile()
    tag = f"{int(time.time()) % 100000:05d}"
    work = Path(tempfile.mkdtemp(prefix="stream_load-"))
    metrics_dir = work / "metrics"
    metrics_dir.mkdir()
    port = args.port or free_port()
    procs: list[Proc] = []
    clients: Clients | None = None
    probe: HealthProbe | None = None
    s3 = S3Store()
    database_ready = False
    try:
        database_url = setup_database(args)
        database_ready = True
        redis.Redis.from_url(args.redis_url).flushdb()
        base_env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": args.redis_url,
            "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
            "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
            "SWITCHBOARD_POLICY": "bookstore",
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
            "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
        }
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(base_env)
        env.update(s3.start())
        settings = load_settings(env)
        print_header(args, settings)
        print(f"logs: {work}")

        started = time.monotonic()
        conversations = provision(database_url, args.sockets)
        tokens = [mint_token(settings, user_id(i), TENANT) for i in range(args.sockets)]
        print(
            f"\nprovisioned {args.sockets} users of tenant {TENANT} and {len(conversations)} "
            f"conversations in {time.monotonic() - started:.1f}s"
        )

        web = Proc(
            "web",
            env
            | {
                "PORT": str(port),
                "WEB_CONCURRENCY": "1",
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            },
            work / "web.log",
        ).start()
        procs.append(web)
        worker_metrics_port = free_port()
        worker = Proc(
            "worker",
            env
            | {
                "WORKER_CONCURRENCY": str(args.worker_concurrency),
                "SWITCHBOARD_WORKER_METRICS_PORT": str(worker_metrics_port),
            },
            work / "worker.log",
        ).start()
        procs.append(worker)
        wait_healthy(port, web)
        assert web.process is not None and worker.process is not None
        worker_pid = web_worker_pid(web.process.pid)
        worker_class = re.findall(r"Using worker: (\S+)", web.tail(20000))
        print(
            f"web: gunicorn master {web.process.pid}, worker {worker_pid} "
            f"(worker class {worker_class[0] if worker_class else '?'}) on 127.0.0.1:{port}; "
            f"celery worker {worker.process.pid}"
        )

        clients = Clients(args.client_procs, port, args.deflate, max_seconds=3600.0)
        probe = HealthProbe(port).start()
        meter = CpuMeter(
            {
                "web worker": [worker_pid],
                "celery worker": [worker.process.pid],
                "clients": [p.pid for p in clients.processes if p.pid],
            },
            args.db_name,
            probe,
        )
        wait_quiet(args.wait_quiet)
        sequences: dict[int, list[int]] = {}
        rss_before = proc_rss_kb(worker_pid)
        open_list = phase_open(args, clients, tokens, port, worker_pid, meter)
        open_users = set(open_list)
        steady = phase_steady(
            args,
            clients,
            port,
            tokens,
            conversations,
            open_users,
            meter,
            sequences,
            tag,
            worker_metrics_port,
        )
        totals = phase_broadcast(
            args, clients, database_url, args.redis_url, sorted(open_users), meter, sequences, tag
        )

        print("\n== After")
        clients.marked()
        metrics = scrape(port)
        rss = proc_rss_kb(worker_pid)
        closes = Counter()
        for part in clients.closes:
            closes.update(part)
        bad, checked = check_sequences(sequences)
        print(
            f"web worker RSS {rss / 1024:.1f} MiB after traffic "
            f"({(rss - rss_before) / max(1, len(open_users)):.1f} KiB per socket over the RSS "
            f"before any socket); sockets still open: "
            f"{sum(clients.open)} (server gauge "
            f"{metrics.get('switchboard_sockets_open', float('nan')):.0f}); closed by server: "
            f"{dict(closes) or 'none'}"
        )
        print(
            f"event ids per socket gap-free and in order: {checked - bad} of {checked} sockets "
            f"({bad} not); replayed events "
            f"{metrics.get('switchboard_events_replayed_total', 0):.0f}, slow-consumer cut-offs "
            f"{metrics.get('switchboard_slow_consumer_disconnects_total', 0):.0f}, hub "
            f"subscriptions {metrics.get('switchboard_hub_subscriptions_total', 0):.0f}"
        )
        print(f"client processes: {args.client_procs}, client CPU total {clients.total_cpu():.1f}s")
        print("\n== Summary against DESIGN.md (2 cores, one web process)")
        for line in BAR_LINES:
            print(line)
        for proc in procs:
            if not proc.alive():
                print(f"!! {proc.name} exited early:\n{proc.tail()}")
        failed = (
            len(open_users) < args.sockets
            or bool(closes)
            or steady.get("missing", 1) != 0
            or steady.get("duplicates", 1) != 0
            or not steady.get("accepted")
            or any(t != t or t >= BAR_BROADCAST_MS / 1000 for t in totals)
        )
        return 1 if failed else 0
    finally:
        if probe is not None:
            probe.stop()
        if clients is not None:
            clients.stop()
        for proc in reversed(procs):
            proc.stop()
        s3.stop()
        if database_ready and not args.keep_db:
            with contextlib.suppress(Exception):
                drop_database(args)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from common import run_cleanly

    return run_cleanly(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
