"""Seed 001's acceptance load run: 5,000 direct messages and 500 broadcasts from many
users at once, against the Procfile's processes, counted afterwards in the database.

    .venv/bin/python bench/seed001_load.py                  # 5,000 sends + 500 broadcasts
    .venv/bin/python bench/seed001_load.py --rate 100       # a gentler arrival rate

Seed 001 (the card show) asks of its k6 script "5k concurrent DM sends & 500 broadcasts"
with p99 under 200 ms and errors under 0.5 %; our bar is p99 under 100 ms, no errors,
nothing lost and nothing stored twice. It creates a database of its own with one cardshow
tenant (attendees, dealers, MVP dealers, organizers, moderators), conversations between
attendees and MVP dealers, dealers and MVP dealers, organizers and attendees (made through
the service the start endpoint uses), starts the Procfile's `web`, `worker`, `broadcasts`
and `beat` lines, and sends the calls interleaved, open loop at --rate over keep-alive
connections: each direct message from one side of a random conversation (replies too),
each broadcast from an organizer (two per show, to every audience) or an MVP dealer (to
attendees). Latency counts from when a call was due. When the workers have drained, it
counts from PostgreSQL, for every 202: the message stored once, its `message.created`
event in the recipient's log once; the broadcast stored, one inbox row and one
`broadcast.created` event for each member of its audience. It prints p50/p95/p99/max per
call, errors, lost and duplicated, and the verdict against both bars; it stops what it
started and drops its database on exit.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Call, latency_table, open_loop, percentile, raise_nofile, run_cleanly, verdict
from database import psycopg_url
from proc_stats import CpuMeter, wait_quiet
from procs import BenchRun, wait_healthy

TENANT = "seed001"
SERVICE_TOKEN = "seed001-bench-service-token-0123456789"
JWT_SECRET = "seed001-bench-jwt-secret-0123456789abcdefghijklmnop"
SEED_BAR = {"p99_ms": 200.0, "error_share": 0.005}
OUR_BAR = {"p99_ms": 100.0, "error_share": 0.0}
AUDIENCES = ("all", "attendee", "dealer", "mvp_dealer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    env = os.environ.get
    parser.add_argument("--sends", type=int, default=5000, help="direct messages (%(default)s)")
    parser.add_argument(
        "--broadcasts",
        type=int,
        default=500,
        help="broadcasts, at most 2 per organizer and "
        "show plus 1 per MVP dealer and show (%(default)s)",
    )
    parser.add_argument("--attendees", type=int, default=1000)
    parser.add_argument("--dealers", type=int, default=100)
    parser.add_argument("--mvp-dealers", type=int, default=100)
    parser.add_argument("--organizers", type=int, default=20)
    parser.add_argument("--moderators", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second, all kinds")
    parser.add_argument("--connections", type=int, default=48, help="keep-alive connections")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the plan")
    parser.add_argument("--web-concurrency", type=int, default=int(env("WEB_CONCURRENCY", "2")))
    parser.add_argument(
        "--worker-concurrency", type=int, default=int(env("WORKER_CONCURRENCY", "8"))
    )
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--wait-quiet", type=float, default=60.0)
    parser.add_argument(
        "--pg-url",
        default=env("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL URL with rights to create databases (default: %(default)s)",
    )
    parser.add_argument("--db-name", default="switchboard_seed001_bench")
    parser.add_argument(
        "--redis-url",
        default=env("BENCH_SEED001_REDIS_URL", "redis://127.0.0.1:6379/12"),
        help="a Redis database of the benchmark's own: it is flushed at start (%(default)s)",
    )
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args(argv)
    shows = 1 + max(0, (args.broadcasts - args.mvp_dealers) // max(1, 2 * args.organizers))
    if args.broadcasts > 2 * args.organizers * shows + args.mvp_dealers * shows:
        parser.error("--broadcasts: more than the quotas allow for these senders")
    if min(args.attendees, args.dealers, args.mvp_dealers, args.organizers) < 1:
        parser.error("at least one user of each role")
    if args.rate <= 0 or args.connections < 1:
        parser.error("--rate must be positive, --connections at least 1")
    return args


# ----------------------------------------------------------------------------- the show

ROLES = (
    ("attendee", "a", "attendees"),
    ("dealer", "d", "dealers"),
    ("mvp_dealer", "m", "mvp_dealers"),
    ("organizer", "o", "organizers"),
    ("moderator", "x", "moderators"),
)


def user(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def provision(url: str, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The tenant and its users (one statement per role), and the conversations, through
    the service the start endpoint uses (so every rule holds). Returns (conversation id,
    starter, other) for each."""
    from app.db import Database
    from app.models import User
    from app.policy import load_policy
    from app.services.conversations import start_conversation

    policy = load_policy("cardshow")
    database = Database(url, pool_size=1)
    try:
        with database.transaction() as session:
            connection = session.connection()
            connection.exec_driver_sql("INSERT INTO tenants (id) VALUES (%(t)s)", {"t": TENANT})
            for role, prefix, option in ROLES:
                connection.exec_driver_sql(
                    "INSERT INTO users (id, tenant_id, role, tier, display_name) "
                    "SELECT %(prefix)s::text || '-' || lpad(n::text, 5, '0'), %(t)s, %(role)s, "
                    "'standard', %(name)s::text || n FROM generate_series(0, %(last)s) AS n",
                    {
                        "prefix": prefix,
                        "t": TENANT,
                        "role": role,
                        "name": f"{role} ",
                        "last": getattr(args, option) - 1,
                    },
                )
        pairs = [(user("a", i), user("m", i % args.mvp_dealers)) for i in range(args.attendees)]
        pairs += [(user("d", i), user("m", i % args.mvp_dealers)) for i in range(args.dealers)]
        pairs += [
            (user("o", i), user("a", (i * 37) % args.attendees)) for i in range(args.organizers)
        ]
        conversations = []
        with database.transaction() as session:
            starters = {u.id: u for u in session.query(User).filter(User.tenant_id == TENANT)}
            for starter, other in pairs:
                conversation, _ = start_conversation(
                    session, policy, starters[starter], other, None
                )
                conversations.append((str(conversation.id), starter, other))
        return conversations
    finally:
        database.dispose()


def plan(
    args: argparse.Namespace, conversations: list[tuple[str, str, str]], token: Any
) -> list[Call]:
    """The calls, shuffled: sends from a random side of a random conversation (a third are
    replies), broadcasts from organizers (two per show, audiences in turn) and MVP dealers
    (one per show, to attendees), all within their quotas."""
    rng = random.Random(args.seed)
    calls = []
    for n in range(args.sends):
        conversation, starter, other = rng.choice(conversations)
        sender = other if rng.random() < 1 / 3 else starter
        body = {"body": f"seed001 dm {n}: is the 1999 holo still on your table?"}
        calls.append(
            Call(
                "send",
                "POST",
                f"/v1/conversations/{conversation}/messages",
                token(sender),
                body | {"client_id": f"dm-{n}"},
            )
        )
    senders = []  # (sender, audience, scope): organizers' two a show, then MVP dealers' one
    show = 0
    while len(senders) < args.broadcasts:
        for i in range(args.organizers):
            for turn in range(2):
                audience = AUDIENCES[(i + 2 * show + turn) % len(AUDIENCES)]
                senders.append((user("o", i), audience, f"show-{show}"))
        senders += [(user("m", i), "attendee", f"show-{show}") for i in range(args.mvp_dealers)]
        show += 1
    for n, (sender, audience, scope) in enumerate(rng.sample(senders, args.broadcasts)):
        body = f"seed001 broadcast {n}: doors open at nine, table {n % 300}"
        calls.append(
            Call(
                "broadcast",
                "POST",
                "/v1/broadcasts",
                token(sender),
                {"audience": audience, "scope": scope, "body": body, "client_id": f"bc-{n}"},
            )
        )
    rng.shuffle(calls)
    return calls


# ----------------------------------------------------------------------------- counting

WAITING_SQL = """
SELECT (SELECT count(*) FROM messages WHERE tenant_id = %(t)s AND status = 'queued'),
       (SELECT count(*) FROM broadcasts WHERE tenant_id = %(t)s AND status = 'queued')
"""

# Per accepted send: its rows (by the client id it was sent with), and its message.created
# events in the recipient's log.
SENDS_SQL = """
SELECT m.client_id, m.status, count(*) OVER (PARTITION BY m.body) AS same_body,
       (SELECT count(*) FROM participants p JOIN user_events e
          ON e.user_id = p.user_id AND e.type = 'message.created'
         AND e.payload ->> 'id' = m.id::text
        WHERE p.conversation_id = m.conversation_id AND p.user_id <> m.sender_id) AS events,
       extract(epoch FROM m.decided_at - m.created_at) AS to_decided
FROM messages m WHERE m.tenant_id = %(t)s AND m.client_id NOT LIKE 'warm-%%'
"""

# Per broadcast: its audience now (the sender excepted), inbox rows, events: one pass over
# each table (the event log's index on payload ->> 'id' covers message events only).
BROADCASTS_SQL = """
WITH events AS (
  SELECT payload ->> 'id' AS id, count(*) AS events, count(DISTINCT user_id) AS reached
  FROM user_events WHERE type = 'broadcast.created' GROUP BY 1
), inbox AS (
  SELECT broadcast_id, count(*) AS rows FROM broadcast_recipients GROUP BY 1
)
SELECT b.client_id, b.status,
       (SELECT count(*) FROM users u WHERE u.tenant_id = b.tenant_id AND u.id <> b.sender_id
          AND (b.audience = 'all' OR u.role = b.audience)) AS audience,
       coalesce(i.rows, 0), coalesce(e.events, 0), coalesce(e.reached, 0),
       extract(epoch FROM b.decided_at - b.created_at) AS to_decided
FROM broadcasts b
LEFT JOIN inbox i ON i.broadcast_id = b.id
LEFT JOIN events e ON e.id = b.id::text
WHERE b.tenant_id = %(t)s
"""


def wait_drained(url: str, timeout: float) -> tuple[float, int, int]:
    import psycopg

    started = time.monotonic()
    with psycopg.connect(psycopg_url(url), autocommit=True) as connection:
        while True:
            sends, broadcasts = connection.execute(WAITING_SQL, {"t": TENANT}).fetchone()
            if (sends == 0 and broadcasts == 0) or time.monotonic() - started > timeout:
                return time.monotonic() - started, sends, broadcasts
            time.sleep(0.5)


def count(url: str, calls: list[Call]) -> dict[str, Any]:
    """What the database holds against what was accepted: lost (a 202 with no stored row,
    or a stored message its recipient has no event for) and duplicated (a send stored
    twice, an event written twice)."""
    import psycopg

    accepted = {c.body["client_id"]: c for c in calls if c.status == 202 and c.body}
    with psycopg.connect(psycopg_url(url), autocommit=True) as connection:
        sends = connection.execute(SENDS_SQL, {"t": TENANT}).fetchall()
        broadcasts = connection.execute(BROADCASTS_SQL, {"t": TENANT}).fetchall()
    figures: dict[str, Any] = {}
    stored = {row[0]: row for row in sends if row[1] == "stored"}
    dm_accepted = [key for key, c in accepted.items() if c.kind == "send"]
    figures["dm_accepted"] = len(dm_accepted)
    figures["dm_stored"] = len(stored)
    figures["dm_rejected"] = sum(1 for row in sends if row[1] == "rejected")
    figures["dm_lost"] = sum(1 for key in dm_accepted if key not in stored)
    figures["dm_undelivered"] = sum(1 for row in stored.values() if row[3] == 0)
    figures["dm_duplicated"] = sum(1 for row in sends if row[2] > 1)
    figures["dm_events_doubled"] = sum(1 for row in stored.values() if row[3] > 1)
    figures["dm_without_202"] = sum(1 for key in stored if key not in accepted)
    figures["dm_to_stored"] = [float(row[4]) for row in stored.values() if row[4] is not None]
    done = {row[0]: row for row in broadcasts if row[1] == "stored"}
    bc_accepted = [key for key, c in accepted.items() if c.kind == "broadcast"]
    figures["bc_accepted"] = len(bc_accepted)
    figures["bc_stored"] = len(done)
    figures["bc_lost"] = sum(1 for key in bc_accepted if key not in done)
    figures["bc_audience"] = sum(row[2] for row in done.values())
    figures["bc_inbox"] = sum(row[3] for row in done.values())
    figures["bc_recipients_missed"] = sum(max(0, row[2] - row[5]) for row in done.values())
    figures["bc_events_doubled"] = sum(row[4] - row[5] for row in done.values())
    figures["bc_to_stored"] = [float(row[6]) for row in done.values() if row[6] is not None]
    return figures


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    from app.auth import mint_token
    from app.settings import load_settings

    print("== Seed 001 load run: direct messages and broadcasts at a card show")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    raise_nofile()
    with BenchRun(
        "seed001_load-", args.pg_url, args.db_name, args.redis_url, args.keep_db
    ) as bench:
        port, work = bench.port, bench.work
        # The first clean-up handed over, so the last done: after every other.
        bench.defer(
            lambda: print(f"(answered at {time.strftime('%Y-%m-%d %H:%M')}; logs kept in {work})")
        )
        database_url, env = bench.environment(
            SWITCHBOARD_SERVICE_TOKEN=SERVICE_TOKEN,
            SWITCHBOARD_JWT_SECRET=JWT_SECRET,
            SWITCHBOARD_POLICY="cardshow",
        )
        settings = load_settings(env)
        started = time.monotonic()
        conversations = provision(database_url, args)
        users = sum(getattr(args, option) for _, _, option in ROLES)
        tokens: dict[str, str] = {}

        def token(user_id: str) -> str:
            if user_id not in tokens:
                tokens[user_id] = mint_token(settings, user_id, TENANT)
            return tokens[user_id]

        calls = plan(args, conversations, token)
        print(
            f"{users} users and {len(conversations)} conversations in one cardshow tenant, "
            f"{len(calls)} calls planned, in {time.monotonic() - started:.1f}s; logs in {work}"
        )
        web = bench.start("web", bench.web_env(env, args.web_concurrency))
        bench.start("worker", env, WORKER_CONCURRENCY=str(args.worker_concurrency))
        bench.start("broadcasts", env)
        bench.start("beat", env, CELERY_BEAT_SCHEDULE=str(work / "celerybeat-schedule"))
        wait_healthy(port, web)
        pids = {proc.name: [proc.pid] for proc in bench.procs}
        pids["web"] = web.workers(args.web_concurrency)
        # The first call of each process pays for imports and pools: one of each, unmeasured.
        warm = plan(
            argparse.Namespace(**{**vars(args), "sends": 20, "broadcasts": 0}), conversations, token
        )
        for call in warm:
            assert call.body is not None
            call.body = {
                "body": "warm " + call.body["body"],
                "client_id": "warm-" + call.body["client_id"],
            }
        open_loop(port, warm, 20.0, 4)
        wait_drained(database_url, 60)
        wait_quiet(args.wait_quiet)
        meter = CpuMeter(pids, args.db_name, redis_pid=bench.redis_pid)
        print(
            f"{os.cpu_count()} cores; web 127.0.0.1:{port} ({args.web_concurrency} gunicorn "
            f"workers), worker ({args.worker_concurrency} threads), broadcasts, beat; "
            f"{args.connections} connections, open loop at {args.rate:g} calls/s"
        )
        meter.begin()
        took = open_loop(port, calls, args.rate, args.connections)
        drained, left_sends, left_broadcasts = wait_drained(database_url, args.drain_timeout)
        measured = meter.measure()
        print(
            f"\n{len(calls)} calls in {took:.1f}s ({len(calls) / took:.0f}/s achieved); "
            f"workers drained {drained:.1f}s after the last answer"
            + (
                f" (NOT drained: {left_sends} sends, {left_broadcasts} broadcasts queued)"
                if left_sends or left_broadcasts
                else ""
            )
        )
        print("\nlatency in ms, from when each call was due; errors: answers other than 202")
        for line in latency_table(calls):
            print("  " + line)
        figures = count(database_url, calls)
        print(
            f"\ndirect messages: {figures['dm_accepted']} accepted, {figures['dm_stored']} "
            f"stored, {figures['dm_rejected']} rejected; lost {figures['dm_lost']}, duplicated "
            f"{figures['dm_duplicated']}; recipient's event missing {figures['dm_undelivered']},"
            f" doubled {figures['dm_events_doubled']}; stored without a 202 "
            f"{figures['dm_without_202']}"
        )
        to_stored = figures["dm_to_stored"]
        print(
            f"  accepted -> stored: p50 {percentile(to_stored, 50) * 1000:.0f} ms, p99 "
            f"{percentile(to_stored, 99) * 1000:.0f} ms, max {max(to_stored or [0]) * 1000:.0f} ms"
        )
        print(
            f"broadcasts: {figures['bc_accepted']} accepted, {figures['bc_stored']} fanned out; "
            f"lost {figures['bc_lost']}; {figures['bc_inbox']} inbox rows for an audience of "
            f"{figures['bc_audience']}; recipients without their event "
            f"{figures['bc_recipients_missed']}, events doubled {figures['bc_events_doubled']}"
        )
        to_stored = figures["bc_to_stored"]
        print(
            f"  accepted -> fanned out: p50 {percentile(to_stored, 50):.1f} s, p99 "
            f"{percentile(to_stored, 99):.1f} s, max {max(to_stored or [0]):.1f} s"
        )
        print("\n" + meter.report(measured))
        bench.report_dead()
        return verdicts(calls, figures, drained_ok=not (left_sends or left_broadcasts))


def verdicts(calls: list[Call], figures: dict[str, Any], drained_ok: bool) -> int:
    p99 = max(
        percentile([(c.done - c.scheduled) * 1000 for c in calls if c.kind == kind], 99)
        for kind in {c.kind for c in calls}
    )
    errors = sum(1 for c in calls if c.status != 202) / len(calls)
    intact = drained_ok and not any(
        figures[key]
        for key in (
            "dm_lost",
            "dm_duplicated",
            "dm_undelivered",
            "dm_events_doubled",
            "bc_lost",
            "bc_recipients_missed",
            "bc_events_doubled",
        )
    )
    intact = intact and figures["bc_inbox"] == figures["bc_audience"]
    print(f"\nworst p99 of a call {p99:.1f} ms, errors {errors:.2%}, intact: {intact}")
    ok = True
    for name, bar in (("seed 001", SEED_BAR), ("ours", OUR_BAR)):
        passed = p99 < bar["p99_ms"] and errors <= bar["error_share"] and intact
        ok = ok and passed
        print(
            f"  {verdict(passed)}  {name}: p99 < {bar['p99_ms']:g} ms, errors <= "
            f"{bar['error_share']:.1%}, nothing lost or doubled"
        )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return run_cleanly(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
