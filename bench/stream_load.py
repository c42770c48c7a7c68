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
import os
import platform
import re
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import fmt_ms, percentile, raise_nofile, run_cleanly, verdict
from database import PAIRS_TENANT, provision_pairs, user_id
from message_sender import plan_sends, send_steady, tally_sends
from metrics import HealthProbe, histogram_quantile, scrape
from proc_stats import CpuMeter, proc_cpu_seconds, proc_fds, proc_rss_kb, proc_threads, wait_quiet
from procs import BenchRun, wait_healthy
from stream_clients import Clients, parse_records, wait_frames

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


# ----------------------------------------------------------------------------- report

BAR_LINES: list[str] = []


def print_bar(text: str) -> None:
    """Print a line comparing a figure with its DESIGN.md bar; repeated in the summary."""
    BAR_LINES.append(text)
    print(text)


def print_header(args: argparse.Namespace, settings: Any) -> None:
    import importlib.metadata as metadata

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in (
            "gunicorn",
            "gevent",
            "greenlet",
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
        f"handshake (TCP connect to 101): p50 {percentile(handshake, 50) * 1000:.1f} ms, "
        f"p99 {percentile(handshake, 99) * 1000:.1f} ms, max {max(handshake or [0]) * 1000:.1f} ms"
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
    if percentile(lag, 99) > 0.05:
        print(
            f"!! the sender fell behind its schedule (p99 lag over 50 ms): its "
            f"{args.sender_threads} threads were all waiting for answers, or the machine was "
            "saturated, so sends went out later than the set rate; latency below is from the "
            "moment each send was actually issued"
        )
    print(
        f"sender lag behind schedule: p99 {percentile(lag, 99) * 1000:.1f} ms, "
        f"max {max(lag or [0]) * 1000:.1f} ms; HTTP 202 time p50 "
        f"{percentile(http_time, 50) * 1000:.1f} ms, p99 {percentile(http_time, 99) * 1000:.1f} ms"
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
        + fmt_ms(percentile(recipient_latency, 50))
        + "   p90 "
        + fmt_ms(percentile(recipient_latency, 90))
        + "   p99 "
        + fmt_ms(percentile(recipient_latency, 99))
        + "   max "
        + fmt_ms(max(recipient_latency or [float("nan")]))
    )
    print(
        "  (from the scheduled send time: p50 "
        + fmt_ms(percentile(scheduled_latency, 50)).strip()
        + ", p99 "
        + fmt_ms(percentile(scheduled_latency, 99)).strip()
        + ")"
    )
    print(
        "  sender's own socket (echo): p50 "
        + fmt_ms(percentile(echo_latency, 50)).strip()
        + ", p99 "
        + fmt_ms(percentile(echo_latency, 99)).strip()
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
            "Celery task run time of store_sends (one batch of sends)",
            (task_before, task_after),
            "switchboard_task_duration_seconds",
            {"task": "switchboard.direct.store_sends"},
        ),
    )
    for label, (first, last), metric, labels in breakdown:
        q50, n = histogram_quantile(first, last, metric, 0.50, **labels)
        q99, _ = histogram_quantile(first, last, metric, 0.99, **labels)
        print(f"  {label}: p50 ~{q50 * 1000:.1f} ms, p99 ~{q99 * 1000:.1f} ms ({n} observed)")
    print(cpu_report)
    p50r, p99r = percentile(recipient_latency, 50) * 1000, percentile(recipient_latency, 99) * 1000
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
                f"{min(times or [float('nan')]) * 1000:.0f} ms, p50 "
                f"{percentile(times, 50) * 1000:.0f} ms, p99 {percentile(times, 99) * 1000:.0f} "
                f"ms, max {total * 1000:.0f} ms"
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


def run(args: argparse.Namespace) -> int:
    from app.auth import mint_token
    from app.embedded import free_port
    from app.settings import load_settings

    raise_nofile()
    tag = f"{int(time.time()) % 100000:05d}"
    with BenchRun(
        "stream_load-", args.pg_url, args.db_name, args.redis_url, args.keep_db, args.port
    ) as bench:
        port, work = bench.port, bench.work
        database_url, env = bench.environment(
            SWITCHBOARD_SERVICE_TOKEN=SERVICE_TOKEN,
            SWITCHBOARD_JWT_SECRET=JWT_SECRET,
            SWITCHBOARD_POLICY="bookstore",
        )
        settings = load_settings(env)
        print_header(args, settings)
        print(f"logs: {work}")

        started = time.monotonic()
        conversations = provision_pairs(database_url, args.sockets)
        tokens = [mint_token(settings, user_id(i), PAIRS_TENANT) for i in range(args.sockets)]
        print(
            f"\nprovisioned {args.sockets} users of tenant {PAIRS_TENANT} and "
            f"{len(conversations)} conversations in {time.monotonic() - started:.1f}s"
        )

        web = bench.start("web", bench.web_env(env, 1))
        worker_metrics_port = free_port()
        worker = bench.start(
            "worker",
            env,
            WORKER_CONCURRENCY=str(args.worker_concurrency),
            SWITCHBOARD_WORKER_METRICS_PORT=str(worker_metrics_port),
        )
        wait_healthy(port, web)
        worker_pid = web.workers()[0]
        worker_class = re.findall(r"Using worker: (\S+)", web.tail(20000))
        print(
            f"web: gunicorn master {web.pid}, worker {worker_pid} "
            f"(worker class {worker_class[0] if worker_class else '?'}) on 127.0.0.1:{port}; "
            f"celery worker {worker.pid}"
        )

        clients = Clients(args.client_procs, port, args.deflate, max_seconds=3600.0)
        bench.defer(clients.stop)
        probe = HealthProbe(port).start()
        bench.defer(probe.stop)
        meter = CpuMeter(
            {"web worker": [worker_pid], "celery worker": [worker.pid], "clients": clients.pids()},
            args.db_name,
            probe,
            redis_pid=bench.redis_pid,
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
        bench.report_dead()
        failed = (
            len(open_users) < args.sockets
            or bool(closes)
            or steady.get("missing", 1) != 0
            or steady.get("duplicates", 1) != 0
            or not steady.get("accepted")
            or any(t != t or t >= BAR_BROADCAST_MS / 1000 for t in totals)
        )
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_cleanly(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
