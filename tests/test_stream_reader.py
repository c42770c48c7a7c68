"""A socket's incoming side (app/stream/reader.py): the protocol rules as pure logic, the
threaded driver, and the event loop's readers under gevent (a subprocess, as the live
web is), where an open socket must keep no greenlet of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from app.stream.reader import DetachedSocket, SocketReader, read_until_finished, wait_readable
from app.stream.sockets import SerializedSocket, SlowConsumer

ROOT = Path(__file__).resolve().parent.parent


class RecordingConnection:
    """What the reader asks of a socket's writer, recorded."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.close: tuple[int, str, bytes | None] | None = None
        self.closed = False

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    def request_close(self, code: int, reason: str, *, reply: bytes | None = None) -> None:
        if self.close is None:
            self.close = (code, reason, reply)


def pair(
    *, ping_interval: float = 25.0, max_bytes: int = 1024, expires_at: float = 1e12
) -> tuple[SocketReader, RecordingConnection, Connection, DetachedSocket]:
    """A reader over a server-side wsproto connection, and the client's end of it."""
    ws = DetachedSocket(sock=None, protocol=Connection(ConnectionType.SERVER))
    connection = RecordingConnection()
    reader = SocketReader(
        ws,
        connection,  # type: ignore[arg-type]
        ping_interval=ping_interval,
        max_bytes=max_bytes,
        expires_at=expires_at,
    )
    return reader, connection, Connection(ConnectionType.CLIENT), ws


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair (ours, the peer's), closed after the test."""
    ours, peer = socket.socketpair()
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


def events_of(client: Connection, data: list[bytes]) -> list[Any]:
    for chunk in data:
        client.receive_data(chunk)
    return list(client.events())


def test_a_message_in_fragments_comes_out_whole() -> None:
    reader, _, client, _ = pair()
    reader.feed(client.send(TextMessage(data="hel", message_finished=False)))
    assert reader.messages == []
    reader.feed(client.send(TextMessage(data="lo")) + client.send(TextMessage(data="again")))
    assert reader.messages == ["hello", "again"]
    assert not reader.finished


def test_a_ping_is_answered_through_the_writer() -> None:
    reader, connection, client, _ = pair()
    reader.feed(client.send(Ping(payload=b"are you there")))
    assert [type(e) for e in events_of(client, connection.sent)] == [Pong]
    assert not reader.finished


def test_pings_go_out_on_schedule_and_an_unanswered_one_closes_with_1008() -> None:
    reader, connection, client, _ = pair(ping_interval=10.0)
    first = reader.next_ping
    # The first ping comes within the interval's second half (spread, not all at once).
    assert time.monotonic() + 4.9 <= first <= time.monotonic() + 10.0
    reader.tick(first - 0.1)
    assert connection.sent == []
    start = first - 10.0
    reader.tick(start + 10)
    assert [type(e) for e in events_of(client, connection.sent)] == [Ping]
    reader.feed(client.send(Pong()))  # answered: the next ping goes out
    reader.tick(start + 20)
    assert len(connection.sent) == 2 and connection.close is None
    reader.tick(start + 30)  # the second went unanswered
    assert connection.close == (1008, "Ping/Pong timeout", None)
    assert reader.finished


def test_the_token_expiring_closes_with_4002() -> None:
    reader, connection, _, _ = pair(expires_at=100.0)
    reader.tick(99.0)
    assert connection.close is None
    reader.tick(100.0)
    assert connection.close is not None and connection.close[0] == 4002
    assert reader.finished


def test_a_message_over_the_limit_closes_with_1009_even_in_fragments() -> None:
    reader, connection, client, _ = pair(max_bytes=10)
    reader.feed(client.send(TextMessage(data="x" * 6, message_finished=False)))
    assert connection.close is None
    reader.feed(client.send(TextMessage(data="x" * 6)))
    assert connection.close == (1009, "Message is too big", None)
    assert reader.finished and reader.messages == []


def test_a_close_from_the_client_is_answered_and_nothing_more_is_written() -> None:
    reader, connection, client, ws = pair()
    reader.feed(client.send(CloseConnection(code=1000, reason="bye")))
    assert reader.finished and not ws.connected
    assert (ws.close_reason, ws.close_message) == (1000, "bye")
    assert connection.close is not None
    code, _, reply = connection.close
    assert code == 1000 and reply is not None
    assert [type(e) for e in events_of(client, [reply])] == [CloseConnection]


def test_the_end_of_the_stream_finishes_the_reader() -> None:
    reader, connection, _, _ = pair()
    reader.feed(b"")
    assert reader.finished and connection.close is None


def test_a_writer_that_closed_the_socket_finishes_the_reader() -> None:
    reader, connection, _, _ = pair()
    connection.closed = True
    reader.tick(0.0)
    assert reader.finished


def test_the_threaded_driver_answers_each_message_then_ends_with_the_stream(sockets) -> None:
    ours, peer = sockets
    reader, _, client, _ = pair()
    peer.sendall(client.send(TextMessage(data="one")) + client.send(TextMessage(data="two")))
    peer.shutdown(socket.SHUT_WR)
    answered: list[str | bytes] = []
    read_until_finished(reader, answered.append, ours)
    assert answered == ["one", "two"]
    assert reader.finished


def test_the_threaded_wait_ends_on_data_on_a_shutdown_or_on_timeout(sockets) -> None:
    ours, peer = sockets
    assert wait_readable(ours, 0.05) is False
    peer.send(b"x")
    assert wait_readable(ours, 5) is True
    ours.recv(1)
    ours.shutdown(socket.SHUT_RDWR)  # what the writer does to end the reader
    assert wait_readable(ours, 5) is True


# The event loop's readers with the real socket writer (StreamConnection), 200 sockets
# over socket pairs: after the hand-over no greenlet per socket is left; each socket's
# messages are answered, its pings ponged and its own pings sent by the one timer; the end
# of a peer's stream finishes its socket, and no descriptor is touched after `finish`.
EVENT_LOOP_PROBE = r"""
from gevent import monkey; monkey.patch_all()
import gc, json, socket, sys, types
import gevent, greenlet
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, Ping, Pong, TextMessage
from app.stream.connection import StreamConnection
from app.stream.reader import DetachedSocket, EventLoopReaders, SocketReader

SOCKETS = 200
errors = []

class Log:
    def plan(self, user_id, last_event_id, current_seq):
        return types.SimpleNamespace(after_seq=0, resync=False, current_seq=0)
    def after(self, user_id, after_seq, up_to=None):
        return iter(())

class Owner:
    def __init__(self, index, connection, ws):
        self.index, self.connection, self.ws = index, connection, ws
    def answer(self, message):
        answered.append((self.index, message))
        self.connection.send_frame({"type": "echo", "data": message})
    def finish(self):
        finished.append(self.index)
        self.ws.sock.close()

def live_greenlets():
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)

readers = EventLoopReaders(tick_seconds=0.05)
peers, clients, answered, finished = [], [], [], []
baseline = None
for i in range(SOCKETS):
    ours, peer = socket.socketpair()
    ws = DetachedSocket(ours, Connection(ConnectionType.SERVER))
    connection = StreamConnection(
        ws, f"u{i}", Log(), last_event_id=None, seq_at_connect=0, queue_size=10
    )
    connection.start()
    reader = SocketReader(ws, connection, ping_interval=0.2, max_bytes=1024, expires_at=1e12)
    readers.add(reader, ours.fileno(), Owner(i, connection, ws))
    peers.append(peer)
    clients.append(Connection(ConnectionType.CLIENT))
gevent.sleep(0.05)  # every writer's start is done
baseline = live_greenlets()
if baseline > 5:
    errors.append(f"{baseline} greenlets alive for {SOCKETS} idle sockets")

for peer, client in zip(peers, clients):
    peer.sendall(client.send(TextMessage(data="hi")) + client.send(Ping(payload=b"p")))

def read_events(index, want, timeout=10):
    peer, client = peers[index], clients[index]
    got = []
    with gevent.Timeout(timeout, False):
        while len(got) < want:
            client.receive_data(peer.recv(4096))
            for event in client.events():
                if isinstance(event, Ping):
                    peer.sendall(client.send(event.response()))
                got.append(event)
    return got

for index in range(SOCKETS):
    got = read_events(index, 3)  # the echo, the pong, and the timer's ping
    kinds = sorted(type(e).__name__ for e in got)
    if kinds != ["Ping", "Pong", "TextMessage"]:
        errors.append(f"socket {index}: {kinds}")
    echo = [e.data for e in got if isinstance(e, TextMessage)]
    if echo and json.loads(echo[0]) != {"type": "echo", "data": "hi"}:
        errors.append(f"socket {index}: echo {echo}")
if sorted(answered) != [(i, "hi") for i in range(SOCKETS)]:
    errors.append(f"answered {len(answered)}")

for peer in peers[:50]:
    peer.shutdown(socket.SHUT_WR)
with gevent.Timeout(10, False):
    while len(finished) < 50:
        gevent.sleep(0.01)
if sorted(finished) != list(range(50)) or len(readers) != SOCKETS - 50:
    errors.append(f"finished {sorted(finished)[:5]}..., {len(readers)} left")
print(json.dumps({"errors": errors, "greenlets": baseline}))
"""


def test_handed_over_sockets_keep_no_greenlet_and_are_read_answered_pinged_and_ended() -> None:
    run = subprocess.run(
        [sys.executable, "-c", EVENT_LOOP_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = run.stdout.strip().splitlines()[-1]
    assert '"errors": []' in report, report + run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_a_frame_cut_short_waits_for_the_rest() -> None:
    reader, _, client, _ = pair()
    frame = client.send(TextMessage(data="hello"))
    reader.feed(frame[:-2])
    assert not reader.finished and reader.messages == []
    reader.feed(frame[-2:])
    assert reader.messages == ["hello"]


@pytest.mark.parametrize("payload", [b"\x81\x05hello", b"\xff" * 20], ids=["unmasked", "garbage"])
def test_bytes_that_break_the_protocol_close_the_socket_instead_of_raising(payload: bytes) -> None:
    """wsproto answers a protocol error with a close (1002), which the reader writes back
    and ends on; never an exception out of `feed`."""
    reader, connection, _, _ = pair()
    reader.feed(payload)
    assert reader.finished
    assert connection.close is not None and connection.close[2] is not None


def test_a_write_larger_than_the_buffers_arrives_whole(sockets) -> None:
    """The first send takes what the kernel accepts; the rest follows as the peer reads."""
    ours, peer = sockets
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.settimeout(15)  # the reading thread cannot hang the run if the write fails
    received = bytearray()
    failures: list[BaseException] = []

    def drain() -> None:
        try:
            while chunk := peer.recv(65536):
                received.extend(chunk)
        except BaseException as exc:  # asserted below, in the test's thread
            failures.append(exc)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert SerializedSocket(ours, write_timeout=10).send(payload) == len(payload)
    ours.shutdown(socket.SHUT_WR)
    reader.join(20)
    assert not reader.is_alive() and not failures, failures
    assert bytes(received) == payload


def test_a_peer_that_reads_nothing_makes_the_write_fail_as_a_slow_consumer(sockets) -> None:
    ours, _ = sockets
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with pytest.raises(SlowConsumer):
        SerializedSocket(ours, write_timeout=0.2).send(b"x" * (8 * 1024 * 1024))
