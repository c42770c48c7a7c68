"""Attachment benchmark: one photo from a customer to an artist, from asking to upload it
to the frame on the artist's socket, stage by stage; p50 and max of several rounds.

    .venv/bin/python bench/attachment_roundtrip.py [--rounds 10] [--size-mb 2]

With a database of its own, the Procfile's `web` (one gunicorn worker) and `worker` and
bench/common.py's S3 store, it times on one monotonic clock: (1) POST /v1/attachments,
(2) the presigned POST to the store, (3) the send to its 202, (4) the 202 to the frame on
the artist's socket (the worker downloads and checks the photo, stores a thumbnail and the
message). Round 1 checks the bytes behind the frame's signed URL. All on 127.0.0.1; what
it started is stopped and its database dropped on exit (also on an error or Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shlex
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import percentile, run_cleanly
from proc_stats import proc_cpu_seconds, wait_quiet
from procs import BenchRun, wait_healthy

from tests.helpers import fetch, image_bytes, post_to_store
from tests.live import http

TENANT, CUSTOMER, ARTIST = "attachment-bench", "ab-customer", "ab-artist"
SERVICE_TOKEN = "attachment-bench-service-token-0123456789"
JWT_SECRET = "attachment-bench-jwt-secret-0123456789abcdefghijklmnop"
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
STAGES = {
    "create": "(1) POST /v1/attachments",
    "upload": "(2) presigned POST to the store",
    "send": "(3) send -> 202",
    "frame": "(4) 202 -> socket frame",
    "total": "total (1) -> frame",
}
TASK_LINE = re.compile(r"Task switchboard\.direct\.send_message\[[^\]]+\] succeeded in ([\d.]+)s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--rounds", type=int, default=10, help="photos measured (after one unmeasured)")
    add("--size-mb", type=float, default=2.0, help="photo size, about (MB, at most 10)")
    add("--pause", type=float, default=0.5, help="seconds between rounds")
    add("--pg-url", default=PG_URL, help="may create databases (default: %(default)s)")
    add("--db-name", default="switchboard_attachment_bench")
    add("--redis-url", default="redis://127.0.0.1:6379/8", help="its own: flushed at start")
    add("--wait-quiet", type=float, default=30.0, help="at most, for the machine to settle")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 0 < args.size_mb <= 10:
        parser.error("--rounds: at least 1; --size-mb: more than 0, at most 10")
    return args


def make_photo(target: int) -> tuple[bytes, tuple[int, int]]:
    """A 4:3 JPEG of random noise (hard to compress, like a photo) of about `target` bytes."""
    size = made = (400, 300)
    for _ in range(3):  # bytes per pixel are near constant: two corrections suffice
        made, data = size, image_bytes("JPEG", size, noise=True)
        scale = (target / len(data)) ** 0.5
        size = (max(8, round(made[0] * scale)), max(6, round(made[1] * scale)))
    return data, made


def provision(url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        for statement in (
            "INSERT INTO tenants (id) VALUES (%(t)s)",
            "INSERT INTO users (id, tenant_id, role, tier, display_name) VALUES (%(c)s, %(t)s, "
            "'customer', 'standard', 'Customer'), (%(a)s, %(t)s, 'artist', 'standard', 'Artist')",
        ):
            connection.exec_driver_sql(statement, {"t": TENANT, "c": CUSTOMER, "a": ARTIST})
    engine.dispose()


def open_socket(url: str, token: str) -> tuple[Any, queue.Queue]:
    """The socket, and (arrival time, frame) read by a thread of its own; None at the end."""
    import websocket

    ws = websocket.create_connection(url, header=[f"Authorization: Bearer {token}"], timeout=10)
    ws.settimeout(None)
    frames: queue.Queue[tuple[float, Any]] = queue.Queue()

    def read() -> None:
        with contextlib.suppress(Exception):  # closed, aborted or broken: None says so
            while True:
                text = ws.recv()  # then the clock: its arrival, not when the wait began
                frames.put((time.monotonic(), json.loads(text)))
        frames.put((time.monotonic(), None))

    threading.Thread(target=read, daemon=True).start()
    return ws, frames


def wait_message(frames: queue.Queue, message_id: str) -> tuple[float, dict[str, Any]]:
    deadline = time.monotonic() + 30.0
    while True:
        try:
            t, frame = frames.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"no frame for message {message_id} in time") from None
        if frame is None:
            raise RuntimeError("the artist's socket ended")
        if frame.get("type") == "message.created" and frame["data"].get("id") == message_id:
            return t, frame


def ask(method: str, url: str, token: str, body: dict, expected: tuple[int, ...]) -> Any:
    status, answer = http(method, url, token, body)
    if status not in expected:
        raise RuntimeError(f"{method} {url}: {status} {answer}")
    return answer


def one_round(base: str, token: str, chat: str, photo: bytes, frames: queue.Queue) -> dict:
    meta = {"filename": "reference.jpg", "content_type": "image/jpeg", "size": len(photo)}
    t0 = time.monotonic()
    answer = ask("POST", base + "/v1/attachments", token, meta, (201,))
    t1 = time.monotonic()
    status, text = post_to_store(answer["upload"], photo)
    t2 = time.monotonic()
    if status not in (200, 201, 204):
        raise RuntimeError(f"presigned POST to the store: {status} {text[:500]}")
    body = {"body": "like this?", "client_id": uuid.uuid4().hex, "attachment_ids": [answer["id"]]}
    sent = ask("POST", f"{base}/v1/conversations/{chat}/messages", token, body, (202,))
    t3 = time.monotonic()
    t4, frame = wait_message(frames, sent["id"])
    shown = frame["data"].get("attachments") or [{}]
    if len(shown) != 1 or shown[0].get("id") != answer["id"] or not shown[0].get("url"):
        raise RuntimeError(f"the frame does not carry the photo: {frame}")
    times = {"create": t1 - t0, "upload": t2 - t1, "send": t3 - t2, "frame": t4 - t3}
    return times | {"total": t4 - t0, "shown": shown[0]}


def run(args: argparse.Namespace) -> int:
    from app.auth import mint_token
    from app.settings import load_settings

    with BenchRun("attachment_roundtrip-", args.pg_url, args.db_name, args.redis_url) as bench:
        port, work = bench.port, bench.work
        photo, size = make_photo(round(args.size_mb * 1_000_000))
        print(f"photo: JPEG {size[0]}x{size[1]}, {len(photo):,} bytes ({len(photo) / 1e6:.2f} MB)")
        database_url, env = bench.environment(
            SWITCHBOARD_SERVICE_TOKEN=SERVICE_TOKEN,
            SWITCHBOARD_JWT_SECRET=JWT_SECRET,
            SWITCHBOARD_POLICY="marketplace",
            # The worker's "succeeded in" lines give its task time (TASK_LINE).
            SWITCHBOARD_TASK_LOG_LINES="true",
        )
        provision(database_url)
        customer, artist = (mint_token(load_settings(env), u, TENANT) for u in (CUSTOMER, ARTIST))
        # No Prometheus folder: the CPU per photo is of the web process as it was measured.
        web = bench.start("web", env, PORT=str(port), WEB_CONCURRENCY="1")
        worker = bench.start("worker", env)
        wait_healthy(port, web)
        print(f"web on 127.0.0.1:{port} and worker started; logs in {work}")
        base, to_artist = f"http://127.0.0.1:{port}", {"participant_id": ARTIST}
        chat = ask("POST", base + "/v1/conversations", customer, to_artist, (200, 201))["id"]
        ws, frames = open_socket(f"ws://127.0.0.1:{port}/v1/stream?last_event_id=0", artist)
        bench.defer(ws.abort)  # wakes the reading thread, which ends
        one_round(base, customer, chat, photo, frames)  # warm-up, not counted
        wait_quiet(args.wait_quiet)

        pids = {"worker": worker.pid, "web": web.workers()[0]}
        if bench.s3.server is not None and bench.s3.server.process is not None:
            pids["store"] = bench.s3.server.process.pid
        cpu = {name: -proc_cpu_seconds(pid) for name, pid in pids.items()}
        log_offset = (work / "worker.log").stat().st_size
        rounds = []
        print(f"\n== {args.rounds} photos of {len(photo):,} bytes, customer -> artist")
        for n in range(1, args.rounds + 1):
            rounds.append(result := one_round(base, customer, chat, photo, frames))
            print(f"round {n:2d}: " + ", ".join(f"{s} {result[s] * 1000:6.1f} ms" for s in STAGES))
            if n == 1:  # the signed URL gives back the very bytes uploaded
                status, data, kind = fetch(result["shown"]["url"])
                facts = (status, data, result["shown"]["width"], result["shown"]["height"])
                if facts != (200, photo, *size):
                    raise RuntimeError(f"signed url {status}, {len(data)} bytes: {result['shown']}")
                print(f"          signed url: 200 {kind}, the {len(data):,} bytes uploaded")
            time.sleep(args.pause)
        cpu = {name: cpu[name] + proc_cpu_seconds(pid) for name, pid in pids.items()}
        log = (work / "worker.log").read_text(errors="replace")[log_offset:]

        rows = {label: [r[stage] * 1000 for r in rounds] for stage, label in STAGES.items()}
        tasks = TASK_LINE.findall(log)  # "succeeded in 0.0613s": the worker's own time
        rows["worker send_message task (its log)"] = [float(s) * 1000 for s in tasks]
        print(f"\n{'stage':36s} {'p50':>9s} {'max':>9s}")
        for label, values in rows.items():
            if values:
                print(f"{label:36s} {percentile(values, 50):6.1f} ms {max(values):6.1f} ms")
        per_photo = ", ".join(f"{k} {v / args.rounds * 1000:.0f} ms" for k, v in cpu.items())
        print(f"CPU per photo ({args.pause:g} s idle after each): {per_photo}")
        return 1 if bench.report_dead() else 0


def main(argv: list[str] | None = None) -> int:
    print("$ " + shlex.join([sys.executable, *sys.argv]), flush=True)
    return run_cleanly(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
