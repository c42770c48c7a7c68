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
import http.client
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import gevent
import gevent.lock
import gevent.pool
import gevent.socket
import psycopg
import redis
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
TENANT = "bookstore-bench"
SEED_MARK = "switchboard-bench-seed "
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


def database_url(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


# ----------------------------------------------------------------------------- seeding


def _words(text: str, separator: str | None = None) -> list[str]:
    return text.split(separator)


FIRST = _words(
    "Ada Ben Cleo Dev Elena Farid Greta Hugo Iris Jonas Kira Liam Maya Nils Olga Pablo Quinn "
    "Rosa Sami Tara Umar Vera Wes Xenia Yusuf Zoe Amir Bea Chen Dora Emil Fay Gil Hana Ivo Jade"
)
LAST = _words(
    "Abbott Berg Castro Dietrich Evans Fischer Garcia Horvat Ito Jensen Kowalski Larsen Moreau "
    "Novak Okafor Petrov Quist Rossi Schmidt Tanaka Ueda Varga Weber Xu Yilmaz Zielinski"
)
TITLES = _words(
    "Middlemarch|The Left Hand of Darkness|Piranesi|Beloved|Dune|The Remains of the Day|"
    "Stoner|Kindred|Gilead|The Master and Margarita|Pachinko|The Overstory|Circe|"
    "Normal People|A Gentleman in Moscow|The Name of the Rose|Wolf Hall|Station Eleven|"
    "Never Let Me Go|The Dispossessed|Bleak House|Anna Karenina|The Secret History|Hyperion|"
    "Lonesome Dove",
    "|",
)
SENTENCES = (
    "Hi, is {t} still in stock?",
    "Do you have the hardcover edition of {t}?",
    "I can pick it up on {d} after work.",
    "Thanks, that works for me!",
    "Could you hold {t} for me until {d}?",
    "The paperback arrived today, the cover is a bit creased but it's fine.",
    "Is there a signed copy of {t} anywhere?",
    "We got three copies of {t} in this morning.",
    "Sure, I'll put it aside under your name.",
    "Our book club is reading {t} next month, can you order eight copies?",
    "What time do you close on {d}?",
    "I think I left my umbrella at the reading last night.",
    "The author event for {t} moved to {d} at 7pm.",
    "Can I exchange a gift card for store credit?",
    "Great, see you then.",
    "Do you buy used books? I have two boxes of sci-fi paperbacks.",
    "Your order of {t} is ready at the front desk.",
    "Sorry for the delay, the distributor shipped the wrong edition.",
    "Any recommendations similar to {t}?",
    "If you liked {t} you might enjoy {u} too.",
    "ok",
    "Perfect, thank you so much!",
    "Is the discount for members also valid on preorders?",
    "I'd like to preorder {t}, it comes out on {d}.",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def message_body(rng: random.Random) -> str:
    """A chat message of whole sentences, 20 to 300 characters, mostly short."""
    target = 20 + int(280 * rng.random() ** 2)
    body = ""
    for _ in range(40):
        sentence = rng.choice(SENTENCES).format(
            t=rng.choice(TITLES), u=rng.choice(TITLES), d=rng.choice(DAYS)
        )
        longer = f"{body} {sentence}" if body else sentence
        if len(longer) > 300 or (body and len(longer) > target):
            if len(body) >= 20:
                break
            continue
        body = longer
    return body if len(body) >= 20 else "Thanks, see you on Saturday!"


@dataclass
class SeedPlan:
    users: list[tuple[str, str, str, str, datetime]] = field(default_factory=list)
    # (idx, id, user_a, user_b, starter, n, start_at, end_at)
    conversations: list[tuple] = field(default_factory=list)
    participants: list[tuple[uuid.UUID, str, int, bool]] = field(default_factory=list)
    bodies: list[tuple[int, str]] = field(default_factory=list)


def conversation_sizes(rng: random.Random, total: int, count: int) -> list[int]:
    """Skewed: a few conversations of thousands of messages, most of tens."""
    long_count = max(1, count // 1000)
    scale = min(1.0, total / 1_000_000)
    longs = [max(100, int(rng.randint(2000, 8000) * scale)) for _ in range(long_count)]
    rest = [min(1500.0, max(2.0, rng.lognormvariate(math.log(25), 1.0))) for _ in range(count)]
    rest = rest[: count - long_count]
    budget = total - sum(longs)
    factor = budget / sum(rest)
    sizes = [max(2, round(x * factor)) for x in rest]
    sizes[sizes.index(max(sizes))] += budget - sum(sizes)
    sizes += longs
    rng.shuffle(sizes)
    return sizes


def build_plan(args: argparse.Namespace, now: datetime) -> SeedPlan:
    rng = random.Random(args.seed)
    plan = SeedPlan()
    managers = max(2, args.users // 100)
    for number in range(1, args.users + 1):
        role = "manager" if number <= managers else "member"
        roll = rng.random()
        tier = "free" if roll < 0.6 else "privileged" if roll < 0.9 else "privileged_plus"
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        joined = now - timedelta(days=100 + 300 * rng.random())
        plan.users.append((f"user-{number:05d}", role, tier, name, joined))

    # Popularity: a few people are in many conversations, most in a handful.
    ids = [user[0] for user in plan.users]
    weights = [1.0 / (rank + 5) ** 0.8 for rank in range(len(ids))]
    rng.shuffle(weights)
    starters = [
        (user[0], weight)
        for user, weight in zip(plan.users, weights, strict=True)
        if user[1] == "manager" or user[2] != "free"
    ]
    starter_ids = [user_id for user_id, _ in starters]
    starter_cum = _cumulative([weight for _, weight in starters])
    everyone_cum = _cumulative(weights)

    seen: set[str] = set()
    sizes = conversation_sizes(rng, args.messages, args.conversations)
    horizon = timedelta(days=90)
    for idx, n in enumerate(sizes, start=1):
        while True:
            starter = rng.choices(starter_ids, cum_weights=starter_cum)[0]
            other = rng.choices(ids, cum_weights=everyone_cum)[0]
            key = "|".join(sorted((starter, other)))
            if other != starter and key not in seen:
                seen.add(key)
                break
        if n >= 1000:
            start = now - horizon + timedelta(days=5 * rng.random())
            end = now - timedelta(hours=6 * rng.random())
        else:
            start = now - horizon * rng.random()
            end = start + (now - start) * rng.random() ** 0.5
            least = timedelta(minutes=2 * n)
            if end - start < least:
                end = min(now - timedelta(seconds=1), start + least)
                start = end - least
        conversation_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        user_a, user_b = sorted((starter, other))
        plan.conversations.append((idx, conversation_id, user_a, user_b, starter, n, start, end))
        for user_id in (user_a, user_b):
            tail = 0 if rng.random() < 0.7 else rng.randint(1, 5)
            plan.participants.append((conversation_id, user_id, tail, rng.random() < 0.02))

    # Drawn with repeats, so that the seeded lengths follow message_body's distribution.
    plan.bodies = [(number, message_body(rng)) for number in range(1, 30_001)]
    return plan


def _cumulative(weights: list[float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += weight
        out.append(total)
    return out


MESSAGES_SQL = """
INSERT INTO messages (id, tenant_id, conversation_id, sender_id, client_id, body, body_sha256,
                      status, created_at, expires_at, deleted_at, deleted_by, delete_reason)
SELECT gen_random_uuid(), %(tenant)s, g.conversation_id, g.sender_id, g.client_id,
       CASE WHEN g.deleted THEN NULL ELSE b.body END,
       encode(sha256(convert_to(b.body, 'UTF8')), 'hex'),
       'stored', g.created_at,
       g.created_at + make_interval(days => CASE u.tier WHEN 'free' THEN 30
                                                        WHEN 'privileged' THEN 180 ELSE 365 END),
       CASE WHEN g.deleted THEN least(g.created_at + g.delete_after, %(now)s) END,
       CASE WHEN g.deleted THEN g.sender_id END,
       CASE WHEN g.deleted THEN 'deleted_by_sender' END
FROM (
    SELECT p.conversation_id,
           CASE WHEN k = 1 THEN p.starter
                WHEN random() < 0.5 THEN p.user_a ELSE p.user_b END AS sender_id,
           's' || p.idx || '-' || k AS client_id,
           -- slot k of n, jittered inside the slot: strictly increasing per conversation
           p.start_at + (p.end_at - p.start_at) * ((k - 1 + 0.9 * random()) / p.n) AS created_at,
           1 + floor(random() * %(bodies)s)::int AS body_id,
           random() < 0.005 AS deleted,
           interval '1 minute' * floor(random() * 600) AS delete_after
    FROM bench_conversation_plan p CROSS JOIN LATERAL generate_series(1, p.n) AS k
    OFFSET 0
) g
JOIN bench_bodies b ON b.id = g.body_id
JOIN users u ON u.id = g.sender_id
"""

CONVERSATION_ACTIVITY_SQL = """
UPDATE conversations c
SET last_activity_at = m.created_at, last_message_id = m.id
FROM (
    SELECT DISTINCT ON (conversation_id) conversation_id, id, created_at
    FROM messages WHERE status = 'stored'
    ORDER BY conversation_id, created_at DESC, id DESC
) m
WHERE c.id = m.conversation_id
"""

RECENT_SQL = """
CREATE TEMP TABLE bench_recent AS
SELECT p.conversation_id, r.id, r.created_at, r.sender_id, r.deleted_at,
       row_number() OVER (PARTITION BY p.conversation_id
                          ORDER BY r.created_at DESC, r.id DESC) AS rn
FROM bench_conversation_plan p
CROSS JOIN LATERAL (
    SELECT id, created_at, sender_id, deleted_at FROM messages m
    WHERE m.conversation_id = p.conversation_id AND m.status = 'stored'
    ORDER BY created_at DESC, id DESC LIMIT 6
) r
"""

# Each participant has read all but its `tail` newest messages: the read pointer is the
# message just before them, and the unread count is what mark_read would count.
PARTICIPANTS_SQL = """
INSERT INTO participants (conversation_id, user_id, last_activity_at, last_read_at,
                          last_read_message_id, unread_count, archived, joined_at)
SELECT pp.conversation_id, pp.user_id, c.last_activity_at, rd.created_at, rd.id,
       (SELECT count(*) FROM bench_recent r
        WHERE r.conversation_id = pp.conversation_id AND r.rn <= pp.tail
          AND r.sender_id <> pp.user_id AND r.deleted_at IS NULL),
       pp.archived, c.created_at
FROM bench_participant_plan pp
JOIN conversations c ON c.id = pp.conversation_id
LEFT JOIN bench_recent rd ON rd.conversation_id = pp.conversation_id AND rd.rn = pp.tail + 1
"""


def seed(args: argparse.Namespace, db_url: str) -> None:
    from app.cli import upgrade_database

    started = time.perf_counter()
    now = datetime.now(UTC).replace(microsecond=0)
    step = _stepper(started)
    with psycopg.connect(args.pg_url, autocommit=True) as admin:
        name = sql.Identifier(args.db_name)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    upgrade_database(db_url)
    step("database created and migrated")

    plan = build_plan(args, now)
    step(f"plan built in Python ({len({body for _, body in plan.bodies})} distinct bodies)")

    with psycopg.connect(db_url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("SET work_mem = '64MB'")
        conn.execute("INSERT INTO tenants (id, created_at) VALUES (%s, %s)", (TENANT, now))
        with conn.cursor().copy(
            "COPY users (id, tenant_id, role, tier, display_name, created_at, updated_at) "
            "FROM STDIN"
        ) as copy:
            for user_id, role, tier, name, joined in plan.users:
                copy.write_row((user_id, TENANT, role, tier, name, joined, joined))
        conn.execute(
            """CREATE TEMP TABLE bench_conversation_plan (
                idx int, conversation_id uuid PRIMARY KEY, user_a text, user_b text,
                starter text, n int, start_at timestamptz, end_at timestamptz)"""
        )
        with conn.cursor().copy("COPY bench_conversation_plan FROM STDIN") as copy:
            for row in plan.conversations:
                copy.write_row(row)
        conn.execute(
            """INSERT INTO conversations (id, tenant_id, pair_key, subject_key, status,
                   created_by, created_at, last_activity_at)
               SELECT conversation_id, %s, user_a || '|' || user_b, '', 'active', starter,
                      start_at, end_at
               FROM bench_conversation_plan""",
            (TENANT,),
        )
        conn.execute("CREATE TEMP TABLE bench_bodies (id int PRIMARY KEY, body text)")
        with conn.cursor().copy("COPY bench_bodies FROM STDIN") as copy:
            for row in plan.bodies:
                copy.write_row(row)
        conn.execute("ANALYZE users; ANALYZE bench_conversation_plan; ANALYZE bench_bodies")
        step(f"{len(plan.users)} users, {len(plan.conversations)} conversations")

        inserted = conn.execute(
            MESSAGES_SQL, {"tenant": TENANT, "now": now, "bodies": len(plan.bodies)}
        ).rowcount
        step(f"{inserted} messages")
        conn.execute("ANALYZE messages")
        conn.execute(CONVERSATION_ACTIVITY_SQL)
        conn.execute(RECENT_SQL)
        conn.execute("CREATE INDEX ON bench_recent (conversation_id, rn)")
        conn.execute(
            """CREATE TEMP TABLE bench_participant_plan (
                conversation_id uuid, user_id text, tail int, archived bool)"""
        )
        with conn.cursor().copy("COPY bench_participant_plan FROM STDIN") as copy:
            for row in plan.participants:
                copy.write_row(row)
        conn.execute("ANALYZE bench_participant_plan; ANALYZE bench_recent")
        participants = conn.execute(PARTICIPANTS_SQL).rowcount
        step(f"conversation activity and {participants} participants with read state")
        conn.commit()

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        info = {
            "messages": args.messages,
            "users": args.users,
            "conversations": args.conversations,
            "seed": args.seed,
            "at": now.isoformat(),
        }
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(args.db_name), sql.Literal(SEED_MARK + json.dumps(info))
            )
        )
        step("VACUUM ANALYZE")
    print(f"seed: done in {time.perf_counter() - started:.1f} s", flush=True)


def _stepper(started: float):
    last = [started]

    def step(what: str) -> None:
        now = time.perf_counter()
        print(f"seed: {what} (+{now - last[0]:.1f} s)", flush=True)
        last[0] = now

    return step


def seeded_info(args: argparse.Namespace) -> dict | None:
    with psycopg.connect(args.pg_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (args.db_name,),
        ).fetchone()
    if row is None or not row[0] or not row[0].startswith(SEED_MARK):
        return None
    return json.loads(row[0][len(SEED_MARK) :])


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """The web process and the worker, started as the Procfile starts them."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], extra_env: dict[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen(
            command,
            cwd=REPO,
            env=self.env | extra_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
        )
        log.close()

    def check_alive(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def error_summary(self) -> list[str]:
        """What the processes logged as errors, counted by their last line."""
        found: Counter[tuple[str, str]] = Counter()
        for name in self.running:
            path = self.log_dir / f"{name}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if not any(mark in line for mark in ("ERROR", "CRITICAL", "Traceback")):
                    continue
                what = line.strip()
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    what = (record.get("exc_info") or record.get("message") or line).strip()
                found[name, what.splitlines()[-1][:160]] += 1
        return [f"{name}: {count} x {what}" for (name, what), count in found.most_common(5)]

    def logged_errors(self) -> bool:
        """Whether a process logged a traceback or an error (gunicorn and Celery log some
        lines at INFO whatever the log level)."""
        for path in self.log_dir.glob("*.log"):
            text = path.read_text(errors="replace")
            if any(mark in text for mark in ("Traceback", "ERROR", "CRITICAL")):
                return True
        return False

    def stop_all(self) -> None:
        for name, process in reversed(list(self.running.items())):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in 30 s: killing it", flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
            # Whatever the process group left behind (it was ours alone).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        self.running.clear()


# ----------------------------------------------------------------------------- HTTP client


class StaleConnection(Exception):
    pass


class HttpPool:
    """Keep-alive HTTP/1.1 connections on gevent sockets, used in turn (least recently
    used first), so that the load spreads over all of them, and so over every gunicorn
    worker that accepted some, as traffic from many clients would.

    http.client on gevent's socket cooperates without monkey-patching. A connection
    idle for longer than the server's keep-alive is replaced before use; one that the
    server closed under us is retried once on a fresh connection, as browsers do. When
    every connection is busy another is opened, up to `limit`.
    """

    IDLE_LIMIT = 4.0  # gunicorn's keepalive is 5 s

    def __init__(self, host: str, port: int, limit: int, timeout: float) -> None:
        self.host, self.port, self.timeout, self.limit = host, port, timeout, limit
        self._slots = gevent.lock.BoundedSemaphore(limit)
        self._idle: deque[tuple[http.client.HTTPConnection, float]] = deque()
        self.opened = 0
        self.busiest = 0
        self._busy = 0

    def _new(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn._create_connection = gevent.socket.create_connection  # type: ignore[attr-defined]
        self.opened += 1
        return conn

    def open(self, count: int) -> None:
        """Connect `count` connections now, before the clock starts."""
        for _ in range(count):
            conn = self._new()
            conn.connect()
            self._idle.append((conn, time.monotonic()))

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None = None,
        on_send: Callable[[bool], None] | None = None,
    ) -> tuple[int, bytes]:
        """One exchange; `on_send(waited)` is called once a connection is ours, as the
        request goes on the wire, saying whether it had to wait for a free one."""
        waited = self._busy >= self.limit
        with self._slots:
            self._busy += 1
            self.busiest = max(self.busiest, self._busy)
            if on_send is not None:
                on_send(waited)
            try:
                return self._request(method, path, headers, body)
            finally:
                self._busy -= 1

    def _request(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, bytes]:
        conn, reused = None, False
        while self._idle:
            candidate, last_used = self._idle.popleft()
            if time.monotonic() - last_used < self.IDLE_LIMIT:
                conn, reused = candidate, True
                break
            candidate.close()
        conn = conn or self._new()
        try:
            try:
                status, data = self._exchange(conn, method, path, headers, body)
            except StaleConnection:
                conn.close()
                if not reused:
                    raise
                conn = self._new()
                status, data = self._exchange(conn, method, path, headers, body)
        except BaseException:
            conn.close()
            raise
        self._idle.append((conn, time.monotonic()))
        return status, data

    @staticmethod
    def _exchange(conn, method, path, headers, body) -> tuple[int, bytes]:
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            raise StaleConnection(str(exc)) from exc
        return response.status, response.read()

    def close(self) -> None:
        while self._idle:
            self._idle.popleft()[0].close()


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
    workload.size_cum = _cumulative([max(1, row[3]) for row in rows])
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

    cpu_before = _cpu_seconds()
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
    return [o for o in outcomes if o is not None], elapsed, _cpu_seconds() - cpu_before, pool


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


@dataclass(frozen=True, slots=True)
class ProcSample:
    ppid: int
    ticks: int  # user + system clock ticks so far
    command: str


def process_cpu() -> dict[int, ProcSample]:
    """CPU ticks used so far by every process on the machine, from /proc (Linux only)."""
    samples: dict[int, ProcSample] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return samples
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        samples[int(entry)] = ProcSample(int(fields[1]), int(fields[11]) + int(fields[12]), command)
    return samples


def cpu_breakdown(
    before: dict[int, ProcSample],
    after: dict[int, ProcSample],
    busy_ticks: int,
    seconds: float,
    roles: dict[int, str],
    db_name: str,
) -> tuple[str, dict[str, float]]:
    """Percent of one core used in the window by each part: ours, PostgreSQL serving our
    database, and the rest of the machine's busy time (other people's work included,
    and processes that came and went during the window)."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    used: Counter[str] = Counter()
    web_workers: list[float] = []
    for pid, sample in after.items():
        base = before.get(pid)
        ticks = sample.ticks - (base.ticks if base and base.command == sample.command else 0)
        role = roles.get(pid) or roles.get(sample.ppid)
        if role is None and sample.command.startswith("postgres:"):
            # Backends are titled "postgres: <cluster>: <user> <database> <client> <state>";
            # the WAL writer, checkpointer and background writer work for every database.
            if f" {db_name} " in sample.command:
                role = "postgres for the bench db"
            elif "writer" in sample.command or "checkpointer" in sample.command:
                role = "postgres background"
        elif role is None and sample.command.startswith("redis-server"):
            role = "redis (shared)"
        if ticks <= 0 or role is None:
            continue
        used[role] += ticks
        if role == "web" and pid not in roles:
            web_workers.append(ticks)
    scale = 100.0 / (ticks_per_second * seconds)
    parts = []
    roles_shown = ("web", "worker", "generator", "postgres for the bench db")
    for role in (*roles_shown, "postgres background", "redis (shared)"):
        if role not in roles_shown and not used[role]:
            continue
        part = f"{role} {used[role] * scale:.0f}%"
        if role == "web" and len(web_workers) > 1:
            shares = ", ".join(f"{t * scale:.0f}%" for t in sorted(web_workers, reverse=True))
            part += f" (gunicorn workers {shares})"
        parts.append(part)
    rest = max(0, busy_ticks - sum(used.values()))
    parts.append(f"everything else {rest * scale:.0f}%")
    heading = f"CPU during the load, % of one core (the machine has {os.cpu_count()}): "
    seconds_by_role = {role: ticks / ticks_per_second for role, ticks in used.items()}
    return heading + "; ".join(parts), seconds_by_role


def machine_load_now(seconds: float = 2.0) -> float:
    """Percent of all cores busy over the next `seconds`."""
    first = machine_busy()
    time.sleep(seconds)
    second = machine_busy()
    total = second[1] - first[1]
    return 100.0 * (second[0] - first[0]) / total if total else 0.0


# ----------------------------------------------------------------------------- report


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


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
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " (" + line.split(":", 1)[1].strip() + ")"
                break
    return [
        f"machine: {os.cpu_count()} cores{model}{memory}, Python {sys.version.split()[0]}",
        f"PostgreSQL {shown['server_version']}: shared_buffers {shown['shared_buffers']}, "
        f"work_mem {shown['work_mem']}, synchronous_commit {shown['synchronous_commit']}",
    ]


# ----------------------------------------------------------------------------- main


def wait_ready(port: int, processes: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        processes.check_alive()
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/health/ready")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"web not ready after {timeout:.0f} s:\n{processes.tail('web')}")
        time.sleep(0.25)


def probe_send(port: int, workload: Workload, db_url: str, processes: Processes) -> None:
    """One send end to end: proves the worker consumes before the clock starts."""
    conversation = workload.conversations[0]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"body": "probe before the benchmark", "client_id": f"probe-{uuid.uuid4()}"})
    conn.request(
        "POST",
        f"/v1/conversations/{conversation[0]}/messages",
        body=body,
        headers={
            "Authorization": workload.tokens[conversation[1]],
            "Content-Type": "application/json",
        },
    )
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 202:
        raise RuntimeError(f"probe send answered {response.status}: {data[:300]!r}")
    message_id = json.loads(data)["id"]
    deadline = time.monotonic() + 60
    with psycopg.connect(db_url, autocommit=True) as db:
        while db.execute("SELECT 1 FROM messages WHERE id = %s", (message_id,)).fetchone() is None:
            processes.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not store the probe:\n{processes.tail('worker')}")
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    from common import S3Store

    args = parse_args(argv)
    db_url = database_url(args.pg_url, args.db_name)

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    # A signal during the load arrives in gevent's hub, which passes it on to us; it
    # need not print it as an error on the way.
    hub = gevent.get_hub()
    print_exception = hub.print_exception

    def quiet_interrupts(context, kind, value, traceback) -> None:
        if not (isinstance(kind, type) and issubclass(kind, KeyboardInterrupt)):
            print_exception(context, kind, value, traceback)

    hub.print_exception = quiet_interrupts

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
    settings_env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": args.redis_url,
        "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
        "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
        "SWITCHBOARD_POLICY": "bookstore",
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
        "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
        **s3.start(),
    }
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SWITCHBOARD_", "PROMETHEUS_")) and key != "SWITCHBOARD_BROKER_URL"
    } | settings_env
    processes = Processes(env, log_dir)
    python = sys.executable
    rng = random.Random(args.seed)
    run_id = uuid.uuid4().hex[:8]
    completed = False
    try:
        processes.start(
            "web",
            [python, "-m", "gunicorn", "--config", "python:app.gunicorn_conf", "app:create_app()"],
            {
                "PORT": str(port),
                "WEB_CONCURRENCY": str(args.web_concurrency),
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            },
        )
        processes.start(
            "worker",
            [
                python, "-m", "celery", "--app", "workers.main", "worker",
                "--queues", "direct,default", "--pool", "threads",
                "--concurrency", str(args.worker_concurrency),
                "--hostname", f"bench-{run_id}@%h", "--loglevel", "WARNING",
            ],
            {},
        )  # fmt: skip
        prepared = time.perf_counter()
        workload = load_workload(db_url, settings_env, rng)
        planned = plan_requests(args, workload, run_id, rng)
        print(
            f"workload: {len(planned)} requests planned over {len(workload.conversations)} "
            f"conversations and {len(workload.users)} users, {len(workload.anchors)} "
            f"conversations with before= anchors ({time.perf_counter() - prepared:.1f} s)",
            flush=True,
        )
        wait_ready(port, processes)
        probe_send(port, workload, db_url, processes)
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
        quiet, waiting_since = machine_load_now(), time.monotonic()
        while quiet > QUIET_PERCENT and time.monotonic() - waiting_since < args.wait_quiet:
            print(
                f"machine {quiet:.0f}% busy with other work: waiting for it to settle", flush=True
            )
            quiet = machine_load_now(5.0)
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
        roles |= {process.pid: name for name, process in processes.running.items()}
        busy0, procs0, window0 = machine_busy(), process_cpu(), time.perf_counter()
        load_started_wall = time.time()
        outcomes, elapsed, generator_cpu, pool = run_load(args, port, planned)
        busy1, procs1, window = machine_busy(), process_cpu(), time.perf_counter() - window0
        load_ended_wall = time.time()
        queued = sum(int(redis_client.llen(queue)) for queue in ("direct", "default"))
        pool.close()
        processes.check_alive()
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
        worker_pid = processes.running["worker"].pid
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
        errors = processes.error_summary()
        if errors:
            print("errors the processes logged (most frequent first):")
            print("\n".join(f"  {line}" for line in errors))
        completed = True
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the web process and the worker", file=sys.stderr)
        return 130
    finally:
        processes.stop_all()
        s3.stop()
        redis_client.close()
        if completed and not processes.logged_errors():
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
