"""Policy decisions: who may message whom, retention, broadcast quotas, rollout.

Everything here is a pure function of the loaded policy and its arguments; no clock, no
database. Callers pass facts they looked up (the recipient blocked the sender, how many
broadcasts were already sent this period) and get a `Decision` back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from app.policy.schema import (
    ALL_AUDIENCE,
    REPORT_REASONS,
    AttachmentsSection,
    BroadcastRule,
    PolicyModel,
    RateLimit,
)

# Rollout buckets: 10,000 of them gives 0.01 % steps, finer than anyone sets a rollout.
_ROLLOUT_BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class Actor:
    """What the policy needs to know about a user."""

    id: str
    tenant_id: str
    role: str
    tier: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "may I?": truthy when allowed; otherwise `rule` is a snake_case code
    (also the API error code) and `reason` a sentence to show a person."""

    allowed: bool
    rule: str | None = None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)


def _refuse(rule: str, reason: str) -> Decision:
    return Decision(False, rule, reason)


def _as_utc(moment: datetime) -> datetime:
    # Naive datetimes are taken as UTC: everything in this system runs on UTC, and
    # guessing the host's local zone instead would move quota resets with the server.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class Policy:
    """A validated policy, frozen. Build it with `load_policy` / `parse_policy`."""

    __slots__ = (
        "_broadcast_rules",
        "_reply_roles",
        "_reset_offset",
        "_retention",
        "_rollout_mode",
        "_rollout_percent",
        "_rollout_salt",
        "_start",
        "attachments",
        "conversation_page_size",
        "default_tier",
        "downgrade_grace_days",
        "max_message_length",
        "message_page_size",
        "model",
        "moderator_roles",
        "name",
        "purge_after_days",
        "purge_daily_at",
        "rate_limit_actions",
        "rate_limit_burst",
        "rate_limit_frames",
        "rate_limit_per_second",
        "roles",
        "soft_delete_daily_at",
        "source",
        "subject_required",
        "subject_types",
        "tiers",
    )

    name: str
    source: str
    model: PolicyModel
    roles: tuple[str, ...]
    tiers: tuple[str, ...]
    default_tier: str
    moderator_roles: frozenset[str]
    max_message_length: int
    message_page_size: int
    conversation_page_size: int
    subject_types: tuple[str, ...]
    subject_required: bool
    rate_limit_per_second: float
    rate_limit_burst: int
    # Action name -> its own limit, for the actions the policy limits (app/web.py names
    # each action's endpoints); the stream's client frames' limit.
    rate_limit_actions: Mapping[str, RateLimit]
    rate_limit_frames: RateLimit
    downgrade_grace_days: int
    purge_after_days: int
    # UTC "HH:MM" of the daily retention jobs; None: they run every hour.
    soft_delete_daily_at: str | None
    purge_daily_at: str | None
    # The [attachments] section as it is (enabled, allowed_types, max_bytes, ...).
    attachments: AttachmentsSection
    _start: Mapping[tuple[str, str], frozenset[str]]
    _reply_roles: frozenset[str]
    _retention: Mapping[str, int]
    _broadcast_rules: Mapping[str, BroadcastRule]
    _reset_offset: timedelta
    _rollout_mode: str
    _rollout_percent: float
    _rollout_salt: str

    def __init__(self, model: PolicyModel, source: str = "<string>") -> None:
        """Build from a model that already passed `schema.cross_check`."""
        init = object.__setattr__
        init(self, "model", model)
        init(self, "name", model.name)
        init(self, "source", source)
        init(self, "roles", tuple(model.roles))
        init(self, "tiers", tuple(model.tiers))
        init(self, "default_tier", model.default_tier)
        init(self, "moderator_roles", frozenset(model.moderator_roles))
        init(self, "max_message_length", model.messages.max_length)
        init(self, "message_page_size", model.messages.page_size)
        init(self, "conversation_page_size", model.conversations.page_size)
        init(self, "subject_types", tuple(model.conversations.subject_types))
        init(self, "subject_required", model.conversations.subject_required)
        init(self, "rate_limit_per_second", float(model.rate_limit.per_second))
        init(self, "rate_limit_burst", model.rate_limit.burst)
        # Iterating a pydantic model gives (field name, value): here (action, limit or None).
        actions = {name: limit for name, limit in model.rate_limit.actions if limit is not None}
        init(self, "rate_limit_actions", MappingProxyType(actions))
        init(self, "rate_limit_frames", model.rate_limit.frames)
        init(self, "downgrade_grace_days", model.retention.downgrade_grace_days)
        init(self, "purge_after_days", model.retention.purge_after_days)
        init(self, "soft_delete_daily_at", model.retention.soft_delete_at)
        init(self, "purge_daily_at", model.retention.purge_at)
        init(self, "attachments", model.attachments)

        # Precompute the start matrix per (role, tier) so a check is one dict lookup.
        start: dict[tuple[str, str], set[str]] = {
            (role, tier): set() for role in model.roles for tier in model.tiers
        }
        for rule in model.start_rules:
            rule_tiers = model.tiers if rule.from_tiers is None else rule.from_tiers
            for role in rule.from_roles:
                for tier in rule_tiers:
                    start[(role, tier)].update(rule.to_roles)
        init(self, "_start", MappingProxyType({k: frozenset(v) for k, v in start.items()}))
        reply_roles = model.roles if model.replies is None else model.replies.roles
        init(self, "_reply_roles", frozenset(reply_roles))
        init(self, "_retention", MappingProxyType(dict(model.retention.days)))
        init(
            self,
            "_broadcast_rules",
            MappingProxyType(
                {role: rule for rule in model.broadcasts.rules for role in rule.from_roles}
            ),
        )
        hours, minutes = (int(part) for part in model.broadcasts.reset_at.split(":"))
        init(self, "_reset_offset", timedelta(hours=hours, minutes=minutes))
        init(self, "_rollout_mode", model.rollout.mode)
        init(self, "_rollout_percent", float(model.rollout.percent or 0.0))
        init(self, "_rollout_salt", model.rollout.salt)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}: Policy is frozen")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}: Policy is frozen")

    def __repr__(self) -> str:
        return f"Policy(name={self.name!r}, source={self.source!r})"

    # ------------------------------------------------------------------ direct messages

    def _common_refusal(
        self, sender: Actor, recipient: Actor, blocked_by_recipient: bool
    ) -> Decision | None:
        if sender.tenant_id != recipient.tenant_id:
            return _refuse("other_tenant", "You can only message people in your own community.")
        if sender.id == recipient.id:
            return _refuse("self_conversation", "You cannot message yourself.")
        if not self.messaging_enabled_for(sender.id):
            return _refuse("messaging_disabled", "Messaging is not switched on for you yet.")
        if blocked_by_recipient:
            return _refuse("blocked", "This person is not accepting messages from you.")
        if sender.role not in self.roles:
            return _refuse(
                "unknown_role", f"Your role {sender.role!r} is not known to this policy."
            )
        return None

    def may_start(
        self, sender: Actor, recipient: Actor, *, blocked_by_recipient: bool = False
    ) -> Decision:
        """May `sender` start a new conversation with `recipient`?"""
        refusal = self._common_refusal(sender, recipient, blocked_by_recipient)
        if refusal is not None:
            return refusal
        if sender.tier not in self.tiers:
            return _refuse(
                "unknown_tier", f"Your tier {sender.tier!r} is not known to this policy."
            )
        if recipient.role not in self.roles:
            return _refuse(
                "unknown_role",
                f"The recipient's role {recipient.role!r} is not known to this policy.",
            )
        reachable = self._start[(sender.role, sender.tier)]
        if recipient.role in reachable:
            return ALLOW
        if not reachable:
            if sender.role in self._reply_roles:
                return _refuse(
                    "reply_only",
                    "You can reply to conversations others start with you, but not start new ones.",
                )
            return _refuse("role_not_allowed", "Your role may not start conversations.")
        if any(recipient.role in self._start[(sender.role, tier)] for tier in self.tiers):
            return _refuse(
                "tier_not_allowed",
                f"Your membership tier does not let you start a conversation "
                f"with a {recipient.role}.",
            )
        return _refuse(
            "role_not_allowed",
            f"A {sender.role} may not start a conversation with a {recipient.role}.",
        )

    def may_reply(
        self, sender: Actor, recipient: Actor, *, blocked_by_recipient: bool = False
    ) -> Decision:
        """May `sender` send a message in an existing conversation with `recipient`?

        The caller has already checked that the sender takes part in the conversation.
        """
        refusal = self._common_refusal(sender, recipient, blocked_by_recipient)
        if refusal is not None:
            return refusal
        if sender.role not in self._reply_roles:
            return _refuse("reply_not_allowed", f"A {sender.role} may not send messages.")
        return ALLOW

    def startable_roles(self, role: str, tier: str) -> frozenset[str]:
        """Recipient roles a sender with this role and tier may start a conversation with."""
        return self._start.get((role, tier), frozenset())

    def may_moderate(self, actor: Actor) -> bool:
        return actor.role in self.moderator_roles

    def report_reasons(self) -> tuple[str, ...]:
        """The reasons a report may give: the built-in ones, then the policy's extras."""
        return REPORT_REASONS + tuple(self.model.moderation.extra_reasons)

    # ------------------------------------------------------------------ message shape

    def check_body(self, body: str, attachment_count: int = 0) -> Decision:
        """Length is counted in code points, as PostgreSQL's length() counts characters.
        A message with attachments may have an empty body (a photo on its own)."""
        if attachment_count > self.attachments.max_per_message:
            return _refuse(
                "too_many_attachments",
                f"A message may carry at most {self.attachments.max_per_message} attachments.",
            )
        if not body.strip() and not attachment_count:
            return _refuse("empty_message", "A message cannot be empty.")
        if len(body) > self.max_message_length:
            return _refuse(
                "message_too_long",
                f"A message may be at most {self.max_message_length} characters long.",
            )
        return ALLOW

    def check_subject(self, subject_type: str | None) -> Decision:
        """Is a conversation subject of this type (None: no subject) acceptable?"""
        if subject_type is None:
            if self.subject_required:
                return _refuse("subject_required", "A conversation needs a subject here.")
            return ALLOW
        if subject_type not in self.subject_types:
            return _refuse(
                "unknown_subject_type",
                f"Conversations cannot be about a {subject_type!r} here.",
            )
        return ALLOW

    # ------------------------------------------------------------------ rollout

    def rollout_bucket(self, user_id: str) -> int:
        """A stable number in [0, 10000) for a user; the same on every process and restart,
        which Python's salted hash() is not."""
        digest = hashlib.sha256(f"{self._rollout_salt}:{user_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % _ROLLOUT_BUCKETS

    def messaging_enabled_for(self, user_id: str) -> bool:
        """The rollout switch. Raising the percentage only ever adds users."""
        if self._rollout_mode == "on":
            return True
        if self._rollout_mode == "off":
            return False
        return self.rollout_bucket(user_id) < self._rollout_percent * (_ROLLOUT_BUCKETS / 100)

    # ------------------------------------------------------------------ retention

    def retention_days(self, tier: str) -> int:
        try:
            return self._retention[tier]
        except KeyError:
            raise ValueError(f"unknown tier {tier!r} in policy {self.name!r}") from None

    def message_expiry(self, sent_at: datetime, tier: str) -> datetime:
        """When a message sent at `sent_at` by a sender of `tier` is soft-deleted."""
        return sent_at + timedelta(days=self.retention_days(tier))

    def grace_ends_at(self, changed_at: datetime) -> datetime:
        """When a tier downgrade made at `changed_at` takes effect on existing messages."""
        return changed_at + timedelta(days=self.downgrade_grace_days)

    def expiry_after_tier_change(
        self, sent_at: datetime, old_tier: str, new_tier: str, changed_at: datetime
    ) -> datetime:
        """The new expiry of a message already stored when its sender's tier changes.

        Upgrade (or same retention): the longer retention applies at once.
        Downgrade: the message keeps its old expiry until the grace period ends, then the
        shorter one applies; so it expires at the latest of its new expiry and the end of
        grace, but never later than it would have under the old tier.
        """
        old_expiry = self.message_expiry(sent_at, old_tier)
        new_expiry = self.message_expiry(sent_at, new_tier)
        if new_expiry >= old_expiry:
            return new_expiry
        return min(old_expiry, max(new_expiry, self.grace_ends_at(changed_at)))

    def purge_at(self, deleted_at: datetime) -> datetime:
        """When a soft-deleted message may be purged (unless a report holds it)."""
        return deleted_at + timedelta(days=self.purge_after_days)

    # ------------------------------------------------------------------ broadcasts

    def audience_roles(self, audience: str) -> tuple[str, ...]:
        """The roles a broadcast audience reaches: "all" is every role."""
        if audience == ALL_AUDIENCE:
            return self.roles
        if audience in self.roles:
            return (audience,)
        raise ValueError(f"unknown audience {audience!r}")

    def broadcast_audiences(self, sender_role: str) -> tuple[str, ...]:
        """Audiences a sender with this role may broadcast to (empty: none)."""
        rule = self._broadcast_rules.get(sender_role)
        return () if rule is None else tuple(rule.audiences)

    def may_broadcast(self, sender: Actor, audience: str, *, sent_in_period: int = 0) -> Decision:
        """May `sender` broadcast to `audience`, having already sent `sent_in_period`
        broadcasts in the current quota period and scope?"""
        if not self.messaging_enabled_for(sender.id):
            return _refuse("messaging_disabled", "Messaging is not switched on for you yet.")
        if audience != ALL_AUDIENCE and audience not in self.roles:
            return _refuse("unknown_audience", f"There is no audience called {audience!r}.")
        rule = self._broadcast_rules.get(sender.role)
        if rule is None:
            return _refuse("broadcast_not_allowed", f"A {sender.role} may not send broadcasts.")
        if audience not in rule.audiences:
            return _refuse(
                "audience_not_allowed",
                f"A {sender.role} may not broadcast to {audience!r}.",
            )
        if rule.quota is not None and sent_in_period >= rule.quota:
            return _refuse(
                "quota_exceeded",
                f"You have used all {rule.quota} broadcasts for this period.",
            )
        return ALLOW

    def broadcast_quota(self, sender_role: str, audience: str) -> int | None:
        """Broadcasts allowed per sender, scope and period; None means unlimited.

        Counted per sender across all audiences. Asking about an audience the role may not
        reach gives 0.
        """
        rule = self._broadcast_rules.get(sender_role)
        if rule is None or audience not in rule.audiences:
            return 0
        return rule.quota

    def quota_period_start(self, now: datetime) -> datetime:
        """The UTC instant the quota period containing `now` began (the last reset)."""
        utc = _as_utc(now)
        day = (utc - self._reset_offset).date()
        return datetime(day.year, day.month, day.day, tzinfo=UTC) + self._reset_offset

    def quota_period_key(self, now: datetime) -> str:
        """The period containing `now`, named by the UTC date it began on: with a 02:00
        reset, 2026-11-23 01:59 UTC still belongs to "2026-11-22"."""
        return (_as_utc(now) - self._reset_offset).date().isoformat()

    def next_quota_reset(self, now: datetime) -> datetime:
        """The UTC instant the quota period containing `now` ends."""
        return self.quota_period_start(now) + timedelta(days=1)
