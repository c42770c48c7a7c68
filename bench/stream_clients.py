"""The socket clients of the stream benchmarks: processes that each hold a shard of the
users' sockets on /v1/stream, driven over pipes by the benchmark.

A client process runs one epoll loop over raw non-blocking sockets (no greenlets; frames
parsed only as far as the header while measuring): it connects with a bounded number of
handshakes in flight, answers the server's pings, and for every data frame stores (user
index, monotonic arrival time, payload) without parsing the JSON; the benchmark asks for
the records over the pipe when a phase is over and parses them then (`parse_records`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import multiprocessing
import os
import select
import signal
import socket
import time
import zlib
from collections import Counter, deque
from typing import Any

from proc_stats import own_cpu_seconds

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
            conn.send(("count", marked, open_count, dict(closes), own_cpu_seconds()))
        elif kind == "collect":
            conn.send(("records", records, open_count, dict(closes), own_cpu_seconds()))
            records = []
        elif kind == "closed":
            conn.send(("closed", list(closed), open_count, dict(closes), own_cpu_seconds()))
        elif kind == "stop":
            conn.send(("stopped", open_count, dict(closes), own_cpu_seconds()))
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
                conn.send(("connected", results, open_count, own_cpu_seconds()))
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

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid]

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


def wait_frames(clients: Clients, expected: int, timeout: float, interval: float) -> float:
    """Poll the clients until `expected` frames with the current marker arrived, or `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if clients.marked() >= expected:
            break
        time.sleep(interval)
    return time.monotonic() - started


def parse_records(
    records: list[tuple[int, float, bytes]], sequences: dict[int, list[int]]
) -> list[tuple[int, float, dict]]:
    """The clients' records with each payload parsed (one that is not JSON as type
    "<not json>"); the event id of each frame is appended to `sequences[user index]`."""
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
