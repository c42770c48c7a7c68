"""The data set bench/api_load.py measures against, seeded with set-based SQL into a
database of its own and kept between runs: one bookstore tenant, its users (a few managers,
members of every tier), two-person conversations of skewed length created over 90 days, a
million messages of whole sentences, consistent conversation activity, read positions and
unread counts. `seeded_info` says whether (and with what) the database was seeded."""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import psycopg
from database import setup_database
from psycopg import sql

TENANT = "bookstore-bench"
SEED_MARK = "switchboard-bench-seed "


def database_url(server_url: str, name: str) -> str:
    """The libpq URL of database `name` on the server `server_url` names."""
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


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
    """The users, conversations, participants and message bodies to seed, drawn from
    args.seed: the same arguments give the same data set."""
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
    starter_cum = cumulative([weight for _, weight in starters])
    everyone_cum = cumulative(weights)

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


def cumulative(weights: list[float]) -> list[float]:
    """Running totals of `weights`, as random.choices takes them (cum_weights)."""
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
    """(Re)create the database `db_url` names (args.db_name) and seed it as `args` say
    (--messages, --users, --conversations, --seed), marked as seeded at the end."""
    started = time.perf_counter()
    now = datetime.now(UTC).replace(microsecond=0)
    step = _stepper(started)
    setup_database(args.pg_url, args.db_name)
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


def _stepper(started: float) -> Callable[[str], None]:
    last = [started]

    def step(what: str) -> None:
        now = time.perf_counter()
        print(f"seed: {what} (+{now - last[0]:.1f} s)", flush=True)
        last[0] = now

    return step


def seeded_info(args: argparse.Namespace) -> dict | None:
    """What args.db_name was seeded with (and when), or None if it is not a seeded one."""
    with psycopg.connect(args.pg_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (args.db_name,),
        ).fetchone()
    if row is None or not row[0] or not row[0].startswith(SEED_MARK):
        return None
    return json.loads(row[0][len(SEED_MARK) :])
