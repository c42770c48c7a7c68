"""Open-loop load benchmark of the messaging API against a million stored messages.

    .venv/bin/python bench/api_load.py                 # seed if needed, then 200 req/s for 60 s
    .venv/bin/python bench/api_load.py --reseed        # rebuild the data set first
    .venv/bin/python bench/api_load.py --skip-seed --rate 300 --duration 120

It seeds a database of its own (one bookstore tenant, ~5,000 users, ~20,000 two-person
conversations of skewed length, ~1,000,000 messages) with set-based SQL, starts the web
process and a Celery worker as the Procfile runs them, drives a constant arrival rate of
list / history / send requests over keep-alive connections, and prints latency percentiles
measured from each request's *scheduled* send time (no coordinated omission), the achieved
rate, the worker's drain time and the machine it ran on. The seeded database is kept; the
processes it started are stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import gevent
import gevent.pool
import psycopg
import redis
from api_dataset import TENANT, cumulative, database_url, message_body, seed, seeded_info
from common import S3Store, http_request, percentile, process_env, run_cleanly
from http_pool import HttpPool
from proc_stats import (
    ProcSample,
    cpu_breakdown,
    cpu_model,
    machine_busy_share,
    machine_cpu,
    own_cpu_seconds,
    process_cpu,
)
from procs import Proc, check_alive, wait_healthy

BAR_P99_MS = 50.0
QUIET_PERCENT = 15.0  # machine CPU busy, % of all cores, that counts as quiet
KINDS = ("list", "history", "send")
HISTORY_PAGE = 50  # the bookstore policy's messages.page_size
SERVICE_TOKEN = "bench-service-token-0123456789"
JWT_SECRET = "bench-jwt-secret-0123456789abcdefghijklmnopqrstuv"


# ----------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    env = os.environ.get
    parser.add_argument(
        "--pg-url",
        default=env("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL with rights to create databases (default: %(default)s)",
    )
    parser.add_argument(
        "--db-name",
        default=env("BENCH_DB_NAME", "switchboard_bench"),
        help="the benchmark's own database, kept between runs (%(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        default=env("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        help="a Redis database of the benchmark's own: it is flushed at start",
    )
    seeding = parser.add_mutually_exclusive_group()
    seeding.add_argument("--reseed", action="store_true", help="drop and rebuild the data set")
    seeding.add_argument(
        "--skip-seed", action="store_true", help="use the seeded database as it is (fail if none)"
    )
    parser.add_argument("--seed-only", action="store_true", help="seed (if needed) and exit")
    parser.add_argument(
        "--messages", type=int, default=1_000_000, help="messages to seed (%(default)s)"
    )
    parser.add_argument("--users", type=int, default=5_000, help="users to seed (%(default)s)")
    parser.add_argument(
        "--conversations", type=int, default=20_000, help="conversations to seed (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed of data and load")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second, total")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    parser.add_argument(
        "--mix",
        default="40,40,20",
        help="percent of list,history,send requests (default: %(default)s)",
    )
    parser.add_argument(
        "--before-share",
        type=float,
        default=0.25,
        help="share of history requests that ask for an older page with before= (%(default)s)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        help="keep-alive connections opened before the run and used in turn (%(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="more are opened while all are busy, up to this many (%(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="request timeout, seconds")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the worker to store every accepted send (%(default)s)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        help="wait up to this many seconds for other work on the machine to stop using more "
        "than 15%% of its CPU before starting the load (%(default)s)",
    )
    parser.add_argument(
        "--csv", type=Path, help="also write one line per request here (for plots and digging)"
    )
    parser.add_argument("--port", type=int, default=0, help="web port (default: a free one)")
    parser.add_argument(
        "--web-concurrency",
        type=int,
        default=int(env("WEB_CONCURRENCY", "2")),
        help="gunicorn workers, as WEB_CONCURRENCY (%(default)s)",
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=int(env("WORKER_CONCURRENCY", "8")),
        help="Celery threads, as WORKER_CONCURRENCY (%(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        mix = [float(part) for part in args.mix.split(",")]
    except ValueError:
        parser.error("--mix: three numbers, e.g. 40,40,20")
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        parser.error("--mix: three non-negative numbers, e.g. 40,40,20")
    args.mix = [part / sum(mix) for part in mix]
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rate and --duration must be positive, --warmup not negative")
    if args.conversations * 2 > args.messages or args.users < 10:
        parser.error("need at least 2 messages per conversation and 10 users")
    return args


# ----------------------------------------------------------------------------- load


@dataclass
class Workload:
    conversations: list[tuple[str, str, str, int]]  # id, user_a, user_b, stored messages
    users: list[str]
    anchors: dict[str, list[str]]
    tokens: dict[str, str]
    size_cum: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Planned:
    kind: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


@dataclass(slots=True)
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer (timeout, connection error)
    latency: float  # seconds from the scheduled send time to the full response
    lag: float  # seconds from the scheduled send time to the request going on the wire
    start_lag: float  # seconds from the scheduled send time to the generator issuing it
    waited: bool  # for a free connection, all of them being busy
    measured: bool
    scheduled: float
    sent_wall: float = 0.0  # time.time() when the request was sent
    message_id: str | None = None


def load_workload(db_url: str, settings_env: dict[str, str], rng: random.Random) -> Workload:
    from app.auth import mint_token
    from app.settings import load_settings

    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            """SELECT c.id::text, min(p.user_id), max(p.user_id), coalesce(m.n, 0)
               FROM conversations c
               JOIN participants p ON p.conversation_id = c.id
               LEFT JOIN (SELECT conversation_id, count(*) AS n FROM messages
                          WHERE status = 'stored' GROUP BY conversation_id) m
                 ON m.conversation_id = c.id
               WHERE c.tenant_id = %s
               GROUP BY c.id, m.n ORDER BY c.id""",
            (TENANT,),
        ).fetchall()
        deep = [row for row in rows if row[3] > HISTORY_PAGE]
        sample = rng.sample(deep, min(3000, len(deep)))
        anchors: dict[str, list[str]] = {}
        # One anchor where page 1 ends (page 2 by next_cursor), two deeper in the history.
        for conversation_id, _, _, n in sample:
            offsets = [HISTORY_PAGE - 1] + [rng.randint(HISTORY_PAGE, n - 1) for _ in range(2)]
            for offset in offsets:
                row = conn.execute(
                    """SELECT id::text FROM messages
                       WHERE conversation_id = %s AND status = 'stored'
                       ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1""",
                    (conversation_id, offset),
                ).fetchone()
                if row:
                    anchors.setdefault(conversation_id, []).append(row[0])
    settings = load_settings(settings_env)
    users = sorted({user for row in rows for user in row[1:3]})
    tokens = {
        user: "Bearer " + mint_token(settings, user, TENANT, ttl=timedelta(hours=6))
        for user in users
    }
    workload = Workload(
        conversations=[tuple(row) for row in rows], users=users, anchors=anchors, tokens=tokens
    )
    workload.size_cum = cumulative([max(1, row[3]) for row in rows])
    return workload


def plan_requests(
    args: argparse.Namespace, workload: Workload, run_id: str, rng: random.Random
) -> list[Planned]:
    total = round(args.rate * (args.warmup + args.duration))
    kinds = rng.choices(KINDS, weights=args.mix, k=total)
    anchored = list(workload.anchors)
    conversations = workload.conversations
    index = {row[0]: row for row in conversations}

    def pick_conversation() -> tuple[str, str, str, int]:
        # Half uniformly, half by activity: busy conversations are read and written more.
        if rng.random() < 0.5:
            return rng.choice(conversations)
        return rng.choices(conversations, cum_weights=workload.size_cum)[0]

    planned = []
    for number, kind in enumerate(kinds):
        json_headers = {"Accept": "application/json"}
        if kind == "list":
            user = rng.choice(workload.users)
            path = "/v1/conversations"
            planned.append(Planned(kind, "GET", path, json_headers, None))
        elif kind == "history":
            if anchored and rng.random() < args.before_share:
                conversation = index[rng.choice(anchored)]
                before = rng.choice(workload.anchors[conversation[0]])
                path = f"/v1/conversations/{conversation[0]}/messages?before={before}"
            else:
                conversation = pick_conversation()
                path = f"/v1/conversations/{conversation[0]}/messages"
            user = rng.choice(conversation[1:3])
            planned.append(Planned(kind, "GET", path, json_headers, None))
        else:
            conversation = pick_conversation()
            user = rng.choice(conversation[1:3])
            payload = {"body": message_body(rng), "client_id": f"bench-{run_id}-{number}"}
            path = f"/v1/conversations/{conversation[0]}/messages"
            json_headers["Content-Type"] = "application/json"
            planned.append(Planned(kind, "POST", path, json_headers, json.dumps(payload).encode()))
        planned[-1].headers["Authorization"] = workload.tokens[user]
    return planned


def run_load(
    args: argparse.Namespace, port: int, planned: list[Planned]
) -> tuple[list[Outcome], float, float, HttpPool]:
    """Send `planned` at a constant rate; returns outcomes (one per planned request,
    unanswered ones included), the run time and the generator's CPU seconds."""
    pool = HttpPool("127.0.0.1", port, max(args.connections, args.max_connections), args.timeout)
    pool.open(args.connections)
    interval = 1.0 / args.rate
    warmup_count = round(args.rate * args.warmup)
    outcomes: list[Outcome | None] = [None] * len(planned)
    sent: list[tuple[float, float] | None] = [None] * len(planned)  # perf_counter, time()
    issued: list[float | None] = [None] * len(planned)
    waited_for_connection = [False] * len(planned)
    greenlets = gevent.pool.Group()
    started = time.perf_counter() + 0.2

    def scheduled_at(number: int) -> float:
        return started + number * interval

    def record(number: int, status: int, message_id: str | None = None) -> None:
        item, scheduled = planned[number], scheduled_at(number)
        now = time.perf_counter()
        on_wire, on_wire_wall = sent[number] or (now, time.time())
        outcomes[number] = Outcome(
            kind=item.kind,
            status=status,
            latency=now - scheduled,
            lag=on_wire - scheduled,
            start_lag=(issued[number] or now) - scheduled,
            waited=waited_for_connection[number],
            measured=number >= warmup_count,
            scheduled=scheduled,
            sent_wall=on_wire_wall,
            message_id=message_id,
        )

    def one(number: int, item: Planned) -> None:
        issued[number] = time.perf_counter()

        def on_send(waited: bool) -> None:
            sent[number] = (time.perf_counter(), time.time())
            waited_for_connection[number] = waited

        message_id = None
        try:
            status, data = pool.request(item.method, item.path, item.headers, item.body, on_send)
        except Exception:
            status, data = 0, b""
        if item.kind == "send" and status == 202:
            with contextlib.suppress(ValueError, KeyError):
                message_id = json.loads(data)["id"]
        record(number, status, message_id)

    cpu_before = own_cpu_seconds()
    for number, item in enumerate(planned):
        delay = scheduled_at(number) - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)
        greenlets.spawn(one, number, item)
    greenlets.join(timeout=args.timeout + 10)
    greenlets.kill(block=True, timeout=5)
    for number, outcome in enumerate(outcomes):
        if outcome is None:  # never answered: an error, timed from its schedule until now
            record(number, 0)
    elapsed = time.perf_counter() - started
    return [o for o in outcomes if o is not None], elapsed, own_cpu_seconds() - cpu_before, pool


# ----------------------------------------------------------------------------- report


def latency_table(outcomes: list[Outcome]) -> tuple[str, bool]:
    head = (
        f"{'call':<9}{'count':>8}{'errors':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}   bar: p99 < {BAR_P99_MS:.0f} ms"
    )
    lines = [head, "-" * len(head)]
    passed = True
    for kind in (*KINDS, "all"):
        chosen = [o for o in outcomes if kind in ("all", o.kind)]
        errors = sum(1 for o in chosen if not 200 <= o.status < 300)
        values = sorted(o.latency * 1000 for o in chosen)
        p99 = percentile(values, 99)
        verdict = ""
        if kind != "all":
            ok = bool(values) and p99 < BAR_P99_MS and errors == 0
            passed = passed and ok
            verdict = "met" if ok else "NOT met"
        lines.append(
            f"{kind:<9}{len(chosen):>8}{errors:>8}{percentile(values, 50):>9.1f}"
            f"{percentile(values, 90):>9.1f}{p99:>9.1f}"
            f"{(values[-1] if values else float('nan')):>9.1f}   {verdict}"
        )
    return "\n".join(lines), passed


def count_messages(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]


@dataclass
class Drain:
    complete: bool
    found: int
    first_poll_complete: bool
    done_wall: float  # time.time() when the poll found every send stored
    picked_up: dict[str, float]  # message id -> time.time() its worker transaction began


def wait_for_drain(db_url: str, ids: list[str], since: float, timeout: float) -> Drain:
    """Poll until every accepted send is a row in messages. When each was picked up
    comes from the event log: the worker appends `message.created` events in the
    transaction that stores the message, and their created_at is its start."""
    started, polls = time.monotonic(), 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            found = conn.execute(
                "SELECT count(*) FROM messages WHERE id = ANY(%s::uuid[])", (ids,)
            ).fetchone()[0]
            polls += 1
            if found >= len(ids) or time.monotonic() - started > timeout:
                break
            time.sleep(0.1)
        done_wall = time.time()
        rows = conn.execute(
            """SELECT payload->>'id', min(created_at) FROM user_events
               WHERE type = 'message.created' AND created_at >= to_timestamp(%s) - interval '5 s'
                 AND payload->>'id' = ANY(%s)
               GROUP BY 1""",
            (since, ids),
        ).fetchall()
    return Drain(
        complete=found >= len(ids),
        found=found,
        first_poll_complete=polls == 1 and found >= len(ids),
        done_wall=done_wall,
        picked_up={message_id: at.timestamp() for message_id, at in rows},
    )


def machine_facts(db_url: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("server_version", "shared_buffers", "work_mem", "synchronous_commit")
        }
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f", {kib / 1024 / 1024:.1f} GiB RAM"
    return [
        f"machine: {os.cpu_count()} cores ({cpu_model()}){memory}, Python {sys.version.split()[0]}",
        f"PostgreSQL {shown['server_version']}: shared_buffers {shown['shared_buffers']}, "
        f"work_mem {shown['work_mem']}, synchronous_commit {shown['synchronous_commit']}",
    ]


# ----------------------------------------------------------------------------- main


def probe_send(port: int, workload: Workload, db_url: str, procs: list[Proc]) -> None:
    """One send end to end: proves the worker consumes before the clock starts."""
    conversation = workload.conversations[0]
    status, data = http_request(
        port,
        "POST",
        f"/v1/conversations/{conversation[0]}/messages",
        {"body": "probe before the benchmark", "client_id": f"probe-{uuid.uuid4()}"},
        {"Authorization": workload.tokens[conversation[1]]},
    )
    if status != 202:
        raise RuntimeError(f"probe send answered {status}: {data[:300]!r}")
    message_id = json.loads(data)["id"]
    deadline = time.monotonic() + 60
    with psycopg.connect(db_url, autocommit=True) as db:
        while db.execute("SELECT 1 FROM messages WHERE id = %s", (message_id,)).fetchone() is None:
            check_alive(*procs)
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not store the probe:\n{procs[-1].tail()}")
            time.sleep(0.2)


ERROR_MARKS = ("ERROR", "CRITICAL", "Traceback")


def error_summary(procs: list[Proc]) -> list[str]:
    """What the processes logged as errors, counted by their last line."""
    found: Counter[tuple[str, str]] = Counter()
    for proc in procs:
        if not proc.log_path.exists():
            continue
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if not any(mark in line for mark in ERROR_MARKS):
                continue
            what = line.strip()
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(line)
                what = (record.get("exc_info") or record.get("message") or line).strip()
            found[proc.name, what.splitlines()[-1][:160]] += 1
    return [f"{name}: {count} x {what}" for (name, what), count in found.most_common(5)]


def logged_errors(procs: list[Proc]) -> bool:
    """Whether a process logged a traceback or an error (gunicorn and Celery log some
    lines at INFO whatever the log level)."""
    for proc in procs:
        if proc.log_path.exists():
            text = proc.log_path.read_text(errors="replace")
            if any(mark in text for mark in ERROR_MARKS):
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A signal during the load arrives in gevent's hub, which passes it on to us; it
    # need not print it as an error on the way.
    hub = gevent.get_hub()
    print_exception = hub.print_exception

    def quiet_interrupts(context, kind, value, traceback) -> None:
        if not (isinstance(kind, type) and issubclass(kind, KeyboardInterrupt)):
            print_exception(context, kind, value, traceback)

    hub.print_exception = quiet_interrupts
    return run_cleanly(run, args)


def run(args: argparse.Namespace) -> int:
    from app.embedded import free_port

    db_url = database_url(args.pg_url, args.db_name)
    info = None if args.reseed else seeded_info(args)
    if info is None:
        if args.skip_seed:
            print(f"--skip-seed: database {args.db_name} is not seeded", file=sys.stderr)
            return 2
        print(
            f"seeding {args.db_name}: {args.messages} messages, {args.users} users, "
            f"{args.conversations} conversations",
            flush=True,
        )
        seed(args, db_url)
        info = seeded_info(args)
    else:
        print(
            f"seed: skipped, {args.db_name} was seeded at {info['at']} with "
            f"{info['messages']} messages, {info['users']} users and {info['conversations']} "
            "conversations (--reseed rebuilds it)",
            flush=True,
        )

    if args.seed_only:
        return 0
    for fact in machine_facts(db_url):
        print(fact)
    stored_before = count_messages(db_url)
    print(f"messages stored before the run: {stored_before}", flush=True)

    redis_client = redis.Redis.from_url(args.redis_url)
    redis_client.flushdb()
    port = args.port or free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    metrics_dir = log_dir / "prometheus"
    metrics_dir.mkdir()
    s3 = S3Store()
    procs: list[Proc] = []
    python = sys.executable
    rng = random.Random(args.seed)
    run_id = uuid.uuid4().hex[:8]
    completed = False
    try:
        env = (
            process_env(
                db_url,
                args.redis_url,
                inherit_settings=False,
                SWITCHBOARD_SERVICE_TOKEN=SERVICE_TOKEN,
                SWITCHBOARD_JWT_SECRET=JWT_SECRET,
                SWITCHBOARD_POLICY="bookstore",
            )
            | s3.start()
        )
        # The Procfile's lines, but for the worker's log level and name (the figures
        # quoted are with these).
        web_env = env | {
            "PORT": str(port),
            "WEB_CONCURRENCY": str(args.web_concurrency),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        web_command = [
            python,
            "-m",
            "gunicorn",
            "--config",
            "python:app.gunicorn_conf",
            "app:create_app()",
        ]
        worker_command = [
            python, "-m", "celery", "--app", "workers.main", "worker",
            "--queues", "direct,default", "--pool", "threads",
            "--concurrency", str(args.worker_concurrency),
            "--hostname", f"bench-{run_id}@%h", "--loglevel", "WARNING",
        ]  # fmt: skip
        web = Proc("web", web_env, log_dir / "web.log", web_command).start()
        procs.append(web)
        # As many connections per pool as threads, or the worker refuses to start.
        worker_env = env | {"SWITCHBOARD_DB_POOL_SIZE": str(max(10, args.worker_concurrency))}
        worker = Proc("worker", worker_env, log_dir / "worker.log", worker_command).start()
        procs.append(worker)
        prepared = time.perf_counter()
        workload = load_workload(db_url, env, rng)
        planned = plan_requests(args, workload, run_id, rng)
        print(
            f"workload: {len(planned)} requests planned over {len(workload.conversations)} "
            f"conversations and {len(workload.users)} users, {len(workload.anchors)} "
            f"conversations with before= anchors ({time.perf_counter() - prepared:.1f} s)",
            flush=True,
        )
        wait_healthy(port, *procs, path="/health/ready")
        probe_send(port, workload, db_url, procs)
        print(
            f"web on :{port} ({args.web_concurrency} gevent workers), worker with "
            f"{args.worker_concurrency} threads",
            flush=True,
        )
        print(
            f"load: {args.rate:.0f} req/s for {args.duration:.0f} s after {args.warmup:.0f} s "
            f"warm-up; mix list/history/send = "
            + "/".join(f"{part * 100:.0f}" for part in args.mix)
            + f"%, {args.before_share * 100:.0f}% of history pages with before=",
            flush=True,
        )
        quiet, waiting_since = 100.0 * machine_busy_share(2.0), time.monotonic()
        while quiet > QUIET_PERCENT and time.monotonic() - waiting_since < args.wait_quiet:
            print(
                f"machine {quiet:.0f}% busy with other work: waiting for it to settle", flush=True
            )
            quiet = 100.0 * machine_busy_share(5.0)
        print(
            f"machine CPU busy just before the load (ours idle): {quiet:.0f}% of all cores"
            + (
                "  << other work is running: figures will be pessimistic"
                if quiet > QUIET_PERCENT
                else ""
            ),
            flush=True,
        )
        roles = {os.getpid(): "generator"}
        roles |= {proc.pid: proc.name for proc in procs}
        busy0, procs0, window0 = machine_cpu(), process_cpu(), time.perf_counter()
        load_started_wall = time.time()
        outcomes, elapsed, generator_cpu, pool = run_load(args, port, planned)
        busy1, procs1, window = machine_cpu(), process_cpu(), time.perf_counter() - window0
        load_ended_wall = time.time()
        queued = sum(int(redis_client.llen(queue)) for queue in ("direct", "default"))
        pool.close()
        check_alive(*procs)
        report(args, outcomes, elapsed, generator_cpu, pool)
        if args.csv:
            write_csv(args.csv, outcomes, planned)
        busy, total = busy1[0] - busy0[0], busy1[1] - busy0[1]
        if total:
            print(f"machine CPU busy during the load: {busy / total * 100:.0f}% of all cores")
        text, cpu_seconds = cpu_breakdown(procs0, procs1, busy, window, roles, args.db_name)
        print(text)
        answered = sum(1 for o in outcomes if o.status) or 1
        print(
            "CPU per answered request (warm-up included): "
            f"web {cpu_seconds.get('web', 0) / answered * 1000:.1f} ms, postgres for the bench "
            f"db {cpu_seconds.get('postgres for the bench db', 0) / answered * 1000:.1f} ms"
        )

        accepted = [o for o in outcomes if o.message_id]
        ids = [o.message_id for o in accepted]
        drain = wait_for_drain(db_url, ids, load_started_wall, args.drain_timeout)
        if not drain.complete:
            print(
                f"worker drain: NOT done after {args.drain_timeout:.0f} s: "
                f"{drain.found} of {len(ids)} accepted sends stored"
            )
        elif ids:
            if drain.first_poll_complete:  # already done: when, the event log says
                last = max(drain.picked_up.values(), default=load_ended_wall)
                took = max(0.0, last - load_ended_wall)
            else:
                took = drain.done_wall - load_ended_wall
            print(
                f"worker drain: {queued} tasks were queued when the load stopped; all "
                f"{len(ids)} accepted sends were stored {took:.1f} s after the last response"
            )
        worker_pid = worker.pid
        worker_ticks = (
            process_cpu().get(worker_pid, ProcSample(0, 0, "")).ticks
            - procs0.get(worker_pid, ProcSample(0, 0, "")).ticks
        )
        if drain.found:
            print(
                f"worker CPU per stored send: "
                f"{worker_ticks / os.sysconf('SC_CLK_TCK') / drain.found * 1000:.1f} ms"
            )
        lags = sorted(
            drain.picked_up[o.message_id] - o.sent_wall
            for o in accepted
            if o.message_id in drain.picked_up
        )
        if lags:
            print(
                "send request sent -> worker transaction storing it began: "
                f"p50 {percentile(lags, 50) * 1000:.0f} ms, p99 {percentile(lags, 99) * 1000:.0f}"
                f" ms, max {lags[-1] * 1000:.0f} ms"
            )
        stored_after = count_messages(db_url)
        print(f"messages stored after the run: {stored_after} (+{stored_after - stored_before})")
        errors = error_summary(procs)
        if errors:
            print("errors the processes logged (most frequent first):")
            print("\n".join(f"  {line}" for line in errors))
        completed = True
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        s3.stop()
        redis_client.close()
        if completed and not logged_errors(procs):
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"logs of the web process and the worker kept in {log_dir}", file=sys.stderr)


def write_csv(path: Path, outcomes: list[Outcome], planned: list[Planned]) -> None:
    first = min(o.scheduled for o in outcomes)
    by_time = sorted(outcomes, key=lambda o: o.scheduled)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            ["scheduled_s", "kind", "status", "latency_ms", "lag_ms", "measured", "path"]
        )
        for outcome, item in zip(by_time, planned, strict=True):
            writer.writerow(
                [
                    f"{outcome.scheduled - first:.4f}",
                    outcome.kind,
                    outcome.status,
                    f"{outcome.latency * 1000:.2f}",
                    f"{outcome.lag * 1000:.2f}",
                    int(outcome.measured),
                    item.path,
                ]
            )
    print(f"per-request lines written to {path}")


def report(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    elapsed: float,
    generator_cpu: float,
    pool: HttpPool,
) -> None:
    measured = [o for o in outcomes if o.measured]
    table, passed = latency_table(measured)
    start_lags = sorted(o.start_lag * 1000 for o in measured)
    waited = sorted((o.lag - o.start_lag) * 1000 for o in measured if o.waited)
    planned_total = round(args.rate * (args.warmup + args.duration))
    issued = sorted(o.scheduled + o.start_lag for o in measured)
    span = issued[-1] - issued[0] if len(issued) > 1 else 0.0
    achieved = (len(issued) - 1) / span if span > 0 else float("nan")
    on_wire = sorted(o.scheduled + o.lag for o in measured)
    wire_span = on_wire[-1] - on_wire[0] if len(on_wire) > 1 else 0.0
    wire_rate = (len(on_wire) - 1) / wire_span if wire_span > 0 else float("nan")
    statuses = Counter(o.status for o in measured if not 200 <= o.status < 300)
    lines = [
        "",
        table,
        "",
        f"rate: target {args.rate:.1f} req/s, achieved {achieved:.1f} req/s issued in the "
        f"measured window ({len(measured)} requests over {span:.1f} s; {wire_rate:.1f} req/s "
        f"reached the wire); {len(outcomes)} of {planned_total} planned requests done in "
        f"{elapsed:.1f} s, warm-up included",
        f"generator: issued behind schedule by p50 {percentile(start_lags, 50):.1f} ms, "
        f"p99 {percentile(start_lags, 99):.1f} ms, max {start_lags[-1]:.1f} ms; "
        f"its CPU {generator_cpu / elapsed * 100:.0f}% of one core; "
        f"{pool.opened} connections opened, at most {pool.busiest} busy at once",
    ]
    if waited:
        lines.append(
            f"  {len(waited)} measured requests waited for a free connection (all "
            f"{max(args.connections, args.max_connections)} busy: the server answered slower "
            f"than requests arrived), p50 {percentile(waited, 50):.0f} ms, max "
            f"{waited[-1]:.0f} ms; that wait is inside the latencies above"
        )
    if statuses:
        lines.append(
            "errors by status: "
            + ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(statuses.items()))
        )
    lines.append(
        f"bar (p99 < {BAR_P99_MS:.0f} ms for list, history and send at {args.rate:.0f} req/s, "
        f"no errors): {'MET' if passed else 'NOT MET'}"
    )
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
