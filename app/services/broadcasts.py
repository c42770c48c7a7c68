"""Broadcasts: accepting one against the sender's quota, fanning it out in chunks, the
recipients' inbox, and the sweeper and quota jobs.

Accepting is a send's outbox pattern: the API writes the broadcast as `queued` and
spends one unit of the sender's quota in the same transaction, answers 202 once that is
committed, and enqueues the fan-out only after the commit. A refusal (or any error)
rolls the whole transaction back, so a refused broadcast spends nothing.

Quota usage is counted per period key (sender, scope, period start): the key is
computed from the policy's `reset_at` and the clock, so the period rolls over by itself
at the reset time. The reset job only deletes rows of periods long over; running it
late, twice or never cannot give a sender more than the quota. The spend is one
`INSERT .. ON CONFLICT DO UPDATE .. WHERE used < quota`: PostgreSQL serialises
concurrent spends on the row, so N requests across any number of processes let
exactly `quota` through.

Fan-out walks the audience in user id order, CHUNK_SIZE recipients per task run (one
transaction each), keeping its place in `broadcasts.fanout_cursor`; the broadcast row
is locked for the chunk, so two copies of the task take turns and continue from where
the other stopped. A chunk writes the inbox rows with one multi-row insert and appends
events only for rows it actually inserted, so running a chunk again writes nothing
twice. Its events are announced as one pub/sub message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db import after_commit
from app.events import append_event_batch
from app.models import Broadcast, BroadcastQuotaUsage, BroadcastRecipient, User
from app.policy import ALL_AUDIENCE, Decision, Policy
from app.problems import BadRequest, Conflict, NotFound
from app.services.access import actor, parse_uuid
from app.services.messages import body_digest
from app.services.pagination import decode_cursor, encode_cursor
from app.services.sends import MAX_DISPATCHES, STALE_AFTER, claim_stale, refusal
from monitoring.metrics import (
    BROADCAST_CHUNK_DURATION,
    BROADCAST_RECIPIENTS,
    BROADCASTS,
    BROADCASTS_REDISPATCHED,
)

# Names the broadcasts of one sender: a retry with the same client id gets the same id.
BROADCAST_ID_NAMESPACE = uuid.UUID("0c0b7a52-3c3e-4f0e-9a59-2a4d3e6f1b77")
# Recipients written per transaction: big enough that a 5,000-recipient broadcast is a
# handful of statements, small enough that no chunk holds many row locks for long.
CHUNK_SIZE = 1000
# The reset job keeps the period that just ended for this long: a request that read the
# clock just before the reset but spends just after must still find its period's count.
QUOTA_KEEP_AFTER_END = timedelta(hours=1)
PERIOD_KEY_FORMAT = "%Y-%m-%dT%H:%MZ"  # fixed width: string order is time order


def broadcast_id_for(sender_id: str, client_id: str) -> uuid.UUID:
    return uuid.uuid5(BROADCAST_ID_NAMESPACE, f"{sender_id}\x1f{client_id}")


def period_key(policy: Policy, now: datetime) -> str:
    """The quota period containing `now`, named by its start (UTC)."""
    return policy.quota_period_start(now).strftime(PERIOD_KEY_FORMAT)


@dataclass(frozen=True, slots=True)
class AcceptedBroadcast:
    broadcast_id: uuid.UUID
    status: str  # "queued" for a new broadcast; a repeat answers with where it stands


def _refuse(decision: Decision) -> Exception:
    BROADCASTS.labels("refused", decision.rule or "forbidden").inc()
    if decision.rule == "unknown_audience":
        # Not a rule saying no: a name that does not exist is bad input.
        return BadRequest(decision.reason, code="unknown_audience")
    return refusal(decision)


_EARLIER = select(
    Broadcast.audience, Broadcast.scope, Broadcast.body_sha256, Broadcast.status
).where(Broadcast.id == bindparam("broadcast_id"))

# Spend one unit, unless the period's count has reached the quota. The row lock of the
# upsert makes concurrent spends take turns; each re-reads `used` before deciding.
_SPEND = text(
    """
    INSERT INTO broadcast_quota_usage AS u (sender_id, scope, period, used, updated_at)
    VALUES (:sender_id, :scope, :period, 1, clock_timestamp())
    ON CONFLICT (sender_id, scope, period)
    DO UPDATE SET used = u.used + 1, updated_at = clock_timestamp()
    WHERE u.used < :quota
    RETURNING u.used
    """
)


def accept_broadcast(
    session: Session,
    policy: Policy,
    sender: User,
    *,
    audience: str,
    scope: str | None,
    body: str,
    client_id: str,
    enqueue: Callable[[uuid.UUID], None],
    now: datetime | None = None,
) -> AcceptedBroadcast:
    """Check a broadcast, spend one unit of the sender's quota and record it as queued;
    `enqueue(broadcast_id)` runs after the caller commits. On a refusal this raises
    after writing: the caller must roll back (a request does; so does `transaction()`).
    The same client id with the same audience, scope and body gives the same id and
    spends nothing more; with anything else it is a 409."""
    now = now or datetime.now(UTC)
    scope = scope or ""
    broadcast_id, digest = broadcast_id_for(sender.id, client_id), body_digest(body)

    def earlier_broadcast() -> AcceptedBroadcast | None:
        earlier = session.execute(_EARLIER, {"broadcast_id": broadcast_id}).first()
        if earlier is None:
            return None
        if (earlier.audience, earlier.scope, earlier.body_sha256) != (audience, scope, digest):
            BROADCASTS.labels("refused", "client_id_reused").inc()
            raise Conflict(
                "This client_id was already used for another broadcast.", code="client_id_reused"
            )
        if earlier.status == "queued":
            # The client may be retrying because the first enqueue was lost.
            after_commit(session, lambda: enqueue(broadcast_id))
        BROADCASTS.labels("accepted", "repeat").inc()
        return AcceptedBroadcast(broadcast_id, earlier.status)

    if (repeat := earlier_broadcast()) is not None:
        return repeat
    body_check = policy.check_body(body)
    if not body_check:
        raise _refuse(body_check)
    decision = policy.may_broadcast(actor(sender), audience)
    if not decision:
        raise _refuse(decision)
    quota = policy.broadcast_quota(sender.role, audience)
    key = period_key(policy, now) if quota is not None else None
    inserted = session.execute(
        insert(Broadcast)
        .values(
            id=broadcast_id,
            tenant_id=sender.tenant_id,
            sender_id=sender.id,
            client_id=client_id,
            audience=audience,
            scope=scope,
            body=body,
            body_sha256=digest,
            status="queued",
            quota_period=key,
            created_at=func.clock_timestamp(),
        )
        .on_conflict_do_nothing(index_elements=["sender_id", "client_id"])
        .returning(Broadcast.id)
    ).first()
    if inserted is None:
        # A concurrent request with the same client id got there first (and spent).
        repeat = earlier_broadcast()
        assert repeat is not None, "a conflicting row must be visible after the insert"
        return repeat
    if quota is not None:
        spent = session.execute(
            _SPEND, {"sender_id": sender.id, "scope": scope, "period": key, "quota": quota}
        ).first()
        if spent is None:
            raise _refuse(policy.may_broadcast(actor(sender), audience, sent_in_period=quota))
    after_commit(session, lambda: enqueue(broadcast_id))
    BROADCASTS.labels("accepted", "new").inc()
    return AcceptedBroadcast(broadcast_id, "queued")


# ----------------------------------------------------------------------------- fan-out


@dataclass(frozen=True, slots=True)
class ChunkResult:
    broadcast_id: uuid.UUID
    # "delivered" (more may follow), "stored" (the last chunk), "rejected", "duplicate"
    # (already decided) or "missing"
    outcome: str
    recipients: int = 0  # inbox rows and events written by this run


def broadcast_json(broadcast: Any) -> dict[str, Any]:
    """What a recipient sees of a broadcast (an ORM object or a row of its columns)."""
    deleted = broadcast.deleted_at is not None
    return {
        "id": str(broadcast.id),
        "sender_id": broadcast.sender_id,
        "audience": broadcast.audience,
        "scope": broadcast.scope or None,
        "body": None if deleted else broadcast.body,
        "created_at": broadcast.created_at.isoformat(),
    }


# Lock the chunk's users in id order (as every event append does, so no deadlock with
# direct sends), then write the inbox rows in one statement; only rows not already there
# come back, so a chunk run again appends no event twice.
_INSERT_RECIPIENTS = text(
    """
    INSERT INTO broadcast_recipients (broadcast_id, user_id, created_at)
    SELECT :broadcast_id, locked.id, :created_at
    FROM (SELECT id FROM users WHERE id = ANY(:ids) ORDER BY id FOR UPDATE) AS locked
    ON CONFLICT DO NOTHING
    RETURNING user_id
    """
).bindparams(bindparam("ids"))


def audience_after(
    session: Session, policy: Policy, broadcast: Broadcast, after: str, limit: int
) -> list[str]:
    """The next `limit` recipient ids after `after`, in id order: the tenant's users in
    the audience's roles, the sender excepted."""
    query = (
        select(User.id)
        .where(
            User.tenant_id == broadcast.tenant_id,
            User.id != broadcast.sender_id,
            User.id > after,
        )
        .order_by(User.id)
        .limit(limit)
    )
    if broadcast.audience != ALL_AUDIENCE:
        query = query.where(User.role.in_(policy.audience_roles(broadcast.audience)))
    return list(session.scalars(query))


def deliver_chunk(session: Session, broadcast: Broadcast, user_ids: list[str]) -> int:
    """Write `broadcast` to these recipients' inboxes and event logs; those who have it
    already are skipped. Returns how many were new."""
    if not user_ids:
        return 0
    new = list(
        session.scalars(
            _INSERT_RECIPIENTS,
            {
                "broadcast_id": broadcast.id,
                "created_at": broadcast.created_at,
                "ids": user_ids,
            },
        )
    )
    if new:
        append_event_batch(session, new, "broadcast.created", broadcast_json(broadcast))
        BROADCAST_RECIPIENTS.inc(len(new))
    return len(new)


def fan_out_chunk(
    session: Session,
    policy: Policy,
    broadcast_id: str | uuid.UUID,
    *,
    enqueue: Callable[[uuid.UUID], None],
    chunk_size: int = CHUNK_SIZE,
) -> ChunkResult:
    """Deliver the next chunk of a queued broadcast; after commit, `enqueue` the next
    run if there may be more. Safe to run any number of times, at once or in turn."""
    started = time.perf_counter()
    broadcast_id = uuid.UUID(str(broadcast_id))
    broadcast = session.scalars(
        select(Broadcast).where(Broadcast.id == broadcast_id).with_for_update()
    ).first()
    if broadcast is None:
        return ChunkResult(broadcast_id, "missing")
    if broadcast.status != "queued":
        return ChunkResult(broadcast_id, "duplicate")
    if broadcast.fanout_cursor is None:
        # The worker is authoritative: the sender's role may have changed since the 202.
        sender = session.get_one(User, broadcast.sender_id)
        decision = policy.may_broadcast(actor(sender), broadcast.audience)
        if not decision:
            _reject(session, broadcast, decision)
            return ChunkResult(broadcast_id, "rejected")
    # One more than a chunk: whether this is the last chunk is known now, which spares a
    # whole task (a queue hop and a transaction) that would find nobody left.
    user_ids = audience_after(
        session, policy, broadcast, broadcast.fanout_cursor or "", chunk_size + 1
    )
    last = len(user_ids) <= chunk_size
    user_ids = user_ids[:chunk_size]
    if not last:
        # Registered before the events' announcement: the next chunk's database work
        # overlaps this chunk's delivery to sockets.
        after_commit(session, lambda: enqueue(broadcast_id))
    written = deliver_chunk(session, broadcast, user_ids)
    now = session.scalar(select(func.clock_timestamp()))
    if user_ids:
        broadcast.fanout_cursor = user_ids[-1]
    broadcast.recipient_count += written
    # Progress: the sweeper leaves it alone for a while, and counts its tries afresh.
    broadcast.dispatched_at, broadcast.dispatch_count = now, 0
    if last:
        broadcast.status, broadcast.decided_at = "stored", now
        BROADCASTS.labels("stored", "fanned_out").inc()
    BROADCAST_CHUNK_DURATION.observe(time.perf_counter() - started)
    return ChunkResult(broadcast_id, "stored" if last else "delivered", written)


def _reject(session: Session, broadcast: Broadcast, decision: Decision) -> None:
    """The broadcast ends rejected. If it reached nobody, its quota unit is given back:
    the sender was charged for a broadcast that never went out."""
    if broadcast.fanout_cursor is None and broadcast.quota_period is not None:
        session.execute(
            update(BroadcastQuotaUsage)
            .where(
                BroadcastQuotaUsage.sender_id == broadcast.sender_id,
                BroadcastQuotaUsage.scope == broadcast.scope,
                BroadcastQuotaUsage.period == broadcast.quota_period,
                BroadcastQuotaUsage.used > 0,
            )
            .values(used=BroadcastQuotaUsage.used - 1)
        )
    broadcast.status, broadcast.rejection_reason = "rejected", decision.rule
    broadcast.decided_at = session.scalar(select(func.clock_timestamp()))
    BROADCASTS.labels("rejected", decision.rule or "unknown").inc()


def reject_broadcast(session: Session, broadcast_id: str | uuid.UUID, decision: Decision) -> bool:
    """End a queued broadcast whose fan-out can never finish (its task failed for good,
    or it was re-enqueued too often). Recipients already reached keep it. False if it was
    decided already."""
    broadcast = session.scalars(
        select(Broadcast)
        .where(Broadcast.id == uuid.UUID(str(broadcast_id)), Broadcast.status == "queued")
        .with_for_update()
    ).first()
    if broadcast is None:
        return False
    _reject(session, broadcast, decision)
    return True


DELIVERY_FAILED = Decision(False, "delivery_failed", "The broadcast could not be delivered.")


def redispatch_stale_broadcasts(
    session: Session, enqueue: Callable[[uuid.UUID], None], *, stale_after: timedelta = STALE_AFTER
) -> int:
    """Enqueue again (after commit) every queued broadcast whose fan-out has made no
    progress in time (a lost task, a killed worker); reject those tried MAX_DISPATCHES
    times. The same pacing as sends. Returns how many it touched."""
    # No chunk progress (or re-enqueue) for a while: a lost task or a killed worker.
    claimed = claim_stale(session, "broadcasts", stale_after)
    retry = []
    for broadcast_id, dispatch_count in claimed:
        if dispatch_count > MAX_DISPATCHES:
            reject_broadcast(session, broadcast_id, DELIVERY_FAILED)
            BROADCASTS_REDISPATCHED.labels("gave_up").inc()
        else:
            retry.append(broadcast_id)
    if retry:
        BROADCASTS_REDISPATCHED.labels("enqueued").inc(len(retry))

        def enqueue_all() -> None:
            for broadcast_id in retry:
                enqueue(broadcast_id)

        after_commit(session, enqueue_all)
    return len(claimed)


# ----------------------------------------------------------------------------- quotas


def reset_broadcast_quotas(session: Session, policy: Policy, now: datetime) -> int:
    """Delete quota usage of periods that ended (more than QUOTA_KEEP_AFTER_END ago).
    Counting never reads those rows again (a new period has a new key), so this is
    housekeeping: idempotent, and safe to run late, twice or not at all."""
    oldest_kept = period_key(policy, now - QUOTA_KEEP_AFTER_END)
    return (
        session.execute(
            delete(BroadcastQuotaUsage).where(BroadcastQuotaUsage.period < oldest_kept)
        ).rowcount
        or 0
    )


def quota_status(
    session: Session, policy: Policy, user: User, scope: str | None, now: datetime
) -> dict[str, Any]:
    """The user's broadcast rule for `scope` this period: the audiences it reaches, the
    quota, used, left and when the period resets. One rule per role, so one entry or none;
    its audiences share one count."""
    scope = scope or ""
    audiences = policy.broadcast_audiences(user.role)
    rules = []
    if audiences:
        quota = policy.broadcast_quota(user.role, audiences[0])
        entry: dict[str, Any] = {"audiences": list(audiences), "quota": quota}
        if quota is None:
            entry |= {"period": "none", "used": None, "left": None, "resets_at": None}
        else:
            used = (
                session.scalar(
                    select(BroadcastQuotaUsage.used).where(
                        BroadcastQuotaUsage.sender_id == user.id,
                        BroadcastQuotaUsage.scope == scope,
                        BroadcastQuotaUsage.period == period_key(policy, now),
                    )
                )
                or 0
            )
            entry |= {
                "period": "day",
                "period_start": policy.quota_period_start(now).isoformat(),
                "used": used,
                "left": max(0, quota - used),
                "resets_at": policy.next_quota_reset(now).isoformat(),
            }
        rules.append(entry)
    return {"scope": scope or None, "rules": rules}


# ----------------------------------------------------------------------------- the inbox


_INBOX_COLUMNS = (
    Broadcast.id,
    Broadcast.sender_id,
    Broadcast.audience,
    Broadcast.scope,
    Broadcast.body,
    Broadcast.deleted_at,
    BroadcastRecipient.created_at,
    BroadcastRecipient.read_at,
)


def _inbox_json(row: Any) -> dict[str, Any]:
    read_at = row.read_at.isoformat() if row.read_at else None
    return broadcast_json(row) | {"read": read_at is not None, "read_at": read_at}


def list_broadcasts(
    session: Session, user: User, *, limit: int, cursor: str | None
) -> dict[str, Any]:
    """Broadcasts the user received, newest first, with read state; keyset pages."""
    query = (
        select(*_INBOX_COLUMNS)
        .join(Broadcast, Broadcast.id == BroadcastRecipient.broadcast_id)
        .where(BroadcastRecipient.user_id == user.id, Broadcast.tenant_id == user.tenant_id)
        .order_by(BroadcastRecipient.created_at.desc(), BroadcastRecipient.broadcast_id.desc())
        .limit(limit + 1)
    )
    if cursor:
        moment, after_id = decode_cursor(cursor)
        query = query.where(
            tuple_(BroadcastRecipient.created_at, BroadcastRecipient.broadcast_id)
            < tuple_(moment, after_id)
        )
    rows = session.execute(query).all()
    page = rows[:limit]
    return {
        "items": [_inbox_json(row) for row in page],
        "next_cursor": encode_cursor(page[-1].created_at, page[-1].id)
        if len(rows) > limit
        else None,
    }


def get_broadcast(session: Session, user: User, broadcast_id: str) -> dict[str, Any]:
    """One broadcast: for its sender with its status and reach, for a recipient with
    their read state; 404 for anyone else."""
    parsed = parse_uuid(broadcast_id, "broadcast")
    broadcast = session.scalars(
        select(Broadcast).where(Broadcast.id == parsed, Broadcast.tenant_id == user.tenant_id)
    ).first()
    if broadcast is not None and broadcast.sender_id == user.id:
        data = broadcast_json(broadcast) | {
            "client_id": broadcast.client_id,
            "status": broadcast.status,
            "recipient_count": broadcast.recipient_count,
        }
        if broadcast.status == "rejected":
            data["reason"] = broadcast.rejection_reason
        return data
    row = session.execute(
        select(*_INBOX_COLUMNS)
        .join(Broadcast, Broadcast.id == BroadcastRecipient.broadcast_id)
        .where(
            BroadcastRecipient.broadcast_id == parsed,
            BroadcastRecipient.user_id == user.id,
            Broadcast.tenant_id == user.tenant_id,
        )
    ).first()
    if row is None:
        raise NotFound("No such broadcast.", code="broadcast_not_found")
    return _inbox_json(row)


def mark_broadcast_read(session: Session, user: User, broadcast_id: str) -> dict[str, Any]:
    """Mark a received broadcast read (the first time counts); 404 if it is not the
    user's."""
    parsed = parse_uuid(broadcast_id, "broadcast")
    read_at = session.scalar(
        update(BroadcastRecipient)
        .where(
            BroadcastRecipient.broadcast_id == parsed,
            BroadcastRecipient.user_id == user.id,
            BroadcastRecipient.broadcast_id.in_(
                select(Broadcast.id).where(Broadcast.tenant_id == user.tenant_id)
            ),
        )
        .values(read_at=func.coalesce(BroadcastRecipient.read_at, func.clock_timestamp()))
        .returning(BroadcastRecipient.read_at)
    )
    if read_at is None:
        raise NotFound("No such broadcast.", code="broadcast_not_found")
    return {"id": str(parsed), "read": True, "read_at": read_at.isoformat()}


__all__ = [
    "CHUNK_SIZE",
    "AcceptedBroadcast",
    "ChunkResult",
    "accept_broadcast",
    "fan_out_chunk",
    "get_broadcast",
    "list_broadcasts",
    "mark_broadcast_read",
    "quota_status",
    "redispatch_stale_broadcasts",
    "reject_broadcast",
    "reset_broadcast_quotas",
]
