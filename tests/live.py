"""A live Switchboard: the Procfile's own web and worker lines, run as real processes,
and small HTTP and WebSocket clients to talk to them."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

from app.embedded import S3_VARIABLES, free_port

ROOT = Path(__file__).resolve().parent.parent
# The S3 settings of the test run's store (SWITCHBOARD_S3_BUCKET, SWITCHBOARD_S3_ENDPOINT_URL,
# AWS_*), set by conftest's `s3_env` fixture: every live process gets them unless its env
# names a bucket of its own. Empty outside a test session (bench scripts give their own).
S3_ENV: dict[str, str] = {}


def with_s3(env: dict[str, str]) -> dict[str, str]:
    """`env` with the test store's S3 settings, unless it names a bucket of its own; the
    store's keys replace any AWS_* credentials `env` took from the shell."""
    if not S3_ENV or env.get("SWITCHBOARD_S3_BUCKET"):
        return env
    return {name: value for name, value in env.items() if name not in S3_VARIABLES} | S3_ENV


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            return command.strip()
    raise KeyError(name)


@dataclass
class LiveProcess:
    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> LiveProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["bash", "-c", "exec " + procfile_command(self.name)],
            cwd=ROOT,
            env=with_s3(self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclass
class LiveSystem:
    """`web_count` web processes (one gunicorn worker each) and one Celery worker."""

    base_env: dict[str, str]
    log_dir: Path
    web_count: int = 1
    webs: list[tuple[int, LiveProcess]] = field(default_factory=list)
    worker: LiveProcess | None = None
    worker_metrics_port: int = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        # The broker is the one the test gives in base_env (else REDIS_URL), never one
        # left in the shell: with RabbitMQ (TEST_BROKER_URL) the in-process test workers
        # would otherwise share queues with these processes.
        env.pop("SWITCHBOARD_BROKER_URL", None)
        # Likewise the S3 store: the test run's (S3_ENV) or base_env's, not the shell's.
        for name in S3_VARIABLES:
            env.pop(name, None)
        env.update(S3_ENV)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(self.base_env)
        env.update(extra)
        return env

    def start(self) -> LiveSystem:
        for index in range(self.web_count):
            port = free_port()
            web = LiveProcess(
                "web",
                self.env(PORT=str(port), WEB_CONCURRENCY="1"),
                self.log_dir / f"web{index}.log",
            ).start()
            self.webs.append((port, web))
        self.worker_metrics_port = free_port()
        self.worker = LiveProcess(
            "worker",
            self.env(
                WORKER_CONCURRENCY="4",
                SWITCHBOARD_WORKER_METRICS_PORT=str(self.worker_metrics_port),
            ),
            self.log_dir / "worker.log",
        ).start()
        for port, web in self.webs:
            wait_http(f"http://127.0.0.1:{port}/health", web)
        return self

    def url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.webs[index][0]}"

    def ws_url(self, index: int = 0) -> str:
        return f"ws://127.0.0.1:{self.webs[index][0]}/v1/stream"

    def stop(self) -> None:
        for _, web in self.webs:
            web.stop()
        if self.worker:
            self.worker.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )


def wait_http(url: str, process: LiveProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited: {process.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer: {process.log_path.read_text()[-3000:]}")


def http(method: str, url: str, token: str, body: dict | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class Stream:
    """A WebSocket client reading frames and noticing the close code and reason."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        last_event_id: int | None = None,
        query_token: bool = False,
        receive_buffer: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        params = []
        if last_event_id is not None:
            params.append(f"last_event_id={last_event_id}")
        headers = []
        if token and query_token:
            params.append(f"token={token}")
        elif token:
            headers.append(f"Authorization: Bearer {token}")
        full = url + ("?" + "&".join(params) if params else "")
        options = []
        if receive_buffer:
            options.append((socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer))
        self.ws = websocket.create_connection(
            full, header=headers, timeout=timeout, sockopt=options or None
        )
        self.close_code: int | None = None
        self.close_reason = ""

    def next(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next data frame, or None once the server closed the socket. Raises
        WebSocketTimeoutException after `timeout` seconds, pings or not."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise websocket.WebSocketTimeoutException("no data frame in time")
            self.ws.settimeout(remaining)
            try:
                opcode, payload = self.ws.recv_data(control_frame=True)
            except websocket.WebSocketConnectionClosedException:
                return None
            except ConnectionResetError:
                self.close_code = self.close_code or -1
                return None
            if opcode == websocket.ABNF.OPCODE_TEXT:
                return json.loads(payload)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                if len(payload) >= 2:
                    self.close_code = struct.unpack("!H", payload[:2])[0]
                    self.close_reason = payload[2:].decode(errors="replace")
                else:
                    self.close_code = 1005
                return None

    def events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        frames = []
        while len(frames) < count:
            frame = self.next(timeout)
            if frame is None:
                raise AssertionError(
                    f"socket closed ({self.close_code} {self.close_reason}) after {frames}"
                )
            if frame["type"] != "typing":
                frames.append(frame)
        return frames

    def expect_close(self, timeout: float = 10.0) -> tuple[int | None, str]:
        while self.next(timeout) is not None:
            pass
        return self.close_code, self.close_reason

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def close(self) -> None:
        with contextlib.suppress(OSError, websocket.WebSocketException):
            self.ws.close()


class RawStream:
    """A client that connects and then reads nothing: the slow consumer. `drain` reads
    what the server managed to send and says how the connection ended."""

    def __init__(
        self, port: int, token: str, *, last_event_id: int = 0, receive_buffer: int = 2048
    ) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /v1/stream?last_event_id={last_event_id} HTTP/1.1\r\nHost: localhost\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )

    def drain(self, timeout: float = 20.0) -> tuple[bool, int | None, int]:
        """(closed by the server, close code if a close frame arrived, whole data frames)."""
        self.sock.settimeout(timeout)
        data, closed = b"", False
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        frames, code = 0, None
        rest = data.partition(b"\r\n\r\n")[2]
        while len(rest) >= 2:
            opcode, length, offset = rest[0] & 0x0F, rest[1] & 0x7F, 2
            if length == 126:
                length, offset = struct.unpack("!H", rest[2:4])[0], 4
            elif length == 127:
                length, offset = struct.unpack("!Q", rest[2:10])[0], 10
            payload = rest[offset : offset + length]
            if len(payload) < length:
                break  # the frame the server was writing when it cut the client off
            if opcode == 0x1:
                frames += 1
            elif opcode == 0x8 and len(payload) >= 2:
                code = struct.unpack("!H", payload[:2])[0]
            rest = rest[offset + length :]
        return closed, code, frames

    def close(self) -> None:
        self.sock.close()
